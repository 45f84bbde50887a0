//! UniPC, the unified predictor–corrector multistep sampler of Zhao et al. (2023), as ComfyUI
//! runs it for its samplers `uni_pc` ([`UniPcVariant::Bh1`]) and `uni_pc_bh2`
//! ([`UniPcVariant::Bh2`]): `sample_unipc` of `comfy/extra_samplers/uni_pc.py`, multistep, data
//! prediction (the solver extrapolates the x₀ estimates), order up to 3, lower orders for the
//! first steps and the last two, no thresholding.
//!
//! ComfyUI reads the σ table as a variance-preserving schedule (its `SigmaConvert`):
//! α = 1/√(σ² + 1), σ_VP = σ·α and the half log-SNR λ = ln(α/σ_VP) = −ln σ, and runs the solver
//! on x_VP = α·x: the sample is divided by √(1 + σ₀²) on entry and the result by the final α.
//! Every update of the solver divided by α_t is the same update in k-diffusion's scale x, with
//! the α factors gone, and the two rescalings cancel; this module runs in that scale, on the
//! sample and estimate the [`Denoiser`] sees. ComfyUI also wraps the denoiser D as a noise
//! predictor ε = (x − D(x, σ))/σ and turns ε back into x₀ = (x_VP − σ_VP·ε)/α, which is D
//! itself; the estimate is D directly, without the round trip's rounding (the round trip
//! recovers D/√(σ² + 1) as a difference of terms about σ times larger, which costs digits at
//! high σ in half precision).
//!
//! One step from σ_s to σ_t, with h = λ_t − λ_s = ln(σ_s/σ_t), the newest estimate
//! m₀ = D(x, σ_s) and, at order p, the p − 1 estimates before it, m_k at σ_{s_k}
//! (r_k = (λ_{s_k} − λ_s)/h, negative; Δ_k = m_k − m₀):
//!
//! - first-order base: x̃ = (σ_t/σ_s)·x + (1 − e^{−h})·m₀
//! - predictor: x_t = x̃ − B(h)·Σ_k ρᵖ_k·Δ_k/r_k
//! - corrector, with m_t = D(x_t, σ_t): x_t = x̃ − B(h)·(Σ_k ρᶜ_k·Δ_k/r_k + ρᶜ_p·(m_t − m₀))
//!
//! B(h) = −h (B₁) or e^{−h} − 1 (B₂). The ρ solve Σ_j r_j^{i−1}·ρ_j = i!·(−h)·φ_{i+1}(−h)/B(h)
//! for i = 1…p, with r_p = 1 and φ₁(z) = (e^z − 1)/z, φ_{k+1}(z) = (φ_k(z) − 1/k!)/z: the
//! predictor's ρᵖ the first p − 1 equations over r_1…r_{p−1}, the corrector's ρᶜ all p. As in
//! ComfyUI, a second-order predictor takes ρᵖ = ½ and a first-order corrector ρᶜ = ½. The
//! corrector's m_t becomes the next step's m₀, so correcting costs no model evaluation.
//!
//! With N σ (N − 1 steps) ComfyUI's order is min(3, N − 2); step i runs at order
//! min(i + 1, order, N − 1 − i) and the last step has no corrector, so the model is evaluated
//! N − 1 times. A final σ of 0 is run as 0.001 (λ must be finite there), as ComfyUI does: the
//! result is the sample at σ = 0.001.
//!
//! With a single step the order is 0 and ComfyUI does not move the sample: it evaluates the
//! model once (for the callback) and returns the input rescaled by √(1 + σ₁²)/√(1 + σ₀²), its
//! entry and exit scalings; that is kept for parity. ComfyUI's KSampler builds the σ table of
//! these two samplers with one step more and drops its penultimate σ; that is the caller's
//! table, not this sampler's concern. ComfyUI's UniPC contracts the estimates with
//! `einsum('k,bkchw->bchw')` and so takes 4-D latents only; here the sample may have any shape.

use std::collections::VecDeque;

use candle_core::{Result, Tensor};

