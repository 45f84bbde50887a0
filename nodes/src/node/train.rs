//! Training nodes: `MotionCustomize` (VMC: the motion of one clip into a motion module's
//! temporal attention) and `LoadMotionPatch`, which applies a saved result;
//! `TrainTemporalAdapter` (Hong & Quan's lightweight temporal modules, trained on a folder of
//! clips) and `LoadTemporalAdapter`, which applies a saved adapter.

use std::hash::{Hash, Hasher};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::models::temporal_adapter::{save_weights, TemporalAdapter, TemporalAdapterConfig};
use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
use crate::train::{self, AdamWConfig, Checkpointing, LrSchedule};
use crate::video::io::{
    frame_folder_files, natural_cmp, resize_frames, resolve_prefix, save_atomically, LoadOptions,
    MediaError, FFMPEG_VIDEO_EXTENSIONS,
};
use crate::video::noise::NoiseMode;
use crate::video::temporal_training::{
    self, TemporalTrainingData, TemporalTrainingSettings, TrainingClip,
};
use crate::video::vmc::{self, MotionLoss, VmcData, VmcSettings};

use super::editing::source_latents;
use super::models::{encode_text, resolve_model};
use super::objects::{Clip, Model, Vae};
use super::sampler::encode_frames;
use super::video_io::load_frames;
use super::{
    cancelled_or, check_filename_prefix, file_entry, resolve_input_path, save_failure, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(MotionCustomize),
        Box::new(LoadMotionPatch),
        Box::new(TrainTemporalAdapter),
        Box::new(LoadTemporalAdapter),
    ]
}

/// Where saved motion patches are looked for, under the models folder (after the output folder,
/// where `MotionCustomize` writes them).
const MOTION_PATCH_FOLDERS: &[&str] = &["motion_patches"];

/// Frames encoded at once when the clip comes as images.
const ENCODE_CHUNK: usize = 8;

/// The optimiser inputs both training nodes take: `learning_rate`, and the optional
/// `weight_decay`, `max_grad_norm`, `lr_schedule`, `warmup_steps` and `checkpoint_every`.
struct OptimiserInputs {
    learning_rate: f64,
    optimizer: AdamWConfig,
    schedule: LrSchedule,
    checkpoint_every: u64,
}

impl OptimiserInputs {
    /// Declares the optional inputs; `most` bounds the step counts, `checkpoint_every` is the
    /// default save interval.
    fn declare(builder: DescriptorBuilder, most: i64, checkpoint_every: i64) -> DescriptorBuilder {
        builder
            .float("weight_decay", 0.01, (0.0, 1.0, 0.001), "AdamW's decoupled weight decay.")
            .float("max_grad_norm", 1.0, (0.0, 1000.0, 0.1), "Gradients are clipped to this global norm; 0 does not clip.")
            .combo("lr_schedule", &LrSchedule::NAMES, "constant, or a half cosine to 0 at the last step; both after the warm-up.")
            .int("warmup_steps", 0, 0, most, "Steps of linear warm-up from 0.")
            .int("checkpoint_every", checkpoint_every, 0, most, "Save the training state every this many steps (and at the end); 0: only at the end.")
    }

    /// The inputs of a run of `steps` steps; `checkpoint_every` is the default save interval.
    fn read(inputs: &Inputs, steps: u64, checkpoint_every: u64) -> Result<Self, NodeFailure> {
        let schedule_name = match inputs.get("lr_schedule") {
            Some(_) => inputs.string("lr_schedule")?,
            None => "constant",
        };
        let schedule = LrSchedule::named(
            schedule_name,
            inputs.usize_or("warmup_steps", 0)? as u64,
            steps,
        )
        .map_err(|e| NodeFailure::input("lr_schedule", e))?;
        let learning_rate = inputs.float("learning_rate")?;
        if learning_rate.is_nan() || learning_rate <= 0.0 {
            return Err(NodeFailure::input("learning_rate", "must be positive"));
        }
        let max_grad_norm = inputs.float_or("max_grad_norm", 1.0)?;
        let optimizer = AdamWConfig {
            weight_decay: inputs.float_or("weight_decay", 0.01)?,
            max_grad_norm: (max_grad_norm > 0.0).then_some(max_grad_norm),
            ..AdamWConfig::default()
        };
        optimizer.validate().map_err(NodeFailure::execution)?;
        Ok(Self {
            learning_rate,
            optimizer,
            schedule,
            checkpoint_every: inputs.usize_or("checkpoint_every", checkpoint_every as usize)?
                as u64,
        })
    }
}

