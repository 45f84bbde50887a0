//! `KSampler` and `KSamplerAdvanced`: ComfyUI's samplers and schedules on a vdm MODEL, with
//! ComfyUI's noise (torch's CPU generator seeded with the seed, drawn in ComfyUI's latent
//! layout), so that a seed gives the noise a ComfyUI user knows.

use candle_core::{DType, Tensor};

use crate::sampling::comfy_noise::{comfy_layout_randn, initial_noise, NoiseSettings};
use crate::sampling::k_diffusion::{
    calculate_sigmas, sample, BrownianNoise, GaussianSource, GuidedDenoiser, ModelSamplingDiscrete,
    NoiseSampler, PromptEmbeddings, SamplerKind, Scheduler, StepInfo,
};
use crate::sampling::torch_random::TorchGenerator;
use crate::sampling::{ContextOptions, ContextWindows, NoisePredictor};
use crate::video::freeinit::comfy_reinitialized_noise;

use super::super::objects::{Conditioning, Model};
use super::super::sampler::check_sampling_memory;
use super::super::{
    cancelled_or, Context, DescriptorBuilder, ForInput, Inputs, Latent, Node, NodeFailure, Outputs,
    PluginType,
};

/// SD 1.x's latent scale (the VAE's `scaling_factor`), which AnimateDiff-Evolved's FreeInit
/// divides by.
const SD_LATENT_SCALE: f64 = 0.18215;

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(KSampler), Box::new(KSamplerAdvanced)]
}

fn sampler_names() -> Vec<&'static str> {
    SamplerKind::ALL
        .into_iter()
        .map(SamplerKind::name)
        .collect()
}

fn scheduler_names() -> Vec<&'static str> {
    Scheduler::comfy_names().collect()
}

/// The inputs both samplers share, in ComfyUI's order after the seed.
fn shared_inputs(builder: DescriptorBuilder) -> DescriptorBuilder {
    builder
        .int("steps", 20, 1, 10000, "Sampling steps.")
        .float(
            "cfg",
            8.0,
            (0.0, 100.0, 0.1),
            "Classifier-free guidance scale.",
        )
        .combo("sampler_name", &sampler_names(), "ComfyUI's sampler.")
        .combo(
            "scheduler",
            &scheduler_names(),
            "How the noise levels are spaced.",
        )
        .object("positive", "CONDITIONING", "The prompt.")
        .object("negative", "CONDITIONING", "The negative prompt.")
        .object("latent_image", "LATENT", "The latents to denoise.")
}

struct KSampler;

impl Node for KSampler {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let builder = DescriptorBuilder::new("KSampler", "KSampler", "sampling")
            .description("Denoises latents with one of ComfyUI's samplers; for video, the frames are the batch.")
            .object("model", "MODEL", "The model.")
            .seed("seed", "Seed of the noise.");
        shared_inputs(builder)
            .float(
                "denoise",
                1.0,
                (0.0, 1.0, 0.01),
                "Share of the schedule run: 1 starts from noise.",
            )
            .output("LATENT", "LATENT")
            .build()
    }

    fn check(&self, inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        check_names(inputs)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let run = SamplerRun {
            seed: inputs.seed("seed")?,
            add_noise: true,
            denoise: inputs.float("denoise")?,
            start_step: None,
            last_step: None,
            force_full_denoise: false,
        };
        run.execute(inputs, ctx)
    }
}

struct KSamplerAdvanced;

impl Node for KSamplerAdvanced {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let builder = DescriptorBuilder::new("KSamplerAdvanced", "KSampler (Advanced)", "sampling")
            .description("KSampler over a range of the schedule's steps, with or without adding noise, optionally leaving the rest of the noise in.")
            .object("model", "MODEL", "The model.")
            .combo("add_noise", &["enable", "disable"], "disable: the latents already hold their noise.")
            .seed("noise_seed", "Seed of the noise.");
        shared_inputs(builder)
            .int(
                "start_at_step",
                0,
                0,
                10000,
                "First step of the schedule to run.",
            )
            .int(
                "end_at_step",
                10000,
                0,
                10000,
                "Step of the schedule to stop at.",
            )
            .combo(
                "return_with_leftover_noise",
                &["disable", "enable"],
                "enable: stop at the end step's noise level instead of denoising fully.",
            )
            .output("LATENT", "LATENT")
            .build()
    }

    fn check(&self, inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        check_names(inputs)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let run = SamplerRun {
            seed: inputs.seed("noise_seed")?,
            add_noise: inputs.string("add_noise")? == "enable",
            denoise: 1.0,
            start_step: Some(inputs.usize("start_at_step")?),
            last_step: Some(inputs.usize("end_at_step")?),
            force_full_denoise: inputs.string("return_with_leftover_noise")? != "enable",
        };
        run.execute(inputs, ctx)
    }
}

