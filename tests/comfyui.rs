//! ComfyUI workflows run as they are: core classes on tiny models, KSamplerAdvanced's
//! semantics, and UI-format files.

mod common;

use std::path::Path;

use serde_json::{json, Value};
use vdm::{Executor, PluginSet, RunSummary, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

/// ComfyUI's default text-to-image graph in the API format ("Save (API Format)"), with the
/// tiny models' name and size (latents 16×12) and 3 steps.
fn core_txt2img() -> Value {
    json!({
        "3": {"inputs": {"seed": 156680208700286u64, "steps": 3, "cfg": 8.0, "sampler_name": "euler",
                         "scheduler": "normal", "denoise": 1.0, "model": ["4", 0], "positive": ["6", 0],
                         "negative": ["7", 0], "latent_image": ["5", 0]},
              "class_type": "KSampler", "_meta": {"title": "KSampler"}},
        "4": {"inputs": {"ckpt_name": "tiny-sd"}, "class_type": "CheckpointLoaderSimple",
              "_meta": {"title": "Load Checkpoint"}},
        "5": {"inputs": {"width": 96, "height": 128, "batch_size": 2}, "class_type": "EmptyLatentImage",
              "_meta": {"title": "Empty Latent Image"}},
        "6": {"inputs": {"text": "beautiful scenery nature glass bottle landscape, (purple galaxy:1.2) bottle,",
                         "clip": ["4", 1]},
              "class_type": "CLIPTextEncode", "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "7": {"inputs": {"text": "text, watermark", "clip": ["4", 1]}, "class_type": "CLIPTextEncode",
              "_meta": {"title": "CLIP Text Encode (Prompt)"}},
        "8": {"inputs": {"samples": ["3", 0], "vae": ["4", 2]}, "class_type": "VAEDecode",
              "_meta": {"title": "VAE Decode"}},
        "9": {"inputs": {"filename_prefix": "ComfyUI", "images": ["8", 0]}, "class_type": "SaveImage",
              "_meta": {"title": "Save Image"}}
    })
}

fn run(workflow: &Value, models: &Path, out: &Path) -> RunSummary {
    let set = plugins();
    let workflow = Workflow::from_json(workflow.clone()).unwrap();
    Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&workflow)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn comfyui_core_txt2img_runs_and_saves_each_image() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");
    let summary = run(&core_txt2img(), &models.root, &out);
    let images = summary.ui["9"]["images"].as_array().unwrap();
    let names: Vec<&str> = images
        .iter()
        .map(|i| i["filename"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["ComfyUI_00001_.png", "ComfyUI_00002_.png"]);
    assert_eq!(images[0]["type"], "output");
    let image = image::open(out.join(names[0])).unwrap();
    assert_eq!((image.width(), image.height()), (24, 32));
}

/// The 8-bit pixels of every image `workflow` saves.
fn images_of(workflow: &Value, models: &Path, out: &Path) -> Vec<Vec<u8>> {
    let summary = run(workflow, models, out);
    let saver = summary
        .ui
        .values()
        .find(|ui| ui.get("images").is_some())
        .unwrap();
    saver["images"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| {
            image::open(
                out.join(i["subfolder"].as_str().unwrap())
                    .join(i["filename"].as_str().unwrap()),
            )
            .unwrap()
            .to_rgb8()
            .into_raw()
        })
        .collect()
}

#[test]
fn ksampler_advanced_in_two_stages_equals_one_ksampler_run() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    for sampler in ["euler", "dpmpp_2m", "uni_pc"] {
        let mut whole = core_txt2img();
        whole["3"]["inputs"]["steps"] = json!(4);
        whole["3"]["inputs"]["sampler_name"] = json!(sampler);
        let one = images_of(
            &whole,
            &models.root,
            &dir.path().join(format!("one-{sampler}")),
        );

        // The first two steps with the noise left in, then the rest without adding noise.
        let mut staged = whole.clone();
        let stage = |add_noise: &str, start: u64, end: u64, leftover: &str, latent: Value| {
            json!({"class_type": "KSamplerAdvanced", "inputs": {
                "model": ["4", 0], "add_noise": add_noise, "noise_seed": 156680208700286u64, "steps": 4,
                "cfg": 8.0, "sampler_name": sampler, "scheduler": "normal", "positive": ["6", 0],
                "negative": ["7", 0], "latent_image": latent, "start_at_step": start, "end_at_step": end,
                "return_with_leftover_noise": leftover}})
        };
        staged["3"] = stage("enable", 0, 2, "enable", json!(["5", 0]));
        staged["10"] = stage("disable", 2, 10000, "disable", json!(["3", 0]));
        staged["8"]["inputs"]["samples"] = json!(["10", 0]);
        let two = images_of(
            &staged,
            &models.root,
            &dir.path().join(format!("two-{sampler}")),
        );
        if sampler == "euler" {
            // A one-step method carries nothing across steps: the runs agree to rounding.
            for (a, b) in one.iter().zip(&two) {
                let worst = a.iter().zip(b).map(|(x, y)| x.abs_diff(*y)).max().unwrap();
                assert!(worst <= 1, "{sampler}: images differ by {worst}");
            }
        } else {
            // Multistep methods restart their history at the second stage, as in ComfyUI.
            assert_eq!(one.len(), two.len());
        }
    }
}

