//! Every workflow in `workflows/` runs end to end on tiny models written as real files, and
//! bad models give clear errors naming the node.

mod common;

use std::path::{Path, PathBuf};

use image::AnimationDecoder;
use serde_json::json;
use vdm::{Executor, PluginSet, RunError, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

/// Points a shipped workflow at the tiny models and shrinks it so the test stays fast:
/// 96×128 pixels (latents 12×16, the fixture UNet's size), 2 steps, at most `frames` frames.
fn adapt(workflow: &mut Workflow, video: &Path, frames: usize) {
    let ids: Vec<(String, String)> = workflow
        .nodes
        .iter()
        .map(|(id, n)| (id.clone(), n.class_type.clone()))
        .collect();
    for (id, class) in ids {
        let set = |wf: &mut Workflow, input: &str, value: serde_json::Value| {
            wf.set_literal(&id, input, value).unwrap()
        };
        match class.as_str() {
            "CheckpointLoader" => set(workflow, "ckpt_name", json!("tiny-sd")),
            "MotionModuleLoader" => set(workflow, "model_name", json!("tiny-motion")),
            "EmptyVideoLatent" | "VideoNoise" => {
                set(workflow, "width", json!(96));
                set(workflow, "height", json!(128));
                set(workflow, "frames", json!(frames));
            }
            "VideoSampler" | "EntropyEditor" | "VideoInversion" => set(workflow, "steps", json!(2)),
            "MotionCustomize" => set(workflow, "steps", json!(3)),
            "LoadVideoFile" => set(workflow, "video", json!(video.to_string_lossy())),
            _ => {}
        }
    }
}

/// A short GIF of 24×32 pixels (the tiny VAE encodes it to 12×16 latents).
fn write_input_video(dir: &Path, frames: u32) -> PathBuf {
    let path = dir.join("input.gif");
    let file = std::fs::File::create(&path).unwrap();
    let mut encoder = image::codecs::gif::GifEncoder::new(file);
    for f in 0..frames {
        let img = image::RgbaImage::from_fn(24, 32, |x, y| {
            image::Rgba([(x * 10 + f * 20) as u8, (y * 8) as u8, 128, 255])
        });
        encoder.encode_frame(image::Frame::new(img)).unwrap();
    }
    path
}

fn run_workflow(name: &str, frames: usize, expected_frames: usize) {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let video = write_input_video(dir.path(), 6);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("workflows")
            .join(name),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, &video, frames);
    let out = dir.path().join("out");
    let set = plugins();
    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap_or_else(|e| panic!("{name}: {e}"));
    let saved = summary
        .ui
        .values()
        .find_map(|ui| ui["videos"][0]["fullpath"].as_str().map(PathBuf::from))
        .expect("a saved video");
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&saved).unwrap(),
    ))
    .unwrap();
    let decoded = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(decoded.len(), expected_frames, "{name}: frames");
    // The tiny VAE upsamples by 2: latents 12×16 give 24×32 frames.
    assert_eq!(
        decoded[0].buffer().dimensions(),
        (24, 32),
        "{name}: frame size"
    );
}

#[test]
fn vmc_workflow_customises_inverts_and_samples_on_tiny_models() {
    run_workflow("vmc.json", 6, 6);
}

#[test]
fn txt2vid_workflow_runs_on_tiny_models() {
    run_workflow("txt2vid.json", 8, 8);
}

#[test]
fn entropy_edit_workflow_runs_on_tiny_models() {
    run_workflow("entropy-edit.json", 0, 6);
}

#[test]
fn vid2vid_workflow_runs_on_tiny_models() {
    // The input GIF has 6 frames; frame_load_cap 16 keeps them all.
    run_workflow("vid2vid.json", 0, 6);
}

#[test]
fn long_video_workflow_runs_through_context_windows() {
    // 48 frames exceed the tiny motion module's 32 positions: only windows make this possible.
    run_workflow("long-video.json", 48, 48);
}

#[test]
fn noise_preview_workflow_runs() {
    let dir = tempfile::tempdir().unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/noise-preview.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    wf.set_literal("1", "frames", json!(4)).unwrap();
    let set = plugins();
    Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap();
}

