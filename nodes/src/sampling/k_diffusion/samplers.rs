//! ComfyUI's k-diffusion samplers (`comfy/k_diffusion/sampling.py`) for ε-prediction models,
//! with ComfyUI's defaults (η = 1, s_noise = 1, no churn).
//!
//! Each sampler walks the σ table from σ₀ (the sample is already noised to it) down to the
//! last σ, usually 0, calling the [`Denoiser`] once or more per step. The step coefficients are
//! computed in f64; tensors stay in the input's dtype. In the formulas, D is the denoiser,
//! d = (x − D(x, σ))/σ the probability-flow ODE's derivative dx/dσ, and λ = −ln σ the half
//! log-SNR of an ε model (its α is 1).
//!
//! The ancestral and SDE samplers take fresh noise from a [`NoiseSampler`]: ComfyUI gives the
//! ancestral ones (and ddpm, lcm) independent Gaussian draws and the SDE ones (dpmpp_sde,
//! dpmpp_2m_sde, dpmpp_3m_sde) a Brownian path ([`super::brownian::BrownianNoise`]); see
//! [`SamplerKind::uses_brownian_noise`].

use candle_core::{Result, Tensor};

use super::uni_pc::{sample_unipc, UniPcVariant};
use super::{Denoiser, NoiseSampler, StepCallback, StepInfo};

/// A ComfyUI sampler name. The `_gpu` variants differ from the plain ones only in where
/// ComfyUI builds its Brownian tree, so they run the same algorithm here.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum SamplerKind {
    Euler,
    EulerAncestral,
    Heun,
    Heunpp2,
    Dpm2,
    Dpm2Ancestral,
    Lms,
    Dpmpp2sAncestral,
    DpmppSde,
    DpmppSdeGpu,
    Dpmpp2m,
    Dpmpp2mSde,
    Dpmpp2mSdeGpu,
    Dpmpp2mSdeHeun,
    Dpmpp2mSdeHeunGpu,
    Dpmpp3mSde,
    Dpmpp3mSdeGpu,
    Ddpm,
    Lcm,
    Ipndm,
    IpndmV,
    /// ComfyUI's "ddim": the Euler sampler (ComfyUI only changes how inpainting draws its
    /// noise).
    Ddim,
    /// UniPC with the B(h) = h variant ([`super::uni_pc`]).
    UniPc,
    /// UniPC with B(h) = eʰ − 1.
    UniPcBh2,
}

impl SamplerKind {
    /// Every sampler, in the order of ComfyUI's `SAMPLER_NAMES`.
    pub const ALL: [SamplerKind; 24] = [
        Self::Euler,
        Self::EulerAncestral,
        Self::Heun,
        Self::Heunpp2,
        Self::Dpm2,
        Self::Dpm2Ancestral,
        Self::Lms,
        Self::Dpmpp2sAncestral,
        Self::DpmppSde,
        Self::DpmppSdeGpu,
        Self::Dpmpp2m,
        Self::Dpmpp2mSde,
        Self::Dpmpp2mSdeGpu,
        Self::Dpmpp2mSdeHeun,
        Self::Dpmpp2mSdeHeunGpu,
        Self::Dpmpp3mSde,
        Self::Dpmpp3mSdeGpu,
        Self::Ddpm,
        Self::Lcm,
        Self::Ipndm,
        Self::IpndmV,
        Self::Ddim,
        Self::UniPc,
        Self::UniPcBh2,
    ];

    /// The sampler of a ComfyUI sampler name.
    pub fn from_comfy_name(name: &str) -> Result<Self> {
        Self::ALL
            .into_iter()
            .find(|kind| kind.name() == name)
            .ok_or_else(|| {
                let names: Vec<_> = Self::ALL.into_iter().map(Self::name).collect();
                candle_core::Error::Msg(format!(
                    "unknown sampler {name:?}; expected one of {}",
                    names.join(", ")
                ))
            })
    }

    /// ComfyUI's name of the sampler.
    pub fn name(self) -> &'static str {
        match self {
            Self::Euler => "euler",
            Self::EulerAncestral => "euler_ancestral",
            Self::Heun => "heun",
            Self::Heunpp2 => "heunpp2",
            Self::Dpm2 => "dpm_2",
            Self::Dpm2Ancestral => "dpm_2_ancestral",
            Self::Lms => "lms",
            Self::Dpmpp2sAncestral => "dpmpp_2s_ancestral",
            Self::DpmppSde => "dpmpp_sde",
            Self::DpmppSdeGpu => "dpmpp_sde_gpu",
            Self::Dpmpp2m => "dpmpp_2m",
            Self::Dpmpp2mSde => "dpmpp_2m_sde",
            Self::Dpmpp2mSdeGpu => "dpmpp_2m_sde_gpu",
            Self::Dpmpp2mSdeHeun => "dpmpp_2m_sde_heun",
            Self::Dpmpp2mSdeHeunGpu => "dpmpp_2m_sde_heun_gpu",
            Self::Dpmpp3mSde => "dpmpp_3m_sde",
            Self::Dpmpp3mSdeGpu => "dpmpp_3m_sde_gpu",
            Self::Ddpm => "ddpm",
            Self::Lcm => "lcm",
            Self::Ipndm => "ipndm",
            Self::IpndmV => "ipndm_v",
            Self::Ddim => "ddim",
            Self::UniPc => "uni_pc",
            Self::UniPcBh2 => "uni_pc_bh2",
        }
    }

    /// Whether ComfyUI drives the sampler with a Brownian path (its SDE samplers) rather than
    /// independent Gaussian draws. Samplers that take no noise at all answer `false`.
    pub fn uses_brownian_noise(self) -> bool {
        matches!(
            self,
            Self::DpmppSde
                | Self::DpmppSdeGpu
                | Self::Dpmpp2mSde
                | Self::Dpmpp2mSdeGpu
                | Self::Dpmpp2mSdeHeun
                | Self::Dpmpp2mSdeHeunGpu
                | Self::Dpmpp3mSde
                | Self::Dpmpp3mSdeGpu
        )
    }

    /// Whether ComfyUI's `KSampler` computes the σ table for one step more and drops its
    /// next-to-last value for this sampler (dpm_2 and dpm_2_ancestral, whose midpoint
    /// evaluation would otherwise sit very close to 0 at the last step, and UniPC).
    pub fn discards_penultimate_sigma(self) -> bool {
        matches!(
            self,
            Self::Dpm2 | Self::Dpm2Ancestral | Self::UniPc | Self::UniPcBh2
        )
    }
}

