//! Brownian-motion noise for the SDE samplers, the role of torchsde's `BrownianTree` behind
//! ComfyUI's `BrownianTreeNoiseSampler`.
//!
//! The noise for the stretch from σ to σ_next is the increment of one Brownian motion W over
//! the matching stretch of time, normalised to unit variance:
//! (W(t(σ_next)) − W(t(σ))) / √|t(σ_next) − t(σ)|. Because every stretch is an increment of the
//! same path, a sampler that asks for (σ, σ_mid) and (σ_mid, σ_next) gets noise that adds up
//! to the noise of (σ, σ_next), whatever the step sizes; this is what makes the SDE samplers
//! converge as the steps shrink, and lets a run with a different σ table see the same path.
//!
//! W is sampled lazily: the first time asked for anchors W = 0, a time beyond every sampled
//! one extends the path by an independent Gaussian increment, and a time between two sampled
//! ones is drawn from the Brownian bridge between them. The Gaussian draws come from a
//! caller-supplied source, so that a seeded generator makes the path reproducible.

use candle_core::{DType, Result, Tensor};

use super::NoiseSampler;

/// Unit Gaussian noise of the shape, dtype and device of the given tensor.
pub type GaussianSource = Box<dyn FnMut(&Tensor) -> Result<Tensor>>;

/// The time the Brownian motion runs in, as a function of σ.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum BrownianTime {
    /// t = σ: ComfyUI's `BrownianTreeNoiseSampler` as its SDE samplers build it (the identity
    /// transform).
    #[default]
    Sigma,
    /// t = −ln σ, the half log-SNR of an ε model: the transform k-diffusion offers as an option.
    NegLogSigma,
}

impl BrownianTime {
    fn of(self, sigma: f64) -> f64 {
        match self {
            Self::Sigma => sigma,
            Self::NegLogSigma => -sigma.ln(),
        }
    }
}

/// A Brownian motion sampled where it is asked for; see the module documentation.
pub struct BrownianNoise {
    source: GaussianSource,
    time: BrownianTime,
    /// Sampled values W(t), sorted by t, kept in f32.
    points: Vec<(f64, Tensor)>,
}

impl BrownianNoise {
    /// A path in t = σ (ComfyUI's default) driven by `source`.
    pub fn new(source: GaussianSource) -> Self {
        Self {
            source,
            time: BrownianTime::Sigma,
            points: Vec::new(),
        }
    }

    /// The same path in another time variable.
    pub fn with_time(mut self, time: BrownianTime) -> Self {
        self.time = time;
        self
    }

    /// A unit Gaussian draw like `like`, in f32.
    fn gaussian(&mut self, like: &Tensor) -> Result<Tensor> {
        let draw = (self.source)(like)?;
        if draw.dims() != like.dims() {
            candle_core::bail!(
                "the Gaussian source returned shape {:?} for a tensor of shape {:?}",
                draw.dims(),
                like.dims()
            );
        }
        draw.to_dtype(DType::F32)
    }

    /// W(t), sampling it (and remembering it) if it has not been.
    fn value_at(&mut self, t: f64, like: &Tensor) -> Result<Tensor> {
        if let Some((_, first)) = self.points.first() {
            if first.dims() != like.dims() {
                candle_core::bail!(
                    "Brownian noise of shape {:?} was asked for shape {:?}; one path serves one \
                     shape",
                    first.dims(),
                    like.dims()
                );
            }
        }
        let position = self.points.partition_point(|(time, _)| *time < t);
        if let Some((time, value)) = self.points.get(position) {
            if *time == t {
                return Ok(value.clone());
            }
        }
        let value = match (
            position.checked_sub(1).map(|i| &self.points[i]),
            self.points.get(position),
        ) {
            (None, None) => Tensor::zeros(like.dims(), DType::F32, like.device())?,
            (Some((before, w_before)), None) => {
                let (before, w_before) = (*before, w_before.clone());
                (w_before + (self.gaussian(like)? * (t - before).sqrt())?)?
            }
            (None, Some((after, w_after))) => {
                let (after, w_after) = (*after, w_after.clone());
                (w_after - (self.gaussian(like)? * (after - t).sqrt())?)?
            }
            (Some((before, w_before)), Some((after, w_after))) => {
                // Brownian bridge: W(t) given W(before) and W(after) is Gaussian with the
                // linear interpolation as mean and variance (t − before)(after − t)/(after − before).
                let (before, after) = (*before, *after);
                let (w_before, w_after) = (w_before.clone(), w_after.clone());
                let fraction = (t - before) / (after - before);
                let std = ((t - before) * (after - t) / (after - before)).sqrt();
                let mean = (&w_before + ((w_after - &w_before)? * fraction)?)?;
                (mean + (self.gaussian(like)? * std)?)?
            }
        };
        self.points.insert(position, (t, value.clone()));
        Ok(value)
    }
}

