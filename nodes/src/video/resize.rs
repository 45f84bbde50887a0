//! Resizing latents and frames as `torch.nn.functional.interpolate` does (ComfyUI's
//! `common_upscale`), with ComfyUI's centre crop to the target aspect ratio.
//!
//! Each mode is separable: resizing the last two axes is one matrix product per axis, with
//! the interpolation weights of that mode (built in f64, applied in the tensor's dtype).

use std::str::FromStr;

use candle_core::{DType, Result, Tensor, D};

/// `interpolate`'s `mode` (with `align_corners=False` where it applies).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResizeMode {
    /// The nearest source pixel to each target pixel's centre (`nearest-exact`).
    NearestExact,
    /// Linear between the two nearest source pixels.
    Bilinear,
    /// The mean of the source pixels each target pixel covers (adaptive average pooling).
    Area,
    /// Cubic convolution (a = −0.75) over four source pixels, edges repeated.
    Bicubic,
}

impl ResizeMode {
    /// The names a node's combo lists, ComfyUI's spelling.
    pub const NAMES: [&'static str; 4] = ["nearest-exact", "bilinear", "area", "bicubic"];
}

impl FromStr for ResizeMode {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, Self::Err> {
        match name {
            "nearest-exact" => Ok(Self::NearestExact),
            "bilinear" => Ok(Self::Bilinear),
            "area" => Ok(Self::Area),
            "bicubic" => Ok(Self::Bicubic),
            other => Err(format!(
                "unknown resize mode `{other}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The (target, source) weights that resize one axis from `source` to `target` samples.
fn axis_weights(mode: ResizeMode, source: usize, target: usize) -> Vec<f64> {
    let scale = source as f64 / target as f64;
    let last = source as i64 - 1;
    let mut weights = vec![0.0; target * source];
    let mut add = |row: usize, column: i64, weight: f64| {
        weights[row * source + column.clamp(0, last) as usize] += weight;
    };
    for row in 0..target {
        let centre = (row as f64 + 0.5) * scale - 0.5;
        match mode {
            ResizeMode::NearestExact => {
                add(row, ((row as f64 + 0.5) * scale).floor() as i64, 1.0);
            }
            ResizeMode::Bilinear => {
                let position = centre.max(0.0);
                let low = position.floor() as i64;
                let fraction = position - low as f64;
                add(row, low, 1.0 - fraction);
                add(row, (low + 1).min(last), fraction);
            }
            ResizeMode::Area => {
                let start = (row * source) / target;
                let end = ((row + 1) * source).div_ceil(target);
                for column in start..end {
                    add(row, column as i64, 1.0 / (end - start) as f64);
                }
            }
            ResizeMode::Bicubic => {
                let low = centre.floor() as i64;
                let t = centre - low as f64;
                for (offset, weight) in cubic_weights(t).into_iter().enumerate() {
                    add(row, low - 1 + offset as i64, weight);
                }
            }
        }
    }
    weights
}

/// Keys' cubic convolution weights (a = −0.75, torch's) of the four samples around a point at
/// fraction `t` past the second one.
fn cubic_weights(t: f64) -> [f64; 4] {
    const A: f64 = -0.75;
    let near = |x: f64| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f64| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    [far(t + 1.0), near(t), near(1.0 - t), far(2.0 - t)]
}

/// Resizes the last two axes of `samples` (…, h, w) to (…, height, width).
pub fn resize(samples: &Tensor, height: usize, width: usize, mode: ResizeMode) -> Result<Tensor> {
    let rank = samples.rank();
    if rank < 2 {
        candle_core::bail!("resizing needs a tensor of at least 2 axes, got {rank}");
    }
    if height == 0 || width == 0 {
        candle_core::bail!("cannot resize to {height}×{width}");
    }
    let (source_h, source_w) = (samples.dim(D::Minus2)?, samples.dim(D::Minus1)?);
    if (source_h, source_w) == (height, width) {
        return Ok(samples.clone());
    }
    let dtype = samples.dtype();
    let device = samples.device();
    let compute = if dtype == DType::F64 {
        DType::F64
    } else {
        DType::F32
    };
    let matrix = |source: usize, target: usize| {
        Tensor::from_vec(axis_weights(mode, source, target), (target, source), device)?
            .to_dtype(compute)
    };
    let leading: Vec<usize> = samples.dims()[..rank - 2].to_vec();
    let batch: usize = leading.iter().product();
    let x = samples
        .to_dtype(compute)?
        .reshape((batch, source_h, source_w))?;
    // Rows: (height, h) · x; columns: x · (w, width).
    let rows = matrix(source_h, height)?
        .unsqueeze(0)?
        .broadcast_as((batch, height, source_h))?
        .contiguous()?;
    let columns = matrix(source_w, width)?
        .t()?
        .unsqueeze(0)?
        .broadcast_as((batch, source_w, width))?
        .contiguous()?;
    let resized = rows.matmul(&x)?.matmul(&columns)?;
    let mut shape = leading;
    shape.extend([height, width]);
    resized.reshape(shape)?.to_dtype(dtype)
}

/// The centre of `samples` (…, h, w) cut to the aspect ratio of `height`×`width`, as ComfyUI's
/// `common_upscale` crops before resizing with `crop="center"`.
pub fn crop_to_aspect(samples: &Tensor, height: usize, width: usize) -> Result<Tensor> {
    let (old_h, old_w) = (samples.dim(D::Minus2)?, samples.dim(D::Minus1)?);
    let old_aspect = old_w as f64 / old_h as f64;
    let new_aspect = width as f64 / height as f64;
    let (mut x, mut y) = (0usize, 0usize);
    if old_aspect > new_aspect {
        x = ((old_w as f64 - old_w as f64 * (new_aspect / old_aspect)) / 2.0).round_ties_even()
            as usize;
    } else if old_aspect < new_aspect {
        y = ((old_h as f64 - old_h as f64 * (old_aspect / new_aspect)) / 2.0).round_ties_even()
            as usize;
    }
    samples
        .narrow(D::Minus2, y, old_h - 2 * y)?
        .narrow(D::Minus1, x, old_w - 2 * x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn every_mode_keeps_a_constant_and_nearest_exact_picks_centres() {
        let ones = Tensor::ones((1, 2, 3, 5), DType::F32, &Device::Cpu).unwrap();
        for name in ResizeMode::NAMES {
            let mode: ResizeMode = name.parse().unwrap();
            let out = resize(&ones, 7, 4, mode).unwrap();
            assert_eq!(out.dims(), [1, 2, 7, 4]);
            let values: Vec<f32> = out.flatten_all().unwrap().to_vec1().unwrap();
            assert!(
                values.iter().all(|v| (v - 1.0).abs() < 1e-6),
                "{name}: {values:?}"
            );
        }
        let ramp = Tensor::arange(0f32, 4.0, &Device::Cpu)
            .unwrap()
            .reshape((1, 4))
            .unwrap();
        let doubled = resize(&ramp, 1, 8, ResizeMode::NearestExact).unwrap();
        assert_eq!(
            doubled.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0., 0., 1., 1., 2., 2., 3., 3.]
        );
        let halved = resize(&ramp, 1, 2, ResizeMode::Area).unwrap();
        assert_eq!(
            halved.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            [0.5, 2.5]
        );
    }

    #[test]
    fn centre_crop_keeps_the_target_aspect() {
        let x = Tensor::zeros((1, 4, 8, 16), DType::F32, &Device::Cpu).unwrap();
        assert_eq!(crop_to_aspect(&x, 8, 8).unwrap().dims(), [1, 4, 8, 8]);
        assert_eq!(crop_to_aspect(&x, 16, 8).unwrap().dims(), [1, 4, 8, 4]);
        assert_eq!(crop_to_aspect(&x, 4, 8).unwrap().dims(), [1, 4, 8, 16]);
    }
}
