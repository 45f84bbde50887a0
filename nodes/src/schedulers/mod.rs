//! Noise schedulers, ported from diffusers with its float32/float64 rounding where it shows.
//!
//! Every scheduler is built from the diffusers `scheduler_config.json` (a config struct with
//! diffusers' defaults per scheduler class; unknown keys such as `_class_name` are ignored).
//! A scheduler keeps no per-run state: [`Scheduler::timesteps`] returns the schedule, each step
//! naming the timestep it denoises from and the one it goes to, and every other method takes
//! the timesteps it works on, so one scheduler serves any number of runs, passes and subsets
//! of frames at once:
//!
//! ```text
//! let schedule = scheduler.timesteps(n)?;
//! let mut x = (noise * scheduler.init_noise_sigma(schedule.first_timestep())?)?;
//! for step in schedule.steps() {
//!     let input = scheduler.scale_model_input(&x, step.timestep)?;
//!     let eps = unet(input, step.timestep)?;
//!     x = scheduler.step(&eps, step.timestep, step.prev_timestep, &x)?.prev_sample;
//! }
//! ```
//!
//! Multistep solvers that need earlier model outputs would take them as arguments rather than
//! keep them.

use std::path::Path;

use candle_core::{Result, Tensor};
use serde::Deserialize;

pub mod ddim;
pub mod euler;

pub use ddim::{DdimScheduler, DdimSchedulerConfig};
pub use euler::{EulerDiscreteScheduler, EulerDiscreteSchedulerConfig};

/// What one denoising (or inversion) step returns.
#[derive(Debug, Clone)]
pub struct StepOutput {
    /// The sample at the timestep the step went to: the less noisy one for
    /// [`Scheduler::step`], the noisier one for [`Scheduler::invert_step`].
    pub prev_sample: Tensor,
    /// The scheduler's estimate of the clean sample x₀ at this step.
    pub pred_original_sample: Tensor,
}

/// One end of a step: a timestep, or the noise level past the last step of a schedule.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Timestep {
    /// A timestep the model is conditioned on: an integer training timestep for DDIM, possibly
    /// fractional for Euler.
    At(f64),
    /// Past the end of the schedule: DDIM's `t − N//n < 0`, which takes `final_alpha_cumprod`
    /// (1 with `set_alpha_to_one`, else ᾱ of timestep 0), and Euler's final σ (0 or σ_min).
    /// An inversion starts from this same level, so inverting the last step undoes it.
    Final,
}

impl Timestep {
    /// The timestep, or `None` past the end.
    pub fn value(self) -> Option<f64> {
        match self {
            Self::At(t) => Some(t),
            Self::Final => None,
        }
    }
}

/// One step of a schedule: denoise from `timestep` to `prev_timestep` (diffusers' names: the
/// previous timestep is the less noisy one).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ScheduledStep {
    pub timestep: f64,
    pub prev_timestep: Timestep,
}

/// The steps of one sampling run, from the noisiest down.
#[derive(Debug, Clone, PartialEq)]
pub struct Schedule {
    steps: Vec<ScheduledStep>,
}

impl Schedule {
    /// A schedule of at least one step.
    pub fn new(steps: Vec<ScheduledStep>) -> Result<Self> {
        if steps.is_empty() {
            candle_core::bail!("a schedule needs at least one step");
        }
        Ok(Self { steps })
    }

    pub fn steps(&self) -> &[ScheduledStep] {
        &self.steps
    }

    /// The timesteps the model is conditioned on, in order.
    pub fn timesteps(&self) -> Vec<f64> {
        self.steps.iter().map(|s| s.timestep).collect()
    }

    /// The noisiest timestep, where sampling starts.
    pub fn first_timestep(&self) -> f64 {
        self.steps[0].timestep
    }

    pub fn len(&self) -> usize {
        self.steps.len()
    }

    /// Always false: a schedule has at least one step.
    pub fn is_empty(&self) -> bool {
        self.steps.is_empty()
    }

