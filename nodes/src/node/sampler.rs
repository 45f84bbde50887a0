//! The video sampler and its option nodes (FreeInit, context windows, denoising reuse), and
//! the VAE nodes.

use std::cell::Cell;

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::models::call::SamplingStep;
use crate::sampling::{
    ContextOptions, ContextWindows, NoisePredictor, PredictRequest, SampleInputs, SampleSettings,
    Sampler, StepReport, TextConditioning,
};
use crate::schedulers::{
    DdimScheduler, DdimSchedulerConfig, EulerDiscreteScheduler, EulerDiscreteSchedulerConfig,
    Scheduler,
};
use crate::video::freeinit::{sample_with_freeinit, FilterKind, FreeInitConfig};
use crate::video::noise::{video_noise, NoiseMode};
use crate::video::reuse::{DenoisingReuse, Propagation, ReuseConfig, ReuseMode};

use super::objects::{Conditioning, Context as ContextObject, FreeInit, Model, Motion, Reuse, Vae};
use super::{
    cancelled_or, memory, Context, DescriptorBuilder, ForInput, Images, Inputs, Latent, Node,
    NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(VideoSampler),
        Box::new(FreeInitOptions),
        Box::new(ContextOptionsNode),
        Box::new(StepSelector),
        Box::new(VaeDecode),
        Box::new(VaeEncode),
    ]
}

/// SD 1.x's scheduler of a `scheduler` input.
fn scheduler_named(name: &str) -> Result<Box<dyn Scheduler>, NodeFailure> {
    Ok(match name {
        "ddim" => Box::new(DdimScheduler::new(DdimSchedulerConfig::sd15())?),
        "euler" => Box::new(EulerDiscreteScheduler::new(
            EulerDiscreteSchedulerConfig::sd15(),
        )?),
        other => {
            return Err(NodeFailure::input(
                "scheduler",
                format!("unknown scheduler `{other}`"),
            ))
        }
    })
}

/// That `scheduler` can place `steps` steps: an error of the `steps` input otherwise.
pub(crate) fn check_steps(scheduler: &dyn Scheduler, steps: usize) -> Result<(), NodeFailure> {
    scheduler.timesteps(steps).map(|_| ()).for_input("steps")
}

/// Refuses a sampling run of latents of `shape` (videos, C, F, h, w) whose estimated peak
/// exceeds the memory budget, naming `latent_image`; `context` windows bound the frames of
/// one model call.
pub(super) fn check_sampling_memory(
    ctx: &Context,
    unet: &crate::models::patcher::PatchedUNet,
    (batch, channels, frames, height, width): (usize, usize, usize, usize, usize),
    context: Option<ContextOptions>,
    guided: bool,
) -> Result<(), NodeFailure> {
    let frames_per_call = context.map_or(frames, |o| o.length.min(frames));
    ctx.memory_budget(unet.base().device()).check(
        "latent_image",
        &format!("sampling {batch} × {frames} frames of {width}×{height} latents"),
        memory::sampling_estimate(
            unet,
            batch,
            channels,
            frames,
            (height, width),
            frames_per_call,
            guided,
        ),
    )
}

/// Frames the VAE handles at once by default: bounded memory at SD sizes.
const DEFAULT_VAE_CHUNK: i64 = 16;

struct VideoSampler;