use super::{Denoiser, StepCallback, StepInfo};

/// The final σ that ComfyUI's UniPC runs in place of 0.
const FINAL_SIGMA_FOR_ZERO: f64 = 0.001;

/// The highest order ComfyUI runs.
const MAX_ORDER: usize = 3;

/// The choice of B(h) in the UniPC update, which scales the higher-order corrections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UniPcVariant {
    /// B(h) = −h (ComfyUI's `uni_pc`).
    Bh1,
    /// B(h) = e^{−h} − 1 (ComfyUI's `uni_pc_bh2`).
    Bh2,
}

impl UniPcVariant {
    /// B(h) of a step of log-SNR length h.
    fn b(self, h: f64) -> f64 {
        match self {
            Self::Bh1 => -h,
            Self::Bh2 => (-h).exp_m1(),
        }
    }
}

/// Samples with UniPC from `x`, the noise already scaled to `sigmas[0]` (x = x₀ + σ₀·ε, as
/// ComfyUI's KSampler hands it over), down the σ table, and returns the final sample in x's
/// dtype (scalar coefficients are computed in f64).
///
/// `callback`, if any, is called once per step i, before the step moves the sample from σᵢ
/// to σᵢ₊₁ (the σ of the table given here, 0 included), with the sample at σᵢ and the model's
/// estimate there (the `denoised` ComfyUI's callback gets); an error from it stops sampling
/// and is returned. ComfyUI's callback gets that sample divided by √(1 + σᵢ²), except at the
/// last step, where it gets the final one.
///
/// Errors on fewer than 2 σ, σ that are not finite, not positive (other than a final 0) or not
/// strictly decreasing, and on a final 0 after a σ at or below 0.001 (the final 0 is run as
/// 0.001).
pub fn sample_unipc(
    denoiser: &mut dyn Denoiser,
    x: Tensor,
    sigmas: &[f64],
    variant: UniPcVariant,
    mut callback: Option<&mut StepCallback<'_>>,
) -> Result<Tensor> {
    let levels = solver_sigmas(sigmas)?;
    let steps = levels.len() - 1;
    let order = MAX_ORDER.min(steps - 1);
    let mut x = x;
    let mut history = History::new(order.max(1));
    history.push(levels[0], estimate(denoiser, &x, levels[0])?);
    for i in 0..steps {
        if let Some(callback) = callback.as_mut() {
            callback(&StepInfo {
                index: i,
                x: &x,
                sigma: sigmas[i],
                sigma_next: sigmas[i + 1],
                denoised: history.newest()?.1,
            })?;
        }
        if order == 0 {
            // A single step: ComfyUI's solver never moves the sample, only its entry and exit
            // scalings apply.
            let rescale = ((1.0 + levels[1] * levels[1]) / (1.0 + levels[0] * levels[0])).sqrt();
            return x.affine(rescale, 0.0);
        }
        let step_order = (i + 1).min(order).min(steps - i);
        let is_last = i + 1 == steps;
        let (next, estimate_next) = step(
            denoiser,
            &x,
            &history,
            levels[i + 1],
            step_order,
            variant,
            !is_last,
        )?;
        x = next;
        if let Some(m) = estimate_next {
            history.push(levels[i + 1], m);
        }
    }
    Ok(x)
}

