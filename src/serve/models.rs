//! The models folder as ComfyUI's editor sees it: the model files of each subfolder, and the
//! model-name inputs of loader nodes shown as combos of those files.
//!
//! Plugins declare model names as plain `STRING` inputs (a workflow may give any path), and
//! the descriptors do not say which folder a name is looked up in; ComfyUI's loaders list the
//! files of their folder instead, and its editor shows a drop-down of them. The table below
//! names those inputs of ComfyUI's loaders and of vdm's own, so that `/object_info` can offer
//! the same drop-downs. It is read again on every request: the editor's "refresh" is a new
//! `/object_info`.

use std::path::Path;

use serde_json::{json, Value as Json};

/// The folders ComfyUI's `/models` names, in its order.
pub const MODEL_FOLDERS: &[&str] = &[
    "checkpoints",
    "loras",
    "vae",
    "text_encoders",
    "diffusion_models",
    "clip_vision",
    "controlnet",
    "embeddings",
    "upscale_models",
    "animatediff_models",
    "animatediff_motion_lora",
];

/// The extensions ComfyUI counts as model files (`folder_paths.supported_pt_extensions`).
const MODEL_EXTENSIONS: &[&str] = &["safetensors", "ckpt", "pt", "pth", "bin", "pkl", "sft"];

const CHECKPOINTS: &[&str] = &["checkpoints", "diffusers"];
const MOTION_MODULES: &[&str] = &["animatediff_models", "animatediff_motion_modules"];
const MOTION_LORAS: &[&str] = &["animatediff_motion_lora"];

/// `(class_type, input, folders)`: the model-name inputs and the subfolders of the models
/// folder their names are looked up in, as the loaders resolve them.
const MODEL_INPUTS: &[(&str, &str, &[&str])] = &[
    ("CheckpointLoaderSimple", "ckpt_name", CHECKPOINTS),
    ("CheckpointLoader", "ckpt_name", CHECKPOINTS),
    ("VAELoader", "vae_name", &["vae"]),
    ("LoraLoader", "lora_name", &["loras"]),
    ("LoraLoaderModelOnly", "lora_name", &["loras"]),
    ("MotionModuleLoader", "model_name", MOTION_MODULES),
    ("ADE_LoadAnimateDiffModel", "model_name", MOTION_MODULES),
    ("ADE_AnimateDiffLoaderGen1", "model_name", MOTION_MODULES),
    (
        "ADE_AnimateDiffLoaderWithContext",
        "model_name",
        MOTION_MODULES,
    ),
    ("ADE_AnimateDiffLoRALoader", "name", MOTION_LORAS),
    ("ADE_AnimateDiffLoRALoader", "lora_name", MOTION_LORAS),
];

/// The models under `models/<folder>` for each of `folders`, as ComfyUI names them: paths
/// relative to that folder with `/` between subfolders, sorted, without repeats. A model is a
/// file with a model extension, or a folder in diffusers' layout (holding `model_index.json`
/// or `config.json`), which the loaders also take; hidden entries (a model being written
/// under a temporary name) are left out.
pub fn list_models(models: &Path, folders: &[&str]) -> Vec<String> {
    let mut names = Vec::new();
    for folder in folders {
        collect_models(&models.join(folder), "", &mut names);
    }
    names.sort();
    names.dedup();
    names
}

/// How deep subfolders are searched. Symbolic links are followed (models are often linked in
/// from another disk), so a link to a folder above would otherwise recurse without end.
const MAX_DEPTH: usize = 8;

fn collect_models(dir: &Path, prefix: &str, names: &mut Vec<String>) {
    if prefix.split('/').count() > MAX_DEPTH {
        return;
    }
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with('.') {
            continue;
        }
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            if path.join("model_index.json").is_file() || path.join("config.json").is_file() {
                names.push(relative);
            } else {
                collect_models(&path, &relative, names);
            }
        } else if has_model_extension(&path) {
            names.push(relative);
        }
    }
}

