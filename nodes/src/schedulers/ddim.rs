//! DDIM (Song et al. 2020), deterministic (η = 0), as diffusers' `DDIMScheduler`.

use candle_core::{Result, Tensor};
use serde::Deserialize;

use super::{
    divide, integer_timesteps, scale, train_index, BetaSchedule, NoiseScheduleConfig,
    PredictionType, Scheduler, StepOutput, TimestepSpacing,
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

/// Deterministic DDIM sampling.
#[derive(Debug, Clone)]
pub struct DdimScheduler {
    config: DdimSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// ᾱ used after the last step, where `t − N//n` falls below 0.
    final_alpha_cumprod: f32,
    timesteps: Vec<f64>,
    num_inference_steps: usize,
}

impl DdimScheduler {
    /// Builds the training schedule; call [`Scheduler::set_timesteps`] before sampling.
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
        // Until set_timesteps, the schedule lists every training timestep (as in diffusers),
        // but stepping needs the inference step count and is refused.
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
            final_alpha_cumprod,
            timesteps,
            num_inference_steps: 0,
        })
    }

    pub fn config(&self) -> &DdimSchedulerConfig {
        &self.config
    }

    pub fn final_alpha_cumprod(&self) -> f32 {
        self.final_alpha_cumprod
    }
}

impl Scheduler for DdimScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let timesteps = integer_timesteps(
            self.config.timestep_spacing,
            self.config.num_train_timesteps,
            num_inference_steps,
            self.config.steps_offset,
        )?;
        self.timesteps = timesteps.into_iter().map(|t| t as f64).collect();
        self.num_inference_steps = num_inference_steps;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    fn init_noise_sigma(&self) -> f64 {
        1.0
    }

    fn scale_model_input(&self, sample: &Tensor, _timestep: f64) -> Result<Tensor> {
        Ok(sample.clone())
    }

    /// x₀ = (x − √(1−ᾱ_t)·ε) / √ᾱ_t, then x_prev = √ᾱ_prev·x₀ + √(1−ᾱ_prev)·ε with
    /// prev = t − N//n: diffusers subtracts the leading-spacing stride whatever the spacing, so
    /// with linspace spacing the step lands between scheduled timesteps, and so does this port.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        if self.num_inference_steps == 0 {
            candle_core::bail!("DDIM: step called before set_timesteps");
        }
        let train = self.config.num_train_timesteps;
        let t = train_index(timestep, train)?;
        let prev = t as i64 - (train / self.num_inference_steps) as i64;
        let alpha_prod_t = self.alphas_cumprod[t];
        let alpha_prod_prev = if prev >= 0 {
            self.alphas_cumprod[prev as usize]
        } else {
            self.final_alpha_cumprod
        };
        let (sqrt_alpha, sqrt_beta) = (alpha_prod_t.sqrt(), (1.0 - alpha_prod_t).sqrt());

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
        let direction = scale(&pred_epsilon, (1.0 - alpha_prod_prev).sqrt())?;
        let prev_sample = (scale(&pred_original_sample, alpha_prod_prev.sqrt())? + direction)?;
        Ok(StepOutput {
            prev_sample,
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
