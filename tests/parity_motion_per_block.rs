//! A motion adapter whose per-block values differ (`motion_num_attention_heads: [4, 8]`,
//! `motion_transformer_layers_per_block: [1, 2]`, a mid-block module of depth 2), loaded
//! through the motion-module loader from a diffusers `MotionAdapter` folder and run with the
//! UNet against diffusers' `UNetMotionModel` (tests/fixtures/motion_per_block, made by its
//! make.py).

mod common;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Result, Tensor};
use vdm_nodes::models::attention::AttentionHook;
use vdm_nodes::models::checkpoint::open_motion_module;
use vdm_nodes::models::load::MotionAdapterWeights;
use vdm_nodes::models::motion::{Depth, MotionAdapter, MotionBlockLayout, MotionPatch};
use vdm_nodes::models::unet::{
    PerBlock, UNet2DConditionConfig, UNet2DConditionModel, UNetInputs, UNetPatches,
};

const TOLERANCE: f64 = 1e-4;

fn fixture_dir() -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/motion_per_block");
    let readme: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(dir.join("README.json"))
            .unwrap_or_else(|e| panic!("{}: {e}", dir.display())),
    )
    .unwrap();
    assert_eq!(readme["case"], "motion_per_block", "{}", dir.display());
    dir
}

fn load_unet(dir: &Path) -> UNet2DConditionModel {
    let config = UNet2DConditionConfig::from_json_file(&dir.join("unet/config.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    UNet2DConditionModel::from_safetensors(
        &[dir.join("unet/diffusion_pytorch_model.safetensors")],
        &config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap_or_else(|e| panic!("{}: building the UNet: {e}", dir.display()))
}

/// One UNet forward with the motion modules at full strength.
fn unet_motion_forward(
    unet: &UNet2DConditionModel,
    adapter: &MotionAdapter,
    sample: &Tensor,
    timestep: &Tensor,
    encoder_hidden_states: &Tensor,
) -> Result<Tensor> {
    let hook = AttentionHook::new();
    let motion = [MotionPatch::new(adapter)];
    let patches = UNetPatches {
        hook: &hook,
        motion: &motion,
        taps: &[],
    };
    unet.forward(
        &UNetInputs::new(sample, timestep, encoder_hidden_states),
        &patches,
    )
}

#[test]
fn per_block_motion_adapter_matches_diffusers() {
    per_block_motion_adapter_check();
}

/// The composed candle ops (the differentiable path) give diffusers' result too.
#[test]
fn per_block_motion_adapter_matches_diffusers_on_the_composed_path() {
    vdm_nodes::models::ops::with_composed_ops(per_block_motion_adapter_check);
}

fn per_block_motion_adapter_check() {
    let dir = fixture_dir();
    let unet = load_unet(&dir);
    let module = open_motion_module(&dir.join("motion_adapter"))
        .unwrap_or_else(|e| panic!("{}: loading the motion adapter: {e}", dir.display()));
    assert_eq!(
        module.config.motion_num_attention_heads,
        PerBlock::PerBlock(vec![4, 8])
    );
    let layout = module.config.layout().unwrap();
    let summary = |b: &MotionBlockLayout| (b.channels, b.heads, b.depths.clone());
    let blocks: Vec<_> = layout
        .down_blocks
        .iter()
        .chain(&layout.mid_block)
        .chain(&layout.up_blocks)
        .map(summary)
        .collect();
    assert_eq!(
        blocks,
        [
            (8, 4, vec![1]),
            (16, 8, vec![2]),
            (16, 8, vec![2]),
            (16, 8, vec![2, 2]),
            (8, 4, vec![1, 1]),
        ]
    );
    let adapter = module
        .build(unet.config().norm_num_groups, DType::F32, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: building the motion adapter: {e}", dir.display()));

    let io = common::load_tensors(&dir.join("io.safetensors"));
    let out = unet_motion_forward(
        &unet,
        &adapter,
        &io["sample"],
        &io["timestep"],
        &io["encoder_hidden_states"],
    )
    .unwrap();
    common::assert_close("per-block motion adapter: out", &out, &io["out"], TOLERANCE);

    // The fixture tells the per-block heads apart: the first block's 4 heads read as 8 miss it.
    let mut uniform_heads = module.clone();
    uniform_heads.config.motion_num_attention_heads = PerBlock::All(8);
    let adapter = uniform_heads
        .build(unet.config().norm_num_groups, DType::F32, &Device::Cpu)
        .unwrap();
    let out = unet_motion_forward(
        &unet,
        &adapter,
        &io["sample"],
        &io["timestep"],
        &io["encoder_hidden_states"],
    )
    .unwrap();
    let (relative, _) = common::errors(&out, &io["out"]);
    println!("with 8 heads in every block instead: relative error {relative:.3e}");
    assert!(relative > 100.0 * TOLERANCE, "{relative:.3e}");
}

/// Without config.json the loader reads the per-block depths off the weights (heads cannot be
/// read off weights and stay uniform).
#[test]
fn per_block_depths_derived_from_weights() {
    let dir = fixture_dir();
    let file = dir.join("motion_adapter/diffusion_pytorch_model.safetensors");
    let loaded = MotionAdapterWeights::open(&file).unwrap();
    let config = &loaded.config;
    assert_eq!(config.block_out_channels, vec![8, 16]);
    assert_eq!(config.motion_layers_per_block, PerBlock::All(1));
    assert_eq!(
        config.motion_transformer_layers_per_block,
        PerBlock::PerBlock(vec![Depth::All(1), Depth::All(2)])
    );
    assert!(config.use_motion_mid_block);
    assert_eq!(
        config.motion_transformer_layers_per_mid_block,
        Depth::All(2)
    );
}