fn check_names(inputs: &Inputs) -> Vec<NodeFailure> {
    let mut problems = Vec::new();
    if let Ok(name) = inputs.string("sampler_name") {
        problems.extend(
            SamplerKind::from_comfy_name(name)
                .for_input("sampler_name")
                .err(),
        );
    }
    if let Ok(name) = inputs.string("scheduler") {
        problems.extend(
            Scheduler::from_comfy_name(name)
                .for_input("scheduler")
                .err(),
        );
    }
    problems
}

/// What differs between the two nodes (ComfyUI's `common_ksampler` arguments).
struct SamplerRun {
    seed: u64,
    add_noise: bool,
    denoise: f64,
    start_step: Option<usize>,
    last_step: Option<usize>,
    force_full_denoise: bool,
}

impl SamplerRun {
    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let positive: Conditioning = inputs.object("positive")?;
        let negative: Conditioning = inputs.object("negative")?;
        let latent: Latent = inputs.object("latent_image")?;
        let steps = inputs.usize("steps")?;
        let cfg = inputs.float("cfg")?;
        let kind = SamplerKind::from_comfy_name(inputs.string("sampler_name")?)
            .for_input("sampler_name")?;
        let scheduler =
            Scheduler::from_comfy_name(inputs.string("scheduler")?).for_input("scheduler")?;
        let model_sampling = match &model.sampling.model_sampling {
            Some(sampling) => sampling.clone(),
            None => std::sync::Arc::new(ModelSamplingDiscrete::sd()?),
        };
        let sigmas = self.sigmas(&model_sampling, kind, scheduler, steps)?;

        let device = model.unet.base().device().clone();
        let latents = latent.samples.to_device(&device)?.to_dtype(DType::F32)?;
        // Past the end of the schedule (or with nothing to run) the latents are returned as
        // they are, as ComfyUI does.
        if sigmas.len() < 2 {
            return Ok(Outputs::one(Latent { samples: latents }.into_value()));
        }
        let (batch, channels, frames, height, width) = latents.dims5().for_input("latent_image")?;
        let unet_channels = model.unet.base().config().in_channels;
        if channels != unet_channels {
            return Err(NodeFailure::input(
                "latent_image",
                format!("{channels} latent channels, the model takes {unet_channels}"),
            ));
        }
        let context = model
            .sampling
            .context
            .or_else(|| ContextOptions::needed_for(model.unet.max_frames(), frames));
        if let (Some(options), Some(max)) = (context, model.unet.max_frames()) {
            if options.length > max {
                return Err(NodeFailure::input(
                    "model",
                    format!(
                        "context length {} exceeds the motion module's {max} frames",
                        options.length
                    ),
                ));
            }
        }
        check_sampling_memory(
            ctx,
            &model.unet,
            (batch, channels, frames, height, width),
            context,
            cfg != 1.0,
        )?;

        let shape = (batch, channels, frames, height, width);
        // ComfyUI's noise, or what AnimateDiff-Evolved's sample settings make of it (FreeNoise
        // and repeated-context noise follow the context windows the workflow set).
        let span = model.sampling.context.map(|c| (c.length, c.overlap));
        let noise_for =
            |settings: &NoiseSettings| initial_noise(settings, self.seed, shape, span, &device);
        let first_noise = if self.add_noise {
            noise_for(&model.sampling.noise)?
        } else {
            latents.zeros_like()?
        };

        let windows;
        let predictor: &dyn NoisePredictor = match context {
            Some(options) => {
                windows = ContextWindows {
                    inner: &model.unet,
                    options,
                };
                &windows
            }
            None => &model.unet,
        };
        let embeddings = |c: &Conditioning| -> Result<PromptEmbeddings, NodeFailure> {
            let tensor = c.embeddings.to_device(&device)?.to_dtype(DType::F32)?;
            Ok(if c.per_frame {
                PromptEmbeddings::PerFrame(tensor)
            } else {
                PromptEmbeddings::PerVideo(tensor)
            })
        };
        let (positive, negative) = (embeddings(&positive)?, embeddings(&negative)?);
        let total = sigmas.len() - 1;
        let freeinit = model.sampling.iterations;
        let passes = freeinit.map_or(1, |f| f.config.iterations.max(1));

