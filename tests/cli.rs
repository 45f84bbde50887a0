//! The `vdm` command: exit statuses, JSON events, validation reports and node listings.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::{json, Value};

fn plugin_dir() -> PathBuf {
    common::plugin_library("vdm-nodes")
        .parent()
        .unwrap()
        .to_path_buf()
}

fn vdm(args: &[&str], cwd: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_vdm"))
        .args(["--plugins", plugin_dir().to_str().unwrap()])
        .args(args)
        .current_dir(cwd)
        .env_remove("VDM_PLUGIN_PATH")
        .output()
        .expect("vdm runs")
}

fn write(dir: &Path, name: &str, workflow: &Value) -> String {
    let path = dir.join(name);
    std::fs::write(&path, serde_json::to_string_pretty(workflow).unwrap()).unwrap();
    path.to_string_lossy().into_owned()
}

fn small_noise_workflow() -> Value {
    json!({
        "1": {"class_type": "VideoNoise", "inputs": {"seed": 3, "frames": 3, "width": 32, "height": 24, "channels": 4, "mode": "mixed", "correlation": 0.2}},
        "2": {"class_type": "LatentPreview", "inputs": {"latent": ["1", 0]}},
        "3": {"class_type": "SaveVideoFile", "inputs": {"images": ["2", 0], "filename_prefix": "clip", "format": "png", "fps": 4}}
    })
}

