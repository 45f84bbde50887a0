//! Dense motion between the frames of a clip: optical flow, its magnitude, a flow preview and a
//! single clip amplitude m ∈ [0, 1], and the safetensors files that store them.
//!
//! Flow contract: `flow[f]` is (2, H, W) at the frames' resolution, in pixels; channel 0 is x
//! (rightwards), channel 1 is y (downwards); a point at p in frame f is at p + flow[f](p) in
//! frame f + 1.
//!
//! The estimator is pyramidal, iterative Lucas–Kanade on luminance (Bouguet's coarse-to-fine
//! scheme, evaluated at every pixel): each pyramid level starts from the flow of the coarser
//! level, warps the next frame back onto the current one by bilinear sampling, and solves the
//! windowed 2×2 normal equations `G·δ = −b` for an update, `iterations` times. `G` holds the
//! Gaussian-weighted sums of `Ix², Ix·Iy, Iy²` of the current frame and `b` those of
//! `Ix·It, Iy·It`, with `It` the warped next frame minus the current one. A small Tikhonov
//! term keeps textureless windows at the coarser estimate instead of dividing by zero.
//!
//! Clip amplitude: `m = clamp(mean |flow| / (κ · min(H, W)), 0, 1)` with κ =
//! [`AMPLITUDE_KAPPA`] = 0.05, the mean taken over every frame pair and pixel: a still clip
//! gives 0, m grows linearly with speed and saturates at 1 once the mean displacement reaches 5%
//! of the short side per frame (25.6 px per frame at 512×512).

use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::{DType, Device, Tensor};
use rayon::prelude::*;
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::io::{save_atomically, MediaError};

/// The fraction of the short side per frame at which the clip amplitude saturates at 1.
pub const AMPLITUDE_KAPPA: f32 = 0.05;
/// The magnitude percentile that maps to full brightness in [`flow_preview`]: robust against
/// a few outlier vectors at the borders.
pub const PREVIEW_PERCENTILE: f32 = 0.99;
/// A pyramid level is only added while its short side stays at least this many pixels.
pub const MIN_PYRAMID_SIDE: usize = 16;
/// Tikhonov term added to the diagonal of the normal equations (intensities are in [0, 1], so
/// a textured window has entries around 1e-3): keeps flat windows at the coarser estimate.
const REGULARIZATION: f32 = 1e-6;
/// Iterations at one level stop early once the mean update is below this many pixels.
const CONVERGED_UPDATE: f32 = 1e-3;

/// Key of the (F−1, 2, H, W) flow in a motion file.
pub const FLOW_KEY: &str = "flow";
/// Key of the (F−1, H, W) flow magnitude in a motion file.
pub const MAGNITUDE_KEY: &str = "magnitude";
/// Key of the one-element clip amplitude in a motion file.
pub const AMPLITUDE_KEY: &str = "amplitude";
/// Extension of motion files.
pub const MOTION_EXTENSION: &str = "safetensors";

/// Why motion could not be estimated.
#[derive(Debug, thiserror::Error)]
pub enum MotionError {
    #[error("motion needs at least 2 frames, got {0}")]
    TooFewFrames(usize),
    #[error("expected frames × height × width × 3, got shape {0:?}")]
    Layout(Vec<usize>),
    #[error("frames of {width}×{height} are too small; motion needs at least 2×2 pixels")]
    TooSmall { width: usize, height: usize },
    #[error("a plane of {width}×{height} pixels needs {} values and at least 2×2 pixels, got {values} values", width * height)]
    PlaneSize {
        width: usize,
        height: usize,
        values: usize,
    },
    #[error("frames of different sizes: {current:?} and {next:?}")]
    SizeMismatch {
        current: (usize, usize),
        next: (usize, usize),
    },
    #[error("{0}")]
    Field(String),
    #[error("unknown motion method {0:?}: expected lucas-kanade")]
    UnknownMethod(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

/// How flow is estimated.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FlowMethod {
    /// Pyramidal, iterative dense Lucas–Kanade with a Gaussian window.
    LucasKanade,
}

impl FlowMethod {
    /// The names accepted by [`FromStr`], in the order a node's combo input lists them.
    pub const NAMES: [&'static str; 1] = ["lucas-kanade"];
}

impl FromStr for FlowMethod {
    type Err = MotionError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "lucas-kanade" => Ok(FlowMethod::LucasKanade),
            other => Err(MotionError::UnknownMethod(other.to_string())),
        }
    }
}

/// Settings of the Lucas–Kanade estimator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LucasKanadeConfig {
    /// Pyramid levels including full resolution; clamped so the coarsest level keeps a short
    /// side of at least [`MIN_PYRAMID_SIDE`]. Each level doubles the largest trackable motion.
    pub levels: usize,
    /// Window size in pixels (rounded up to odd): a Gaussian of standard deviation window/4
    /// truncated to this width. Larger windows are steadier, smaller ones keep motion edges.
    pub window: usize,
    /// Warp-and-solve iterations per level (fewer when the update has converged).
    pub iterations: usize,
}

