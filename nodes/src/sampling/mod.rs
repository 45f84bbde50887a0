//! The denoising loop of the video pipelines: classifier-free guidance, a scheduler, optional
//! video-to-video strength, FreeInit passes and context windows, as diffusers'
//! `AnimateDiffPipeline` / `AnimateDiffVideoToVideoPipeline` run them.

pub mod context;

use candle_core::{Result, Tensor};

use crate::schedulers::Scheduler;
use crate::video::freeinit::{mix_frequencies, FreeInitConfig};

pub use context::{ContextFuse, ContextOptions, ContextSchedule, ContextWindows};

use crate::models::patcher::{PatchedUNet, UNetInputs};

impl NoisePredictor for PatchedUNet {
    fn predict(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        step: Option<usize>,
    ) -> Result<Tensor> {
        let step = step.map(|index| crate::models::call::SamplingStep {
            index,
            count: 0,
            timestep,
        });
        self.forward(&UNetInputs {
            sample: latents,
            timestep: timestep.into(),
            text: context,
            frame_positions: None,
            step,
            guidance: Default::default(),
            run: None,
        })
    }

    fn max_frames(&self) -> Option<usize> {
        PatchedUNet::max_frames(self)
    }
}

/// Something that predicts the noise in video latents: a UNet with its patches.
pub trait NoisePredictor {
    /// ε for `latents` (B, C, F, h, w) at `timestep`, with per-video text embeddings
    /// `context` (B, S, D). `step` is the index of the sampling step, for processors that act
    /// on step ranges.
    fn predict(
        &self,
        latents: &Tensor,
        timestep: f64,
        context: &Tensor,
        step: Option<usize>,
    ) -> Result<Tensor>;

    /// The most frames one call can see (the motion module's positional table), if bounded.
    fn max_frames(&self) -> Option<usize>;
}

/// What to sample.
#[derive(Debug, Clone)]
pub struct SampleSettings {
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not evaluated.
    pub guidance_scale: f64,
    /// Video-to-video strength in (0, 1]: the share of the schedule that is run (1 = from pure
    /// noise, as text-to-video).
    pub strength: f64,
    pub freeinit: Option<FreeInitConfig>,
}

/// Called after each step with (step, total steps); an error stops sampling (cancellation).
pub type StepCallback<'a> = dyn FnMut(usize, usize) -> Result<()> + 'a;

/// Inputs of one sampling run.
pub struct SampleInputs<'a> {
    /// Unit Gaussian noise (B, C, F, h, w).
    pub noise: &'a Tensor,
    /// Clean latents to start from (video-to-video), or none (text-to-video).
    pub init_latents: Option<&'a Tensor>,
    /// Positive and negative per-video embeddings (B, S, D).
    pub positive: &'a Tensor,
    pub negative: &'a Tensor,
    /// Fresh unit noise for FreeInit's high frequencies, one draw per pass after the first.
    pub fresh_noise: &'a mut dyn FnMut(usize) -> Result<Tensor>,
}

/// Runs the full denoising loop (and FreeInit passes) and returns the final latents.
pub fn sample(
    predictor: &dyn NoisePredictor,
    scheduler: &mut dyn Scheduler,
    settings: &SampleSettings,
    inputs: SampleInputs<'_>,
    on_step: &mut StepCallback<'_>,
) -> Result<Tensor> {
    if settings.steps == 0 {
        candle_core::bail!("steps must be at least 1");
    }
    if !(settings.strength > 0.0 && settings.strength <= 1.0) {
        candle_core::bail!("strength must be in (0, 1], got {}", settings.strength);
    }
    let passes = settings.freeinit.map_or(1, |f| f.iterations.max(1));
    let steps_of = |pass: usize| {
        settings.freeinit.map_or(settings.steps, |f| {
            f.steps_for_iteration(settings.steps, pass)
        })
    };
    let total: usize = (0..passes)
        .map(|p| schedule_len(steps_of(p), settings.strength))
        .sum();
    let context = if settings.guidance_scale > 1.0 {
        Tensor::cat(&[inputs.negative, inputs.positive], 0)?
    } else {
        inputs.positive.clone()
    };

    let mut done = 0;
    let mut initial_noise: Option<Tensor> = None;
    let mut latents = inputs.noise.clone();
    for pass in 0..passes {
        scheduler.set_timesteps(steps_of(pass))?;
        let timesteps = scheduler.timesteps().to_vec();
        let start = timesteps.len() - schedule_len(timesteps.len(), settings.strength);
        let timesteps = &timesteps[start..];
        if pass == 0 {
            latents = match inputs.init_latents {
                // diffusers' img2img: noise the clean latents to the first scheduled timestep.
                Some(init) if settings.strength < 1.0 => {
                    scheduler.add_noise(init, inputs.noise, timesteps[0])?
                }
                _ => (inputs.noise * scheduler.init_noise_sigma())?,
            };
            initial_noise = Some(latents.clone());
        } else if let (Some(cfg), Some(noise)) = (&settings.freeinit, &initial_noise) {
            let last_train_t = (scheduler.alphas_cumprod().len() - 1) as f64;
            let z_t = scheduler.add_noise(&latents, noise, last_train_t)?;
            let z_rand = (inputs.fresh_noise)(pass)?;
            latents = mix_frequencies(&z_t, &z_rand, cfg)?;
        }
        for (i, &t) in timesteps.iter().enumerate() {
            let eps = guided_noise(
                predictor,
                scheduler,
                &latents,
                t,
                &context,
                settings.guidance_scale,
                done + i,
            )?;
            latents = scheduler.step(&eps, t, &latents)?.prev_sample;
            on_step(done + i + 1, total)?;
        }
        done += timesteps.len();
    }
    Ok(latents)
}