    /// The last `count` steps (at least one), keeping where each goes: video-to-video runs the
    /// tail of the full schedule (diffusers' `get_timesteps`).
    pub fn tail(&self, count: usize) -> Self {
        let count = count.clamp(1, self.steps.len());
        Self {
            steps: self.steps[self.steps.len() - count..].to_vec(),
        }
    }
}

/// A diffusers-style noise scheduler without per-run state. Timesteps are the values the UNet
/// is conditioned on: integers for DDIM, fractional values for Euler's linspace spacing.
pub trait Scheduler: Send + Sync + std::fmt::Debug {
    /// The schedule of `num_inference_steps` steps (diffusers' `set_timesteps`).
    fn timesteps(&self, num_inference_steps: usize) -> Result<Schedule>;

    /// The factor that turns unit Gaussian noise into the first sample of a schedule starting
    /// at `first_timestep` (diffusers' `init_noise_sigma` after `set_timesteps`).
    fn init_noise_sigma(&self, first_timestep: f64) -> Result<f64>;

    /// The UNet input for `sample` at `timestep` (Euler divides by √(σ²+1); DDIM returns it as is).
    fn scale_model_input(&self, sample: &Tensor, timestep: f64) -> Result<Tensor>;

    /// One denoising step from `sample` at `timestep` to `prev_timestep`, given the model's
    /// prediction.
    fn step(
        &self,
        model_output: &Tensor,
        timestep: f64,
        prev_timestep: Timestep,
        sample: &Tensor,
    ) -> Result<StepOutput>;

    /// One inversion step from `sample` at the less noisy `timestep` to the noisier
    /// `next_timestep`, given the model's prediction (diffusers' `DDIMInverseScheduler`):
    /// the exact reverse of [`Scheduler::step`] for the same prediction.
    fn invert_step(
        &self,
        model_output: &Tensor,
        timestep: Timestep,
        next_timestep: f64,
        sample: &Tensor,
    ) -> Result<StepOutput>;

    /// Diffuses `original` to the noise level of `timestep` with `noise` (img2img, FreeInit).
    fn add_noise(&self, original: &Tensor, noise: &Tensor, timestep: f64) -> Result<Tensor>;

    /// ᾱ of every training timestep, in float32 as diffusers keeps it.
    fn alphas_cumprod(&self) -> &[f32];
}

/// How β grows over the training timesteps (`beta_schedule`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BetaSchedule {
    /// β evenly spaced from `beta_start` to `beta_end`.
    Linear,
    /// √β evenly spaced: Stable Diffusion's schedule.
    ScaledLinear,
    /// The cosine ᾱ schedule of improved DDPM, β capped at 0.999.
    SquaredcosCapV2,
}

/// How the inference timesteps are placed among the training ones (`timestep_spacing`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TimestepSpacing {
    /// `k · (N // n) + steps_offset`: never reaches the last training timestep.
    Leading,
    /// `n` evenly spaced values from N−1 down to 0.
    Linspace,
    /// `round(N − k · N/n) − 1`: starts at N−1.
    Trailing,
}

/// What the model predicts (`prediction_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PredictionType {
    /// The added noise ε (SD 1.x, SD 2.x base).
    Epsilon,
    /// v = √ᾱ·ε − √(1−ᾱ)·x₀ (SD 2.x 768-v).
    VPrediction,
    /// The clean sample x₀ itself.
    #[serde(alias = "original_sample")]
    Sample,
}

/// The training noise schedule shared by the discrete schedulers.
#[derive(Debug, Clone, Copy)]
pub(crate) struct NoiseScheduleConfig<'a> {
    pub num_train_timesteps: usize,
    pub beta_start: f64,
    pub beta_end: f64,
    pub beta_schedule: BetaSchedule,
    pub trained_betas: Option<&'a [f64]>,
    pub rescale_betas_zero_snr: bool,
}

