//! ComfyUI's `ModelSamplingDiscrete` for ε-prediction models (`comfy/model_sampling.py`): the
//! table of the noise levels σ_t of the model's training timesteps, the maps between σ and
//! timesteps, and how the sampler's x at σ becomes the model's input and the model's ε an
//! estimate of x₀.
//!
//! Like ComfyUI, the table is computed in f64 from the betas and stored in f32
//! (`sigmas.float()`, `sigmas.log().float()`), so schedules built on it (simple, ddim_uniform,
//! beta, …) pick exactly ComfyUI's values.

use candle_core::{Result, Tensor};

/// The beta schedules of ComfyUI's `make_beta_schedule`
/// (`comfy/ldm/modules/diffusionmodules/util.py`). The names are the LDM code's, not
/// diffusers': ComfyUI's "linear" is Stable Diffusion's schedule, linear in √β (diffusers'
/// "scaled_linear"), and "sqrt_linear" is linear in β.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BetaSchedule {
    /// β_t = (√β_start + t/(T−1)·(√β_end − √β_start))²: Stable Diffusion's schedule.
    Linear,
    /// β_t = β_start + t/(T−1)·(β_end − β_start).
    SqrtLinear,
    /// ᾱ_t ∝ cos²((t/T + s)/(1 + s)·π/2) with s = 0.008, β clipped to [0, 0.999]
    /// (Nichol & Dhariwal).
    Cosine,
    /// β_t = √(β_start + t/(T−1)·(β_end − β_start)).
    Sqrt,
}

impl BetaSchedule {
    /// Every schedule with its ComfyUI name.
    pub const ALL: [BetaSchedule; 4] = [Self::Linear, Self::SqrtLinear, Self::Cosine, Self::Sqrt];

    /// The schedule of a ComfyUI `beta_schedule` name.
    pub fn from_comfy_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|schedule| schedule.name() == name)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "unknown beta schedule {name:?}; expected one of linear, sqrt_linear, \
                     cosine, sqrt"
                ))
            })
    }

    /// ComfyUI's name of the schedule.
    pub fn name(self) -> &'static str {
        match self {
            Self::Linear => "linear",
            Self::SqrtLinear => "sqrt_linear",
            Self::Cosine => "cosine",
            Self::Sqrt => "sqrt",
        }
    }

    /// The `timesteps` betas of the schedule, in f64 as ComfyUI computes them.
    pub fn betas(self, timesteps: usize, linear_start: f64, linear_end: f64) -> Result<Vec<f64>> {
        if timesteps < 2 {
            candle_core::bail!("a beta schedule needs at least 2 timesteps, got {timesteps}");
        }
        Ok(match self {
            Self::Linear => torch_linspace(linear_start.sqrt(), linear_end.sqrt(), timesteps)
                .into_iter()
                .map(|b| b * b)
                .collect(),
            Self::SqrtLinear => torch_linspace(linear_start, linear_end, timesteps),
            Self::Sqrt => torch_linspace(linear_start, linear_end, timesteps)
                .into_iter()
                .map(f64::sqrt)
                .collect(),
            Self::Cosine => {
                const COSINE_S: f64 = 8e-3;
                let alpha_bar: Vec<f64> = (0..=timesteps)
                    .map(|t| {
                        let phase = (t as f64 / timesteps as f64 + COSINE_S) / (1.0 + COSINE_S);
                        (phase * std::f64::consts::PI / 2.0).cos().powi(2)
                    })
                    .collect();
                alpha_bar
                    .windows(2)
                    .map(|pair| 1.0 - (pair[1] / alpha_bar[0]) / (pair[0] / alpha_bar[0]))
                    .map(|beta| beta.clamp(0.0, 0.999))
                    .collect()
            }
        })
    }
}

/// `torch.linspace(start, end, steps)` in f64: the first half counts up from `start`, the
/// second half down from `end`, as PyTorch's kernel does, so the values agree to the last bit.
pub(crate) fn torch_linspace(start: f64, end: f64, steps: usize) -> Vec<f64> {
    match steps {
        0 => Vec::new(),
        1 => vec![start],
        _ => {
            let step = (end - start) / (steps - 1) as f64;
            let halfway = steps / 2;
            (0..steps)
                .map(|i| {
                    if i < halfway {
                        start + step * i as f64
                    } else {
                        end - step * (steps - 1 - i) as f64
                    }
                })
                .collect()
        }
    }
}

