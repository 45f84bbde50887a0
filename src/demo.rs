//! `vdm demo`: every shipped workflow, end to end, on tiny models with random weights, without
//! downloading anything. The plugin's `TinyRandomModels` writes the models into a cache folder
//! (once); `noise-preview.json` makes the clip that the video-to-video workflows read; then
//! each workflow runs with its models, sizes, frame counts and steps made small.

use std::path::{Path, PathBuf};
use std::time::Instant;

use serde_json::{json, Value as Json};

use crate::events::Silent;
use crate::execute::{Executor, RunError};
use crate::plugin::PluginSet;
use crate::workflow::{Input, Workflow};

/// The name of the demo checkpoint; the motion module is `<name>-motion`.
pub const DEMO_MODELS: &str = "vdm-demo-tiny-random";

/// The shipped workflows, in the order the demo runs them (the first makes the clip).
pub const WORKFLOWS: [(&str, &str); 13] = [
    (
        "noise-preview.json",
        include_str!("../workflows/noise-preview.json"),
    ),
    ("txt2vid.json", include_str!("../workflows/txt2vid.json")),
    ("vid2vid.json", include_str!("../workflows/vid2vid.json")),
    (
        "long-video.json",
        include_str!("../workflows/long-video.json"),
    ),
    (
        "fast-reuse.json",
        include_str!("../workflows/fast-reuse.json"),
    ),
    (
        "motion-estimate.json",
        include_str!("../workflows/motion-estimate.json"),
    ),
    (
        "motion-adaptive.json",
        include_str!("../workflows/motion-adaptive.json"),
    ),
    (
        "entropy-probe.json",
        include_str!("../workflows/entropy-probe.json"),
    ),
    ("enhance.json", include_str!("../workflows/enhance.json")),
    (
        "entropy-edit.json",
        include_str!("../workflows/entropy-edit.json"),
    ),
    (
        "comfyui-txt2vid.json",
        include_str!("../workflows/comfyui-txt2vid.json"),
    ),
    ("vmc.json", include_str!("../workflows/vmc.json")),
    (
        "train-temporal.json",
        include_str!("../workflows/train-temporal.json"),
    ),
];

/// How small the demo runs.
#[derive(Debug, Clone)]
pub struct DemoOptions {
    /// Width and height of every video, in pixels (a multiple of 16).
    pub size: u32,
    /// Frames of every video (long-video gets three times as many, to use context windows).
    pub frames: u32,
    /// Sampling steps.
    pub steps: u32,
    pub models_dir: PathBuf,
    pub out_dir: PathBuf,
    pub device: String,
}

/// What one workflow of the demo did.
#[derive(Debug)]
pub struct DemoRun {
    pub workflow: &'static str,
    pub seconds: f64,
    pub result: Result<Vec<String>, String>,
}

/// The cache folder for the demo's models: `VDM_CACHE`, else `$XDG_CACHE_HOME/vdm`, else
/// `~/.cache/vdm`, else the system's temporary folder.
pub fn default_cache_dir() -> PathBuf {
    let from = |var: &str| {
        std::env::var_os(var)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from)
    };
    from("VDM_CACHE")
        .or_else(|| from("XDG_CACHE_HOME").map(|d| d.join("vdm")))
        .or_else(|| from("HOME").map(|d| d.join(".cache").join("vdm")))
        .unwrap_or_else(|| std::env::temp_dir().join("vdm"))
}