/// The σ the solver runs through: `sigmas` checked, a final 0 replaced by 0.001.
fn solver_sigmas(sigmas: &[f64]) -> Result<Vec<f64>> {
    let n = sigmas.len();
    if n < 2 {
        candle_core::bail!("uni_pc: needs at least 2 σ (one step), got {n}");
    }
    if let Some((i, s)) = sigmas.iter().enumerate().find(|(_, s)| !s.is_finite()) {
        candle_core::bail!("uni_pc: σ[{i}] = {s} is not finite");
    }
    if let Some((i, s)) = sigmas
        .iter()
        .enumerate()
        .find(|&(i, &s)| s < 0.0 || (s == 0.0 && i + 1 < n))
    {
        candle_core::bail!("uni_pc: σ[{i}] = {s}: σ must be positive (only the last may be 0)");
    }
    if let Some(i) = (1..n).find(|&i| sigmas[i] >= sigmas[i - 1]) {
        candle_core::bail!(
            "uni_pc: σ must strictly decrease, but σ[{}] = {} is followed by σ[{i}] = {}",
            i - 1,
            sigmas[i - 1],
            sigmas[i]
        );
    }
    let mut levels = sigmas.to_vec();
    if levels[n - 1] == 0.0 {
        if levels[n - 2] <= FINAL_SIGMA_FOR_ZERO {
            candle_core::bail!(
                "uni_pc: the final σ = 0 is run as {FINAL_SIGMA_FOR_ZERO}, which must be below \
                 the σ before it ({})",
                levels[n - 2]
            );
        }
        levels[n - 1] = FINAL_SIGMA_FOR_ZERO;
    }
    Ok(levels)
}

/// The model's estimate of x₀ at σ, in x's dtype.
fn estimate(denoiser: &mut dyn Denoiser, x: &Tensor, sigma: f64) -> Result<Tensor> {
    denoiser.denoise(x, sigma)?.to_dtype(x.dtype())
}

/// The newest estimates with their σ, oldest first; at most as many as the order needs.
struct History {
    entries: VecDeque<(f64, Tensor)>,
    capacity: usize,
}

impl History {
    fn new(capacity: usize) -> Self {
        Self {
            entries: VecDeque::with_capacity(capacity),
            capacity,
        }
    }

    fn push(&mut self, sigma: f64, estimate: Tensor) {
        if self.entries.len() == self.capacity {
            self.entries.pop_front();
        }
        self.entries.push_back((sigma, estimate));
    }

    /// The estimate `back` entries before the newest (0: the newest).
    fn back(&self, back: usize) -> Result<(f64, &Tensor)> {
        let len = self.entries.len();
        match back.checked_add(1).and_then(|k| len.checked_sub(k)) {
            Some(i) => Ok((self.entries[i].0, &self.entries[i].1)),
            None => candle_core::bail!("uni_pc: estimate {back} steps back requested, {len} kept"),
        }
    }

    fn newest(&self) -> Result<(f64, &Tensor)> {
        self.back(0)
    }
}

/// One UniPC step of order `order` from the newest estimate's σ to `sigma_t`: the predicted
/// sample and, with `correct`, the corrected one and the estimate at the predicted sample
/// (the next step's m₀).
fn step(
    denoiser: &mut dyn Denoiser,
    x: &Tensor,
    history: &History,
    sigma_t: f64,
    order: usize,
    variant: UniPcVariant,
    correct: bool,
) -> Result<(Tensor, Option<Tensor>)> {
    let (sigma_s, m0) = history.newest()?;
    let h = (sigma_s / sigma_t).ln();
    let b_h = variant.b(h);

    // r_k and Δ_k of the p − 1 earlier estimates, newest first.
    let mut r = Vec::with_capacity(order);
    let mut deltas = Vec::with_capacity(order);
    for k in 1..order {
        let (sigma_k, m_k) = history.back(k)?;
        r.push((sigma_s / sigma_k).ln() / h);
        deltas.push((m_k - m0)?);
    }
    r.push(1.0);
    let rhs = order_conditions(h, b_h, order);

    let base = (x.affine(sigma_t / sigma_s, 0.0)? + m0.affine(-(-h).exp_m1(), 0.0)?)?;
    let predicted = if order >= 2 {
        let rho = if order == 2 {
            vec![0.5]
        } else {
            solve_vandermonde(&r[..order - 1], &rhs[..order - 1])?
        };
        (&base - weighted_deltas(&deltas, &r, &rho, b_h)?)?
    } else {
        base.clone()
    };
    if !correct {
        return Ok((predicted, None));
    }

    let m_t = estimate(denoiser, &predicted, sigma_t)?;
    let rho = if order == 1 {
        vec![0.5]
    } else {
        solve_vandermonde(&r, &rhs)?
    };
    let mut correction = (&m_t - m0)?.affine(b_h * rho[order - 1], 0.0)?;
    if order >= 2 {
        correction = (correction + weighted_deltas(&deltas, &r, &rho[..order - 1], b_h)?)?;
    }
    Ok(((base - correction)?, Some(m_t)))
}