impl Default for LucasKanadeConfig {
    fn default() -> Self {
        Self {
            levels: 4,
            window: 15,
            iterations: 5,
        }
    }
}

/// The motion of a clip of F frames, on the CPU.
#[derive(Debug, Clone)]
pub struct MotionField {
    /// (F−1, 2, H, W) f32 forward flow in pixels, x then y.
    pub flow: Tensor,
    /// (F−1, H, W) f32 length of each flow vector.
    pub magnitude: Tensor,
    /// The clip amplitude m ∈ [0, 1] (see the module documentation).
    pub amplitude: f32,
}

/// A single-channel image, row-major, of at least 2×2 pixels.
#[derive(Debug, Clone, PartialEq)]
pub struct Plane {
    width: usize,
    height: usize,
    data: Vec<f32>,
}

impl Plane {
    /// A `width`×`height` plane of `data` (row-major), which must hold exactly that many
    /// values; both sides must be at least 2 pixels.
    pub fn new(width: usize, height: usize, data: Vec<f32>) -> Result<Self, MotionError> {
        if width < 2 || height < 2 || data.len() != width * height {
            return Err(MotionError::PlaneSize {
                width,
                height,
                values: data.len(),
            });
        }
        Ok(Self::from_parts(width, height, data))
    }

    /// For sizes this module derived itself (pyramid levels of a checked plane).
    fn from_parts(width: usize, height: usize, data: Vec<f32>) -> Self {
        Self {
            width,
            height,
            data,
        }
    }

    pub fn width(&self) -> usize {
        self.width
    }

    pub fn height(&self) -> usize {
        self.height
    }

    /// Bilinear sample at (x, y); positions outside the image take the nearest edge value.
    fn sample(&self, x: f32, y: f32) -> f32 {
        let x = x.clamp(0.0, (self.width - 1) as f32);
        let y = y.clamp(0.0, (self.height - 1) as f32);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let row0 = &self.data[y0 * self.width..];
        let row1 = &self.data[y1 * self.width..];
        let top = row0[x0] + fx * (row0[x1] - row0[x0]);
        let bottom = row1[x0] + fx * (row1[x1] - row1[x0]);
        top + fy * (bottom - top)
    }

    /// Blurred with the 5-tap binomial kernel and subsampled by 2: pixel (x, y) of the result
    /// is pixel (2x, 2y) of the blurred image.
    fn downsample(&self) -> Plane {
        const BINOMIAL: [f32; 5] = [1.0 / 16.0, 4.0 / 16.0, 6.0 / 16.0, 4.0 / 16.0, 1.0 / 16.0];
        let blurred = separable_filter(&self.data, self.width, self.height, &BINOMIAL);
        let (width, height) = (self.width.div_ceil(2), self.height.div_ceil(2));
        let mut data = Vec::with_capacity(width * height);
        for y in 0..height {
            let row = &blurred[2 * y * self.width..];
            data.extend((0..width).map(|x| row[2 * x]));
        }
        Plane::from_parts(width, height, data)
    }
}

/// A dense flow field of one frame pair: x and y displacement planes.
#[derive(Debug, Clone, PartialEq)]
pub struct Flow {
    pub width: usize,
    pub height: usize,
    pub x: Vec<f32>,
    pub y: Vec<f32>,
}

impl Flow {
    fn zeros(width: usize, height: usize) -> Self {
        Self {
            width,
            height,
            x: vec![0.0; width * height],
            y: vec![0.0; width * height],
        }
    }

    /// This (coarser) flow at twice the resolution, `width`×`height`, in that level's pixels.
    /// Pixel 2c of the finer level is pixel c of this one (see [`Plane::downsample`]).
    fn upsample(&self, width: usize, height: usize) -> Flow {
        let coarse_x = Plane::from_parts(self.width, self.height, self.x.clone());
        let coarse_y = Plane::from_parts(self.width, self.height, self.y.clone());
        let mut fine = Flow::zeros(width, height);
        for y in 0..height {
            for x in 0..width {
                let (cx, cy) = (x as f32 * 0.5, y as f32 * 0.5);
                fine.x[y * width + x] = 2.0 * coarse_x.sample(cx, cy);
                fine.y[y * width + x] = 2.0 * coarse_y.sample(cx, cy);
            }
        }
        fine
    }
}

/// Rec. 601 luminance of one (H, W, 3) RGB frame.
fn luminance(rgb: &[f32], width: usize, height: usize) -> Plane {
    let data = rgb
        .chunks_exact(3)
        .map(|p| 0.299 * p[0] + 0.587 * p[1] + 0.114 * p[2])
        .collect();
    Plane::from_parts(width, height, data)
}