#[test]
fn motion_estimate_workflow_writes_motion_and_a_flow_preview() {
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("moving.gif");
    common::write_moving_texture_gif(&video, 4, (64, 48), (2, 1));
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/motion-estimate.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, &video, 0);
    let out = dir.path().join("out");
    let set = plugins();
    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap_or_else(|e| panic!("motion-estimate: {e}"));

    let motion_path = summary.ui["3"]["motion"][0]["fullpath"]
        .as_str()
        .map(PathBuf::from)
        .expect("a saved motion file");
    assert_eq!(
        motion_path.extension().and_then(|e| e.to_str()),
        Some("safetensors")
    );
    let field = vdm_nodes::video::motion::load_motion(&motion_path).unwrap();
    assert_eq!(field.flow.dims(), &[3, 2, 48, 64]);
    assert_eq!(field.magnitude.dims(), &[3, 48, 64]);
    // The texture moves (2, 1) px per frame: check the median flow away from the borders.
    for (channel, truth) in [(0, 2.0f32), (1, 1.0)] {
        let interior = field
            .flow
            .narrow(1, channel, 1)
            .and_then(|t| t.narrow(2, 10, 28))
            .and_then(|t| t.narrow(3, 10, 44))
            .and_then(|t| t.flatten_all())
            .unwrap();
        let mut values = interior.to_vec1::<f32>().unwrap();
        values.sort_by(f32::total_cmp);
        let median = values[values.len() / 2];
        println!("motion-estimate: median flow channel {channel} = {median:.3} (true {truth})");
        assert!((median - truth).abs() < 0.25, "channel {channel}: {median}");
    }
    let expected_amplitude = 5f32.sqrt() / (0.05 * 48.0);
    assert!(
        (field.amplitude - expected_amplitude).abs() < 0.2 * expected_amplitude,
        "amplitude {} (about {expected_amplitude} expected)",
        field.amplitude
    );

    let preview = summary.ui["4"]["videos"][0]["fullpath"]
        .as_str()
        .map(PathBuf::from)
        .expect("a saved flow preview");
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&preview).unwrap(),
    ))
    .unwrap();
    let decoded = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(decoded.len(), 3, "one preview frame per frame pair");
    assert_eq!(decoded[0].buffer().dimensions(), (64, 48));
}

/// Runs the adapted `workflows/motion-adaptive.json` with `frames` frames to generate and the
/// 6-frame input GIF as the reference clip; checks that both branches saved their videos.
fn run_motion_adaptive(frames: usize) -> Result<(), Box<RunError>> {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let video = write_input_video(dir.path(), 6);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/motion-adaptive.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, &video, frames);
    let set = plugins();
    let out = dir.path().join("out");
    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .map_err(Box::new)?;
    for (node, prefix) in [("9", "from-reference"), ("16", "override")] {
        let saved = summary.ui[node]["videos"][0]["fullpath"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_else(|| panic!("node {node} saved no video"));
        assert!(saved.to_string_lossy().contains(prefix), "{saved:?}");
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&saved).unwrap(),
        ))
        .unwrap();
        assert_eq!(
            decoder.into_frames().collect_frames().unwrap().len(),
            frames
        );
    }
    Ok(())
}

#[test]
fn motion_adaptive_workflow_runs_from_a_reference_clip_and_an_override() {
    // The reference GIF is 6 frames of 24×32 pixels, the shape of the 12×16 latents decoded.
    run_motion_adaptive(6).unwrap();
}

#[test]
fn a_reference_motion_of_other_frames_is_an_error_naming_the_injector_input() {
    match run_motion_adaptive(4).map_err(|e| *e) {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), "7", "{e}");
            assert!(
                e.message
                    .contains("TemporalAttentionInjector input `motion`")
                    && e.message.contains("6 frames"),
                "{e}"
            );
        }
        other => panic!("expected an error of the sampler, got {other:?}"),
    }
}

#[test]
fn a_motion_override_outside_its_range_fails_validation() {
    let set = plugins();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/motion-adaptive.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    wf.set_literal("13", "motion_override", json!(1.5)).unwrap();
    let report = vdm::validate(&wf, &set);
    let issue = &report.issues("13")[0];
    assert_eq!(issue.input_name(), Some("motion_override"), "{issue:?}");
}

/// Runs a shipped workflow adapted to the tiny models with `frames` frames, in `dir`, returning
/// what its output nodes reported.
fn run_adapted(dir: &Path, name: &str, frames: usize) -> vdm::RunSummary {
    let models = common::write_tiny_models(&dir.join("models"));
    let video = write_input_video(dir, 6);
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("workflows")
            .join(name),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, &video, frames);
    let set = plugins();
    let out = dir.join("out");
    Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap_or_else(|e| panic!("{name}: {e}"))
}