/// Steps actually run for a schedule of `steps` at `strength` (diffusers' `get_timesteps`).
fn schedule_len(steps: usize, strength: f64) -> usize {
    ((steps as f64 * strength) as usize).clamp(1, steps)
}

/// One guided noise prediction: the negative and positive halves in one batch.
fn guided_noise(
    predictor: &dyn NoisePredictor,
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    t: f64,
    context: &Tensor,
    guidance_scale: f64,
    step: usize,
) -> Result<Tensor> {
    if guidance_scale <= 1.0 {
        let input = scheduler.scale_model_input(latents, t)?;
        return predictor.predict(&input, t, context, Some(step));
    }
    let batch = latents.dim(0)?;
    let input = scheduler.scale_model_input(&Tensor::cat(&[latents, latents], 0)?, t)?;
    let eps = predictor.predict(&input, t, context, Some(step))?;
    let (uncond, cond) = (eps.narrow(0, 0, batch)?, eps.narrow(0, batch, batch)?);
    &uncond + ((cond - &uncond)? * guidance_scale)?
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
    use candle_core::{DType, Device};

    /// ε = 0 everywhere: DDIM then only rescales, so the loop's bookkeeping is visible.
    struct Zero;
    impl NoisePredictor for Zero {
        fn predict(
            &self,
            latents: &Tensor,
            _: f64,
            _: &Tensor,
            _: Option<usize>,
        ) -> Result<Tensor> {
            latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn strength_runs_a_share_of_the_schedule_and_reports_every_step() -> Result<()> {
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 3, 2, 2), &dev)?;
        let clean = Tensor::ones((1, 4, 3, 2, 2), DType::F32, &dev)?;
        let emb = Tensor::zeros((1, 2, 3), DType::F32, &dev)?;
        let mut scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let mut seen = Vec::new();
        let settings = SampleSettings {
            steps: 10,
            guidance_scale: 7.5,
            strength: 0.6,
            freeinit: None,
        };
        let mut fresh = |_: usize| Tensor::zeros((1, 4, 3, 2, 2), DType::F32, &dev);
        let inputs = SampleInputs {
            noise: &noise,
            init_latents: Some(&clean),
            positive: &emb,
            negative: &emb,
            fresh_noise: &mut fresh,
        };
        sample(&Zero, &mut scheduler, &settings, inputs, &mut |s, n| {
            seen.push((s, n));
            Ok(())
        })?;
        assert_eq!(seen, (1..=6).map(|s| (s, 6)).collect::<Vec<_>>());
        Ok(())
    }

    #[test]
    fn an_error_from_the_callback_stops_sampling() -> Result<()> {
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 2, 2, 2), &dev)?;
        let emb = Tensor::zeros((1, 2, 3), DType::F32, &dev)?;
        let mut scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let settings = SampleSettings {
            steps: 5,
            guidance_scale: 1.0,
            strength: 1.0,
            freeinit: None,
        };
        let mut fresh = |_: usize| -> Result<Tensor> { unreachable!("no FreeInit") };
        let mut calls = 0;
        let inputs = SampleInputs {
            noise: &noise,
            init_latents: None,
            positive: &emb,
            negative: &emb,
            fresh_noise: &mut fresh,
        };
        let result = sample(&Zero, &mut scheduler, &settings, inputs, &mut |s, _| {
            calls += 1;
            if s == 2 {
                candle_core::bail!("cancelled")
            }
            Ok(())
        });
        assert!(result.is_err());
        assert_eq!(calls, 2);
        Ok(())
    }
}
