//! Initial noise for video latents.
//!
//! Every frame draws its standard normal values from its own deterministic stream (a ChaCha8
//! stream keyed by the seed, with the frame index as stream id), and the shared component of
//! the mixed mode from one more stream. The noise of frame `k` therefore depends only on the
//! seed, `k`, the mode, ρ and the shape of one frame: lengthening a clip keeps its first frames.
//!
//! - independent: `ε_f = ξ_f`.
//! - mixed: `ε_f = √ρ·ε_shared + √(1 − ρ)·ξ_f`, so `corr(ε_f, ε_g) = ρ` for f ≠ g.
//! - progressive (AR(1)): `ε_0 = ξ_0`, `ε_f = ρ·ε_{f−1} + √(1 − ρ²)·ξ_f`, so
//!   `corr(ε_f, ε_g) = ρ^|f−g|`.
//!
//! All three keep unit variance per element. FreeNoise ([`free_noise`]) draws the first
//! `context_length` frames this way and fills later frames with seeded shuffles of earlier
//! ones, as diffusers' `AnimateDiffFreeNoiseMixin` does with `noise_type="shuffle_context"`.

use std::fmt;
use std::str::FromStr;

use candle_core::{bail, Device, Result, Tensor};
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};

/// Stream id of the component all frames share in [`NoiseMode::Mixed`]; frame `f` uses `1 + f`.
const SHARED_STREAM: u64 = 0;
/// Stream ids of the FreeNoise window permutations (window `k` uses `SHUFFLE_STREAMS | k`), far
/// away from the frame streams so that no frame index ever collides with them.
const SHUFFLE_STREAMS: u64 = 1 << 63;

/// How the noise of different frames relates.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum NoiseMode {
    /// Every frame has its own independent noise (ρ is ignored).
    #[default]
    Independent,
    /// One shared component mixed into every frame: equal correlation ρ between any two frames.
    Mixed,
    /// AR(1) chain along the frames: correlation ρ^|f−g|, decaying with frame distance.
    Progressive,
}

impl NoiseMode {
    /// The names accepted by [`FromStr`], in the order a node's combo input lists them.
    pub const NAMES: [&'static str; 3] = ["independent", "mixed", "progressive"];

    pub fn as_str(self) -> &'static str {
        match self {
            NoiseMode::Independent => "independent",
            NoiseMode::Mixed => "mixed",
            NoiseMode::Progressive => "progressive",
        }
    }
}

impl fmt::Display for NoiseMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A noise mode name that is none of [`NoiseMode::NAMES`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown noise mode {0:?}: expected one of independent, mixed, progressive")]
pub struct UnknownNoiseMode(pub String);

impl FromStr for NoiseMode {
    type Err = UnknownNoiseMode;

    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        match name {
            "independent" => Ok(NoiseMode::Independent),
            "mixed" => Ok(NoiseMode::Mixed),
            "progressive" => Ok(NoiseMode::Progressive),
            other => Err(UnknownNoiseMode(other.to_string())),
        }
    }
}

/// Standard normal noise of shape (batch, channels, frames, height, width), f32, with the
/// frame-to-frame correlation of `mode` and `rho` (ρ ∈ [0, 1]).
#[allow(clippy::too_many_arguments)]
pub fn video_noise(
    seed: u64,
    batch: usize,
    channels: usize,
    frames: usize,
    height: usize,
    width: usize,
    mode: NoiseMode,
    rho: f64,
    device: &Device,
) -> Result<Tensor> {
    let shape = FrameShape::new(batch, channels, frames, height, width)?;
    check_rho(rho)?;
    let per_frame = correlated_frames(seed, shape.len(), frames, mode, rho);
    let order: Vec<usize> = (0..frames).collect();
    assemble(&per_frame, &order, shape, device)
}