#[test]
fn entropy_probe_workflow_writes_a_table_a_heatmap_and_a_ranking() {
    let dir = tempfile::tempdir().unwrap();
    let summary = run_adapted(dir.path(), "entropy-probe.json", 4);
    let report = &summary.ui["11"];
    let csv = std::fs::read_to_string(report["tables"][0]["fullpath"].as_str().unwrap()).unwrap();
    let mut lines = csv.lines();
    assert_eq!(
        lines.next(),
        Some("step,timestep,layer,kind,entropy,entropy_normalized,energy")
    );
    let rows: Vec<Vec<&str>> = lines.map(|l| l.split(',').collect()).collect();
    let ranking = report["ranking"].as_array().unwrap();
    // Two steps of every attention layer of the tiny UNet + motion module.
    assert_eq!(rows.len(), 2 * ranking.len());
    assert!(rows.iter().all(|r| r.len() == 7));
    for kind in ["spatial", "cross", "temporal"] {
        assert!(
            rows.iter().any(|r| r[3] == kind),
            "no {kind} layer in the table"
        );
    }
    let heatmap = image::open(report["images"][0]["fullpath"].as_str().unwrap()).unwrap();
    assert!(heatmap.height() > 10 * ranking.len() as u32);
}

#[test]
fn enhance_workflow_runs_both_methods() {
    let dir = tempfile::tempdir().unwrap();
    let summary = run_adapted(dir.path(), "enhance.json", 4);
    for node in ["9", "23"] {
        assert!(
            summary.ui[node]["videos"][0]["fullpath"].is_string(),
            "node {node}"
        );
    }
}

fn expect_node_error(
    wf: serde_json::Value,
    models: &common::TinyModels,
    node: &str,
    input: &str,
    needle: &str,
) {
    let dir = tempfile::tempdir().unwrap();
    let set = plugins();
    let result = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(wf).unwrap());
    match result {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), node, "{e}");
            assert_eq!(
                e.input
                    .clone()
                    .into_option()
                    .map(|s| s.into_string())
                    .as_deref(),
                Some(input),
                "{e}"
            );
            assert!(e.message.contains(needle), "{e}");
        }
        other => panic!("expected an error of node {node}, got {other:?}"),
    }
}

fn decode_chain(loader: serde_json::Value) -> serde_json::Value {
    json!({
        "1": loader,
        "2": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 2]}},
        "4": {"class_type": "SaveVideoFile", "inputs": {"images": ["3", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    })
}

#[test]
fn missing_and_corrupt_models_are_errors_of_the_loader_node() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(
        &corrupt,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\": garbage}",
    )
    .unwrap();
    expect_node_error(
        decode_chain(
            json!({"class_type": "CheckpointLoader", "inputs": {"ckpt_name": corrupt.to_string_lossy()}}),
        ),
        &models,
        "1",
        "ckpt_name",
        "corrupt.safetensors",
    );
}

#[test]
fn every_missing_model_and_input_file_is_reported_before_anything_runs() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/entropy-edit.json"),
    )
    .unwrap();
    let wf = Workflow::parse(&text).unwrap();
    let set = plugins();
    let recorder = vdm::events::Recorder::default();
    let result = Executor::new(&set, &recorder)
        .with_setting("output_dir", dir.path().join("out").to_string_lossy())
        .with_setting("models_dir", models.to_string_lossy())
        .with_setting("input_dir", dir.path().to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf);
    let Err(RunError::Invalid(report)) = result else {
        panic!("expected a validation error, got {result:?}");
    };
    for (node, input, file) in [
        ("1", "ckpt_name", "v1-5-pruned-emaonly.safetensors"),
        ("2", "model_name", "mm_sd_v15_v2.ckpt"),
        ("10", "video", "sample-clip.gif"),
    ] {
        let issues = report.issues(node);
        assert_eq!(issues.len(), 1, "node {node}: {}", report.to_text());
        assert_eq!(issues[0].kind, "custom_validation_failed");
        assert_eq!(issues[0].input_name(), Some(input));
        assert!(issues[0].details.contains(file), "{}", issues[0].details);
    }
    assert!(
        report.issues("1")[0].details.contains("checkpoints"),
        "says where it looked: {}",
        report.to_text()
    );
    assert_eq!(report.node_errors.len(), 3, "{}", report.to_text());
    assert!(recorder.0.lock().unwrap().is_empty(), "nothing ran");
}

