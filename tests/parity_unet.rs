//! The UNet with AnimateDiff motion modules against diffusers' `UNetMotionModel` on the
//! `unet_motion_mid` and `unet_motion_nomid` fixtures, plus the attention hook's coverage.

mod common;

use std::collections::BTreeSet;
use std::path::Path;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use vdm_nodes::models::attention::{
    AttentionCall, AttentionHook, AttentionKind, AttentionProcessor, ScaledDotProduct,
};
use vdm_nodes::models::call::{ActivationRecorder, FeatureTap};
use vdm_nodes::models::motion::{MotionAdapter, MotionPatch};
use vdm_nodes::models::ops::with_composed_ops;
use vdm_nodes::models::unet::{Timestep, UNet2DConditionModel, UNetInputs, UNetPatches};

const TOLERANCE: f64 = 1e-4;

/// The intermediates diffusers' forward hooks captured, in forward order.
const INTERMEDIATES: [&str; 10] = [
    "time_embedding",
    "conv_in",
    "down_blocks.0.resnets.0",
    "down_blocks.0.attentions.0",
    "down_blocks.0.motion_modules.0",
    "down_blocks.0",
    "down_blocks.1",
    "mid_block",
    "up_blocks.0",
    "up_blocks.1",
];

struct Case {
    unet: UNet2DConditionModel,
    adapter: MotionAdapter,
    io: std::collections::HashMap<String, Tensor>,
}

fn load_case(dir: &Path) -> Case {
    let (unet, adapter) = common::unet_and_motion_adapter(dir);
    let io = common::load_tensors(&dir.join("io.safetensors"));
    for key in [
        "sample",
        "timestep",
        "encoder_hidden_states",
        "out",
        "timestep_float",
        "out_timestep_float",
    ] {
        assert!(
            io.contains_key(key),
            "{}: io.safetensors lacks `{key}`",
            dir.display()
        );
    }
    Case { unet, adapter, io }
}

/// One UNet forward with the given motion patch, processors and taps.
fn forward_tapped<'t>(
    case: &Case,
    sample: &'t Tensor,
    timestep: impl Into<Timestep<'t>>,
    text: &'t Tensor,
    motion: Option<MotionPatch>,
    hook: &AttentionHook,
    taps: &[&dyn FeatureTap],
) -> Result<Tensor> {
    let motion: Vec<MotionPatch> = motion.into_iter().collect();
    let patches = UNetPatches {
        hook,
        motion: &motion,
        taps,
    };
    case.unet
        .forward(&UNetInputs::new(sample, timestep, text), &patches)
}

fn forward<'t>(
    case: &Case,
    sample: &'t Tensor,
    timestep: impl Into<Timestep<'t>>,
    text: &'t Tensor,
    motion: Option<MotionPatch>,
    hook: &AttentionHook,
) -> Result<Tensor> {
    forward_tapped(case, sample, timestep, text, motion, hook, &[])
}

/// The README says whether the case has intermediates; the file must agree.
fn expects_intermediates(dir: &Path) -> bool {
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("README.json")).unwrap()).unwrap();
    let listed = !readme["intermediate_tensors"].is_null();
    let present = dir.join("intermediates.safetensors").exists();
    assert_eq!(
        listed,
        present,
        "{}: README.json and intermediates.safetensors disagree",
        dir.display()
    );
    listed
}

fn check_case(case_name: &str) {
    for dir in common::cases(case_name) {
        println!("case {}", dir.display());
        let case = load_case(&dir);
        let motion = Some(MotionPatch::new(&case.adapter));
        let hook = AttentionHook::new();
        let sample = &case.io["sample"];
        let context = &case.io["encoder_hidden_states"];

        let recorder = ActivationRecorder::new();
        let taps: [&dyn FeatureTap; 1] = [&recorder];
        let out = forward_tapped(
            &case,
            sample,
            &case.io["timestep"],
            context,
            motion,
            &hook,
            &taps,
        )
        .unwrap();
        common::assert_close("out", &out, &case.io["out"], TOLERANCE);

        let out_float = forward(
            &case,
            sample,
            &case.io["timestep_float"],
            context,
            motion,
            &hook,
        )
        .unwrap();
        common::assert_close(
            "out_timestep_float",
            &out_float,
            &case.io["out_timestep_float"],
            TOLERANCE,
        );

        let t = case.io["timestep_float"]
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()[0];
        let out_scalar = forward(&case, sample, t as f64, context, motion, &hook).unwrap();
        common::assert_close(
            "out (timestep as f64)",
            &out_scalar,
            &case.io["out_timestep_float"],
            TOLERANCE,
        );

        if expects_intermediates(&dir) {
            let reference = common::load_tensors(&dir.join("intermediates.safetensors"));
            let mut names: Vec<&String> = reference.keys().collect();
            names.sort_by_key(|n| {
                INTERMEDIATES
                    .iter()
                    .position(|k| k == n)
                    .unwrap_or(usize::MAX)
            });
            for name in names {
                let ours = recorder.get(name).unwrap_or_else(|| {
                    panic!("{}: no activation recorded for `{name}`", dir.display())
                });
                common::assert_close(name, &ours, &reference[name], TOLERANCE);
            }
        }
    }
}

#[test]
fn unet_motion_mid_parity() {
    check_case("unet_motion_mid");
}

/// The composed candle ops (the path that training takes) give diffusers' result too.
#[test]
fn unet_motion_mid_parity_on_the_composed_path() {
    with_composed_ops(|| check_case("unet_motion_mid"));
}

#[test]
fn unet_motion_nomid_parity() {
    check_case("unet_motion_nomid");
}

#[test]
fn unet_motion_nomid_parity_on_the_composed_path() {
    with_composed_ops(|| check_case("unet_motion_nomid"));
}