impl Node for VideoSampler {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VideoSampler", "Video Sampler", "vdm/sampling")
            .description(
                "Denoises video latents with classifier-free guidance, as diffusers' AnimateDiff pipelines do. \
                 denoise < 1 runs that share of the schedule from the given latents (video-to-video). \
                 Clips longer than the motion module's positional table are sampled in context windows. \
                 Reports the UNet frame evaluations made (each guidance branch counted) beside those of \
                 the plain sampler, and with adaptive reuse the consistency NMI of each step.",
            )
            .object("model", "MODEL", "The model, usually with a motion module applied.")
            .object("positive", "CONDITIONING", "The prompt.")
            .object("negative", "CONDITIONING", "The negative prompt.")
            .object("latent_image", "LATENT", "Zero latents (text-to-video) or encoded video (video-to-video).")
            .seed("seed", "Seed of the initial noise (and of FreeInit's fresh noise).")
            .int("steps", 20, 1, 1000, "Denoising steps.")
            .float("cfg", 7.5, (0.0, 100.0, 0.1), "Guidance scale; at 1 or below the negative prompt is not used.")
            .combo("scheduler", &["ddim", "euler"], "DDIM or Euler (discrete), with SD 1.x's training schedule.")
            .float("denoise", 1.0, (0.01, 1.0, 0.01), "Strength: 1 starts from noise; lower keeps more of the input latents.")
            .optional()
            .object("noise", "LATENT", "Initial noise to use instead of the seed's (e.g. from Video Noise).")
            .object("context_options", "CONTEXT_OPTIONS", "Context windows for long clips.")
            .object("freeinit", "FREEINIT", "FreeInit refinement passes.")
            .object("reuse", "REUSE_OPTIONS", "Denoising reuse from Step Selector: in the early steps only key frames are evaluated.")
            .output("LATENT", "LATENT")
            .build()
    }

    fn check(&self, inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        match (inputs.string("scheduler"), inputs.usize("steps")) {
            (Ok(name), Ok(steps)) => scheduler_named(name)
                .and_then(|scheduler| check_steps(scheduler.as_ref(), steps))
                .err()
                .into_iter()
                .collect(),
            _ => Vec::new(),
        }
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let positive: Conditioning = inputs.object("positive")?;
        let negative: Conditioning = inputs.object("negative")?;
        let latent: Latent = inputs.object("latent_image")?;
        let seed = inputs.seed("seed")?;
        let steps = inputs.usize("steps")?;
        let strength = inputs.float("denoise")?;
        let settings = SampleSettings {
            steps,
            guidance_scale: inputs.float("cfg")?,
            strength,
        };
        let freeinit = inputs
            .optional_object::<FreeInit>("freeinit")?
            .map(|f| f.config);
        let scheduler = scheduler_named(inputs.string("scheduler")?)?;

        let device = model.unet.base().device().clone();
        let latents = latent.samples.to_device(&device)?.to_dtype(DType::F32)?;
        let (batch, channels, frames, height, width) = latents.dims5().for_input("latent_image")?;
        let unet_channels = model.unet.base().config().in_channels;
        if channels != unet_channels {
            return Err(NodeFailure::input(
                "latent_image",
                format!("{channels} latent channels, the model takes {unet_channels}"),
            ));
        }
        let context_options = match inputs.optional_object::<ContextObject>("context_options")? {
            Some(c) => Some(c.options),
            // Past the positional table a single pass is impossible: window by default.
            None => ContextOptions::needed_for(model.unet.max_frames(), frames),
        };
        check_sampling_memory(
            ctx,
            &model.unet,
            (batch, channels, frames, height, width),
            context_options,
            settings.guidance_scale > 1.0,
        )?;
        let noise = match inputs.optional_object::<Latent>("noise")? {
            Some(n) if n.samples.dims() != latents.dims() => {
                return Err(NodeFailure::input(
                    "noise",
                    format!(
                        "noise of shape {:?} for latents of shape {:?}",
                        n.samples.dims(),
                        latents.dims()
                    ),
                ))
            }
            Some(n) => n.samples.to_device(&device)?.to_dtype(DType::F32)?,
            None => video_noise(
                seed,
                batch,
                channels,
                frames,
                height,
                width,
                NoiseMode::Independent,
                0.0,
                &device,
            )?,
        };
        let per_video = |c: &Conditioning, name: &str| -> Result<Tensor, NodeFailure> {
            if c.per_frame {
                return Err(NodeFailure::input(
                    name,
                    "a prompt schedule (one embedding per frame) is sampled with KSampler",
                ));
            }
            let e = c.embeddings.to_device(&device)?.to_dtype(DType::F32)?;
            match e.dim(0)? {
                b if b == batch => Ok(e),
                1 => Ok(e.repeat((batch, 1, 1))?),
                b => Err(NodeFailure::input(
                    name,
                    format!("{b} prompts for {batch} videos"),
                )),
            }
        };
        let (positive, negative) = (
            per_video(&positive, "positive")?,
            per_video(&negative, "negative")?,
        );
        if positive.dims() != negative.dims() {
            return Err(NodeFailure::input(
                "negative",
                format!(
                    "embeddings {:?} differ from the positive {:?}",
                    negative.dims(),
                    positive.dims()
                ),
            ));
        }

        let mut reuse = match inputs.optional_object::<Reuse>("reuse")? {
            Some(options) => {
                let config = reuse_config(&options, frames, height, width)?;
                Some(DenoisingReuse::new(config, &noise).for_input("reuse")?)
            }
            None => None,
        };

        let windows;
        let predictor: &dyn NoisePredictor = match context_options {
            Some(options) => {
                if let Some(max) = model.unet.max_frames() {
                    if options.length > max {
                        return Err(NodeFailure::input(
                            "context_options",
                            format!(
                                "context length {} exceeds the motion module's {max} frames",
                                options.length
                            ),
                        ));
                    }
                }
                windows = ContextWindows {
                    inner: &model.unet,
                    options,
                };
                &windows
            }
            None => &model.unet,
        };
        let mut fresh_noise = |pass: usize| {
            video_noise(
                seed.wrapping_add(pass as u64),
                batch,
                channels,
                frames,
                height,
                width,
                NoiseMode::Independent,
                0.0,
                &device,
            )
        };
        let init = (strength < 1.0).then_some(&latents);
        let reuse_given = reuse.is_some();
        let cancelled = Cell::new(false);
        // Frame evaluations so far, with the run's frame selection and with every frame.
        let evaluations = Cell::new((0usize, 0usize));
        let guided_shape = (
            batch * settings.guidance().branches(),
            channels,
            frames,
            height,
            width,
        );
        let mut on_step = |report: &StepReport<'_>| -> candle_core::Result<()> {
            let step = report.step;
            let (done, plain) = evaluations.get();
            let count =
                |positions| step_evaluations(predictor, guided_shape, positions, step, &positive);
            let done = done + count(report.evaluated_frames)?;
            let plain = plain + count(None)?;
            evaluations.set((done, plain));
            let text = if reuse_given {
                format!("sampling (reuse: {done} of {plain} frame evaluations)")
            } else {
                "sampling".to_owned()
            };
            ctx.progress((step.index + 1) as u64, step.count as u64, &text);
            ctx.preview_latents(report.denoised);
            if ctx.check_cancelled().is_err() {
                cancelled.set(true);
                candle_core::bail!("cancelled");
            }
            Ok(())
        };
        let sample_inputs = SampleInputs {
            noise: &noise,
            init_latents: init,
            text: TextConditioning {
                positive: &positive,
                negative: &negative,
            },
        };
        let mut sampler = Sampler::new(predictor, scheduler.as_ref()).on_step(&mut on_step);
        if let Some(reuse) = reuse.as_mut() {
            sampler = sampler.with_strategy(reuse);
        }
        let result = match &freeinit {
            Some(config) => sample_with_freeinit(
                &mut sampler,
                config,
                &settings,
                &sample_inputs,
                &mut fresh_noise,
            ),
            None => sampler.sample(&settings, &sample_inputs),
        };
        drop(sampler);
        let output = match result {
            Ok(output) => output,
            Err(_) if cancelled.get() => return Err(NodeFailure::cancelled()),
            Err(e) => return Err(NodeFailure::execution(e)),
        };
        let (_, without_reuse) = evaluations.get();
        let mut ui = json!({
            "frame_evaluations": [output.frame_evaluations],
            "frame_evaluations_without_reuse": [without_reuse],
        });
        if let Some(reuse) = &reuse {
            if matches!(reuse.config().mode, ReuseMode::Adaptive { .. }) {
                ui["nmi"] = json!(reuse.nmi_curve());
            }
        }
        Ok(Outputs {
            values: vec![Latent {
                samples: output.latents,
            }
            .into_value()],
            ui: Some(ui),
        })
    }
}

