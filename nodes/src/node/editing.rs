//! Video editing nodes: `VideoInversion` (DDIM inversion of latents) and `EntropyEditor`
//! (text-guided editing with the source's low-entropy attention injected).

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::sampling::inversion::invert;
use crate::sampling::{ContextOptions, ContextWindows, NoisePredictor};
use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
use crate::video::editing::{edit_video, EditInputs, EditSettings};
use crate::video::noise::{video_noise, NoiseMode};

use super::memory;
use super::objects::{Conditioning, Model};
use super::sampler::check_steps;
use super::{
    cancelled_or, Context, DescriptorBuilder, ForInput, Inputs, Latent, Node, NodeFailure, Outputs,
    PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(VideoInversion), Box::new(EntropyEditor)]
}

/// Latents of one video that `model` can take, on its device: the channels it expects and a
/// size its down blocks divide evenly.
pub(super) fn source_latents(
    model: &Model,
    latent: &Latent,
    input: &str,
) -> Result<Tensor, NodeFailure> {
    let base = model.unet.base();
    let config = base.config();
    let latents = latent
        .samples
        .to_device(base.device())?
        .to_dtype(DType::F32)?;
    let (batch, channels, _, height, width) = latents.dims5().for_input(input)?;
    if batch != 1 {
        return Err(NodeFailure::input(
            input,
            format!("{batch} videos; one is edited at a time"),
        ));
    }
    if channels != config.in_channels {
        return Err(NodeFailure::input(
            input,
            format!(
                "{channels} latent channels, the model takes {}",
                config.in_channels
            ),
        ));
    }
    let factor = 1 << config.block_out_channels.len().saturating_sub(1);
    if height % factor != 0 || width % factor != 0 {
        return Err(NodeFailure::input(
            input,
            format!(
                "latents of {width}×{height} do not fit the model, which halves the size {} times \
                 (a multiple of {factor} is needed)",
                config.block_out_channels.len() - 1
            ),
        ));
    }
    Ok(latents)
}

/// One prompt's embeddings (1, S, D) on `device`.
fn prompt(inputs: &Inputs, name: &str, device: &Device) -> Result<Tensor, NodeFailure> {
    let conditioning: Conditioning = inputs.object(name)?;
    let embeddings = conditioning
        .embeddings
        .to_device(device)?
        .to_dtype(DType::F32)?;
    match embeddings.dims3().for_input(name)? {
        (1, _, _) => Ok(embeddings),
        (n, _, _) => Err(NodeFailure::input(name, format!("{n} prompts; give one"))),
    }
}

/// Refuses, as `input`'s error, sampling `videos` videos of `latents`' size (guided or not)
/// when it would exceed the memory budget.
fn check_memory(
    ctx: &Context,
    model: &Model,
    latents: &Tensor,
    (videos, guided): (usize, bool),
    input: &str,
) -> Result<(), NodeFailure> {
    let (_, channels, frames, height, width) = latents.dims5()?;
    let per_call = ContextOptions::needed_for(model.unet.max_frames(), frames)
        .map_or(frames, |options| options.length.min(frames));
    ctx.memory_budget(latents.device()).check(
        input,
        &format!("sampling {videos} × {frames} frames of {width}×{height} latents"),
        memory::sampling_estimate(
            &model.unet,
            videos,
            channels,
            frames,
            (height, width),
            per_call,
            guided,
        ),
    )
}

fn ddim() -> Result<DdimScheduler, NodeFailure> {
    Ok(DdimScheduler::new(DdimSchedulerConfig::sd15())?)
}

/// The check of a literal `steps`: that the DDIM schedule can place them.
fn check_ddim_steps(inputs: &Inputs) -> Vec<NodeFailure> {
    match inputs.usize("steps") {
        Ok(steps) => ddim()
            .and_then(|scheduler| check_steps(&scheduler, steps))
            .err()
            .into_iter()
            .collect(),
        Err(_) => Vec::new(),
    }
}

struct VideoInversion;

impl Node for VideoInversion {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VideoInversion", "Video Inversion", "vdm/editing")
            .description(
                "DDIM inversion: walks clean video latents up the schedule of `steps` steps with the \
                 model and prompt (no guidance), to the latents where sampling starts. Feed them to \
                 Video Sampler's `noise` (DDIM, the same steps, denoise 1) to sample back.",
            )
            .object("model", "MODEL", "The model, usually with a motion module applied.")
            .object("conditioning", "CONDITIONING", "The prompt that describes the video.")
            .object("latent", "LATENT", "The video's latents (VAE Encode).")
            .int("steps", 25, 1, 1000, "Steps of the DDIM schedule.")
            .output("LATENT", "LATENT")
            .build()
    }

    fn check(&self, inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        check_ddim_steps(inputs)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let latents = source_latents(&model, &inputs.object("latent")?, "latent")?;
        check_memory(ctx, &model, &latents, (1, false), "latent")?;
        let text = prompt(inputs, "conditioning", latents.device())?;
        let steps = inputs.usize("steps")?;
        let scheduler = ddim()?;
        let frames = latents.dim(2)?;
        let windows = ContextOptions::needed_for(model.unet.max_frames(), frames).map(|options| {
            ContextWindows {
                inner: &model.unet,
                options,
            }
        });
        let predictor: &dyn NoisePredictor = match &windows {
            Some(windows) => windows,
            None => &model.unet,
        };
        let mut on_step = |done: usize, total: usize| -> candle_core::Result<()> {
            ctx.progress(done as u64, total as u64, "inverting");
            ctx.check_cancelled()
                .map_err(|_| candle_core::Error::Msg("cancelled".into()))
        };
        let samples = invert(
            predictor,
            &scheduler,
            &latents,
            &text,
            steps,
            None,
            &mut on_step,
        )
        .map_err(|e| cancelled_or(ctx, e))?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}