/// η of the ancestral and SDE samplers: the share of the step's variance that is fresh noise.
const ETA: f64 = 1.0;
/// The scale of the fresh noise.
const S_NOISE: f64 = 1.0;
/// The order of the LMS and iPNDM multistep methods.
const MAX_ORDER: usize = 4;

/// Runs `kind` from `x`, already noised to `sigmas[0]`, through the σ table; `noise` is asked
/// for fresh noise by the samplers that take it, and `callback` sees every step.
pub fn sample(
    kind: SamplerKind,
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    noise: &mut dyn NoiseSampler,
    callback: Option<&mut StepCallback<'_>>,
) -> Result<Tensor> {
    if let Some(bad) = sigmas.iter().find(|s| !(s.is_finite() && **s >= 0.0)) {
        candle_core::bail!("every σ must be finite and non-negative, got {bad}");
    }
    if let Some(i) = sigmas
        .iter()
        .take(sigmas.len().saturating_sub(1))
        .position(|s| *s == 0.0)
    {
        candle_core::bail!(
            "σ = 0 may only be the last value of the table, found at index {i} of {}",
            sigmas.len()
        );
    }
    let mut run = Run {
        denoiser,
        noise,
        callback,
    };
    match kind {
        SamplerKind::Euler | SamplerKind::Ddim => euler(&mut run, x, sigmas),
        SamplerKind::EulerAncestral => euler_ancestral(&mut run, x, sigmas),
        SamplerKind::Heun => heun(&mut run, x, sigmas),
        SamplerKind::Heunpp2 => heunpp2(&mut run, x, sigmas),
        SamplerKind::Dpm2 => dpm_2(&mut run, x, sigmas),
        SamplerKind::Dpm2Ancestral => dpm_2_ancestral(&mut run, x, sigmas),
        SamplerKind::Lms => lms(&mut run, x, sigmas),
        SamplerKind::Dpmpp2sAncestral => dpmpp_2s_ancestral(&mut run, x, sigmas),
        SamplerKind::DpmppSde | SamplerKind::DpmppSdeGpu => dpmpp_sde(&mut run, x, sigmas),
        SamplerKind::Dpmpp2m => dpmpp_2m(&mut run, x, sigmas),
        SamplerKind::Dpmpp2mSde | SamplerKind::Dpmpp2mSdeGpu => {
            dpmpp_2m_sde(&mut run, x, sigmas, SecondOrder::Midpoint)
        }
        SamplerKind::Dpmpp2mSdeHeun | SamplerKind::Dpmpp2mSdeHeunGpu => {
            dpmpp_2m_sde(&mut run, x, sigmas, SecondOrder::Heun)
        }
        SamplerKind::Dpmpp3mSde | SamplerKind::Dpmpp3mSdeGpu => dpmpp_3m_sde(&mut run, x, sigmas),
        SamplerKind::Ddpm => ddpm(&mut run, x, sigmas),
        SamplerKind::Lcm => lcm(&mut run, x, sigmas),
        SamplerKind::Ipndm => ipndm(&mut run, x, sigmas),
        SamplerKind::IpndmV => ipndm_v(&mut run, x, sigmas),
        SamplerKind::UniPc => {
            sample_unipc(run.denoiser, x, sigmas, UniPcVariant::Bh1, run.callback)
        }
        SamplerKind::UniPcBh2 => {
            sample_unipc(run.denoiser, x, sigmas, UniPcVariant::Bh2, run.callback)
        }
    }
}

/// What every sampler uses: the model, the noise and the callback.
struct Run<'a, 'c> {
    denoiser: &'a mut dyn Denoiser,
    noise: &'a mut dyn NoiseSampler,
    callback: Option<&'a mut StepCallback<'c>>,
}

impl Run<'_, '_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let denoised = self.denoiser.denoise(x, sigma)?;
        if denoised.dims() != x.dims() {
            candle_core::bail!(
                "the denoiser returned shape {:?} for a sample of shape {:?}",
                denoised.dims(),
                x.dims()
            );
        }
        Ok(denoised)
    }

    fn noise(&mut self, sigma: f64, sigma_next: f64, like: &Tensor) -> Result<Tensor> {
        let noise = self.noise.sample(sigma, sigma_next, like)?;
        if noise.dims() != like.dims() {
            candle_core::bail!(
                "the noise sampler returned shape {:?} for a sample of shape {:?}",
                noise.dims(),
                like.dims()
            );
        }
        Ok(noise)
    }

    /// Step `index` of the table, from `x` with its estimate `denoised`.
    fn report(
        &mut self,
        index: usize,
        sigmas: &[f64],
        x: &Tensor,
        denoised: &Tensor,
    ) -> Result<()> {
        match self.callback.as_mut() {
            Some(callback) => callback(&StepInfo {
                index,
                x,
                sigma: sigmas[index],
                sigma_next: sigmas[index + 1],
                denoised,
            }),
            None => Ok(()),
        }
    }
}

/// Σ cᵢ·tᵢ over the terms.
fn combine(terms: &[(&Tensor, f64)]) -> Result<Tensor> {
    let Some(((first, c0), rest)) = terms.split_first() else {
        candle_core::bail!("a linear combination needs at least one term");
    };
    let mut sum = (*first * *c0)?;
    for (t, c) in rest {
        sum = (sum + (*t * *c)?)?;
    }
    Ok(sum)
}

