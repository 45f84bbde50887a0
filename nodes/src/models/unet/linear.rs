//! `nn.Linear` as the transformers use it, over the last dimension of (…, in) activations.
//!
//! On the CPU, for f32 that no gradient flows through, the rows are one gemm that writes on top
//! of the bias, and of the residual when the layer ends a residual branch: candle's linear adds
//! the bias in a second pass and the residual add is a third. Elsewhere candle's linear runs.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, DType, Layout, Result, Shape, Tensor};
use candle_nn::{Module, VarBuilder};
use rayon::prelude::*;

use crate::models::fused::{self, contiguous_f32, matmul, Strided};

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The bias as f32 on the CPU, read by the fused kernel (absent without bias or elsewhere).
    cpu_bias: Option<Vec<f32>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let cpu_bias = match &bias {
            Some(b) if b.device().is_cpu() && b.dtype() == DType::F32 => {
                Some(b.flatten_all()?.to_vec1::<f32>()?)
            }
            _ => None,
        };
        Ok(Self {
            inner: candle_nn::Linear::new(weight, bias),
            cpu_bias,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// (…, in) → (…, out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self.fused(xs) {
            Some(op) => xs.contiguous()?.apply_op2_no_bwd(self.weight(), &op),
            None => self.inner.forward(xs),
        }
    }

    /// `self(xs) + residual`, the residual of the output's shape.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.fused(xs) {
            Some(op) if fused::applies(&[residual]) => {
                xs.contiguous()?
                    .apply_op3_no_bwd(self.weight(), &residual.contiguous()?, &op)
            }
            _ => self.inner.forward(xs)? + residual,
        }
    }

    /// `residual + scale · self(rows)` for rows (B, H·W, F, C_in) of tokens, written back as
    /// images: (B·F, C_out, H, W), the layout of `residual`. This is how a transformer's output
    /// projection rejoins the convolutional stream, without a transposing copy.
    pub fn forward_to_images_add(
        &self,
        rows: &Tensor,
        residual: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (videos, pixels, frames, _) = rows.dims4()?;
        let (images, out_dim, height, width) = residual.dims4()?;
        if images != videos * frames || pixels != height * width {
            candle_core::bail!(
                "linear: token rows {:?} do not fit images {:?}",
                rows.dims(),
                residual.dims()
            )
        }
        match self.fused(rows) {
            Some(op) if fused::applies(&[residual]) => {
                let op = ToImages {
                    bias: op.bias,
                    scale: scale as f32,
                };
                rows.contiguous()?
                    .apply_op3_no_bwd(self.weight(), &residual.contiguous()?, &op)
            }
            _ => {
                let images_out = self
                    .inner
                    .forward(rows)?
                    .permute((0, 2, 3, 1))?
                    .reshape((images, out_dim, height, width))?;
                images_out.affine(scale, 0.0)? + residual
            }
        }
    }

    /// The fused kernel, when it applies to `xs`.
    fn fused(&self, xs: &Tensor) -> Option<FusedLinear<'_>> {
        let applies = fused::applies(&[xs, self.weight()])
            && xs.rank() >= 1
            && self.inner.bias().is_none_or(|b| fused::applies(&[b]));
        applies.then_some(FusedLinear {
            bias: self.cpu_bias.as_deref(),
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// `nn.Linear(in, out)` with bias, weight `(out, in)` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// `nn.Linear(in, out, bias=False)`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((out_dim, in_dim), "weight")?, None)
}

struct FusedLinear<'a> {
    bias: Option<&'a [f32]>,
}

