//! ComfyUI's schedulers: the σ table a sampler walks, from the model's σ range and a number of
//! steps (`calculate_sigmas` in `comfy/samplers.py`, with k-diffusion's `get_sigmas_karras` and
//! `get_sigmas_exponential`).
//!
//! Every table is descending and ends in σ = 0 (the clean sample). Most have steps + 1 values;
//! `ddim_uniform` and `beta` can have fewer (ComfyUI's stride and its merging of repeated
//! timesteps), and `normal` ends on the model's smallest σ instead of appending 0 when that σ
//! is 0 already.

use candle_core::Result;

use super::model_sampling::{torch_linspace, ModelSamplingDiscrete};

/// A ComfyUI scheduler name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Scheduler {
    /// Timesteps at a uniform stride of the model's table, from the last one down.
    Simple,
    /// Timesteps evenly spaced from the last to the first, the endpoint left out (SGM's
    /// uniform discretisation), then 0.
    SgmUniform,
    /// Karras et al. (2022): σ^(1/ρ) evenly spaced between σ_max and σ_min, ρ = 7.
    Karras,
    /// ln σ evenly spaced between σ_max and σ_min.
    Exponential,
    /// The DDIM paper's uniform timesteps: every ⌊T/steps⌋-th timestep from timestep 1.
    DdimUniform,
    /// Timesteps at the quantiles of a Beta(0.6, 0.6) distribution (Lee et al. 2024,
    /// arXiv:2407.12173): denser at both ends of the run.
    Beta,
    /// Timesteps evenly spaced from the last to the first, σ interpolated in log space.
    Normal,
    /// Mochi's schedule: 1 − σ/σ_max linear up to 0.025 over the first half of the steps, then
    /// quadratic up to 1.
    LinearQuadratic,
    /// The KL-optimal schedule of the AYS paper: arctan σ evenly spaced between σ_max and σ_min.
    KlOptimal,
}

impl Scheduler {
    /// Every scheduler, in ComfyUI's order (`SCHEDULER_NAMES`).
    pub const ALL: [Scheduler; 9] = [
        Self::Simple,
        Self::SgmUniform,
        Self::Karras,
        Self::Exponential,
        Self::DdimUniform,
        Self::Beta,
        Self::Normal,
        Self::LinearQuadratic,
        Self::KlOptimal,
    ];

    /// The names ComfyUI lists, in its order.
    pub fn comfy_names() -> impl Iterator<Item = &'static str> {
        Self::ALL.into_iter().map(Self::name)
    }

    /// The scheduler of a ComfyUI scheduler name.
    pub fn from_comfy_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|scheduler| scheduler.name() == name)
            .ok_or_else(|| {
                candle_core::Error::Msg(format!(
                    "unknown scheduler {name:?}; expected one of {}",
                    Self::comfy_names().collect::<Vec<_>>().join(", ")
                ))
            })
    }

    /// ComfyUI's name of the scheduler.
    pub fn name(self) -> &'static str {
        match self {
            Self::Simple => "simple",
            Self::SgmUniform => "sgm_uniform",
            Self::Karras => "karras",
            Self::Exponential => "exponential",
            Self::DdimUniform => "ddim_uniform",
            Self::Beta => "beta",
            Self::Normal => "normal",
            Self::LinearQuadratic => "linear_quadratic",
            Self::KlOptimal => "kl_optimal",
        }
    }
}

/// The σ table of `steps` steps of `scheduler` for the model (ComfyUI's `calculate_sigmas`).
pub fn calculate_sigmas(
    model: &ModelSamplingDiscrete,
    scheduler: Scheduler,
    steps: usize,
) -> Result<Vec<f64>> {
    if steps == 0 {
        candle_core::bail!("a schedule needs at least 1 step, got 0");
    }
    let (sigma_min, sigma_max) = (model.sigma_min(), model.sigma_max());
    Ok(match scheduler {
        Scheduler::Simple => simple(model, steps),
        Scheduler::SgmUniform => normal(model, steps, true),
        Scheduler::Karras => karras(steps, sigma_min, sigma_max, 7.0),
        Scheduler::Exponential => exponential(steps, sigma_min, sigma_max),
        Scheduler::DdimUniform => ddim_uniform(model, steps),
        Scheduler::Beta => beta(model, steps, 0.6, 0.6),
        Scheduler::Normal => normal(model, steps, false),
        Scheduler::LinearQuadratic => linear_quadratic(steps, sigma_max, 0.025, steps / 2),
        Scheduler::KlOptimal => kl_optimal(steps, sigma_min, sigma_max),
    })
}

