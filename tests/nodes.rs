//! The real plugin through the ABI: descriptors, validation of workflows that use its nodes,
//! and the noise workflow end to end.

mod common;

use std::path::Path;

use candle_core::{DType, Device, Tensor, D};
use serde_json::json;
use vdm::{validate, Executor, PluginSet, RunError, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

fn noise_node(extra: serde_json::Value) -> serde_json::Value {
    let mut inputs = json!({"seed": 1, "frames": 4, "width": 64, "height": 64, "channels": 4, "mode": "mixed", "correlation": 0.5});
    for (k, v) in extra.as_object().unwrap() {
        inputs[k] = v.clone();
    }
    json!({"class_type": "VideoNoise", "inputs": inputs})
}

#[test]
fn descriptors_round_trip_through_the_abi() {
    let set = plugins();
    let names: Vec<&str> = set.descriptors().map(|d| d.class_type.as_str()).collect();
    for expected in [
        "VideoNoise",
        "LoadVideoFile",
        "SaveVideoFile",
        "LatentPreview",
        "SaveLatent",
        "LoadLatent",
        "MotionEstimator",
        "SaveMotion",
        "LoadMotion",
    ] {
        assert!(
            names.contains(&expected),
            "{expected} missing from {names:?}"
        );
    }
    // What crossed the boundary equals what the plugin built.
    for node in vdm_nodes::node::registry() {
        let local = node.descriptor();
        let (_, remote) = set.node(local.class_type.as_str()).unwrap();
        assert_eq!(&local, remote);
    }
    let info = vdm::object_info::object_info(set.descriptors(), "vdm_nodes");
    let noise = &info["VideoNoise"];
    assert_eq!(noise["input"]["required"]["seed"][0], "INT");
    assert_eq!(
        noise["input"]["required"]["mode"][0],
        json!(["mixed", "progressive", "independent"])
    );
    assert_eq!(noise["input"]["required"]["correlation"][1]["max"], 1.0);
    assert_eq!(noise["output"], json!(["LATENT"]));
    assert_eq!(info["SaveVideoFile"]["output_node"], true);
    assert_eq!(
        info["SaveVideoFile"]["input"]["required"]["images"],
        json!(["IMAGE", {"tooltip": "Frames to save."}])
    );
}

/// The (kind, input) of every issue of node `id`.
fn issues(report: &vdm::ValidationReport, id: &str) -> Vec<(String, Option<String>)> {
    report
        .issues(id)
        .iter()
        .map(|i| (i.kind.clone(), i.input_name().map(str::to_owned)))
        .collect()
}

#[test]
fn every_validation_error_is_reported_at_once_with_node_and_input() {
    let set = plugins();
    let wf = Workflow::from_json(json!({
        "1": noise_node(json!({"correlation": 1.5, "frames": "many", "mode": "wavy", "colour": 3})),
        "2": {"class_type": "NoSuchNode", "inputs": {}},
        "3": {"class_type": "LatentPreview", "inputs": {"latent": ["9", 0]}},
        "4": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 5]}},
        "5": {"class_type": "SaveVideoFile", "inputs": {"images": ["1", 0], "filename_prefix": "x", "format": "gif"}},
        "6": {"class_type": "SaveVideoFile", "inputs": {"images": "not a link", "filename_prefix": "x", "format": "gif", "fps": -1}},
        "7": noise_node(json!({"seed": -5, "width": 64.5}))
    }))
    .unwrap();
    let report = validate(&wf, &set);
    assert!(!report.is_ok());
    let s = |k: &str, i: &str| (k.to_owned(), Some(i.to_owned()));
    let node1 = issues(&report, "1");
    for expected in [
        s("value_bigger_than_max", "correlation"),
        s("invalid_input_type", "frames"),
        s("value_not_in_list", "mode"),
    ] {
        assert!(node1.contains(&expected), "{expected:?} not in {node1:?}");
    }
    // An input the node does not have is ignored with a warning, as ComfyUI ignores it.
    assert!(!node1
        .iter()
        .any(|(_, input)| input.as_deref() == Some("colour")));
    assert_eq!(report.warnings.len(), 1, "{:?}", report.warnings);
    assert!(report.warnings[0].contains("node 1") && report.warnings[0].contains("`colour`"));
    assert_eq!(
        issues(&report, "2"),
        [("missing_node_type".to_owned(), None)]
    );
    assert_eq!(issues(&report, "3"), [s("bad_linked_input", "latent")]);
    assert_eq!(issues(&report, "4"), [s("bad_linked_input", "latent")]);
    let node5 = issues(&report, "5");
    assert!(
        node5.contains(&s("return_type_mismatch", "images")),
        "{node5:?}"
    );
    assert!(
        node5.contains(&s("required_input_missing", "fps")),
        "{node5:?}"
    );
    let node6 = issues(&report, "6");
    assert!(
        node6.contains(&s("invalid_input_type", "images"))
            && node6.contains(&s("value_smaller_than_min", "fps")),
        "{node6:?}"
    );
    let node7 = issues(&report, "7");
    assert!(
        node7.contains(&s("value_smaller_than_min", "seed"))
            && node7.contains(&s("invalid_input_type", "width")),
        "{node7:?}"
    );
    // The JSON has ComfyUI's shape.
    let json = serde_json::to_value(&report).unwrap();
    assert_eq!(json["error"]["type"], "prompt_outputs_failed_validation");
    assert_eq!(json["node_errors"]["1"]["class_type"], "VideoNoise");
    assert!(json["node_errors"]["5"]["errors"][0]["extra_info"]["input_name"].is_string());
    // Nothing ran: running the same workflow refuses before executing.
    let dir = tempfile::tempdir().unwrap();
    let result = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().to_string_lossy())
        .run(&wf);
    assert!(matches!(result, Err(RunError::Invalid(_))));
    assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 0);
}

