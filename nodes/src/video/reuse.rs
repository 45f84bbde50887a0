//! Denoising reuse (Dr. Mo, Wang et al.; METHODS.md §4): the early, coarse steps of
//! neighbouring frames are nearly the same up to motion, so they are propagated from key frames
//! instead of recomputed; the later, fine steps are denoised for every frame jointly.
//!
//! [`DenoisingReuse`] is a [`FrameStrategy`] of the sampling loop. Key frames (0, s, 2s, …)
//! run the full schedule. Every other frame i follows its key frame k = ⌊i/s⌋·s until its
//! switch step: after each step its latent is rebuilt from the key frame's denoised
//! prediction x̂₀ₖ, propagated to frame i and diffused to the step's target noise level with
//! frame i's own initial noise εᵢ,
//!
//! ```text
//! xᵢ(t_prev) = add_noise(Pₖ→ᵢ(x̂₀ₖ), εᵢ, t_prev)
//! ```
//!
//! where Pₖ→ᵢ is the identity (copy + re-noise, the training-free default for generation) or a
//! backward warp along the clip's optical flow (editing, where a source video gives the
//! motion). From its switch step on, frame i is denoised with the others; the model is only
//! called on the frames that need it (the loop gathers them and passes their clip positions),
//! so the saving is real compute.
//!
//! The switch step is the training-free step selector of the paper: a fixed share
//! `reuse_until` of each loop's schedule, or (adaptive) the first step where the consistency
//! between key frames, measured as normalised mutual information ([`nmi`]), falls below a
//! threshold, with `reuse_until` as the latest switch.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};

use crate::models::call::SamplingStep;
use crate::sampling::{
    gather_frames, write_back_frames, FrameSelection, FrameStrategy, FrameUpdate, LoopSteps,
};
use crate::schedulers::Timestep;

/// Pixels per latent pixel: SD's VAE downsamples by 8, so a MOTION of the frames has 8× the
/// latents' height and width.
pub const LATENT_SCALE: usize = 8;
/// Bins of each variable's histogram in [`nmi`] (METHODS.md §4).
pub const NMI_BINS: usize = 64;

/// How each frame's switch step is chosen.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ReuseMode {
    /// Every non-key frame switches once a share `reuse_until` of the loop's steps is done.
    Fixed,
    /// A frame switches at the first step where the consistency NMI of its key frames falls
    /// below `nmi_threshold`, and at the `reuse_until` share at the latest.
    Adaptive { nmi_threshold: f64 },
}

impl ReuseMode {
    /// The mode names a node's combo input lists.
    pub const NAMES: [&'static str; 2] = ["fixed", "adaptive"];
}

/// How a key frame's prediction is carried to the frames that follow it.
#[derive(Debug, Clone)]
pub enum Propagation {
    /// The identity: every frame takes its key frame's prediction, re-noised with its own
    /// noise.
    Copy,
    /// A backward warp along the forward flow between consecutive frames at the latents'
    /// resolution: (F−1, 2, h, w), in latent pixels, x then y; a point at p in frame f is at
    /// p + flow[f](p) in frame f + 1. See [`Propagation::flow_from_motion`].
    Flow(Tensor),
}

impl Propagation {
    /// The propagation names a node's combo input lists.
    pub const NAMES: [&'static str; 2] = ["copy", "flow"];

    /// Flow propagation from a MOTION's pixel flow (F−1, 2, H, W) for latents of `frames`
    /// frames of `height`×`width`: H×W must be [`LATENT_SCALE`]× the latents' size; the flow is
    /// average-pooled over each latent pixel's 8×8 pixels and divided by 8 (pixels to latent
    /// pixels).
    pub fn flow_from_motion(
        pixel_flow: &Tensor,
        frames: usize,
        height: usize,
        width: usize,
    ) -> std::result::Result<Self, String> {
        let dims = pixel_flow.dims();
        let &[pairs, channels, pixel_height, pixel_width] = dims else {
            return Err(format!(
                "the flow must be (frames−1, 2, height, width), got shape {dims:?}"
            ));
        };
        if channels != 2 {
            return Err(format!(
                "the flow must be (frames−1, 2, height, width), got shape {dims:?}"
            ));
        }
        if pairs + 1 != frames {
            return Err(format!(
                "the motion is of {} frames, the latents have {frames}",
                pairs + 1
            ));
        }
        let expected = (height * LATENT_SCALE, width * LATENT_SCALE);
        if (pixel_height, pixel_width) != expected {
            return Err(format!(
                "the motion is {pixel_width}×{pixel_height} pixels, latents of {width}×{height} \
                 need {}×{} ({LATENT_SCALE}× the latent size)",
                expected.1, expected.0
            ));
        }
        let pooled = || -> Result<Tensor> {
            let scale = LATENT_SCALE as f64;
            pixel_flow
                .to_dtype(DType::F32)?
                .avg_pool2d(LATENT_SCALE)?
                .affine(1.0 / scale, 0.0)
        };
        pooled().map(Propagation::Flow).map_err(|e| e.to_string())
    }
}

/// Denoising reuse settings, with the paper's training-free defaults.
#[derive(Debug, Clone)]
pub struct ReuseConfig {
    /// Every `key_stride`-th frame (0, s, 2s, …) is a key frame and runs the full schedule.
    pub key_stride: usize,
    /// The share of each loop's steps during which non-key frames are propagated (fixed mode),
    /// or the latest switch (adaptive mode); 0 turns reuse off.
    pub reuse_until: f64,
    pub mode: ReuseMode,
    pub propagation: Propagation,
}

impl Default for ReuseConfig {
    fn default() -> Self {
        Self {
            key_stride: 4,
            reuse_until: 0.4,
            mode: ReuseMode::Fixed,
            propagation: Propagation::Copy,
        }
    }
}

impl ReuseConfig {
    /// Checks the settings for a clip of `frames` frames.
    pub fn validate(&self, frames: usize) -> std::result::Result<(), String> {
        if self.key_stride == 0 {
            return Err("the key stride must be at least 1".into());
        }
        if self.key_stride > frames {
            return Err(format!(
                "the key stride {} is larger than the clip's {frames} frames",
                self.key_stride
            ));
        }
        if !(0.0..=1.0).contains(&self.reuse_until) {
            return Err(format!(
                "reuse_until must be in [0, 1], got {}",
                self.reuse_until
            ));
        }
        if let ReuseMode::Adaptive { nmi_threshold } = self.mode {
            if !(0.0..=1.0).contains(&nmi_threshold) {
                return Err(format!(
                    "the NMI threshold must be in [0, 1], got {nmi_threshold}"
                ));
            }
            if self.key_frames(frames).len() < 2 && self.key_stride > 1 {
                return Err(format!(
                    "adaptive reuse measures the consistency between consecutive key frames: a \
                     key stride of {} leaves one key frame in {frames} frames (use a smaller \
                     stride or the fixed mode)",
                    self.key_stride
                ));
            }
        }
        if let Propagation::Flow(flow) = &self.propagation {
            match flow.dims() {
                &[pairs, 2, _, _] if pairs + 1 == frames => {}
                dims => {
                    return Err(format!(
                        "the flow must be (frames−1 = {}, 2, height, width), got shape {dims:?}",
                        frames.saturating_sub(1)
                    ))
                }
            }
        }
        Ok(())
    }