/// Correlates `src` (row-major `width`×`height`) with `kernel` (odd length) along rows, then
/// columns; edge pixels extend outwards.
fn separable_filter(src: &[f32], width: usize, height: usize, kernel: &[f32]) -> Vec<f32> {
    let radius = kernel.len() / 2;
    let mut rows = vec![0.0f32; width * height];
    let mut padded = vec![0.0f32; width + 2 * radius];
    for (out, row) in rows.chunks_exact_mut(width).zip(src.chunks_exact(width)) {
        padded[..radius].fill(row[0]);
        padded[radius..radius + width].copy_from_slice(row);
        padded[radius + width..].fill(row[width - 1]);
        // Tap by tap over whole rows, so the inner loop is a vectorisable multiply-add.
        for (tap, &weight) in kernel.iter().enumerate() {
            for (o, &p) in out.iter_mut().zip(&padded[tap..tap + width]) {
                *o += weight * p;
            }
        }
    }
    let mut filtered = vec![0.0f32; width * height];
    for (y, out) in filtered.chunks_exact_mut(width).enumerate() {
        for (tap, &weight) in kernel.iter().enumerate() {
            let source_y = (y + tap).saturating_sub(radius).min(height - 1);
            let row = &rows[source_y * width..(source_y + 1) * width];
            for (o, &p) in out.iter_mut().zip(row) {
                *o += weight * p;
            }
        }
    }
    filtered
}

/// The normalised Gaussian window of `window` pixels (rounded up to odd), σ = window / 4.
fn window_kernel(window: usize) -> Vec<f32> {
    let radius = window.max(1) / 2;
    let sigma = (window.max(1) as f32 / 4.0).max(0.5);
    let weights: Vec<f32> = (0..=2 * radius)
        .map(|i| {
            let d = i as f32 - radius as f32;
            (-d * d / (2.0 * sigma * sigma)).exp()
        })
        .collect();
    let total: f32 = weights.iter().sum();
    weights.into_iter().map(|w| w / total).collect()
}

/// Central differences (one-sided at the edges) along x and y.
fn gradients(plane: &Plane) -> (Vec<f32>, Vec<f32>) {
    let (w, h) = (plane.width, plane.height);
    let at = |x: usize, y: usize| plane.data[y * w + x];
    let mut gx = vec![0.0f32; w * h];
    let mut gy = vec![0.0f32; w * h];
    for y in 0..h {
        let (up, down) = (y.saturating_sub(1), (y + 1).min(h - 1));
        for x in 0..w {
            let (left, right) = (x.saturating_sub(1), (x + 1).min(w - 1));
            gx[y * w + x] = (at(right, y) - at(left, y)) / (right - left).max(1) as f32;
            gy[y * w + x] = (at(x, down) - at(x, up)) / (down - up).max(1) as f32;
        }
    }
    (gx, gy)
}

/// The pyramid levels that fit a `width`×`height` image: at most `requested` (at least 1), while
/// the short side of the coarsest stays at least [`MIN_PYRAMID_SIDE`].
pub fn effective_levels(requested: usize, width: usize, height: usize) -> usize {
    let mut levels = 1;
    let mut side = width.min(height);
    while levels < requested && side.div_ceil(2) >= MIN_PYRAMID_SIDE {
        side = side.div_ceil(2);
        levels += 1;
    }
    levels
}

/// The Gaussian pyramid of `plane`, finest first.
fn pyramid(plane: Plane, levels: usize) -> Vec<Plane> {
    let mut planes = vec![plane];
    while planes.len() < levels {
        let coarser = planes[planes.len() - 1].downsample();
        planes.push(coarser);
    }
    planes
}

/// Refines `flow` from `current` to `next` at one pyramid level.
fn refine_level(current: &Plane, next: &Plane, flow: &mut Flow, kernel: &[f32], iterations: usize) {
    let (w, h) = (current.width, current.height);
    let (gx, gy) = gradients(current);
    let products = |a: &[f32], b: &[f32]| -> Vec<f32> {
        let product: Vec<f32> = a.iter().zip(b).map(|(a, b)| a * b).collect();
        separable_filter(&product, w, h, kernel)
    };
    // The structure tensor depends only on the current frame: built once per level.
    let gxx = products(&gx, &gx);
    let gxy = products(&gx, &gy);
    let gyy = products(&gy, &gy);
    let mut temporal = vec![0.0f32; w * h];
    let (max_x, max_y) = ((w - 1) as f32, (h - 1) as f32);
    for _ in 0..iterations {
        for y in 0..h {
            for x in 0..w {
                let i = y * w + x;
                let (tx, ty) = (x as f32 + flow.x[i], y as f32 + flow.y[i]);
                // A point that left the frame has no counterpart to compare with: it adds no
                // evidence, so the window's other pixels decide its motion.
                temporal[i] = if (0.0..=max_x).contains(&tx) && (0.0..=max_y).contains(&ty) {
                    next.sample(tx, ty) - current.data[i]
                } else {
                    0.0
                };
            }
        }
        let bx = products(&gx, &temporal);
        let by = products(&gy, &temporal);
        let mut total_update = 0.0f32;
        for i in 0..w * h {
            let (a, b, c) = (gxx[i] + REGULARIZATION, gxy[i], gyy[i] + REGULARIZATION);
            let det = a * c - b * b;
            let dx = -(c * bx[i] - b * by[i]) / det;
            let dy = -(a * by[i] - b * bx[i]) / det;
            flow.x[i] += dx;
            flow.y[i] += dy;
            total_update += dx.abs() + dy.abs();
        }
        if total_update / (w * h) as f32 <= CONVERGED_UPDATE {
            break;
        }
    }
}