/// d = (x − D)/σ, the derivative dx/dσ of the probability-flow ODE.
fn to_d(x: &Tensor, sigma: f64, denoised: &Tensor) -> Result<Tensor> {
    (x - denoised)? / sigma
}

/// The ancestral split of a step from σ to σ_next: (σ_down, σ_up) with
/// σ_up = min(σ_next, η·√(σ_next²(σ² − σ_next²)/σ²)) and σ_down = √(σ_next² − σ_up²); the
/// sampler steps deterministically to σ_down and adds noise of std σ_up.
fn ancestral_step(sigma: f64, sigma_next: f64, eta: f64) -> (f64, f64) {
    if eta == 0.0 {
        return (sigma_next, 0.0);
    }
    let up = sigma_next.min(
        eta * (sigma_next * sigma_next * (sigma * sigma - sigma_next * sigma_next)
            / (sigma * sigma))
            .sqrt(),
    );
    let down = (sigma_next * sigma_next - up * up).sqrt();
    (down, up)
}

/// Euler steps of the ODE: x ← x + d·(σ_next − σ) (Karras et al. 2022, algorithm 2 without
/// churn).
fn euler(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = run.denoise(&x, sigmas[i])?;
        run.report(i, sigmas, &x, &denoised)?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        x = combine(&[(&x, 1.0), (&d, sigmas[i + 1] - sigmas[i])])?;
    }
    Ok(x)
}

/// Euler steps to σ_down, then noise of std σ_up (to σ = 0: the estimate itself).
fn euler_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (down, up) = ancestral_step(sigma, sigma_next, ETA);
        run.report(i, sigmas, &x, &denoised)?;
        x = if down == 0.0 {
            denoised
        } else {
            let d = to_d(&x, sigma, &denoised)?;
            let fresh = run.noise(sigma, sigma_next, &x)?;
            combine(&[(&x, 1.0), (&d, down - sigma), (&fresh, S_NOISE * up)])?
        };
    }
    Ok(x)
}

/// Heun's method: an Euler step, the derivative re-evaluated at its end, the step taken
/// again with the mean of both derivatives (an Euler step to σ = 0).
fn heun(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, sigmas, &x, &denoised)?;
        let dt = sigma_next - sigma;
        x = if sigma_next == 0.0 {
            combine(&[(&x, 1.0), (&d, dt)])?
        } else {
            let x_2 = combine(&[(&x, 1.0), (&d, dt)])?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            combine(&[(&x, 1.0), (&d, dt / 2.0), (&d_2, dt / 2.0)])?
        };
    }
    Ok(x)
}

/// Heun++ (from sd-webui-samplers-scheduler): up to three derivatives, at σᵢ, σᵢ₊₁ and σᵢ₊₂,
/// weighted by σᵢ₊₁/(3σ₀) and σᵢ₊₂/(3σ₀) (Heun's two with σᵢ₊₁/(2σ₀) at the step before the
/// last, Euler at the last).
fn heunpp2(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let Some(&sigma_end) = sigmas.last() else {
        return Ok(x);
    };
    for i in 0..sigmas.len() - 1 {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, sigmas, &x, &denoised)?;
        let dt = sigma_next - sigma;
        x = if sigma_next == sigma_end {
            combine(&[(&x, 1.0), (&d, dt)])?
        } else if sigmas[i + 2] == sigma_end {
            let x_2 = combine(&[(&x, 1.0), (&d, dt)])?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let w2 = sigma_next / (2.0 * sigmas[0]);
            let w1 = 1.0 - w2;
            combine(&[(&x, 1.0), (&d, w1 * dt), (&d_2, w2 * dt)])?
        } else {
            let sigma_after = sigmas[i + 2];
            let x_2 = combine(&[(&x, 1.0), (&d, dt)])?;
            let denoised_2 = run.denoise(&x_2, sigma_next)?;
            let d_2 = to_d(&x_2, sigma_next, &denoised_2)?;
            let x_3 = combine(&[(&x_2, 1.0), (&d_2, sigma_after - sigma_next)])?;
            let denoised_3 = run.denoise(&x_3, sigma_after)?;
            let d_3 = to_d(&x_3, sigma_after, &denoised_3)?;
            let w = 3.0 * sigmas[0];
            let (w2, w3) = (sigma_next / w, sigma_after / w);
            let w1 = 1.0 - w2 - w3;
            combine(&[(&x, 1.0), (&d, w1 * dt), (&d_2, w2 * dt), (&d_3, w3 * dt)])?
        };
    }
    Ok(x)
}

/// √(σ·σ_next): the midpoint of a step in log σ (`exp(lerp(ln σ, ln σ_next, ½))`).
fn log_midpoint(sigma: f64, sigma_next: f64) -> f64 {
    let (a, b) = (sigma.ln(), sigma_next.ln());
    (a + 0.5 * (b - a)).exp()
}

/// DPM-Solver-2 in Karras' form: the derivative at the log-midpoint of the step drives the
/// whole step (an Euler step to σ = 0).
fn dpm_2(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let d = to_d(&x, sigma, &denoised)?;
        run.report(i, sigmas, &x, &denoised)?;
        x = if sigma_next == 0.0 {
            combine(&[(&x, 1.0), (&d, sigma_next - sigma)])?
        } else {
            let sigma_mid = log_midpoint(sigma, sigma_next);
            let x_2 = combine(&[(&x, 1.0), (&d, sigma_mid - sigma)])?;
            let denoised_2 = run.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            combine(&[(&x, 1.0), (&d_2, sigma_next - sigma)])?
        };
    }
    Ok(x)
}