/// The table's σ at `index`, as f64.
fn table(model: &ModelSamplingDiscrete, index: usize) -> f64 {
    f64::from(model.sigmas()[index])
}

/// Karras et al. (2022), eq. 5: σᵢ = (σ_max^(1/ρ) + i/(n−1)·(σ_min^(1/ρ) − σ_max^(1/ρ)))^ρ,
/// then 0.
pub fn karras(steps: usize, sigma_min: f64, sigma_max: f64, rho: f64) -> Vec<f64> {
    let min_inv_rho = sigma_min.powf(1.0 / rho);
    let max_inv_rho = sigma_max.powf(1.0 / rho);
    torch_linspace(0.0, 1.0, steps)
        .into_iter()
        .map(|ramp| (max_inv_rho + ramp * (min_inv_rho - max_inv_rho)).powf(rho))
        .chain([0.0])
        .collect()
}

/// ln σ evenly spaced from ln σ_max to ln σ_min, then 0.
pub fn exponential(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    torch_linspace(sigma_max.ln(), sigma_min.ln(), steps)
        .into_iter()
        .map(f64::exp)
        .chain([0.0])
        .collect()
}

/// Step i takes timestep T − 1 − ⌊i·T/steps⌋, then 0.
fn simple(model: &ModelSamplingDiscrete, steps: usize) -> Vec<f64> {
    let len = model.num_timesteps();
    let stride = len as f64 / steps as f64;
    (0..steps)
        .map(|i| table(model, len - 1 - (i as f64 * stride) as usize))
        .chain([0.0])
        .collect()
}

/// Timesteps 1, 1 + k, 1 + 2k, … with k = ⌊T/steps⌋, reversed, then 0 (ComfyUI: when σ of
/// timestep 1 is 0 the stride is taken over steps + 1 and no 0 is appended).
fn ddim_uniform(model: &ModelSamplingDiscrete, steps: usize) -> Vec<f64> {
    let len = model.num_timesteps();
    let first_is_zero = table(model, 1).abs() <= 1e-5;
    let (steps, mut sigmas) = if first_is_zero {
        (steps + 1, Vec::new())
    } else {
        (steps, vec![0.0])
    };
    let stride = (len / steps).max(1);
    sigmas.extend((1..len).step_by(stride).map(|t| table(model, t)));
    sigmas.reverse();
    sigmas
}

/// Timesteps evenly spaced (fractional) from the one of σ_max to the one of σ_min, σ
/// interpolated in log space. With `sgm` the spacing is over steps + 1 points with the last
/// left out; without, when σ at the end is 0 already, one more step is taken instead of
/// appending 0.
fn normal(model: &ModelSamplingDiscrete, steps: usize, sgm: bool) -> Vec<f64> {
    let start = model.timestep(model.sigma_max()) as f64;
    let end = model.timestep(model.sigma_min()) as f64;
    let (timesteps, append_zero) = if sgm {
        let mut timesteps = torch_linspace(start, end, steps + 1);
        timesteps.pop();
        (timesteps, true)
    } else if model.sigma(end).abs() <= 1e-5 {
        (torch_linspace(start, end, steps + 1), false)
    } else {
        (torch_linspace(start, end, steps), true)
    };
    let mut sigmas: Vec<f64> = timesteps.into_iter().map(|t| model.sigma(t)).collect();
    if append_zero {
        sigmas.push(0.0);
    }
    sigmas
}

/// Timesteps rint(F⁻¹(1 − i/steps)·(T − 1)) for the Beta(α, β) quantile function F⁻¹, a
/// timestep repeated from the step before taken once, then 0.
fn beta(model: &ModelSamplingDiscrete, steps: usize, alpha: f64, beta: f64) -> Vec<f64> {
    let total_timesteps = (model.num_timesteps() - 1) as f64;
    let mut sigmas = Vec::with_capacity(steps + 1);
    let mut last = None;
    for i in 0..steps {
        let quantile = 1.0 - i as f64 / steps as f64;
        let t = (beta_quantile(quantile, alpha, beta) * total_timesteps).round_ties_even();
        if last != Some(t) {
            sigmas.push(table(model, t as usize));
        }
        last = Some(t);
    }
    sigmas.push(0.0);
    sigmas
}