/// FreeNoise initial noise for long clips: the first `context_length` frames are drawn as by
/// [`video_noise`] (with `mode` and `rho`); every later frame repeats an earlier one, following
/// [`free_noise_schedule`]. Shape (batch, channels, frames, height, width), f32.
#[allow(clippy::too_many_arguments)]
pub fn free_noise(
    seed: u64,
    batch: usize,
    channels: usize,
    frames: usize,
    height: usize,
    width: usize,
    context_length: usize,
    context_stride: usize,
    mode: NoiseMode,
    rho: f64,
    device: &Device,
) -> Result<Tensor> {
    let shape = FrameShape::new(batch, channels, frames, height, width)?;
    check_rho(rho)?;
    let sources = free_noise_schedule(seed, frames, context_length, context_stride)?;
    let drawn = frames.min(context_length);
    let per_frame = correlated_frames(seed, shape.len(), drawn, mode, rho);
    assemble(&per_frame, &sources, shape, device)
}

/// For each of `frames` frames, the index (< `context_length`) of the drawn frame whose noise
/// it carries under FreeNoise's context shuffling.
///
/// Frames `0..context_length` are themselves. Then for every `i` in
/// `context_length, context_length + stride, …`, the frames `i..i + stride` receive a seeded
/// permutation of the frames `i − context_length..i − context_length + stride` (the last window
/// takes the first entries of its permutation when it is cut short), which is the loop of
/// diffusers' `_prepare_latents_free_noise`. Window `k`'s permutation depends only on the seed
/// and `k`, so lengthening a clip keeps its first frames.
pub fn free_noise_schedule(
    seed: u64,
    frames: usize,
    context_length: usize,
    context_stride: usize,
) -> Result<Vec<usize>> {
    if context_length == 0 {
        bail!("FreeNoise context_length must be at least 1")
    }
    if context_stride == 0 || context_stride > context_length {
        bail!(
            "FreeNoise context_stride must be between 1 and context_length ({context_length}), got {context_stride}"
        )
    }
    let mut sources: Vec<usize> = (0..frames).collect();
    for (window, start) in (context_length..frames).step_by(context_stride).enumerate() {
        let previous = start - context_length;
        let mut permutation: Vec<usize> = (0..context_stride).collect();
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(SHUFFLE_STREAMS | window as u64);
        permutation.shuffle(&mut rng);
        let count = context_stride.min(frames - start);
        for (offset, &picked) in permutation.iter().take(count).enumerate() {
            sources[start + offset] = sources[previous + picked];
        }
    }
    Ok(sources)
}

/// The (batch, channels, height, width) block that one frame of noise fills.
#[derive(Debug, Clone, Copy)]
struct FrameShape {
    batch: usize,
    channels: usize,
    height: usize,
    width: usize,
}

impl FrameShape {
    fn new(
        batch: usize,
        channels: usize,
        frames: usize,
        height: usize,
        width: usize,
    ) -> Result<Self> {
        if frames == 0 {
            bail!("noise needs at least one frame")
        }
        if batch == 0 || channels == 0 || height == 0 || width == 0 {
            bail!(
                "noise shape must be non-empty, got batch {batch}, channels {channels}, height {height}, width {width}"
            )
        }
        Ok(Self {
            batch,
            channels,
            height,
            width,
        })
    }

    fn len(self) -> usize {
        self.batch * self.channels * self.height * self.width
    }
}

fn check_rho(rho: f64) -> Result<()> {
    if !(0.0..=1.0).contains(&rho) {
        bail!("noise correlation rho must be in [0, 1], got {rho}")
    }
    Ok(())
}

fn standard_normal(seed: u64, stream: u64, len: usize) -> Vec<f64> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(stream);
    (0..len).map(|_| StandardNormal.sample(&mut rng)).collect()
}

fn frame_stream(frame: usize) -> u64 {
    1 + frame as u64
}