/// The frame evaluations `predictor` makes at `step` on the guided batch `shape` (videos ×
/// guidance branches, C, F, h, w), restricted to the frames at `positions` when given: asked
/// of the predictor (context windows count their overlaps), without running it.
fn step_evaluations(
    predictor: &dyn NoisePredictor,
    (batch, channels, frames, height, width): (usize, usize, usize, usize, usize),
    positions: Option<&[usize]>,
    step: SamplingStep,
    text: &Tensor,
) -> candle_core::Result<usize> {
    let frames = positions.map_or(frames, <[usize]>::len);
    // A broadcast zero: the shape without the memory.
    let latents = Tensor::zeros((), DType::F32, text.device())?
        .broadcast_as((batch, channels, frames, height, width))?;
    predictor.frame_evaluations(&PredictRequest {
        latents: &latents,
        timestep: step.timestep,
        text,
        step: Some(step),
        guidance: Default::default(),
        frame_positions: positions,
        run: None,
    })
}

/// The reuse configuration of `options` for latents of `frames` frames of `height`×`width`,
/// with errors naming the sampler's `reuse` input and what of Step Selector's is wrong.
fn reuse_config(
    options: &Reuse,
    frames: usize,
    height: usize,
    width: usize,
) -> Result<ReuseConfig, NodeFailure> {
    let propagation = match &options.motion {
        None => Propagation::Copy,
        Some(motion) => Propagation::flow_from_motion(&motion.flow, frames, height, width)
            .map_err(|e| NodeFailure::input("reuse", format!("StepSelector's motion: {e}")))?,
    };
    let config = ReuseConfig {
        key_stride: options.key_stride,
        reuse_until: options.reuse_until,
        mode: options.mode,
        propagation,
    };
    config
        .validate(frames)
        .map_err(|e| NodeFailure::input("reuse", format!("StepSelector: {e}")))?;
    Ok(config)
}

