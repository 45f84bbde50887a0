//! 2-D convolution as the UNet uses it.
//!
//! On the CPU, for f32 inputs that no gradient flows through, each image is unfolded (im2col)
//! into a per-thread buffer in the kernel's own (C_in, k_h, k_w) order, and one gemm writes the
//! (C_out, H·W) result straight into the NCHW output on top of the bias. candle's CPU conv2d
//! re-lays out the whole kernel on every call, gathers its tiles element by element and adds the
//! bias in a separate pass. Elsewhere (CUDA, half precision, training) candle's conv2d runs.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape, Tensor};
use candle_nn::{Conv2dConfig, Module, VarBuilder};
use rayon::prelude::*;

use super::winograd;
use crate::models::fused::{self, contiguous_f32, matmul, Strided};

/// `nn.Conv2d(in, out, kernel, stride, padding)` with bias (dilation 1, one group).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let inner = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb.clone())?;
        let weight = inner.weight().clone();
        let bias = match inner.bias() {
            Some(bias) => bias.clone(),
            None => candle_core::bail!("{}: convolution without bias", vb.prefix()),
        };
        Ok(Self {
            inner,
            weight,
            bias,
            kernel,
            stride,
            padding,
        })
    }

    /// (C_out, C_in, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (N, C_in, H, W) → (N, C_out, H_out, W_out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if !(fused::applies(&[xs, &self.weight, &self.bias]) && xs.rank() == 4) {
            return self.inner.forward(xs);
        }
        let op = Im2ColConv {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        xs.contiguous()?
            .apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias, &op)
    }
}

struct Im2ColConv {
    kernel: usize,
    stride: usize,
    padding: usize,
}