/// Forwards to the default computation and logs every call.
struct Logging {
    calls: Mutex<BTreeSet<(String, String)>>,
}

impl AttentionProcessor for Logging {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.calls
            .lock()
            .unwrap()
            .insert((call.layer.to_string(), format!("{:?}", call.kind)));
        ScaledDotProduct.attend(call, q, k, v)
    }
}

/// Multiplies the attention output by zero: a processor that visibly changes the result.
struct Silence;

impl AttentionProcessor for Silence {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        ScaledDotProduct.attend(call, q, k, v)?.zeros_like()
    }
}

#[test]
fn attention_hook_sees_every_layer_and_pass_through_is_bit_exact() {
    let dir = &common::cases("unet_motion_mid")[0];
    let case = load_case(dir);
    let motion = Some(MotionPatch::new(&case.adapter));
    let sample = &case.io["sample"];
    let context = &case.io["encoder_hidden_states"];
    let timestep = &case.io["timestep"];

    let plain = forward(
        &case,
        sample,
        timestep,
        context,
        motion,
        &AttentionHook::new(),
    )
    .unwrap();
    let logging = Arc::new(Logging {
        calls: Mutex::new(BTreeSet::new()),
    });
    let hook = AttentionHook::new().with_processor("", None, logging.clone());
    let hooked = forward(&case, sample, timestep, context, motion, &hook).unwrap();
    let diff = common::max_abs_diff(&plain, &hooked);
    assert_eq!(diff, 0.0, "a pass-through processor changed the output");

    let calls = logging.calls.lock().unwrap().clone();
    let mut expected = BTreeSet::new();
    let spatial = [
        "down_blocks.0.attentions.0",
        "down_blocks.0.attentions.1",
        "mid_block.attentions.0",
        "up_blocks.1.attentions.0",
        "up_blocks.1.attentions.1",
        "up_blocks.1.attentions.2",
    ];
    for layer in spatial {
        let block = format!("{layer}.transformer_blocks.0");
        expected.insert((format!("{block}.attn1"), "SpatialSelf".to_string()));
        expected.insert((format!("{block}.attn2"), "Cross".to_string()));
    }
    let mut motion_modules: Vec<String> = Vec::new();
    for i in 0..2 {
        motion_modules.extend((0..2).map(|m| format!("down_blocks.{i}.motion_modules.{m}")));
        motion_modules.extend((0..3).map(|m| format!("up_blocks.{i}.motion_modules.{m}")));
    }
    motion_modules.push("mid_block.motion_modules.0".to_string());
    for module in motion_modules {
        for attn in ["attn1", "attn2"] {
            let path = format!("{module}.transformer_blocks.0.{attn}");
            expected.insert((path, "Temporal".to_string()));
        }
    }
    assert_eq!(calls, expected);

    // Addressing by prefix and kind reaches exactly the layers named.
    let silenced = AttentionHook::new().with_processor(
        "down_blocks.0.motion_modules.0",
        Some(AttentionKind::Temporal),
        Arc::new(Silence),
    );
    let changed = forward(&case, sample, timestep, context, motion, &silenced).unwrap();
    let diff = common::max_abs_diff(&plain, &changed);
    assert!(
        diff > 0.0,
        "a processor on down_blocks.0.motion_modules.0 had no effect"
    );
}

#[test]
fn motion_scale_zero_is_the_image_unet() {
    let dir = &common::cases("unet_motion_nomid")[0];
    let case = load_case(dir);
    let hook = AttentionHook::new();
    let sample = &case.io["sample"];
    let context = &case.io["encoder_hidden_states"];
    let timestep = &case.io["timestep"];
    let scaled = MotionPatch::with_scale(&case.adapter, 0.0);
    let zero = forward(&case, sample, timestep, context, Some(scaled), &hook).unwrap();
    let none = forward(&case, sample, timestep, context, None, &hook).unwrap();
    common::assert_close("motion scale 0 vs no motion", &zero, &none, 1e-6);

    // The video forward without motion equals the image forward on the frames.
    let (b, c, f, h, w) = sample.dims5().unwrap();
    let frames = sample
        .permute((0, 2, 1, 3, 4))
        .unwrap()
        .reshape((b * f, c, h, w))
        .unwrap();
    // Each frame as a one-frame video.
    let images = forward(
        &case,
        &frames.unsqueeze(2).unwrap(),
        timestep,
        context,
        None,
        &hook,
    )
    .unwrap();
    let images = images
        .reshape((b, f, c, h, w))
        .unwrap()
        .permute((0, 2, 1, 3, 4))
        .unwrap();
    common::assert_close(
        "image forward vs video forward without motion",
        &images,
        &none,
        1e-6,
    );
}

#[test]
fn bad_inputs_are_refused_with_a_message() {
    let dir = &common::cases("unet_motion_nomid")[0];
    let case = load_case(dir);
    let hook = AttentionHook::new();
    let sample = &case.io["sample"];
    let context = &case.io["encoder_hidden_states"];
    let motion = Some(MotionPatch::new(&case.adapter));
    let short_context = context.narrow(0, 0, 8).unwrap();
    let err = forward(&case, sample, 10.0, &short_context, motion, &hook).unwrap_err();
    assert!(err.to_string().contains("encoder_hidden_states"), "{err}");
    let too_many = Tensor::zeros((1, 4, 40, 16, 12), DType::F32, &Device::Cpu).unwrap();
    let context = Tensor::zeros((40, 77, 32), DType::F32, &Device::Cpu).unwrap();
    let err = forward(&case, &too_many, 10.0, &context, motion, &hook).unwrap_err();
    assert!(err.to_string().contains("motion_max_seq_length"), "{err}");
}