struct FreeInitOptions;

impl Node for FreeInitOptions {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("FreeInitOptions", "FreeInit Options", "vdm/sampling")
            .description("FreeInit: re-noise each result and keep its low spatio-temporal frequencies for the next pass (diffusers' enable_free_init).")
            .int("iterations", 3, 1, 10, "Sampling passes in all (1: off).")
            .combo("filter", &FilterKind::NAMES, "Low-pass filter.")
            .float("spatial_stop_frequency", 0.25, (0.0, 1.0, 0.01), "d_s.")
            .float("temporal_stop_frequency", 0.25, (0.0, 1.0, 0.01), "d_t.")
            .int("order", 4, 1, 16, "Butterworth order.")
            .boolean("fast_sampling", false, "Coarse-to-fine: fewer steps in the early passes.")
            .output("FREEINIT", "FREEINIT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let config = FreeInitConfig {
            iterations: inputs.usize("iterations")?,
            filter: inputs.string("filter")?.parse().for_input("filter")?,
            order: inputs.usize("order")? as u32,
            spatial_stop_frequency: inputs.float("spatial_stop_frequency")?,
            temporal_stop_frequency: inputs.float("temporal_stop_frequency")?,
            fast_sampling: inputs.bool("fast_sampling")?,
        };
        Ok(Outputs::one(FreeInit { config }.into_value()))
    }
}

struct ContextOptionsNode;