/// Dense forward flow between two luminance pyramids (finest first, same sizes).
fn pyramid_flow(current: &[Plane], next: &[Plane], config: &LucasKanadeConfig) -> Flow {
    let kernel = window_kernel(config.window);
    let coarsest = &current[current.len() - 1];
    let mut flow = Flow::zeros(coarsest.width, coarsest.height);
    for (level, (c, n)) in current.iter().zip(next).enumerate().rev() {
        if level + 1 < current.len() {
            flow = flow.upsample(c.width, c.height);
        }
        refine_level(c, n, &mut flow, &kernel, config.iterations.max(1));
    }
    flow
}

/// Dense forward flow from `current` to `next` (same size): a point at p in `current` is at
/// p + flow(p) in `next`.
pub fn dense_flow(
    current: &Plane,
    next: &Plane,
    config: &LucasKanadeConfig,
) -> Result<Flow, MotionError> {
    if (current.width, current.height) != (next.width, next.height) {
        return Err(MotionError::SizeMismatch {
            current: (current.width, current.height),
            next: (next.width, next.height),
        });
    }
    let levels = effective_levels(config.levels, current.width, current.height);
    let current = pyramid(current.clone(), levels);
    let next = pyramid(next.clone(), levels);
    Ok(pyramid_flow(&current, &next, config))
}

/// The clip amplitude m of flows of `width`×`height` frames (see the module documentation).
pub fn clip_amplitude(flows: &[Flow], width: usize, height: usize) -> f32 {
    let count: usize = flows.iter().map(|f| f.x.len()).sum();
    if count == 0 {
        return 0.0;
    }
    let total: f64 = flows
        .iter()
        .flat_map(|f| f.x.iter().zip(&f.y))
        .map(|(x, y)| f64::from(x.hypot(*y)))
        .sum();
    let mean = (total / count as f64) as f32;
    (mean / (AMPLITUDE_KAPPA * width.min(height) as f32)).clamp(0.0, 1.0)
}

/// Estimates the motion of `frames`, an IMAGE (F, H, W, 3) in [0, 1] with F ≥ 2: forward flow
/// between each pair of consecutive frames (pairs in parallel), its magnitude and the clip
/// amplitude.
pub fn estimate_motion(
    frames: &Tensor,
    method: FlowMethod,
    config: &LucasKanadeConfig,
) -> Result<MotionField, MotionError> {
    let FlowMethod::LucasKanade = method;
    let (count, height, width) = match frames.dims() {
        &[f, h, w, 3] => (f, h, w),
        dims => return Err(MotionError::Layout(dims.to_vec())),
    };
    if count < 2 {
        return Err(MotionError::TooFewFrames(count));
    }
    if width < 2 || height < 2 {
        return Err(MotionError::TooSmall { width, height });
    }
    let rgb = frames
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let levels = effective_levels(config.levels, width, height);
    // Every inner frame belongs to two pairs: its pyramid is built once.
    let pyramids: Vec<Vec<Plane>> = rgb
        .par_chunks_exact(width * height * 3)
        .map(|frame| pyramid(luminance(frame, width, height), levels))
        .collect();
    let flows: Vec<Flow> = pyramids
        .par_windows(2)
        .map(|pair| pyramid_flow(&pair[0], &pair[1], config))
        .collect();
    motion_field(&flows, width, height)
}

/// Packs per-pair flows of `width`×`height` frames into a [`MotionField`].
pub fn motion_field(
    flows: &[Flow],
    width: usize,
    height: usize,
) -> Result<MotionField, MotionError> {
    let pairs = flows.len();
    let mut flow = Vec::with_capacity(pairs * 2 * width * height);
    let mut magnitude = Vec::with_capacity(pairs * width * height);
    for f in flows {
        flow.extend_from_slice(&f.x);
        flow.extend_from_slice(&f.y);
        magnitude.extend(f.x.iter().zip(&f.y).map(|(x, y)| x.hypot(*y)));
    }
    Ok(MotionField {
        flow: Tensor::from_vec(flow, (pairs, 2, height, width), &Device::Cpu)?,
        magnitude: Tensor::from_vec(magnitude, (pairs, height, width), &Device::Cpu)?,
        amplitude: clip_amplitude(flows, width, height),
    })
}

