//! `TrainTemporalAdapter` on tiny models written as real files: `workflows/train-temporal.json`
//! trains on a folder of GIF clips (other files skipped), writes an adapter that
//! `TemporalAttentionInjector`'s `adapter` input and `LoadTemporalAdapter` load to the model
//! the trainer outputs, resumes a finished run without work, and bad clip folders name the node
//! and the `clips` input.

mod common;

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

/// A clip folder: two moving-texture GIFs of 6 frames (24×32 pixels: 12×16 latents through
/// the tiny VAE) and a `notes.txt`, which is no clip.
fn write_clips(dir: &Path) -> PathBuf {
    let clips = dir.join("clips");
    std::fs::create_dir_all(&clips).unwrap();
    common::write_moving_texture_gif(&clips.join("right.gif"), 6, (24, 32), (1, 0));
    common::write_moving_texture_gif(&clips.join("down.gif"), 6, (24, 32), (0, 2));
    std::fs::write(clips.join("notes.txt"), "not a clip").unwrap();
    clips
}

/// `workflows/train-temporal.json` on the tiny models (as JSON, to add nodes to): 3 steps on
/// 4-frame windows of the clips in `clips`, sampling 4 frames of 12×16 latents in 2 steps.
fn shipped_workflow(clips: &Path) -> Value {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/train-temporal.json"),
    )
    .unwrap();
    let mut workflow: Value = serde_json::from_str(&text).unwrap();
    for node in workflow.as_object_mut().unwrap().values_mut() {
        let changes = match node["class_type"].as_str().unwrap() {
            "CheckpointLoader" => json!({"ckpt_name": "tiny-sd"}),
            "TrainTemporalAdapter" => json!({
                "clips": clips.to_string_lossy(), "steps": 3, "frames": 4, "learning_rate": 0.001,
                "warmup_steps": 1, "checkpoint_every": 2, "width": 24, "height": 32
            }),
            "EmptyVideoLatent" | "VideoNoise" => json!({"width": 96, "height": 128, "frames": 4}),
            "VideoSampler" => json!({"steps": 2}),
            _ => json!({}),
        };
        for (input, value) in changes.as_object().unwrap() {
            node["inputs"][input] = value.clone();
        }
    }
    workflow
}