#[test]
fn a_motion_module_of_other_channels_is_refused_naming_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    // A motion module for wider channels: rewrite the config of a copy and scale nothing else;
    // the channel check refuses it before any weight is read.
    let other = models.root.join("animatediff_models/wide-motion");
    std::fs::create_dir_all(&other).unwrap();
    let mut config: serde_json::Value = serde_json::from_str(
        &std::fs::read_to_string(models.motion_module.join("config.json")).unwrap(),
    )
    .unwrap();
    config["block_out_channels"] = json!([64, 128]);
    std::fs::write(other.join("config.json"), config.to_string()).unwrap();
    std::fs::copy(
        models
            .motion_module
            .join("diffusion_pytorch_model.safetensors"),
        other.join("diffusion_pytorch_model.safetensors"),
    )
    .unwrap();
    let wf = json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "MotionModuleLoader", "inputs": {"model_name": "wide-motion"}},
        "3": {"class_type": "ApplyMotionModule", "inputs": {"model": ["1", 0], "motion_module": ["2", 0], "motion_scale": 1.0}},
        "4": {"class_type": "TextEncode", "inputs": {"clip": ["1", 1], "text": "the"}},
        "5": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2}},
        "6": {"class_type": "VideoSampler", "inputs": {"model": ["3", 0], "positive": ["4", 0], "negative": ["4", 0], "latent_image": ["5", 0],
              "seed": 1, "steps": 1, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}},
        "7": {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": "x"}}
    });
    expect_node_error(
        wf,
        &models,
        "3",
        "motion_module",
        "is for UNet channels [64, 128]",
    );
}

#[test]
fn a_model_of_the_wrong_kind_in_a_socket_fails_validation() {
    let set = plugins();
    let wf = Workflow::from_json(json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2}},
        "3": {"class_type": "VAEDecode", "inputs": {"samples": ["2", 0], "vae": ["1", 1]}},
        "4": {"class_type": "SaveVideoFile", "inputs": {"images": ["3", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    }))
    .unwrap();
    let report = vdm::validate(&wf, &set);
    let issue = &report.issues("3")[0];
    assert_eq!(issue.kind, "return_type_mismatch");
    assert_eq!(issue.input_name(), Some("vae"));
    assert!(issue.details.contains("CLIP"), "{}", issue.details);
}

/// `workflows/fast-reuse.json` on the tiny models (8 frames, 2 steps), with `selector`'s inputs
/// replacing Step Selector's; with `motion`, a clip at that path is estimated and fed to Step
/// Selector's `motion`.
fn tiny_fast_reuse(selector: serde_json::Value, motion: Option<&Path>, dir: &Path) -> Workflow {
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/fast-reuse.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, &write_input_video(dir, 2), 8);
    for (input, value) in selector.as_object().expect("selector inputs") {
        wf.set_literal("10", input, value.clone()).unwrap();
    }
    if let Some(video) = motion {
        let source = Workflow::from_json(json!({
            "11": {"class_type": "LoadVideoFile", "inputs": {"video": video.to_string_lossy()}},
            "12": {"class_type": "MotionEstimator", "inputs": {"images": ["11", 0]}}
        }))
        .unwrap();
        wf.nodes.extend(source.nodes);
        let selector = wf.nodes.get_mut("10").unwrap();
        selector.inputs.insert(
            "motion".into(),
            vdm::Input::Link {
                node: "12".into(),
                output: 0,
            },
        );
    }
    wf
}

fn run_with_events(
    wf: &Workflow,
    models: &common::TinyModels,
    out: &Path,
) -> (Result<vdm::RunSummary, RunError>, Vec<vdm::Event>) {
    let set = plugins();
    let events = vdm::events::Recorder::default();
    let result = Executor::new(&set, &events)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(wf);
    let events = events.0.into_inner().unwrap();
    (result, events)
}