    /// The key frames of a clip of `frames` frames: 0, s, 2s, …, ⌈F/s⌉ of them.
    pub fn key_frames(&self, frames: usize) -> Vec<usize> {
        (0..frames).step_by(self.key_stride.max(1)).collect()
    }

    /// The key frame that `frame` follows: the preceding key frame ⌊i/s⌋·s (itself for a key
    /// frame).
    pub fn key_frame_of(&self, frame: usize) -> usize {
        let stride = self.key_stride.max(1);
        frame / stride * stride
    }

    /// Steps of a loop of `loop_len` steps at which non-key frames are propagated in fixed mode:
    /// those whose share of the loop done, (step − first) / len, is below `reuse_until`, that
    /// is ⌈reuse_until · len⌉.
    pub fn reuse_steps(&self, loop_len: usize) -> usize {
        ((self.reuse_until * loop_len as f64).ceil() as usize).min(loop_len)
    }
}

/// Normalised mutual information of `a` and `b`, each flattened (same element count):
/// `2·I(a; b) / (H(a) + H(b))` from a joint histogram of [`NMI_BINS`] bins per variable, each
/// spanning its own min..max. 1 for identical inputs (and when both are constant), near 0 for
/// independent ones. The plug-in estimate is biased upwards on few values: for n well above
/// bins² by about `(bins−1)² / (2n)` nats of mutual information (0.02 for independent noise
/// over 64×64×4 values), much more below that (0.3 over 12×16×4).
pub fn nmi(a: &Tensor, b: &Tensor) -> Result<f64> {
    let values = |t: &Tensor| -> Result<Vec<f32>> {
        t.to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()
    };
    let (a, b) = (values(a)?, values(b)?);
    if a.len() != b.len() {
        candle_core::bail!("NMI of {} and {} values", a.len(), b.len());
    }
    if a.is_empty() {
        candle_core::bail!("NMI of no values");
    }
    let (a_bins, b_bins) = (bin_indices(&a)?, bin_indices(&b)?);
    let mut joint = vec![0u32; NMI_BINS * NMI_BINS];
    for (&i, &j) in a_bins.iter().zip(&b_bins) {
        joint[i * NMI_BINS + j] += 1;
    }
    let mut a_counts = vec![0u32; NMI_BINS];
    let mut b_counts = vec![0u32; NMI_BINS];
    for i in 0..NMI_BINS {
        for j in 0..NMI_BINS {
            a_counts[i] += joint[i * NMI_BINS + j];
            b_counts[j] += joint[i * NMI_BINS + j];
        }
    }
    let n = a.len() as f64;
    let entropy = |counts: &[u32]| -> f64 {
        counts
            .iter()
            .filter(|&&c| c > 0)
            .map(|&c| {
                let p = f64::from(c) / n;
                -p * p.ln()
            })
            .sum()
    };
    let (h_a, h_b, h_ab) = (entropy(&a_counts), entropy(&b_counts), entropy(&joint));
    if h_a + h_b <= 0.0 {
        return Ok(1.0);
    }
    let mutual = h_a + h_b - h_ab;
    Ok((2.0 * mutual / (h_a + h_b)).clamp(0.0, 1.0))
}

/// The histogram bin of each value: [`NMI_BINS`] equal bins over min..max, all in bin 0 when
/// the values are constant.
fn bin_indices(values: &[f32]) -> Result<Vec<usize>> {
    let (min, max) = values
        .iter()
        .fold((f32::INFINITY, f32::NEG_INFINITY), |(lo, hi), &v| {
            (lo.min(v), hi.max(v))
        });
    if !min.is_finite() || !max.is_finite() || values.iter().any(|v| v.is_nan()) {
        candle_core::bail!("NMI of values that are not all finite");
    }
    let range = f64::from(max) - f64::from(min);
    if range <= 0.0 {
        return Ok(vec![0; values.len()]);
    }
    let scale = NMI_BINS as f64 / range;
    Ok(values
        .iter()
        .map(|&v| (((f64::from(v) - f64::from(min)) * scale) as usize).min(NMI_BINS - 1))
        .collect())
}

/// A backward warp of latent frames: output pixel q takes the input at q − F(q), bilinear,
/// positions outside clamped to the border. Kept as four gathers with their weights, so it
/// runs on the latents' device.
#[derive(Debug, Clone)]
struct Warp {
    /// For each corner of the bilinear cell: the source pixel of every output pixel (h·w,
    /// u32) and its weight (h·w, f32).
    corners: [(Tensor, Tensor); 4],
}

impl Warp {
    /// The warp by the displacement `flow` (x then y planes of `height`×`width`).
    fn new(flow: &FlowPlanes, device: &Device) -> Result<Self> {
        let (height, width) = (flow.height, flow.width);
        let pixels = height * width;
        let mut indices = [
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
        ];
        let mut weights = [
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
            Vec::with_capacity(pixels),
        ];
        for y in 0..height {
            for x in 0..width {
                let i = y * width + x;
                let source_x = (x as f32 - flow.x[i]).clamp(0.0, (width - 1) as f32);
                let source_y = (y as f32 - flow.y[i]).clamp(0.0, (height - 1) as f32);
                let (x0, y0) = (source_x.floor() as usize, source_y.floor() as usize);
                let (x1, y1) = ((x0 + 1).min(width - 1), (y0 + 1).min(height - 1));
                let (fx, fy) = (source_x - x0 as f32, source_y - y0 as f32);
                let cell = [
                    (y0 * width + x0, (1.0 - fx) * (1.0 - fy)),
                    (y0 * width + x1, fx * (1.0 - fy)),
                    (y1 * width + x0, (1.0 - fx) * fy),
                    (y1 * width + x1, fx * fy),
                ];
                for (corner, (index, weight)) in cell.into_iter().enumerate() {
                    indices[corner].push(index as u32);
                    weights[corner].push(weight);
                }
            }
        }
        let [c0, c1, c2, c3] = [0, 1, 2, 3].map(|k| {
            let index = Tensor::from_vec(std::mem::take(&mut indices[k]), pixels, device)?;
            let weight = Tensor::from_vec(std::mem::take(&mut weights[k]), pixels, device)?;
            Ok::<_, candle_core::Error>((index, weight))
        });
        Ok(Self {
            corners: [c0?, c1?, c2?, c3?],
        })
    }

