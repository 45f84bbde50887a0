//! The Euler sampler of Karras et al. (2022), as diffusers' `EulerDiscreteScheduler` without
//! stochastic churn (`s_churn = 0`, the pipelines' default).

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::{
    check_leading_fits, check_step_count, divide, numpy_arange_down, numpy_interp_index,
    numpy_linspace, scale, BetaSchedule, NoiseScheduleConfig, PredictionType, Schedule,
    ScheduledStep, Scheduler, StepOutput, Timestep, TimestepSpacing,
};

/// Where the last σ of the schedule sits (`final_sigmas_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum FinalSigmas {
    /// The last step goes to σ = 0 (a clean sample).
    Zero,
    /// The last step goes to the σ of training timestep 0.
    SigmaMin,
}

/// diffusers' `EulerDiscreteScheduler` configuration, with its defaults for missing keys.
/// Settings this port does not implement (Karras, exponential or beta sigmas, log-linear
/// interpolation, continuous timesteps) are refused by [`EulerDiscreteScheduler::new`].
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct EulerDiscreteSchedulerConfig {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<Vec<f64>>,
    pub prediction_type: PredictionType,
    pub interpolation_type: String,
    pub use_karras_sigmas: bool,
    pub use_exponential_sigmas: bool,
    pub use_beta_sigmas: bool,
    pub timestep_spacing: TimestepSpacing,
    pub timestep_type: String,
    /// Only used by leading spacing.
    pub steps_offset: usize,
    pub rescale_betas_zero_snr: bool,
    pub final_sigmas_type: FinalSigmas,
}

impl Default for EulerDiscreteSchedulerConfig {
    fn default() -> Self {
        Self {
            num_train_timesteps: 1000,
            beta_start: 0.0001,
            beta_end: 0.02,
            beta_schedule: BetaSchedule::Linear,
            trained_betas: None,
            prediction_type: PredictionType::Epsilon,
            interpolation_type: "linear".into(),
            use_karras_sigmas: false,
            use_exponential_sigmas: false,
            use_beta_sigmas: false,
            timestep_spacing: TimestepSpacing::Linspace,
            timestep_type: "discrete".into(),
            steps_offset: 0,
            rescale_betas_zero_snr: false,
            final_sigmas_type: FinalSigmas::Zero,
        }
    }
}

impl EulerDiscreteSchedulerConfig {
    /// SD 1.5's noise schedule with Euler's own defaults for the rest.
    pub fn sd15() -> Self {
        Self {
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            steps_offset: 1,
            ..Self::default()
        }
    }
}

/// Euler sampling over σ = √((1−ᾱ)/ᾱ), with the sample scaled by 1/√(σ²+1) for the model.
#[derive(Debug, Clone)]
pub struct EulerDiscreteScheduler {
    config: EulerDiscreteSchedulerConfig,
    alphas_cumprod: Vec<f32>,
    /// σ of every training timestep, float32 as diffusers computes it, widened to float64 for
    /// `np.interp`.
    train_sigmas: Vec<f64>,
}

impl EulerDiscreteScheduler {
    pub fn new(config: EulerDiscreteSchedulerConfig) -> Result<Self> {
        let unsupported = [
            (config.use_karras_sigmas, "use_karras_sigmas"),
            (config.use_exponential_sigmas, "use_exponential_sigmas"),
            (config.use_beta_sigmas, "use_beta_sigmas"),
            (
                config.interpolation_type != "linear",
                "interpolation_type other than linear",
            ),
            (
                config.timestep_type != "discrete",
                "timestep_type other than discrete",
            ),
        ];
        if let Some((_, what)) = unsupported.iter().find(|(on, _)| *on) {
            candle_core::bail!("EulerDiscreteScheduler: {what} is not supported");
        }
        let mut alphas_cumprod = NoiseScheduleConfig {
            num_train_timesteps: config.num_train_timesteps,
            beta_start: config.beta_start,
            beta_end: config.beta_end,
            beta_schedule: config.beta_schedule,
            trained_betas: config.trained_betas.as_deref(),
            rescale_betas_zero_snr: config.rescale_betas_zero_snr,
        }
        .alphas_cumprod()?;
        if config.rescale_betas_zero_snr {
            // ᾱ = 0 would make σ infinite; diffusers keeps it just above zero.
            if let Some(last) = alphas_cumprod.last_mut() {
                *last = 2f32.powi(-24);
            }
        }
        let train_sigmas = alphas_cumprod
            .iter()
            .map(|&a| f64::from(((1.0 - a) / a).sqrt()))
            .collect();
        Ok(Self {
            config,
            alphas_cumprod,
            train_sigmas,
        })
    }

