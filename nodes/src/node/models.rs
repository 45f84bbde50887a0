//! Loading models and preparing their inputs: checkpoints, VAEs, motion modules, prompts,
//! empty latents.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use vdm_ffi::Value;

use crate::models::checkpoint::{load_checkpoint, open_motion_module, MotionModuleFile};
use crate::models::load::open_vae;
use crate::models::patcher::PatchedUNet;
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};

use super::memory::Bytes;
use super::objects::{Clip, Conditioning, Model, MotionModule, Vae};
use super::{
    Context, DescriptorBuilder, ForInput, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(CheckpointLoader),
        Box::new(VaeLoader),
        Box::new(MotionModuleLoader),
        Box::new(ApplyMotionModule),
        Box::new(TextEncode),
        Box::new(EmptyVideoLatent),
    ]
}

/// The folders of the models folder where each kind of model is looked for (ComfyUI's names).
const CHECKPOINT_FOLDERS: &[&str] = &["checkpoints", "diffusers"];
const VAE_FOLDERS: &[&str] = &["vae"];
pub(super) const MOTION_MODULE_FOLDERS: &[&str] =
    &["animatediff_models", "animatediff_motion_modules"];
/// AnimateDiff-Evolved's folder of motion LoRAs.
pub(super) const MOTION_LORA_FOLDERS: &[&str] = &["animatediff_motion_lora"];
pub(super) const LORA_FOLDERS: &[&str] = &["loras"];

/// The check of a model input given as a literal: that the file can be found.
pub(super) fn check_model(
    inputs: &Inputs,
    ctx: &Context,
    input: &str,
    folders: &[&str],
) -> Vec<NodeFailure> {
    match inputs.get(input) {
        Some(Value::Str(name)) => resolve_model(ctx, input, folders, name)
            .err()
            .into_iter()
            .collect(),
        _ => Vec::new(),
    }
}

/// The folders searched for models of `folders` (ComfyUI's folder names), in order:
/// `<models>/<folder>` for each name, then the folders that `extra_model_paths.yaml` adds for
/// those names. The file is read where a ComfyUI installation keeps it, beside the models
/// folder, or inside it.
pub(super) fn model_search_dirs(models: &Path, folders: &[&str]) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = folders.iter().map(|f| models.join(f)).collect();
    let candidates = [
        models
            .parent()
            .map(|root| root.join("extra_model_paths.yaml")),
        Some(models.join("extra_model_paths.yaml")),
    ];
    for file in candidates.into_iter().flatten() {
        if let Ok(text) = std::fs::read_to_string(&file) {
            let yaml_dir = file.parent().unwrap_or(Path::new("."));
            for (folder, dir) in extra_model_paths(&text, yaml_dir) {
                if folders.contains(&folder.as_str()) && !dirs.contains(&dir) {
                    dirs.push(dir);
                }
            }
        }
    }
    dirs
}

/// The (folder name, path) pairs of an `extra_model_paths.yaml`, as ComfyUI reads them: each
/// top-level section may set `base_path` (relative to the file's folder) that the section's
/// paths are relative to; a folder name takes one path or several, one per line. A file that
/// is not such YAML adds nothing.
fn extra_model_paths(text: &str, yaml_dir: &Path) -> Vec<(String, PathBuf)> {
    use yaml_rust2::{Yaml, YamlLoader};
    let Ok(documents) = YamlLoader::load_from_str(text) else {
        return Vec::new();
    };
    let mut paths = Vec::new();
    for document in &documents {
        let Some(sections) = document.as_hash() else {
            continue;
        };
        for section in sections.values() {
            let Some(entries) = section.as_hash() else {
                continue;
            };
            let base = entries
                .get(&Yaml::String("base_path".into()))
                .and_then(Yaml::as_str)
                .map(|b| yaml_dir.join(expand_home(b)));
            for (key, value) in entries {
                let (Some(folder), Some(value)) = (key.as_str(), value.as_str()) else {
                    continue;
                };
                if folder == "base_path" {
                    continue;
                }
                for line in value.lines().map(str::trim).filter(|l| !l.is_empty()) {
                    let path = expand_home(line);
                    let full = match &base {
                        Some(base) => base.join(path),
                        None => yaml_dir.join(path),
                    };
                    paths.push((folder.to_owned(), full));
                }
            }
        }
    }
    paths
}