/// Where a training run keeps its state and its losses: beside its output, named after the
/// `filename_prefix` without a counter, so that a rerun finds them.
struct RunFiles {
    state: PathBuf,
    loss_csv: PathBuf,
}

impl RunFiles {
    /// `{prefix}.{kind}-state.safetensors` and `{prefix}.{kind}-loss.csv` in the output folder.
    fn of(out_dir: &Path, prefix: &str, kind: &str) -> Result<Self, NodeFailure> {
        let (folder, name) = resolve_prefix(out_dir, prefix).map_err(save_failure)?;
        Ok(Self {
            state: folder.join(format!("{name}.{kind}-state.safetensors")),
            loss_csv: folder.join(format!("{name}.{kind}-loss.csv")),
        })
    }
}

/// Reports each training step as progress, and stops the run once the user cancels.
fn report_steps<'c>(ctx: &'c Context<'_>) -> Box<train::OnStep<'c>> {
    Box::new(move |report| {
        ctx.progress(report.step, report.steps, &report.summary());
        ctx.check_cancelled()
            .map_err(|_| candle_core::Error::Msg("cancelled".into()))
    })
}

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
        let optimiser = OptimiserInputs::read(inputs, steps, 50)?;
        Ok(VmcSettings {
            steps,
            learning_rate: optimiser.learning_rate,
            loss,
            seed: inputs.seed("seed")?,
            optimizer: optimiser.optimizer,
            schedule: optimiser.schedule,
            checkpoint_every: optimiser.checkpoint_every,
        })
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
        let builder = DescriptorBuilder::new("MotionCustomize", "Motion Customize (VMC)", "vdm/training")
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
            .int("clip_skip", 1, 1, 12, "1: the text encoder's last layer; 2: the penultimate.");
        OptimiserInputs::declare(builder, 100_000, 50)
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
        let files = RunFiles::of(&out_dir, prefix, "vmc")?;
        let checkpointing = Checkpointing {
            path: files.state,
            run: format!(
                "{} data {}",
                settings.describe_without_steps(),
                data_fingerprint(&latents, &text)?
            ),
        };
        let data = VmcData {
            latents: &latents,
            text: &text,
            noise_schedule: &scheduler,
        };
        let tuned = vmc::customize_motion(
            &model.unet,
            &data,
            &settings,
            Some(&checkpointing),
            report_steps(ctx),
        )
        .map_err(|e| cancelled_or(ctx, e))?;

        train::write_loss_csv(&files.loss_csv, &tuned.losses)?;
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
                "loss_csv": [file_entry(&out_dir, &files.loss_csv)],
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

/// The file a training node wrote, named by `input`: a path, a file in the output folder
/// (where the training nodes write), or one under the models folders `folders`.
fn trained_file(
    inputs: &Inputs,
    ctx: &Context,
    input: &str,
    folders: &[&str],
) -> Result<PathBuf, NodeFailure> {
    let name = inputs.string(input)?;
    let in_output = ctx.output_dir().join(name);
    let climbs = name.split(['/', '\\']).any(|part| part == "..");
    if !climbs && !name.trim().is_empty() && in_output.is_file() {
        return Ok(in_output);
    }
    resolve_model(ctx, input, folders, name)
}

struct LoadMotionPatch;