impl Node for ContextOptionsNode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("ContextOptions", "Context Options", "vdm/sampling")
            .description("Sliding context windows for clips longer than the motion module's positional table (AnimateDiff-Evolved's static and uniform schedules).")
            .int("context_length", 16, 1, 128, "Frames per window (at most the motion module's table length).")
            .int("context_overlap", 4, 0, 127, "Frames shared by neighbouring windows.")
            .combo("schedule", &["static", "uniform"], "static: fixed windows; uniform: windows at several strides, shifting each step.")
            .combo("fuse_method", &["pyramid", "flat"], "How overlapping predictions are weighted.")
            .optional()
            .int("context_stride", 1, 1, 8, "Stride levels of the uniform schedule.")
            .boolean("closed_loop", false, "Add windows across the end-to-start seam (looping videos).")
            .output("CONTEXT_OPTIONS", "CONTEXT_OPTIONS")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let options = ContextOptions {
            length: inputs.usize("context_length")?,
            overlap: inputs.usize("context_overlap")?,
            stride: inputs.usize_or("context_stride", 1)?,
            closed_loop: inputs.bool_or("closed_loop", false)?,
            schedule: inputs.string("schedule")?.parse().for_input("schedule")?,
            fuse: inputs
                .string("fuse_method")?
                .parse()
                .for_input("fuse_method")?,
        };
        options.validate().for_input("context_overlap")?;
        Ok(Outputs::one(ContextObject { options }.into_value()))
    }
}

struct StepSelector;

/// Step Selector's default NMI threshold of adaptive mode (see its description).
const DEFAULT_NMI_THRESHOLD: f64 = 0.3;