/// Mochi's linear-quadratic schedule scaled to σ_max: 1 − s with s rising linearly by
/// `threshold_noise / linear_steps` per step over the first `linear_steps` steps, then along
/// the quadratic that continues it to 1 at the last step; one step is [σ_max, 0].
fn linear_quadratic(
    steps: usize,
    sigma_max: f64,
    threshold_noise: f64,
    linear_steps: usize,
) -> Vec<f64> {
    let schedule: Vec<f64> = if steps == 1 {
        vec![1.0, 0.0]
    } else {
        let linear = linear_steps as f64;
        let threshold_noise_step_diff = linear - threshold_noise * steps as f64;
        let quadratic_steps = (steps - linear_steps) as f64;
        let quadratic_coef = threshold_noise_step_diff / (linear * quadratic_steps.powi(2));
        let linear_coef =
            threshold_noise / linear - 2.0 * threshold_noise_step_diff / quadratic_steps.powi(2);
        let constant = quadratic_coef * linear.powi(2);
        (0..linear_steps)
            .map(|i| i as f64 * threshold_noise / linear)
            .chain((linear_steps..steps).map(|i| {
                let i = i as f64;
                quadratic_coef * i * i + linear_coef * i + constant
            }))
            .chain([1.0])
            .map(|s| 1.0 - s)
            .collect()
    };
    schedule.into_iter().map(|s| s * sigma_max).collect()
}

/// σᵢ = tan(i/(n−1)·arctan σ_min + (1 − i/(n−1))·arctan σ_max), then 0. For one step ComfyUI
/// divides 0 by 0 and returns NaN; here the single step is at σ_max.
fn kl_optimal(steps: usize, sigma_min: f64, sigma_max: f64) -> Vec<f64> {
    let (atan_min, atan_max) = (sigma_min.atan(), sigma_max.atan());
    let last = steps.saturating_sub(1).max(1) as f64;
    (0..steps)
        .map(|i| {
            let w = i as f64 / last;
            (w * atan_min + (1.0 - w) * atan_max).tan()
        })
        .chain([0.0])
        .collect()
}

/// ln Γ(x) for x > 0 (Lanczos, g = 7, 9 terms: about 1e-15 relative).
fn ln_gamma(x: f64) -> f64 {
    const COEFFICIENTS: [f64; 9] = [
        0.999_999_999_999_809_9,
        676.520_368_121_885_1,
        -1_259.139_216_722_402_8,
        771.323_428_777_653_1,
        -176.615_029_162_140_6,
        12.507_343_278_686_905,
        -0.138_571_095_265_720_12,
        9.984_369_578_019_572e-6,
        1.505_632_735_149_311_6e-7,
    ];
    if x < 0.5 {
        // Reflection: Γ(x)·Γ(1 − x) = π / sin(πx).
        let pi = std::f64::consts::PI;
        return (pi / (pi * x).sin()).ln() - ln_gamma(1.0 - x);
    }
    let x = x - 1.0;
    let mut sum = COEFFICIENTS[0];
    for (k, c) in COEFFICIENTS.iter().enumerate().skip(1) {
        sum += c / (x + k as f64);
    }
    let t = x + 7.5;
    0.5 * (2.0 * std::f64::consts::PI).ln() + (x + 0.5) * t.ln() - t + sum.ln()
}

/// The continued fraction of the incomplete beta function (modified Lentz), converging for
/// x < (a + 1)/(a + b + 2).
fn incomplete_beta_fraction(x: f64, a: f64, b: f64) -> f64 {
    const TINY: f64 = 1e-300;
    let mut c = 1.0;
    let mut d = 1.0 - (a + b) * x / (a + 1.0);
    if d.abs() < TINY {
        d = TINY;
    }
    d = 1.0 / d;
    let mut fraction = d;
    for m in 1..10_000 {
        let m = m as f64;
        let m2 = 2.0 * m;
        for numerator in [
            m * (b - m) * x / ((a + m2 - 1.0) * (a + m2)),
            -(a + m) * (a + b + m) * x / ((a + m2) * (a + m2 + 1.0)),
        ] {
            d = 1.0 + numerator * d;
            if d.abs() < TINY {
                d = TINY;
            }
            c = 1.0 + numerator / c;
            if c.abs() < TINY {
                c = TINY;
            }
            d = 1.0 / d;
            fraction *= d * c;
        }
        if (d * c - 1.0).abs() < 1e-16 {
            break;
        }
    }
    fraction
}