    pub fn config(&self) -> &EulerDiscreteSchedulerConfig {
        &self.config
    }

    /// The timesteps of a schedule of `num_inference_steps`, float32 values as diffusers keeps
    /// them.
    fn scheduled_timesteps(&self, num_inference_steps: usize) -> Result<Vec<f32>> {
        let (train, n) = (self.config.num_train_timesteps, num_inference_steps);
        check_step_count(train, n)?;
        Ok(match self.config.timestep_spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
                check_leading_fits(train, n, self.config.steps_offset)?;
                let ratio = (train / n) as f64;
                (0..n)
                    .rev()
                    .map(|k| (k as f64 * ratio) as f32 + self.config.steps_offset as f32)
                    .collect()
            }
            TimestepSpacing::Trailing => {
                numpy_arange_down(train as f64, 0.0, -(train as f64 / n as f64))
                    .into_iter()
                    .map(|t| t.round_ties_even() as f32 - 1.0)
                    .collect()
            }
        })
    }

    /// σ of each scheduled timestep followed by the final σ, as diffusers' `sigmas` after
    /// `set_timesteps(num_inference_steps)`.
    pub fn sigmas(&self, num_inference_steps: usize) -> Result<Vec<f32>> {
        self.scheduled_timesteps(num_inference_steps)?
            .into_iter()
            .map(|t| self.sigma_at(Timestep::At(f64::from(t))))
            .chain([Ok(self.final_sigma())])
            .collect()
    }

    /// σ of the last step's target.
    fn final_sigma(&self) -> f32 {
        match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0] as f32,
        }
    }

    /// σ at one end of a step: `np.interp` over the float32 training σ table, evaluated in
    /// float64 and rounded to float32, exactly as `set_timesteps` builds the schedule's σ.
    fn sigma_at(&self, timestep: Timestep) -> Result<f32> {
        let t = match timestep {
            Timestep::At(t) => t,
            Timestep::Final => return Ok(self.final_sigma()),
        };
        let last = (self.config.num_train_timesteps - 1) as f64;
        if !(0.0..=last).contains(&t) {
            candle_core::bail!("EulerDiscreteScheduler: timestep {t} is outside [0, {last}]");
        }
        Ok(numpy_interp_index(t, &self.train_sigmas) as f32)
    }
}

impl Scheduler for EulerDiscreteScheduler {
    /// The spacing's timesteps, each stepping to the next one and the last to the final σ.
    fn timesteps(&self, num_inference_steps: usize) -> Result<Schedule> {
        let timesteps: Vec<f64> = self
            .scheduled_timesteps(num_inference_steps)?
            .into_iter()
            .map(f64::from)
            .collect();
        let targets = timesteps
            .iter()
            .skip(1)
            .map(|&t| Timestep::At(t))
            .chain([Timestep::Final]);
        Schedule::new(
            timesteps
                .iter()
                .zip(targets)
                .map(|(&timestep, prev_timestep)| ScheduledStep {
                    timestep,
                    prev_timestep,
                })
                .collect(),
        )
    }