/// [`dpm_2`] to σ_down, then noise of std σ_up.
fn dpm_2_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (down, up) = ancestral_step(sigma, sigma_next, ETA);
        run.report(i, sigmas, &x, &denoised)?;
        let d = to_d(&x, sigma, &denoised)?;
        x = if down == 0.0 {
            combine(&[(&x, 1.0), (&d, down - sigma)])?
        } else {
            let sigma_mid = log_midpoint(sigma, down);
            let x_2 = combine(&[(&x, 1.0), (&d, sigma_mid - sigma)])?;
            let denoised_2 = run.denoise(&x_2, sigma_mid)?;
            let d_2 = to_d(&x_2, sigma_mid, &denoised_2)?;
            let fresh = run.noise(sigma, sigma_next, &x)?;
            combine(&[(&x, 1.0), (&d_2, down - sigma), (&fresh, S_NOISE * up)])?
        };
    }
    Ok(x)
}

/// Gauss–Legendre nodes on [−1, 1] and weights, 4 points: exact for polynomials up to degree
/// 7, and the LMS integrands have degree at most 3.
const GAUSS_LEGENDRE_4: [(f64, f64); 4] = [
    (-0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
    (-0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.339_981_043_584_856_3, 0.652_145_154_862_546_1),
    (0.861_136_311_594_052_6, 0.347_854_845_137_453_9),
];

/// The weight of the derivative at σ_{i−j} in an LMS step of `order` from σᵢ to σᵢ₊₁: the
/// integral over [σᵢ, σᵢ₊₁] of the Lagrange basis polynomial of σ_{i−j} on σᵢ, …, σ_{i−order+1}.
fn linear_multistep_coefficient(order: usize, sigmas: &[f64], i: usize, j: usize) -> f64 {
    let basis = |tau: f64| {
        (0..order)
            .filter(|k| *k != j)
            .map(|k| (tau - sigmas[i - k]) / (sigmas[i - j] - sigmas[i - k]))
            .product::<f64>()
    };
    let (a, b) = (sigmas[i], sigmas[i + 1]);
    let (half_width, centre) = ((b - a) / 2.0, (a + b) / 2.0);
    GAUSS_LEGENDRE_4
        .iter()
        .map(|(node, weight)| weight * basis(centre + half_width * node))
        .sum::<f64>()
        * half_width
}

/// Linear multistep (Adams–Bashforth on the non-uniform σ grid) of order up to 4; the last
/// step to σ = 0 returns the estimate.
fn lms(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let mut derivatives: Vec<Tensor> = Vec::with_capacity(MAX_ORDER);
    for i in 0..sigmas.len().saturating_sub(1) {
        let denoised = run.denoise(&x, sigmas[i])?;
        let d = to_d(&x, sigmas[i], &denoised)?;
        if derivatives.len() == MAX_ORDER {
            derivatives.remove(0);
        }
        derivatives.push(d);
        run.report(i, sigmas, &x, &denoised)?;
        x = if sigmas[i + 1] == 0.0 {
            denoised
        } else {
            let order = (i + 1).min(MAX_ORDER);
            let coefficients: Vec<f64> = (0..order)
                .map(|j| linear_multistep_coefficient(order, sigmas, i, j))
                .collect();
            let mut terms = vec![(&x, 1.0)];
            terms.extend(derivatives.iter().rev().zip(coefficients));
            combine(&terms)?
        };
    }
    Ok(x)
}

/// DPM-Solver++(2S) to σ_down (one evaluation at the λ-midpoint), then noise of std σ_up.
fn dpmpp_2s_ancestral(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        let (down, up) = ancestral_step(sigma, sigma_next, ETA);
        run.report(i, sigmas, &x, &denoised)?;
        x = if down == 0.0 {
            let d = to_d(&x, sigma, &denoised)?;
            combine(&[(&x, 1.0), (&d, down - sigma)])?
        } else {
            let (t, t_next) = (-sigma.ln(), -down.ln());
            let h = t_next - t;
            let s = t + 0.5 * h;
            let sigma_s = (-s).exp();
            let x_2 = combine(&[(&x, sigma_s / sigma), (&denoised, -(-0.5 * h).exp_m1())])?;
            let denoised_2 = run.denoise(&x_2, sigma_s)?;
            combine(&[(&x, down / sigma), (&denoised_2, -(-h).exp_m1())])?
        };
        if sigma_next > 0.0 {
            let fresh = run.noise(sigma, sigma_next, &x)?;
            x = combine(&[(&x, 1.0), (&fresh, S_NOISE * up)])?;
        }
    }
    Ok(x)
}

/// DPM-Solver++ (stochastic), r = ½: an ancestral half-step in λ to an intermediate estimate,
/// then the full ancestral step from the start with the estimates combined
/// (1 − 1/(2r))·D + 1/(2r)·D₂; both draw noise, for (σ, σ_s) and (σ, σ_next).
fn dpmpp_sde(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    const R: f64 = 0.5;
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised;
            continue;
        }
        let (lambda_s, lambda_t) = (-sigma.ln(), -sigma_next.ln());
        let h = lambda_t - lambda_s;
        let lambda_s_1 = lambda_s + R * h;
        let fac = 1.0 / (2.0 * R);
        let sigma_s_1 = (-lambda_s_1).exp();
        // α = σ·e^λ, 1 for an ε model up to rounding; kept for the formulas' shape.
        let alpha_s = sigma * lambda_s.exp();
        let alpha_s_1 = sigma_s_1 * lambda_s_1.exp();
        let alpha_t = sigma_next * lambda_t.exp();

        let (down, up) = ancestral_step((-lambda_s).exp(), (-lambda_s_1).exp(), ETA);
        let h_ = -down.ln() - lambda_s;
        let mut x_2 = combine(&[
            (&x, alpha_s_1 / alpha_s * (-h_).exp()),
            (&denoised, -alpha_s_1 * (-h_).exp_m1()),
        ])?;
        if ETA > 0.0 && S_NOISE > 0.0 {
            let fresh = run.noise(sigma, sigma_s_1, &x)?;
            x_2 = combine(&[(&x_2, 1.0), (&fresh, alpha_s_1 * S_NOISE * up)])?;
        }
        let denoised_2 = run.denoise(&x_2, sigma_s_1)?;

        let (down, up) = ancestral_step((-lambda_s).exp(), (-lambda_t).exp(), ETA);
        let h_ = -down.ln() - lambda_s;
        let denoised_d = combine(&[(&denoised, 1.0 - fac), (&denoised_2, fac)])?;
        x = combine(&[
            (&x, alpha_t / alpha_s * (-h_).exp()),
            (&denoised_d, -alpha_t * (-h_).exp_m1()),
        ])?;
        if ETA > 0.0 && S_NOISE > 0.0 {
            let fresh = run.noise(sigma, sigma_next, &x)?;
            x = combine(&[(&x, 1.0), (&fresh, alpha_t * S_NOISE * up)])?;
        }
    }
    Ok(x)
}