impl FusedLinear<'_> {
    /// (rows, in) · weightᵀ added to the residual (when given) and the bias.
    fn run(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        residual: Option<(&CpuStorage, &Layout)>,
    ) -> Result<(CpuStorage, Shape)> {
        let (out_dim, in_dim) = weight_layout.shape().dims2()?;
        let mut dims = xs_layout.dims().to_vec();
        if dims.last() != Some(&in_dim) {
            candle_core::bail!("linear: input {dims:?} for a ({out_dim}, {in_dim}) weight")
        }
        if let Some(last) = dims.last_mut() {
            *last = out_dim;
        }
        let xs = contiguous_f32(xs, xs_layout, "linear input")?;
        let rows: usize = dims[..dims.len() - 1].iter().product();
        if let Some(bias) = self.bias.filter(|b| b.len() != out_dim) {
            candle_core::bail!("linear: {out_dim} outputs but {} biases", bias.len())
        }
        let residual = match residual {
            Some((_, layout)) if layout.dims() != dims.as_slice() => candle_core::bail!(
                "linear: residual {:?} for an output {dims:?}",
                layout.dims()
            ),
            Some((storage, layout)) => Some(contiguous_f32(storage, layout, "linear residual")?),
            None => None,
        };
        // The gemm adds its product to what `out` starts with: residual plus bias, in one pass.
        let mut out = vec![0f32; rows * out_dim];
        if out_dim > 0 {
            let rows = out.par_chunks_mut(out_dim).enumerate();
            match (residual, self.bias) {
                (Some(residual), Some(bias)) => rows.for_each(|(i, row)| {
                    let residual = &residual[i * out_dim..(i + 1) * out_dim];
                    for ((o, r), b) in row.iter_mut().zip(residual).zip(bias) {
                        *o = r + b;
                    }
                }),
                (Some(residual), None) => rows.for_each(|(i, row)| {
                    row.copy_from_slice(&residual[i * out_dim..(i + 1) * out_dim])
                }),
                (None, Some(bias)) => rows.for_each(|(_, row)| row.copy_from_slice(bias)),
                (None, None) => {}
            }
        }
        if rows == 0 || out_dim == 0 || in_dim == 0 {
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        // The weight is read through its strides: (in, out) with rows 1 and columns in_dim apart
        // when stored (out, in) row-major.
        let weight_slice = weight.as_slice::<f32>()?;
        let [w_row, w_col]: [usize; 2] = weight_layout
            .stride()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("linear: weight of rank ≠ 2".into()))?;
        let threads = rayon::current_num_threads();
        // SAFETY: dst is (rows, out_dim) row-major, lhs (rows, in_dim) row-major, and the weight's
        // layout addresses (out_dim, in_dim) elements inside its storage.
        unsafe {
            matmul(
                (rows, out_dim, in_dim),
                Strided::rows(out.as_mut_ptr(), out_dim),
                Strided::rows(xs.as_ptr(), in_dim),
                // weightᵀ: element (input, output) of the (out_dim, in_dim) weight.
                Strided {
                    ptr: weight_slice.as_ptr().add(weight_layout.start_offset()),
                    row_stride: w_col,
                    column_stride: w_row,
                },
                true,
                1.0,
                gemm::Parallelism::Rayon(threads),
            );
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

impl CustomOp2 for FusedLinear<'_> {
    fn name(&self) -> &'static str {
        "fused-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(xs, xs_layout, weight, weight_layout, None)
    }
}

impl CustomOp3 for FusedLinear<'_> {
    fn name(&self) -> &'static str {
        "fused-linear-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.run(
            xs,
            xs_layout,
            weight,
            weight_layout,
            Some((residual, residual_layout)),
        )
    }
}

/// `residual + scale · (rows · weightᵀ + bias)`, rows (B, P, F, C_in) → images (B·F, C_out, P).
struct ToImages<'a> {
    bias: Option<&'a [f32]>,
    scale: f32,
}

