//! 3×3 convolutions with stride 1 and padding 1 by Winograd's minimal filtering F(2×2, 3×3)
//! (Lavin & Gray, 2015), on the CPU in f32.
//!
//! Every 2×2 block of outputs comes from a 4×4 tile of input: both the tile and the 3×3 kernel
//! are mapped into a 4×4 transform domain, where the convolution is an elementwise product
//! summed over input channels, which for all tiles at once is 16 independent matrix products
//! (C_out × C_in)·(C_in × tiles). That is 16 multiplications per 4 outputs and input channel
//! instead of 36: the UNet's 3×3 convolutions, nearly half its arithmetic, need 2.25× fewer.
//! The transforms use only ±1 and ½, so the result stays within a few f32 ulp of the direct sum.

use rayon::prelude::*;

use super::{matmul, Strided};

/// Transform-domain points per tile (4×4).
const POINTS: usize = 16;
/// Bound on the transformed input of one pass (bytes); larger batches go in groups of images.
const PASS_BYTES: usize = 128 << 20;

/// Convolution geometry: `images` of `in_channels` × `height` × `width`, `out_channels` kernels.
#[derive(Clone, Copy)]
pub(super) struct Shape {
    pub images: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub height: usize,
    pub width: usize,
}

/// `out` (N, C_out, H, W) = bias + conv3×3(xs (N, C_in, H, W), weight (C_out, C_in, 3, 3)).
pub(super) fn convolve(out: &mut [f32], xs: &[f32], weight: &[f32], bias: &[f32], shape: Shape) {
    convolve_in_passes(out, xs, weight, bias, shape, PASS_BYTES)
}

fn convolve_in_passes(
    out: &mut [f32],
    xs: &[f32],
    weight: &[f32],
    bias: &[f32],
    shape: Shape,
    pass_bytes: usize,
) {
    let Shape {
        images,
        in_channels,
        out_channels,
        height,
        width,
    } = shape;
    let tiles_per_image = height.div_ceil(2) * width.div_ceil(2);
    let per_image_bytes = POINTS * in_channels * tiles_per_image * 4;
    let group = (pass_bytes / per_image_bytes.max(1)).clamp(1, images.max(1));
    let kernels = transform_kernels(weight, out_channels, in_channels);
    let (in_len, out_len) = (in_channels * height * width, out_channels * height * width);
    for (out, xs) in out
        .chunks_mut(group * out_len)
        .zip(xs.chunks(group * in_len))
    {
        let shape = Shape {
            images: xs.len() / in_len,
            ..shape
        };
        let tiles = shape.images * tiles_per_image;
        let transformed = transform_tiles(xs, &shape);
        // products[p] (C_out × tiles) = kernels[p] (C_out × C_in) · transformed[p] (C_in × tiles).
        let mut products = vec![0f32; POINTS * out_channels * tiles];
        products
            .par_chunks_mut(out_channels * tiles)
            .enumerate()
            .for_each(|(point, product)| {
                // SAFETY: product is (C_out, tiles) row-major; kernels holds (C_out, 16, C_in),
                // read as (C_out, C_in) rows 16·C_in apart from point·C_in; transformed holds
                // (C_in, 16, tiles), read as (C_in, tiles) rows 16·tiles apart from point·tiles.
                unsafe {
                    matmul(
                        (out_channels, tiles, in_channels),
                        Strided::rows(product.as_mut_ptr(), tiles),
                        Strided::rows(
                            kernels.as_ptr().add(point * in_channels),
                            POINTS * in_channels,
                        ),
                        Strided::rows(transformed.as_ptr().add(point * tiles), POINTS * tiles),
                        false,
                        1.0,
                        gemm::Parallelism::None,
                    )
                }
            });
        transform_outputs(out, &products, bias, &shape);
    }
}