/// `~/…` with the home folder, as ComfyUI's `expanduser`.
fn expand_home(path: &str) -> PathBuf {
    match (path.strip_prefix("~/"), std::env::var_os("HOME")) {
        (Some(rest), Some(home)) => PathBuf::from(home).join(rest),
        _ => PathBuf::from(path),
    }
}

/// Finds a model file: the path as given when it exists, else in the folders of
/// [`model_search_dirs`], else an error saying where it looked. Names may use either
/// slash for subfolders (workflows made on Windows write `sd15\\model.safetensors`).
pub(super) fn resolve_model(
    ctx: &Context,
    input: &str,
    folders: &[&str],
    name: &str,
) -> Result<PathBuf, NodeFailure> {
    if name.trim().is_empty() {
        return Err(NodeFailure::input(input, "no model file given"));
    }
    let given = PathBuf::from(name);
    if given.exists() {
        return Ok(given);
    }
    let parts: Vec<&str> = name
        .split(['/', '\\'])
        .filter(|part| !part.is_empty())
        .collect();
    if parts.contains(&"..") {
        return Err(NodeFailure::input(
            input,
            format!("model name `{name}` climbs out of the models folder with `..`"),
        ));
    }
    let relative: PathBuf = parts.iter().collect();
    let mut tried = vec![given.display().to_string()];
    if let Some(models) = ctx.setting("models_dir") {
        for dir in model_search_dirs(Path::new(&models), folders) {
            let candidate = dir.join(&relative);
            if candidate.exists() {
                return Ok(candidate);
            }
            tried.push(candidate.display().to_string());
        }
    } else {
        tried.push(format!(
            "(no models folder: pass --models DIR or set VDM_MODELS to search {})",
            folders.join(", ")
        ));
    }
    Err(NodeFailure::input(
        input,
        format!(
            "model file `{name}` not found; looked at {}",
            tried.join(", ")
        ),
    ))
}

fn dtype_for(name: &str, device: &Device) -> Result<DType, NodeFailure> {
    match name {
        "auto" if device.is_cuda() => Ok(DType::F16),
        "auto" | "f32" => Ok(DType::F32),
        "f16" => Ok(DType::F16),
        "bf16" => Ok(DType::BF16),
        other => Err(NodeFailure::input(
            "dtype",
            format!("unknown dtype `{other}`"),
        )),
    }
}

pub(super) struct CheckpointLoader;

impl Node for CheckpointLoader {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("CheckpointLoader", "Load Checkpoint", "vdm/loaders")
            .description(
                "Loads an SD 1.x checkpoint: a single .safetensors/.ckpt file or a diffusers folder. \
                 Names are looked up as paths, then under <models>/checkpoints/.",
            )
            .string("ckpt_name", "", "Checkpoint file or diffusers folder.")
            .optional()
            .combo("dtype", &["auto", "f32", "f16", "bf16"], "UNet and text-encoder precision (auto: f16 on CUDA, f32 on CPU); the VAE stays f32.")
            .output("MODEL", "MODEL")
            .output("CLIP", "CLIP")
            .output("VAE", "VAE")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_model(inputs, ctx, "ckpt_name", CHECKPOINT_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_model(
            ctx,
            "ckpt_name",
            CHECKPOINT_FOLDERS,
            inputs.string("ckpt_name")?,
        )?;
        let device = ctx.device()?;
        let dtype = match inputs.get("dtype") {
            Some(_) => dtype_for(inputs.string("dtype")?, &device)?,
            None => dtype_for("auto", &device)?,
        };
        // Single files carry no tokenizer: look beside them and in the models folder.
        let mut tokenizer_dirs = vec![path.with_file_name("tokenizer")];
        if let Some(models) = ctx.setting("models_dir") {
            tokenizer_dirs.push(Path::new(&models).join("clip_tokenizer"));
            tokenizer_dirs.push(Path::new(&models).join("tokenizers").join("clip"));
        }
        ctx.progress(0, 1, "loading checkpoint");
        let checkpoint =
            load_checkpoint(&path, dtype, &device, &tokenizer_dirs).for_input("ckpt_name")?;
        ctx.progress(1, 1, "loaded");
        let search = tokenizer_dirs
            .iter()
            .map(|d| d.display().to_string())
            .collect::<Vec<_>>()
            .join(", ");
        Ok(Outputs {
            values: vec![
                Model::new(PatchedUNet::new(Arc::new(checkpoint.unet))).into_value(),
                Clip {
                    encoder: Arc::new(checkpoint.text_encoder),
                    weights: checkpoint.text_encoder_weights,
                    tokenizer: checkpoint.tokenizer.map(Arc::new),
                    clip_skip: 1,
                    tokenizer_search: search,
                }
                .into_value(),
                Vae {
                    model: Arc::new(checkpoint.vae),
                }
                .into_value(),
            ],
            ui: None,
        })
    }
}