#[test]
fn malformed_workflows_are_refused_before_validation() {
    assert!(matches!(
        Workflow::parse("{\"1\": {"),
        Err(vdm::ParseError::Json { line: 1, .. })
    ));
    assert!(matches!(
        Workflow::parse("[1, 2]"),
        Err(vdm::ParseError::Shape(_))
    ));
    assert!(matches!(
        Workflow::parse("{\"1\": {\"inputs\": {}}}"),
        Err(vdm::ParseError::Shape(_))
    ));
}

fn run(set: &PluginSet, wf: serde_json::Value, out: &Path) -> vdm::RunSummary {
    let wf = Workflow::from_json(wf).unwrap();
    Executor::new(set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn noise_preview_workflow_writes_a_gif_of_the_right_size() {
    let set = plugins();
    let text = std::fs::read_to_string(
        Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/noise-preview.json"),
    )
    .unwrap();
    let mut wf = Workflow::parse(&text).unwrap();
    // Smaller than the shipped example so the test stays fast; the graph is the same.
    wf.set_literal("1", "frames", json!(6)).unwrap();
    wf.set_literal("1", "width", json!(96)).unwrap();
    wf.set_literal("1", "height", json!(64)).unwrap();
    let dir = tempfile::tempdir().unwrap();
    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", dir.path().to_string_lossy())
        .with_setting("device", "cpu")
        .run(&wf)
        .unwrap();
    let path = summary.ui["3"]["videos"][0]["fullpath"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(path.ends_with(".gif"), "{path}");
    let decoder = image::codecs::gif::GifDecoder::new(std::io::BufReader::new(
        std::fs::File::open(&path).unwrap(),
    ))
    .unwrap();
    use image::AnimationDecoder;
    let frames = decoder.into_frames().collect_frames().unwrap();
    assert_eq!(frames.len(), 6);
    assert_eq!(frames[0].buffer().dimensions(), (96, 64));
    // Written atomically: no temporary files are left beside it.
    let names: Vec<String> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert_eq!(names.len(), 1, "{names:?}");
}

/// Runs VideoNoise through the plugin and reads the latents back from a SaveLatent file.
fn noise_through_plugin(set: &PluginSet, mode: &str, rho: f64, frames: usize) -> Tensor {
    let dir = tempfile::tempdir().unwrap();
    let wf = json!({
        "1": noise_node(json!({"seed": 7, "frames": frames, "width": 512, "height": 512, "mode": mode, "correlation": rho})),
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "noise"}}
    });
    let summary = run(set, wf, dir.path());
    let path = summary.ui["2"]["latents"][0]["fullpath"]
        .as_str()
        .unwrap()
        .to_owned();
    vdm_nodes::video::latent_file::load_latent(Path::new(&path), &Device::Cpu).unwrap()
}

/// Per-frame (mean, variance) and the frames × frames correlation matrix of (1, C, F, H, W).
fn frame_statistics(noise: &Tensor) -> (Vec<(f64, f64)>, Vec<Vec<f64>>) {
    let (_, _, f, _, _) = noise.dims5().unwrap();
    let frames = noise
        .to_dtype(DType::F64)
        .unwrap()
        .squeeze(0)
        .unwrap()
        .transpose(0, 1)
        .unwrap()
        .flatten_from(1)
        .unwrap();
    let mean = frames.mean_keepdim(D::Minus1).unwrap();
    let centred = frames.broadcast_sub(&mean).unwrap();
    let var = centred
        .sqr()
        .unwrap()
        .mean(D::Minus1)
        .unwrap()
        .to_vec1::<f64>()
        .unwrap();
    let means = mean.squeeze(1).unwrap().to_vec1::<f64>().unwrap();
    let n = centred.dim(1).unwrap() as f64;
    let cov = (centred.matmul(&centred.t().unwrap()).unwrap() / n)
        .unwrap()
        .to_vec2::<f64>()
        .unwrap();
    let corr = (0..f)
        .map(|i| {
            (0..f)
                .map(|j| cov[i][j] / (var[i] * var[j]).sqrt())
                .collect()
        })
        .collect();
    (means.into_iter().zip(var).collect(), corr)
}

#[test]
fn correlated_noise_has_unit_frames_and_the_requested_correlation() {
    let set = plugins();
    // 4 × 64 × 64 = 16384 values per frame: the standard error of a correlation is ~0.008.
    let tol = 0.04;
    for (mode, rho) in [
        ("mixed", 0.2),
        ("mixed", 0.7),
        ("progressive", 0.5),
        ("progressive", 0.9),
        ("independent", 0.5),
    ] {
        let noise = noise_through_plugin(&set, mode, rho, 6);
        let (moments, corr) = frame_statistics(&noise);
        for (f, (mean, var)) in moments.iter().enumerate() {
            assert!(mean.abs() < tol, "{mode} ρ={rho}: frame {f} mean {mean}");
            assert!(
                (var - 1.0).abs() < tol,
                "{mode} ρ={rho}: frame {f} variance {var}"
            );
        }
        for (f, row) in corr.iter().enumerate() {
            for (g, &c) in row.iter().enumerate().filter(|(g, _)| *g != f) {
                let expected = match mode {
                    "mixed" => rho,
                    "progressive" => rho.powi((f as i32 - g as i32).abs()),
                    _ => 0.0,
                };
                assert!(
                    (c - expected).abs() < tol,
                    "{mode} ρ={rho}: corr({f},{g}) = {c:.3}, expected {expected:.3}"
                );
            }
        }
    }
}

#[test]
fn lengthening_a_clip_keeps_its_first_frames() {
    let set = plugins();
    let short = noise_through_plugin(&set, "progressive", 0.6, 4);
    let long = noise_through_plugin(&set, "progressive", 0.6, 9);
    let prefix = long.narrow(2, 0, 4).unwrap();
    assert_eq!(common::max_abs_diff(&short, &prefix), 0.0);
}

/// Runs `wf` and returns the error of node `node`, checking that it names `input`.
fn node_error(
    set: &PluginSet,
    wf: serde_json::Value,
    out: &Path,
    node: &str,
    input: &str,
) -> String {
    let result = Executor::new(set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(wf).unwrap());
    match result {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), node, "{e}");
            let named = e.input.clone().into_option().map(|s| s.into_string());
            assert_eq!(named.as_deref(), Some(input), "{e}");
            e.message.into_string()
        }
        other => panic!("expected an error of node {node}, got {other:?}"),
    }
}