impl Node for StepSelector {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let defaults = ReuseConfig::default();
        DescriptorBuilder::new("StepSelector", "Step Selector (denoising reuse)", "vdm/sampling")
            .description(
                "Denoising reuse (Dr. Mo): the early, coarse steps of neighbouring frames are nearly the same up to motion, \
                 so only key frames (0, s, 2s, …) are denoised there; every other frame takes its key frame's denoised \
                 prediction, carried over and re-noised with the frame's own noise, until its switch step, after which all \
                 frames are denoised jointly. The UNet runs only on the frames that need it: the sampler reports the frame \
                 evaluations saved. Feeds Video Sampler's `reuse`.",
            )
            .int(
                "key_stride",
                defaults.key_stride as i64,
                1,
                64,
                "Every key_stride-th frame is a key frame and runs the whole schedule; the others follow the key frame before them. \
                 4 (default): a quarter of the frames in the early steps. 1: every frame is a key frame (no reuse). \
                 At most the clip's length.",
            )
            .float(
                "reuse_until",
                defaults.reuse_until,
                (0.0, 1.0, 0.01),
                "Share of the schedule (of each FreeInit pass) during which non-key frames are propagated instead of denoised: \
                 the switch step in fixed mode, the latest switch in adaptive mode. 0.4 (default, the paper's): the first 40% \
                 of the steps. 0 turns reuse off.",
            )
            .combo(
                "mode",
                &ReuseMode::NAMES,
                "fixed: every frame switches at reuse_until. adaptive: the frames between two key frames also switch as soon \
                 as the consistency of those key frames (NMI of their predictions, 64-bin joint histogram) falls below \
                 nmi_threshold; the sampler then reports the NMI of each step.",
            )
            .float(
                "nmi_threshold",
                DEFAULT_NMI_THRESHOLD,
                (0.0, 1.0, 0.01),
                "Adaptive mode: keep propagating while the key frames' NMI stays at or above this. NMI is 1 for identical \
                 predictions and falls towards 0 for unrelated ones: 0.02 for independent noise over 64×64×4 latents \
                 (512×512 frames), but 0.3 over 12×16×4 (the histogram estimate is biased upwards on few values). \
                 Gaussian values of correlation 0.9 / 0.95 / 0.98 give 0.25 / 0.33 / 0.45 at 512×512. 0.3 (default): \
                 reuse while consecutive key frames are about as alike as a correlation of 0.93–0.95; on very small \
                 latents this never switches early and reuse_until decides. 0 never switches early; 1 switches after \
                 the first step.",
            )
            .combo(
                "propagation",
                &Propagation::NAMES,
                "copy: a frame takes its key frame's prediction as it is (generation). flow: the prediction is first warped \
                 along `motion` from the key frame to the frame (editing, where a source video gives the motion).",
            )
            .optional()
            .object(
                "motion",
                "MOTION",
                "The clip's optical flow for flow propagation (Motion Estimator on the source video): as many frames as the \
                 latents, at 8× their width and height. Not used by copy.",
            )
            .output("REUSE_OPTIONS", "REUSE_OPTIONS")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let mode = match inputs.string("mode")? {
            "fixed" => ReuseMode::Fixed,
            "adaptive" => ReuseMode::Adaptive {
                nmi_threshold: inputs.float("nmi_threshold")?,
            },
            other => {
                return Err(NodeFailure::input(
                    "mode",
                    format!("unknown mode `{other}` (expected fixed or adaptive)"),
                ))
            }
        };
        let motion = match inputs.string("propagation")? {
            "copy" => None,
            "flow" => match inputs.optional_object::<Motion>("motion")? {
                Some(motion) => Some(motion.field),
                None => {
                    return Err(NodeFailure::input(
                        "motion",
                        "propagation `flow` warps along the clip's motion: connect a MOTION \
                         (e.g. from Motion Estimator)",
                    ))
                }
            },
            other => {
                return Err(NodeFailure::input(
                    "propagation",
                    format!("unknown propagation `{other}` (expected copy or flow)"),
                ))
            }
        };
        let reuse = Reuse {
            key_stride: inputs.usize("key_stride")?,
            reuse_until: inputs.float("reuse_until")?,
            mode,
            motion,
        };
        // What does not depend on the clip is checked here; the sampler checks the rest.
        let share = |name: &str, value: f64| {
            if (0.0..=1.0).contains(&value) {
                Ok(())
            } else {
                Err(NodeFailure::input(
                    name,
                    format!("{value} is outside [0, 1]"),
                ))
            }
        };
        share("reuse_until", reuse.reuse_until)?;
        if let ReuseMode::Adaptive { nmi_threshold } = reuse.mode {
            share("nmi_threshold", nmi_threshold)?;
        }
        if reuse.key_stride == 0 {
            return Err(NodeFailure::input("key_stride", "must be at least 1"));
        }
        Ok(Outputs::one(reuse.into_value()))
    }
}

fn chunk_of(inputs: &Inputs) -> Result<usize, NodeFailure> {
    inputs.usize_or("chunk_frames", DEFAULT_VAE_CHUNK as usize)
}

struct VaeDecode;

impl Node for VaeDecode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VAEDecode", "VAE Decode", "vdm/latent")
            .description("Latents to frames, a chunk of frames at a time to bound memory.")
            .object("samples", "LATENT", "Video latents.")
            .object("vae", "VAE", "The VAE.")
            .optional()
            .int(
                "chunk_frames",
                DEFAULT_VAE_CHUNK,
                1,
                4096,
                "Frames decoded at once.",
            )
            .output("IMAGE", "IMAGE")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let latent: Latent = inputs.object("samples")?;
        let vae: Vae = inputs.object("vae")?;
        let chunk = chunk_of(inputs)?;
        let latents = latent.samples.to_dtype(DType::F32)?;
        let (batch, channels, frames, height, width) = latents.dims5().for_input("samples")?;
        let expected = vae.model.config().latent_channels;
        if channels != expected {
            return Err(NodeFailure::input(
                "samples",
                format!("{channels} latent channels, the VAE takes {expected}"),
            ));
        }
        let scale = vae.model.config().spatial_scale();
        let size = (height * scale, width * scale);
        ctx.memory_budget(vae_device(&vae)).check(
            "samples",
            &format!(
                "decoding {} frames of {}×{} pixels",
                batch * frames,
                size.1,
                size.0
            ),
            memory::vae_estimate(&vae.model, batch, frames, size, chunk),
        )?;
        // (B, 3, F, H, W) in [−1, 1] → IMAGE (B·F, H, W, 3) in [0, 1].
        let video = vae
            .model
            .decode_video_observed(
                &latents.to_device(vae_device(&vae))?,
                chunk,
                &mut chunk_progress(ctx, "decoding"),
            )
            .map_err(|e| cancelled_or(ctx, e))?;
        let (_, _, _, h, w) = video.dims5()?;
        let frames_out = video
            .permute((0, 2, 3, 4, 1))?
            .reshape((batch * frames, h, w, 3))?;
        let frames_out = ((frames_out + 1.0)? / 2.0)?
            .clamp(0f32, 1f32)?
            .to_device(&candle_core::Device::Cpu)?;
        Ok(Outputs::one(Images { frames: frames_out }.into_value()))
    }
}

