//! Group normalisation as the UNet and the motion modules use it.
//!
//! On the CPU, for f32 inputs that no gradient flows through, normalisation, affine map and the
//! optional SiLU run as one pass per group; candle's composition of elementwise ops makes about
//! ten passes over the activations, each into a freshly allocated tensor. Elsewhere (CUDA, half
//! precision, training) the candle composition runs.

use candle_core::{Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::models::ops::{
    self as fused,
    group_norm::{FusedGroupNorm, GroupNormToRows},
};

/// `nn.GroupNorm(groups, channels, eps)` with affine weight and bias, over (N, C, ...) inputs.
#[derive(Debug, Clone)]
pub struct GroupNorm {
    inner: candle_nn::GroupNorm,
    weight: Tensor,
    bias: Tensor,
    groups: usize,
    eps: f64,
}

impl GroupNorm {
    pub fn new(vb: VarBuilder, groups: usize, channels: usize, eps: f64) -> Result<Self> {
        if groups == 0 || !channels.is_multiple_of(groups) {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {groups} groups",
                vb.prefix()
            )
        }
        let weight = vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(channels, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self {
            inner: candle_nn::GroupNorm::new(weight.clone(), bias.clone(), channels, groups, eps)?,
            weight,
            bias,
            groups,
            eps,
        })
    }

    /// x: (N, C, ...) → same shape.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused_applies(xs) {
            let xs = xs.contiguous()?;
            return xs.apply_op3_no_bwd(&self.weight, &self.bias, &self.fused(false));
        }
        self.inner.forward(xs)
    }

    /// SiLU(GroupNorm(x)), the pre-activation of every resnet convolution.
    pub fn forward_silu(&self, xs: &Tensor) -> Result<Tensor> {
        if self.fused_applies(xs) {
            let xs = xs.contiguous()?;
            return xs.apply_op3_no_bwd(&self.weight, &self.bias, &self.fused(true));
        }
        self.inner.forward(xs)?.silu()
    }

    /// GroupNorm of (B·F, C, H, W) activations taken as B videos of F frames, with statistics
    /// per video and group, written channels-last as (B, H·W, F, C): the rows of tokens a
    /// transformer reads (F = 1 for the spatial transformers, F frames for the motion modules).
    pub fn forward_to_rows(&self, xs: &Tensor, frames: usize) -> Result<Tensor> {
        let (batch_frames, channels, height, width) = xs.dims4()?;
        if frames == 0 || batch_frames % frames != 0 {
            candle_core::bail!(
                "group-norm: {batch_frames} images are not videos of {frames} frames"
            )
        }
        let videos = batch_frames / frames;
        if self.fused_applies(xs) {
            let op = GroupNormToRows {
                groups: self.groups,
                eps: self.eps,
                frames,
            };
            return xs
                .contiguous()?
                .apply_op3_no_bwd(&self.weight, &self.bias, &op);
        }
        let channels_first = xs
            .reshape((videos, frames, channels, height * width))?
            .permute((0, 2, 1, 3))?;
        self.inner
            .forward(&channels_first)?
            .permute((0, 3, 2, 1))?
            .contiguous()
    }

    fn fused(&self, silu: bool) -> FusedGroupNorm {
        FusedGroupNorm {
            groups: self.groups,
            eps: self.eps,
            silu,
        }
    }

    fn fused_applies(&self, xs: &Tensor) -> bool {
        fused::applies(&[xs, &self.weight, &self.bias]) && xs.rank() >= 3
    }
}

/// GroupNorm (and SiLU) of a contiguous f32 (N, C, ...) tensor with per-channel weight and bias.
/// `nn.LayerNorm(dim, eps)` with affine weight and bias, over the last dimension.
///
/// Runs candle's one-pass kernel when no gradient flows through it and the composition of ops
/// (which has a backward) otherwise: candle's `LayerNorm` takes its kernel for every contiguous
/// input, so a trainable parameter behind it would silently get no gradient.
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    pub fn new(vb: VarBuilder, dim: usize, eps: f64) -> Result<Self> {
        let weight = vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.))?;
        let bias = vb.get_with_hints(dim, "bias", candle_nn::Init::Const(0.))?;
        Ok(Self { weight, bias, eps })
    }

    /// (…, dim) → (…, dim).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        fused::layer_norm(xs, &self.weight, &self.bias, self.eps)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;
    use std::collections::HashMap;

    fn norm(channels: usize, groups: usize) -> Result<GroupNorm> {
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "weight".to_string(),
            Tensor::randn(1f32, 0.5, channels, &dev)?,
        );
        weights.insert(
            "bias".to_string(),
            Tensor::randn(0f32, 0.5, channels, &dev)?,
        );
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        GroupNorm::new(vb, groups, channels, 1e-5)
    }

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_group_norm_matches_candle() -> Result<()> {
        let gn = norm(12, 4)?;
        let xs = (Tensor::randn(0f32, 2.0, (3, 12, 5, 7), &Device::Cpu)? + 3.0)?;
        let reference = gn.inner.forward(&xs)?;
        assert!(max_abs_diff(&gn.forward(&xs)?, &reference)? < 1e-5);
        assert!(max_abs_diff(&gn.forward_silu(&xs)?, &reference.silu()?)? < 1e-5);
        // Non-contiguous input and a rank-5 (video) input.
        let strided = xs.transpose(2, 3)?;
        let reference = gn.inner.forward(&strided.contiguous()?)?;
        assert!(max_abs_diff(&gn.forward(&strided)?, &reference)? < 1e-5);
        let video = xs.reshape((3, 12, 5, 7, 1))?;
        let reference = gn.inner.forward(&video)?;
        assert!(max_abs_diff(&gn.forward(&video)?, &reference)? < 1e-5);
        Ok(())
    }

    /// Two videos of three frames: statistics over each whole video, rows (video, pixel, frame).
    #[test]
    fn group_norm_to_rows_matches_the_permuted_composition() -> Result<()> {
        let gn = norm(12, 4)?;
        let xs = (Tensor::randn(0f32, 2.0, (6, 12, 5, 7), &Device::Cpu)? + 1.0)?;
        for frames in [1, 3] {
            let videos = 6 / frames;
            let reference = gn
                .inner
                .forward(
                    &xs.reshape((videos, frames, 12, 35))?
                        .permute((0, 2, 1, 3))?,
                )?
                .permute((0, 3, 2, 1))?;
            let rows = gn.forward_to_rows(&xs, frames)?;
            assert_eq!(rows.dims(), &[videos, 35, frames, 12]);
            assert!(max_abs_diff(&rows, &reference)? < 1e-5);
        }
        Ok(())
    }
}
