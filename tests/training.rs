//! Training nodes on tiny models written as real files: `MotionCustomize` (VMC) writes a patch
//! of temporal Q/K/V only, reports its losses, resumes a finished run without work, and
//! `LoadMotionPatch` applies the patch to the same outputs; bad inputs name the node and input.

mod common;

use std::path::Path;

use serde_json::{json, Value};

/// Loaders, the clip as latents of `frames` frames (noise from the seed: the motion is whatever
/// it is), and `MotionCustomize` as node 6 with `customize` merged into its inputs.
fn customize_workflow(frames: usize, customize: Value) -> Value {
    let mut inputs = json!({
        "model": ["3", 0], "clip": ["1", 1], "latent": ["4", 0],
        "prompt": "a ball is rolling", "steps": 4, "learning_rate": 0.001, "loss": "paper",
        "seed": 1, "filename_prefix": "vmc/test", "checkpoint_every": 2
    });
    for (key, value) in customize.as_object().unwrap() {
        inputs[key] = value.clone();
    }
    json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "MotionModuleLoader", "inputs": {"model_name": "tiny-motion"}},
        "3": {"class_type": "ApplyMotionModule", "inputs": {"model": ["1", 0], "motion_module": ["2", 0], "motion_scale": 1.0}},
        "4": {"class_type": "VideoNoise", "inputs": {"width": 96, "height": 128, "frames": frames, "seed": 5,
                 "channels": 4, "mode": "independent", "correlation": 0.0}},
        "6": {"class_type": "MotionCustomize", "inputs": inputs}
    })
}

#[test]
fn motion_customize_writes_a_qkv_patch_that_load_motion_patch_applies() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");
    let summary =
        common::run_on_tiny_models(&customize_workflow(4, json!({})), &models, &out).unwrap();
    let ui = &summary.ui["6"];
    let losses = ui["loss"].as_array().unwrap();
    assert_eq!(losses.len(), 4);
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    let patch = Path::new(ui["patch"][0]["fullpath"].as_str().unwrap()).to_path_buf();
    assert!(patch.starts_with(&out) && patch.extension().unwrap() == "safetensors");
    let tensors = common::load_tensors(&patch);
    assert!(!tensors.is_empty());
    for key in tensors.keys() {
        assert!(
            key.contains(".motion_modules.")
                && [".to_q.weight", ".to_k.weight", ".to_v.weight"]
                    .iter()
                    .any(|s| key.ends_with(s)),
            "{key}"
        );
    }
    let csv = std::fs::read_to_string(ui["loss_csv"][0]["fullpath"].as_str().unwrap()).unwrap();
    assert_eq!(csv.lines().count(), 5, "{csv}");
    assert!(csv.starts_with("step,loss\n1,"));

    // The same settings again: the saved state has every step, so nothing is trained.
    let again =
        common::run_on_tiny_models(&customize_workflow(4, json!({})), &models, &out).unwrap();
    assert_eq!(again.ui["6"]["resumed_at_step"][0], 4);
    assert_eq!(again.ui["6"]["loss"], ui["loss"]);

    // The MODEL output and the patch loaded onto the base model sample the same latents.
    let mut workflow = customize_workflow(4, json!({}));
    let sample = |model: Value| {
        json!({"class_type": "VideoSampler", "inputs": {"model": model, "positive": ["8", 0], "negative": ["8", 0],
               "latent_image": ["4", 0], "seed": 2, "steps": 1, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}})
    };
    workflow["7"] = json!({"class_type": "LoadMotionPatch", "inputs": {"model": ["3", 0], "patch_name": patch.to_string_lossy()}});
    workflow["8"] =
        json!({"class_type": "TextEncode", "inputs": {"clip": ["1", 1], "text": "a ball"}});
    workflow["9"] = sample(json!(["6", 0]));
    workflow["10"] = sample(json!(["7", 0]));
    workflow["11"] = json!({"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "tuned"}});
    workflow["12"] = json!({"class_type": "SaveLatent", "inputs": {"samples": ["10", 0], "filename_prefix": "loaded"}});
    let both = common::run_on_tiny_models(&workflow, &models, &out).unwrap();
    let read = |node: &str| {
        let entry = &both.ui[node]["latents"][0];
        std::fs::read(
            out.join(entry["subfolder"].as_str().unwrap())
                .join(entry["filename"].as_str().unwrap()),
        )
        .unwrap()
    };
    assert_eq!(
        read("11"),
        read("12"),
        "the loaded patch gives the tuned model's output"
    );
}

#[test]
fn bad_clips_prompts_and_patches_name_the_node_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");

    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &customize_workflow(1, json!({})),
        &models,
        &out,
    ));
    assert_eq!(
        (node.as_str(), input.as_deref()),
        ("6", Some("latent")),
        "{message}"
    );
    assert!(message.contains("2 frames or more"), "{message}");

    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &customize_workflow(4, json!({"prompt": "  "})),
        &models,
        &out,
    ));
    assert_eq!(
        (node.as_str(), input.as_deref()),
        ("6", Some("prompt")),
        "{message}"
    );

    let mut no_motion = customize_workflow(4, json!({"model": ["1", 0]}));
    no_motion.as_object_mut().unwrap().remove("3");
    let (node, input, message) =
        common::node_error(common::run_on_tiny_models(&no_motion, &models, &out));
    assert_eq!(
        (node.as_str(), input.as_deref()),
        ("6", Some("model")),
        "{message}"
    );

    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &customize_workflow(4, json!({"latent": null})),
        &models,
        &out,
    ));
    assert_eq!(
        (node.as_str(), input.as_deref()),
        ("6", Some("latent")),
        "{message}"
    );

    // A patch whose projection has another shape is for another motion module.
    let adapter = common::load_tensors(
        &models
            .motion_module
            .join("diffusion_pytorch_model.safetensors"),
    );
    let key = adapter
        .keys()
        .find(|k| k.ends_with("attn1.to_q.weight"))
        .unwrap();
    let wrong = std::collections::HashMap::from([(
        key.clone(),
        candle_core::Tensor::zeros((3, 3), candle_core::DType::F32, &candle_core::Device::Cpu)
            .unwrap(),
    )]);
    let patch = dir.path().join("other.safetensors");
    candle_core::safetensors::save(&wrong, &patch).unwrap();
    let workflow = json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "MotionModuleLoader", "inputs": {"model_name": "tiny-motion"}},
        "3": {"class_type": "ApplyMotionModule", "inputs": {"model": ["1", 0], "motion_module": ["2", 0], "motion_scale": 1.0}},
        "7": {"class_type": "LoadMotionPatch", "inputs": {"model": ["3", 0], "patch_name": patch.to_string_lossy()}},
        "8": {"class_type": "TextEncode", "inputs": {"clip": ["1", 1], "text": "a ball"}},
        "9": {"class_type": "VideoSampler", "inputs": {"model": ["7", 0], "positive": ["8", 0], "negative": ["8", 0],
               "latent_image": ["4", 0], "seed": 2, "steps": 1, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}},
        "4": {"class_type": "VideoNoise", "inputs": {"width": 96, "height": 128, "frames": 2, "seed": 5,
                 "channels": 4, "mode": "independent", "correlation": 0.0}},
        "10": {"class_type": "SaveLatent", "inputs": {"samples": ["9", 0], "filename_prefix": "x"}}
    });
    let (node, input, message) =
        common::node_error(common::run_on_tiny_models(&workflow, &models, &out));
    assert_eq!(
        (node.as_str(), input.as_deref()),
        ("7", Some("patch_name")),
        "{message}"
    );
    assert!(message.contains("another motion module"), "{message}");
}