    /// `frames` (B, C, n, h, w) warped.
    fn apply(&self, frames: &Tensor) -> Result<Tensor> {
        let (batch, channels, count, height, width) = frames.dims5()?;
        let flat = frames.reshape((batch, channels, count, height * width))?;
        let mut warped: Option<Tensor> = None;
        for (index, weight) in &self.corners {
            let term = flat
                .index_select(index, 3)?
                .broadcast_mul(&weight.to_dtype(frames.dtype())?)?;
            warped = Some(match warped {
                None => term,
                Some(sum) => (sum + term)?,
            });
        }
        match warped {
            Some(warped) => warped.reshape((batch, channels, count, height, width)),
            None => candle_core::bail!("a warp without corners"),
        }
    }
}

/// A displacement field at latent resolution, x and y planes, row-major.
#[derive(Debug, Clone)]
struct FlowPlanes {
    height: usize,
    width: usize,
    x: Vec<f32>,
    y: Vec<f32>,
}

impl FlowPlanes {
    fn zeros(height: usize, width: usize) -> Self {
        Self {
            height,
            width,
            x: vec![0.0; height * width],
            y: vec![0.0; height * width],
        }
    }

    /// Bilinear sample of both planes at (x, y), positions outside clamped to the border.
    fn sample(&self, x: f32, y: f32) -> (f32, f32) {
        let x = x.clamp(0.0, (self.width - 1) as f32);
        let y = y.clamp(0.0, (self.height - 1) as f32);
        let (x0, y0) = (x.floor() as usize, y.floor() as usize);
        let (x1, y1) = ((x0 + 1).min(self.width - 1), (y0 + 1).min(self.height - 1));
        let (fx, fy) = (x - x0 as f32, y - y0 as f32);
        let at = |plane: &[f32]| {
            let top = plane[y0 * self.width + x0] * (1.0 - fx) + plane[y0 * self.width + x1] * fx;
            let bottom =
                plane[y1 * self.width + x0] * (1.0 - fx) + plane[y1 * self.width + x1] * fx;
            top * (1.0 - fy) + bottom * fy
        };
        (at(&self.x), at(&self.y))
    }