/// U = G·g·Gᵀ for every 3×3 kernel, laid out (C_out, 16, C_in).
fn transform_kernels(weight: &[f32], out_channels: usize, in_channels: usize) -> Vec<f32> {
    let mut kernels = vec![0f32; out_channels * POINTS * in_channels];
    kernels
        .par_chunks_mut(POINTS * in_channels)
        .zip(weight.par_chunks(in_channels * 9))
        .for_each(|(dst, kernels_of_output)| {
            for (channel, g) in kernels_of_output.chunks_exact(9).enumerate() {
                // G = [[1, 0, 0], [½, ½, ½], [½, −½, ½], [0, 0, 1]]; rows of G·g, then columns.
                let mut rows = [[0f32; 3]; 4];
                for column in 0..3 {
                    let (g0, g1, g2) = (g[column], g[3 + column], g[6 + column]);
                    rows[0][column] = g0;
                    rows[1][column] = 0.5 * (g0 + g1 + g2);
                    rows[2][column] = 0.5 * (g0 - g1 + g2);
                    rows[3][column] = g2;
                }
                for (row, [a0, a1, a2]) in rows.into_iter().enumerate() {
                    let values = [a0, 0.5 * (a0 + a1 + a2), 0.5 * (a0 - a1 + a2), a2];
                    for (column, value) in values.into_iter().enumerate() {
                        dst[(row * 4 + column) * in_channels + channel] = value;
                    }
                }
            }
        });
    kernels
}

/// V = Bᵀ·d·B for every 4×4 input tile d (zero outside the image), laid out (C_in, 16, tiles)
/// with tiles numbered image by image, row by row. Bᵀ = [[1, 0, −1, 0], [0, 1, 1, 0],
/// [0, −1, 1, 0], [0, 1, 0, −1]] runs first down whole rows of input, then across each tile.
fn transform_tiles(xs: &[f32], shape: &Shape) -> Vec<f32> {
    let &Shape {
        images,
        in_channels,
        height,
        width,
        ..
    } = shape;
    let (tile_rows, tile_columns) = (height.div_ceil(2), width.div_ceil(2));
    let tiles = images * tile_rows * tile_columns;
    let plane = height * width;
    // Input columns −1 … 2·tile_columns, as indices 0 … 2·tile_columns + 1.
    let padded_width = 2 * tile_columns + 2;
    let mut transformed = vec![0f32; in_channels * POINTS * tiles];
    transformed
        .par_chunks_mut(POINTS * tiles)
        .enumerate()
        .for_each(|(channel, dst)| {
            let mut input = [(); 4].map(|_| vec![0f32; padded_width]);
            let mut down = [(); 4].map(|_| vec![0f32; padded_width]);
            let mut tile = 0;
            for image in 0..images {
                let src = &xs[(image * in_channels + channel) * plane..][..plane];
                for tile_y in 0..tile_rows {
                    // Input rows 2·tile_y − 1 … 2·tile_y + 2, zero outside the image.
                    for (r, row) in input.iter_mut().enumerate() {
                        match (2 * tile_y + r).checked_sub(1).filter(|&y| y < height) {
                            Some(y) => row[1..=width].copy_from_slice(&src[y * width..][..width]),
                            None => row.fill(0.0),
                        }
                    }
                    let [d0, d1, d2, d3] = &input;
                    let [t0, t1, t2, t3] = &mut down;
                    for x in 0..padded_width {
                        t0[x] = d0[x] - d2[x];
                        t1[x] = d1[x] + d2[x];
                        t2[x] = d2[x] - d1[x];
                        t3[x] = d1[x] - d3[x];
                    }
                    for (r, t) in down.iter().enumerate() {
                        let points = &mut dst[r * 4 * tiles..(r + 1) * 4 * tiles];
                        let (v0, rest) = points.split_at_mut(tiles);
                        let (v1, rest) = rest.split_at_mut(tiles);
                        let (v2, v3) = rest.split_at_mut(tiles);
                        let span = tile..tile + tile_columns;
                        let outputs = v0[span.clone()]
                            .iter_mut()
                            .zip(&mut v1[span.clone()])
                            .zip(&mut v2[span.clone()])
                            .zip(&mut v3[span]);
                        for ((((v0, v1), v2), v3), t) in outputs.zip(t.windows(4).step_by(2)) {
                            *v0 = t[0] - t[2];
                            *v1 = t[1] + t[2];
                            *v2 = t[2] - t[1];
                            *v3 = t[1] - t[3];
                        }
                    }
                    tile += tile_columns;
                }
            }
        });
    transformed
}

