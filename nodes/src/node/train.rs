//! Training nodes: `MotionCustomize` (VMC: the motion of one clip into a motion module's
//! temporal attention) and `LoadMotionPatch`, which applies a saved result.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::schedulers::{DdimScheduler, DdimSchedulerConfig, Scheduler};
use crate::train::{self, AdamWConfig, Checkpointing, LrSchedule};
use crate::video::io::{resolve_prefix, save_atomically, MediaError};
use crate::video::vmc::{self, MotionLoss, VmcData, VmcSettings};

use super::editing::source_latents;
use super::models::{encode_text, resolve_model};
use super::objects::{Clip, Model, Vae};
use super::sampler::encode_frames;
use super::{
    cancelled_or, check_filename_prefix, file_entry, save_failure, Context, DescriptorBuilder,
    ForInput, Images, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(MotionCustomize), Box::new(LoadMotionPatch)]
}

/// Where saved motion patches are looked for, under the models folder (after the output folder,
/// where `MotionCustomize` writes them).
const MOTION_PATCH_FOLDERS: &[&str] = &["motion_patches"];

/// Frames encoded at once when the clip comes as images.
const ENCODE_CHUNK: usize = 8;

struct MotionCustomize;

impl MotionCustomize {
    /// The clip's latents: `latent`, or `images` through `vae`; exactly one of the two.
    fn clip_latents(inputs: &Inputs, ctx: &Context, model: &Model) -> Result<Tensor, NodeFailure> {
        let latent: Option<Latent> = inputs.optional_object("latent")?;
        let images: Option<Images> = inputs.optional_object("images")?;
        let (latents, input) = match (latent, images) {
            (Some(latent), None) => (source_latents(model, &latent, "latent")?, "latent"),
            (None, Some(images)) => {
                let Some(vae) = inputs.optional_object::<Vae>("vae")? else {
                    return Err(NodeFailure::input(
                        "vae",
                        "frames given as `images` need a VAE to encode them",
                    ));
                };
                let samples = encode_frames(ctx, &vae, &images, ENCODE_CHUNK, "images")?;
                (
                    source_latents(model, &Latent { samples }, "images")?,
                    "images",
                )
            }
            (Some(_), Some(_)) => {
                return Err(NodeFailure::input(
                    "images",
                    "give the clip as `latent` or as `images`, not both",
                ))
            }
            (None, None) => {
                return Err(NodeFailure::input(
                    "latent",
                    "no clip: connect `latent` or `images`",
                ))
            }
        };
        let frames = latents.dim(2)?;
        if frames < 2 {
            return Err(NodeFailure::input(
                input,
                format!("a clip of {frames} frame has no motion to learn; give 2 frames or more"),
            ));
        }
        if let Some(max) = model.unet.max_frames() {
            if frames > max {
                return Err(NodeFailure::input(
                    input,
                    format!("{frames} frames; the motion module sees at most {max} at once"),
                ));
            }
        }
        Ok(latents)
    }

    fn settings(inputs: &Inputs) -> Result<VmcSettings, NodeFailure> {
        let steps = inputs.usize("steps")? as u64;
        let loss: MotionLoss = inputs
            .string("loss")?
            .parse()
            .map_err(|e| NodeFailure::input("loss", e))?;
        let schedule = LrSchedule::named(
            inputs.string("lr_schedule").unwrap_or("constant"),
            inputs.usize_or("warmup_steps", 0)? as u64,
            steps,
        )
        .map_err(|e| NodeFailure::input("lr_schedule", e))?;
        let max_grad_norm = inputs.float_or("max_grad_norm", 1.0)?;
        let settings = VmcSettings {
            steps,
            learning_rate: inputs.float("learning_rate")?,
            loss,
            seed: inputs.seed("seed")?,
            optimizer: AdamWConfig {
                weight_decay: inputs.float_or("weight_decay", 0.01)?,
                max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
                ..AdamWConfig::default()
            },
            schedule,
            checkpoint_every: inputs.usize_or("checkpoint_every", 50)? as u64,
        };
        if settings.learning_rate.is_nan() || settings.learning_rate <= 0.0 {
            return Err(NodeFailure::input("learning_rate", "must be positive"));
        }
        settings
            .optimizer
            .validate()
            .map_err(NodeFailure::execution)?;
        Ok(settings)
    }
}