/// A colour picture of the flow, (F−1, H, W, 3) in [0, 1]: hue is the direction (red
/// rightwards, then yellow-green downwards, cyan leftwards, blue-violet upwards, as y points
/// down), saturation 1, value the magnitude divided by the clip's [`PREVIEW_PERCENTILE`]
/// magnitude and clipped at 1. A still clip is black.
pub fn flow_preview(field: &MotionField) -> Result<Tensor, MotionError> {
    field.validate().map_err(MotionError::Field)?;
    let (pairs, _, height, width) = field.flow.dims4()?;
    let flow = field.flow.flatten_all()?.to_vec1::<f32>()?;
    let magnitude = field.magnitude.flatten_all()?.to_vec1::<f32>()?;
    let scale = robust_max(&magnitude, PREVIEW_PERCENTILE);
    let plane = width * height;
    let mut rgb = vec![0.0f32; pairs * plane * 3];
    rgb.par_chunks_exact_mut(plane * 3)
        .enumerate()
        .for_each(|(pair, out)| {
            let xs = &flow[2 * pair * plane..(2 * pair + 1) * plane];
            let ys = &flow[(2 * pair + 1) * plane..(2 * pair + 2) * plane];
            let magnitudes = &magnitude[pair * plane..(pair + 1) * plane];
            for (i, pixel) in out.chunks_exact_mut(3).enumerate() {
                if scale <= 0.0 {
                    break;
                }
                let hue = ys[i].atan2(xs[i]).rem_euclid(std::f32::consts::TAU)
                    / std::f32::consts::TAU
                    * 6.0;
                let value = (magnitudes[i] / scale).min(1.0);
                pixel.copy_from_slice(&hsv_to_rgb(hue, value));
            }
        });
    Ok(Tensor::from_vec(
        rgb,
        (pairs, height, width, 3),
        &Device::Cpu,
    )?)
}

/// The `percentile` quantile of `values` (on a strided sample of at most about a million of
/// them, enough for a brightness scale); 0 for no values.
fn robust_max(values: &[f32], percentile: f32) -> f32 {
    const SAMPLE: usize = 1 << 20;
    let stride = values.len().div_ceil(SAMPLE).max(1);
    let mut sample: Vec<f32> = values
        .iter()
        .step_by(stride)
        .copied()
        .filter(|v| v.is_finite())
        .collect();
    if sample.is_empty() {
        return 0.0;
    }
    let rank = ((sample.len() - 1) as f32 * percentile).round() as usize;
    let (_, quantile, _) = sample.select_nth_unstable_by(rank, f32::total_cmp);
    *quantile
}

/// HSV with saturation 1: `hue` in sextants [0, 6), `value` in [0, 1].
fn hsv_to_rgb(hue: f32, value: f32) -> [f32; 3] {
    let sextant = hue.floor();
    let fraction = hue - sextant;
    let (rising, falling) = (value * fraction, value * (1.0 - fraction));
    match sextant as i32 {
        0 => [value, rising, 0.0],
        1 => [falling, value, 0.0],
        2 => [0.0, value, rising],
        3 => [0.0, falling, value],
        4 => [rising, 0.0, value],
        _ => [value, 0.0, falling],
    }
}

impl MotionField {
    /// Checks the shapes and the amplitude of a field read from elsewhere.
    pub fn validate(&self) -> Result<(), String> {
        let (pairs, channels, height, width) = match self.flow.dims() {
            &[p, c, h, w] => (p, c, h, w),
            dims => {
                return Err(format!(
                    "`{FLOW_KEY}` must be (frames−1, 2, height, width), got shape {dims:?}"
                ))
            }
        };
        if channels != 2 || pairs == 0 {
            return Err(format!(
                "`{FLOW_KEY}` must be (frames−1 ≥ 1, 2, height, width), got shape {:?}",
                self.flow.dims()
            ));
        }
        if self.magnitude.dims() != [pairs, height, width] {
            return Err(format!(
                "`{MAGNITUDE_KEY}` has shape {:?} but `{FLOW_KEY}` {:?} needs {:?}",
                self.magnitude.dims(),
                self.flow.dims(),
                [pairs, height, width]
            ));
        }
        if !(0.0..=1.0).contains(&self.amplitude) {
            return Err(format!(
                "`{AMPLITUDE_KEY}` is {}, outside [0, 1]",
                self.amplitude
            ));
        }
        Ok(())
    }
}

/// Writes `field` to `{output_dir}/{filename_prefix}_{counter:05}_.safetensors` atomically and
/// returns its path: f32 tensors `flow` (F−1, 2, H, W), `magnitude` (F−1, H, W) and
/// `amplitude` (1).
pub fn save_motion(
    field: &MotionField,
    output_dir: &Path,
    filename_prefix: &str,
) -> Result<PathBuf, MediaError> {
    field.validate().map_err(MediaError::Invalid)?;
    let bytes = motion_to_bytes(field)?;
    save_atomically(output_dir, filename_prefix, MOTION_EXTENSION, |temp| {
        fs::write(temp, &bytes).map_err(|source| MediaError::Io {
            path: temp.to_path_buf(),
            source,
        })
    })
}