/// A discrete-time ε-prediction model's noise levels: σ_t = √((1 − ᾱ_t)/ᾱ_t) for each training
/// timestep t, ascending in t.
#[derive(Debug, Clone, PartialEq)]
pub struct ModelSamplingDiscrete {
    sigmas: Vec<f32>,
    log_sigmas: Vec<f32>,
}

impl ModelSamplingDiscrete {
    /// Stable Diffusion's β range, ComfyUI's default.
    pub const SD_LINEAR_START: f64 = 0.00085;
    pub const SD_LINEAR_END: f64 = 0.012;
    /// Training timesteps of the SD family.
    pub const SD_TIMESTEPS: usize = 1000;

    /// ComfyUI's default model sampling of SD 1.x/2.x-style ε models: the "linear" schedule
    /// (linear in √β) from 0.00085 to 0.012 over 1000 timesteps.
    pub fn sd() -> Result<Self> {
        Self::new(BetaSchedule::Linear)
    }

    /// The schedule over SD's β range and 1000 timesteps, as ComfyUI builds it from a model
    /// config's `beta_schedule`.
    pub fn new(schedule: BetaSchedule) -> Result<Self> {
        Self::from_betas(&schedule.betas(
            Self::SD_TIMESTEPS,
            Self::SD_LINEAR_START,
            Self::SD_LINEAR_END,
        )?)
    }

    /// From the betas: ᾱ_t = Π_{s≤t} (1 − β_s).
    pub fn from_betas(betas: &[f64]) -> Result<Self> {
        if let Some(beta) = betas.iter().find(|b| !(**b > 0.0 && **b < 1.0)) {
            candle_core::bail!("every beta must be in (0, 1), got {beta}");
        }
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .scan(1.0, |product, beta| {
                *product *= 1.0 - beta;
                Some(*product)
            })
            .collect();
        Self::from_alphas_cumprod(&alphas_cumprod)
    }

    /// From an explicit ᾱ table (one value per training timestep, each in (0, 1)), for
    /// schedules that are not one of [`BetaSchedule`].
    pub fn from_alphas_cumprod(alphas_cumprod: &[f64]) -> Result<Self> {
        if alphas_cumprod.len() < 2 {
            candle_core::bail!(
                "the alphas_cumprod table needs at least 2 timesteps, got {}",
                alphas_cumprod.len()
            );
        }
        if let Some((t, a)) = alphas_cumprod
            .iter()
            .enumerate()
            .find(|(_, a)| !(**a > 0.0 && **a < 1.0))
        {
            candle_core::bail!(
                "alphas_cumprod must be in (0, 1) at every timestep (σ = √((1 − ᾱ)/ᾱ) must be \
                 finite and positive), got {a} at timestep {t}"
            );
        }
        let sigmas64: Vec<f64> = alphas_cumprod
            .iter()
            .map(|a| ((1.0 - a) / a).sqrt())
            .collect();
        Ok(Self {
            sigmas: sigmas64.iter().map(|s| *s as f32).collect(),
            log_sigmas: sigmas64.iter().map(|s| s.ln() as f32).collect(),
        })
    }

    /// σ of every training timestep, in f32 as ComfyUI stores them.
    pub fn sigmas(&self) -> &[f32] {
        &self.sigmas
    }

    /// ln σ of every training timestep (the f64 log rounded to f32).
    pub fn log_sigmas(&self) -> &[f32] {
        &self.log_sigmas
    }

    /// Training timesteps.
    pub fn num_timesteps(&self) -> usize {
        self.sigmas.len()
    }

    /// σ of the first timestep.
    pub fn sigma_min(&self) -> f64 {
        f64::from(self.sigmas[0])
    }

    /// σ of the last timestep.
    pub fn sigma_max(&self) -> f64 {
        f64::from(self.sigmas[self.sigmas.len() - 1])
    }

    /// The timestep whose σ is nearest to `sigma` in log space (ComfyUI's argmin over
    /// |ln σ − ln σ_t|; the first such timestep on a tie).
    pub fn timestep(&self, sigma: f64) -> usize {
        let log_sigma = sigma.ln();
        let mut best = (0, f64::INFINITY);
        for (t, log_sigma_t) in self.log_sigmas.iter().enumerate() {
            let distance = (log_sigma - f64::from(*log_sigma_t)).abs();
            if distance < best.1 {
                best = (t, distance);
            }
        }
        best.0
    }