/// `frames` noise frames of `len` values each, in (batch, channels, height, width) order.
fn correlated_frames(
    seed: u64,
    len: usize,
    frames: usize,
    mode: NoiseMode,
    rho: f64,
) -> Vec<Vec<f32>> {
    let to_f32 = |values: &[f64]| values.iter().map(|&v| v as f32).collect::<Vec<f32>>();
    match mode {
        NoiseMode::Independent => (0..frames)
            .map(|f| to_f32(&standard_normal(seed, frame_stream(f), len)))
            .collect(),
        NoiseMode::Mixed => {
            let shared = standard_normal(seed, SHARED_STREAM, len);
            let (shared_weight, own_weight) = (rho.sqrt(), (1.0 - rho).sqrt());
            (0..frames)
                .map(|f| {
                    let own = standard_normal(seed, frame_stream(f), len);
                    shared
                        .iter()
                        .zip(&own)
                        .map(|(&s, &o)| (shared_weight * s + own_weight * o) as f32)
                        .collect()
                })
                .collect()
        }
        NoiseMode::Progressive => {
            let innovation_weight = (1.0 - rho * rho).max(0.0).sqrt();
            let mut previous: Option<Vec<f64>> = None;
            (0..frames)
                .map(|f| {
                    let innovation = standard_normal(seed, frame_stream(f), len);
                    let current = match &previous {
                        None => innovation,
                        Some(prev) => prev
                            .iter()
                            .zip(&innovation)
                            .map(|(&p, &x)| rho * p + innovation_weight * x)
                            .collect(),
                    };
                    let frame = to_f32(&current);
                    previous = Some(current);
                    frame
                })
                .collect()
        }
    }
}

