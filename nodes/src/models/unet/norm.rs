//! Group normalisation as the UNet and the motion modules use it.
//!
//! On the CPU, for f32 inputs that no gradient flows through, normalisation, affine map and the
//! optional SiLU run as one pass per group; candle's composition of elementwise ops makes about
//! ten passes over the activations, each into a freshly allocated tensor. Elsewhere (CUDA, half
//! precision, training) the candle composition runs.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::{Module, VarBuilder};
use rayon::prelude::*;

use crate::models::fused::{self, contiguous_f32};
use crate::models::vector_math::silu_affine;

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
struct FusedGroupNorm {
    groups: usize,
    eps: f64,
    silu: bool,
}

/// Mean and variance of `values`, accumulated in f64 over eight independent lanes.
fn mean_and_variance(values: &[f32]) -> (f64, f64) {
    let count = values.len().max(1) as f64;
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks.remainder().iter().map(|&v| v as f64).sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v as f64;
        }
    }
    let mean = (lanes.iter().sum::<f64>() + rest) / count;
    let mut lanes = [0f64; 8];
    let chunks = values.chunks_exact(8);
    let rest: f64 = chunks
        .remainder()
        .iter()
        .map(|&v| (v as f64 - mean).powi(2))
        .sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            let centred = v as f64 - mean;
            *lane += centred * centred;
        }
    }
    (mean, (lanes.iter().sum::<f64>() + rest) / count)
}

impl CustomOp3 for FusedGroupNorm {
    fn name(&self) -> &'static str {
        "fused-group-norm"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let dims = xs_layout.dims();
        let (channels, spatial) = (dims[1], dims[2..].iter().product::<usize>());
        let (xs, weight, bias) = operands(
            (xs, xs_layout),
            (weight, weight_layout),
            (bias, bias_layout),
            channels,
        )?;
        let per_group = channels / self.groups;
        let group_len = per_group * spatial;
        let mut out = vec![0f32; xs.len()];
        if group_len > 0 {
            out.par_chunks_mut(group_len)
                .zip(xs.par_chunks(group_len))
                .enumerate()
                .for_each(|(index, (dst, src))| {
                    let first_channel = (index % self.groups) * per_group;
                    let statistics = mean_and_variance(src);
                    for (offset, (dst, src)) in dst
                        .chunks_exact_mut(spatial)
                        .zip(src.chunks_exact(spatial))
                        .enumerate()
                    {
                        let channel = first_channel + offset;
                        let (scale, shift) =
                            channel_affine(statistics, self.eps, weight[channel], bias[channel]);
                        if self.silu {
                            silu_affine(dst, src, scale, shift);
                        } else {
                            for (d, &s) in dst.iter_mut().zip(src) {
                                *d = s * scale + shift;
                            }
                        }
                    }
                });
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

/// GroupNorm of (B·F, C, H, W) per video of F frames, written as (B, H·W, F, C).
struct GroupNormToRows {
    groups: usize,
    eps: f64,
    frames: usize,
}

impl CustomOp3 for GroupNormToRows {
    fn name(&self) -> &'static str {
        "group-norm-to-rows"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch_frames, channels, height, width) = xs_layout.shape().dims4()?;
        let &Self {
            groups,
            eps,
            frames,
        } = self;
        let (videos, pixels, per_group) =
            (batch_frames / frames, height * width, channels / groups);
        let (xs, weight, bias) = operands(
            (xs, xs_layout),
            (weight, weight_layout),
            (bias, bias_layout),
            channels,
        )?;
        let out_shape = Shape::from((videos, pixels, frames, channels));
        let row_len = frames * channels;
        if pixels == 0 || row_len == 0 {
            return Ok((
                CpuStorage::F32(vec![0f32; out_shape.elem_count()]),
                out_shape,
            ));
        }
        // Per video and channel, y = x·scale + shift.
        let image_len = channels * pixels;
        let group_len = per_group * pixels;
        let affine: Vec<(f32, f32)> = (0..videos * groups)
            .into_par_iter()
            .flat_map_iter(|index| {
                let (video, group) = (index / groups, index % groups);
                let frame_slices = (0..frames).map(move |frame| {
                    let start = (video * frames + frame) * image_len + group * group_len;
                    &xs[start..start + group_len]
                });
                let statistics = mean_and_variance_of(frame_slices);
                (0..per_group).map(move |offset| {
                    let channel = group * per_group + offset;
                    channel_affine(statistics, eps, weight[channel], bias[channel])
                })
            })
            .collect();
        let mut out = vec![0f32; out_shape.elem_count()];
        // One row (all frames and channels of one pixel) per item; consecutive pixels of a
        // thread share the cache lines they read.
        out.par_chunks_mut(row_len)
            .enumerate()
            .for_each(|(index, row)| {
                let (video, pixel) = (index / pixels, index % pixels);
                let affine = &affine[video * channels..(video + 1) * channels];
                for (frame, dst) in row.chunks_exact_mut(channels).enumerate() {
                    let image = &xs[(video * frames + frame) * image_len..][..image_len];
                    for (channel, (d, &(scale, shift))) in dst.iter_mut().zip(affine).enumerate() {
                        *d = image[channel * pixels + pixel] * scale + shift;
                    }
                }
            });
        Ok((CpuStorage::F32(out), out_shape))
    }
}

/// Mean and variance over several slices taken as one sample, accumulated in f64: each slice's
/// own mean and variance, pooled.
fn mean_and_variance_of<'a>(slices: impl Iterator<Item = &'a [f32]>) -> (f64, f64) {
    let parts: Vec<(f64, f64, f64)> = slices
        .map(|slice| {
            let (mean, variance) = mean_and_variance(slice);
            (mean, variance, slice.len() as f64)
        })
        .collect();
    let count = parts.iter().map(|&(_, _, n)| n).sum::<f64>().max(1.0);
    let mean = parts.iter().map(|&(m, _, n)| m * n).sum::<f64>() / count;
    // Var = the weighted mean over slices of (within-slice variance + (slice mean − mean)²).
    let variance = parts
        .iter()
        .map(|&(m, v, n)| (v + (m - mean).powi(2)) * n)
        .sum::<f64>()
        / count;
    (mean, variance)
}

/// The per-channel map y = x·scale + shift of a group with these statistics.
fn channel_affine((mean, variance): (f64, f64), eps: f64, weight: f32, bias: f32) -> (f32, f32) {
    let scale = weight as f64 / (variance + eps).sqrt();
    (scale as f32, (bias as f64 - mean * scale) as f32)
}

/// The input, weight and bias of a group norm over `channels` channels, checked to fit.
fn operands<'a>(
    (xs, xs_layout): (&'a CpuStorage, &Layout),
    (weight, weight_layout): (&'a CpuStorage, &Layout),
    (bias, bias_layout): (&'a CpuStorage, &Layout),
    channels: usize,
) -> Result<(&'a [f32], &'a [f32], &'a [f32])> {
    let xs = contiguous_f32(xs, xs_layout, "group-norm input")?;
    let weight = contiguous_f32(weight, weight_layout, "group-norm weight")?;
    let bias = contiguous_f32(bias, bias_layout, "group-norm bias")?;
    if weight.len() != channels || bias.len() != channels {
        candle_core::bail!(
            "group-norm: {channels} input channels but weight {} and bias {}",
            weight.len(),
            bias.len()
        )
    }
    Ok((xs, weight, bias))
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