/// The regularised incomplete beta function I_x(a, b): the Beta(a, b) distribution function.
fn regularized_incomplete_beta(x: f64, a: f64, b: f64) -> f64 {
    if x <= 0.0 {
        return 0.0;
    }
    if x >= 1.0 {
        return 1.0;
    }
    let ln_front = ln_gamma(a + b) - ln_gamma(a) - ln_gamma(b) + a * x.ln() + b * (1.0 - x).ln();
    if x < (a + 1.0) / (a + b + 2.0) {
        ln_front.exp() * incomplete_beta_fraction(x, a, b) / a
    } else {
        1.0 - ln_front.exp() * incomplete_beta_fraction(1.0 - x, b, a) / b
    }
}

/// The Beta(a, b) quantile function F⁻¹(p) (scipy's `beta.ppf`): I_x(a, b) = p solved by
/// bisection to the last bit of x. The median of a symmetric distribution is exactly ½.
fn beta_quantile(p: f64, a: f64, b: f64) -> f64 {
    if p <= 0.0 {
        return 0.0;
    }
    if p >= 1.0 {
        return 1.0;
    }
    if a == b && p == 0.5 {
        return 0.5;
    }
    let (mut low, mut high) = (0.0f64, 1.0f64);
    for _ in 0..200 {
        let mid = 0.5 * (low + high);
        if mid <= low || mid >= high {
            break;
        }
        if regularized_incomplete_beta(mid, a, b) < p {
            low = mid;
        } else {
            high = mid;
        }
    }
    0.5 * (low + high)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::k_diffusion::model_sampling::tests::{fixture, relative_error, values};
    use crate::sampling::k_diffusion::model_sampling::BetaSchedule;

    #[test]
    fn every_schedule_matches_comfyui() -> Result<()> {
        let reference = fixture("schedules.safetensors");
        let cases = [
            (BetaSchedule::Linear, vec![1, 4, 20, 25]),
            (BetaSchedule::SqrtLinear, vec![20]),
        ];
        for (beta_schedule, step_counts) in cases {
            let model = ModelSamplingDiscrete::new(beta_schedule)?;
            for scheduler in Scheduler::ALL {
                for &steps in &step_counts {
                    let key = format!(
                        "schedule.{}.{}.{steps}",
                        beta_schedule.name(),
                        scheduler.name()
                    );
                    let expected = values(&reference, &key);
                    let ours = calculate_sigmas(&model, scheduler, steps)?;
                    if scheduler == Scheduler::KlOptimal && steps == 1 {
                        assert!(expected[0].is_nan(), "{key}: ComfyUI's 0/0");
                        let error = relative_error(&ours, &[model.sigma_max(), 0.0]);
                        assert!(error <= 1e-12, "{key}: one step at σ_max, got {ours:?}");
                        continue;
                    }
                    assert_eq!(
                        ours.len(),
                        expected.len(),
                        "{key}: {ours:?} vs {expected:?}"
                    );
                    let error = relative_error(&ours, &expected);
                    assert!(error <= 1e-5, "{key}: relative error {error}");
                    assert_eq!(ours.last(), Some(&0.0), "{key} ends in 0");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn names_round_trip_in_comfyui_order() -> Result<()> {
        let names: Vec<_> = Scheduler::comfy_names().collect();
        assert_eq!(
            names,
            [
                "simple",
                "sgm_uniform",
                "karras",
                "exponential",
                "ddim_uniform",
                "beta",
                "normal",
                "linear_quadratic",
                "kl_optimal"
            ]
        );
        for scheduler in Scheduler::ALL {
            assert_eq!(Scheduler::from_comfy_name(scheduler.name())?, scheduler);
        }
        let error = Scheduler::from_comfy_name("cosine")
            .unwrap_err()
            .to_string();
        assert!(error.contains("karras"), "{error}");
        let model = ModelSamplingDiscrete::sd()?;
        assert!(calculate_sigmas(&model, Scheduler::Karras, 0).is_err());
        Ok(())
    }

    #[test]
    fn the_beta_quantile_inverts_the_distribution_function() {
        // Beta(1, 1) is uniform; Beta(2, 1) has F(x) = x².
        for p in [0.01, 0.3, 0.77, 0.99] {
            assert!((beta_quantile(p, 1.0, 1.0) - p).abs() < 1e-14);
            assert!((beta_quantile(p, 2.0, 1.0) - p.sqrt()).abs() < 1e-14);
            let x = beta_quantile(p, 0.6, 0.6);
            assert!((regularized_incomplete_beta(x, 0.6, 0.6) - p).abs() < 1e-14);
        }
        // scipy.stats.beta.ppf(0.25, 0.6, 0.6).
        let scipy = 0.175_680_378_652_694_98;
        assert!((beta_quantile(0.25, 0.6, 0.6) - scipy).abs() < 1e-12);
    }
}