#[test]
fn motion_round_trips_through_save_and_load_motion_bit_exact() {
    let set = plugins();
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("moving.gif");
    common::write_moving_texture_gif(&video, 3, (40, 32), (1, 0));
    let saved = run(
        &set,
        json!({
            "1": {"class_type": "LoadVideoFile", "inputs": {"video": video.to_string_lossy()}},
            "2": {"class_type": "MotionEstimator", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "SaveMotion", "inputs": {"motion": ["2", 0], "filename_prefix": "first"}}
        }),
        dir.path(),
    );
    let first = saved.ui["3"]["motion"][0]["fullpath"]
        .as_str()
        .unwrap()
        .to_owned();
    let reloaded = run(
        &set,
        json!({
            "1": {"class_type": "LoadMotion", "inputs": {"motion": first}},
            "2": {"class_type": "SaveMotion", "inputs": {"motion": ["1", 0], "filename_prefix": "second"}}
        }),
        dir.path(),
    );
    let second = reloaded.ui["2"]["motion"][0]["fullpath"]
        .as_str()
        .unwrap()
        .to_owned();
    let (a, b) = (
        vdm_nodes::video::motion::load_motion(Path::new(&first)).unwrap(),
        vdm_nodes::video::motion::load_motion(Path::new(&second)).unwrap(),
    );
    assert_eq!(a.flow.dims(), &[2, 2, 32, 40]);
    let bits = |t: &Tensor| -> Vec<u32> {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        values.iter().map(|v| v.to_bits()).collect()
    };
    assert_eq!(bits(&a.flow), bits(&b.flow));
    assert_eq!(bits(&a.magnitude), bits(&b.magnitude));
    assert_eq!(a.amplitude.to_bits(), b.amplitude.to_bits());
    assert!(a.amplitude > 0.0);
}