/// A fingerprint of the clip and the prompt, so that a saved state resumes only the same data.
fn data_fingerprint(latents: &Tensor, text: &Tensor) -> Result<String, NodeFailure> {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    for tensor in [latents, text] {
        tensor.dims().hash(&mut hasher);
        for value in tensor
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?
        {
            value.to_bits().hash(&mut hasher);
        }
    }
    Ok(format!("{:016x}", hasher.finish()))
}

impl Node for MotionCustomize {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("MotionCustomize", "Motion Customize (VMC)", "vdm/training")
            .description(
                "VMC: learns the motion of one clip by fine-tuning only the Q, K and V projections of \
                 the motion module's temporal attention, so that the frame-to-frame residuals of the \
                 predicted noise follow those of the true noise. Writes the tuned projections as a \
                 small safetensors patch (and a training state beside it, from which an interrupted \
                 run resumes) and outputs the model with the patch applied. Then invert the clip \
                 with that model and sample a new prompt.",
            )
            .object("model", "MODEL", "The model with its motion module applied.")
            .object("clip", "CLIP", "The text encoder of the prompt.")
            .text("prompt", "", "An appearance-invariant prompt: what moves and how (\"a bird is flying\"), not how it looks.")
            .int("steps", 400, 1, 100_000, "Training steps (the paper: 400).")
            .float("learning_rate", 1e-4, (0.0, 1.0, 0.00001), "AdamW's learning rate (the paper: 1e-4).")
            .combo("loss", &MotionLoss::NAMES, "paper: 1 − cos of the frame residuals of the noise, over C·H·W; official: the released code's (absolute residuals, cosine along the frames); l2: the ᾱ-weighted squared error of the residuals.")
            .seed("seed", "Seed of the timesteps and noise of every step.")
            .string("filename_prefix", "vmc/motion", "File name prefix of the patch in the output folder; may contain subfolders.")
            .optional()
            .object("latent", "LATENT", "The clip as latents (VAE Encode); or give `images` and `vae`.")
            .object("images", "IMAGE", "The clip as frames, encoded with `vae`.")
            .object("vae", "VAE", "Encodes `images`.")
            .int("clip_skip", 1, 1, 12, "1: the text encoder's last layer; 2: the penultimate.")
            .float("weight_decay", 0.01, (0.0, 1.0, 0.001), "AdamW's decoupled weight decay.")
            .float("max_grad_norm", 1.0, (0.0, 1000.0, 0.1), "Gradients are clipped to this global norm; 0 does not clip.")
            .combo("lr_schedule", &LrSchedule::NAMES, "constant, or a half cosine to 0 at the last step; both after the warm-up.")
            .int("warmup_steps", 0, 0, 100_000, "Steps of linear warm-up from 0.")
            .int("checkpoint_every", 50, 0, 100_000, "Save the training state every this many steps (and at the end); 0: only at the end.")
            .output("MODEL", "MODEL")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        let mut failures = check_filename_prefix(inputs, ctx);
        if let Ok(prompt) = inputs.string("prompt") {
            if prompt.trim().is_empty() {
                failures.push(empty_prompt());
            }
        }
        failures
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        if model.unet.motion().is_none() {
            return Err(NodeFailure::input(
                "model",
                "the model has no motion module: apply one first (Apply Motion Module)",
            ));
        }
        let prompt = inputs.string("prompt")?;
        if prompt.trim().is_empty() {
            return Err(empty_prompt());
        }
        let settings = Self::settings(inputs)?;
        let latents = Self::clip_latents(inputs, ctx, &model)?;
        let clip: Clip = inputs.object("clip")?;
        let clip_skip = inputs.usize_or("clip_skip", clip.clip_skip)?;
        let text = encode_text(&clip, prompt, clip_skip, "prompt")?
            .to_device(latents.device())?
            .to_dtype(DType::F32)?;
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;