#[test]
fn fast_reuse_workflow_evaluates_key_frames_alone_in_the_early_steps() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");
    let sampler_ui = |selector: serde_json::Value, motion: Option<&Path>| {
        let wf = tiny_fast_reuse(selector.clone(), motion, dir.path());
        let (result, events) = run_with_events(&wf, &models, &out);
        let summary = result.unwrap_or_else(|e| panic!("fast-reuse {selector}: {e}"));
        let saved = summary.ui["9"]["videos"][0]["fullpath"]
            .as_str()
            .map(PathBuf::from)
            .expect("a saved video");
        let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
            std::fs::File::open(&saved).unwrap(),
        ))
        .unwrap();
        assert_eq!(decoder.into_frames().collect_frames().unwrap().len(), 8);
        let last_text = events.iter().rev().find_map(|e| match e {
            vdm::Event::Progress { node, text, .. } if node == "7" => Some(text.clone()),
            _ => None,
        });
        (summary.ui["7"].clone(), last_text)
    };

    // 8 frames, key frames 0 and 4, the first of 2 steps reused, 2 guidance branches:
    // 2·(1·2 + 1·8) = 20 frame evaluations against 2·2·8 = 32.
    let (ui, text) = sampler_ui(json!({}), None);
    assert_eq!(ui["frame_evaluations"], json!([20]), "{ui}");
    assert_eq!(ui["frame_evaluations_without_reuse"], json!([32]), "{ui}");
    assert!(ui.get("nmi").is_none(), "{ui}");
    assert_eq!(
        text.as_deref(),
        Some("sampling (reuse: 20 of 32 frame evaluations)")
    );

    let (ui, _) = sampler_ui(json!({"reuse_until": 0.0}), None);
    assert_eq!(ui["frame_evaluations"], json!([32]), "{ui}");
    assert_eq!(ui["frame_evaluations_without_reuse"], json!([32]), "{ui}");

    // Without Step Selector the counts are reported all the same, and equal.
    let mut plain = tiny_fast_reuse(json!({}), None, dir.path());
    plain.nodes.get_mut("7").unwrap().inputs.remove("reuse");
    plain.nodes.remove("10");
    let (result, _) = run_with_events(&plain, &models, &out);
    let ui = &result.unwrap_or_else(|e| panic!("{e}")).ui["7"];
    assert_eq!(ui["frame_evaluations"], json!([32]), "{ui}");
    assert_eq!(ui["frame_evaluations_without_reuse"], json!([32]), "{ui}");

    let (ui, _) = sampler_ui(json!({"mode": "adaptive", "reuse_until": 1.0}), None);
    let curve: Vec<f64> = serde_json::from_value(ui["nmi"].clone()).expect("an NMI curve");
    println!("tiny model, adaptive reuse: NMI per step {curve:?}; {ui}");
    assert_eq!(curve.len(), 2);
    assert!(curve.iter().all(|v| (0.0..=1.0).contains(v)), "{curve:?}");

    // Flow propagation along the motion of a clip at 8× the latents' size (96×128).
    let clip = dir.path().join("moving.gif");
    common::write_moving_texture_gif(&clip, 8, (96, 128), (2, 1));
    let (ui, _) = sampler_ui(json!({"propagation": "flow"}), Some(&clip));
    assert_eq!(ui["frame_evaluations"], json!([20]), "{ui}");
}

#[test]
fn fast_reuse_combines_with_context_windows_and_freeinit() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let mut wf = tiny_fast_reuse(json!({"reuse_until": 0.5}), None, dir.path());
    // Windows of 16 over 24 frames (0..16 and 8..24); the key frames 0, 4, …, 20 are windowed
    // over the 21 positions they span.
    wf.set_literal("6", "frames", json!(24)).unwrap();
    let options = Workflow::from_json(json!({
        "13": {"class_type": "ContextOptions", "inputs": {"context_length": 16, "context_overlap": 4,
               "schedule": "static", "fuse_method": "pyramid"}},
        "14": {"class_type": "FreeInitOptions", "inputs": {"iterations": 2, "filter": "butterworth",
               "spatial_stop_frequency": 0.25, "temporal_stop_frequency": 0.25, "order": 4, "fast_sampling": false}}
    }))
    .unwrap();
    wf.nodes.extend(options.nodes);
    let sampler = wf.nodes.get_mut("7").unwrap();
    for (input, node) in [("context_options", "13"), ("freeinit", "14")] {
        sampler.inputs.insert(
            input.into(),
            vdm::Input::Link {
                node: node.into(),
                output: 0,
            },
        );
    }
    let (result, _) = run_with_events(&wf, &models, &dir.path().join("out"));
    let summary = result.unwrap_or_else(|e| panic!("{e}"));
    let ui = &summary.ui["7"];
    // Without reuse: 2 FreeInit passes × 2 steps × 2 guidance branches × 2 windows of 16.
    let plain = ui["frame_evaluations_without_reuse"][0].as_u64().unwrap();
    let reused = ui["frame_evaluations"][0].as_u64().unwrap();
    assert_eq!(plain, 2 * 2 * 2 * (2 * 16), "{ui}");
    assert!(reused < plain, "{ui}");
}

