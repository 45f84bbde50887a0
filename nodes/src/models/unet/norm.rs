//! Group normalisation as the UNet and the motion modules use it.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

/// `nn.GroupNorm(groups, channels, eps)` with affine weight and bias, over (N, C, ...) inputs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || channels % groups != 0 {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {groups} groups",
                vb.prefix()
            )
        }
        Ok(Self {
            inner: candle_nn::group_norm(groups, channels, eps, vb)?,
        })
    }

    /// x: (N, C, ...) → same shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)
    }

    /// SiLU(GroupNorm(x)), the pre-activation of every resnet convolution.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        self.inner.forward(xs)?.silu()
    }
}
