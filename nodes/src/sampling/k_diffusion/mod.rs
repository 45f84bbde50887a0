//! ComfyUI's samplers: k-diffusion's sampling loops over a table of noise levels σ, as
//! ComfyUI's `comfy/k_diffusion/sampling.py` and `comfy/samplers.py` define them.
//!
//! A k-diffusion sampler sees the model as a [`Denoiser`]: the noisy sample x at noise level σ
//! (x = x₀ + σ·ε) in, the estimate of x₀ out. Unlike the diffusers schedulers in
//! [`crate::schedulers`], these samplers run their own loop (multistep solvers keep earlier
//! estimates, Heun evaluates twice per step), so each is a function from the starting sample
//! and the σ table to the final sample.
//!
//! The pieces: [`model_sampling`] (the model's σ table and its ε parameterisation),
//! [`sigmas`] (the schedulers that pick the σ table of a run), [`samplers`] (the sampling
//! loops) and [`brownian`] (the Brownian-path noise of the SDE samplers). A run as ComfyUI's
//! `KSampler` makes it:
//!
//! ```text
//! let model = ModelSamplingDiscrete::sd()?;
//! let sigmas = calculate_sigmas(&model, Scheduler::Karras, steps)?;
//! let x = model.noise_scaling(sigmas[0], &noise, &latent, model.max_denoise(sigmas[0]))?;
//! let mut path = BrownianNoise::new(gaussian_source);
//! let x0 = sample(SamplerKind::Dpmpp2mSde, &mut denoiser, x, &sigmas, &mut path, None)?;
//! ```

pub mod uni_pc;

use candle_core::{Result, Tensor};

/// The model as k-diffusion sees it.
pub trait Denoiser {
    /// The estimate of the clean sample for `x` at noise level `sigma` (for an ε-prediction
    /// model, x − σ·ε of the model evaluated at the timestep of σ on x / √(σ² + 1)).
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor>;
}

/// Where the ancestral and SDE samplers take their fresh noise from.
pub trait NoiseSampler {
    /// Unit Gaussian noise of the shape, dtype and device of `like`, for the stretch of the
    /// path from `sigma` to `sigma_next` (ComfyUI's `noise_sampler(sigma, sigma_next)`).
    fn sample(&mut self, sigma: f64, sigma_next: f64, like: &Tensor) -> Result<Tensor>;
}

/// What the callback sees after each step.
#[derive(Debug, Clone, Copy)]
pub struct StepInfo<'a> {
    /// The step's index in the σ table (step i goes from σᵢ to σᵢ₊₁).
    pub index: usize,
    /// The sample before the step.
    pub x: &'a Tensor,
    pub sigma: f64,
    pub sigma_next: f64,
    /// The model's estimate of x₀ at this step.
    pub denoised: &'a Tensor,
}

/// Called after each step; an error stops sampling (cancellation) and is returned.
pub type StepCallback<'a> = dyn FnMut(&StepInfo<'_>) -> Result<()> + 'a;

pub mod brownian;
pub mod guider;
pub mod model_sampling;
pub mod samplers;
pub mod sigmas;

pub use brownian::{BrownianNoise, BrownianTime, GaussianSource};
pub use guider::{GuidedDenoiser, PromptEmbeddings};
pub use model_sampling::{BetaSchedule, ModelSamplingDiscrete};
pub use samplers::{sample, SamplerKind};
pub use sigmas::{calculate_sigmas, Scheduler};