impl LoadMotionPatch {
    /// The patch file: a path, a file in the output folder (where `MotionCustomize` writes), or
    /// one under `<models>/motion_patches/`.
    fn path(inputs: &Inputs, ctx: &Context) -> Result<PathBuf, NodeFailure> {
        trained_file(inputs, ctx, "patch_name", MOTION_PATCH_FOLDERS)
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

/// Where `LoadTemporalAdapter` looks for adapters under the models folder (after a path and the
/// output folder, where `TrainTemporalAdapter` writes them); the injector's folder too.
const TEMPORAL_ADAPTER_FOLDERS: &[&str] = &["temporal_adapters"];

/// Whether the file at `path` is a clip: a GIF, or a video that `ffmpeg` reads.
fn is_clip_file(path: &Path) -> bool {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    extension == "gif" || FFMPEG_VIDEO_EXTENSIONS.contains(&extension.as_str())
}

/// The clips of `folder`, in natural order of their names: folders of PNG/JPEG frames, GIFs
/// and videos; hidden entries and every other file (notes, captions, stills) are skipped.
fn clip_paths(folder: &Path) -> Result<Vec<PathBuf>, NodeFailure> {
    let entries = std::fs::read_dir(folder).map_err(|e| {
        NodeFailure::input(
            "clips",
            format!("cannot read the clip folder {}: {e}", folder.display()),
        )
    })?;
    let mut clips = Vec::new();
    for entry in entries {
        let path = entry
            .map_err(|e| NodeFailure::input("clips", format!("{}: {e}", folder.display())))?
            .path();
        let hidden = path
            .file_name()
            .is_some_and(|name| name.to_string_lossy().starts_with('.'));
        let is_clip = if path.is_dir() {
            frame_folder_files(&path).is_ok()
        } else {
            is_clip_file(&path)
        };
        if is_clip && !hidden {
            clips.push(path);
        }
    }
    let name = |p: &PathBuf| {
        p.file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default()
    };
    clips.sort_by(|a, b| natural_cmp(&name(a), &name(b)));
    Ok(clips)
}

/// The caption of a clip: the text of `<clip name>.txt` beside it (`walk.gif` → `walk.txt`, a
/// frame folder `walk/` → `walk.txt`), when there is one.
fn clip_caption(clip: &Path) -> Result<Option<String>, NodeFailure> {
    let caption = clip.with_extension("txt");
    if !caption.is_file() {
        return Ok(None);
    }
    std::fs::read_to_string(&caption)
        .map(|text| Some(text.trim().to_string()))
        .map_err(|e| NodeFailure::input("clips", format!("{}: {e}", caption.display())))
}

struct TrainTemporalAdapter;

impl TrainTemporalAdapter {
    fn settings(inputs: &Inputs) -> Result<TemporalTrainingSettings, NodeFailure> {
        let defaults = TemporalTrainingSettings::default();
        let steps = inputs.usize("steps")? as u64;
        let noise: NoiseMode = match inputs.get("noise") {
            Some(_) => inputs
                .string("noise")?
                .parse()
                .map_err(|e| NodeFailure::input("noise", e))?,
            None => defaults.noise,
        };
        let correlation = inputs.float_or("correlation", defaults.correlation)?;
        if noise != NoiseMode::Independent && !(0.0..1.0).contains(&correlation) {
            return Err(NodeFailure::input(
                "correlation",
                format!("{correlation} is outside [0, 1)"),
            ));
        }
        let optimiser = OptimiserInputs::read(inputs, steps, 100)?;
        let settings = TemporalTrainingSettings {
            steps,
            learning_rate: optimiser.learning_rate,
            frames: inputs.usize("frames")?,
            seed: inputs.seed("seed")?,
            noise,
            correlation,
            optimizer: optimiser.optimizer,
            schedule: optimiser.schedule,
            checkpoint_every: optimiser.checkpoint_every,
        };
        if settings.frames < 2 {
            return Err(NodeFailure::input(
                "frames",
                "windows of fewer than 2 frames have no motion to learn",
            ));
        }
        let most = TemporalAdapterConfig::DEFAULT_MAX_FRAMES;
        if settings.frames > most {
            return Err(NodeFailure::input(
                "frames",
                format!(
                    "{}; the temporal adapter sees at most {most} frames at once",
                    settings.frames
                ),
            ));
        }
        settings
            .optimizer
            .validate()
            .map_err(NodeFailure::execution)?;
        Ok(settings)
    }

    /// The frame size clips are cropped and resized to: `width`×`height`, which the VAE and the
    /// UNet's downsampling must divide.
    fn frame_size(
        inputs: &Inputs,
        model: &Model,
        vae: &Vae,
    ) -> Result<(usize, usize), NodeFailure> {
        let levels = model.unet.base().config().block_out_channels.len();
        let multiple = vae.model.config().spatial_scale() << levels.saturating_sub(1);
        let mut size = [0; 2];
        for (slot, input) in size.iter_mut().zip(["width", "height"]) {
            let value = inputs.usize_or(input, 256)?;
            if value == 0 || value % multiple != 0 {
                return Err(NodeFailure::input(
                    input,
                    format!(
                        "{value} pixels; the VAE and the UNet need a positive multiple of {multiple}"
                    ),
                ));
            }
            *slot = value;
        }
        Ok((size[0], size[1]))
    }

    /// Every clip of the `clips` folder loaded, cropped and resized to `width`×`height`,
    /// VAE-encoded once, with the embeddings of its caption (else `prompt`).
    fn encode_clips(
        inputs: &Inputs,
        ctx: &Context,
        model: &Model,
        frames: usize,
    ) -> Result<Vec<TrainingClip>, NodeFailure> {
        let vae: Vae = inputs.object("vae")?;
        let clip_encoder: Clip = inputs.object("clip")?;
        let (width, height) = Self::frame_size(inputs, model, &vae)?;
        let given = inputs.string("clips")?;
        let folder = resolve_input_path(ctx, given);
        if !folder.is_dir() {
            return Err(NodeFailure::input(
                "clips",
                format!(
                    "`{given}` is not a folder of clips (looked at {})",
                    folder.display()
                ),
            ));
        }
        let paths = clip_paths(&folder)?;
        if paths.is_empty() {
            return Err(NodeFailure::input(
                "clips",
                format!(
                    "{} holds no clips (folders of PNG/JPEG frames, GIFs, or videos: {})",
                    folder.display(),
                    FFMPEG_VIDEO_EXTENSIONS.join(", ")
                ),
            ));
        }
        let prompt = match inputs.get("prompt") {
            Some(_) => inputs.string("prompt")?,
            None => "",
        };
        let clip_skip = inputs.usize_or("clip_skip", clip_encoder.clip_skip)?;
        let base = model.unet.base();
        let mut texts: std::collections::HashMap<String, Tensor> = Default::default();
        let mut clips = Vec::with_capacity(paths.len());
        for path in paths {
            let (loaded, _) = load_frames(ctx, "clips", &path, LoadOptions::default())?;
            let count = loaded.dim(0)?;
            if count < 2 {
                return Err(NodeFailure::input(
                    "clips",
                    format!(
                        "{} has {count} frame; a clip needs 2 frames or more to show motion",
                        path.display()
                    ),
                ));
            }
            if count < frames {
                return Err(NodeFailure::input(
                    "clips",
                    format!(
                        "{} has {count} frames, fewer than the {frames} of a training window \
                         (lower `frames` or remove the clip)",
                        path.display()
                    ),
                ));
            }
            let resized = resize_frames(&loaded, width, height)?;
            let latents = encode_frames(
                ctx,
                &vae,
                &Images { frames: resized },
                ENCODE_CHUNK,
                "clips",
            )?
            .to_device(base.device())?
            .to_dtype(DType::F32)?;
            let caption = clip_caption(&path)?.unwrap_or_else(|| prompt.to_string());
            let text = match texts.get(&caption) {
                Some(text) => text.clone(),
                None => {
                    let text = encode_text(&clip_encoder, &caption, clip_skip, "prompt")?
                        .to_device(base.device())?
                        .to_dtype(DType::F32)?;
                    texts.insert(caption, text.clone());
                    text
                }
            };
            clips.push(TrainingClip { latents, text });
        }
        Ok(clips)
    }
}

impl Node for TrainTemporalAdapter {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let builder = DescriptorBuilder::new("TrainTemporalAdapter", "Train Temporal Adapter", "vdm/training")
            .description(
                "Trains Hong & Quan's lightweight motion-adaptive temporal modules (one small temporal \
                 attention after every spatial transformer, global in the down and mid blocks, biased \
                 by −λ_max·m·|i − j| in the up blocks, gated by sigmoid(a·m + b)) on a folder of clips, \
                 the image UNet frozen: each step takes a window of `frames` frames of one clip, a \
                 timestep and noise, and the plain ε-prediction MSE. m is estimated in every forward as \
                 the Temporal Attention Injector does. Motion modules on the model stay frozen and the \
                 adapter is trained on top of them; an adapter already applied is replaced. Writes the adapter as safetensors (and a training \
                 state beside it, from which an interrupted run resumes) and outputs the model with \
                 the adapter applied; sample it through the Temporal Attention Injector, whose m drives \
                 the adapter's bias and gates.",
            )
            .object("model", "MODEL", "The image model (its UNet stays frozen).")
            .object("clip", "CLIP", "The text encoder of the prompt and the captions.")
            .object("vae", "VAE", "Encodes the clips' frames, once, before training.")
            .string("clips", "clips", "A folder (absolute, or under the input folder) whose entries are clips: folders of PNG/JPEG frames, GIFs, or videos through ffmpeg; other files are skipped. A `<clip name>.txt` beside a clip is its caption.")
            .int("steps", 2000, 1, 1_000_000, "Training steps.")
            .float("learning_rate", 1e-4, (0.0, 1.0, 0.00001), "AdamW's learning rate.")
            .int("frames", 16, 2, 32, "Frames of every training window, consecutive frames of one clip.")
            .seed("seed", "Seed of the adapter's initialisation and of every step's clip, window, timestep and noise.")
            .string("filename_prefix", "temporal_adapters/adapter", "File name prefix of the adapter in the output folder; may contain subfolders.")
            .optional()
            .text("prompt", "", "The prompt of clips without a caption; empty trains unconditionally.")
            .int("width", 256, 8, 4096, "Frames are centre-cropped to this aspect and resized to this width.")
            .int("height", 256, 8, 4096, "… and this height.")
            .combo("noise", &NoiseMode::NAMES, "independent: noise of its own per frame; mixed: a shared component, correlation ρ between any two frames; progressive: AR(1), ρ^|i − j|.")
            .float("correlation", 0.0, (0.0, 0.99, 0.01), "ρ of mixed or progressive noise.")
            .int("clip_skip", 1, 1, 12, "1: the text encoder's last layer; 2: the penultimate.");
        OptimiserInputs::declare(builder, 1_000_000, 100)
            .output("MODEL", "MODEL")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        let mut failures = check_filename_prefix(inputs, ctx);
        if let Some(vdm_ffi::Value::Str(given)) = inputs.get("clips") {
            let folder = resolve_input_path(ctx, given);
            if !folder.is_dir() {
                failures.push(NodeFailure::input(
                    "clips",
                    format!(
                        "`{given}` is not a folder of clips (looked at {})",
                        folder.display()
                    ),
                ));
            }
        }
        failures
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let settings = Self::settings(inputs)?;
        if let Some(max) = model.unet.max_frames() {
            if settings.frames > max {
                return Err(NodeFailure::input(
                    "frames",
                    format!(
                        "{}; the model's motion modules see at most {max} frames at once",
                        settings.frames
                    ),
                ));
            }
        }
        let clips = Self::encode_clips(inputs, ctx, &model, settings.frames)?;
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;

        let out_dir = ctx.output_dir();
        let prefix = inputs.string("filename_prefix")?;
        let files = RunFiles::of(&out_dir, prefix, "temporal")?;
        let mut fingerprint = std::collections::hash_map::DefaultHasher::new();
        for clip in &clips {
            data_fingerprint(&clip.latents, &clip.text)?.hash(&mut fingerprint);
        }
        let checkpointing = Checkpointing {
            path: files.state,
            run: format!(
                "{} data {:016x}",
                settings.describe_without_steps(),
                fingerprint.finish()
            ),
        };
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &scheduler,
        };
        let trained = temporal_training::train_temporal_adapter(
            &model.unet,
            &data,
            &settings,
            Some(&checkpointing),
            report_steps(ctx),
        )
        .map_err(|e| cancelled_or(ctx, e))?;

        train::write_loss_csv(&files.loss_csv, &trained.losses)?;
        let adapter_path = save_atomically(&out_dir, prefix, "safetensors", |temp| {
            save_weights(&trained.config, &trained.weights, temp).map_err(|e| MediaError::Encode {
                path: temp.to_path_buf(),
                message: e.to_string(),
            })
        })
        .map_err(save_failure)?;
        let adapter = trained.adapter(model.unet.base().dtype())?;
        let unet = model
            .unet
            .with_temporal_adapter(Arc::new(adapter))
            .map_err(|e| NodeFailure::input("model", e))?;
        Ok(Outputs {
            values: vec![model.with_unet(unet).into_value()],
            ui: Some(json!({
                "loss": trained.losses,
                "adapter": [file_entry(&out_dir, &adapter_path)],
                "loss_csv": [file_entry(&out_dir, &files.loss_csv)],
                "resumed_at_step": [trained.resumed_at],
            })),
        })
    }
}

