//! FreeInit (Wu et al.; METHODS.md §5): after a sampling pass, re-diffuse the result to the
//! last training timestep with the original noise, keep its low spatio-temporal frequencies,
//! take the high frequencies from fresh noise, and sample again. Matches diffusers'
//! `FreeInitMixin` (`enable_free_init`), plus the original repository's box filter.
//!
//! FreeInit wraps the sampling loop ([`sample_with_freeinit`]): each pass is a plain run of
//! [`Sampler::denoise`], and the passes count their steps on as one run.

use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};
use rustfft::{num_complex::Complex64, FftDirection, FftPlanner};

use crate::sampling::{SampleInputs, SampleOutput, SampleSettings, Sampler, StepRange};

/// The low-pass filter's shape.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FilterKind {
    Butterworth,
    Gaussian,
    Ideal,
    Box,
}

impl FilterKind {
    pub const NAMES: [&'static str; 4] = ["butterworth", "gaussian", "ideal", "box"];
}

impl FromStr for FilterKind {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "butterworth" => Ok(Self::Butterworth),
            "gaussian" => Ok(Self::Gaussian),
            "ideal" => Ok(Self::Ideal),
            "box" => Ok(Self::Box),
            other => Err(format!(
                "unknown FreeInit filter `{other}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// FreeInit's settings, with diffusers' defaults.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct FreeInitConfig {
    /// Sampling passes in all (1 = FreeInit off).
    pub iterations: usize,
    pub filter: FilterKind,
    /// Butterworth order.
    pub order: u32,
    /// d_s, the spatial stop frequency (normalised, 0..1).
    pub spatial_stop_frequency: f64,
    /// d_t, the temporal stop frequency (normalised, 0..1).
    pub temporal_stop_frequency: f64,
    /// Coarse-to-fine: pass i runs `steps·(i+1)/iterations` steps (diffusers' `use_fast_sampling`).
    pub fast_sampling: bool,
}

impl Default for FreeInitConfig {
    fn default() -> Self {
        Self {
            iterations: 3,
            filter: FilterKind::Butterworth,
            order: 4,
            spatial_stop_frequency: 0.25,
            temporal_stop_frequency: 0.25,
            fast_sampling: false,
        }
    }
}

impl FreeInitConfig {
    /// Sampling passes in all: `iterations`, at least one.
    pub fn passes(&self) -> usize {
        self.iterations.max(1)
    }

    /// Inference steps of pass `iteration` (0-based) for a schedule of `steps`.
    pub fn steps_for_iteration(&self, steps: usize, iteration: usize) -> usize {
        if self.fast_sampling {
            ((steps as f64 / self.passes() as f64 * (iteration + 1) as f64) as usize).max(1)
        } else {
            steps
        }
    }

    /// The settings of pass `iteration`: `settings` with that pass's step count.
    pub fn pass_settings(&self, settings: &SampleSettings, iteration: usize) -> SampleSettings {
        SampleSettings {
            steps: self.steps_for_iteration(settings.steps, iteration),
            ..*settings
        }
    }
}

/// Samples with FreeInit, as diffusers' `FreeInitMixin`: the first pass is a plain run; each
/// later pass diffuses the previous result to the last training timestep with the first
/// pass's starting latents, keeps its low frequencies, takes the high ones from
/// `fresh_noise(pass)`, and runs the loop again from there (without a second scaling by
/// `init_noise_sigma`). Step indices, the step count reported to the callback, and the frame
/// evaluations run on across passes.
pub fn sample_with_freeinit(
    sampler: &mut Sampler<'_>,
    config: &FreeInitConfig,
    settings: &SampleSettings,
    inputs: &SampleInputs<'_>,
    fresh_noise: &mut dyn FnMut(usize) -> Result<Tensor>,
) -> Result<SampleOutput> {
    settings.validate()?;
    let passes = config.passes();
    let total = (0..passes)
        .map(|pass| config.pass_settings(settings, pass).steps_run())
        .sum();
    let initial_latents = sampler.start_latents(
        &config.pass_settings(settings, 0),
        inputs.noise,
        inputs.init_latents,
    )?;
    let last_train_timestep = sampler.scheduler().alphas_cumprod().len().saturating_sub(1) as f64;
    let mut latents = initial_latents.clone();
    let (mut steps, mut frame_evaluations) = (0, 0);
    for pass in 0..passes {
        if pass > 0 {
            let z_t =
                sampler
                    .scheduler()
                    .add_noise(&latents, &initial_latents, last_train_timestep)?;
            let z_rand = fresh_noise(pass)?;
            latents = mix_frequencies(&z_t, &z_rand, config)?;
        }
        let range = StepRange {
            first: steps,
            total,
        };
        let output = sampler.denoise(
            &config.pass_settings(settings, pass),
            inputs.text,
            latents,
            range,
        )?;
        steps += output.steps;
        frame_evaluations += output.frame_evaluations;
        latents = output.latents;
    }
    Ok(SampleOutput {
        latents,
        frame_evaluations,
        steps,
    })
}

/// How AnimateDiff-Evolved re-initialises the noise between FreeInit passes of ComfyUI's
/// samplers (its `init_type`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComfyReinit {
    /// "FreeInit [sampler sigma]" / "FreeInit [model sigma]": the previous result in the VAE's
    /// unscaled units is diffused to the noise level σ of timestep `sigma_step`, divided by the
    /// latent scale (ᾱ = 1 / (1 + (σ/s)²), as diffusers' DDIM `add_noise` would on unscaled
    /// latents), with the current noise.
    FreeInit,
    /// "DinkInit_v1": (x + noise₀·σ)·ᾱ with ᾱ = 1 / (1 + σ²), from the first pass's noise.
    DinkInitV1,
}

impl ComfyReinit {
    pub const NAMES: [&'static str; 3] = [
        "FreeInit [sampler sigma]",
        "FreeInit [model sigma]",
        "DinkInit_v1",
    ];
}

impl FromStr for ComfyReinit {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "FreeInit [sampler sigma]" | "FreeInit [model sigma]" => Ok(Self::FreeInit),
            "DinkInit_v1" => Ok(Self::DinkInitV1),
            other => Err(format!(
                "unknown FreeInit init type `{other}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The noise of the next pass of ComfyUI's samplers under AnimateDiff-Evolved's FreeInit:
/// `previous` (the last pass's result, or the input latents before the first; scaled latents,
/// (B, C, F, h, w)) diffused to `sigma` (the model's σ of the chosen timestep), its low
/// frequencies mixed with the high ones of `fresh` noise. `noise` is the current pass's noise
/// and `first_noise` the first pass's; `latent_scale` is the VAE's scaling factor.
#[allow(clippy::too_many_arguments)]
pub fn comfy_reinitialized_noise(
    reinit: ComfyReinit,
    cfg: &FreeInitConfig,
    previous: &Tensor,
    noise: &Tensor,
    first_noise: &Tensor,
    fresh: &Tensor,
    sigma: f64,
    latent_scale: f64,
) -> Result<Tensor> {
    // ComfyUI's samplers see latents in the VAE's own units.
    let unscaled = (previous / latent_scale)?;
    let diffused = match reinit {
        ComfyReinit::FreeInit => {
            let sigma = sigma / latent_scale;
            let alpha_bar = 1.0 / (sigma * sigma + 1.0);
            ((&unscaled * alpha_bar.sqrt())? + (noise * (1.0 - alpha_bar).sqrt())?)?
        }
        ComfyReinit::DinkInitV1 => {
            let alpha_bar = 1.0 / (sigma * sigma + 1.0);
            ((&unscaled + (first_noise * sigma)?)? * alpha_bar)?
        }
    };
    mix_frequencies(&diffused, fresh, cfg)
}

/// The low-pass mask over (frames, height, width) in centred (fftshift-ed) frequency order,
/// as diffusers' `_get_freeinit_freq_filter` builds it; shape (frames, height, width).
pub fn low_pass_filter(
    cfg: &FreeInitConfig,
    frames: usize,
    height: usize,
    width: usize,
) -> Vec<f64> {
    let (ds, dt) = (cfg.spatial_stop_frequency, cfg.temporal_stop_frequency);
    let mut mask = vec![0.0; frames * height * width];
    if ds == 0.0 || dt == 0.0 {
        return mask;
    }
    if cfg.filter == FilterKind::Box {
        // The original FreeInit repository's box: a centred block of half-widths
        // round(H/2·d_s) and round(F/2·d_t).
        let ts = ((height / 2) as f64 * ds).round() as isize;
        let tt = ((frames / 2) as f64 * dt).round() as isize;
        let (cf, ch, cw) = (
            (frames / 2) as isize,
            (height / 2) as isize,
            (width / 2) as isize,
        );
        for f in (cf - tt).max(0)..(cf + tt).min(frames as isize) {
            for h in (ch - ts).max(0)..(ch + ts).min(height as isize) {
                for w in (cw - ts).max(0)..(cw + ts).min(width as isize) {
                    mask[(f as usize * height + h as usize) * width + w as usize] = 1.0;
                }
            }
        }
        return mask;
    }
    for f in 0..frames {
        for h in 0..height {
            for w in 0..width {
                let d2 = ((ds / dt) * (2.0 * f as f64 / frames as f64 - 1.0)).powi(2)
                    + (2.0 * h as f64 / height as f64 - 1.0).powi(2)
                    + (2.0 * w as f64 / width as f64 - 1.0).powi(2);
                mask[(f * height + h) * width + w] = match cfg.filter {
                    FilterKind::Butterworth => {
                        1.0 / (1.0 + (d2 / (ds * ds)).powi(cfg.order as i32))
                    }
                    FilterKind::Gaussian => (-d2 / (2.0 * ds * ds)).exp(),
                    FilterKind::Ideal => f64::from(d2 <= ds * 2.0),
                    FilterKind::Box => unreachable!("handled above"),
                };
            }
        }
    }
    mask
}

/// The mask as a tensor (1, 1, F, H, W) for inspection and tests.
pub fn low_pass_filter_tensor(
    cfg: &FreeInitConfig,
    frames: usize,
    height: usize,
    width: usize,
    device: &Device,
) -> Result<Tensor> {
    let mask: Vec<f32> = low_pass_filter(cfg, frames, height, width)
        .into_iter()
        .map(|v| v as f32)
        .collect();
    Tensor::from_vec(mask, (1, 1, frames, height, width), device)
}

/// Low frequencies of `z_t`, high frequencies of `z_rand`: both (B, C, F, H, W); the 3-D FFT
/// runs over (F, H, W) in f64 on the CPU (latents are small; candle has no FFT).
pub fn mix_frequencies(z_t: &Tensor, z_rand: &Tensor, cfg: &FreeInitConfig) -> Result<Tensor> {
    let (b, c, f, h, w) = z_t.dims5()?;
    if z_rand.dims() != z_t.dims() {
        candle_core::bail!(
            "FreeInit: noise shape {:?} differs from latent shape {:?}",
            z_rand.dims(),
            z_t.dims()
        );
    }
    let centred = low_pass_filter(cfg, f, h, w);
    // Multiplying fftshift(X) by the centred mask equals multiplying X by the mask rolled back.
    let shift = |i: usize, n: usize| (i + n / 2) % n;
    let mut mask = vec![0.0; f * h * w];
    for i in 0..f {
        for j in 0..h {
            for k in 0..w {
                mask[(i * h + j) * w + k] =
                    centred[(shift(i, f) * h + shift(j, h)) * w + shift(k, w)];
            }
        }
    }
    let to_vec = |t: &Tensor| -> Result<Vec<f64>> {
        t.to_dtype(DType::F64)?.flatten_all()?.to_vec1::<f64>()
    };
    let (x, noise) = (to_vec(z_t)?, to_vec(z_rand)?);
    let volume = f * h * w;
    let mut planner = FftPlanner::new();
    let mut out = Vec::with_capacity(x.len());
    for slab in 0..b * c {
        let range = slab * volume..(slab + 1) * volume;
        let mut xf: Vec<Complex64> = x[range.clone()]
            .iter()
            .map(|&v| Complex64::new(v, 0.0))
            .collect();
        let mut nf: Vec<Complex64> = noise[range]
            .iter()
            .map(|&v| Complex64::new(v, 0.0))
            .collect();
        fft3(&mut planner, &mut xf, (f, h, w), FftDirection::Forward);
        fft3(&mut planner, &mut nf, (f, h, w), FftDirection::Forward);
        for ((xv, nv), m) in xf.iter_mut().zip(&nf).zip(&mask) {
            *xv = *xv * *m + *nv * (1.0 - m);
        }
        fft3(&mut planner, &mut xf, (f, h, w), FftDirection::Inverse);
        let scale = 1.0 / volume as f64;
        out.extend(xf.iter().map(|v| v.re * scale));
    }
    Tensor::from_vec(out, (b, c, f, h, w), &Device::Cpu)?
        .to_dtype(z_t.dtype())?
        .to_device(z_t.device())
}

/// In-place unnormalised 3-D FFT of a row-major (d0, d1, d2) volume.
fn fft3(
    planner: &mut FftPlanner<f64>,
    data: &mut [Complex64],
    (d0, d1, d2): (usize, usize, usize),
    direction: FftDirection,
) {
    let mut line = Vec::new();
    let mut along = |len: usize, stride: usize, starts: &mut dyn Iterator<Item = usize>| {
        let fft = planner.plan_fft(len, direction);
        for start in starts {
            line.clear();
            line.extend((0..len).map(|i| data[start + i * stride]));
            fft.process(&mut line);
            for (i, v) in line.iter().enumerate() {
                data[start + i * stride] = *v;
            }
        }
    };
    along(d2, 1, &mut (0..d0 * d1).map(|r| r * d2));
    along(
        d1,
        d2,
        &mut (0..d0).flat_map(|a| (0..d2).map(move |c| a * d1 * d2 + c)),
    );
    along(d0, d1 * d2, &mut (0..d1 * d2));
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::test_util::max_abs_diff;

    fn cfg(filter: FilterKind) -> FreeInitConfig {
        FreeInitConfig {
            filter,
            ..FreeInitConfig::default()
        }
    }

    #[test]
    fn an_all_pass_mask_keeps_the_latents_and_an_all_stop_mask_takes_the_noise() -> Result<()> {
        let dev = Device::Cpu;
        let z = Tensor::randn(0f32, 1.0, (1, 2, 4, 6, 5), &dev)?;
        let n = Tensor::randn(0f32, 1.0, (1, 2, 4, 6, 5), &dev)?;
        // Zero stop frequency: the mask is empty, everything comes from the noise.
        let stop = FreeInitConfig {
            spatial_stop_frequency: 0.0,
            ..cfg(FilterKind::Gaussian)
        };
        let mixed = mix_frequencies(&z, &n, &stop)?;
        let err = max_abs_diff(&mixed, &n);
        assert!(err < 1e-5, "{err}");
        // A box covering every frequency keeps the latents.
        let pass = FreeInitConfig {
            spatial_stop_frequency: 2.0,
            temporal_stop_frequency: 2.0,
            ..cfg(FilterKind::Box)
        };
        let mixed = mix_frequencies(&z, &n, &pass)?;
        let err = max_abs_diff(&mixed, &z);
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn filters_are_one_at_the_centre_and_fall_off() {
        for kind in [
            FilterKind::Butterworth,
            FilterKind::Gaussian,
            FilterKind::Ideal,
            FilterKind::Box,
        ] {
            let mask = low_pass_filter(&cfg(kind), 8, 16, 12);
            let centre = mask[(4 * 16 + 8) * 12 + 6];
            let corner = mask[0];
            assert!((centre - 1.0).abs() < 1e-12, "{kind:?} centre {centre}");
            assert!(corner < 0.05, "{kind:?} corner {corner}");
        }
    }

    /// ε = 0: DDIM only rescales, so the passes' bookkeeping is visible.
    struct Zero;
    impl crate::sampling::NoisePredictor for Zero {
        fn predict(&self, request: &crate::sampling::PredictRequest) -> Result<Tensor> {
            request.latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn passes_count_their_steps_on_and_one_pass_is_the_plain_loop() -> Result<()> {
        use crate::sampling::{StepReport, TextConditioning};
        use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
        let dev = Device::Cpu;
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 4, 4, 4), &dev)?;
        let text = Tensor::zeros((1, 2, 3), DType::F32, &dev)?;
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let inputs = SampleInputs {
            noise: &noise,
            init_latents: None,
            text: TextConditioning {
                positive: &text,
                negative: &text,
            },
        };
        let settings = SampleSettings {
            steps: 6,
            guidance_scale: 7.5,
            strength: 1.0,
        };
        let config = FreeInitConfig {
            iterations: 3,
            fast_sampling: true,
            ..FreeInitConfig::default()
        };
        let mut seen = Vec::new();
        let mut on_step = |r: &StepReport<'_>| {
            seen.push((r.step.index, r.step.count));
            Ok(())
        };
        let mut fresh_calls = Vec::new();
        let mut fresh = |pass: usize| {
            fresh_calls.push(pass);
            Tensor::randn(0f32, 1.0, (1, 4, 4, 4, 4), &dev)
        };
        let mut sampler = Sampler::new(&Zero, &scheduler).on_step(&mut on_step);
        let output = sample_with_freeinit(&mut sampler, &config, &settings, &inputs, &mut fresh)?;
        drop(sampler);
        // Fast sampling: 2, 4 and 6 steps.
        assert_eq!(seen, (0..12).map(|s| (s, 12)).collect::<Vec<_>>());
        assert_eq!(fresh_calls, [1, 2]);
        assert_eq!(output.steps, 12);
        assert_eq!(output.frame_evaluations, 12 * 4 * 2);

        let single = FreeInitConfig {
            iterations: 1,
            ..config
        };
        let mut unused = |_: usize| -> Result<Tensor> { candle_core::bail!("one pass only") };
        let wrapped = sample_with_freeinit(
            &mut Sampler::new(&Zero, &scheduler),
            &single,
            &settings,
            &inputs,
            &mut unused,
        )?;
        let plain = Sampler::new(&Zero, &scheduler).sample(&settings, &inputs)?;
        assert_eq!(max_abs_diff(&wrapped.latents, &plain.latents), 0.0);
        Ok(())
    }

    #[test]
    fn parses_filter_names() {
        assert_eq!("gaussian".parse::<FilterKind>(), Ok(FilterKind::Gaussian));
        assert!("sharp".parse::<FilterKind>().is_err());
    }
}