/// DPM-Solver++(2M): the exponential integrator in λ with the estimate extrapolated linearly
/// from the previous step's, (1 + 1/(2r))·D − 1/(2r)·D_prev, r = h_prev/h.
fn dpmpp_2m(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let mut old_denoised: Option<Tensor> = None;
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        let (t, t_next) = (-sigma.ln(), -sigma_next.ln());
        let h = t_next - t;
        let decay = sigma_next / sigma;
        let weight = -(-h).exp_m1();
        x = match &old_denoised {
            Some(old) if sigma_next != 0.0 => {
                let h_last = t + sigmas[i - 1].ln();
                let r = h_last / h;
                let c = 1.0 / (2.0 * r);
                combine(&[
                    (&x, decay),
                    (&denoised, weight * (1.0 + c)),
                    (old, -weight * c),
                ])?
            }
            _ => combine(&[(&x, decay), (&denoised, weight)])?,
        };
        old_denoised = Some(denoised);
    }
    Ok(x)
}

/// How DPM-Solver++(2M) SDE corrects with the previous estimate.
#[derive(Clone, Copy)]
enum SecondOrder {
    Midpoint,
    Heun,
}

/// DPM-Solver++(2M) SDE (η = 1): the SDE's exponential integrator in λ, a second-order
/// correction from the previous estimate, and noise of std σ_next·√(1 − e^(−2hη)); the step to
/// σ = 0 returns the estimate.
fn dpmpp_2m_sde(
    run: &mut Run,
    mut x: Tensor,
    sigmas: &[f64],
    correction: SecondOrder,
) -> Result<Tensor> {
    let mut old_denoised: Option<Tensor> = None;
    let mut h_last: Option<f64> = None;
    let mut h: Option<f64> = None;
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised.clone();
        } else {
            let (lambda_s, lambda_t) = (-sigma.ln(), -sigma_next.ln());
            let step = lambda_t - lambda_s;
            h = Some(step);
            let h_eta = step * (ETA + 1.0);
            let alpha_t = sigma_next * lambda_t.exp();
            let weight = -(-h_eta).exp_m1();
            x = combine(&[
                (&x, sigma_next / sigma * (-step * ETA).exp()),
                (&denoised, alpha_t * weight),
            ])?;
            if let (Some(old), Some(last)) = (&old_denoised, h_last) {
                let r = last / step;
                let c = match correction {
                    SecondOrder::Heun => alpha_t * (weight / -h_eta + 1.0) / r,
                    SecondOrder::Midpoint => 0.5 * alpha_t * weight / r,
                };
                x = combine(&[(&x, 1.0), (&denoised, c), (old, -c)])?;
            }
            if ETA > 0.0 && S_NOISE > 0.0 {
                let fresh = run.noise(sigma, sigma_next, &x)?;
                let std = sigma_next * (-(-2.0 * step * ETA).exp_m1()).sqrt() * S_NOISE;
                x = combine(&[(&x, 1.0), (&fresh, std)])?;
            }
        }
        old_denoised = Some(denoised);
        h_last = h;
    }
    Ok(x)
}

/// DPM-Solver++(3M) SDE (η = 1): as [`dpmpp_2m_sde`] with a third-order correction from the
/// two previous estimates once there are two.
fn dpmpp_3m_sde(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let mut denoised_1: Option<Tensor> = None;
    let mut denoised_2: Option<Tensor> = None;
    let (mut h, mut h_1, mut h_2): (Option<f64>, Option<f64>, Option<f64>) = (None, None, None);
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        if sigma_next == 0.0 {
            x = denoised.clone();
        } else {
            let (lambda_s, lambda_t) = (-sigma.ln(), -sigma_next.ln());
            let step = lambda_t - lambda_s;
            h = Some(step);
            let h_eta = step * (ETA + 1.0);
            let alpha_t = sigma_next * lambda_t.exp();
            x = combine(&[
                (&x, sigma_next / sigma * (-step * ETA).exp()),
                (&denoised, alpha_t * -(-h_eta).exp_m1()),
            ])?;
            let phi_2 = (-h_eta).exp_m1() / h_eta + 1.0;
            match (&denoised_1, &denoised_2, h_1, h_2) {
                (Some(prev_1), Some(prev_2), Some(last_1), Some(last_2)) => {
                    let (r0, r1) = (last_1 / step, last_2 / step);
                    let d1_0 = ((&denoised - prev_1)? / r0)?;
                    let d1_1 = ((prev_1 - prev_2)? / r1)?;
                    let d1 = combine(&[(&d1_0, 1.0 + r0 / (r0 + r1)), (&d1_1, -r0 / (r0 + r1))])?;
                    let d2 = ((&d1_0 - &d1_1)? / (r0 + r1))?;
                    let phi_3 = phi_2 / h_eta - 0.5;
                    x = combine(&[(&x, 1.0), (&d1, alpha_t * phi_2), (&d2, -alpha_t * phi_3)])?;
                }
                (Some(prev_1), _, Some(last_1), _) => {
                    let r = last_1 / step;
                    let d = ((&denoised - prev_1)? / r)?;
                    x = combine(&[(&x, 1.0), (&d, alpha_t * phi_2)])?;
                }
                _ => {}
            }
            if ETA > 0.0 && S_NOISE > 0.0 {
                let fresh = run.noise(sigma, sigma_next, &x)?;
                let std = sigma_next * (-(-2.0 * step * ETA).exp_m1()).sqrt() * S_NOISE;
                x = combine(&[(&x, 1.0), (&fresh, std)])?;
            }
        }
        denoised_2 = denoised_1.take();
        denoised_1 = Some(denoised);
        h_2 = h_1;
        h_1 = h;
    }
    Ok(x)
}