impl NoiseScheduleConfig<'_> {
    /// ᾱ_t = Π(1 − β), with β and the products in float32 as torch computes them (its CPU
    /// cumprod accumulates in float64 and rounds each output).
    pub fn alphas_cumprod(&self) -> Result<Vec<f32>> {
        let n = self.num_train_timesteps;
        if n < 2 {
            candle_core::bail!("num_train_timesteps must be at least 2, got {n}");
        }
        let mut betas: Vec<f32> = match self.trained_betas {
            Some(trained) => {
                if trained.len() != n {
                    candle_core::bail!(
                        "trained_betas has {} values for num_train_timesteps {n}",
                        trained.len()
                    );
                }
                trained.iter().map(|&b| b as f32).collect()
            }
            None => match self.beta_schedule {
                BetaSchedule::Linear => {
                    torch_linspace_f32(self.beta_start as f32, self.beta_end as f32, n)
                }
                BetaSchedule::ScaledLinear => torch_linspace_f32(
                    self.beta_start.sqrt() as f32,
                    self.beta_end.sqrt() as f32,
                    n,
                )
                .into_iter()
                .map(|b| b * b)
                .collect(),
                BetaSchedule::SquaredcosCapV2 => {
                    let alpha_bar = |t: f64| {
                        ((t + 0.008) / 1.008 * std::f64::consts::FRAC_PI_2)
                            .cos()
                            .powi(2)
                    };
                    (0..n)
                        .map(|i| {
                            let (t1, t2) = (i as f64 / n as f64, (i + 1) as f64 / n as f64);
                            (1.0 - alpha_bar(t2) / alpha_bar(t1)).min(0.999) as f32
                        })
                        .collect()
                }
            },
        };
        if self.rescale_betas_zero_snr {
            betas = rescale_zero_terminal_snr(&betas);
        }
        Ok(cumprod_f32(betas.iter().map(|&b| 1.0 - b)))
    }
}

/// Rescales β so that the last timestep has zero SNR (Lin et al. 2023, Algorithm 1), in float32
/// as diffusers does.
fn rescale_zero_terminal_snr(betas: &[f32]) -> Vec<f32> {
    let alphas_cumprod = cumprod_f32(betas.iter().map(|&b| 1.0 - b));
    let sqrt_bar: Vec<f32> = alphas_cumprod.iter().map(|a| a.sqrt()).collect();
    let (first, last) = (sqrt_bar[0], sqrt_bar[sqrt_bar.len() - 1]);
    let scale = first / (first - last);
    let alphas_bar: Vec<f32> = sqrt_bar
        .iter()
        .map(|&s| {
            let shifted = (s - last) * scale;
            shifted * shifted
        })
        .collect();
    let mut rescaled = Vec::with_capacity(betas.len());
    rescaled.push(1.0 - alphas_bar[0]);
    for pair in alphas_bar.windows(2) {
        rescaled.push(1.0 - pair[1] / pair[0]);
    }
    rescaled
}

fn cumprod_f32(values: impl Iterator<Item = f32>) -> Vec<f32> {
    let mut product = 1f64;
    values
        .map(|v| {
            product *= f64::from(v);
            product as f32
        })
        .collect()
}

/// `torch.linspace(start, end, steps, dtype=float32)` on the CPU: float32 arithmetic, the first
/// half counted up from `start` and the second half down from `end`, each value one fused
/// multiply-add (as torch's compiled kernel evaluates it; this reproduces SD's ᾱ table bit for
/// bit).
fn torch_linspace_f32(start: f32, end: f32, steps: usize) -> Vec<f32> {
    if steps == 1 {
        return vec![start];
    }
    let step = (end - start) / (steps - 1) as f32;
    let halfway = steps / 2;
    (0..steps)
        .map(|i| {
            if i < halfway {
                step.mul_add(i as f32, start)
            } else {
                (-step).mul_add((steps - i - 1) as f32, end)
            }
        })
        .collect()
}

/// `np.linspace(start, stop, num)` in float64: `start + i·step`, the last value exactly `stop`.
pub(crate) fn numpy_linspace(start: f64, stop: f64, num: usize) -> Vec<f64> {
    if num == 1 {
        return vec![start];
    }
    let step = (stop - start) / (num - 1) as f64;
    let mut values: Vec<f64> = (0..num).map(|i| i as f64 * step + start).collect();
    values[num - 1] = stop;
    values
}