#[test]
fn denoise_zero_and_a_start_past_the_end_return_the_latents() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let mut plain = core_txt2img();
    plain["3"]["inputs"]["denoise"] = json!(0.0);
    let unchanged = images_of(&plain, &models.root, &dir.path().join("a"));
    let mut decoded_zeros = core_txt2img();
    decoded_zeros["8"]["inputs"]["samples"] = json!(["5", 0]);
    let zeros = images_of(&decoded_zeros, &models.root, &dir.path().join("b"));
    assert_eq!(unchanged, zeros);

    let mut late = core_txt2img();
    late["3"] = json!({"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["4", 0], "add_noise": "enable", "noise_seed": 1, "steps": 3, "cfg": 8.0,
        "sampler_name": "euler", "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0], "start_at_step": 3, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}});
    assert_eq!(images_of(&late, &models.root, &dir.path().join("c")), zeros);
}

#[test]
fn every_sampler_and_scheduler_runs() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let set = plugins();
    let info = vdm::object_info::object_info(set.descriptors(), "vdm_nodes");
    let list = |name: &str| -> Vec<String> {
        info["KSampler"]["input"]["required"][name][0]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_str().unwrap().to_owned())
            .collect()
    };
    let (samplers, schedulers) = (list("sampler_name"), list("scheduler"));
    for required in [
        "euler",
        "euler_ancestral",
        "heun",
        "dpm_2",
        "dpmpp_2m",
        "dpmpp_2m_sde",
        "dpmpp_sde",
        "ddim",
        "uni_pc",
        "lcm",
    ] {
        assert!(samplers.iter().any(|s| s == required), "{required}");
    }
    for required in [
        "normal",
        "karras",
        "exponential",
        "sgm_uniform",
        "simple",
        "ddim_uniform",
        "beta",
    ] {
        assert!(schedulers.iter().any(|s| s == required), "{required}");
    }
    let mut workflow = core_txt2img();
    workflow["3"]["inputs"]["steps"] = json!(2);
    workflow["5"]["inputs"]["batch_size"] = json!(1);
    let pairs = samplers
        .iter()
        .map(|s| (s.as_str(), "karras"))
        .chain(schedulers.iter().map(|s| ("euler", s.as_str())));
    for (sampler, scheduler) in pairs {
        workflow["3"]["inputs"]["sampler_name"] = json!(sampler);
        workflow["3"]["inputs"]["scheduler"] = json!(scheduler);
        let out = dir.path().join(format!("{sampler}-{scheduler}"));
        let images = images_of(&workflow, &models.root, &out);
        assert_eq!(images.len(), 1, "{sampler} {scheduler}");
    }
}
