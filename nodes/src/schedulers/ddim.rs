//! DDIM (Song et al. 2020), deterministic (η = 0), as diffusers' `DDIMScheduler`, and its
//! inversion, as `DDIMInverseScheduler`.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::{
    divide, integer_timesteps, scale, train_index, BetaSchedule, NoiseScheduleConfig,
    PredictionType, Schedule, ScheduledStep, Scheduler, StepOutput, Timestep, TimestepSpacing,
};

/// diffusers' `DDIMScheduler` configuration, with its defaults for missing keys. Note that these
/// defaults are not SD's settings (see [`DdimSchedulerConfig::sd15`]); SD checkpoints ship
/// their own `scheduler_config.json`.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct DdimSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    /// Clamps the predicted x₀ to ±`clip_sample_range` (meant for pixel-space models).
    pub clip_sample: bool,
    pub clip_sample_range: f64,
    /// Whether the step after the last one uses ᾱ = 1 (else ᾱ of timestep 0).
    pub set_alpha_to_one: bool,
    pub steps_offset: usize,
    pub prediction_type: PredictionType,
    /// Dynamic thresholding (Imagen) is not implemented: a config that enables it is refused.
    pub thresholding: bool,
    pub timestep_spacing: TimestepSpacing,
    pub rescale_betas_zero_snr: bool,
}

impl Default for DdimSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            clip_sample: true,
            clip_sample_range: 1.0,
            set_alpha_to_one: true,
            steps_offset: 0,
            prediction_type: PredictionType::Epsilon,
            thresholding: false,
            timestep_spacing: TimestepSpacing::Leading,
            rescale_betas_zero_snr: false,
        }
    }
}

impl DdimSchedulerConfig {
    /// The settings of SD 1.5's `scheduler_config.json` as used by DDIM pipelines.
    pub fn sd15() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            clip_sample: false,
            set_alpha_to_one: false,
            steps_offset: 1,
            ..Self::default()
        }
    }
}

/// Deterministic DDIM sampling and inversion.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// ᾱ past the last step, where `t − N//n` falls below 0, and before the first step of an
    /// inversion (diffusers' `final_alpha_cumprod` and `initial_alpha_cumprod`).
    final_alpha_cumprod: f32,
}

impl DdimScheduler {
    pub fn new(config: DdimSchedulerConfig) -> Result<Self> {
        if config.thresholding {
            candle_core::bail!("DDIM: thresholding is not supported");
        }
        let alphas_cumprod = NoiseScheduleConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        }
        .alphas_cumprod()?;
        let final_alpha_cumprod = if config.set_alpha_to_one {
            1.0
        } else {
            alphas_cumprod[0]
        };
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
        })
    }

    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }

    /// ᾱ at one end of a step.
    fn alpha_cumprod_at(&self, timestep: Timestep) -> Result<f32> {
        match timestep {
            Timestep::At(t) => {
                Ok(self.alphas_cumprod[train_index(t, self.config.num_train_timesteps)?])
            }
            Timestep::Final => Ok(self.final_alpha_cumprod),
        }
    }

    /// x₀ and ε from the model's prediction for `sample` at noise level ᾱ = `alpha_prod`,
    /// x₀ clipped when the config asks for it.
    fn original_and_noise(
        &self,
        model_output: &Tensor,
        sample: &Tensor,
        alpha_prod: f32,
    ) -> Result<(Tensor, Tensor)> {
        let (sqrt_alpha, sqrt_beta) = (alpha_prod.sqrt(), (1.0 - alpha_prod).sqrt());
        let (pred_original_sample, pred_epsilon) = match self.config.prediction_type {
            PredictionType::Epsilon => {
                let x0 = divide(&(sample - scale(model_output, sqrt_beta)?)?, sqrt_alpha)?;
                (x0, model_output.clone())
            }
            PredictionType::Sample => {
                let eps = divide(&(sample - scale(model_output, sqrt_alpha)?)?, sqrt_beta)?;
                (model_output.clone(), eps)
            }
            PredictionType::VPrediction => {
                let x0 = (scale(sample, sqrt_alpha)? - scale(model_output, sqrt_beta)?)?;
                let eps = (scale(model_output, sqrt_alpha)? + scale(sample, sqrt_beta)?)?;
                (x0, eps)
            }
        };
        let pred_original_sample = if self.config.clip_sample {
            let range = self.config.clip_sample_range as f32;
            pred_original_sample.clamp(-range, range)?
        } else {
            pred_original_sample
        };
        Ok((pred_original_sample, pred_epsilon))
    }

    /// √ᾱ·x₀ + √(1−ᾱ)·ε: the sample at noise level ᾱ on the DDIM trajectory.
    fn at_noise_level(x0: &Tensor, eps: &Tensor, alpha_prod: f32) -> Result<Tensor> {
        let direction = scale(eps, (1.0 - alpha_prod).sqrt())?;
        scale(x0, alpha_prod.sqrt())? + direction
    }
}