/// Reads a motion file written by [`save_motion`], checking its keys, dtypes and shapes.
pub fn load_motion(path: &Path) -> Result<MotionField, MediaError> {
    let bytes = fs::read(path).map_err(|source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    motion_from_bytes(&bytes).map_err(|message| MediaError::MotionFile {
        path: path.to_path_buf(),
        message,
    })
}

fn f32_bytes(t: &Tensor) -> Result<Vec<u8>, MediaError> {
    let values = t
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(values.iter().flat_map(|v| v.to_le_bytes()).collect())
}

fn motion_to_bytes(field: &MotionField) -> Result<Vec<u8>, MediaError> {
    let invalid = |e: safetensors::SafeTensorError| MediaError::Invalid(e.to_string());
    let flow = f32_bytes(&field.flow)?;
    let magnitude = f32_bytes(&field.magnitude)?;
    let amplitude = field.amplitude.to_le_bytes();
    let tensors = [
        (
            FLOW_KEY,
            TensorView::new(Dtype::F32, field.flow.dims().to_vec(), &flow).map_err(invalid)?,
        ),
        (
            MAGNITUDE_KEY,
            TensorView::new(Dtype::F32, field.magnitude.dims().to_vec(), &magnitude)
                .map_err(invalid)?,
        ),
        (
            AMPLITUDE_KEY,
            TensorView::new(Dtype::F32, vec![1], &amplitude).map_err(invalid)?,
        ),
    ];
    safetensors::serialize(tensors, None).map_err(invalid)
}

fn motion_from_bytes(bytes: &[u8]) -> Result<MotionField, String> {
    let tensors =
        SafeTensors::deserialize(bytes).map_err(|e| format!("not a safetensors file ({e})"))?;
    let read = |key: &str| -> Result<Tensor, String> {
        let view = tensors.tensor(key).map_err(|_| {
            format!(
                "no `{key}` tensor (found {:?}); not a motion file",
                tensors.names()
            )
        })?;
        if view.dtype() != Dtype::F32 {
            return Err(format!("`{key}` is {:?}, expected F32", view.dtype()));
        }
        Tensor::from_raw_buffer(view.data(), DType::F32, view.shape(), &Device::Cpu)
            .map_err(|e| format!("`{key}`: {e}"))
    };
    let flow = read(FLOW_KEY)?;
    let magnitude = read(MAGNITUDE_KEY)?;
    let amplitude = read(AMPLITUDE_KEY)?;
    let amplitude = match amplitude.dims() {
        [1] => amplitude
            .to_vec1::<f32>()
            .map_err(|e| e.to_string())?
            .first()
            .copied()
            .unwrap_or_default(),
        dims => {
            return Err(format!(
                "`{AMPLITUDE_KEY}` must have shape [1], got {dims:?}"
            ))
        }
    };
    let field = MotionField {
        flow,
        magnitude,
        amplitude,
    };
    field.validate()?;
    Ok(field)
}

#[cfg(test)]
mod tests {
    use super::*;

    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    use crate::video::TempDir;

    /// A smooth random texture: a sum of sinusoids of wavelengths 10–32 px in random
    /// directions, in [0, 1]; evaluated analytically so sub-pixel shifts are exact.
    struct Texture {
        waves: Vec<(f32, f32, f32)>,
    }

    impl Texture {
        fn new(seed: u64) -> Self {
            let mut rng = ChaCha8Rng::seed_from_u64(seed);
            let waves = (0..8)
                .map(|_| {
                    let angle = rng.random_range(0.0..std::f32::consts::PI);
                    let wavelength = rng.random_range(10.0f32..32.0);
                    let k = std::f32::consts::TAU / wavelength;
                    let phase = rng.random_range(0.0..std::f32::consts::TAU);
                    (k * angle.cos(), k * angle.sin(), phase)
                })
                .collect();
            Self { waves }
        }

        fn at(&self, x: f32, y: f32) -> f32 {
            let sum: f32 = self
                .waves
                .iter()
                .map(|(kx, ky, phase)| (kx * x + ky * y + phase).sin())
                .sum();
            0.5 + 0.5 * sum / self.waves.len() as f32
        }

        /// The image whose pixel p shows the texture at `source(p)`.
        fn render(&self, size: usize, source: impl Fn(f32, f32) -> (f32, f32)) -> Plane {
            let data = (0..size * size)
                .map(|i| {
                    let (x, y) = source((i % size) as f32, (i / size) as f32);
                    self.at(x, y)
                })
                .collect();
            Plane::new(size, size, data).unwrap()
        }
    }

    /// Median end-point error of `flow` against `truth(p)` more than `margin` px from the edges.
    fn median_error(flow: &Flow, margin: usize, truth: impl Fn(f32, f32) -> (f32, f32)) -> f32 {
        let mut errors = Vec::new();
        for y in margin..flow.height - margin {
            for x in margin..flow.width - margin {
                let i = y * flow.width + x;
                let (tx, ty) = truth(x as f32, y as f32);
                errors.push((flow.x[i] - tx).hypot(flow.y[i] - ty));
            }
        }
        errors.sort_by(f32::total_cmp);
        errors[errors.len() / 2]
    }

    fn as_image(planes: &[Plane]) -> Tensor {
        let (w, h) = (planes[0].width, planes[0].height);
        let data: Vec<f32> = planes
            .iter()
            .flat_map(|p| p.data.iter().flat_map(|&v| [v, v, v]))
            .collect();
        Tensor::from_vec(data, (planes.len(), h, w, 3), &Device::Cpu).unwrap()
    }

    #[test]
    fn translations_are_recovered_to_a_quarter_pixel() {
        let texture = Texture::new(3);
        let size = 96;
        for (dx, dy) in [(2.0f32, -1.0f32), (0.5, 0.25), (1.3, 0.7), (-4.6, 3.2)] {
            let first = texture.render(size, |x, y| (x, y));
            // The content at p in the first frame shows at p + d in the second.
            let second = texture.render(size, |x, y| (x - dx, y - dy));
            let flow = dense_flow(&first, &second, &LucasKanadeConfig::default()).unwrap();
            let error = median_error(&flow, 12, |_, _| (dx, dy));
            println!("translation ({dx}, {dy}): median end-point error {error:.4} px");
            assert!(error < 0.25, "({dx}, {dy}): median error {error}");
        }
    }

    #[test]
    fn a_small_rotation_is_recovered_to_half_a_pixel() {
        let texture = Texture::new(5);
        let size = 96;
        let centre = (size as f32 - 1.0) / 2.0;
        let (sin, cos) = 2.0f32.to_radians().sin_cos();
        let first = texture.render(size, |x, y| (x, y));
        // Rotating by +2° about the centre: the second frame at p shows R⁻¹(p − c) + c.
        let second = texture.render(size, |x, y| {
            let (rx, ry) = (x - centre, y - centre);
            (cos * rx + sin * ry + centre, -sin * rx + cos * ry + centre)
        });
        let flow = dense_flow(&first, &second, &LucasKanadeConfig::default()).unwrap();
        let error = median_error(&flow, 12, |x, y| {
            let (rx, ry) = (x - centre, y - centre);
            (cos * rx - sin * ry - rx, sin * rx + cos * ry - ry)
        });
        println!("rotation 2°: median end-point error {error:.4} px");
        assert!(error < 0.5, "median error {error}");
    }

    #[test]
    fn amplitude_is_zero_when_still_and_grows_with_speed() {
        let texture = Texture::new(7);
        let size = 96;
        let clip = |speed: f32| {
            let frames: Vec<Plane> = (0..4)
                .map(|f| {
                    let shift = speed * f as f32;
                    texture.render(size, |x, y| (x - shift, y - 0.5 * shift))
                })
                .collect();
            as_image(&frames)
        };
        let config = LucasKanadeConfig::default();
        let still = estimate_motion(&clip(0.0), FlowMethod::LucasKanade, &config).unwrap();
        println!("still clip: m = {:.4}", still.amplitude);
        assert!(still.amplitude < 0.05, "{}", still.amplitude);
        let mut previous = still.amplitude;
        for speed in [0.5f32, 1.5, 3.0] {
            let field = estimate_motion(&clip(speed), FlowMethod::LucasKanade, &config).unwrap();
            // Every pixel moves by speed·(1, 0.5): m is that length over κ·96.
            let expected = speed * 1.25f32.sqrt() / (AMPLITUDE_KAPPA * size as f32);
            println!(
                "speed {speed} px/frame: m = {:.4} (exact {expected:.4})",
                field.amplitude
            );
            assert!((field.amplitude - expected).abs() < 0.1 * expected);
            assert!(
                field.amplitude > previous,
                "speed {speed}: m = {}",
                field.amplitude
            );
            previous = field.amplitude;
        }
    }

    #[test]
    fn field_and_preview_have_the_contract_shapes() {
        let texture = Texture::new(11);
        let frames: Vec<Plane> = (0..3)
            .map(|f| texture.render(32, |x, y| (x - f as f32, y)))
            .collect();
        let field = estimate_motion(
            &as_image(&frames).narrow(1, 0, 24).unwrap(),
            FlowMethod::LucasKanade,
            &LucasKanadeConfig::default(),
        )
        .unwrap();
        assert_eq!(field.flow.dims(), &[2, 2, 24, 32]);
        assert_eq!(field.magnitude.dims(), &[2, 24, 32]);
        let preview = flow_preview(&field).unwrap();
        assert_eq!(preview.dims(), &[2, 24, 32, 3]);
        let values = preview.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| (0.0..=1.0).contains(v)));
        // Rightwards motion is red: the brightest channel of the centre pixel is R.
        let centre = (12 * 32 + 16) * 3;
        assert!(values[centre] > 0.5 && values[centre] > 2.0 * values[centre + 2]);
    }

    #[test]
    fn a_single_frame_is_refused() {
        let one = Tensor::zeros((1, 8, 8, 3), DType::F32, &Device::Cpu).unwrap();
        let err = estimate_motion(&one, FlowMethod::LucasKanade, &LucasKanadeConfig::default())
            .unwrap_err();
        assert!(matches!(err, MotionError::TooFewFrames(1)), "{err}");
        assert!(FlowMethod::from_str("farneback").is_err());
        assert!(Plane::new(2, 2, vec![0.0; 3]).is_err());
        let (small, large) = (
            Plane::new(2, 2, vec![0.0; 4]).unwrap(),
            Plane::new(3, 2, vec![0.0; 6]).unwrap(),
        );
        let config = LucasKanadeConfig::default();
        assert!(dense_flow(&small, &large, &config).is_err());
    }

    #[test]
    fn levels_are_clamped_to_the_image_size() {
        assert_eq!(effective_levels(4, 512, 512), 4);
        assert_eq!(effective_levels(4, 64, 96), 3);
        assert_eq!(effective_levels(4, 20, 20), 1);
        assert_eq!(effective_levels(0, 512, 512), 1);
    }

    fn sample_field() -> MotionField {
        let flow = Tensor::randn(0f32, 2.0, (3, 2, 5, 7), &Device::Cpu).unwrap();
        let magnitude = flow.sqr().unwrap().sum(1).unwrap().sqrt().unwrap();
        MotionField {
            flow,
            magnitude,
            amplitude: 0.375,
        }
    }

    fn bits(t: &Tensor) -> Vec<u32> {
        t.flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits())
            .collect()
    }

    #[test]
    fn motion_files_round_trip_bit_exact() {
        let dir = TempDir::new("motion");
        let field = sample_field();
        let path = save_motion(&field, &dir.0, "motion/clip").unwrap();
        assert_eq!(path, dir.0.join("motion").join("clip_00001_.safetensors"));
        let loaded = load_motion(&path).unwrap();
        assert_eq!(loaded.flow.dims(), field.flow.dims());
        assert_eq!(bits(&loaded.flow), bits(&field.flow));
        assert_eq!(bits(&loaded.magnitude), bits(&field.magnitude));
        assert_eq!(loaded.amplitude.to_bits(), field.amplitude.to_bits());
        let second = save_motion(&field, &dir.0, "motion/clip").unwrap();
        assert_eq!(second.file_name().unwrap(), "clip_00002_.safetensors");
    }

    fn write_file(path: &Path, tensors: &[(&str, Vec<usize>)]) {
        let buffers: Vec<Vec<u8>> = tensors
            .iter()
            .map(|(_, shape)| vec![0u8; 4 * shape.iter().product::<usize>()])
            .collect();
        let views: Vec<(&str, TensorView)> = tensors
            .iter()
            .zip(&buffers)
            .map(|((name, shape), data)| {
                (
                    *name,
                    TensorView::new(Dtype::F32, shape.clone(), data).unwrap(),
                )
            })
            .collect();
        fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
    }

    #[test]
    fn bad_motion_files_give_clear_errors() {
        let dir = TempDir::new("bad-motion");
        let load_err = |name: &str, tensors: &[(&str, Vec<usize>)]| {
            let path = dir.0.join(name);
            write_file(&path, tensors);
            let err = load_motion(&path).unwrap_err().to_string();
            assert!(err.contains(name), "{err}");
            err
        };
        let err = load_err(
            "no_flow.safetensors",
            &[("magnitude", vec![1, 4, 4]), ("amplitude", vec![1])],
        );
        assert!(err.contains("no `flow` tensor"), "{err}");
        let err = load_err(
            "rank.safetensors",
            &[
                ("flow", vec![2, 4, 4]),
                ("magnitude", vec![1, 4, 4]),
                ("amplitude", vec![1]),
            ],
        );
        assert!(err.contains("(frames−1, 2, height, width)"), "{err}");
        let err = load_err(
            "sizes.safetensors",
            &[
                ("flow", vec![2, 2, 4, 4]),
                ("magnitude", vec![2, 4, 5]),
                ("amplitude", vec![1]),
            ],
        );
        assert!(err.contains("`magnitude` has shape [2, 4, 5]"), "{err}");
        let err = load_err(
            "amplitude.safetensors",
            &[
                ("flow", vec![1, 2, 4, 4]),
                ("magnitude", vec![1, 4, 4]),
                ("amplitude", vec![2]),
            ],
        );
        assert!(err.contains("`amplitude` must have shape [1]"), "{err}");

        let garbage = dir.0.join("garbage.safetensors");
        fs::write(&garbage, b"not a tensor file").unwrap();
        let err = load_motion(&garbage).unwrap_err().to_string();
        assert!(
            err.contains("garbage.safetensors") && err.contains("safetensors"),
            "{err}"
        );
        let missing = load_motion(&dir.0.join("missing.safetensors")).unwrap_err();
        assert!(
            missing.to_string().contains("missing.safetensors"),
            "{missing}"
        );
    }
}