#[test]
fn the_shipped_workflow_trains_an_adapter_that_the_injector_loads() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let clips = write_clips(dir.path());
    let out = dir.path().join("out");
    let workflow = shipped_workflow(&clips);
    let started = std::time::Instant::now();
    let summary = common::run_on_tiny_models(&workflow, &models, &out).unwrap();
    eprintln!(
        "the shipped workflow, 3 steps and a 2-step sample: {:.1} s",
        started.elapsed().as_secs_f64()
    );

    let ui = &summary.ui["2"];
    let losses = ui["loss"].as_array().unwrap();
    assert_eq!(losses.len(), 3);
    assert!(losses.iter().all(|l| l.as_f64().unwrap().is_finite()));
    assert_eq!(ui["resumed_at_step"][0], 0);
    let adapter = PathBuf::from(ui["adapter"][0]["fullpath"].as_str().unwrap());
    assert!(
        adapter.starts_with(out.join("temporal_adapters")),
        "{adapter:?}"
    );
    assert_eq!(adapter.extension().unwrap(), "safetensors");
    let tensors = common::load_tensors(&adapter);
    assert!(!tensors.is_empty());
    for key in tensors.keys() {
        assert!(
            key.contains(".attentions.") && key.contains(".temporal."),
            "{key}"
        );
    }
    let csv = std::fs::read_to_string(ui["loss_csv"][0]["fullpath"].as_str().unwrap()).unwrap();
    assert_eq!(csv.lines().count(), 4, "{csv}");
    assert!(csv.starts_with("step,loss\n1,"));
    assert!(
        summary.ui["10"]["videos"][0]["fullpath"].is_string(),
        "a sampled video: {:?}",
        summary.ui
    );

    // The same workflow again: the saved state has every step, so nothing is trained, and the
    // adapter written loads to what the trainer outputs, through the injector's `adapter`
    // input and through `LoadTemporalAdapter`; without it the sample differs.
    let mut nodes = workflow.clone();
    let injector = |model: Value, adapter: &str| {
        json!({"class_type": "TemporalAttentionInjector", "inputs": {"model": model, "motion_override": 0.6,
               "mode": "bias", "lambda_max": 1.0, "window_min": 2, "gate_strength": 0.0, "adapter": adapter}})
    };
    let adapter_path = adapter.to_string_lossy().into_owned();
    let relative = adapter
        .strip_prefix(&out)
        .unwrap()
        .to_string_lossy()
        .into_owned();
    let extra = json!({
        "20": injector(json!(["2", 0]), ""),
        "21": injector(json!(["1", 0]), &adapter_path),
        "22": {"class_type": "LoadTemporalAdapter", "inputs": {"model": ["1", 0], "adapter_name": relative}},
        "23": injector(json!(["22", 0]), ""),
        "24": injector(json!(["1", 0]), ""),
    });
    for (id, node) in extra.as_object().unwrap() {
        nodes[id] = node.clone();
    }
    for (injected, saved) in [("20", "30"), ("21", "31"), ("23", "32"), ("24", "33")] {
        let sampler = format!("{injected}s");
        nodes[&sampler] = json!({"class_type": "VideoSampler", "inputs": {"model": [injected, 0],
            "positive": ["4", 0], "negative": ["5", 0], "latent_image": ["6", 0], "noise": ["7", 0],
            "seed": 42, "steps": 2, "cfg": 7.5, "scheduler": "ddim", "denoise": 1.0}});
        nodes[saved] = json!({"class_type": "SaveLatent", "inputs": {"samples": [sampler, 0], "filename_prefix": saved}});
    }
    let both = common::run_on_tiny_models(&nodes, &models, &out).unwrap();
    assert_eq!(both.ui["2"]["resumed_at_step"][0], 3);
    assert_eq!(both.ui["2"]["loss"], ui["loss"]);
    let read = |node: &str| {
        let entry = &both.ui[node]["latents"][0];
        std::fs::read(
            out.join(entry["subfolder"].as_str().unwrap())
                .join(entry["filename"].as_str().unwrap()),
        )
        .unwrap()
    };
    let trained = read("30");
    assert!(read("31") == trained, "the injector's `adapter` input");
    assert!(read("32") == trained, "LoadTemporalAdapter");
    assert!(read("33") != trained, "the image model without the adapter");
}

/// The loaders and `TrainTemporalAdapter` alone (node 2), on the clip folder `clips`.
fn train_only(clips: &Path) -> Value {
    json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "TrainTemporalAdapter", "inputs": {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2],
              "clips": clips.to_string_lossy(), "steps": 1, "learning_rate": 0.001, "frames": 4, "seed": 0,
              "filename_prefix": "bad", "width": 24, "height": 32}}
    })
}

#[test]
fn a_folder_without_clips_or_a_clip_of_one_frame_is_refused_naming_clips() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    std::fs::write(empty.join("notes.txt"), "not a clip").unwrap();
    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &train_only(&empty),
        &models,
        &out,
    ));
    assert_eq!((node.as_str(), input.as_deref()), ("2", Some("clips")));
    assert!(message.contains("holds no clips"), "{message}");

    let missing = dir.path().join("missing");
    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &train_only(&missing),
        &models,
        &out,
    ));
    assert_eq!((node.as_str(), input.as_deref()), ("2", Some("clips")));
    assert!(message.contains("not a folder of clips"), "{message}");

    let still = dir.path().join("still");
    std::fs::create_dir_all(&still).unwrap();
    common::write_moving_texture_gif(&still.join("moving.gif"), 6, (24, 32), (1, 0));
    common::write_moving_texture_gif(&still.join("still.gif"), 1, (24, 32), (0, 0));
    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &train_only(&still),
        &models,
        &out,
    ));
    assert_eq!((node.as_str(), input.as_deref()), ("2", Some("clips")));
    assert!(
        message.contains("still.gif") && message.contains("2 frames or more"),
        "{message}"
    );

    let short = dir.path().join("short");
    std::fs::create_dir_all(&short).unwrap();
    common::write_moving_texture_gif(&short.join("three.gif"), 3, (24, 32), (1, 0));
    let (node, input, message) = common::node_error(common::run_on_tiny_models(
        &train_only(&short),
        &models,
        &out,
    ));
    assert_eq!((node.as_str(), input.as_deref()), ("2", Some("clips")));
    assert!(
        message.contains("three.gif") && message.contains("fewer than the 4"),
        "{message}"
    );
    assert!(!out.join("bad_00001_.safetensors").exists());
}