    /// This accumulated flow F_{k→j} followed by the next frame's flow f_j:
    /// F_{k→j+1}(p) = F_{k→j}(p) + f_j(p + F_{k→j}(p)).
    fn then(&self, next: &FlowPlanes) -> FlowPlanes {
        let mut out = FlowPlanes::zeros(self.height, self.width);
        for y in 0..self.height {
            for x in 0..self.width {
                let i = y * self.width + x;
                let (dx, dy) = (self.x[i], self.y[i]);
                let (nx, ny) = next.sample(x as f32 + dx, y as f32 + dy);
                out.x[i] = dx + nx;
                out.y[i] = dy + ny;
            }
        }
        out
    }
}

/// For every frame j > 0, the warp from the key frame before it (⌊j/s⌋·s for a non-key frame,
/// j − s for a key frame) to j, along the accumulated flow.
fn warps_from_key_frames(
    flow: &Tensor,
    key_stride: usize,
    device: &Device,
) -> Result<Vec<Option<Warp>>> {
    let (pairs, _, height, width) = flow.dims4()?;
    let values = flow
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let plane = height * width;
    let steps: Vec<FlowPlanes> = (0..pairs)
        .map(|f| FlowPlanes {
            height,
            width,
            x: values[2 * f * plane..(2 * f + 1) * plane].to_vec(),
            y: values[(2 * f + 1) * plane..(2 * f + 2) * plane].to_vec(),
        })
        .collect();
    let frames = pairs + 1;
    let mut warps: Vec<Option<Warp>> = vec![None; frames];
    for key in (0..frames).step_by(key_stride.max(1)) {
        let mut accumulated = FlowPlanes::zeros(height, width);
        for target in key + 1..=(key + key_stride).min(frames - 1) {
            accumulated = accumulated.then(&steps[target - 1]);
            warps[target] = Some(Warp::new(&accumulated, device)?);
        }
    }
    Ok(warps)
}

/// Denoising reuse as a frame strategy of one sampling run (see the module documentation).
///
/// ```text
/// let mut reuse = DenoisingReuse::new(config, &noise)?;
/// let output = Sampler::new(&unet, &scheduler)
///     .with_strategy(&mut reuse)
///     .sample(&settings, &inputs)?;
/// let curve = reuse.nmi_curve(); // adaptive mode: one value per step
/// ```
#[derive(Debug)]
pub struct DenoisingReuse {
    config: ReuseConfig,
    /// The run's initial noise (B, C, F, h, w): frame i is re-noised with its own εᵢ.
    noise: Tensor,
    frames: usize,
    /// With flow propagation, the warp into each frame from the key frame before it.
    warps: Vec<Option<Warp>>,
    /// The loop being run, as the sampler announced it.
    current_loop: Option<LoopSteps>,
    /// Frames that have switched to denoising in the current loop (key frames always have).
    switched: Vec<bool>,
    /// Adaptive mode: the mean consistency NMI over key-frame segments at each step.
    nmi_curve: Vec<f64>,
}

impl DenoisingReuse {
    /// Reuse with `config` for a run whose initial noise is `noise` (B, C, F, h, w), the shape
    /// of the latents.
    pub fn new(config: ReuseConfig, noise: &Tensor) -> Result<Self> {
        let (_, _, frames, height, width) = noise.dims5()?;
        config.validate(frames).map_err(candle_core::Error::Msg)?;
        let warps = match &config.propagation {
            Propagation::Copy => Vec::new(),
            Propagation::Flow(flow) => {
                let (_, _, flow_height, flow_width) = flow.dims4()?;
                if (flow_height, flow_width) != (height, width) {
                    candle_core::bail!(
                        "a flow of {flow_width}×{flow_height} for latents of {width}×{height}"
                    );
                }
                warps_from_key_frames(flow, config.key_stride, noise.device())?
            }
        };
        let switched = Self::key_frame_mask(&config, frames);
        Ok(Self {
            config,
            noise: noise.clone(),
            frames,
            warps,
            current_loop: None,
            switched,
            nmi_curve: Vec::new(),
        })
    }

    pub fn config(&self) -> &ReuseConfig {
        &self.config
    }

    /// Adaptive mode: the mean over key-frame segments of the consistency NMI, one value per
    /// step of the run (FreeInit passes one after the other); empty in fixed mode.
    pub fn nmi_curve(&self) -> &[f64] {
        &self.nmi_curve
    }

    fn key_frame_mask(config: &ReuseConfig, frames: usize) -> Vec<bool> {
        (0..frames)
            .map(|frame| config.key_frame_of(frame) == frame)
            .collect()
    }

    /// Whether `step` still lies in the loop's reuse phase (the share of the loop done is
    /// below `reuse_until`).
    fn in_reuse_phase(&self, step: &SamplingStep) -> bool {
        let current = self.current_loop.unwrap_or(LoopSteps {
            first: 0,
            len: step.count,
        });
        let done = step.index.saturating_sub(current.first);
        done < self.config.reuse_steps(current.len)
    }

    /// The key frame's prediction `x0` (B, C, 1, h, w) carried to `frame`.
    fn propagate(&self, x0: &Tensor, frame: usize) -> Result<Tensor> {
        match (&self.config.propagation, self.warps.get(frame)) {
            (Propagation::Copy, _) => Ok(x0.clone()),
            (Propagation::Flow(_), Some(Some(warp))) => warp.apply(x0),
            (Propagation::Flow(_), _) => {
                candle_core::bail!("no flow into frame {frame} from its key frame")
            }
        }
    }

    /// The consistency NMI of each key-frame segment [k, k+s]: the key frame k's prediction
    /// carried to k+s against key frame k+s's own.
    fn segment_consistency(
        &self,
        denoised: &Tensor,
        position: &HashMap<usize, usize>,
    ) -> Result<Vec<f64>> {
        let keys = self.config.key_frames(self.frames);
        let prediction = |frame: usize| -> Result<Tensor> {
            match position.get(&frame) {
                Some(&i) => denoised.narrow(2, i, 1),
                None => candle_core::bail!("key frame {frame} was not evaluated"),
            }
        };
        keys.windows(2)
            .map(|pair| {
                let carried = self.propagate(&prediction(pair[0])?, pair[1])?;
                nmi(&carried, &prediction(pair[1])?)
            })
            .collect()
    }

