//! The Euler sampler of Karras et al. (2022), as diffusers' `EulerDiscreteScheduler` without
//! stochastic churn (`s_churn = 0`, the pipelines' default).

use candle_core::{DType, Result, Tensor};
use serde::Deserialize;

use super::{
    check_step_count, divide, numpy_arange_down, numpy_interp_index, numpy_linspace, scale,
    BetaSchedule, NoiseScheduleConfig, PredictionType, Scheduler, StepOutput, TimestepSpacing,
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
    /// σ of every training timestep, float32 as diffusers computes it.
    train_sigmas: Vec<f32>,
    timesteps: Vec<f64>,
    /// The σ of every scheduled timestep plus the final σ (one more than `timesteps`).
    sigmas: Vec<f32>,
    /// The position in the schedule; found from the timestep on the first step of a run.
    step_index: Option<usize>,
}

impl EulerDiscreteScheduler {
    /// Builds the training schedule; call [`Scheduler::set_timesteps`] before sampling (until
    /// then the schedule is all training timesteps).
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
        let train_sigmas: Vec<f32> = alphas_cumprod
            .iter()
            .map(|&a| ((1.0 - a) / a).sqrt())
            .collect();
        // Until set_timesteps, the schedule is every training timestep, as in diffusers.
        let timesteps = (0..config.num_train_timesteps)
            .rev()
            .map(|t| t as f64)
            .collect();
        let sigmas = train_sigmas.iter().rev().copied().chain([0.0]).collect();
        Ok(Self {
            config,
            alphas_cumprod,
            train_sigmas,
            timesteps,
            sigmas,
            step_index: None,
        })
    }

    pub fn config(&self) -> &EulerDiscreteSchedulerConfig {
        &self.config
    }

    /// σ of each scheduled timestep followed by the final σ.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// The schedule position of `timestep`: its first occurrence, or the second when it occurs
    /// more than once (diffusers' `index_for_timestep`, so that img2img starting mid-schedule
    /// does not skip a step).
    fn index_for_timestep(&self, timestep: f64) -> Option<usize> {
        let mut matches = self
            .timesteps
            .iter()
            .enumerate()
            .filter(|(_, &t)| t == timestep)
            .map(|(i, _)| i);
        let first = matches.next()?;
        Some(matches.next().unwrap_or(first))
    }

    fn current_index(&self, timestep: f64) -> Result<usize> {
        match self.step_index {
            Some(index) if index < self.timesteps.len() => Ok(index),
            Some(index) => candle_core::bail!(
                "EulerDiscreteScheduler: step {index} is past the end of the {}-step schedule",
                self.timesteps.len()
            ),
            None => self.index_for_timestep(timestep).ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "EulerDiscreteScheduler: timestep {timestep} is not in the schedule"
                ))
            }),
        }
    }
}

impl Scheduler for EulerDiscreteScheduler {
    fn set_timesteps(&mut self, num_inference_steps: usize) -> Result<()> {
        let (train, n) = (self.config.num_train_timesteps, num_inference_steps);
        check_step_count(train, n)?;
        let timesteps: Vec<f32> = match self.config.timestep_spacing {
            TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n)
                .into_iter()
                .rev()
                .map(|t| t as f32)
                .collect(),
            TimestepSpacing::Leading => {
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
        };
        // np.interp over the float32 σ table, evaluated in float64 and stored as float32.
        let table: Vec<f64> = self.train_sigmas.iter().map(|&s| f64::from(s)).collect();
        let mut sigmas: Vec<f32> = timesteps
            .iter()
            .map(|&t| numpy_interp_index(f64::from(t), &table) as f32)
            .collect();
        sigmas.push(match self.config.final_sigmas_type {
            FinalSigmas::Zero => 0.0,
            FinalSigmas::SigmaMin => self.train_sigmas[0],
        });
        self.timesteps = timesteps.into_iter().map(f64::from).collect();
        self.sigmas = sigmas;
        self.step_index = None;
        Ok(())
    }

    fn timesteps(&self) -> &[f64] {
        &self.timesteps
    }

    /// σ_max for linspace and trailing spacing, √(σ_max²+1) for leading (diffusers' choice).
    fn init_noise_sigma(&self) -> f64 {
        let max_sigma = self.sigmas.iter().copied().fold(0f32, f32::max);
        match self.config.timestep_spacing {
            TimestepSpacing::Linspace | TimestepSpacing::Trailing => f64::from(max_sigma),
            TimestepSpacing::Leading => f64::from((max_sigma * max_sigma + 1.0).sqrt()),
        }
    }

    /// `sample / √(σ²+1)` with the σ of the current step.
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = self.sigmas[self.current_index(timestep)?];
        divide(sample, (sigma * sigma + 1.0).sqrt())
    }

    /// x₀ from the prediction, then `x + (x − x₀)/σ · (σ_next − σ)`, in float32 whatever the
    /// sample's dtype; the result takes the model output's dtype.
    fn step(
        &mut self,
        model_output: &Tensor,
        timestep: f64,
        sample: &Tensor,
    ) -> Result<StepOutput> {
        let index = self.current_index(timestep)?;
        let (sigma, sigma_next) = (self.sigmas[index], self.sigmas[index + 1]);
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
        let prev_sample = (&sample + scale(&derivative, sigma_next - sigma)?)?;
        self.step_index = Some(index + 1);
        Ok(StepOutput {
            prev_sample: prev_sample.to_dtype(output_dtype)?,
            pred_original_sample: pred_original_sample.to_dtype(output_dtype)?,
        })
    }

    /// `x₀ + σ·ε` with the σ of `timestep` in the schedule. A timestep outside the schedule
    /// (diffusers raises there) takes σ interpolated from the training table, its true noise
    /// level, so that FreeInit's t = N−1 works with every spacing.
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor> {
        let sigma = match self.index_for_timestep(timestep) {
            Some(index) => self.sigmas[index],
            None => {
                let last = (self.config.num_train_timesteps - 1) as f64;
                if !(0.0..=last).contains(&timestep) {
                    candle_core::bail!(
                        "EulerDiscreteScheduler: timestep {timestep} is outside [0, {last}]"
                    );
                }
                let table: Vec<f64> = self.train_sigmas.iter().map(|&s| f64::from(s)).collect();
                numpy_interp_index(timestep, &table) as f32
            }
        };
        original + scale(noise, sigma)?
    }

    fn alphas_cumprod(&self) -> &[f32] {
        &self.alphas_cumprod
    }
}