/// `np.arange(start, stop, step)` in float64 for a negative `step`.
pub(crate) fn numpy_arange_down(start: f64, stop: f64, step: f64) -> Vec<f64> {
    let len = ((stop - start) / step).ceil().max(0.0) as usize;
    if len == 0 {
        return Vec::new();
    }
    // numpy fills from the first two values, so the effective step is their rounded difference.
    let delta = (start + step) - start;
    (0..len).map(|i| start + i as f64 * delta).collect()
}

/// `np.interp(x, [0, 1, …, len−1], table)` with numpy's edge handling.
pub(crate) fn numpy_interp_index(x: f64, table: &[f64]) -> f64 {
    let last = table.len() - 1;
    if x <= 0.0 {
        return table[0];
    }
    if x >= last as f64 {
        return table[last];
    }
    let j = x.floor() as usize;
    if j as f64 == x {
        return table[j];
    }
    let slope = table[j + 1] - table[j];
    slope * (x - j as f64) + table[j]
}

/// The inference timesteps as integers, as DDIM and other integer-timestep schedulers place
/// them (`set_timesteps` of diffusers' DDIMScheduler).
pub(crate) fn integer_timesteps(
    spacing: TimestepSpacing,
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<Vec<i64>> {
    check_step_count(num_train_timesteps, num_inference_steps)?;
    let (train, n) = (num_train_timesteps, num_inference_steps);
    Ok(match spacing {
        TimestepSpacing::Leading => {
            check_leading_fits(train, n, steps_offset)?;
            let ratio = (train / n) as i64;
            (0..n as i64)
                .rev()
                .map(|k| k * ratio + steps_offset as i64)
                .collect()
        }
        TimestepSpacing::Linspace => numpy_linspace(0.0, (train - 1) as f64, n)
            .into_iter()
            .rev()
            .map(|t| t.round_ties_even() as i64)
            .collect(),
        TimestepSpacing::Trailing => {
            numpy_arange_down(train as f64, 0.0, -(train as f64 / n as f64))
                .into_iter()
                .map(|t| t.round_ties_even() as i64 - 1)
                .collect()
        }
    })
}

/// Leading spacing places the first step at `(n − 1)·(N // n) + steps_offset`, which must be a
/// training timestep: with SD's offset of 1, N steps do not fit (diffusers fails on them with
/// an index error).
pub(crate) fn check_leading_fits(
    num_train_timesteps: usize,
    num_inference_steps: usize,
    steps_offset: usize,
) -> Result<()> {
    let ratio = num_train_timesteps / num_inference_steps.max(1);
    let first = (num_inference_steps.saturating_sub(1)) * ratio + steps_offset;
    if first >= num_train_timesteps {
        candle_core::bail!(
            "{num_inference_steps} steps would start at timestep {first}, past the last of the \
             {num_train_timesteps} training timesteps (leading spacing with steps_offset \
             {steps_offset}): use at most {} steps",
            num_train_timesteps - steps_offset
        );
    }
    Ok(())
}

pub(crate) fn check_step_count(
    num_train_timesteps: usize,
    num_inference_steps: usize,
) -> Result<()> {
    if num_inference_steps == 0 || num_inference_steps > num_train_timesteps {
        candle_core::bail!(
            "num_inference_steps must be between 1 and num_train_timesteps ({num_train_timesteps}), got {num_inference_steps}"
        );
    }
    Ok(())
}

/// Reads a diffusers scheduler `config.json` into the config struct of one scheduler class;
/// errors name the file.
pub fn load_config<T: serde::de::DeserializeOwned>(path: impl AsRef<Path>) -> Result<T> {
    let path = path.as_ref();
    let text = std::fs::read_to_string(path)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    serde_json::from_str(&text)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// The scheduler classes this crate implements, by their diffusers class names.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SchedulerKind {
    Ddim,
    EulerDiscrete,
}

impl SchedulerKind {
    /// `"DDIMScheduler"` or `"EulerDiscreteScheduler"`, as in `_class_name`.
    pub fn from_class_name(name: &str) -> Result<Self> {
        match name {
            "DDIMScheduler" => Ok(Self::Ddim),
            "EulerDiscreteScheduler" => Ok(Self::EulerDiscrete),
            other => candle_core::bail!(
                "unsupported scheduler class {other:?} (supported: DDIMScheduler, EulerDiscreteScheduler)"
            ),
        }
    }

    /// Builds this kind of scheduler from a diffusers scheduler config file. Any class's
    /// config can be read (as diffusers' `from_config` does): keys the class does not know are
    /// ignored and missing keys take its defaults.
    pub fn load(self, config_path: impl AsRef<Path>) -> Result<Box<dyn Scheduler>> {
        let path = config_path.as_ref();
        let with_path =
            |e: candle_core::Error| candle_core::Error::Msg(format!("{}: {e}", path.display()));
        Ok(match self {
            Self::Ddim => Box::new(DdimScheduler::new(load_config(path)?).map_err(with_path)?),
            Self::EulerDiscrete => {
                Box::new(EulerDiscreteScheduler::new(load_config(path)?).map_err(with_path)?)
            }
        })
    }
}

/// Checks that a timestep names a training timestep and returns its index.
pub(crate) fn train_index(timestep: f64, num_train_timesteps: usize) -> Result<usize> {
    if timestep.fract() != 0.0 || timestep < 0.0 || timestep >= num_train_timesteps as f64 {
        candle_core::bail!(
            "timestep {timestep} is not an integer training timestep in [0, {num_train_timesteps})"
        );
    }
    Ok(timestep as usize)
}

/// Scales a tensor by a float32 factor, keeping its dtype.
pub(crate) fn scale(t: &Tensor, factor: f32) -> Result<Tensor> {
    t.affine(f64::from(factor), 0.0)
}

/// Divides a tensor by a float32 divisor as torch does (a true division, not a multiplication
/// by the reciprocal).
pub(crate) fn divide(t: &Tensor, divisor: f32) -> Result<Tensor> {
    let divisor = Tensor::new(divisor, t.device())?.to_dtype(t.dtype())?;
    t.broadcast_div(&divisor)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn leading_timesteps_match_sd15() {
        let ts = integer_timesteps(TimestepSpacing::Leading, 1000, 25, 1).unwrap();
        assert_eq!(ts.first(), Some(&961));
        assert_eq!(ts.last(), Some(&1));
    }

    #[test]
    fn linspace_rounds_half_to_even() {
        let ts = integer_timesteps(TimestepSpacing::Linspace, 1000, 25, 0).unwrap();
        assert!(ts.contains(&166) && ts.contains(&832) && ts.contains(&500));
    }

    #[test]
    fn trailing_starts_at_last_training_timestep() {
        let ts = integer_timesteps(TimestepSpacing::Trailing, 1000, 4, 0).unwrap();
        assert_eq!(ts, vec![999, 749, 499, 249]);
        let ts = integer_timesteps(TimestepSpacing::Trailing, 1000, 3, 0).unwrap();
        assert_eq!(ts, vec![999, 666, 332]);
    }

    #[test]
    fn zero_snr_rescale_ends_at_zero() {
        let cfg = NoiseScheduleConfig {
            num_train_timesteps: 1000,
            beta_start: 0.00085,
            beta_end: 0.012,
            beta_schedule: BetaSchedule::ScaledLinear,
            trained_betas: None,
            rescale_betas_zero_snr: true,
        };
        let acp = cfg.alphas_cumprod().unwrap();
        assert_eq!(acp[999], 0.0);
        assert!((acp[0] - 0.99915).abs() < 1e-4);
    }

    #[test]
    fn step_count_is_checked() {
        assert!(integer_timesteps(TimestepSpacing::Leading, 1000, 0, 1).is_err());
        assert!(integer_timesteps(TimestepSpacing::Leading, 1000, 1001, 1).is_err());
    }
}