/// Writes the tiny models (unless present), then runs every workflow, calling `report` after
/// each. Stops early only when the models cannot be written.
pub fn run_demo(
    plugins: &PluginSet,
    options: &DemoOptions,
    mut report: impl FnMut(&DemoRun),
) -> Result<Vec<DemoRun>, String> {
    let executor = |out: &Path| {
        Executor::new(plugins, &Silent)
            .with_setting("models_dir", options.models_dir.to_string_lossy())
            .with_setting("output_dir", out.to_string_lossy())
            .with_setting("device", options.device.clone())
    };
    let setup = Workflow::from_json(json!({
        "1": {"class_type": "TinyRandomModels", "inputs": {"name": DEMO_MODELS}}
    }))
    .map_err(|e| e.to_string())?;
    executor(&options.models_dir)
        .run(&setup)
        .map_err(|e| format!("writing the demo models: {e}"))?;

    let mut clip: Option<String> = None;
    let mut runs = Vec::new();
    for (name, text) in WORKFLOWS {
        let start = Instant::now();
        let result = crate::ui_workflow::parse_workflow(text, plugins)
            .map_err(|e| e.to_string())
            .and_then(|(mut workflow, _)| {
                shrink(&mut workflow, options, clip.as_deref(), name)?;
                executor(&options.out_dir)
                    .run(&workflow)
                    .map_err(|e| match e {
                        RunError::Invalid(report) => report.to_text(),
                        other => other.to_string(),
                    })
                    .map(|summary| written_files(&summary.ui))
            });
        if clip.is_none() {
            clip = result
                .as_ref()
                .ok()
                .and_then(|files| files.first().cloned());
        }
        let run = DemoRun {
            workflow: name,
            seconds: start.elapsed().as_secs_f64(),
            result,
        };
        report(&run);
        runs.push(run);
    }
    Ok(runs)
}

const NO_CLIP: &str = "the demo clip (noise-preview.json) was not made";

/// A folder holding only the demo clip, for the training workflows' `clips`.
fn clip_folder(options: &DemoOptions, clip: &str) -> Result<String, String> {
    let folder = options.out_dir.join("demo-clips");
    let clip = Path::new(clip);
    let name = clip.file_name().ok_or("the demo clip has no file name")?;
    std::fs::create_dir_all(&folder)
        .and_then(|()| std::fs::copy(clip, folder.join(name)))
        .map_err(|e| format!("{}: {e}", folder.display()))?;
    Ok(folder.to_string_lossy().into_owned())
}

/// Points `workflow` at the demo models and `clip`, with the demo's sizes.
fn shrink(
    workflow: &mut Workflow,
    options: &DemoOptions,
    clip: Option<&str>,
    name: &str,
) -> Result<(), String> {
    let long = name == "long-video.json";
    let mut changes: Vec<(String, String, Json)> = Vec::new();
    for (id, node) in &workflow.nodes {
        for (input, value) in &node.inputs {
            let Input::Literal(_) = value else {
                continue;
            };
            // In ComfyUI's graphs the frames of a video are the latent batch.
            let frames_as_batch =
                node.class_type == "EmptyLatentImage" && input.as_str() == "batch_size";
            let new = match input.as_str() {
                _ if frames_as_batch => json!(options.frames),
                "ckpt_name" => json!(DEMO_MODELS),
                "model_name" => json!(format!("{DEMO_MODELS}-motion")),
                "width" | "height" => json!(options.size),
                "frames" if long => json!(options.frames * 3),
                "frames" => json!(options.frames),
                "frame_load_cap" => json!(options.frames),
                "steps" => json!(options.steps),
                "video" => json!(clip.ok_or(NO_CLIP)?),
                "clips" => json!(clip_folder(options, clip.ok_or(NO_CLIP)?)?),
                _ => continue,
            };
            changes.push((id.clone(), input.clone(), new));
        }
    }
    for (id, input, value) in changes {
        workflow.set_literal(&id, &input, value)?;
    }
    Ok(())
}

/// The `fullpath` of every file in the outputs' `ui` entries.
fn written_files(ui: &std::collections::BTreeMap<String, Json>) -> Vec<String> {
    ui.values()
        .filter_map(Json::as_object)
        .flat_map(|entries| entries.values())
        .filter_map(Json::as_array)
        .flatten()
        .filter_map(|file| file.get("fullpath").and_then(Json::as_str))
        .map(str::to_owned)
        .collect()
}