#[test]
fn motion_errors_name_the_node_and_input() {
    let set = plugins();
    let dir = tempfile::tempdir().unwrap();
    let video = dir.path().join("moving.gif");
    common::write_moving_texture_gif(&video, 2, (24, 24), (1, 0));
    let message = node_error(
        &set,
        json!({
            "1": {"class_type": "LoadVideoFile", "inputs": {"video": video.to_string_lossy(), "frame_load_cap": 1}},
            "2": {"class_type": "MotionEstimator", "inputs": {"images": ["1", 0]}},
            "3": {"class_type": "SaveMotion", "inputs": {"motion": ["2", 0], "filename_prefix": "x"}}
        }),
        dir.path(),
        "2",
        "images",
    );
    assert!(message.contains("at least 2 frames, got 1"), "{message}");

    // A latent file is safetensors too, but not motion.
    let latent = run(
        &set,
        json!({
            "1": noise_node(json!({"frames": 2})),
            "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "latent"}}
        }),
        dir.path(),
    );
    let latent_path = latent.ui["2"]["latents"][0]["fullpath"]
        .as_str()
        .unwrap()
        .to_owned();
    let message = node_error(
        &set,
        json!({
            "1": {"class_type": "LoadMotion", "inputs": {"motion": latent_path}},
            "2": {"class_type": "SaveMotion", "inputs": {"motion": ["1", 0], "filename_prefix": "x"}}
        }),
        dir.path(),
        "1",
        "motion",
    );
    assert!(message.contains("no `flow` tensor"), "{message}");
}

