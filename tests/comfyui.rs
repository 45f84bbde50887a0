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
    assert!(unchanged == zeros, "denoise 0 changed the latents");

    let mut late = core_txt2img();
    late["3"] = json!({"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["4", 0], "add_noise": "enable", "noise_seed": 1, "steps": 3, "cfg": 8.0,
        "sampler_name": "euler", "scheduler": "karras", "positive": ["6", 0], "negative": ["7", 0],
        "latent_image": ["5", 0], "start_at_step": 3, "end_at_step": 10000,
        "return_with_leftover_noise": "disable"}});
    assert!(
        images_of(&late, &models.root, &dir.path().join("c")) == zeros,
        "a start past the end changed the latents"
    );
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

/// AnimateDiff-Evolved's Gen2 text-to-video graph as the editor saves it (UI format): load
/// and apply a motion model, evolved sampling with context options and FreeNoise sample
/// settings, 8 frames in windows of 4.
fn ade_txt2vid_ui(noise_type: &str) -> Value {
    let node = |id: u64, class: &str, inputs: Value, outputs: Value, widgets: Value| json!({"id": id, "type": class, "mode": 0, "inputs": inputs, "outputs": outputs, "widgets_values": widgets});
    let input =
        |name: &str, kind: &str, link: u64| json!({"name": name, "type": kind, "link": link});
    json!({
        "last_node_id": 12, "last_link_id": 14, "version": 0.4,
        "nodes": [
            node(4, "CheckpointLoaderSimple", json!([]), json!([]), json!(["tiny-sd"])),
            node(2, "ADE_LoadAnimateDiffModel", json!([]), json!([]), json!(["tiny-motion"])),
            node(3, "ADE_ApplyAnimateDiffModelSimple", json!([input("motion_model", "MOTION_MODEL_ADE", 1)]), json!([]), json!([])),
            node(5, "ADE_StandardStaticContextOptions", json!([]), json!([]), json!([4, 2, "pyramid", false, 0, 1])),
            node(6, "ADE_AnimateDiffSamplingSettings", json!([]), json!([]), json!([0, noise_type, "comfy", 0, false])),
            node(7, "ADE_UseEvolvedSampling",
                 json!([input("model", "MODEL", 2), input("m_models", "M_MODELS", 3),
                        input("context_options", "CONTEXT_OPTIONS", 4), input("sample_settings", "SAMPLE_SETTINGS", 5)]),
                 json!([]), json!(["autoselect"])),
            node(8, "CLIPTextEncode", json!([input("clip", "CLIP", 6)]), json!([]), json!(["a (red:1.2) fox running"])),
            node(9, "CLIPTextEncode", json!([input("clip", "CLIP", 7)]), json!([]), json!(["blurry"])),
            node(10, "EmptyLatentImage", json!([]), json!([]), json!([96, 128, 8])),
            node(11, "KSampler",
                 json!([input("model", "MODEL", 8), input("positive", "CONDITIONING", 9),
                        input("negative", "CONDITIONING", 10), input("latent_image", "LATENT", 11)]),
                 json!([]), json!([888, "fixed", 2, 7.5, "euler_ancestral", "karras", 1.0])),
            node(12, "VAEDecode", json!([input("samples", "LATENT", 12), input("vae", "VAE", 13)]), json!([]), json!([])),
            node(1, "SaveImage", json!([input("images", "IMAGE", 14)]), json!([]), json!(["AnimateDiff"])),
            node(20, "Note", json!([]), json!([]), json!(["Made with AnimateDiff-Evolved's sample graph"]))
        ],
        "links": [
            [1, 2, 0, 3, 0, "MOTION_MODEL_ADE"], [2, 4, 0, 7, 0, "MODEL"], [3, 3, 0, 7, 1, "M_MODELS"],
            [4, 5, 0, 7, 2, "CONTEXT_OPTIONS"], [5, 6, 0, 7, 3, "SAMPLE_SETTINGS"], [6, 4, 1, 8, 0, "CLIP"],
            [7, 4, 1, 9, 0, "CLIP"], [8, 7, 0, 11, 0, "MODEL"], [9, 8, 0, 11, 1, "CONDITIONING"],
            [10, 9, 0, 11, 2, "CONDITIONING"], [11, 10, 0, 11, 3, "LATENT"], [12, 11, 0, 12, 0, "LATENT"],
            [13, 4, 2, 12, 1, "VAE"], [14, 12, 0, 1, 0, "IMAGE"]
        ]
    })
}