/// Runs `wf` and checks that it fails in node `node` on `input` with a message holding `needle`.
fn expect_workflow_error(
    wf: &Workflow,
    models: &common::TinyModels,
    out: &Path,
    (node, input, needle): (&str, &str, &str),
) {
    match run_with_events(wf, models, out).0 {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), node, "{e}");
            let named = e.input.clone().into_option().map(|s| s.into_string());
            assert_eq!(named.as_deref(), Some(input), "{e}");
            assert!(e.message.contains(needle), "{e}");
        }
        other => panic!("expected an error of node {node}, got {other:?}"),
    }
}

#[test]
fn bad_reuse_inputs_name_the_node_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");
    let check = |wf: Workflow, expected| expect_workflow_error(&wf, &models, &out, expected);

    check(
        tiny_fast_reuse(json!({"key_stride": 16}), None, dir.path()),
        (
            "7",
            "reuse",
            "StepSelector: the key stride 16 is larger than the clip's 8 frames",
        ),
    );
    check(
        tiny_fast_reuse(json!({"propagation": "flow"}), None, dir.path()),
        (
            "10",
            "motion",
            "propagation `flow` warps along the clip's motion",
        ),
    );
    let short = dir.path().join("short.gif");
    common::write_moving_texture_gif(&short, 3, (96, 128), (1, 0));
    check(
        tiny_fast_reuse(json!({"propagation": "flow"}), Some(&short), dir.path()),
        (
            "7",
            "reuse",
            "StepSelector's motion: the motion is of 3 frames, the latents have 8",
        ),
    );
    let small = dir.path().join("small.gif");
    common::write_moving_texture_gif(&small, 8, (64, 48), (1, 0));
    check(
        tiny_fast_reuse(json!({"propagation": "flow"}), Some(&small), dir.path()),
        (
            "7",
            "reuse",
            "the motion is 64×48 pixels, latents of 12×16 need 96×128",
        ),
    );
}

/// A shipped workflow with `edit` applied to its JSON, pointed at the tiny models and `video`.
fn edited_workflow(
    name: &str,
    video: &Path,
    edit: impl FnOnce(&mut serde_json::Value),
) -> Workflow {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("workflows")
        .join(name);
    let mut json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    edit(&mut json);
    let mut wf = Workflow::from_json(json).unwrap();
    adapt(&mut wf, video, 2);
    wf
}

#[test]
fn bad_entropy_inputs_name_the_node_and_input() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let out = dir.path().join("out");
    let check = |wf: Workflow, expected| expect_workflow_error(&wf, &models, &out, expected);
    let video = write_input_video(dir.path(), 2);
    let perturb = |layers: &str| {
        edited_workflow("entropy-probe.json", &video, |wf| {
            wf["10"] = json!({"class_type": "AttentionPerturb", "inputs": {
                "model": ["3", 0], "mode": "uniform", "layers": layers, "kind": "temporal",
                "start_percent": 0.0, "end_percent": 1.0, "strength": 1.0}});
            wf.as_object_mut().unwrap().remove("11");
        })
    };
    check(perturb(" , "), ("10", "layers", "no layers given"));
    check(
        perturb("down_blocks.0,middle_block"),
        (
            "10",
            "layers",
            "`middle_block` selects no temporal layer of this model",
        ),
    );

    for method in ["ie-adapt", "enhance-a-video"] {
        let wf = edited_workflow("enhance.json", &video, |wf| {
            wf["10"]["inputs"]["method"] = json!(method);
            wf["10"]["inputs"]["start_percent"] = json!(0.5);
            wf["10"]["inputs"]["end_percent"] = json!(0.5);
        });
        check(
            wf,
            (
                "10",
                "start_percent",
                "start_percent 0.5 must be below end_percent 0.5",
            ),
        );
    }

    // 22×30 pixels encode to 11×15 latents, which the tiny UNet cannot halve.
    let odd = dir.path().join("odd.gif");
    common::write_moving_texture_gif(&odd, 2, (22, 30), (1, 0));
    check(
        edited_workflow("entropy-edit.json", &odd, |_| {}),
        (
            "7",
            "source_latent",
            "latents of 11×15 do not fit the model",
        ),
    );
}