#[test]
fn non_finite_latents_are_an_error_of_the_node_that_made_them_unless_allowed() {
    let set = plugins();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("nan.latent");
    let mut values = vec![0.5f32; 4 * 2 * 4 * 4];
    values[3] = f32::NAN;
    values[7] = f32::INFINITY;
    let latent = Tensor::from_vec(values, (2, 4, 4, 4), &Device::Cpu).unwrap();
    let marker = Tensor::zeros(1, DType::F32, &Device::Cpu).unwrap();
    candle_core::safetensors::save(
        &std::collections::HashMap::from([
            ("latent_tensor".to_string(), latent),
            ("latent_format_version_0".to_string(), marker),
        ]),
        &path,
    )
    .unwrap();
    let wf = json!({
        "1": {"class_type": "LoadLatent", "inputs": {"latent": path.to_string_lossy()}},
        "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 0]}},
        "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["2", 0], "filename_prefix": "nan", "format": "gif", "fps": 8}}
    });
    let out = dir.path().join("out");
    let result = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&Workflow::from_json(wf.clone()).unwrap());
    match result {
        Err(RunError::Node(e)) => {
            assert_eq!(e.node_id.as_str(), "1", "{e}");
            assert!(
                e.message.contains("NaN or infinite values: 2 of 128"),
                "{e}"
            );
        }
        other => panic!("expected an error of node 1, got {other:?}"),
    }
    assert!(!out.exists() || std::fs::read_dir(&out).unwrap().next().is_none());

    let summary = Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("device", "cpu")
        .with_setting("allow_non_finite", "true")
        .run(&Workflow::from_json(wf).unwrap())
        .unwrap();
    assert!(summary.ui["3"]["videos"][0]["fullpath"].is_string());
}