/// B(h)·Σ_k ρ_k·Δ_k/r_k over the earlier estimates.
fn weighted_deltas(deltas: &[Tensor], r: &[f64], rho: &[f64], b_h: f64) -> Result<Tensor> {
    let mut sum: Option<Tensor> = None;
    for ((delta, r_k), rho_k) in deltas.iter().zip(r).zip(rho) {
        let term = delta.affine(b_h * rho_k / r_k, 0.0)?;
        sum = Some(match sum {
            Some(acc) => (acc + term)?,
            None => term,
        });
    }
    match sum {
        Some(sum) => Ok(sum),
        None => candle_core::bail!("uni_pc: a higher-order term without earlier estimates"),
    }
}

/// The right-hand sides i!·g_i/B(h), i = 1…`order`, with g_i = (−h)·φ_{i+1}(−h) by ComfyUI's
/// recursion g₁ = φ₁(−h) − 1, g_{i+1} = g_i/(−h) − 1/(i+1)!.
fn order_conditions(h: f64, b_h: f64, order: usize) -> Vec<f64> {
    let hh = -h;
    let mut g = hh.exp_m1() / hh - 1.0;
    let mut factorial = 1.0;
    let mut rhs = Vec::with_capacity(order);
    for i in 1..=order {
        rhs.push(g * factorial / b_h);
        factorial *= (i + 1) as f64;
        g = g / hh - 1.0 / factorial;
    }
    rhs
}