impl NoiseSampler for BrownianNoise {
    fn sample(&mut self, sigma: f64, sigma_next: f64, like: &Tensor) -> Result<Tensor> {
        let (t0, t1) = (self.time.of(sigma), self.time.of(sigma_next));
        if !(t0.is_finite() && t1.is_finite()) || t0 == t1 {
            candle_core::bail!(
                "Brownian noise needs two distinct finite times, got σ = {sigma} and σ_next = \
                 {sigma_next}"
            );
        }
        let w0 = self.value_at(t0, like)?;
        let w1 = self.value_at(t1, like)?;
        ((w1 - w0)? / (t1 - t0).abs().sqrt())?.to_dtype(like.dtype())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use candle_core::Device;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use rand_distr::{Distribution, StandardNormal};

    /// A seeded unit Gaussian source.
    pub(crate) fn seeded(seed: u64) -> GaussianSource {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        Box::new(move |like: &Tensor| {
            let values: Vec<f32> = (0..like.elem_count())
                .map(|_| StandardNormal.sample(&mut rng))
                .collect();
            Tensor::from_vec(values, like.dims(), like.device())?.to_dtype(like.dtype())
        })
    }

    fn stats(t: &Tensor) -> (f64, f64) {
        let values = t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        let n = values.len() as f64;
        let mean = values.iter().map(|v| f64::from(*v)).sum::<f64>() / n;
        let var = values
            .iter()
            .map(|v| (f64::from(*v) - mean).powi(2))
            .sum::<f64>()
            / n;
        (mean, var)
    }

    #[test]
    fn overlapping_queries_add_up() -> Result<()> {
        let like = Tensor::zeros((2, 3, 4), DType::F32, &Device::Cpu)?;
        for time in [BrownianTime::Sigma, BrownianTime::NegLogSigma] {
            let mut noise = BrownianNoise::new(seeded(7)).with_time(time);
            let (a, b, c) = (14.6, 3.2, 0.03);
            let scale = |s0: f64, s1: f64| (time.of(s1) - time.of(s0)).abs().sqrt();
            // The whole stretch first, then its parts (bridge draws), then a stretch beyond.
            let whole = noise.sample(a, c, &like)?;
            let first = noise.sample(a, b, &like)?;
            let second = noise.sample(b, c, &like)?;
            let sum = ((first * scale(a, b))? + (second * scale(b, c))?)?;
            let diff = (sum - (whole * scale(a, c))?)?.abs()?.max_all()?;
            assert!(diff.to_scalar::<f32>()? < 1e-5);
            // Reversing the stretch flips the sign.
            let forward = noise.sample(a, b, &like)?;
            let backward = noise.sample(b, a, &like)?;
            let diff = (forward + backward)?.abs()?.max_all()?;
            assert_eq!(diff.to_scalar::<f32>()?, 0.0);
        }
        Ok(())
    }

    #[test]
    fn disjoint_increments_are_independent_unit_gaussians() -> Result<()> {
        let like = Tensor::zeros((4, 64, 64), DType::F32, &Device::Cpu)?;
        let mut noise = BrownianNoise::new(seeded(11));
        // Out of order, so that values come from extension and from bridges alike.
        let sigmas: [f64; 7] = [14.6, 0.03, 6.0, 1.0, 9.5, 0.4, 2.5];
        let mut increments = Vec::new();
        let mut sorted = sigmas;
        sorted.sort_by(|a, b| b.total_cmp(a));
        for &s in &sigmas {
            noise.sample(s, s * 0.5 + 0.01, &like)?;
        }
        for pair in sorted.windows(2) {
            increments.push(noise.sample(pair[0], pair[1], &like)?);
        }
        for increment in &increments {
            let (mean, var) = stats(increment);
            assert!(mean.abs() < 0.04, "mean {mean}");
            assert!((var - 1.0).abs() < 0.05, "variance {var}");
        }
        for pair in increments.windows(2) {
            let (correlation, _) = stats(&(&pair[0] * &pair[1])?);
            assert!(correlation.abs() < 0.04, "correlation {correlation}");
        }
        Ok(())
    }

    #[test]
    fn a_seeded_source_gives_the_same_path_and_bad_queries_are_errors() -> Result<()> {
        let like = Tensor::zeros((3, 5), DType::F32, &Device::Cpu)?;
        let mut first = BrownianNoise::new(seeded(3));
        let mut second = BrownianNoise::new(seeded(3));
        let a = first.sample(5.0, 1.0, &like)?;
        let b = second.sample(5.0, 1.0, &like)?;
        assert_eq!(a.to_vec2::<f32>()?, b.to_vec2::<f32>()?);
        assert!(first.sample(1.0, 1.0, &like).is_err());
        let other = Tensor::zeros((2, 5), DType::F32, &Device::Cpu)?;
        assert!(first.sample(1.0, 0.5, &other).is_err());
        let half = like.to_dtype(DType::F16)?;
        assert_eq!(first.sample(1.0, 0.5, &half)?.dtype(), DType::F16);
        Ok(())
    }
}
