//! LoRAs as ComfyUI loads them: the merged weights of a kohya and a PEFT LoRA against
//! diffusers' key conversion and merge (`tests/fixtures/lora`, made by `make.py`), and
//! `LoraLoader` / `LoraLoaderModelOnly` through the plugin on the tiny checkpoint.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;
use serde_json::json;
use vdm::{Executor, PluginSet, RunError, Workflow};
use vdm_nodes::models::clip::{ClipTextConfig, ClipTextTransformer};
use vdm_nodes::models::lora::{
    merge_into_text_encoder, merge_into_unet, LoraFile, TextEncoderWeights,
};
use vdm_nodes::models::patcher::PatchedUNet;
use vdm_nodes::models::random::random_weights_for;
use vdm_nodes::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

fn fixture_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/lora")
}

/// Random weights for everything `build` reads, with `known` (by key) in place.
fn weights_with(
    build: impl FnOnce(VarBuilder) -> candle_core::Result<()>,
    known: &HashMap<String, Tensor>,
) -> HashMap<String, Tensor> {
    let mut weights = random_weights_for(build).unwrap();
    for (key, tensor) in known {
        assert!(
            weights.contains_key(key),
            "the fixture's `{key}` is no weight of the model"
        );
        weights.insert(key.clone(), tensor.clone());
    }
    weights
}

/// The fixture's weights under `prefix`, with the prefix removed.
fn with_prefix(reference: &HashMap<String, Tensor>, prefix: &str) -> HashMap<String, Tensor> {
    reference
        .iter()
        .filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t.clone())))
        .collect()
}

#[test]
fn kohya_and_peft_loras_merge_as_diffusers_reads_them() {
    let dir = fixture_dir();
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("README.json")).unwrap()).unwrap();
    let reference = common::load_tensors(&dir.join("reference.safetensors"));

    let unet_config: UNet2DConditionConfig =
        serde_json::from_value(readme["unet_config"].clone()).unwrap();
    let unet_weights = weights_with(
        |vb| UNet2DConditionModel::new(vb, &unet_config).map(|_| ()),
        &with_prefix(&reference, "base.unet."),
    );
    let unet = UNet2DConditionModel::new(
        VarBuilder::from_tensors(unet_weights, DType::F32, &Device::Cpu),
        &unet_config,
    )
    .unwrap();
    let unet = PatchedUNet::new(Arc::new(unet));

    let clip_config: ClipTextConfig =
        serde_json::from_value(readme["clip_config"].clone()).unwrap();
    // Random weights come without the `text_model.` prefix the fixture's keys carry.
    let text_known: HashMap<String, Tensor> = with_prefix(&reference, "base.text_encoder.")
        .into_iter()
        .map(|(k, t)| (k.trim_start_matches("text_model.").to_string(), t))
        .collect();
    let text_weights = weights_with(
        |vb| ClipTextTransformer::new(vb, &clip_config).map(|_| ()),
        &text_known,
    )
    .into_iter()
    .map(|(k, t)| (format!("text_model.{k}"), t))
    .collect();
    let text = TextEncoderWeights::new(clip_config, text_weights);

    for style in ["kohya", "peft"] {
        let strength = readme["strength"][style].as_f64().unwrap();
        let lora = LoraFile::open(&dir.join(format!("{style}.safetensors"))).unwrap();
        let on_unet = merge_into_unet(&lora, &unet, strength).unwrap();
        let on_text = merge_into_text_encoder(&lora, &text, strength).unwrap();
        assert_eq!(
            lora.not_applied(&[&on_unet, &on_text]),
            Vec::<String>::new(),
            "{style}: every key applied"
        );
        let targets = readme["targets"][style].as_object().unwrap();
        assert_eq!(on_unet.weights.len() + on_text.weights.len(), targets.len());
        for target in targets.values() {
            let target = target.as_str().unwrap();
            let expected = &reference[&format!("{style}.{target}")];
            let merged = match target.split_once('.') {
                Some(("unet", key)) => &on_unet.weights[key],
                Some(("text_encoder", key)) => &on_text.weights[key],
                _ => panic!("{target}"),
            };
            let error = common::max_abs_diff(merged, expected)
                / expected
                    .abs()
                    .unwrap()
                    .max_all()
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap() as f64;
            let change = common::max_abs_diff(&reference[&format!("base.{target}")], expected);
            assert!(
                change > 1e-2,
                "{style} {target}: the reference merge changes little"
            );
            eprintln!("{style} {target}: relative error {error:.2e} (change {change:.2})");
            assert!(error < 1e-4, "{style} {target}: relative error {error}");
        }
    }
}

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

/// A kohya LoRA for the tiny checkpoint: one UNet attention projection and one text-encoder
/// projection, at a visible scale, and one key of no layer, written under `<models>/loras/`.
fn write_tiny_lora(models: &common::TinyModels) -> String {
    let unet = common::load_tensors(
        &models
            .checkpoint
            .join("unet/diffusion_pytorch_model.safetensors"),
    );
    let text = common::load_tensors(&models.checkpoint.join("text_encoder/model.safetensors"));
    let unet_shape = unet["down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight"]
        .dims()
        .to_vec();
    let text_shape = text
        .iter()
        .find(|(k, _)| k.ends_with("encoder.layers.0.self_attn.q_proj.weight"))
        .map(|(_, t)| t.dims().to_vec())
        .unwrap();
    let factor = |shape: &[usize]| Tensor::randn(0f32, 0.5, shape, &Device::Cpu).unwrap();
    let mut lora = HashMap::new();
    for (module, shape) in [
        (
            "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
            unet_shape,
        ),
        (
            "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
            text_shape,
        ),
    ] {
        lora.insert(format!("{module}.lora_up.weight"), factor(&[shape[0], 2]));
        lora.insert(format!("{module}.lora_down.weight"), factor(&[2, shape[1]]));
        lora.insert(
            format!("{module}.alpha"),
            Tensor::new(2f32, &Device::Cpu).unwrap(),
        );
    }
    lora.insert(
        "lora_unet_no_such_layer.alpha".into(),
        Tensor::new(1f32, &Device::Cpu).unwrap(),
    );
    let folder = models.root.join("loras");
    std::fs::create_dir_all(&folder).unwrap();
    candle_core::safetensors::save(&lora, folder.join("tiny-lora.safetensors")).unwrap();
    "tiny-lora.safetensors".into()
}