    /// Adaptive mode: records this step's consistency and switches the frames whose segment
    /// fell below the threshold.
    fn select_by_consistency(&mut self, update: &FrameUpdate<'_>, threshold: f64) -> Result<()> {
        let position: HashMap<usize, usize> = match update.frames {
            Some(frames) => frames.iter().enumerate().map(|(i, &f)| (f, i)).collect(),
            None => (0..self.frames).map(|f| (f, f)).collect(),
        };
        let segments = self.segment_consistency(update.denoised, &position)?;
        if segments.is_empty() {
            // Every frame is a key frame: nothing to switch.
            self.nmi_curve.push(1.0);
            return Ok(());
        }
        self.nmi_curve
            .push(segments.iter().sum::<f64>() / segments.len() as f64);
        let stride = self.config.key_stride;
        for frame in 0..self.frames {
            // Frames after the last key frame use the last segment's consistency.
            let segment = (frame / stride).min(segments.len() - 1);
            if segments[segment] < threshold {
                self.switched[frame] = true;
            }
        }
        Ok(())
    }
}

impl FrameStrategy for DenoisingReuse {
    fn begin(&mut self, loop_steps: LoopSteps) {
        self.current_loop = Some(loop_steps);
        self.switched = Self::key_frame_mask(&self.config, self.frames);
    }

    fn frames_to_evaluate(
        &mut self,
        step: &SamplingStep,
        latents: &Tensor,
    ) -> Result<FrameSelection> {
        if latents.dims() != self.noise.dims() {
            candle_core::bail!(
                "denoising reuse was set up for latents of shape {:?}, got {:?}",
                self.noise.dims(),
                latents.dims()
            );
        }
        if !self.in_reuse_phase(step) {
            return Ok(FrameSelection::All);
        }
        let active: Vec<usize> = match self.config.mode {
            ReuseMode::Fixed => self.config.key_frames(self.frames),
            ReuseMode::Adaptive { .. } => (0..self.frames).filter(|&f| self.switched[f]).collect(),
        };
        // Every frame active is the plain step, bit for bit: no gathering.
        if active.len() == self.frames {
            Ok(FrameSelection::All)
        } else {
            Ok(FrameSelection::Frames(active))
        }
    }