struct VaeLoader;

impl Node for VaeLoader {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VAELoader", "Load VAE", "vdm/loaders")
            .description("Loads an SD 1.x VAE (diffusers folder or file, LDM file, or the VAE of a full checkpoint), looked up as a path, then under <models>/vae/.")
            .string("vae_name", "", "VAE file or folder.")
            .output("VAE", "VAE")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_model(inputs, ctx, "vae_name", VAE_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_model(ctx, "vae_name", VAE_FOLDERS, inputs.string("vae_name")?)?;
        let device = ctx.device()?;
        let config = match path.join("config.json") {
            c if c.is_file() => {
                let text = std::fs::read_to_string(&c).for_input("vae_name")?;
                serde_json::from_str(&text)
                    .map_err(|e| NodeFailure::input("vae_name", format!("{}: {e}", c.display())))?
            }
            _ => AutoencoderKLConfig::sd1(),
        };
        let weights =
            open_vae(&path, Some(config.block_out_channels.len())).for_input("vae_name")?;
        let model = AutoencoderKL::new(weights.var_builder(DType::F32, &device), &config)
            .for_input("vae_name")?;
        Ok(Outputs::one(
            Vae {
                model: Arc::new(model),
            }
            .into_value(),
        ))
    }
}

/// Reads the motion module `name` (a path, or a file under the motion-module folders); errors
/// name the `model_name` input.
pub(super) fn open_motion_module_file(
    ctx: &Context,
    name: &str,
) -> Result<Arc<MotionModuleFile>, NodeFailure> {
    let path = resolve_model(ctx, "model_name", MOTION_MODULE_FOLDERS, name)?;
    Ok(Arc::new(open_motion_module(&path).for_input("model_name")?))
}

struct MotionModuleLoader;

impl Node for MotionModuleLoader {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("MotionModuleLoader", "Load Motion Module", "vdm/loaders")
            .description(
                "Loads an AnimateDiff motion module: an original mm_sd_v15*.ckpt/.safetensors (v1/v2/v3 told apart from its keys) \
                 or a diffusers MotionAdapter folder or file. Names are looked up as paths, then under <models>/animatediff_models/.",
            )
            .string("model_name", "", "Motion module file or folder.")
            .output("MOTION_MODULE", "MOTION_MODULE")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_model(inputs, ctx, "model_name", MOTION_MODULE_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let file = open_motion_module_file(ctx, inputs.string("model_name")?)?;
        Ok(Outputs::one(MotionModule { file }.into_value()))
    }
}

struct ApplyMotionModule;

impl Node for ApplyMotionModule {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ApplyMotionModule", "Apply Motion Module", "vdm/animatediff")
            .description("Patches a model with a motion module (the base model is unchanged). motion_scale scales the modules' contribution: 1 as trained, 0 the image model.")
            .object("model", "MODEL", "The SD 1.x model.")
            .object("motion_module", "MOTION_MODULE", "From Load Motion Module.")
            .float("motion_scale", 1.0, (0.0, 2.0, 0.01), "Multiplier of the motion modules' residuals.")
            .output("MODEL", "MODEL")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let module: MotionModule = inputs.object("motion_module")?;
        let scale = inputs.float("motion_scale")?;
        // Checked before any weight is read, so the message says what is wrong.
        model
            .unet
            .check_motion_channels(&module.file.config.block_out_channels)
            .map_err(|e| NodeFailure::input("motion_module", e))?;
        let base = model.unet.base();
        let dtype = base.dtype();
        let adapter = module
            .file
            .build(base.config().norm_num_groups, dtype, &ctx.device()?)
            .for_input("motion_module")?;
        let unet = model
            .unet
            .with_motion(adapter, scale)
            .map_err(|e| NodeFailure::input("motion_module", e))?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}

struct TextEncode;

