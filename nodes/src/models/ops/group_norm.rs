//! The fused group-norm kernels: statistics, affine map and optional SiLU in one pass per group,
//! and the variant that writes a transformer's channels-last token rows.

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous_f32;
use super::vector_math::silu_affine;

pub(crate) struct FusedGroupNorm {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) silu: bool,
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
pub(crate) struct GroupNormToRows {
    pub(crate) groups: usize,
    pub(crate) eps: f64,
    pub(crate) frames: usize,
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