struct LoadTemporalAdapter;

impl LoadTemporalAdapter {
    /// The adapter file: a path, a file in the output folder (where `TrainTemporalAdapter`
    /// writes), or one under `<models>/temporal_adapters/`.
    fn path(inputs: &Inputs, ctx: &Context) -> Result<PathBuf, NodeFailure> {
        trained_file(inputs, ctx, "adapter_name", TEMPORAL_ADAPTER_FOLDERS)
    }
}

impl Node for LoadTemporalAdapter {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadTemporalAdapter", "Load Temporal Adapter", "vdm/training")
            .description(
                "Applies a temporal adapter written by Train Temporal Adapter to a model with the \
                 UNet it was trained on. Names are looked up as paths, then in the output folder, \
                 then under <models>/temporal_adapters/. m is 0 until a Temporal Attention Injector \
                 gives it (a measured motion, an override, or the estimate).",
            )
            .object("model", "MODEL", "The model with the image UNet the adapter was trained on.")
            .string("adapter_name", "", "The adapter file (.safetensors).")
            .output("MODEL", "MODEL")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        match inputs.get("adapter_name") {
            Some(vdm_ffi::Value::Str(_)) => Self::path(inputs, ctx).err().into_iter().collect(),
            _ => Vec::new(),
        }
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let path = Self::path(inputs, ctx)?;
        let base = model.unet.base();
        let adapter = TemporalAdapter::load(&path, base.config(), base.dtype(), base.device())
            .for_input("adapter_name")?;
        let unet = model
            .unet
            .with_temporal_adapter(Arc::new(adapter))
            .map_err(|e| NodeFailure::input("adapter_name", e))?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_gif(path: &Path, frames: u32) {
        let file = std::fs::File::create(path).unwrap();
        let mut encoder = image::codecs::gif::GifEncoder::new(file);
        for f in 0..frames {
            let img = image::RgbaImage::from_fn(4, 4, |x, _| {
                image::Rgba([(x * 40 + f * 10) as u8, 0, 0, 255])
            });
            encoder.encode_frame(image::Frame::new(img)).unwrap();
        }
    }