    fn complete(&mut self, update: &FrameUpdate<'_>) -> Result<Tensor> {
        if let ReuseMode::Adaptive { nmi_threshold } = self.config.mode {
            self.select_by_consistency(update, nmi_threshold)?;
        }
        let Some(evaluated) = update.frames else {
            return Ok(update.evaluated_after.clone());
        };
        let stepped = update.keep_skipped_frames()?;
        let reused: Vec<usize> = (0..self.frames)
            .filter(|f| !evaluated.contains(f))
            .collect();
        if reused.is_empty() {
            return Ok(stepped);
        }
        let position: HashMap<usize, usize> =
            evaluated.iter().enumerate().map(|(i, &f)| (f, i)).collect();
        let carried = reused
            .iter()
            .map(|&frame| {
                let key = self.config.key_frame_of(frame);
                let Some(&i) = position.get(&key) else {
                    candle_core::bail!("key frame {key} of frame {frame} was not evaluated");
                };
                self.propagate(&update.denoised.narrow(2, i, 1)?, frame)
            })
            .collect::<Result<Vec<_>>>()?;
        let carried = Tensor::cat(&carried, 2)?;
        let renoised = match update.prev_timestep {
            Timestep::At(t) => {
                let noise = gather_frames(&self.noise, &reused)?.to_dtype(carried.dtype())?;
                update.scheduler.add_noise(&carried, &noise, t)?
            }
            // Past the last step the latents are the clean prediction itself.
            Timestep::Final => carried,
        };
        write_back_frames(&stepped, &reused, &renoised)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::sampling::{
        NoisePredictor, PredictRequest, SampleInputs, SampleSettings, Sampler, StepReport,
        TextConditioning,
    };
    use crate::schedulers::{DdimScheduler, DdimSchedulerConfig, Scheduler};
    use crate::test_util::max_abs_diff;
    use crate::video::freeinit::{sample_with_freeinit, FreeInitConfig};

    /// A predictor whose output depends on every frame and on the frame positions, recording
    /// the frames (positions) of each call and its batch.
    #[derive(Default)]
    struct Mixing {
        calls: RefCell<Vec<(Option<Vec<usize>>, usize)>>,
    }

    impl NoisePredictor for Mixing {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            let latents = request.latents;
            let (batch, _, frames, _, _) = latents.dims5()?;
            self.calls
                .borrow_mut()
                .push((request.frame_positions.map(<[usize]>::to_vec), batch));
            let positions: Vec<f32> = match request.frame_positions {
                Some(p) => p.iter().map(|&p| p as f32).collect(),
                None => (0..frames).map(|p| p as f32).collect(),
            };
            let positions = Tensor::from_vec(positions, (1, 1, frames, 1, 1), latents.device())?;
            let per_frame = latents.sin()?.broadcast_mul(&((positions * 0.1)? + 1.0)?)?;
            per_frame.broadcast_add(&(latents.mean_keepdim(2)? * 0.3)?)
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    /// ε = 0 everywhere: DDIM's x₀ is then the latents divided by √ᾱ.
    struct Zero;
    impl NoisePredictor for Zero {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            request.latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    struct Case {
        noise: Tensor,
        text: Tensor,
        scheduler: DdimScheduler,
    }

    impl Case {
        fn new(shape: (usize, usize, usize, usize, usize)) -> Result<Self> {
            Ok(Self {
                noise: Tensor::randn(0f32, 1.0, shape, &Device::Cpu)?,
                text: Tensor::randn(0f32, 1.0, (shape.0, 2, 3), &Device::Cpu)?,
                scheduler: DdimScheduler::new(DdimSchedulerConfig::sd15())?,
            })
        }

        fn inputs(&self) -> SampleInputs<'_> {
            SampleInputs {
                noise: &self.noise,
                init_latents: None,
                text: TextConditioning {
                    positive: &self.text,
                    negative: &self.text,
                },
            }
        }
    }

    fn settings(steps: usize, guidance_scale: f64) -> SampleSettings {
        SampleSettings {
            steps,
            guidance_scale,
            strength: 1.0,
        }
    }

    fn config(key_stride: usize, reuse_until: f64, mode: ReuseMode) -> ReuseConfig {
        ReuseConfig {
            key_stride,
            reuse_until,
            mode,
            propagation: Propagation::Copy,
        }
    }

    /// A flow of `frames` frames at latent resolution moving every pixel by (dx, dy) per frame.
    fn uniform_flow(frames: usize, height: usize, width: usize, dx: f32, dy: f32) -> Tensor {
        let plane = height * width;
        let values: Vec<f32> = (0..frames - 1)
            .flat_map(|_| std::iter::repeat_n(dx, plane).chain(std::iter::repeat_n(dy, plane)))
            .collect();
        Tensor::from_vec(values, (frames - 1, 2, height, width), &Device::Cpu).unwrap()
    }

    #[test]
    fn nmi_of_identical_frames_is_one_and_of_independent_noise_is_near_zero() -> Result<()> {
        let a = Tensor::randn(0f32, 1.0, (1, 4, 1, 128, 128), &Device::Cpu)?;
        let b = Tensor::randn(0f32, 1.0, (1, 4, 1, 128, 128), &Device::Cpu)?;
        let same = nmi(&a, &a)?;
        assert!((same - 1.0).abs() < 1e-12, "{same}");
        let independent = nmi(&a, &b)?;
        println!(
            "NMI of independent noise over {} values: {independent:.4}",
            a.elem_count()
        );
        assert!(independent < 0.05, "{independent}");
        // Related but not identical: in between.
        let mixed = nmi(&a, &((&a * 0.8)? + (&b * 0.6)?)?)?;
        assert!(mixed > independent && mixed < 1.0, "{mixed}");
        let constant = Tensor::ones((2, 3), DType::F32, &Device::Cpu)?;
        assert_eq!(nmi(&constant, &constant)?, 1.0);
        assert!(nmi(&a, &b.narrow(4, 0, 64)?).is_err());
        Ok(())
    }

    #[test]
    fn key_frames_are_every_strides_frame_and_others_follow_the_preceding_one() {
        let reuse = config(4, 0.4, ReuseMode::Fixed);
        assert_eq!(reuse.key_frames(10), [0, 4, 8]);
        assert_eq!(reuse.key_frames(8), [0, 4]);
        let keys: Vec<usize> = (0..10).map(|f| reuse.key_frame_of(f)).collect();
        assert_eq!(keys, [0, 0, 0, 0, 4, 4, 4, 4, 8, 8]);
        // ⌈reuse_until · N⌉ steps of each loop.
        assert_eq!(reuse.reuse_steps(5), 2);
        assert_eq!(reuse.reuse_steps(4), 2);
        assert_eq!(config(4, 0.5, ReuseMode::Fixed).reuse_steps(5), 3);
        assert_eq!(config(4, 0.0, ReuseMode::Fixed).reuse_steps(5), 0);
        assert_eq!(config(4, 1.0, ReuseMode::Fixed).reuse_steps(5), 5);
    }

    #[test]
    fn frame_evaluations_follow_the_formula_and_only_key_frames_are_evaluated() -> Result<()> {
        // videos · branches · (S·K + (N−S)·F) with K = ⌈F/s⌉ key frames and S = ⌈r·N⌉.
        let (videos, frames, steps) = (2, 10, 5);
        let case = Case::new((videos, 4, frames, 2, 3))?;
        for (stride, reuse_until, guidance) in [(4, 0.5, 7.5), (4, 0.4, 1.0), (3, 0.2, 7.5)] {
            let mixing = Mixing::default();
            let cfg = config(stride, reuse_until, ReuseMode::Fixed);
            let (keys, reuse_steps) = (cfg.key_frames(frames), cfg.reuse_steps(steps));
            let mut reuse = DenoisingReuse::new(cfg, &case.noise)?;
            let output = Sampler::new(&mixing, &case.scheduler)
                .with_strategy(&mut reuse)
                .sample(&settings(steps, guidance), &case.inputs())?;
            let branches = settings(steps, guidance).guidance().branches();
            let expected =
                videos * branches * (reuse_steps * keys.len() + (steps - reuse_steps) * frames);
            assert_eq!(output.frame_evaluations, expected, "stride {stride}");
            let calls = mixing.calls.borrow();
            assert_eq!(calls.len(), steps);
            for (i, (positions, batch)) in calls.iter().enumerate() {
                assert_eq!(*batch, videos * branches);
                let expected = (i < reuse_steps).then(|| keys.clone());
                assert_eq!(positions, &expected, "step {i}");
            }
        }
        Ok(())
    }

    #[test]
    fn reuse_applies_in_every_freeinit_pass() -> Result<()> {
        let (frames, steps) = (8, 4);
        let case = Case::new((1, 4, frames, 2, 2))?;
        let mut reuse = DenoisingReuse::new(config(4, 0.5, ReuseMode::Fixed), &case.noise)?;
        let freeinit = FreeInitConfig {
            iterations: 2,
            ..FreeInitConfig::default()
        };
        let mut fresh = |_: usize| Tensor::randn(0f32, 1.0, (1, 4, frames, 2, 2), &Device::Cpu);
        let mut sampler = Sampler::new(&Zero, &case.scheduler).with_strategy(&mut reuse);
        let output = sample_with_freeinit(
            &mut sampler,
            &freeinit,
            &settings(steps, 7.5),
            &case.inputs(),
            &mut fresh,
        )?;
        // Two passes of 2 reuse steps on the 2 key frames and 2 joint steps on 8 frames, × 2
        // guidance branches.
        assert_eq!(output.frame_evaluations, 2 * 2 * (2 * 2 + 2 * 8));
        Ok(())
    }

    #[test]
    fn reuse_until_zero_is_bit_identical_to_the_plain_sampler() -> Result<()> {
        let case = Case::new((2, 4, 9, 3, 2))?;
        let flow = uniform_flow(9, 3, 2, 0.3, -0.2);
        for guidance in [1.0, 7.5] {
            let plain = Sampler::new(&Mixing::default(), &case.scheduler)
                .sample(&settings(5, guidance), &case.inputs())?;
            let modes = [ReuseMode::Fixed, ReuseMode::Adaptive { nmi_threshold: 0.5 }];
            for mode in modes {
                for propagation in [Propagation::Copy, Propagation::Flow(flow.clone())] {
                    let cfg = ReuseConfig {
                        propagation,
                        ..config(3, 0.0, mode)
                    };
                    let mut reuse = DenoisingReuse::new(cfg, &case.noise)?;
                    let mixing = Mixing::default();
                    let reused = Sampler::new(&mixing, &case.scheduler)
                        .with_strategy(&mut reuse)
                        .sample(&settings(5, guidance), &case.inputs())?;
                    assert_eq!(max_abs_diff(&plain.latents, &reused.latents), 0.0);
                    assert_eq!(plain.frame_evaluations, reused.frame_evaluations);
                    assert!(mixing.calls.borrow().iter().all(|(p, _)| p.is_none()));
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_key_stride_of_one_evaluates_every_frame() -> Result<()> {
        let case = Case::new((1, 4, 5, 2, 2))?;
        let plain = Sampler::new(&Mixing::default(), &case.scheduler)
            .sample(&settings(3, 7.5), &case.inputs())?;
        let mut reuse = DenoisingReuse::new(config(1, 1.0, ReuseMode::Fixed), &case.noise)?;
        let reused = Sampler::new(&Mixing::default(), &case.scheduler)
            .with_strategy(&mut reuse)
            .sample(&settings(3, 7.5), &case.inputs())?;
        assert_eq!(max_abs_diff(&plain.latents, &reused.latents), 0.0);
        Ok(())
    }

    #[test]
    fn copy_propagation_at_the_final_step_gives_the_key_frames_prediction() -> Result<()> {
        let case = Case::new((2, 4, 6, 3, 3))?;
        // One step, reused throughout: it goes to `Timestep::Final`.
        assert_eq!(
            case.scheduler.timesteps(1)?.steps()[0].prev_timestep,
            Timestep::Final
        );
        let mut reuse = DenoisingReuse::new(config(3, 1.0, ReuseMode::Fixed), &case.noise)?;
        let mut denoised = None;
        let mut on_step = |report: &StepReport<'_>| {
            assert_eq!(report.evaluated_frames, Some(&[0, 3][..]));
            denoised = Some(report.denoised.clone());
            Ok(())
        };
        let output = Sampler::new(&Zero, &case.scheduler)
            .with_strategy(&mut reuse)
            .on_step(&mut on_step)
            .sample(&settings(1, 1.0), &case.inputs())?;
        let denoised = denoised.expect("one step");
        for (frame, key_index) in [(1, 0), (2, 0), (4, 1), (5, 1)] {
            let got = output.latents.narrow(2, frame, 1)?;
            let key = denoised.narrow(2, key_index, 1)?;
            assert_eq!(max_abs_diff(&got, &key), 0.0, "frame {frame}");
        }
        Ok(())
    }

    #[test]
    fn reused_frames_are_the_key_prediction_renoised_with_their_own_noise() -> Result<()> {
        let case = Case::new((1, 4, 4, 2, 2))?;
        let mut reuse = DenoisingReuse::new(config(2, 0.5, ReuseMode::Fixed), &case.noise)?;
        let mut first = None;
        let mut on_step = |report: &StepReport<'_>| {
            if report.step.index == 0 {
                first = Some((report.latents.clone(), report.denoised.clone()));
            }
            Ok(())
        };
        Sampler::new(&Mixing::default(), &case.scheduler)
            .with_strategy(&mut reuse)
            .on_step(&mut on_step)
            .sample(&settings(4, 1.0), &case.inputs())?;
        let (latents, denoised) = first.expect("a first step");
        let Timestep::At(t) = case.scheduler.timesteps(4)?.steps()[0].prev_timestep else {
            panic!("the first step goes to a timestep");
        };
        // Frame 3 follows key frame 2 (index 1 among the evaluated frames).
        let expected = case.scheduler.add_noise(
            &denoised.narrow(2, 1, 1)?,
            &case.noise.narrow(2, 3, 1)?,
            t,
        )?;
        assert_eq!(max_abs_diff(&latents.narrow(2, 3, 1)?, &expected), 0.0);
        Ok(())
    }

    #[test]
    fn flow_propagation_recovers_an_integer_shift_away_from_the_borders() -> Result<()> {
        let (frames, height, width) = (5, 12, 14);
        // Content moves 1 px right and 2 px up per frame at latent resolution, given as a
        // MOTION at 8× the size.
        let pixel_flow = uniform_flow(frames, height * 8, width * 8, 8.0, -16.0);
        let propagation = Propagation::flow_from_motion(&pixel_flow, frames, height, width)
            .map_err(candle_core::Error::Msg)?;
        let Propagation::Flow(latent_flow) = &propagation else {
            panic!("flow propagation");
        };
        assert_eq!(latent_flow.dims(), [frames - 1, 2, height, width]);
        let noise = Tensor::randn(0f32, 1.0, (1, 4, frames, height, width), &Device::Cpu)?;
        let reuse = DenoisingReuse::new(
            ReuseConfig {
                propagation,
                ..config(4, 0.5, ReuseMode::Fixed)
            },
            &noise,
        )?;
        let key = Tensor::randn(0f32, 1.0, (2, 4, 1, height, width), &Device::Cpu)?;
        for (frame, (dx, dy)) in [(1, (1, -2)), (2, (2, -4)), (3, (3, -6))] {
            let warped = reuse.propagate(&key, frame)?;
            // Frame `frame` at q shows the key frame at q − (dx, dy), away from the borders.
            let (ys, xs) = (6usize, 14 - 3 - dx as usize);
            let got = warped.narrow(3, 0, ys)?.narrow(4, dx as usize, xs)?;
            let expected = key.narrow(3, (-dy) as usize, ys)?.narrow(4, 0, xs)?;
            assert!(max_abs_diff(&got, &expected) < 1e-6, "frame {frame}");
        }
        // Into key frame 4 from key frame 0: four frames of motion.
        let warped = reuse.propagate(&key, 4)?;
        let got = warped.narrow(3, 0, 4)?.narrow(4, 4, 10)?;
        let expected = key.narrow(3, 8, 4)?.narrow(4, 0, 10)?;
        assert!(max_abs_diff(&got, &expected) < 1e-6);
        Ok(())
    }

    #[test]
    fn adaptive_reuse_switches_when_consistency_falls_and_reports_it_per_step() -> Result<()> {
        // 1024 values per frame: enough that distinct frames never reach an NMI of 1.
        let (videos, frames, steps) = (1, 9, 4);
        let case = Case::new((videos, 4, frames, 16, 16))?;
        let count = |threshold: f64| -> Result<(usize, Vec<f64>)> {
            let cfg = config(
                4,
                0.75,
                ReuseMode::Adaptive {
                    nmi_threshold: threshold,
                },
            );
            let mut reuse = DenoisingReuse::new(cfg, &case.noise)?;
            let output = Sampler::new(&Mixing::default(), &case.scheduler)
                .with_strategy(&mut reuse)
                .sample(&settings(steps, 1.0), &case.inputs())?;
            Ok((output.frame_evaluations, reuse.nmi_curve().to_vec()))
        };
        // Never below 0: reused until the cap, ⌈0.75·4⌉ = 3 steps on the 3 key frames.
        let (never, curve) = count(0.0)?;
        assert_eq!(never, 3 * 3 + frames);
        assert_eq!(curve.len(), steps);
        assert!(curve.iter().all(|v| (0.0..=1.0).contains(v)), "{curve:?}");
        // Always below 1 (different noise): every frame switches after the first step.
        let (always, curve) = count(1.0)?;
        assert_eq!(always, 3 + 3 * frames);
        assert_eq!(curve.len(), steps);
        Ok(())
    }

    #[test]
    fn bad_settings_are_refused() {
        let reuse = config(4, 0.4, ReuseMode::Fixed);
        let err = reuse.validate(3).unwrap_err();
        assert!(
            err.contains("key stride 4 is larger than the clip's 3 frames"),
            "{err}"
        );
        assert!(config(0, 0.4, ReuseMode::Fixed).validate(3).is_err());
        assert!(config(2, 1.5, ReuseMode::Fixed).validate(3).is_err());
        let adaptive = |threshold| ReuseMode::Adaptive {
            nmi_threshold: threshold,
        };
        assert!(config(2, 0.4, adaptive(2.0)).validate(8).is_err());
        let err = config(8, 0.4, adaptive(0.5)).validate(8).unwrap_err();
        assert!(err.contains("one key frame"), "{err}");
        assert!(config(1, 0.4, adaptive(0.5)).validate(1).is_ok());
        // A MOTION of the wrong frame count or size.
        let pixels = uniform_flow(4, 32, 24, 1.0, 0.0);
        let err = Propagation::flow_from_motion(&pixels, 5, 4, 3).unwrap_err();
        assert!(
            err.contains("motion is of 4 frames, the latents have 5"),
            "{err}"
        );
        let err = Propagation::flow_from_motion(&pixels, 4, 4, 4).unwrap_err();
        assert!(
            err.contains("24×32 pixels, latents of 4×4 need 32×32"),
            "{err}"
        );
        assert!(Propagation::flow_from_motion(&pixels, 4, 4, 3).is_ok());
        let flow = ReuseConfig {
            propagation: Propagation::Flow(uniform_flow(3, 4, 3, 0.0, 0.0)),
            ..reuse.clone()
        };
        assert!(flow.validate(4).unwrap_err().contains("frames−1 = 3"));
        let noise = Tensor::zeros((1, 4, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(DenoisingReuse::new(flow, &noise).is_err());
    }

    #[test]
    fn latents_of_another_shape_are_an_error() -> Result<()> {
        let case = Case::new((1, 4, 4, 2, 2))?;
        let other = Tensor::zeros((1, 4, 5, 2, 2), DType::F32, &Device::Cpu)?;
        let mut reuse = DenoisingReuse::new(config(2, 0.5, ReuseMode::Fixed), &other)?;
        let err = Sampler::new(&Zero, &case.scheduler)
            .with_strategy(&mut reuse)
            .sample(&settings(2, 1.0), &case.inputs())
            .unwrap_err();
        assert!(err.to_string().contains("set up for latents"), "{err}");
        Ok(())
    }
}
