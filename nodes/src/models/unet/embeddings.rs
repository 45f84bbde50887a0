//! Timestep embeddings: the sinusoidal projection and the MLP after it (diffusers `Timesteps`
//! and `TimestepEmbedding`).

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Linear, Module, VarBuilder};

/// Sinusoidal features of the timesteps, `[sin, cos]` (or `[cos, sin]` with `flip_sin_to_cos`).
///
/// Computed in f32 step by step as diffusers does (exponent, division, exp, product), so that
/// fractional timesteps near 1000 round the same way.
pub fn timestep_features(
    timesteps: &Tensor,
    dim: usize,
    flip_sin_to_cos: bool,
    freq_shift: f64,
) -> Result<Tensor> {
    let batch = timesteps.dims1()?;
    let half = dim / 2;
    let log_max_period = -(10000f64.ln()) as f32;
    let denominator = half as f32 - freq_shift as f32;
    let frequencies: Vec<f32> = (0..half)
        .map(|i| ((log_max_period * i as f32) / denominator).exp())
        .collect();
    let frequencies = Tensor::from_vec(frequencies, (1, half), timesteps.device())?;
    let angles = timesteps
        .to_dtype(DType::F32)?
        .reshape((batch, 1))?
        .broadcast_mul(&frequencies)?;
    let (sin, cos) = (angles.sin()?, angles.cos()?);
    let features = if flip_sin_to_cos {
        Tensor::cat(&[cos, sin], 1)?
    } else {
        Tensor::cat(&[sin, cos], 1)?
    };
    if dim % 2 == 1 {
        features.pad_with_zeros(1, 0, 1)
    } else {
        Ok(features)
    }
}

/// `linear_1 → SiLU → linear_2`, from the sinusoidal features to the embedding every resnet
/// receives.
#[derive(Debug, Clone)]
pub struct TimestepEmbedding {
    linear_1: Linear,
    linear_2: Linear,
}

impl TimestepEmbedding {
    pub fn new(vb: VarBuilder, in_channels: usize, embed_dim: usize) -> Result<Self> {
        let linear_1 = candle_nn::linear(in_channels, embed_dim, vb.pp("linear_1"))?;
        let linear_2 = candle_nn::linear(embed_dim, embed_dim, vb.pp("linear_2"))?;
        Ok(Self { linear_1, linear_2 })
    }

    /// `features`: (batch, in_channels) → (batch, embed_dim).
    pub fn forward(&self, features: &Tensor) -> Result<Tensor> {
        let hidden = self.linear_1.forward(features)?.silu()?;
        self.linear_2.forward(&hidden)
    }
}

/// The timestep of a forward pass: one value for the whole batch, or one per sample.
#[derive(Debug, Clone, Copy)]
pub enum Timestep<'a> {
    /// The same (possibly fractional) timestep for every sample.
    Scalar(f64),
    /// A tensor of shape `()`, `(1,)` (broadcast to the batch) or `(batch,)`, of any dtype.
    Tensor(&'a Tensor),
}

impl From<f64> for Timestep<'_> {
    fn from(t: f64) -> Self {
        Timestep::Scalar(t)
    }
}

impl<'a> From<&'a Tensor> for Timestep<'a> {
    fn from(t: &'a Tensor) -> Self {
        Timestep::Tensor(t)
    }
}

/// Timesteps laid out for a batch of videos.
#[derive(Debug, Clone)]
pub enum PerFrame {
    /// (batch,): one per video, shared by its frames.
    PerVideo(Tensor),
    /// (batch·frames,): one per frame, frame-major.
    PerFrame(Tensor),
}

impl Timestep<'_> {
    /// The timesteps of `batch` videos of `frames` frames: a scalar or a tensor of 1 or `batch`
    /// values gives one per video; `batch·frames` values one per frame (frame-major).
    pub fn per_frame(&self, batch: usize, frames: usize, device: &Device) -> Result<PerFrame> {
        if let Timestep::Tensor(t) = self {
            let count = t.elem_count();
            if count == batch * frames && count != batch {
                let t = t.to_device(device)?.to_dtype(DType::F32)?.flatten_all()?;
                return Ok(PerFrame::PerFrame(t));
            }
        }
        self.per_sample(batch, device).map(PerFrame::PerVideo)
    }

    /// The timesteps as an f32 tensor of shape (batch,).
    pub fn per_sample(&self, batch: usize, device: &Device) -> Result<Tensor> {
        match self {
            Timestep::Scalar(t) => Tensor::full(*t as f32, batch, device),
            Timestep::Tensor(t) => {
                let t = t.to_device(device)?.to_dtype(DType::F32)?.flatten_all()?;
                match t.dim(0)? {
                    1 => t.broadcast_as(batch)?.contiguous(),
                    n if n == batch => Ok(t),
                    n => candle_core::bail!(
                        "timestep tensor has {n} values; expected 1 or one per sample ({batch})"
                    ),
                }
            }
        }
    }
}