        // One pass of the sampler from `noise`, its steps numbered after `done` of all passes.
        let run_pass = |noise: &Tensor, done: usize| -> Result<Tensor, NodeFailure> {
            let first = sigmas[0];
            let x = model_sampling.noise_scaling(
                first,
                noise,
                &latents,
                model_sampling.max_denoise(first),
            )?;
            let mut denoiser =
                GuidedDenoiser::new(predictor, &model_sampling, &positive, &negative, cfg, total)
                    .map_err(|e| NodeFailure::input("negative", e))?;
            let step = denoiser.step_counter();
            let mut noise_sampler = self.noise_sampler(kind, shape);
            let mut callback = |info: &StepInfo<'_>| -> candle_core::Result<()> {
                step.set(info.index + 1);
                let text = if passes > 1 {
                    format!("sampling (FreeInit pass {} of {passes})", done / total + 1)
                } else {
                    "sampling".to_owned()
                };
                ctx.progress(
                    (done + info.index + 1) as u64,
                    (passes * total) as u64,
                    &text,
                );
                ctx.preview_latents(info.denoised);
                if ctx.check_cancelled().is_err() {
                    candle_core::bail!("cancelled");
                }
                Ok(())
            };
            sample(
                kind,
                &mut denoiser,
                x,
                &sigmas,
                noise_sampler.as_mut(),
                Some(&mut callback),
            )
            .map_err(|e| cancelled_or(ctx, e))
        };

        let mut noise = first_noise.clone();
        let mut output: Option<Tensor> = None;
        for pass in 0..passes {
            if let Some(freeinit) = freeinit.filter(|f| pass > 0 || f.apply_to_first) {
                // Fresh high frequencies from the seed moved on by the pass's offsets.
                let mut fresh_settings = model.sampling.noise;
                fresh_settings.seed_offset = fresh_settings
                    .seed_offset
                    .wrapping_add(freeinit.iter_seed_offset.wrapping_mul(pass as i64));
                fresh_settings.batch_offset += freeinit.iter_batch_offset * pass;
                let fresh = noise_for(&fresh_settings)?;
                let previous = output.as_ref().unwrap_or(&latents);
                let table = model_sampling.sigmas();
                let sigma = f64::from(table[freeinit.sigma_step.min(table.len() - 1)]);
                noise = comfy_reinitialized_noise(
                    freeinit.reinit,
                    &freeinit.config,
                    previous,
                    &noise,
                    &first_noise,
                    &fresh,
                    sigma,
                    SD_LATENT_SCALE,
                )?;
            }
            output = Some(run_pass(&noise, pass * total)?);
        }
        let samples = output.unwrap_or(latents);
        Ok(Outputs::one(Latent { samples }.into_value()))
    }

    /// The σ of the steps that run (ComfyUI's `KSampler.set_steps` and `sample`): with
    /// `denoise` < 1 the tail of a longer schedule; cut at `last_step` (to 0 when fully
    /// denoising) and started at `start_step`.
    fn sigmas(
        &self,
        model_sampling: &ModelSamplingDiscrete,
        kind: SamplerKind,
        scheduler: Scheduler,
        steps: usize,
    ) -> Result<Vec<f64>, NodeFailure> {
        let table = |steps: usize| -> Result<Vec<f64>, NodeFailure> {
            // Some samplers get one step more with the next-to-last σ dropped.
            if kind.discards_penultimate_sigma() {
                let mut sigmas = calculate_sigmas(model_sampling, scheduler, steps + 1)
                    .for_input("scheduler")?;
                if sigmas.len() >= 2 {
                    sigmas.remove(sigmas.len() - 2);
                }
                Ok(sigmas)
            } else {
                calculate_sigmas(model_sampling, scheduler, steps).for_input("scheduler")
            }
        };
        let mut sigmas = if self.denoise > 0.9999 {
            table(steps)?
        } else if self.denoise <= 0.0 {
            Vec::new()
        } else {
            let full = table((steps as f64 / self.denoise) as usize)?;
            full[full.len().saturating_sub(steps + 1)..].to_vec()
        };
        if let Some(last) = self.last_step {
            if last + 1 < sigmas.len() {
                sigmas.truncate(last + 1);
                if self.force_full_denoise {
                    if let Some(end) = sigmas.last_mut() {
                        *end = 0.0;
                    }
                }
            }
        }
        if let Some(start) = self.start_step {
            if start + 1 < sigmas.len() {
                sigmas.drain(..start);
            } else {
                sigmas.clear();
            }
        }
        Ok(sigmas)
    }

    /// ComfyUI's noise for the ancestral and SDE samplers: draws of torch's CPU generator
    /// seeded with the seed, in ComfyUI's layout; a Brownian path over such draws for the SDE
    /// samplers.
    fn noise_sampler(
        &self,
        kind: SamplerKind,
        shape: (usize, usize, usize, usize, usize),
    ) -> Box<dyn NoiseSampler> {
        let mut generator = TorchGenerator::new(self.seed);
        let mut draw =
            move |like: &Tensor| comfy_layout_randn(&mut generator, shape, like.device());
        if kind.uses_brownian_noise() {
            Box::new(BrownianNoise::new(Box::new(draw)))
        } else {
            Box::new(FreshNoise(Box::new(move |like: &Tensor| draw(like))))
        }
    }
}

/// Independent Gaussian draws for each step.
struct FreshNoise(GaussianSource);

impl NoiseSampler for FreshNoise {
    fn sample(&mut self, _: f64, _: f64, like: &Tensor) -> candle_core::Result<Tensor> {
        (self.0)(like)
    }
}