#[test]
fn the_sampler_and_the_vae_refuse_runs_over_a_lowered_memory_budget() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/txt2vid.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    adapt(&mut wf, Path::new("unused.gif"), 2);
    let set = plugins();
    let run = |wf: &Workflow, budget: &str| {
        Executor::new(&set, &vdm::events::Silent)
            .with_setting("output_dir", dir.path().join("out").to_string_lossy())
            .with_setting("models_dir", models.root.to_string_lossy())
            .with_setting("device", "cpu")
            .with_setting("max_memory", budget)
            .run(wf)
    };
    match run(&wf, "65536") {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), "7", "{e}");
            let named = e.input.clone().into_option().map(|s| s.into_string());
            assert_eq!(named.as_deref(), Some("latent_image"), "{e}");
            assert!(e.message.contains("over the memory budget"), "{e}");
        }
        other => panic!("expected the sampler to refuse, got {other:?}"),
    }
    assert!(run(&wf, "1073741824").is_ok());

    let mut decode =
        decode_chain(json!({"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}}));
    decode["2"]["inputs"]["width"] = json!(512);
    decode["2"]["inputs"]["height"] = json!(512);
    let decode = Workflow::from_json(decode).unwrap();
    match run(&decode, "8388608") {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), "3", "{e}");
            let named = e.input.clone().into_option().map(|s| s.into_string());
            assert_eq!(named.as_deref(), Some("samples"), "{e}");
            assert!(
                e.message
                    .contains("decoding 2 frames of 128×128 pixels needs about"),
                "{e}"
            );
        }
        other => panic!("expected the VAE to refuse, got {other:?}"),
    }
}

#[test]
fn the_vae_reports_each_chunk_and_stops_when_cancelled() {
    // Sets the cancel flag at VAEDecode's first chunk, as Ctrl-C would during a long decode.
    struct CancelInDecode(
        vdm::events::Recorder,
        std::sync::Arc<std::sync::atomic::AtomicBool>,
    );
    impl vdm::EventSink for CancelInDecode {
        fn emit(&self, event: vdm::Event) {
            if matches!(&event, vdm::Event::Progress { node, .. } if node == "3") {
                self.1.store(true, std::sync::atomic::Ordering::SeqCst);
            }
            self.0.emit(event);
        }
    }
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let mut wf =
        decode_chain(json!({"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}}));
    wf["2"]["inputs"]["frames"] = json!(6);
    wf["3"]["inputs"]["chunk_frames"] = json!(2);
    let wf = Workflow::from_json(wf).unwrap();
    let set = plugins();
    let run = |sink: &dyn vdm::EventSink, flag| {
        Executor::new(&set, sink)
            .with_cancel_flag(flag)
            .with_setting("output_dir", dir.path().join("out").to_string_lossy())
            .with_setting("models_dir", models.root.to_string_lossy())
            .with_setting("device", "cpu")
            .run(&wf)
    };
    let recorder = vdm::events::Recorder::default();
    run(&recorder, Default::default()).unwrap();
    let chunks: Vec<(u64, u64)> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            vdm::Event::Progress {
                node, value, max, ..
            } if node == "3" => Some((*value, *max)),
            _ => None,
        })
        .collect();
    assert_eq!(chunks, [(2, 6), (4, 6), (6, 6)]);

    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = CancelInDecode(Default::default(), flag.clone());
    match run(&sink, flag) {
        Err(RunError::Interrupted { node, .. }) => assert_eq!(node, "3"),
        other => panic!("expected an interruption in VAEDecode, got {other:?}"),
    }
    let decoded = sink
        .0
         .0
        .lock()
        .unwrap()
        .iter()
        .filter(|e| matches!(e, vdm::Event::Progress { node, .. } if node == "3"))
        .count();
    assert_eq!(
        decoded, 1,
        "the decode stops after the chunk that saw the flag"
    );
}