fn has_model_extension(path: &Path) -> bool {
    path.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| MODEL_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Turns the model-name inputs of `info` (`/object_info`'s `{class_type: node_info}`) into
/// combos of the models found now under `models`. The combo has no default, so the editor
/// picks the first file for a new node, as ComfyUI's does; without a models folder the
/// inputs stay free text.
pub fn fill_model_combos(info: &mut Json, models: Option<&Path>) {
    let Some(models) = models else {
        return;
    };
    let Json::Object(nodes) = info else {
        return;
    };
    for (class, input, folders) in MODEL_INPUTS {
        let Some(node) = nodes.get_mut(*class) else {
            continue;
        };
        for section in ["required", "optional"] {
            let Some(spec) = node
                .get_mut("input")
                .and_then(|inputs| inputs.get_mut(section))
                .and_then(|specs| specs.get_mut(*input))
            else {
                continue;
            };
            // Only a free-text input becomes a combo: a plugin that already offers a list
            // knows better.
            if spec[0] != "STRING" {
                continue;
            }
            let mut options = spec[1].clone();
            if let Json::Object(options) = &mut options {
                options.remove("default");
                options.remove("multiline");
            }
            *spec = json!([list_models(models, folders), options]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_files_and_diffusers_folders_are_listed_with_forward_slashes() {
        let models = tempfile::tempdir().unwrap();
        let checkpoints = models.path().join("checkpoints");
        std::fs::create_dir_all(checkpoints.join("sd15/unet")).unwrap();
        std::fs::create_dir_all(checkpoints.join("pipeline")).unwrap();
        std::fs::create_dir_all(models.path().join("diffusers/other")).unwrap();
        std::fs::create_dir_all(checkpoints.join(".staging.tmp")).unwrap();
        for file in [
            "checkpoints/a.safetensors",
            "checkpoints/sd15/b.CKPT",
            "checkpoints/sd15/notes.txt",
            "checkpoints/sd15/unet/c.bin",
            "checkpoints/pipeline/model_index.json",
            "checkpoints/pipeline/weights.safetensors",
            "checkpoints/.staging.tmp/d.safetensors",
            "diffusers/other/config.json",
        ] {
            std::fs::write(models.path().join(file), "").unwrap();
        }
        assert_eq!(
            list_models(models.path(), CHECKPOINTS),
            [
                "a.safetensors",
                "other",
                "pipeline",
                "sd15/b.CKPT",
                "sd15/unet/c.bin"
            ]
        );
    }

    #[cfg(unix)]
    #[test]
    fn a_link_to_a_folder_above_does_not_recurse_without_end() {
        let models = tempfile::tempdir().unwrap();
        let loras = models.path().join("loras");
        std::fs::create_dir_all(&loras).unwrap();
        std::fs::write(loras.join("l.safetensors"), "").unwrap();
        std::os::unix::fs::symlink(&loras, loras.join("again")).unwrap();
        let names = list_models(models.path(), &["loras"]);
        assert_eq!(
            names[0],
            "again/again/again/again/again/again/again/again/l.safetensors"
        );
        assert_eq!(names.len(), MAX_DEPTH + 1);
    }

    #[test]
    fn only_free_text_model_inputs_become_combos() {
        let models = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(models.path().join("vae")).unwrap();
        std::fs::write(models.path().join("vae/v.pt"), "").unwrap();
        let mut info = json!({
            "VAELoader": {"input": {"required": {
                "vae_name": ["STRING", {"default": "", "multiline": false, "tooltip": "t"}]}}},
            "LoraLoader": {"input": {"required": {"lora_name": [["fixed"], {}]}}},
            "Other": {"input": {"required": {"vae_name": ["STRING", {}]}}}
        });
        let unchanged = info.clone();
        fill_model_combos(&mut info, None);
        assert_eq!(info, unchanged);
        fill_model_combos(&mut info, Some(models.path()));
        assert_eq!(
            info["VAELoader"]["input"]["required"]["vae_name"],
            json!([["v.pt"], {"tooltip": "t"}])
        );
        assert_eq!(info["LoraLoader"], unchanged["LoraLoader"]);
        assert_eq!(info["Other"], unchanged["Other"]);
    }
}