/// Converts a UI workflow with the loaded nodes, as `vdm run` does.
fn from_ui(ui: &Value) -> Value {
    let set = plugins();
    let (workflow, warnings) =
        vdm::ui_workflow::parse_workflow(&ui.to_string(), &set).unwrap_or_else(|e| panic!("{e}"));
    assert!(warnings.is_empty(), "{warnings:?}");
    workflow.to_json()
}

#[test]
fn animatediff_evolved_gen2_graph_runs_from_its_ui_file() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let api = from_ui(&ade_txt2vid_ui("FreeNoise"));
    assert_eq!(api["6"]["inputs"]["noise_type"], "FreeNoise");
    assert_eq!(api["11"]["inputs"]["seed"], 888);
    let frames = images_of(&api, &models.root, &dir.path().join("free"));
    assert_eq!(frames.len(), 8);
    // FreeNoise changes the noise of the frames after the first window, so the video (which
    // noise each frame gets is checked in `sampling::comfy_noise`).
    let plain = images_of(
        &from_ui(&ade_txt2vid_ui("default")),
        &models.root,
        &dir.path().join("plain"),
    );
    assert_eq!(plain.len(), 8);
    assert!(plain != frames, "FreeNoise left the video unchanged");
}

/// The core graph with a Gen1 AnimateDiff loader between the checkpoint and the sampler.
fn gen1_graph(extra_inputs: Value) -> Value {
    let mut graph = core_txt2img();
    graph["5"]["inputs"]["batch_size"] = json!(4);
    let mut inputs =
        json!({"model": ["4", 0], "model_name": "tiny-motion", "beta_schedule": "autoselect"});
    for (k, v) in extra_inputs.as_object().unwrap() {
        inputs[k] = v.clone();
    }
    graph["20"] = json!({"class_type": "ADE_AnimateDiffLoaderGen1", "inputs": inputs});
    graph["3"]["inputs"]["model"] = json!(["20", 0]);
    graph["3"]["inputs"]["steps"] = json!(2);
    graph
}

#[test]
fn motion_effect_zero_is_the_image_model_and_scale_changes_the_video() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let run = |name: &str, graph: &Value| images_of(graph, &models.root, &dir.path().join(name));

    // The image model, sampled with the schedule autoselect picks for AnimateDiff models.
    let mut image_model = core_txt2img();
    image_model["5"]["inputs"]["batch_size"] = json!(4);
    image_model["3"]["inputs"]["steps"] = json!(2);
    image_model["20"] = json!({"class_type": "ADE_UseEvolvedSampling",
                               "inputs": {"model": ["4", 0], "beta_schedule": "sqrt_linear (AnimateDiff)"}});
    image_model["3"]["inputs"]["model"] = json!(["20", 0]);
    let without_motion = run("image", &image_model);

    let mut no_effect = gen1_graph(json!({"effect_multival": ["21", 0]}));
    no_effect["21"] = json!({"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": 0.0}});
    assert!(
        run("effect0", &no_effect) == without_motion,
        "effect 0 differs from the image model"
    );

    let with_motion = run("motion", &gen1_graph(json!({})));
    assert!(
        with_motion != without_motion,
        "the motion module changed nothing"
    );
    let mut scaled = gen1_graph(json!({"scale_multival": ["21", 0]}));
    scaled["21"] = json!({"class_type": "ADE_MultivalDynamic", "inputs": {"float_val": 1.5}});
    assert!(
        run("scaled", &scaled) != with_motion,
        "the motion scale changed nothing"
    );

    // The legacy loader with legacy uniform context options runs too.
    let mut legacy = gen1_graph(json!({"context_options": ["22", 0], "motion_scale": 1.0}));
    legacy["20"]["class_type"] = json!("ADE_AnimateDiffLoaderWithContext");
    legacy["22"] = json!({"class_type": "ADE_AnimateDiffUniformContextOptions", "inputs": {
        "context_length": 2, "context_stride": 1, "context_overlap": 1, "context_schedule": "uniform",
        "closed_loop": false}});
    assert_eq!(run("legacy", &legacy).len(), 4);
}

#[test]
fn unsupported_animatediff_evolved_settings_name_the_input() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let mut graph = gen1_graph(json!({"context_options": ["22", 0]}));
    graph["22"] = json!({"class_type": "ADE_StandardStaticContextOptions", "inputs": {
        "context_length": 4, "context_overlap": 1, "start_percent": 0.5}});
    let set = plugins();
    let workflow = Workflow::from_json(graph).unwrap();
    let error = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().join("out").to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&workflow)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("22") && error.contains("start_percent"),
        "{error}"
    );
}