thread_local! {
    /// The unfolded image of the convolution running on this thread, kept between calls.
    static COLUMNS: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// Geometry of one convolution call.
#[derive(Clone, Copy)]
struct Geometry {
    height: usize,
    width: usize,
    out_height: usize,
    out_width: usize,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Geometry {
    /// Fills `columns` ((C_in·k·k) rows of H_out·W_out values, `row_stride` apart) with the
    /// patches of `image` (C_in, H, W).
    fn unfold(&self, image: &[f32], columns: &mut [f32], row_stride: usize) {
        let &Geometry {
            height,
            width,
            out_height,
            out_width,
            kernel,
            stride,
            padding,
            ..
        } = self;
        let row_len = out_height * out_width;
        let rows = image.len() / (height * width) * kernel * kernel;
        for row in 0..rows {
            let dst = &mut columns[row * row_stride..][..row_len];
            let channel = row / (kernel * kernel);
            let (ky, kx) = ((row / kernel) % kernel, row % kernel);
            let plane = &image[channel * height * width..(channel + 1) * height * width];
            // Output columns whose input column lies inside the image: x = ox·stride + kx − padding.
            let first_x = padding.saturating_sub(kx).div_ceil(stride).min(out_width);
            let end_x = if width + padding > kx {
                ((width + padding - kx).div_ceil(stride)).min(out_width)
            } else {
                0
            }
            .max(first_x);
            for (oy, dst) in dst.chunks_exact_mut(out_width).enumerate() {
                let y = oy * stride + ky;
                if y < padding || y - padding >= height {
                    dst.fill(0.0);
                    continue;
                }
                let src = &plane[(y - padding) * width..(y - padding + 1) * width];
                dst[..first_x].fill(0.0);
                dst[end_x..].fill(0.0);
                if stride == 1 {
                    let start = first_x + kx - padding;
                    dst[first_x..end_x].copy_from_slice(&src[start..start + end_x - first_x]);
                } else {
                    for (ox, d) in dst[first_x..end_x].iter_mut().enumerate() {
                        *d = src[(first_x + ox) * stride + kx - padding];
                    }
                }
            }
        }
    }
}

/// `dst` (C_out, n) = bias + weight (C_out, k) · columns (k, n), all row-major.
fn gemm_with_bias(
    dst: &mut [f32],
    weight: &[f32],
    bias: &[f32],
    columns: &[f32],
    inner: usize,
    parallelism: gemm::Parallelism,
) {
    let out_channels = bias.len();
    let n = dst.len() / out_channels.max(1);
    for (row, &b) in dst.chunks_exact_mut(n.max(1)).zip(bias) {
        row.fill(b);
    }
    // SAFETY: dst is (out_channels, n), weight (out_channels, inner) and columns (inner, n), all
    // row-major and of exactly these lengths (checked by the caller).
    unsafe {
        matmul(
            (out_channels, n, inner),
            Strided::rows(dst.as_mut_ptr(), n),
            Strided::rows(weight.as_ptr(), inner),
            Strided::rows(columns.as_ptr(), n),
            true,
            1.0,
            parallelism,
        )
    }
}

impl CustomOp3 for Im2ColConv {
    fn name(&self) -> &'static str {
        "im2col-conv2d"
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
        let (batch, in_channels, height, width) = xs_layout.shape().dims4()?;
        let (out_channels, weight_in, kernel_h, kernel_w) = weight_layout.shape().dims4()?;
        let &Self {
            kernel,
            stride,
            padding,
        } = self;
        if weight_in != in_channels || kernel_h != kernel || kernel_w != kernel {
            candle_core::bail!(
                "conv2d: input of {in_channels} channels for a ({out_channels}, {weight_in}, \
                 {kernel_h}, {kernel_w}) kernel"
            )
        }
        if height + 2 * padding < kernel || width + 2 * padding < kernel || stride == 0 {
            candle_core::bail!(
                "conv2d: {height}×{width} input too small for a {kernel}×{kernel} kernel"
            )
        }
        let xs = contiguous_f32(xs, xs_layout, "conv2d input")?;
        let weight = contiguous_f32(weight, weight_layout, "conv2d weight")?;
        let bias = contiguous_f32(bias, bias_layout, "conv2d bias")?;
        if bias.len() != out_channels {
            candle_core::bail!("conv2d: {out_channels} kernels but {} biases", bias.len())
        }
        let geometry = Geometry {
            height,
            width,
            out_height: (height + 2 * padding - kernel) / stride + 1,
            out_width: (width + 2 * padding - kernel) / stride + 1,
            kernel,
            stride,
            padding,
        };
        let out_len = out_channels * geometry.out_height * geometry.out_width;
        let in_len = in_channels * height * width;
        let out_pixels = geometry.out_height * geometry.out_width;
        let mut out = vec![0f32; batch * out_len];
        let winograd = kernel == 3 && stride == 1 && padding == 1;
        let group = GEMM_COLUMNS.div_ceil(out_pixels.max(1)).min(batch);
        if out_len == 0 || in_len == 0 {
            // Nothing to compute: an empty output, or zeros.
        } else if winograd && in_channels >= WINOGRAD_MIN_CHANNELS {
            let shape = winograd::Shape {
                images: batch,
                in_channels,
                out_channels,
                height,
                width,
            };
            winograd::convolve(&mut out, xs, weight, bias, shape);
        } else if group > 1 {
            let images = out
                .chunks_mut(group * out_len)
                .zip(xs.chunks(group * in_len));
            for (out, xs) in images {
                convolve_group(out, xs, weight, bias, &geometry, in_len);
            }
        } else {
            convolve_each(&mut out, xs, weight, bias, &geometry, in_len);
        }
        let shape = (batch, out_channels, geometry.out_height, geometry.out_width);
        Ok((CpuStorage::F32(out), Shape::from(shape)))
    }
}

/// Convolves the images of `xs` (each `in_len` long) into `out` one gemm each: whole images per
/// thread when there are enough of them, otherwise on gemm's own threads.
fn convolve_each(
    out: &mut [f32],
    xs: &[f32],
    weight: &[f32],
    bias: &[f32],
    geometry: &Geometry,
    in_len: usize,
) {
    let out_pixels = geometry.out_height * geometry.out_width;
    let out_len = bias.len() * out_pixels;
    let inner = weight.len() / bias.len().max(1);
    let pointwise = geometry.kernel == 1 && geometry.stride == 1 && geometry.padding == 0;
    let threads = rayon::current_num_threads();
    let per_thread = xs.len() / in_len >= threads;
    let parallelism = if per_thread {
        gemm::Parallelism::None
    } else {
        gemm::Parallelism::Rayon(threads)
    };
    let convolve = |(dst, image): (&mut [f32], &[f32])| {
        if pointwise {
            gemm_with_bias(dst, weight, bias, image, inner, parallelism);
            return;
        }
        COLUMNS.with(|columns| {
            let mut columns = columns.borrow_mut();
            columns.resize(inner * out_pixels, 0.0);
            geometry.unfold(image, &mut columns, out_pixels);
            gemm_with_bias(dst, weight, bias, &columns, inner, parallelism);
        })
    };
    if per_thread {
        out.par_chunks_mut(out_len)
            .zip(xs.par_chunks(in_len))
            .for_each(convolve);
    } else {
        out.chunks_mut(out_len)
            .zip(xs.chunks(in_len))
            .for_each(convolve);
    }
}

/// Below this many input channels a 3×3 convolution is an im2col gemm: the transforms of the
/// Winograd path would cost more than the products they save (SD's `conv_in` has 4).
const WINOGRAD_MIN_CHANNELS: usize = 16;

/// Images of few output pixels are convolved together, side by side in one gemm of at least this
/// many columns: a gemm packs the whole kernel (1280·1280·9 floats in SD's lowest blocks) before
/// it multiplies, and at 4×4 pixels that packing costs as much as the product of one image.
const GEMM_COLUMNS: usize = 512;

/// Convolves the images of `xs` (each `in_len` long) into `out` with one gemm over all their
/// patches, on gemm's threads.
fn convolve_group(
    out: &mut [f32],
    xs: &[f32],
    weight: &[f32],
    bias: &[f32],
    geometry: &Geometry,
    in_len: usize,
) {
    let out_channels = bias.len();
    let out_pixels = geometry.out_height * geometry.out_width;
    let images = xs.len() / in_len;
    let inner = weight.len() / out_channels;
    let width = images * out_pixels;
    let mut columns = vec![0f32; inner * width];
    for (index, image) in xs.chunks_exact(in_len).enumerate() {
        geometry.unfold(image, &mut columns[index * out_pixels..], width);
    }
    // (C_out, images · pixels), then regrouped image by image.
    let mut product = vec![0f32; out_channels * width];
    let threads = rayon::current_num_threads();
    gemm_with_bias(
        &mut product,
        weight,
        bias,
        &columns,
        inner,
        gemm::Parallelism::Rayon(threads),
    );
    for (channel, row) in product.chunks_exact(width).enumerate() {
        for (index, pixels) in row.chunks_exact(out_pixels).enumerate() {
            let start = (index * out_channels + channel) * out_pixels;
            out[start..start + out_pixels].copy_from_slice(pixels);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;
    use std::collections::HashMap;

    fn check(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        hw: (usize, usize),
        batch: usize,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 1.0, (cout, cin, kernel, kernel), &dev)?,
        );
        weights.insert("bias".to_string(), Tensor::randn(0f32, 1.0, cout, &dev)?);
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let conv = Conv2d::new(vb, cin, cout, kernel, stride, padding)?;
        let xs = Tensor::randn(0f32, 1.0, (batch, cin, hw.0, hw.1), &dev)?;
        let ours = conv.forward(&xs)?;
        let reference = conv.inner.forward(&xs)?;
        assert_eq!(ours.dims(), reference.dims());
        let diff = (ours - reference)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-4,
            "{cin}->{cout} k{kernel} s{stride} p{padding} {hw:?}: {diff}"
        );
        Ok(())
    }

    #[test]
    fn im2col_conv_matches_candle_conv2d() -> Result<()> {
        check(5, 7, 3, 1, 1, (6, 9), 3)?;
        check(5, 7, 3, 1, 1, (6, 9), 1)?;
        check(4, 6, 3, 2, 1, (7, 8), 2)?;
        check(4, 6, 3, 2, 0, (8, 9), 2)?;
        check(6, 3, 1, 1, 0, (5, 4), 4)?;
        check(3, 4, 3, 1, 0, (3, 3), 2)?;
        // Large enough for one gemm per image; a strided convolution of grouped images.
        check(3, 5, 3, 1, 1, (24, 24), 3)?;
        check(3, 5, 3, 2, 1, (16, 16), 5)?;
        // Enough input channels for the Winograd path, odd sizes included.
        check(16, 7, 3, 1, 1, (6, 9), 3)?;
        check(20, 5, 3, 1, 1, (7, 5), 1)?;
        check(32, 40, 3, 1, 1, (1, 2), 2)?;
        // Non-contiguous input.
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?,
        );
        weights.insert("bias".to_string(), Tensor::randn(0f32, 1.0, 4, &dev)?);
        let conv = Conv2d::new(
            VarBuilder::from_tensors(weights, DType::F32, &dev),
            3,
            4,
            3,
            1,
            1,
        )?;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev)?.transpose(2, 3)?;
        let diff = (conv.forward(&xs)? - conv.inner.forward(&xs)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }
}