    /// σ at a possibly fractional timestep, clamped to the table: ln σ interpolated linearly
    /// between the neighbouring timesteps.
    pub fn sigma(&self, timestep: f64) -> f64 {
        let last = (self.sigmas.len() - 1) as f64;
        let t = timestep.clamp(0.0, last);
        let (low, high) = (t.floor() as usize, t.ceil() as usize);
        let w = t - t.floor();
        let log_sigma =
            (1.0 - w) * f64::from(self.log_sigmas[low]) + w * f64::from(self.log_sigmas[high]);
        log_sigma.exp()
    }

    /// σ at a share of the sampling run (0 = start, 1 = end), as ComfyUI maps the start and
    /// end percentages of conditionings and ControlNets: σ of timestep (1 − percent)·999.
    /// At or below 0 it is 999999999.9 (above every σ), at or above 1 it is 0.
    pub fn percent_to_sigma(&self, percent: f64) -> f64 {
        if percent <= 0.0 {
            return 999_999_999.9;
        }
        if percent >= 1.0 {
            return 0.0;
        }
        self.sigma((1.0 - percent) * 999.0)
    }

    /// The model's input for the sample `x` at noise level σ: x / √(σ² + 1) (`EPS.calculate_input`
    /// with σ_data = 1), so that it has unit variance as during training.
    pub fn calculate_input(&self, sigma: f64, x: &Tensor) -> Result<Tensor> {
        x / (sigma * sigma + 1.0).sqrt()
    }

    /// The estimate of x₀ from the model's ε for the sample `x` at noise level σ: x − σ·ε
    /// (`EPS.calculate_denoised`).
    pub fn calculate_denoised(&self, sigma: f64, eps: &Tensor, x: &Tensor) -> Result<Tensor> {
        x - (eps * sigma)?
    }

    /// The starting sample of a run at σ from unit noise and a latent: latent + σ·noise, or
    /// latent + √(1 + σ²)·noise with `max_denoise` (`EPS.noise_scaling`: from pure noise, the
    /// variance of the sample is 1 + σ², as the model saw at its last timestep).
    pub fn noise_scaling(
        &self,
        sigma: f64,
        noise: &Tensor,
        latent: &Tensor,
        max_denoise: bool,
    ) -> Result<Tensor> {
        let scale = if max_denoise {
            (1.0 + sigma * sigma).sqrt()
        } else {
            sigma
        };
        (noise * scale)? + latent
    }