#[test]
fn freeinit_iterations_refine_and_one_iteration_is_the_plain_run() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let with_iterations = |iterations: u64| {
        let mut graph = gen1_graph(json!({"sample_settings": ["23", 0]}));
        graph["23"] = json!({"class_type": "ADE_AnimateDiffSamplingSettings", "inputs": {
            "batch_offset": 0, "noise_type": "default", "seed_gen": "comfy", "seed_offset": 0,
            "iteration_opts": ["24", 0]}});
        graph["24"] = json!({"class_type": "ADE_IterationOptsFreeInit", "inputs": {
            "iterations": iterations, "filter": "butterworth", "d_s": 0.25, "d_t": 0.25,
            "n_butterworth": 4, "sigma_step": 999, "apply_to_1st_iter": false,
            "init_type": "FreeInit [sampler sigma]", "iter_batch_offset": 0, "iter_seed_offset": 1}});
        graph
    };
    let run = |name: &str, graph: &Value| images_of(graph, &models.root, &dir.path().join(name));
    let plain = run("plain", &gen1_graph(json!({})));
    assert!(
        run("one", &with_iterations(1)) == plain,
        "one FreeInit iteration changed the run"
    );
    let refined = run("two", &with_iterations(2));
    assert_eq!(refined.len(), plain.len());
    assert!(refined != plain, "a second FreeInit pass changed nothing");
}

#[test]
fn prompt_travel_gives_each_frame_its_prompt() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let run = |name: &str, graph: &Value| images_of(graph, &models.root, &dir.path().join(name));
    // Windows of 2 frames, so each window takes its frames' embeddings.
    let base = || {
        let mut graph = gen1_graph(json!({"context_options": ["22", 0]}));
        graph["22"] = json!({"class_type": "ADE_StandardStaticContextOptions", "inputs": {
            "context_length": 2, "context_overlap": 1}});
        graph
    };
    let schedule = |prompts: &str| {
        let mut graph = base();
        graph["30"] = json!({"class_type": "ADE_PromptSchedulingLatents", "inputs": {
            "prompts": prompts, "clip": ["4", 1], "latent": ["5", 0], "print_schedule": true,
            "tensor_interp": "lerp"}});
        graph["3"]["inputs"]["positive"] = json!(["30", 0]);
        graph["3"]["inputs"]["latent_image"] = json!(["30", 1]);
        graph
    };
    let mut plain = base();
    plain["6"]["inputs"]["text"] = json!("a fox");
    let single = run("single", &plain);
    // One keyframe is the prompt for every frame.
    assert!(
        run("constant", &schedule("\"0\": \"a fox\"")) == single,
        "a one-prompt schedule differs"
    );
    let travelled = run(
        "travel",
        &schedule("\"0\": \"a fox\", \"3\": \"(a dog:1.3) in snow\""),
    );
    assert_eq!(travelled.len(), 4);
    assert!(travelled != single, "the schedule changed nothing");

    let mut bad = schedule("0 = a fox");
    bad["3"]["inputs"]["steps"] = json!(1);
    let set = plugins();
    let error = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().join("bad").to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(bad).unwrap())
        .unwrap_err()
        .to_string();
    assert!(error.contains("30") && error.contains("prompts"), "{error}");
}

/// A motion LoRA in AnimateDiff's key style on the first temporal attention's query of the
/// tiny motion module, written where AnimateDiff-Evolved looks for them.
fn write_motion_lora(models: &common::TinyModels) {
    let weights = candle_core::safetensors::load(
        models
            .motion_module
            .join("diffusion_pytorch_model.safetensors"),
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let query = &weights["down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight"];
    let (out_features, in_features) = query.dims2().unwrap();
    let module = "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q_lora";
    let device = candle_core::Device::Cpu;
    let tensors = std::collections::HashMap::from([
        (
            format!("{module}.down.weight"),
            candle_core::Tensor::randn(0f32, 0.5, (2, in_features), &device).unwrap(),
        ),
        (
            format!("{module}.up.weight"),
            candle_core::Tensor::randn(0f32, 0.5, (out_features, 2), &device).unwrap(),
        ),
    ]);
    let folder = models.root.join("animatediff_motion_lora");
    std::fs::create_dir_all(&folder).unwrap();
    candle_core::safetensors::save(&tensors, folder.join("zoom.safetensors")).unwrap();
}

#[test]
fn motion_loras_merge_into_the_motion_model() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    write_motion_lora(&models);
    let run = |name: &str, graph: &Value| images_of(graph, &models.root, &dir.path().join(name));
    let with_lora = |strength: f64| {
        let mut graph = gen1_graph(json!({"motion_lora": ["25", 0]}));
        graph["25"] = json!({"class_type": "ADE_AnimateDiffLoRALoader",
                             "inputs": {"name": "zoom.safetensors", "strength": strength}});
        graph
    };
    let plain = run("plain", &gen1_graph(json!({})));
    assert!(
        run("zero", &with_lora(0.0)) == plain,
        "a motion LoRA at strength 0 changed the video"
    );
    assert!(
        run("one", &with_lora(1.0)) != plain,
        "the motion LoRA changed nothing"
    );

    let mut missing = with_lora(1.0);
    missing["25"]["inputs"]["name"] = json!("nope.safetensors");
    let set = plugins();
    let executor = Executor::new(&set, &vdm::events::Silent)
        .with_setting("models_dir", models.root.to_string_lossy());
    let report = executor.validate(&Workflow::from_json(missing).unwrap());
    assert_eq!(report.issues("25")[0].input_name(), Some("name"));
}

