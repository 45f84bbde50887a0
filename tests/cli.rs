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
        "3": {"class_type": "SaveVideo", "inputs": {"images": ["2", 0], "filename_prefix": "clip", "format": "png", "fps": 4}}
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
    let wf = json!({
        "1": {"class_type": "LoadVideo", "inputs": {"video": "does-not-exist.gif"}},
        "2": {"class_type": "SaveVideo", "inputs": {"images": ["1", 0], "filename_prefix": "x", "format": "gif", "fps": 8}}
    });
    let path = write(dir.path(), "wf.json", &wf);
    let output = vdm(&["run", &path, "--quiet"], dir.path());
    assert_eq!(output.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("node 1 (LoadVideo), input `video`"),
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
    assert_eq!(info["SaveVideo"]["output_node"], true);
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