        let out_dir = ctx.output_dir();
        let prefix = inputs.string("filename_prefix")?;
        let (folder, name) = resolve_prefix(&out_dir, prefix).map_err(save_failure)?;
        let checkpointing = Checkpointing {
            path: folder.join(format!("{name}.vmc-state.safetensors")),
            run: format!(
                "{} data {}",
                settings.describe_without_steps(),
                data_fingerprint(&latents, &text)?
            ),
        };
        let data = VmcData {
            latents: &latents,
            text: &text,
            alphas_cumprod: scheduler.alphas_cumprod(),
        };
        let tuned = vmc::customize_motion(
            &model.unet,
            &data,
            &settings,
            Some(&checkpointing),
            |report| {
                ctx.progress(report.step, report.steps, &report.summary());
                ctx.check_cancelled()
                    .map_err(|_| candle_core::Error::Msg("cancelled".into()))
            },
        )
        .map_err(|e| cancelled_or(ctx, e))?;

        let loss_csv = folder.join(format!("{name}.vmc-loss.csv"));
        train::write_loss_csv(&loss_csv, &tuned.losses)?;
        let patch_path = save_patch(&tuned.patch, &out_dir, prefix).map_err(save_failure)?;
        let unet = model
            .unet
            .with_weights(tuned.patch)
            .map_err(|e| NodeFailure::input("model", e))?;
        Ok(Outputs {
            values: vec![model.with_unet(unet).into_value()],
            ui: Some(json!({
                "loss": tuned.losses,
                "patch": [file_entry(&out_dir, &patch_path)],
                "loss_csv": [file_entry(&out_dir, &loss_csv)],
                "resumed_at_step": [tuned.resumed_at],
            })),
        })
    }
}

fn empty_prompt() -> NodeFailure {
    NodeFailure::input(
        "prompt",
        "the prompt is empty: describe the motion (\"a bird is flying\")",
    )
}

/// Writes `patch` as safetensors to the next free `{prefix}_{counter:05}_.safetensors`.
fn save_patch(
    patch: &crate::models::weights::NamedWeights,
    out_dir: &Path,
    prefix: &str,
) -> Result<PathBuf, MediaError> {
    let tensors: Vec<(String, Tensor)> = patch
        .iter()
        .map(|(key, tensor)| {
            Ok((
                key.clone(),
                tensor.to_device(&candle_core::Device::Cpu)?.contiguous()?,
            ))
        })
        .collect::<candle_core::Result<_>>()?;
    let bytes =
        safetensors::serialize(tensors, None).map_err(|e| MediaError::Invalid(e.to_string()))?;
    save_atomically(out_dir, prefix, "safetensors", |temp| {
        std::fs::write(temp, &bytes).map_err(|source| MediaError::Io {
            path: temp.to_path_buf(),
            source,
        })
    })
}

struct LoadMotionPatch;

impl LoadMotionPatch {
    /// The patch file: a path, a file in the output folder (where `MotionCustomize` writes), or
    /// one under `<models>/motion_patches/`.
    fn path(inputs: &Inputs, ctx: &Context) -> Result<PathBuf, NodeFailure> {
        let name = inputs.string("patch_name")?;
        let in_output = ctx.output_dir().join(name);
        let climbs = name.split(['/', '\\']).any(|part| part == "..");
        if !climbs && !name.trim().is_empty() && in_output.is_file() {
            return Ok(in_output);
        }
        resolve_model(ctx, "patch_name", MOTION_PATCH_FOLDERS, name)
    }
}

impl Node for LoadMotionPatch {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadMotionPatch", "Load Motion Patch", "vdm/training")
            .description(
                "Applies a motion patch written by Motion Customize (tuned temporal-attention Q/K/V) to \
                 a model with the same motion module. Names are looked up as paths, then in the output \
                 folder, then under <models>/motion_patches/.",
            )
            .object("model", "MODEL", "The model with the motion module the patch was trained on.")
            .string("patch_name", "", "The patch file (.safetensors).")
            .output("MODEL", "MODEL")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        match inputs.get("patch_name") {
            Some(vdm_ffi::Value::Str(_)) => Self::path(inputs, ctx).err().into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let path = Self::path(inputs, ctx)?;
        let patch = vmc::load_motion_patch(&path, &model.unet).for_input("patch_name")?;
        let unet = model
            .unet
            .with_weights(patch)
            .map_err(|e| NodeFailure::input("patch_name", e))?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}