    /// Whether a run starting at `first_sigma` starts from pure noise (ComfyUI's
    /// `Sampler.max_denoise`: σ within a relative 1e-5 of σ_max, or above it), the case where
    /// [`Self::noise_scaling`] takes `max_denoise`.
    pub fn max_denoise(&self, first_sigma: f64) -> bool {
        let max = self.sigma_max();
        (max - first_sigma).abs() <= 1e-5 * max.abs().max(first_sigma.abs()) || first_sigma > max
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::collections::HashMap;

    use super::*;
    use candle_core::{DType, Device};

    /// The tensors of a fixture file of `tests/fixtures/k_diffusion`.
    pub(crate) fn fixture(name: &str) -> HashMap<String, Tensor> {
        let path = format!(
            "{}/../tests/fixtures/k_diffusion/{name}",
            env!("CARGO_MANIFEST_DIR")
        );
        candle_core::safetensors::load(&path, &Device::Cpu)
            .unwrap_or_else(|err| panic!("cannot read {path}: {err}"))
    }

    /// A fixture tensor as f64 values.
    pub(crate) fn values(tensors: &HashMap<String, Tensor>, key: &str) -> Vec<f64> {
        tensors
            .get(key)
            .unwrap_or_else(|| panic!("no {key} in the fixture"))
            .to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .unwrap_or_else(|err| panic!("{key}: {err}"))
    }

    /// max |a − b| relative to max |reference|.
    pub(crate) fn relative_error(actual: &[f64], reference: &[f64]) -> f64 {
        assert_eq!(actual.len(), reference.len(), "lengths differ");
        let scale = reference.iter().fold(0.0f64, |m, v| m.max(v.abs()));
        let error = actual
            .iter()
            .zip(reference)
            .fold(0.0f64, |m, (a, r)| m.max((a - r).abs()));
        error / scale
    }

    #[test]
    fn sigma_tables_match_comfyui_for_every_beta_schedule() -> Result<()> {
        let reference = fixture("schedules.safetensors");
        for schedule in BetaSchedule::ALL {
            let sampling = ModelSamplingDiscrete::new(schedule)?;
            let ours: Vec<f64> = sampling.sigmas().iter().map(|s| f64::from(*s)).collect();
            let expected = values(&reference, &format!("model_sigmas.{}", schedule.name()));
            let error = relative_error(&ours, &expected);
            assert!(error <= 1e-6, "{}: relative error {error}", schedule.name());
        }
        Ok(())
    }

    #[test]
    fn an_explicit_alphas_cumprod_table_gives_the_same_model() -> Result<()> {
        let betas = BetaSchedule::SqrtLinear.betas(1000, 0.00085, 0.012)?;
        let mut product = 1.0;
        let alphas_cumprod: Vec<f64> = betas
            .iter()
            .map(|b| {
                product *= 1.0 - b;
                product
            })
            .collect();
        assert_eq!(
            ModelSamplingDiscrete::from_alphas_cumprod(&alphas_cumprod)?,
            ModelSamplingDiscrete::new(BetaSchedule::SqrtLinear)?
        );
        assert!(ModelSamplingDiscrete::from_alphas_cumprod(&[0.5, 1.0]).is_err());
        assert!(ModelSamplingDiscrete::from_alphas_cumprod(&[0.5]).is_err());
        assert!(BetaSchedule::from_comfy_name("scaled_linear").is_err());
        assert_eq!(
            BetaSchedule::from_comfy_name("sqrt_linear")?,
            BetaSchedule::SqrtLinear
        );
        Ok(())
    }

    #[test]
    fn timestep_sigma_and_percent_match_comfyui() -> Result<()> {
        let reference = fixture("schedules.safetensors");
        let sampling = ModelSamplingDiscrete::sd()?;
        let probes = values(&reference, "timestep.sigma");
        let timesteps = values(&reference, "timestep.timestep");
        for (sigma, t) in probes.iter().zip(&timesteps) {
            assert_eq!(
                sampling.timestep(*sigma) as f64,
                *t,
                "timestep of σ = {sigma}"
            );
        }
        let probes = values(&reference, "sigma.timestep");
        let ours: Vec<f64> = probes.iter().map(|t| sampling.sigma(*t)).collect();
        let error = relative_error(&ours, &values(&reference, "sigma.sigma"));
        assert!(error <= 1e-5, "sigma(t): relative error {error}");
        let percents = values(&reference, "percent_to_sigma.percent");
        let expected = values(&reference, "percent_to_sigma.sigma");
        for (percent, expected) in percents.iter().zip(&expected) {
            let ours = sampling.percent_to_sigma(*percent);
            assert!(
                (ours - expected).abs() <= 1e-5 * expected.abs(),
                "percent_to_sigma({percent}) = {ours}, ComfyUI {expected}"
            );
        }
        Ok(())
    }

    #[test]
    fn input_denoised_and_noise_scaling_follow_the_eps_formulas() -> Result<()> {
        let sampling = ModelSamplingDiscrete::sd()?;
        let dev = Device::Cpu;
        let x = Tensor::new(&[3.0f32, -4.0], &dev)?;
        let eps = Tensor::new(&[1.0f32, 0.5], &dev)?;
        let input = sampling.calculate_input(3.0, &x)?.to_vec1::<f32>()?;
        let scale = 1.0 / 10f32.sqrt();
        assert_eq!(input, [3.0 * scale, -4.0 * scale]);
        let denoised = sampling
            .calculate_denoised(2.0, &eps, &x)?
            .to_vec1::<f32>()?;
        assert_eq!(denoised, [1.0, -5.0]);
        let latent = Tensor::new(&[1.0f32, 1.0], &dev)?;
        let scaled = sampling.noise_scaling(2.0, &eps, &latent, false)?;
        assert_eq!(scaled.to_vec1::<f32>()?, [3.0, 2.0]);
        let scaled = sampling.noise_scaling(2.0, &eps, &latent, true)?;
        let factor = 5f32.sqrt();
        assert_eq!(scaled.to_vec1::<f32>()?, [1.0 + factor, 1.0 + 0.5 * factor]);
        assert!(sampling.max_denoise(sampling.sigma_max()));
        assert!(sampling.max_denoise(sampling.sigma_max() * (1.0 - 1e-6)));
        assert!(!sampling.max_denoise(sampling.sigma_max() * 0.99));
        Ok(())
    }
}