impl Node for TextEncode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("TextEncode", "Text Encode", "vdm/conditioning")
            .description(
                "Encodes a prompt with the checkpoint's CLIP text encoder (77 tokens, truncated).",
            )
            .object("clip", "CLIP", "From Load Checkpoint.")
            .text("text", "", "The prompt.")
            .optional()
            .int(
                "clip_skip",
                1,
                1,
                12,
                "1: the last layer; 2: the penultimate (A1111's \"Clip skip\").",
            )
            .output("CONDITIONING", "CONDITIONING")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let clip: Clip = inputs.object("clip")?;
        let clip_skip = inputs.usize_or("clip_skip", clip.clip_skip)?;
        let embeddings = encode_text(&clip, inputs.string("text")?, clip_skip, "text")?;
        Ok(Outputs::one(
            Conditioning::per_video(embeddings).into_value(),
        ))
    }
}

/// The (1, 77, D) embeddings of `text` (truncated to 77 tokens) from the layer `clip_skip`
/// counts from the end; errors name `input`.
pub(super) fn encode_text(
    clip: &Clip,
    text: &str,
    clip_skip: usize,
    input: &str,
) -> Result<Tensor, NodeFailure> {
    if clip_skip > clip.encoder.num_hidden_layers() {
        return Err(NodeFailure::input(
            "clip_skip",
            format!(
                "the text encoder has {} layers",
                clip.encoder.num_hidden_layers()
            ),
        ));
    }
    let tokenizer = clip
        .tokenizer()
        .map_err(|m| NodeFailure::input("clip", m))?;
    let device = clip.encoder.device().clone();
    let ids = tokenizer
        .encode_to_tensor(&[text], &device)
        .for_input(input)?;
    Ok(clip.encoder.forward_with_clip_skip(&ids, clip_skip)?)
}

struct EmptyVideoLatent;

impl Node for EmptyVideoLatent {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EmptyVideoLatent", "Empty Video Latent", "vdm/latent")
            .description(
                "Zero latents of a video size, for text-to-video (the sampler adds the noise).",
            )
            .int_step(
                "width",
                512,
                (8, 16384, 8),
                "Width in pixels; the latent is 1/8 of it.",
            )
            .int_step(
                "height",
                512,
                (8, 16384, 8),
                "Height in pixels; the latent is 1/8 of it.",
            )
            .int("frames", 16, 1, 4096, "Number of frames.")
            .optional()
            .int("batch_size", 1, 1, 64, "Number of videos.")
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let width = inputs.usize("width")? / super::noise::LATENT_SCALE;
        let height = inputs.usize("height")? / super::noise::LATENT_SCALE;
        let frames = inputs.usize("frames")?;
        let batch = inputs.usize_or("batch_size", 1)?;
        let (height, width) = (height.max(1), width.max(1));
        let device = ctx.device()?;
        ctx.memory_budget(&device).check(
            "frames",
            &format!("latents of {batch} × 4 × {frames} × {height} × {width}"),
            Bytes::f32s(&[batch, 4, frames, height, width]),
        )?;
        let samples = Tensor::zeros((batch, 4, frames, height, width), DType::F32, &device)?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}

#[cfg(test)]
mod model_folder_tests {
    use super::*;

    #[test]
    fn extra_model_paths_add_folders_as_comfyui_reads_them() {
        let dir = crate::video::TempDir::new("extra-paths");
        let root = dir.0.join("ComfyUI");
        let models = root.join("models");
        std::fs::create_dir_all(&models).unwrap();
        std::fs::write(
            root.join("extra_model_paths.yaml"),
            "# comment\na111:\n    base_path: /opt/webui/\n    checkpoints: models/Stable-diffusion\n    \
             loras: |\n         models/Lora\n         models/LyCORIS\n\nmine:\n    animatediff_models: motion\n",
        )
        .unwrap();
        assert_eq!(
            model_search_dirs(&models, &["checkpoints"]),
            [
                models.join("checkpoints"),
                PathBuf::from("/opt/webui/models/Stable-diffusion")
            ]
        );
        assert_eq!(
            model_search_dirs(&models, &["loras"])[1..],
            [
                PathBuf::from("/opt/webui/models/Lora"),
                PathBuf::from("/opt/webui/models/LyCORIS")
            ]
        );
        assert_eq!(
            model_search_dirs(&models, &["animatediff_models"])[1],
            root.join("motion")
        );
        std::fs::write(root.join("extra_model_paths.yaml"), "{ not: [yaml").unwrap();
        assert_eq!(model_search_dirs(&models, &["vae"]), [models.join("vae")]);
    }
}