    /// σ_max for linspace and trailing spacing, √(σ_max²+1) for leading (diffusers' choice),
    /// σ_max being the σ of the first (noisiest) timestep.
    fn init_noise_sigma(&self, first_timestep: f64) -> Result<f64> {
        let max_sigma = self.sigma_at(Timestep::At(first_timestep))?;
        Ok(match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max_sigma),
            TimestepSpacing::Leading => f64::from((max_sigma * max_sigma + 1.0).sqrt()),
        })
    }

    /// `sample / √(σ²+1)` with the σ of `timestep`.
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigma_at(Timestep::At(timestep))?;
        divide(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// x₀ from the prediction, then `x + (x − x₀)/σ · (σ_prev − σ)`, in float32 whatever the
    /// sample's dtype; the result takes the model output's dtype.
    fn step(
        &self,
        model_output: &Tensor,
        timestep: f64,
        prev_timestep: Timestep,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let sigma = self.sigma_at(Timestep::At(timestep))?;
        let sigma_prev = self.sigma_at(prev_timestep)?;
        let output_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;

        let pred_original_sample = match self.config.prediction_type {
            PredictionType::Epsilon => (&sample - scale(&model_output, sigma)?)?,
            PredictionType::VPrediction => {
                let variance = sigma * sigma + 1.0;
                (scale(&model_output, -sigma / variance.sqrt())? + divide(&sample, variance)?)?
            }
            PredictionType::Sample => model_output.clone(),
        };
        let derivative = divide(&(&sample - &pred_original_sample)?, sigma)?;
        let prev_sample = (&sample + scale(&derivative, sigma_prev - sigma)?)?;
        Ok(StepOutput {
            prev_sample: prev_sample.to_dtype(output_dtype)?,
            pred_original_sample: pred_original_sample.to_dtype(output_dtype)?,
        })
    }

    /// `x + ε·(σ_next − σ)`: the Euler step run backwards along the same derivative ε, from
    /// the σ of `timestep` ([`Timestep::Final`]: the final σ) up to the σ of `next_timestep`.
    /// The derivative is ε itself, so only ε-prediction is supported (x₀- and v-prediction
    /// would need σ > 0 at the start, which the final σ of 0 is not).
    fn invert_step(
        &self,
        model_output: &Tensor,
        timestep: Timestep,
        next_timestep: f64,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        if self.config.prediction_type != PredictionType::Epsilon {
            candle_core::bail!(
                "EulerDiscreteScheduler: inversion supports epsilon prediction only, not {:?}",
                self.config.prediction_type
            );
        }
        let sigma = self.sigma_at(timestep)?;
        let sigma_next = self.sigma_at(Timestep::At(next_timestep))?;
        let output_dtype = model_output.dtype();
        let sample = sample.to_dtype(DType::F32)?;
        let model_output = model_output.to_dtype(DType::F32)?;
        let pred_original_sample = (&sample - scale(&model_output, sigma)?)?;
        let next_sample = (&sample + scale(&model_output, sigma_next - sigma)?)?;
        Ok(StepOutput {
            prev_sample: next_sample.to_dtype(output_dtype)?,
            pred_original_sample: pred_original_sample.to_dtype(output_dtype)?,
        })
    }

    /// `x₀ + σ·ε` with σ interpolated from the training table: the σ a schedule gives
    /// `timestep` when it is scheduled, and its true noise level otherwise (diffusers raises
    /// there), so that FreeInit's t = N−1 works with every spacing.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigma_at(Timestep::At(timestep))?;
        original + scale(noise, sigma)?
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn inverting_then_stepping_returns_to_the_start() -> Result<()> {
        let scheduler = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig::sd15())?;
        let schedule = scheduler.timesteps(25)?;
        for k in [0, 7, 24] {
            let step = schedule.steps()[k];
            let x = Tensor::randn(0f32, 1.0, (1, 4, 2, 8, 8), &Device::Cpu)?;
            let eps = Tensor::randn(0f32, 1.0, (1, 4, 2, 8, 8), &Device::Cpu)?;
            let noisier = scheduler
                .invert_step(&eps, step.prev_timestep, step.timestep, &x)?
                .prev_sample;
            let back = scheduler
                .step(&eps, step.timestep, step.prev_timestep, &noisier)?
                .prev_sample;
            // Euler samples are x₀ + σ·ε with σ up to ~14.6: the bound scales with the sample.
            let scale = noisier.abs()?.max_all()?.to_scalar::<f32>()?.max(1.0);
            let err = crate::test_util::max_abs_diff(&back, &x) as f32;
            assert!(err <= 1e-5 * scale, "step {k}: {err}");
        }
        Ok(())
    }

    #[test]
    fn sigma_follows_the_timestep_passed_in() -> Result<()> {
        let scheduler = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig::sd15())?;
        let schedule = scheduler.timesteps(25)?;
        let sigmas = scheduler.sigmas(25)?;
        for (step, &sigma) in schedule.steps().iter().zip(&sigmas) {
            assert_eq!(scheduler.sigma_at(Timestep::At(step.timestep))?, sigma);
        }
        assert_eq!(scheduler.sigma_at(Timestep::Final)?, sigmas[25]);
        let v_prediction = EulerDiscreteScheduler::new(EulerDiscreteSchedulerConfig {
            prediction_type: PredictionType::VPrediction,
            ..EulerDiscreteSchedulerConfig::sd15()
        })?;
        let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu)?;
        assert!(v_prediction
            .invert_step(&x, Timestep::Final, 999.0, &x)
            .is_err());
        Ok(())
    }
}