impl Scheduler for DdimScheduler {
    /// The integer timesteps of the spacing, each stepping to `t − N//n`: diffusers subtracts
    /// the leading-spacing stride whatever the spacing, so with linspace spacing a step lands
    /// between scheduled timesteps, and so does this port. Below 0 is [`Timestep::Final`].
    fn timesteps(&self, num_inference_steps: usize) -> Result<Schedule> {
        let train = self.config.num_train_timesteps;
        let timesteps = integer_timesteps(
            self.config.timestep_spacing,
            train,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        let stride = (train / num_inference_steps) as i64;
        Schedule::new(
            timesteps
                .into_iter()
                .map(|t| {
                    let prev = t - stride;
                    ScheduledStep {
                        timestep: t as f64,
                        prev_timestep: if prev >= 0 {
                            Timestep::At(prev as f64)
                        } else {
                            Timestep::Final
                        },
                    }
                })
                .collect(),
        )
    }

    fn init_noise_sigma(&self, _first_timestep: f64) -> Result<f64> {
        Ok(1.0)
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// x₀ = (x − √(1−ᾱ_t)·ε) / √ᾱ_t, then x_prev = √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε.
    fn step(
        &self,
        model_output: &Tensor,
        timestep: f64,
        prev_timestep: Timestep,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let alpha_prod_t = self.alpha_cumprod_at(Timestep::At(timestep))?;
        let alpha_prod_prev = self.alpha_cumprod_at(prev_timestep)?;
        let (pred_original_sample, pred_epsilon) =
            self.original_and_noise(model_output, sample, alpha_prod_t)?;
        let prev_sample =
            Self::at_noise_level(&pred_original_sample, &pred_epsilon, alpha_prod_prev)?;
        Ok(StepOutput {
            prev_sample,
            pred_original_sample,
        })
    }

    /// The same two formulas with the noise levels swapped: x₀ from the sample at the less
    /// noisy `timestep`, then √ᾱ_next·x₀ + √(1−ᾱ_next)·ε. [`Timestep::Final`] as the start is
    /// the level before the first step, `final_alpha_cumprod` (diffusers'
    /// `initial_alpha_cumprod`: 1 with `set_alpha_to_one`, else ᾱ of timestep 0), the level
    /// that [`Scheduler::step`] ends on.
    fn invert_step(
        &self,
        model_output: &Tensor,
        timestep: Timestep,
        next_timestep: f64,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let alpha_prod_t = self.alpha_cumprod_at(timestep)?;
        let alpha_prod_next = self.alpha_cumprod_at(Timestep::At(next_timestep))?;
        let (pred_original_sample, pred_epsilon) =
            self.original_and_noise(model_output, sample, alpha_prod_t)?;
        let next_sample =
            Self::at_noise_level(&pred_original_sample, &pred_epsilon, alpha_prod_next)?;
        Ok(StepOutput {
            prev_sample: next_sample,
            pred_original_sample,
        })
    }

    /// √ᾱ_t·x₀ + √(1−ᾱ_t)·ε at an integer training timestep.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let alpha_prod =
            self.alphas_cumprod[train_index(timestep, self.config.num_train_timesteps)?];
        scale(original, alpha_prod.sqrt())? + scale(noise, (1.0 - alpha_prod).sqrt())?
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// `invert_step` then `step` with the same ε returns to the start: max |difference| at
    /// most 1e-5 · max(1, max |x|) (float32 rounding, amplified by 1/√ᾱ at high noise).
    fn assert_round_trip(scheduler: &DdimScheduler, from: Timestep, to: f64) -> Result<()> {
        let x = Tensor::randn(0f32, 1.0, (2, 4, 3, 8, 8), &Device::Cpu)?;
        let eps = Tensor::randn(0f32, 1.0, (2, 4, 3, 8, 8), &Device::Cpu)?;
        let noisier = scheduler.invert_step(&eps, from, to, &x)?.prev_sample;
        let back = scheduler.step(&eps, to, from, &noisier)?.prev_sample;
        let scale = x.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
        let err = crate::test_util::max_abs_diff(&back, &x) as f32;
        assert!(err <= 1e-5 * scale, "{from:?} → {to}: {err}");
        Ok(())
    }

    #[test]
    fn inverting_then_stepping_returns_to_the_start() -> Result<()> {
        for config in [
            DdimSchedulerConfig::sd15(),
            DdimSchedulerConfig {
                timestep_spacing: TimestepSpacing::Linspace,
                set_alpha_to_one: true,
                ..DdimSchedulerConfig::sd15()
            },
        ] {
            let scheduler = DdimScheduler::new(config)?;
            let schedule = scheduler.timesteps(25)?;
            for k in [0, 5, 12, 20, 24] {
                let step = schedule.steps()[k];
                assert_round_trip(&scheduler, step.prev_timestep, step.timestep)?;
            }
        }
        Ok(())
    }

    #[test]
    fn inversion_starts_before_the_first_step_at_the_final_alpha() -> Result<()> {
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let schedule = scheduler.timesteps(25)?;
        let last = schedule.steps()[24];
        assert_eq!((last.timestep, last.prev_timestep), (1.0, Timestep::Final));
        // ε = 0 leaves x₀ = x/√ᾱ_final, which the inversion rescales to √ᾱ_1·x₀.
        let x = Tensor::ones((1, 4), candle_core::DType::F32, &Device::Cpu)?;
        let noisier = scheduler
            .invert_step(&x.zeros_like()?, Timestep::Final, 1.0, &x)?
            .prev_sample;
        let expected =
            scheduler.alphas_cumprod()[1].sqrt() / scheduler.final_alpha_cumprod().sqrt();
        let got = noisier.flatten_all()?.to_vec1::<f32>()?;
        assert!(
            got.iter().all(|&v| (v - expected).abs() < 1e-6),
            "{got:?} vs {expected}"
        );
        Ok(())
    }

    #[test]
    fn steps_past_the_end_take_the_final_alpha() -> Result<()> {
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let schedule = scheduler.timesteps(10)?;
        let prev: Vec<Timestep> = schedule.steps().iter().map(|s| s.prev_timestep).collect();
        assert_eq!(prev[0], Timestep::At(801.0));
        assert_eq!(prev[9], Timestep::Final);
        Ok(())
    }
}
