//! The fused convolution kernels: per-image im2col into a reused buffer and one gemm on top of
//! the bias, batched low-resolution images, and Winograd F(2×2, 3×3) for 3×3 stride-1 layers.

use std::cell::RefCell;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::winograd;
use super::{contiguous_f32, matmul, Strided};

pub(crate) struct Im2ColConv {
    pub(crate) kernel: usize,
    pub(crate) stride: usize,
    pub(crate) padding: usize,
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