impl CustomOp3 for ToImages<'_> {
    fn name(&self) -> &'static str {
        "linear-to-images"
    }

    fn cpu_fwd(
        &self,
        rows: &CpuStorage,
        rows_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (_, pixels, frames, in_dim) = rows_layout.shape().dims4()?;
        let (out_dim, weight_in) = weight_layout.shape().dims2()?;
        let dims = residual_layout.dims();
        if weight_in != in_dim || dims.get(1) != Some(&out_dim) {
            candle_core::bail!(
                "linear: rows {:?}, weight ({out_dim}, {weight_in}), images {dims:?}",
                rows_layout.dims()
            )
        }
        if let Some(bias) = self.bias.filter(|b| b.len() != out_dim) {
            candle_core::bail!("linear: {out_dim} outputs but {} biases", bias.len())
        }
        let rows = contiguous_f32(rows, rows_layout, "linear rows")?;
        let residual = contiguous_f32(residual, residual_layout, "linear residual")?;
        let weight_slice = &weight.as_slice::<f32>()?[weight_layout.start_offset()..];
        let [w_row, w_col]: [usize; 2] = weight_layout
            .stride()
            .try_into()
            .map_err(|_| candle_core::Error::Msg("linear: weight of rank ≠ 2".into()))?;
        let image_len = out_dim * pixels;
        let mut out = vec![0f32; residual.len()];
        if image_len == 0 || in_dim == 0 {
            out.copy_from_slice(residual);
            return Ok((CpuStorage::F32(out), Shape::from(dims)));
        }
        let scale = self.scale;
        out.par_chunks_mut(image_len)
            .zip(residual.par_chunks(image_len))
            .enumerate()
            .for_each(|(image, (dst, residual))| {
                let (video, frame) = (image / frames, image % frames);
                for (channel, (dst, residual)) in dst
                    .chunks_exact_mut(pixels)
                    .zip(residual.chunks_exact(pixels))
                    .enumerate()
                {
                    let bias = self.bias.map_or(0.0, |b| b[channel]) * scale;
                    for (d, r) in dst.iter_mut().zip(residual) {
                        *d = r + bias;
                    }
                }
                // Column p of this image's token matrix is row (video, p, frame) of `rows`.
                let first = (video * pixels * frames + frame) * in_dim;
                // SAFETY: dst is (out_dim, pixels) row-major; the weight's layout addresses
                // (out_dim, in_dim) elements; rows[first + p·frames·in_dim + c] for p < pixels,
                // c < in_dim stays inside the contiguous (B, P, F, C_in) rows.
                unsafe {
                    matmul(
                        (out_dim, pixels, in_dim),
                        Strided::rows(dst.as_mut_ptr(), pixels),
                        Strided {
                            ptr: weight_slice.as_ptr(),
                            row_stride: w_row,
                            column_stride: w_col,
                        },
                        Strided {
                            ptr: rows.as_ptr().add(first),
                            row_stride: 1,
                            column_stride: frames * in_dim,
                        },
                        true,
                        scale,
                        gemm::Parallelism::None,
                    );
                }
            });
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_linear_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 7, &dev)?;
        let xs = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?;
        let residual = Tensor::randn(0f32, 1.0, (3, 4, 7), &dev)?;
        for bias in [Some(bias.clone()), None] {
            let ours = Linear::new(weight.clone(), bias.clone())?;
            let reference = candle_nn::Linear::new(weight.clone(), bias);
            let expected = reference.forward(&xs)?;
            assert!(max_abs_diff(&ours.forward(&xs)?, &expected)? < 1e-5);
            let with_residual = ours.forward_add(&xs, &residual)?;
            assert!(max_abs_diff(&with_residual, &(&expected + &residual)?)? < 1e-5);
            // Strided input and a transposed (column-major) weight.
            let strided = xs.transpose(0, 1)?;
            let expected = reference.forward(&strided.contiguous()?)?;
            assert!(max_abs_diff(&ours.forward(&strided)?, &expected)? < 1e-5);
        }
        // Token rows of two videos of three 2×2 frames back to images, scaled, on a residual.
        let ours = Linear::new(weight.clone(), Some(bias.clone()))?;
        let rows = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev)?;
        let images = Tensor::randn(0f32, 1.0, (6, 7, 2, 2), &dev)?;
        let expected = (candle_nn::Linear::new(weight.clone(), Some(bias))
            .forward(&rows)?
            .permute((0, 2, 3, 1))?
            .reshape((6, 7, 2, 2))?
            * 0.5)?
            .add(&images)?;
        let got = ours.forward_to_images_add(&rows, &images, 0.5)?;
        assert!(max_abs_diff(&got, &expected)? < 1e-5);
        let transposed = Linear::new(weight.t()?.contiguous()?.t()?, None)?;
        let expected = candle_nn::Linear::new(weight, None).forward(&xs)?;
        assert!(max_abs_diff(&transposed.forward(&xs)?, &expected)? < 1e-5);
        Ok(())
    }
}