/// A one-step sample of the tiny checkpoint with the model and CLIP of the links given, `loader`
/// as node "2" when given, read back from a SaveLatent file; and the UI output of node "2".
fn sample(
    models: &common::TinyModels,
    loader: Option<serde_json::Value>,
    model: serde_json::Value,
    clip: serde_json::Value,
) -> (Tensor, Option<serde_json::Value>) {
    let mut wf = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd"}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": clip, "text": "a cat"}},
        "4": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2}},
        "5": {"class_type": "VideoSampler", "inputs": {"model": model, "positive": ["3", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "seed": 3, "steps": 1, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "lora"}}
    });
    if let Some(loader) = loader {
        wf["2"] = loader;
    }
    let out = tempfile::tempdir().unwrap();
    let set = plugins();
    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.path().to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(wf).unwrap())
        .unwrap_or_else(|e| panic!("{e}"));
    let path = summary.ui["6"]["latents"][0]["fullpath"].as_str().unwrap();
    let latent = vdm_nodes::video::latent_file::load_latent(Path::new(path), &Device::Cpu).unwrap();
    (latent, summary.ui.get("2").cloned())
}

/// [`sample`] through a `LoraLoader` at these strengths.
fn with_lora_loader(
    models: &common::TinyModels,
    lora: &str,
    strength_model: f64,
    strength_clip: f64,
) -> (Tensor, Option<serde_json::Value>) {
    let loader = lora_loader(lora, strength_model, strength_clip);
    sample(models, Some(loader), json!(["2", 0]), json!(["2", 1]))
}

fn lora_loader(lora: &str, strength_model: f64, strength_clip: f64) -> serde_json::Value {
    json!({"class_type": "LoraLoader", "inputs": {"model": ["1", 0], "clip": ["1", 1], "lora_name": lora,
           "strength_model": strength_model, "strength_clip": strength_clip}})
}

#[test]
fn lora_loader_changes_the_sample_and_strength_zero_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let lora = write_tiny_lora(&models);

    let (plain, _) = sample(&models, None, json!(["1", 0]), json!(["1", 1]));
    let (at_zero, _) = with_lora_loader(&models, &lora, 0.0, 0.0);
    assert_eq!(common::max_abs_diff(&plain, &at_zero), 0.0);

    let (model_only, _) = with_lora_loader(&models, &lora, 1.0, 0.0);
    let (clip_only, _) = with_lora_loader(&models, &lora, 0.0, 1.0);
    let (both, report) = with_lora_loader(&models, &lora, 1.0, 1.0);
    // The one key of the file that names no layer is reported, as ComfyUI's "lora key not
    // loaded".
    let report = report.expect("a report of the keys not loaded");
    assert_eq!(report["lora_keys_not_loaded"], 1, "{report}");
    assert_eq!(
        report["first_keys_not_loaded"][0],
        "lora_unet_no_such_layer.alpha"
    );
    for (what, changed) in [
        ("model", &model_only),
        ("clip", &clip_only),
        ("both", &both),
    ] {
        let difference = common::max_abs_diff(&plain, changed);
        eprintln!("{what}: max |change| of the sample {difference:.3e}");
        assert!(difference > 1e-5, "{what}: the LoRA changed nothing");
    }

    // LoraLoaderModelOnly with the checkpoint's CLIP is LoraLoader with strength_clip 0.
    let node = json!({"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1", 0],
        "lora_name": lora, "strength_model": 1.0}});
    let (via_model_only, _) = sample(&models, Some(node), json!(["2", 0]), json!(["1", 1]));
    assert_eq!(common::max_abs_diff(&via_model_only, &model_only), 0.0);
}

#[test]
fn a_missing_lora_file_is_named_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let wf = json!({
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": lora_loader("no-such-lora.safetensors", 1.0, 1.0),
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["2", 1], "text": "a cat"}},
        "4": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2}},
        "5": {"class_type": "VideoSampler", "inputs": {"model": ["2", 0], "positive": ["3", 0], "negative": ["3", 0],
              "latent_image": ["4", 0], "seed": 3, "steps": 1, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}},
        "6": {"class_type": "SaveLatent", "inputs": {"samples": ["5", 0], "filename_prefix": "lora"}}
    });
    let out = tempfile::tempdir().unwrap();
    let set = plugins();
    let result = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.path().to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(wf).unwrap());
    let Err(RunError::Invalid(report)) = result else {
        panic!("expected a validation error, got {result:?}");
    };
    let issues = report.issues("2");
    assert_eq!(issues.len(), 1, "{}", report.to_text());
    assert_eq!(issues[0].input_name(), Some("lora_name"));
    assert!(
        issues[0].details.contains("no-such-lora.safetensors")
            && issues[0].details.contains("loras"),
        "{}",
        issues[0].details
    );
}