/// Solves Σ_j r_j^{i−1}·ρ_j = rhs_i (i = 1…n) by Gaussian elimination with partial pivoting.
fn solve_vandermonde(r: &[f64], rhs: &[f64]) -> Result<Vec<f64>> {
    let n = r.len();
    let mut a: Vec<Vec<f64>> = (0..n)
        .map(|i| {
            let mut row: Vec<f64> = r.iter().map(|&r_j| r_j.powi(i as i32)).collect();
            row.push(rhs[i]);
            row
        })
        .collect();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|&p, &q| a[p][col].abs().total_cmp(&a[q][col].abs()))
            .unwrap_or(col);
        let p = a[pivot][col];
        if p == 0.0 || !p.is_finite() {
            candle_core::bail!("uni_pc: singular order conditions for r = {r:?}");
        }
        a.swap(col, pivot);
        let (upper, lower) = a.split_at_mut(col + 1);
        let pivot_row = &upper[col];
        for row in lower {
            let factor = row[col] / pivot_row[col];
            for (value, above) in row[col..].iter_mut().zip(&pivot_row[col..]) {
                *value -= factor * above;
            }
        }
    }
    let mut rho = vec![0.0; n];
    for i in (0..n).rev() {
        let tail: f64 = (i + 1..n).map(|j| a[i][j] * rho[j]).sum();
        rho[i] = (a[i][n] - tail) / a[i][i];
    }
    Ok(rho)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device};
    use std::collections::HashMap;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/uni_pc/uni_pc.safetensors"
    );
    const STEPS: [usize; 6] = [1, 2, 3, 4, 8, 20];

    fn fixture() -> Result<HashMap<String, Tensor>> {
        candle_core::safetensors::load(FIXTURE, &Device::Cpu)
    }

    fn get<'a>(fx: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
        fx.get(key)
            .unwrap_or_else(|| panic!("fixture has no tensor {key}"))
    }

    /// The fixture's denoiser, D(x, σ) = 0.8·x/√(σ² + 1) + c·σ/(1 + σ), counting its calls.
    struct Analytic {
        c: Tensor,
        calls: usize,
    }

    impl Denoiser for Analytic {
        fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor> {
            self.calls += 1;
            let c = self.c.to_dtype(x.dtype())?;
            x.affine(0.8 / (sigma * sigma + 1.0).sqrt(), 0.0)?
                + c.affine(sigma / (1.0 + sigma), 0.0)?
        }
    }

    fn variants() -> [(UniPcVariant, &'static str); 2] {
        [(UniPcVariant::Bh1, "bh1"), (UniPcVariant::Bh2, "bh2")]
    }

    fn tables() -> impl Iterator<Item = String> {
        STEPS
            .iter()
            .flat_map(|n| [format!("{n}_zero"), format!("{n}_nozero")])
    }

    /// x = noise·σ₀ in f64, then cast to `dtype`.
    fn start(fx: &HashMap<String, Tensor>, sigmas: &[f64], dtype: DType) -> Result<Tensor> {
        get(fx, "noise").affine(sigmas[0], 0.0)?.to_dtype(dtype)
    }

    /// Runs every table and variant of the fixture in `dtype`; the largest error relative to
    /// the reference's max |value|.
    fn parity(dtype: DType) -> Result<f64> {
        let fx = fixture()?;
        let mut worst: f64 = 0.0;
        for table in tables() {
            let sigmas = get(&fx, &format!("sigmas_{table}")).to_vec1::<f64>()?;
            for (variant, name) in variants() {
                let mut model = Analytic {
                    c: get(&fx, "c").clone(),
                    calls: 0,
                };
                let x = start(&fx, &sigmas, dtype)?;
                let out = sample_unipc(&mut model, x, &sigmas, variant, None)?;
                assert_eq!(out.dtype(), dtype);
                assert_eq!(model.calls, sigmas.len() - 1, "{name} {table}: model calls");
                let reference = get(&fx, &format!("out_{name}_{table}"));
                let scale = reference.abs()?.max_all()?.to_scalar::<f64>()?;
                let err = max_abs_diff(&out, reference) / scale;
                eprintln!("uni_pc {dtype:?} {name} {table}: max relative error {err:.3e}");
                worst = worst.max(err);
            }
        }
        Ok(worst)
    }

    #[test]
    fn matches_comfyui_in_f32() -> Result<()> {
        let worst = parity(DType::F32)?;
        assert!(worst <= 1e-5, "max relative error {worst:.3e} > 1e-5");
        Ok(())
    }

    #[test]
    fn matches_comfyui_in_f64() -> Result<()> {
        let worst = parity(DType::F64)?;
        assert!(worst <= 1e-10, "max relative error {worst:.3e} > 1e-10");
        Ok(())
    }

    /// One call per step, in order, with the table's σ, the sample before the step and the
    /// estimate ComfyUI's callback gets.
    #[test]
    fn callback_sees_every_step() -> Result<()> {
        let fx = fixture()?;
        let sigmas = get(&fx, "sigmas_8_zero").to_vec1::<f64>()?;
        for (variant, name) in variants() {
            let mut model = Analytic {
                c: get(&fx, "c").clone(),
                calls: 0,
            };
            let x = start(&fx, &sigmas, DType::F64)?;
            let mut seen = Vec::new();
            let mut record = |info: &StepInfo<'_>| -> Result<()> {
                seen.push((
                    info.index,
                    info.sigma,
                    info.sigma_next,
                    info.x.clone(),
                    info.denoised.clone(),
                ));
                Ok(())
            };
            sample_unipc(&mut model, x.clone(), &sigmas, variant, Some(&mut record))?;
            assert_eq!(seen.len(), sigmas.len() - 1);
            let expected = get(&fx, &format!("denoised_{name}_8_zero"));
            let comfyui_x = get(&fx, &format!("callback_x_{name}_8_zero"));
            for (i, (index, sigma, sigma_next, x_i, denoised)) in seen.iter().enumerate() {
                assert_eq!(*index, i);
                assert_eq!((*sigma, *sigma_next), (sigmas[i], sigmas[i + 1]));
                if i == 0 {
                    assert_eq!(max_abs_diff(x_i, &x), 0.0);
                }
                // ComfyUI's sample is x/√(1 + σᵢ²), but after the last step at the last one.
                if i + 1 < seen.len() {
                    let scaled = x_i.affine(1.0 / (1.0 + sigmas[i] * sigmas[i]).sqrt(), 0.0)?;
                    let err = max_abs_diff(&scaled, &comfyui_x.get(i)?);
                    assert!(err <= 1e-10, "{name} step {i}: x differs by {err:.3e}");
                }
                let err = max_abs_diff(denoised, &expected.get(i)?);
                assert!(
                    err <= 1e-10,
                    "{name} step {i}: denoised differs by {err:.3e}"
                );
            }
        }
        Ok(())
    }

    /// An error from the callback is returned and no model evaluation follows it.
    #[test]
    fn callback_error_stops_sampling() -> Result<()> {
        let fx = fixture()?;
        let sigmas = get(&fx, "sigmas_8_zero").to_vec1::<f64>()?;
        let mut model = Analytic {
            c: get(&fx, "c").clone(),
            calls: 0,
        };
        let mut calls = 0;
        let mut cancel_at_2 = |info: &StepInfo<'_>| -> Result<()> {
            calls += 1;
            if info.index == 2 {
                candle_core::bail!("cancelled");
            }
            Ok(())
        };
        let x = start(&fx, &sigmas, DType::F32)?;
        let result = sample_unipc(
            &mut model,
            x,
            &sigmas,
            UniPcVariant::Bh1,
            Some(&mut cancel_at_2),
        );
        let err = match result {
            Ok(_) => panic!("sampling went on after the callback failed"),
            Err(err) => err.to_string(),
        };
        assert!(err.contains("cancelled"), "{err}");
        assert_eq!(calls, 3);
        // The estimates at σ₀, σ₁ and σ₂, and none after.
        assert_eq!(model.calls, 3);
        Ok(())
    }

    #[test]
    fn refuses_bad_sigma_tables() -> Result<()> {
        let x = Tensor::zeros((1, 4, 2, 4, 4), DType::F32, &Device::Cpu)?;
        let cases: [(&[f64], &str); 9] = [
            (&[], "at least 2"),
            (&[14.6], "at least 2"),
            (&[14.6, f64::NAN, 0.0], "not finite"),
            (&[f64::INFINITY, 1.0, 0.0], "not finite"),
            (&[1.0, 2.0, 0.0], "strictly decrease"),
            (&[2.0, 1.0, 1.0], "strictly decrease"),
            (&[2.0, 0.0, 0.0], "positive"),
            (&[2.0, 1.0, -0.5], "positive"),
            (&[2.0, 0.001, 0.0], "run as 0.001"),
        ];
        for (sigmas, expected) in cases {
            let mut model = Analytic {
                c: x.zeros_like()?,
                calls: 0,
            };
            match sample_unipc(&mut model, x.clone(), sigmas, UniPcVariant::Bh2, None) {
                Ok(_) => panic!("{sigmas:?} accepted"),
                Err(err) => assert!(
                    err.to_string().contains(expected),
                    "{sigmas:?}: {err} (expected \"{expected}\")"
                ),
            }
            assert_eq!(model.calls, 0);
        }
        Ok(())
    }

    /// The ρ of a known system: r = (−1, 1) gives [[1, 1], [−1, 1]]·ρ = b.
    #[test]
    fn solves_order_conditions() -> Result<()> {
        let rho = solve_vandermonde(&[-1.0, 1.0], &[2.0, 0.0])?;
        assert!((rho[0] - 1.0).abs() < 1e-15 && (rho[1] - 1.0).abs() < 1e-15);
        let rho = solve_vandermonde(&[-2.0, -0.5, 1.0], &[1.0, 0.25, 0.5])?;
        for i in 0..3 {
            let lhs: f64 = [-2.0f64, -0.5, 1.0]
                .iter()
                .zip(&rho)
                .map(|(r, p)| r.powi(i) * p)
                .sum();
            assert!((lhs - [1.0, 0.25, 0.5][i as usize]).abs() < 1e-14);
        }
        Ok(())
    }
}