/// DDPM ancestral steps in the variance-preserving frame: with ᾱ = 1/(σ² + 1), the sample
/// x/√(σ² + 1) takes the posterior mean step
/// (x − (1 − α)·ε/√(1 − ᾱ))/√α, α = ᾱ/ᾱ_next, plus noise of variance
/// (1 − α)(1 − ᾱ_next)/(1 − ᾱ), and is scaled back by √(σ_next² + 1).
fn ddpm(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        let eps = to_d(&x, sigma, &denoised)?;
        let scale_in = 1.0 / (1.0 + sigma * sigma).sqrt();
        let alpha_cumprod = 1.0 / (sigma * sigma + 1.0);
        let alpha_cumprod_next = 1.0 / (sigma_next * sigma_next + 1.0);
        let alpha = alpha_cumprod / alpha_cumprod_next;
        let mean_scale = (1.0 / alpha).sqrt();
        let mut mu = combine(&[
            (&x, mean_scale * scale_in),
            (
                &eps,
                -mean_scale * (1.0 - alpha) / (1.0 - alpha_cumprod).sqrt(),
            ),
        ])?;
        if sigma_next > 0.0 {
            let std = ((1.0 - alpha) * (1.0 - alpha_cumprod_next) / (1.0 - alpha_cumprod)).sqrt();
            let fresh = run.noise(sigma, sigma_next, &x)?;
            mu = combine(&[(&mu, 1.0), (&fresh, std)])?;
        }
        x = if sigma_next != 0.0 {
            (mu * (1.0 + sigma_next * sigma_next).sqrt())?
        } else {
            mu
        };
    }
    Ok(x)
}

/// LCM: each step jumps to the estimate and re-noises it to σ_next with fresh noise
/// (the ε model's noise scaling, D + σ_next·noise).
fn lcm(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        x = if sigma_next > 0.0 {
            let fresh = run.noise(sigma, sigma_next, &denoised)?;
            combine(&[(&denoised, 1.0), (&fresh, S_NOISE * sigma_next)])?
        } else {
            denoised
        };
    }
    Ok(x)
}

/// The derivatives of the last steps, newest last, at most `MAX_ORDER − 1` of them.
fn remember(history: &mut Vec<Tensor>, d: Tensor) {
    if history.len() == MAX_ORDER - 1 {
        history.remove(0);
    }
    history.push(d);
}

/// iPNDM (Zhang & Chen, from zju-pi/diff-sampler): Adams–Bashforth with the fixed
/// coefficients of uniform steps, order rising to 4 as derivatives accumulate; the step to
/// σ = 0 returns the estimate.
fn ipndm(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let mut history: Vec<Tensor> = Vec::with_capacity(MAX_ORDER);
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        let d = to_d(&x, sigma, &denoised)?;
        let dt = sigma_next - sigma;
        let n = history.len();
        x = if sigma_next == 0.0 {
            denoised
        } else {
            match (i + 1).min(MAX_ORDER) {
                1 => combine(&[(&x, 1.0), (&d, dt)])?,
                2 => combine(&[(&x, 1.0), (&d, dt * 1.5), (&history[n - 1], -dt * 0.5)])?,
                3 => combine(&[
                    (&x, 1.0),
                    (&d, dt * 23.0 / 12.0),
                    (&history[n - 1], -dt * 16.0 / 12.0),
                    (&history[n - 2], dt * 5.0 / 12.0),
                ])?,
                _ => combine(&[
                    (&x, 1.0),
                    (&d, dt * 55.0 / 24.0),
                    (&history[n - 1], -dt * 59.0 / 24.0),
                    (&history[n - 2], dt * 37.0 / 24.0),
                    (&history[n - 3], -dt * 9.0 / 24.0),
                ])?,
            }
        };
        remember(&mut history, d);
    }
    Ok(x)
}