struct VaeEncode;

impl Node for VaeEncode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VAEEncode", "VAE Encode", "vdm/latent")
            .description("Frames to video latents (one video), a chunk of frames at a time.")
            .object(
                "pixels",
                "IMAGE",
                "Frames; width and height are cropped to multiples of the VAE's scale.",
            )
            .object("vae", "VAE", "The VAE.")
            .optional()
            .int(
                "chunk_frames",
                DEFAULT_VAE_CHUNK,
                1,
                4096,
                "Frames encoded at once.",
            )
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("pixels")?;
        let vae: Vae = inputs.object("vae")?;
        let samples = encode_frames(ctx, &vae, &images, chunk_of(inputs)?, "pixels")?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}

/// Encodes `images` as the latents of one video, `chunk` frames at a time; errors name `input`.
pub(super) fn encode_frames(
    ctx: &Context,
    vae: &Vae,
    images: &Images,
    chunk: usize,
    input: &str,
) -> Result<Tensor, NodeFailure> {
    let scale = vae.model.config().spatial_scale();
    let (_, h, w, _) = images.frames.dims4().for_input(input)?;
    let (h, w) = (h / scale * scale, w / scale * scale);
    if h == 0 || w == 0 {
        return Err(NodeFailure::input(
            input,
            format!("frames smaller than the VAE's scale of {scale} pixels"),
        ));
    }
    let frames = images.frames.dim(0)?;
    ctx.memory_budget(vae_device(vae)).check(
        input,
        &format!("encoding {frames} frames of {w}×{h} pixels"),
        memory::vae_estimate(&vae.model, 1, frames, (h, w), chunk),
    )?;

    // IMAGE (F, H, W, 3) in [0, 1] → (1, 3, F, H, W) in [−1, 1], as ComfyUI crops.
    let pixels = images
        .frames
        .narrow(1, 0, h)?
        .narrow(2, 0, w)?
        .to_dtype(DType::F32)?;
    let video = ((pixels * 2.0)? - 1.0)?
        .permute((3, 0, 1, 2))?
        .unsqueeze(0)?
        .to_device(vae_device(vae))?;
    vae.model
        .encode_video_observed(&video, chunk, None, &mut chunk_progress(ctx, "encoding"))
        .map_err(|e| cancelled_or(ctx, e))
}

/// Reports each chunk of frames as a step of progress, and stops once the user cancels.
fn chunk_progress<'c>(
    ctx: &'c Context<'_>,
    what: &'c str,
) -> Box<dyn FnMut(usize, usize) -> candle_core::Result<()> + 'c> {
    Box::new(move |done, frames| {
        ctx.progress(done as u64, frames as u64, what);
        ctx.check_cancelled()
            .map_err(|_| candle_core::Error::Msg("cancelled".into()))
    })
}

fn vae_device(vae: &Vae) -> &candle_core::Device {
    vae.model.device()
}