#[test]
fn run_writes_outputs_and_prints_json_events() {
    let dir = tempfile::tempdir().unwrap();
    let wf = write(dir.path(), "wf.json", &small_noise_workflow());
    let out = dir.path().join("out");
    let output = vdm(
        &[
            "run",
            &wf,
            "--out",
            out.to_str().unwrap(),
            "--device",
            "cpu",
            "--json-events",
            "--set",
            "1.frames=5",
        ],
        dir.path(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let events: Vec<Value> = String::from_utf8(output.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let types: Vec<&str> = events.iter().map(|e| e["type"].as_str().unwrap()).collect();
    assert_eq!(types.first(), Some(&"execution_start"));
    assert_eq!(types.last(), Some(&"execution_success"));
    assert_eq!(types.iter().filter(|t| **t == "executing").count(), 3);
    let executed = events
        .iter()
        .find(|e| e["type"] == "executed" && e["data"]["node"] == "3")
        .unwrap();
    let file = executed["data"]["output"]["videos"][0]["filename"]
        .as_str()
        .unwrap();
    assert!(out.join(file).exists(), "{file}");
}

#[test]
fn invalid_workflows_exit_with_status_2_and_name_the_node() {
    let dir = tempfile::tempdir().unwrap();
    let mut wf = small_noise_workflow();
    wf["1"]["inputs"]["correlation"] = json!(3.0);
    let path = write(dir.path(), "bad.json", &wf);
    let output = vdm(&["validate", &path, "--json"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(
        report["node_errors"]["1"]["errors"][0]["type"],
        "value_bigger_than_max"
    );
    assert_eq!(
        report["node_errors"]["1"]["errors"][0]["extra_info"]["input_name"],
        "correlation"
    );

    let output = vdm(&["run", &path, "--quiet"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr)
        .contains("node 1 (VideoNoise), input `correlation`"));

    std::fs::write(
        dir.path().join("broken.json"),
        "{\n \"1\": {\"class_type\": \"VideoNoise\",,}\n}",
    )
    .unwrap();
    let output = vdm(&["run", "broken.json"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(
        String::from_utf8_lossy(&output.stderr).contains("line 2, column"),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn a_failure_while_running_exits_with_status_1() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("broken.gif"), b"GIF89a, but no more").unwrap();
    let wf = json!({
        "1": {"class_type": "LoadVideoFile", "inputs": {"video": "broken.gif"}},
        "2": {"class_type": "SaveVideoFile", "inputs": {"images": ["1", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    });
    let path = write(dir.path(), "wf.json", &wf);
    let output = vdm(&["run", &path, "--quiet"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("node 1 (LoadVideoFile), input `video`"),
        "{stderr}"
    );
}

#[test]
fn nodes_json_is_object_info_and_refused_plugins_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let output = vdm(&["nodes", "--json"], dir.path());
    assert!(output.status.success());
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(info["VideoNoise"]["category"], "vdm/noise");
    assert_eq!(info["SaveVideoFile"]["output_node"], true);
    // The deps folder also holds a test plugin of a later interface version: refused, named.
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("plugin refused") && stderr.contains("interface version"),
        "{stderr}"
    );
}

#[test]
fn plugins_are_found_through_vdm_plugin_path() {
    let dir = tempfile::tempdir().unwrap();
    let output = Command::new(env!("CARGO_BIN_EXE_vdm"))
        .args(["nodes", "--json"])
        .current_dir(dir.path())
        .env("VDM_PLUGIN_PATH", plugin_dir())
        .output()
        .expect("vdm runs");
    assert!(output.status.success());
    let info: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert!(info.get("VideoSampler").is_some(), "{info}");
}

#[test]
fn run_help_documents_the_allocator_setting() {
    let dir = tempfile::tempdir().unwrap();
    let output = vdm(&["run", "--help"], dir.path());
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    assert!(help.contains("--no-retain-freed-memory"), "{help}");
    assert!(help.contains("VDM_NO_RETAIN_FREED_MEMORY"), "{help}");
    assert!(help.contains("freed memory"), "{help}");
}

#[test]
fn run_without_retaining_freed_memory_still_runs() {
    let dir = tempfile::tempdir().unwrap();
    let workflow = write(dir.path(), "noise.json", &small_noise_workflow());
    let by_flag = vdm(
        &["run", &workflow, "--quiet", "--no-retain-freed-memory"],
        dir.path(),
    );
    assert!(
        by_flag.status.success(),
        "{}",
        String::from_utf8_lossy(&by_flag.stderr)
    );
    let by_env = Command::new(env!("CARGO_BIN_EXE_vdm"))
        .args(["--plugins", plugin_dir().to_str().unwrap()])
        .args(["run", &workflow, "--quiet"])
        .current_dir(dir.path())
        .env_remove("VDM_PLUGIN_PATH")
        .env("VDM_NO_RETAIN_FREED_MEMORY", "1")
        .output()
        .expect("vdm runs");
    assert!(
        by_env.status.success(),
        "{}",
        String::from_utf8_lossy(&by_env.stderr)
    );
}

#[test]
fn validate_reports_every_missing_model_file_at_once() {
    let dir = tempfile::tempdir().unwrap();
    let models = dir.path().join("models");
    std::fs::create_dir_all(&models).unwrap();
    let txt2vid = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/txt2vid.json");
    let output = vdm(
        &[
            "validate",
            txt2vid.to_str().unwrap(),
            "--models",
            models.to_str().unwrap(),
        ],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    for expected in [
        "node 1 (CheckpointLoader), input `ckpt_name`",
        "node 2 (MotionModuleLoader), input `model_name`",
    ] {
        assert!(stderr.contains(expected), "{stderr}");
    }
}

#[test]
fn an_unknown_or_unavailable_device_is_refused_before_running() {
    let dir = tempfile::tempdir().unwrap();
    let wf = write(dir.path(), "wf.json", &small_noise_workflow());
    let output = vdm(&["run", &wf, "--device", "bogus"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("expected auto, cpu, cuda or cuda:N"),
        "{stderr}"
    );
    assert!(!dir.path().join("clip_00001.png").exists());

    // A CUDA device asked of a plugin built without CUDA is refused before anything runs.
    let listing = vdm(&["nodes"], dir.path());
    let plugin_line = String::from_utf8_lossy(&listing.stdout)
        .lines()
        .next()
        .unwrap_or_default()
        .to_owned();
    if !plugin_line.contains("cuda") {
        let output = vdm(&["run", &wf, "--device", "cuda:0"], dir.path());
        assert_eq!(output.status.code(), Some(2));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains("built without CUDA"), "{stderr}");
    }
}

#[test]
fn without_a_plugin_every_command_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let empty = dir.path().join("no-plugins-here");
    std::fs::create_dir_all(&empty).unwrap();
    // A copy of the binary alone in a folder, as after `cargo install`.
    let lonely = dir.path().join("bin");
    std::fs::create_dir_all(&lonely).unwrap();
    let exe = lonely.join("vdm");
    std::fs::copy(env!("CARGO_BIN_EXE_vdm"), &exe).unwrap();
    let wf = write(dir.path(), "wf.json", &small_noise_workflow());
    for args in [
        vec!["nodes"],
        vec!["validate", wf.as_str()],
        vec!["run", wf.as_str()],
    ] {
        let output = Command::new(&exe)
            .args(["--plugins", empty.to_str().unwrap()])
            .args(&args)
            .current_dir(dir.path())
            .env_remove("VDM_PLUGIN_PATH")
            .output()
            .expect("vdm runs");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("no vdm plugin loaded"),
            "{args:?}: {stderr}"
        );
        assert!(
            stderr.contains(empty.to_str().unwrap()),
            "{args:?}: {stderr}"
        );
        assert!(stderr.contains("--plugins DIR"), "{args:?}: {stderr}");
    }
}

#[cfg(unix)]
#[test]
fn ctrl_c_interrupts_the_run_with_status_130() {
    use std::io::{BufRead, BufReader};
    let dir = tempfile::tempdir().unwrap();
    // txt2vid on the tiny models with a thousand steps: interrupted while it samples.
    let models = common::write_tiny_models(&dir.path().join("models"));
    let txt2vid = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/txt2vid.json");
    let mut wf: Value = serde_json::from_str(&std::fs::read_to_string(txt2vid).unwrap()).unwrap();
    wf["1"]["inputs"]["ckpt_name"] = json!("tiny-sd");
    wf["2"]["inputs"]["model_name"] = json!("tiny-motion");
    wf["6"]["inputs"]["width"] = json!(96);
    wf["6"]["inputs"]["height"] = json!(128);
    wf["6"]["inputs"]["frames"] = json!(2);
    wf["7"]["inputs"]["steps"] = json!(999);
    let wf = write(dir.path(), "wf.json", &wf);
    let out = dir.path().join("out");
    let mut child = Command::new(env!("CARGO_BIN_EXE_vdm"))
        .args(["--plugins", plugin_dir().to_str().unwrap()])
        .args(["run", &wf, "--json-events", "--device", "cpu"])
        .args(["--out", out.to_str().unwrap()])
        .args(["--models", models.root.to_str().unwrap()])
        .current_dir(dir.path())
        .env_remove("VDM_PLUGIN_PATH")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .expect("vdm runs");
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    // Once the sampler reports its first step, SIGINT as a terminal's Ctrl-C sends it.
    let mut seen = Vec::new();
    for line in lines.by_ref() {
        let event: Value = serde_json::from_str(&line.unwrap()).unwrap();
        let sampling = event["type"] == "progress" && event["data"]["node"] == "7";
        seen.push(event);
        if sampling {
            break;
        }
    }
    assert_eq!(seen.last().unwrap()["type"], "progress", "{seen:?}");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let events: Vec<Value> = lines
        .map(|l| serde_json::from_str(&l.unwrap()).unwrap())
        .collect();
    let output = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(130), "{stderr}");
    assert!(stderr.contains("interrupted"), "{stderr}");
    let last = events.last().unwrap();
    assert_eq!(last["type"], "execution_interrupted", "{events:?}");
    assert_eq!(last["data"]["node_id"], "7", "{events:?}");
    let steps = events.iter().filter(|e| e["type"] == "progress").count();
    assert!(steps < 100, "stopped within a few steps, not after {steps}");
    let leftovers: Vec<_> = std::fs::read_dir(&out)
        .map(|d| d.filter_map(|e| e.ok()).map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(
        leftovers
            .iter()
            .all(|f| !f.to_string_lossy().ends_with(".tmp")),
        "{leftovers:?}"
    );
}

#[test]
fn a_schedule_that_cannot_place_its_steps_is_refused_at_validation() {
    let dir = tempfile::tempdir().unwrap();
    let txt2vid = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/txt2vid.json");
    let models = common::write_tiny_models(&dir.path().join("models"));
    let output = vdm(
        &[
            "validate",
            txt2vid.to_str().unwrap(),
            "--models",
            models.root.to_str().unwrap(),
            "--set",
            "1.ckpt_name=tiny-sd",
            "--set",
            "2.model_name=tiny-motion",
            "--set",
            "7.steps=1000",
        ],
        dir.path(),
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("node 7 (VideoSampler), input `steps`")
            && stderr.contains("use at most 999 steps"),
        "{stderr}"
    );
}

#[test]
fn max_memory_lowers_the_budget_nodes_check_against() {
    let dir = tempfile::tempdir().unwrap();
    let mut wf = small_noise_workflow();
    wf["1"]["inputs"]["frames"] = json!(4);
    wf["1"]["inputs"]["width"] = json!(1024);
    wf["1"]["inputs"]["height"] = json!(1024);
    let wf = write(dir.path(), "wf.json", &wf);
    let output = vdm(&["run", &wf, "--quiet", "--max-memory", "1M"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("node 1 (VideoNoise), input `frames`")
            && stderr.contains("over the memory budget of 1.0 MiB (--max-memory 1.0 MiB)"),
        "{stderr}"
    );
    let output = vdm(&["run", &wf, "--max-memory", "lots"], dir.path());
    assert_eq!(output.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&output.stderr).contains("expected a size"));
}

#[test]
fn demo_runs_every_workflow_then_vid2vid_runs_as_shipped_on_its_models() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("demo");
    let output = Command::new(env!("CARGO_BIN_EXE_vdm"))
        .args(["--plugins", plugin_dir().to_str().unwrap()])
        .args(["demo", "--out", out.to_str().unwrap(), "--device", "cpu"])
        .args(["--size", "32", "--frames", "4", "--steps", "2"])
        .current_dir(dir.path())
        .env_remove("VDM_PLUGIN_PATH")
        .env("VDM_CACHE", dir.path().join("cache"))
        .output()
        .expect("vdm runs");
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(stdout.contains("RANDOM weights"), "{stdout}");
    let ok = stdout
        .lines()
        .filter(|l| l.trim_start().starts_with("ok "))
        .count();
    assert_eq!(ok, vdm::demo::WORKFLOWS.len(), "{stdout}");
    let models = dir.path().join("cache/demo-models");
    let checkpoint = models.join("checkpoints/vdm-demo-tiny-random");
    assert!(checkpoint.join("unet/config.json").is_file());
    assert!(models
        .join("animatediff_models/vdm-demo-tiny-random-motion/config.json")
        .is_file());
    assert!(out.join("txt2vid_00001_.gif").is_file(), "{stdout}");
    assert!(out.join("entropy-edit_00001_.gif").is_file(), "{stdout}");

    // vid2vid.json as shipped, run from an unrelated folder: `sample-clip.gif` is found beside
    // the workflow; the demo's models (latents 1/8 of the pixels) keep it small.
    let vid2vid = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/vid2vid.json");
    let shipped_out = dir.path().join("shipped");
    let output = vdm(
        &[
            "run",
            vid2vid.to_str().unwrap(),
            "--quiet",
            "--device",
            "cpu",
            "--out",
            shipped_out.to_str().unwrap(),
            "--models",
            models.to_str().unwrap(),
            "--set",
            "1.ckpt_name=vdm-demo-tiny-random",
            "--set",
            "2.model_name=vdm-demo-tiny-random-motion",
            "--set",
            "6.frame_load_cap=2",
            "--set",
            "8.steps=2",
        ],
        dir.path(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(shipped_out.join("vid2vid_00001_.gif").is_file());
}

/// `small_noise_workflow` as the ComfyUI editor saves it: the seed's `control_after_generate`
/// value, a primitive driving the frame count, a reroute, a note, and a muted preview.
fn small_noise_ui_workflow() -> Value {
    json!({
        "last_node_id": 9, "last_link_id": 5,
        "nodes": [
            {"id": 1, "type": "VideoNoise", "mode": 0,
             "inputs": [{"name": "frames", "type": "INT", "link": 4, "widget": {"name": "frames"}}],
             "outputs": [{"name": "LATENT", "type": "LATENT", "links": [1]}],
             "widgets_values": [3, "randomize", 3, 32, 24, 4, "mixed", 0.2, 1]},
            {"id": 4, "type": "Reroute", "mode": 0,
             "inputs": [{"name": "", "type": "*", "link": 1}],
             "outputs": [{"name": "", "type": "LATENT", "links": [2, 5]}]},
            {"id": 2, "type": "LatentPreview", "mode": 0, "title": "Latent to RGB",
             "inputs": [{"name": "latent", "type": "LATENT", "link": 2}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": [3]}],
             "widgets_values": []},
            {"id": 3, "type": "SaveVideoFile", "mode": 0,
             "inputs": [{"name": "images", "type": "IMAGE", "link": 3}],
             "outputs": [], "widgets_values": ["clip", "png", 4, 0]},
            {"id": 5, "type": "PrimitiveNode", "mode": 0, "inputs": [],
             "outputs": [{"name": "INT", "type": "INT", "links": [4], "widget": {"name": "frames"}}],
             "widgets_values": [3, "fixed"]},
            {"id": 6, "type": "Note", "mode": 0, "widgets_values": ["made in the editor"]},
            {"id": 7, "type": "LatentPreview", "mode": 2,
             "inputs": [{"name": "latent", "type": "LATENT", "link": 5}],
             "outputs": [{"name": "IMAGE", "type": "IMAGE", "links": []}]}
        ],
        "links": [[1, 1, 0, 4, 0, "LATENT"], [2, 4, 0, 2, 0, "LATENT"], [3, 2, 0, 3, 0, "IMAGE"],
                  [4, 5, 0, 1, 0, "INT"], [5, 4, 0, 7, 0, "LATENT"]],
        "groups": [], "config": {}, "extra": {}, "version": 0.4
    })
}

#[test]
fn ui_workflows_convert_validate_and_run() {
    let dir = tempfile::tempdir().unwrap();
    let ui = write(dir.path(), "ui.json", &small_noise_ui_workflow());
    let output = vdm(&["convert", &ui], dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let api: Value = serde_json::from_slice(&output.stdout).unwrap();
    let mut expected = small_noise_workflow();
    expected["1"]["inputs"]["batch_size"] = json!(1);
    expected["3"]["inputs"]["loop_count"] = json!(0);
    expected["2"]["_meta"] = json!({"title": "Latent to RGB"});
    assert_eq!(api, expected);

    let output = vdm(&["validate", &ui], dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let out = dir.path().join("out");
    let output = vdm(
        &["run", &ui, "--quiet", "--out", out.to_str().unwrap()],
        dir.path(),
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let written: Vec<_> = std::fs::read_dir(&out).unwrap().collect();
    assert_eq!(written.len(), 1, "{written:?}");
}

#[test]
fn classes_of_other_node_packs_are_named_and_extra_inputs_only_warn() {
    let dir = tempfile::tempdir().unwrap();
    let mut wf = small_noise_workflow();
    wf["1"]["inputs"]["grain"] = json!(0.5);
    wf["4"] = json!({"class_type": "ADE_AnimateDiffCombine", "inputs": {"images": ["2", 0]}});
    let path = write(dir.path(), "wf.json", &wf);
    let output = vdm(&["validate", &path], dir.path());
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("ADE_AnimateDiffCombine") && stderr.contains("ComfyUI-AnimateDiff-Evolved"),
        "{stderr}"
    );
    assert!(
        stderr.contains("warning: node 1 (VideoNoise): `grain`"),
        "{stderr}"
    );

    wf.as_object_mut().unwrap().remove("4");
    let path = write(dir.path(), "wf.json", &wf);
    let output = vdm(&["validate", &path], dir.path());
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
}

#[test]
fn train_vmc_writes_a_patch_and_its_losses_and_names_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    common::write_moving_texture_gif(&dir.path().join("clip.gif"), 4, (24, 32), (1, 0));
    let models_arg = models.root.to_string_lossy().into_owned();
    let args = |prompt: &'static str| {
        vec![
            "train",
            "vmc",
            "--checkpoint",
            "tiny-sd",
            "--motion-module",
            "tiny-motion",
            "--clip",
            "clip.gif",
            "--prompt",
            prompt,
            "--steps",
            "2",
            "--learning-rate",
            "0.001",
            "--models",
            &models_arg,
            "--device",
            "cpu",
            "--out",
            "out",
            "--prefix",
            "vmc/texture",
        ]
        .into_iter()
        .map(str::to_string)
        .collect::<Vec<String>>()
    };

    let good = args("a texture moving right");
    let output = vdm(&strs(&good), dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let folder = dir.path().join("out/vmc");
    let patch = folder.join("texture_00001_.safetensors");
    assert!(patch.is_file(), "{stdout}");
    assert!(
        stdout.contains("wrote out/vmc/texture_00001_.safetensors"),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(folder.join("texture.vmc-loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3);
    assert!(folder.join("texture.vmc-state.safetensors").is_file());

    let mut printing = good.clone();
    printing.push("--print-workflow".into());
    let printed = vdm(&strs(&printing), dir.path());
    let workflow: Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(workflow["6"]["class_type"], "MotionCustomize");
    assert_eq!(workflow["6"]["inputs"]["steps"], 2);

    let empty = vdm(&strs(&args(" ")), dir.path());
    assert_eq!(empty.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&empty.stderr);
    assert!(
        stderr.contains("MotionCustomize") && stderr.contains("prompt"),
        "{stderr}"
    );
}

fn strs(args: &[String]) -> Vec<&str> {
    args.iter().map(String::as_str).collect()
}

#[test]
fn train_temporal_writes_an_adapter_from_a_folder_of_clips() {
    let dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(&dir.path().join("models"));
    let clips = dir.path().join("clips");
    std::fs::create_dir_all(&clips).unwrap();
    common::write_moving_texture_gif(&clips.join("right.gif"), 5, (24, 32), (1, 0));
    let models_arg = models.root.to_string_lossy().into_owned();
    let args: Vec<String> = [
        "train",
        "temporal",
        "--checkpoint",
        "tiny-sd",
        "--clips",
        "clips",
        "--steps",
        "2",
        "--frames",
        "4",
        "--width",
        "24",
        "--height",
        "32",
        "--learning-rate",
        "0.001",
        "--models",
        &models_arg,
        "--device",
        "cpu",
        "--out",
        "out",
        "--prefix",
        "adapters/a",
    ]
    .into_iter()
    .map(str::to_string)
    .collect();
    let output = vdm(&strs(&args), dir.path());
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert!(
        dir.path()
            .join("out/adapters/a_00001_.safetensors")
            .is_file(),
        "{stdout}"
    );
    let csv = std::fs::read_to_string(dir.path().join("out/adapters/a.temporal-loss.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");

    let mut printing = args.clone();
    printing.push("--print-workflow".into());
    let printed = vdm(&strs(&printing), dir.path());
    let workflow: Value = serde_json::from_slice(&printed.stdout).unwrap();
    assert_eq!(workflow["2"]["class_type"], "TrainTemporalAdapter");

    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let mut no_clips = args.clone();
    no_clips[5] = "empty".into();
    let refused = vdm(&strs(&no_clips), dir.path());
    assert_ne!(refused.status.code(), Some(0));
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(stderr.contains("clips"), "{stderr}");
}