/// iPNDM-v: [`ipndm`] with the Adams–Bashforth coefficients of the actual, non-uniform steps.
fn ipndm_v(run: &mut Run, mut x: Tensor, sigmas: &[f64]) -> Result<Tensor> {
    let mut history: Vec<Tensor> = Vec::with_capacity(MAX_ORDER);
    for i in 0..sigmas.len().saturating_sub(1) {
        let (sigma, sigma_next) = (sigmas[i], sigmas[i + 1]);
        let denoised = run.denoise(&x, sigma)?;
        run.report(i, sigmas, &x, &denoised)?;
        let d = to_d(&x, sigma, &denoised)?;
        let h_n = sigma_next - sigma;
        let n = history.len();
        x = if sigma_next == 0.0 {
            denoised
        } else {
            match (i + 1).min(MAX_ORDER) {
                1 => combine(&[(&x, 1.0), (&d, h_n)])?,
                2 => {
                    let h_n_1 = sigma - sigmas[i - 1];
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0;
                    let coeff2 = -(h_n / h_n_1) / 2.0;
                    combine(&[
                        (&x, 1.0),
                        (&d, h_n * coeff1),
                        (&history[n - 1], h_n * coeff2),
                    ])?
                }
                3 => {
                    let h_n_1 = sigma - sigmas[i - 1];
                    let h_n_2 = sigmas[i - 1] - sigmas[i - 2];
                    let temp = (1.0
                        - h_n / (3.0 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1))
                            / (h_n_1 * (h_n_1 + h_n_2)))
                        / 2.0;
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0 + temp;
                    let coeff2 = -(h_n / h_n_1) / 2.0 - (1.0 + h_n_1 / h_n_2) * temp;
                    let coeff3 = temp * h_n_1 / h_n_2;
                    combine(&[
                        (&x, 1.0),
                        (&d, h_n * coeff1),
                        (&history[n - 1], h_n * coeff2),
                        (&history[n - 2], h_n * coeff3),
                    ])?
                }
                _ => {
                    let h_n_1 = sigma - sigmas[i - 1];
                    let h_n_2 = sigmas[i - 1] - sigmas[i - 2];
                    let h_n_3 = sigmas[i - 2] - sigmas[i - 3];
                    let temp1 = (1.0
                        - h_n / (3.0 * (h_n + h_n_1)) * (h_n * (h_n + h_n_1))
                            / (h_n_1 * (h_n_1 + h_n_2)))
                        / 2.0;
                    let temp2 = ((1.0 - h_n / (3.0 * (h_n + h_n_1))) / 2.0
                        + (1.0 - h_n / (2.0 * (h_n + h_n_1))) * h_n
                            / (6.0 * (h_n + h_n_1 + h_n_2)))
                        * (h_n * (h_n + h_n_1) * (h_n + h_n_1 + h_n_2))
                        / (h_n_1 * (h_n_1 + h_n_2) * (h_n_1 + h_n_2 + h_n_3));
                    let ratio = h_n_1 * (h_n_1 + h_n_2) / (h_n_2 * (h_n_2 + h_n_3));
                    let coeff1 = (2.0 + h_n / h_n_1) / 2.0 + temp1 + temp2;
                    let coeff2 = -(h_n / h_n_1) / 2.0
                        - (1.0 + h_n_1 / h_n_2) * temp1
                        - (1.0 + h_n_1 / h_n_2 + ratio) * temp2;
                    let coeff3 = temp1 * h_n_1 / h_n_2
                        + (h_n_1 / h_n_2 + ratio * (1.0 + h_n_2 / h_n_3)) * temp2;
                    let coeff4 = -temp2 * ratio * h_n_1 / h_n_2;
                    combine(&[
                        (&x, 1.0),
                        (&d, h_n * coeff1),
                        (&history[n - 1], h_n * coeff2),
                        (&history[n - 2], h_n * coeff3),
                        (&history[n - 3], h_n * coeff4),
                    ])?
                }
            }
        };
        remember(&mut history, d);
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use super::*;
    use crate::sampling::k_diffusion::brownian::{tests::seeded, BrownianNoise};
    use crate::sampling::k_diffusion::model_sampling::tests::{fixture, relative_error, values};
    use candle_core::{DType, Device};

    /// D(x, σ) = 0.8·x/√(σ² + 1) + c·σ/(1 + σ), as the fixture generator computes it.
    struct Analytic {
        target: Tensor,
        calls: usize,
    }

    impl Denoiser for Analytic {
        fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor> {
            self.calls += 1;
            combine(&[
                (x, 0.8 / (sigma * sigma + 1.0).sqrt()),
                (&self.target, sigma / (1.0 + sigma)),
            ])
        }
    }

    /// Returns the fixture's noise tensors in order, checking that each call is for the
    /// stretch of σ ComfyUI asked for.
    struct Recorded {
        draws: Tensor,
        expected: Vec<(f64, f64)>,
        calls: usize,
    }

    impl NoiseSampler for Recorded {
        fn sample(&mut self, sigma: f64, sigma_next: f64, like: &Tensor) -> Result<Tensor> {
            let Some(&(expected, expected_next)) = self.expected.get(self.calls) else {
                candle_core::bail!(
                    "noise call {} beyond ComfyUI's {}",
                    self.calls,
                    self.expected.len()
                );
            };
            for (ours, theirs) in [(sigma, expected), (sigma_next, expected_next)] {
                if (ours - theirs).abs() > 1e-5 * theirs.abs() {
                    candle_core::bail!(
                        "noise call {} for ({sigma}, {sigma_next}), ComfyUI's for ({expected}, \
                         {expected_next})",
                        self.calls
                    );
                }
            }
            let draw = self.draws.get(self.calls)?.to_dtype(like.dtype())?;
            self.calls += 1;
            Ok(draw)
        }
    }

    fn flat(t: &Tensor) -> Vec<f64> {
        t.to_dtype(DType::F64)
            .and_then(|t| t.flatten_all())
            .and_then(|t| t.to_vec1::<f64>())
            .unwrap()
    }

    fn reference_name(kind: SamplerKind) -> &'static str {
        match kind {
            SamplerKind::Ddim => "euler",
            kind => kind.name(),
        }
    }

    /// How many times ComfyUI's run `key` ("main.euler", …) called the model, from the
    /// fixture's README.json.
    fn comfyui_model_calls(key: &str) -> usize {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../tests/fixtures/k_diffusion/README.json"
        );
        let text = std::fs::read_to_string(path).unwrap();
        let readme: serde_json::Value = serde_json::from_str(&text).unwrap();
        readme["samplers.safetensors"]["runs"][key]["model_calls"]
            .as_u64()
            .unwrap_or_else(|| panic!("no model_calls for {key} in README.json")) as usize
    }

    #[test]
    fn every_sampler_matches_comfyui() -> Result<()> {
        let reference: HashMap<String, Tensor> = fixture("samplers.safetensors");
        let start_noise = (&reference["input.x"] / values(&reference, "input.sigmas.main")[0])?;
        let long_run = [
            SamplerKind::Lms,
            SamplerKind::Heunpp2,
            SamplerKind::Dpmpp2m,
            SamplerKind::Dpmpp2mSde,
            SamplerKind::Dpmpp3mSde,
            SamplerKind::Ipndm,
            SamplerKind::IpndmV,
        ];
        let cases = [
            ("main", &SamplerKind::ALL[..]),
            ("long", &long_run[..]),
            ("partial", &SamplerKind::ALL[..]),
        ];
        for (case, kinds) in cases {
            let sigmas = values(&reference, &format!("input.sigmas.{case}"));
            let x = (&start_noise * sigmas[0])?;
            // UniPC is checked against its own fixture, in `uni_pc`.
            let checked_here = kinds
                .iter()
                .filter(|kind| !matches!(kind, SamplerKind::UniPc | SamplerKind::UniPcBh2));
            for &kind in checked_here {
                let key = format!("{case}.{}", reference_name(kind));
                let calls = values(&reference, &format!("{key}.noise_calls"));
                let mut noise = Recorded {
                    draws: reference["input.noise"].clone(),
                    expected: calls.chunks(2).map(|c| (c[0], c[1])).collect(),
                    calls: 0,
                };
                let mut denoiser = Analytic {
                    target: reference["input.target"].clone(),
                    calls: 0,
                };
                let mut seen = Vec::new();
                let mut callback = |step: &StepInfo<'_>| {
                    seen.push((step.index, step.sigma, step.denoised.clone()));
                    Ok(())
                };
                let output = sample(
                    kind,
                    &mut denoiser,
                    x.clone(),
                    &sigmas,
                    &mut noise,
                    Some(&mut callback),
                )?;
                let name = format!("{case}: {}", kind.name());
                let error = relative_error(
                    &flat(&output),
                    &values(&reference, &format!("{key}.output")),
                );
                assert!(error <= 1e-5, "{name}: relative error {error}");
                assert_eq!(output.dtype(), DType::F32);
                assert_eq!(noise.calls, noise.expected.len(), "{name}: noise calls");
                assert_eq!(
                    denoiser.calls,
                    comfyui_model_calls(&key),
                    "{name}: model calls"
                );
                assert_eq!(seen.len(), sigmas.len() - 1, "{name}: callback calls");
                let Some(denoised) = reference.get(&format!("{key}.denoised")) else {
                    continue;
                };
                for (step, (index, sigma, ours)) in seen.iter().enumerate() {
                    assert_eq!((*index, *sigma), (step, sigmas[step]));
                    let error = relative_error(&flat(ours), &flat(&denoised.get(step)?));
                    assert!(error <= 1e-5, "{name} step {step}: relative error {error}");
                }
            }
        }
        Ok(())
    }

    #[test]
    fn names_round_trip_and_bad_inputs_are_errors() -> Result<()> {
        for kind in SamplerKind::ALL {
            assert_eq!(SamplerKind::from_comfy_name(kind.name())?, kind);
        }
        let error = SamplerKind::from_comfy_name("uni_pc_bh3")
            .unwrap_err()
            .to_string();
        assert!(error.contains("dpmpp_2m"), "{error}");
        assert!(SamplerKind::DpmppSdeGpu.uses_brownian_noise());
        assert!(!SamplerKind::EulerAncestral.uses_brownian_noise());
        assert!(SamplerKind::Dpm2.discards_penultimate_sigma());

        let x = Tensor::ones((1, 2), DType::F32, &Device::Cpu)?;
        let mut denoiser = Analytic {
            target: x.zeros_like()?,
            calls: 0,
        };
        let mut noise = BrownianNoise::new(seeded(1));
        for sigmas in [&[1.0, f64::NAN, 0.0][..], &[1.0, -0.5], &[1.0, 0.0, 0.0]] {
            let result = sample(
                SamplerKind::Euler,
                &mut denoiser,
                x.clone(),
                sigmas,
                &mut noise,
                None,
            );
            assert!(result.is_err(), "{sigmas:?}");
        }
        // An empty or single-σ table leaves the sample as it is.
        for sigmas in [&[][..], &[3.0]] {
            let out = sample(
                SamplerKind::DpmppSde,
                &mut denoiser,
                x.clone(),
                sigmas,
                &mut noise,
                None,
            )?;
            assert_eq!(out.to_vec2::<f32>()?, x.to_vec2::<f32>()?);
        }
        Ok(())
    }

    #[test]
    fn an_error_from_the_callback_stops_sampling() -> Result<()> {
        let x = Tensor::ones((1, 2), DType::F32, &Device::Cpu)?;
        let mut denoiser = Analytic {
            target: x.zeros_like()?,
            calls: 0,
        };
        let mut noise = BrownianNoise::new(seeded(2));
        let mut steps = 0;
        let mut callback = |step: &StepInfo<'_>| {
            steps += 1;
            if step.index == 1 {
                candle_core::bail!("cancelled");
            }
            Ok(())
        };
        let result = sample(
            SamplerKind::Dpmpp2mSde,
            &mut denoiser,
            x,
            &[10.0, 5.0, 1.0, 0.0],
            &mut noise,
            Some(&mut callback),
        );
        assert!(result.unwrap_err().to_string().contains("cancelled"));
        assert_eq!(steps, 2);
        assert_eq!(denoiser.calls, 2);
        Ok(())
    }

    #[test]
    fn sde_samplers_run_on_brownian_noise_in_half_precision() -> Result<()> {
        let x =
            (Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu)? * 14.6)?.to_dtype(DType::F16)?;
        for kind in [
            SamplerKind::DpmppSde,
            SamplerKind::Dpmpp2mSde,
            SamplerKind::Dpmpp3mSde,
        ] {
            let mut denoiser = Analytic {
                target: x.zeros_like()?,
                calls: 0,
            };
            let mut noise = BrownianNoise::new(seeded(5));
            let out = sample(
                kind,
                &mut denoiser,
                x.clone(),
                &[14.6, 3.0, 0.5, 0.0],
                &mut noise,
                None,
            )?;
            assert_eq!(out.dtype(), DType::F16);
            let values = flat(&out);
            assert!(values.iter().all(|v| v.is_finite()), "{}", kind.name());
        }
        Ok(())
    }
}