    #[test]
    fn a_clip_folder_lists_frame_folders_gifs_and_videos_in_natural_order_and_their_captions() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        write_gif(&root.join("walk10.gif"), 2);
        write_gif(&root.join("walk2.gif"), 2);
        std::fs::write(root.join("walk2.txt"), "  a man walking \n").unwrap();
        std::fs::write(root.join("notes.txt"), "not a clip").unwrap();
        std::fs::write(root.join("still.png"), b"a still is no clip").unwrap();
        std::fs::write(root.join(".walk3.gif"), b"hidden").unwrap();
        std::fs::write(root.join("ride.MP4"), b"read through ffmpeg").unwrap();
        let frames = root.join("frames");
        std::fs::create_dir_all(&frames).unwrap();
        image::RgbImage::new(4, 4)
            .save(frames.join("0001.png"))
            .unwrap();
        std::fs::create_dir_all(root.join("empty")).unwrap();

        let names: Vec<String> = clip_paths(root)
            .unwrap()
            .iter()
            .map(|p| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["frames", "ride.MP4", "walk2.gif", "walk10.gif"]);
        assert_eq!(
            clip_caption(&root.join("walk2.gif")).unwrap().as_deref(),
            Some("a man walking")
        );
        assert_eq!(clip_caption(&root.join("walk10.gif")).unwrap(), None);
        assert_eq!(clip_caption(&frames).unwrap(), None);
    }
}