/// Lays out frame `sources[f]` of `per_frame` as frame `f` of a (B, C, F, H, W) tensor.
fn assemble(
    per_frame: &[Vec<f32>],
    sources: &[usize],
    shape: FrameShape,
    device: &Device,
) -> Result<Tensor> {
    let frames = sources.len();
    let FrameShape {
        batch,
        channels,
        height,
        width,
    } = shape;
    let (batch_channels, pixels) = (batch * channels, height * width);
    let mut data = vec![0f32; batch_channels * frames * pixels];
    for (f, &source) in sources.iter().enumerate() {
        let frame = &per_frame[source];
        for bc in 0..batch_channels {
            let out = (bc * frames + f) * pixels;
            data[out..out + pixels].copy_from_slice(&frame[bc * pixels..(bc + 1) * pixels]);
        }
    }
    Tensor::from_vec(data, (batch, channels, frames, height, width), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::test_util::max_abs_diff;

    const BATCH: usize = 1;
    const CHANNELS: usize = 4;
    const SIDE: usize = 64;
    /// Elements per frame; the standard error of a per-frame mean or correlation is about
    /// 1/√n ≈ 0.008, and the tolerances below are five of those.
    const N: usize = BATCH * CHANNELS * SIDE * SIDE;
    const TOLERANCE: f64 = 5.0 / 128.0;

    fn frames_of(noise: &Tensor) -> Vec<Vec<f64>> {
        let (b, c, f, h, w) = noise.dims5().unwrap();
        let values = noise
            .permute((2, 0, 1, 3, 4))
            .unwrap()
            .contiguous()
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        let len = b * c * h * w;
        (0..f)
            .map(|k| {
                values[k * len..(k + 1) * len]
                    .iter()
                    .map(|&v| v as f64)
                    .collect()
            })
            .collect()
    }

    fn mean(x: &[f64]) -> f64 {
        x.iter().sum::<f64>() / x.len() as f64
    }

    fn variance(x: &[f64]) -> f64 {
        let m = mean(x);
        x.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / x.len() as f64
    }

    fn correlation(x: &[f64], y: &[f64]) -> f64 {
        let (mx, my) = (mean(x), mean(y));
        let cov: f64 = x.iter().zip(y).map(|(a, b)| (a - mx) * (b - my)).sum();
        let vx: f64 = x.iter().map(|a| (a - mx) * (a - mx)).sum();
        let vy: f64 = y.iter().map(|b| (b - my) * (b - my)).sum();
        cov / (vx * vy).sqrt()
    }

    fn noise(seed: u64, frames: usize, mode: NoiseMode, rho: f64) -> Tensor {
        video_noise(
            seed,
            BATCH,
            CHANNELS,
            frames,
            SIDE,
            SIDE,
            mode,
            rho,
            &Device::Cpu,
        )
        .unwrap()
    }

    fn assert_unit_gaussian_frames(frames: &[Vec<f64>], what: &str) {
        for (k, frame) in frames.iter().enumerate() {
            assert_eq!(frame.len(), N);
            let (m, v) = (mean(frame), variance(frame));
            assert!(m.abs() < TOLERANCE, "{what}: frame {k} mean {m}");
            assert!(
                (v - 1.0).abs() < 2.0 * TOLERANCE,
                "{what}: frame {k} variance {v}"
            );
        }
    }

    #[test]
    fn parses_mode_names() {
        for name in NoiseMode::NAMES {
            assert_eq!(name.parse::<NoiseMode>().unwrap().as_str(), name);
        }
        let err = "uniform".parse::<NoiseMode>().unwrap_err();
        assert!(err.to_string().contains("uniform"), "{err}");
    }

    #[test]
    fn shape_and_dtype() {
        let t = video_noise(3, 2, 4, 5, 6, 7, NoiseMode::Mixed, 0.2, &Device::Cpu).unwrap();
        assert_eq!(t.dims(), &[2, 4, 5, 6, 7]);
        assert_eq!(t.dtype(), candle_core::DType::F32);
    }

    #[test]
    fn independent_frames_are_unit_gaussian_and_uncorrelated() {
        let frames = frames_of(&noise(11, 6, NoiseMode::Independent, 0.7));
        assert_unit_gaussian_frames(&frames, "independent");
        for f in 0..frames.len() {
            for g in f + 1..frames.len() {
                let r = correlation(&frames[f], &frames[g]);
                assert!(r.abs() < TOLERANCE, "independent: corr({f}, {g}) = {r}");
            }
        }
    }

    #[test]
    fn mixed_noise_has_equal_correlation_rho() {
        for rho in [0.0, 0.2, 0.5, 0.9, 1.0] {
            let frames = frames_of(&noise(21, 6, NoiseMode::Mixed, rho));
            assert_unit_gaussian_frames(&frames, &format!("mixed rho {rho}"));
            for f in 0..frames.len() {
                for g in f + 1..frames.len() {
                    let r = correlation(&frames[f], &frames[g]);
                    assert!(
                        (r - rho).abs() < TOLERANCE,
                        "mixed rho {rho}: corr({f}, {g}) = {r}"
                    );
                }
            }
        }
    }

    #[test]
    fn progressive_noise_correlation_decays_as_rho_to_the_distance() {
        for rho in [0.0, 0.3, 0.6, 0.9, 1.0] {
            let frames = frames_of(&noise(31, 8, NoiseMode::Progressive, rho));
            assert_unit_gaussian_frames(&frames, &format!("progressive rho {rho}"));
            for f in 0..frames.len() {
                for g in f + 1..frames.len() {
                    let expected = rho.powi((g - f) as i32);
                    let r = correlation(&frames[f], &frames[g]);
                    assert!(
                        (r - expected).abs() < TOLERANCE,
                        "progressive rho {rho}: corr({f}, {g}) = {r}, expected {expected}"
                    );
                }
            }
        }
    }

    #[test]
    fn longer_clips_keep_their_first_frames() {
        for mode in [
            NoiseMode::Independent,
            NoiseMode::Mixed,
            NoiseMode::Progressive,
        ] {
            let short = noise(5, 8, mode, 0.4);
            let long = noise(5, 12, mode, 0.4);
            let prefix = long.narrow(2, 0, 8).unwrap();
            let diff = max_abs_diff(&short, &prefix);
            assert_eq!(diff, 0.0, "{mode}: first 8 frames changed with clip length");
        }
    }

    #[test]
    fn seed_determines_the_noise() {
        let a = frames_of(&noise(7, 3, NoiseMode::Progressive, 0.5));
        let b = frames_of(&noise(7, 3, NoiseMode::Progressive, 0.5));
        let c = frames_of(&noise(8, 3, NoiseMode::Progressive, 0.5));
        assert_eq!(a, b);
        for (x, y) in a.iter().zip(&c) {
            assert!(correlation(x, y).abs() < TOLERANCE);
        }
    }

    #[test]
    fn rejects_rho_outside_unit_interval() {
        for rho in [-0.1, 1.5, f64::NAN] {
            let err = video_noise(0, 1, 4, 2, 4, 4, NoiseMode::Mixed, rho, &Device::Cpu)
                .unwrap_err()
                .to_string();
            assert!(err.contains("rho"), "{err}");
        }
    }

    #[test]
    fn free_noise_schedule_copies_shuffled_earlier_windows() {
        let (length, stride, frames) = (16, 4, 41);
        let sources = free_noise_schedule(9, frames, length, stride).unwrap();
        assert_eq!(sources.len(), frames);
        assert_eq!(&sources[..length], &(0..length).collect::<Vec<_>>()[..]);
        assert!(sources.iter().all(|&s| s < length));
        for start in (length..frames).step_by(stride) {
            let count = stride.min(frames - start);
            let mut window = sources[start..start + count].to_vec();
            let mut previous = sources[start - length..start - length + stride].to_vec();
            window.sort_unstable();
            previous.sort_unstable();
            if count == stride {
                assert_eq!(window, previous, "window at {start} is not a permutation");
            } else {
                assert!(window.windows(2).all(|p| p[0] != p[1]));
                assert!(window.iter().all(|s| previous.contains(s)));
            }
        }
        // Seeded: the same seed repeats the schedule, another seed shuffles differently.
        assert_eq!(
            sources,
            free_noise_schedule(9, frames, length, stride).unwrap()
        );
        assert_ne!(
            sources,
            free_noise_schedule(10, frames, length, stride).unwrap()
        );
        // Lengthening the clip keeps the schedule of its first frames.
        let shorter = free_noise_schedule(9, 30, length, stride).unwrap();
        assert_eq!(&sources[..30], &shorter[..]);
    }

    #[test]
    fn free_noise_repeats_the_drawn_frames() {
        let (length, stride, frames) = (6, 2, 11);
        let t = free_noise(
            4,
            1,
            2,
            frames,
            8,
            8,
            length,
            stride,
            NoiseMode::Mixed,
            0.3,
            &Device::Cpu,
        )
        .unwrap();
        assert_eq!(t.dims(), &[1, 2, frames, 8, 8]);
        let got = frames_of(&t);
        let drawn = frames_of(
            &video_noise(4, 1, 2, length, 8, 8, NoiseMode::Mixed, 0.3, &Device::Cpu).unwrap(),
        );
        assert_eq!(&got[..length], &drawn[..]);
        let sources = free_noise_schedule(4, frames, length, stride).unwrap();
        for (f, &s) in sources.iter().enumerate() {
            assert_eq!(got[f], drawn[s], "frame {f} should copy drawn frame {s}");
        }
    }

    #[test]
    fn rejects_empty_shapes() {
        assert!(video_noise(0, 1, 4, 0, 4, 4, NoiseMode::Mixed, 0.2, &Device::Cpu).is_err());
        assert!(video_noise(0, 1, 0, 2, 4, 4, NoiseMode::Mixed, 0.2, &Device::Cpu).is_err());
    }

    #[test]
    fn free_noise_rejects_bad_windows() {
        assert!(free_noise_schedule(0, 8, 0, 1).is_err());
        assert!(free_noise_schedule(0, 8, 4, 0).is_err());
        assert!(free_noise_schedule(0, 8, 4, 5).is_err());
    }
}