struct EntropyEditor;

impl Node for EntropyEditor {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EntropyEditor", "Entropy Editor", "vdm/editing")
            .description(
                "Text-guided video editing: the source video is DDIM-inverted with its prompt while \
                 the attention entropy of every layer is measured; the source and the edit are then \
                 sampled together from the inverted latents, and in the self-attention layers of \
                 lowest entropy (the layout), for the first `inject_until` of the steps, the edit \
                 attends as the source does. Other layers, and later steps, follow the target prompt. \
                 Outputs the edit and the source's reconstruction.",
            )
            .object("model", "MODEL", "The model, usually with a motion module applied.")
            .object("source_latent", "LATENT", "The source video's latents (VAE Encode).")
            .object("source", "CONDITIONING", "A prompt that describes the source video.")
            .object("target", "CONDITIONING", "The prompt of the edit.")
            .object("negative", "CONDITIONING", "The negative prompt of both passes.")
            .int("steps", 25, 1, 1000, "DDIM steps of the inversion and of the edit.")
            .float("cfg", 7.5, (0.0, 100.0, 0.1), "Guidance scale of the edit (the inversion runs without).")
            .float("inject_until", 0.5, (0.0, 1.0, 0.01), "The share of steps, from the start, with the source's maps injected: higher keeps more of the source's layout and motion.")
            .float("low_entropy_percent", 0.4, (0.0, 1.0, 0.01), "The share of self-attention layers injected, lowest entropy first.")
            .seed("seed", "Seed of the fresh noise that noise_blend mixes in.")
            .optional()
            .float("noise_blend", 0.0, (0.0, 1.0, 0.01), "β of the start latents √(1 − β)·z_T + √β·ε: fresh noise gives the edit more freedom; 0 starts from the inversion exactly.")
            .output("LATENT", "edited")
            .output("LATENT", "reconstruction")
            .build()
    }

    fn check(&self, inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        check_ddim_steps(inputs)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let source = source_latents(&model, &inputs.object("source_latent")?, "source_latent")?;
        let device = source.device().clone();
        let source_prompt = prompt(inputs, "source", &device)?;
        let target_prompt = prompt(inputs, "target", &device)?;
        let negative_prompt = prompt(inputs, "negative", &device)?;
        for (name, embeddings) in [("target", &target_prompt), ("negative", &negative_prompt)] {
            if embeddings.dims() != source_prompt.dims() {
                return Err(NodeFailure::input(
                    name,
                    format!(
                        "embeddings {:?} differ from the source prompt's {:?}",
                        embeddings.dims(),
                        source_prompt.dims()
                    ),
                ));
            }
        }
        let settings = EditSettings {
            steps: inputs.usize("steps")?,
            guidance_scale: inputs.float("cfg")?,
            inject_until: inputs.float("inject_until")?,
            low_entropy_fraction: inputs.float("low_entropy_percent")?,
            noise_blend: inputs.float_or("noise_blend", 0.0)?,
        };
        settings.validate().map_err(NodeFailure::execution)?;
        // The source's reconstruction and the edit are sampled as one batch of two videos.
        let guided = settings.guidance_scale > 1.0;
        check_memory(ctx, &model, &source, (2, guided), "source_latent")?;
        let (_, channels, frames, height, width) = source.dims5()?;
        let fresh_noise = video_noise(
            inputs.seed("seed")?,
            1,
            channels,
            frames,
            height,
            width,
            NoiseMode::Independent,
            0.0,
            &device,
        )?;
        let mut progress = |phase: &str, done: usize, total: usize| -> candle_core::Result<()> {
            ctx.progress(done as u64, total as u64, phase);
            ctx.check_cancelled()
                .map_err(|_| candle_core::Error::Msg("cancelled".into()))
        };
        let output = edit_video(
            &model.unet,
            ContextOptions::needed_for(model.unet.max_frames(), frames),
            &ddim()?,
            &EditInputs {
                source: &source,
                source_prompt: &source_prompt,
                target_prompt: &target_prompt,
                negative_prompt: &negative_prompt,
                fresh_noise: &fresh_noise,
            },
            &settings,
            &mut progress,
        )
        .map_err(|e| cancelled_or(ctx, e))?;
        Ok(Outputs {
            values: vec![
                Latent {
                    samples: output.edited,
                }
                .into_value(),
                Latent {
                    samples: output.reconstruction,
                }
                .into_value(),
            ],
            ui: Some(json!({ "injected_layers": output.injected_layers })),
        })
    }
}