#[test]
fn sizes_off_their_step_are_refused_not_rounded() {
    let set = plugins();
    let wf = Workflow::from_json(json!({
        "1": noise_node(json!({"width": 65, "height": 72})),
        "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 0]}},
        "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["2", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    }))
    .unwrap();
    let report = validate(&wf, &set);
    let issues = report.issues("1");
    assert_eq!(issues.len(), 1, "{}", report.to_text());
    assert_eq!(issues[0].kind, "value_not_on_step");
    assert_eq!(issues[0].input_name(), Some("width"));
    assert!(
        issues[0]
            .details
            .contains("65 is not a multiple of 8; the nearest allowed values are 64 and 72"),
        "{}",
        issues[0].details
    );
}

#[test]
fn bad_filename_prefixes_are_reported_at_validation_naming_the_input() {
    let set = plugins();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    std::fs::create_dir_all(&out).unwrap();
    let elsewhere = dir.path().join("elsewhere");
    std::fs::create_dir_all(&elsewhere).unwrap();
    #[cfg(unix)]
    std::os::unix::fs::symlink(&elsewhere, out.join("link")).unwrap();
    let long = "y".repeat(300);
    let mut prefixes = vec![
        ("a\nb", "U+000A"),
        ("../up", "leaves the output folder"),
        (long.as_str(), "at most 200"),
    ];
    if cfg!(unix) {
        prefixes.push(("link/escaped", "symbolic link"));
    }
    for (prefix, needle) in prefixes {
        let wf = Workflow::from_json(json!({
            "1": noise_node(json!({})),
            "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 0]}},
            "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["2", 0], "filename_prefix": prefix, "format": "gif", "fps": 8}}
        }))
        .unwrap();
        let report = Executor::new(&set, &vdm::events::Silent)
            .with_setting("output_dir", out.to_string_lossy())
            .validate(&wf);
        let issues = report.issues("3");
        assert_eq!(issues.len(), 1, "{prefix:?}: {}", report.to_text());
        assert_eq!(issues[0].input_name(), Some("filename_prefix"));
        assert!(
            issues[0].details.contains(needle),
            "{prefix:?}: {}",
            issues[0].details
        );
    }
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
}

/// A GIF whose screen is `side`×`side` pixels but whose `frames` frames are single pixels: a
/// few bytes that decode to a full canvas per frame.
fn canvas_bomb_gif(side: u16, frames: usize) -> Vec<u8> {
    let mut gif = b"GIF89a".to_vec();
    gif.extend_from_slice(&side.to_le_bytes());
    gif.extend_from_slice(&side.to_le_bytes());
    gif.extend_from_slice(&[0, 0, 0]); // no global colour table
    for _ in 0..frames {
        gif.push(0x2c); // image descriptor: at (0, 0), 1×1, a local table of 2 colours
        gif.extend_from_slice(&[0, 0, 0, 0, 1, 0, 1, 0, 0x80]);
        gif.extend_from_slice(&[255, 0, 0, 0, 0, 255]);
        // LZW, minimum code size 2: clear (4), index 0, end (5) in 3-bit codes.
        gif.extend_from_slice(&[2, 2, 0x44, 0x01, 0]);
    }
    gif.push(0x3b);
    gif
}

#[test]
fn nodes_refuse_what_would_exceed_the_memory_budget() {
    let set = plugins();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("out");
    let run = |wf: serde_json::Value, budget: Option<&str>| {
        let mut executor = Executor::new(&set, &vdm::events::Silent)
            .with_setting("output_dir", out.to_string_lossy())
            .with_setting("device", "cpu");
        if let Some(bytes) = budget {
            executor = executor.with_setting("max_memory", bytes);
        }
        executor.run(&Workflow::from_json(wf).unwrap())
    };
    let expect_refusal =
        |result: Result<vdm::RunSummary, RunError>, input: &str, needle: &str| match result {
            Err(RunError::Node(e)) => {
                assert_eq!(e.node_id.as_str(), "1", "{e}");
                let named = e.input.clone().into_option().map(|s| s.into_string());
                assert_eq!(named.as_deref(), Some(input), "{e}");
                assert!(e.message.contains(needle), "{e}");
            }
            other => panic!("expected node 1 to refuse, got {other:?}"),
        };
    let preview = |first: serde_json::Value| {
        json!({
            "1": first,
            "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 0]}},
            "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["2", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
        })
    };
    // Inside the declared limits, far beyond any machine: refused under the default budget.
    let huge = noise_node(json!({"frames": 4096, "width": 8192, "height": 8192}));
    expect_refusal(
        run(preview(huge), None),
        "frames",
        "noise of 1 × 4 × 4096 × 1024 × 1024 needs about 192.0 GiB, over the memory budget",
    );
    // Under a lowered budget, a modest size.
    let modest = noise_node(json!({"frames": 4, "width": 1024, "height": 1024}));
    expect_refusal(
        run(preview(modest.clone()), Some("2097152")),
        "frames",
        "needs about 3.0 MiB, over the memory budget of 2.0 MiB (--max-memory 2.0 MiB)",
    );
    let mut fits = preview(modest);
    fits["3"]["inputs"]["format"] = json!("png");
    assert!(run(fits, Some("1073741824")).is_ok());

    // A 4 KB GIF of 200 one-pixel frames on a 4000×4000 screen decodes to 183 MiB per frame.
    let bomb = dir.path().join("bomb.gif");
    std::fs::write(&bomb, canvas_bomb_gif(4000, 200)).unwrap();
    assert!(std::fs::metadata(&bomb).unwrap().len() < 5000);
    let load = json!({
        "1": {"class_type": "LoadVideoFile", "inputs": {"video": bomb.to_string_lossy()}},
        "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["1", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    });
    expect_refusal(
        run(load, Some("268435456")),
        "video",
        "2 frames of 4000×4000 would take 366 MiB, over the 256 MiB allowed",
    );
}