/// Y = Aᵀ·m·A + bias for every tile's 4×4 product m, written into the 2×2 outputs it covers.
/// Aᵀ = [[1, 1, 1, 0], [0, 1, −1, −1]] runs first down the points of a whole row of tiles,
/// then across each tile.
fn transform_outputs(out: &mut [f32], products: &[f32], bias: &[f32], shape: &Shape) {
    let &Shape {
        out_channels,
        height,
        width,
        ..
    } = shape;
    let (tile_rows, tile_columns) = (height.div_ceil(2), width.div_ceil(2));
    let tiles_per_image = tile_rows * tile_columns;
    let tiles = products.len() / (POINTS * out_channels).max(1);
    let point_stride = out_channels * tiles;
    out.par_chunks_mut(height * width)
        .enumerate()
        .for_each(|(index, dst)| {
            let (image, channel) = (index / out_channels, index % out_channels);
            let bias = bias[channel];
            // Per output row of a tile (2) and point column (4): one value per tile.
            let mut down = [(); 8].map(|_| vec![0f32; tile_columns]);
            for tile_y in 0..tile_rows {
                let first = channel * tiles + image * tiles_per_image + tile_y * tile_columns;
                let m = |point: usize| &products[point * point_stride + first..][..tile_columns];
                for c in 0..4 {
                    let (m0, m1, m2, m3) = (m(c), m(4 + c), m(8 + c), m(12 + c));
                    let (upper, lower) = down.split_at_mut(4);
                    for x in 0..tile_columns {
                        upper[c][x] = m0[x] + m1[x] + m2[x];
                        lower[c][x] = m1[x] - m2[x] - m3[x];
                    }
                }
                for (r, s) in down.chunks_exact(4).enumerate() {
                    let y = 2 * tile_y + r;
                    if y >= height {
                        break;
                    }
                    let row = &mut dst[y * width..(y + 1) * width];
                    for (x, pair) in row.chunks_mut(2).enumerate() {
                        pair[0] = s[0][x] + s[1][x] + s[2][x] + bias;
                        if let Some(second) = pair.get_mut(1) {
                            *second = s[1][x] - s[2][x] - s[3][x] + bias;
                        }
                    }
                }
            }
        });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The direct sum, in f64.
    fn direct(xs: &[f32], weight: &[f32], bias: &[f32], shape: Shape) -> Vec<f64> {
        let Shape {
            images,
            in_channels,
            out_channels,
            height,
            width,
        } = shape;
        let mut out = vec![0f64; images * out_channels * height * width];
        for n in 0..images {
            for o in 0..out_channels {
                for y in 0..height {
                    for x in 0..width {
                        let mut sum = bias[o] as f64;
                        for c in 0..in_channels {
                            for ky in 0..3 {
                                for kx in 0..3 {
                                    let (iy, ix) = (y + ky, x + kx);
                                    if iy < 1 || ix < 1 || iy > height || ix > width {
                                        continue;
                                    }
                                    let input =
                                        xs[((n * in_channels + c) * height + iy - 1) * width + ix
                                            - 1];
                                    let w = weight[((o * in_channels + c) * 3 + ky) * 3 + kx];
                                    sum += input as f64 * w as f64;
                                }
                            }
                        }
                        out[((n * out_channels + o) * height + y) * width + x] = sum;
                    }
                }
            }
        }
        out
    }

    fn values(len: usize, seed: usize) -> Vec<f32> {
        (0..len)
            .map(|i| (((i * 7919 + seed * 104_729) % 2003) as f32 / 1001.5) - 1.0)
            .collect()
    }

    #[test]
    fn winograd_matches_the_direct_sum() {
        for (images, in_channels, out_channels, height, width) in [
            (2, 3, 4, 6, 8),
            (3, 5, 2, 7, 5),
            (1, 2, 3, 1, 1),
            (2, 4, 3, 2, 3),
        ] {
            let shape = Shape {
                images,
                in_channels,
                out_channels,
                height,
                width,
            };
            let xs = values(images * in_channels * height * width, 1);
            let weight = values(out_channels * in_channels * 9, 2);
            let bias = values(out_channels, 3);
            let expected = direct(&xs, &weight, &bias, shape);
            // In one pass, and one image per pass.
            for pass_bytes in [PASS_BYTES, 1] {
                let mut out = vec![f32::NAN; expected.len()];
                convolve_in_passes(&mut out, &xs, &weight, &bias, shape, pass_bytes);
                for (ours, exact) in out.iter().zip(&expected) {
                    assert!((*ours as f64 - exact).abs() < 1e-5, "{ours} vs {exact}");
                }
            }
        }
    }
}
