//! The fused linear kernels: rows times the transposed weight in one gemm, written on top of the
//! bias (and of a residual), or straight back into channels-first images.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::{contiguous_f32, matmul, Strided};

pub(crate) struct FusedLinear<'a> {
    pub(crate) bias: Option<&'a [f32]>,
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
pub(crate) struct ToImages<'a> {
    pub(crate) bias: Option<&'a [f32]>,
    pub(crate) scale: f32,
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