fn ffmpeg_available() -> bool {
    std::process::Command::new("ffmpeg")
        .arg("-version")
        .output()
        .is_ok_and(|o| o.status.success())
}

#[test]
fn core_video_nodes_create_save_load_and_split_videos() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let mut graph = core_txt2img();
    graph["5"]["inputs"]["batch_size"] = json!(3);
    graph["3"]["inputs"]["steps"] = json!(1);
    graph["10"] = json!({"class_type": "CreateVideo", "inputs": {"images": ["8", 0], "fps": 12.0}});
    graph["11"] = json!({"class_type": "GetVideoComponents", "inputs": {"video": ["10", 0]}});
    graph["9"]["inputs"]["images"] = json!(["11", 0]);
    let out = dir.path().join("out");
    let summary = run(&graph, &models.root, &out);
    assert_eq!(summary.ui["9"]["images"].as_array().unwrap().len(), 3);
    if !ffmpeg_available() {
        eprintln!("ffmpeg not found: SaveVideo and LoadVideo of MP4 not checked");
        return;
    }
    graph["12"] = json!({"class_type": "SaveVideo", "inputs": {
        "video": ["10", 0], "filename_prefix": "video/ComfyUI", "format": "auto", "codec": "auto"}});
    let summary = run(&graph, &models.root, &out);
    let saved = &summary.ui["12"]["images"][0];
    assert_eq!(saved["subfolder"], "video");
    assert_eq!(summary.ui["12"]["animated"], json!([true]));
    let file = out.join("video").join(saved["filename"].as_str().unwrap());
    assert!(file.to_string_lossy().ends_with(".mp4"));

    let reload = json!({
        "1": {"class_type": "LoadVideo", "inputs": {"file": file.to_string_lossy()}},
        "2": {"class_type": "GetVideoComponents", "inputs": {"video": ["1", 0]}},
        "3": {"class_type": "SaveImage", "inputs": {"images": ["2", 0], "filename_prefix": "frame"}}
    });
    let summary = run(&reload, &models.root, &dir.path().join("reloaded"));
    assert_eq!(summary.ui["3"]["images"].as_array().unwrap().len(), 3);
}

#[test]
fn the_shipped_comfyui_ui_workflow_runs_on_tiny_models() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/comfyui-txt2vid.json"),
    )
    .unwrap();
    let ui: Value = serde_json::from_str(&text).unwrap();
    let mut api = from_ui(&ui);
    api["4"]["inputs"]["ckpt_name"] = json!("tiny-sd");
    api["2"]["inputs"]["model_name"] = json!("tiny-motion");
    api["5"]["inputs"] = json!({"width": 96, "height": 128, "batch_size": 6});
    api["6"]["inputs"]["context_length"] = json!(4);
    api["6"]["inputs"]["context_overlap"] = json!(2);
    api["3"]["inputs"]["steps"] = json!(2);
    let summary = run(&api, &models.root, &dir.path().join("out"));
    let gif = &summary.ui["11"]["gifs"][0];
    assert_eq!(gif["format"], "image/gif");
    assert!(Path::new(gif["fullpath"].as_str().unwrap()).exists());
}

#[test]
fn seeds_span_the_whole_u64_range() {
    let set = plugins();
    let info = vdm::object_info::object_info(set.descriptors(), "vdm_nodes");
    let seed = &info["KSampler"]["input"]["required"]["seed"][1];
    assert_eq!(seed["max"], json!(u64::MAX));
    assert_eq!(seed["control_after_generate"], json!(true));
    let mut graph = core_txt2img();
    graph["3"]["inputs"]["seed"] = json!(u64::MAX);
    let report = vdm::validate(&Workflow::from_json(graph.clone()).unwrap(), &set);
    assert!(report.is_ok(), "{}", report.to_text());
    graph["3"]["inputs"]["seed"] = json!(-1);
    let report = vdm::validate(&Workflow::from_json(graph).unwrap(), &set);
    assert_eq!(report.issues("3")[0].kind, "value_smaller_than_min");
}
