//! Sliding context windows: clips longer than a motion module's positional table are denoised
//! window by window and the overlapping predictions blended, as AnimateDiff-Evolved's
//! context options do (its `static standard` and looped `uniform` schedules, flat and
//! pyramid fusion).

use std::str::FromStr;

use candle_core::{Result, Tensor};

use super::{gather_frames, NoisePredictor, PredictRequest};

/// How windows are placed over the frames.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextSchedule {
    /// Fixed windows stepping by `length − overlap`, the last aligned to the end.
    Static,
    /// animatediff-cli's uniform schedule: windows at strides 1, 2, 4, ... whose offset moves
    /// with the step, wrapping around the clip when `closed_loop`.
    Uniform,
    /// The uniform schedule without wrapping (AnimateDiff-Evolved's "standard uniform"): a
    /// window that would run past the last frame is moved back to end there, and repeated
    /// windows are dropped.
    StandardUniform,
}

/// How overlapping predictions are weighted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ContextFuse {
    Flat,
    /// Weights rise linearly to the window's middle and fall again, so window edges count less.
    Pyramid,
    /// Weight 1 except over the overlap at each inner edge of a window, where it ramps
    /// linearly from (almost) 0 to 1, so neighbouring windows cross-fade.
    OverlapLinear,
}

impl FromStr for ContextSchedule {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "static" => Ok(Self::Static),
            "uniform" => Ok(Self::Uniform),
            "standard_uniform" => Ok(Self::StandardUniform),
            other => Err(format!(
                "unknown context schedule `{other}` (expected static, uniform or standard_uniform)"
            )),
        }
    }
}

impl FromStr for ContextFuse {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "flat" => Ok(Self::Flat),
            "pyramid" => Ok(Self::Pyramid),
            "overlap-linear" => Ok(Self::OverlapLinear),
            other => Err(format!(
                "unknown context fuse method `{other}` (expected flat, pyramid or overlap-linear)"
            )),
        }
    }
}

/// Context window settings (AnimateDiff-Evolved's names and defaults).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ContextOptions {
    pub length: usize,
    pub overlap: usize,
    /// Largest stride level of the uniform schedule (1 = contiguous windows only).
    pub stride: usize,
    pub closed_loop: bool,
    pub schedule: ContextSchedule,
    pub fuse: ContextFuse,
}

impl Default for ContextOptions {
    fn default() -> Self {
        Self {
            length: 16,
            overlap: 4,
            stride: 1,
            closed_loop: false,
            schedule: ContextSchedule::Static,
            fuse: ContextFuse::Pyramid,
        }
    }
}

impl ContextOptions {
    /// The windows a clip of `frames` frames needs by default: none while one pass fits the
    /// motion modules' positional table of `max_frames`, else windows of up to 16 frames.
    pub fn needed_for(max_frames: Option<usize>, frames: usize) -> Option<Self> {
        max_frames.filter(|&max| frames > max).map(|max| Self {
            length: max.min(16),
            ..Self::default()
        })
    }

    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.length == 0 {
            return Err("context length must be at least 1".into());
        }
        if self.overlap >= self.length {
            return Err(format!(
                "context overlap {} must be smaller than the context length {}",
                self.overlap, self.length
            ));
        }
        if self.stride == 0 {
            return Err("context stride must be at least 1".into());
        }
        Ok(())
    }

    /// The windows (lists of frame indices) for sampling step `step` of a clip of `frames`.
    pub fn windows(&self, frames: usize, step: usize) -> Vec<Vec<usize>> {
        if frames <= self.length {
            return vec![(0..frames).collect()];
        }
        match self.schedule {
            ContextSchedule::Static => self.static_windows(frames),
            ContextSchedule::Uniform => self.uniform_windows(frames, step, self.closed_loop),
            ContextSchedule::StandardUniform => self.standard_uniform_windows(frames, step),
        }
    }

    /// The uniform windows, each one that wraps past the last frame moved back to end there
    /// (and, when the next window lacks the frame it wrapped to, a window starting at that
    /// frame added after it); a window equal to an earlier one is dropped.
    fn standard_uniform_windows(&self, frames: usize, step: usize) -> Vec<Vec<usize>> {
        let mut windows = self.uniform_windows(frames, step, false);
        let mut index = 0;
        while index < windows.len() {
            let window = &mut windows[index];
            if let Some(roll) = (1..window.len()).find(|&i| window[i] < window[i - 1]) {
                let wrapped_to = window[roll];
                // Relative to its first frame, then slid so that it ends on the last frame.
                let first = window[0];
                for frame in window.iter_mut() {
                    *frame = (*frame + frames - first) % frames;
                }
                let end_delta = frames - 1 - window[window.len() - 1];
                for frame in window.iter_mut() {
                    // A strided window that wraps more than once has frames past its last
                    // one; those wrap again rather than leave the clip.
                    *frame = (*frame + end_delta) % frames;
                }
                let next = (index + 1) % windows.len();
                if !windows[next].contains(&wrapped_to) {
                    let added = (wrapped_to..wrapped_to + self.length)
                        .map(|frame| frame.min(frames - 1))
                        .collect();
                    windows.insert(index + 1, added);
                }
            }
            index += 1;
        }
        let mut unique: Vec<Vec<usize>> = Vec::with_capacity(windows.len());
        for window in windows {
            if !unique.contains(&window) {
                unique.push(window);
            }
        }
        unique
    }

    fn static_windows(&self, frames: usize) -> Vec<Vec<usize>> {
        let delta = self.length - self.overlap;
        let mut windows = Vec::new();
        let mut start = 0;
        loop {
            if start + self.length >= frames {
                let start = frames - self.length;
                windows.push((start..frames).collect());
                break;
            }
            windows.push((start..start + self.length).collect());
            start += delta;
        }
        if self.closed_loop {
            // Windows across the seam join the last frames to the first ones.
            let mut seam = frames - self.length + delta;
            while seam < frames {
                windows.push((seam..seam + self.length).map(|i| i % frames).collect());
                seam += delta;
            }
        }
        windows
    }

    fn uniform_windows(&self, frames: usize, step: usize, closed_loop: bool) -> Vec<Vec<usize>> {
        let levels = {
            let needed = (frames as f64 / self.length as f64).log2().ceil() as usize + 1;
            self.stride.min(needed).max(1)
        };
        let halving = ordered_halving(step as u64);
        // Python's round: halves to even.
        let pad = (frames as f64 * halving).round_ties_even() as usize;
        let mut windows = Vec::new();
        for level in 0..levels {
            let stride = 1usize << level;
            let start = (halving * stride as f64) as usize + pad;
            let end = frames + pad;
            let end = if closed_loop {
                end
            } else {
                end.saturating_sub(self.overlap)
            };
            let step_by = (self.length * stride).saturating_sub(self.overlap).max(1);
            let mut j = start;
            while j < end {
                windows.push(
                    (0..self.length)
                        .map(|k| (j + k * stride) % frames)
                        .collect(),
                );
                j += step_by;
            }
        }
        windows
    }

    /// Per-position weights inside `window`, one of the windows over `frames` frames.
    pub fn weights(&self, window: &[usize], frames: usize) -> Vec<f64> {
        let len = window.len();
        match self.fuse {
            ContextFuse::Flat => vec![1.0; len],
            ContextFuse::Pyramid => (0..len).map(|i| (i + 1).min(len - i) as f64).collect(),
            ContextFuse::OverlapLinear => {
                let mut weights = vec![1.0; len];
                let overlap = self.overlap.min(len);
                // torch.linspace(1e-37, 1, overlap): the first value stands in for 0, so
                // that a frame covered by one window only never gets a zero total.
                let ramp: Vec<f64> = match overlap {
                    0 => Vec::new(),
                    1 => vec![1e-37],
                    n => (0..n)
                        .map(|i| 1e-37 + (1.0 - 1e-37) * i as f64 / (n - 1) as f64)
                        .collect(),
                };
                if window.iter().min().is_some_and(|&first| first > 0) {
                    weights[..overlap].copy_from_slice(&ramp);
                }
                if window.iter().max().is_some_and(|&last| last + 1 < frames) {
                    for (weight, value) in
                        weights[len - overlap..].iter_mut().zip(ramp.iter().rev())
                    {
                        *weight = *value;
                    }
                }
                weights
            }
        }
    }
}

/// Reverses the bits of `value` as a 64-bit fraction: 0, 1/2, 1/4, 3/4, 1/8, ... a sequence
/// that spreads window offsets evenly over the steps.
fn ordered_halving(value: u64) -> f64 {
    value.reverse_bits() as f64 / 2f64.powi(64)
}

/// A predictor that runs `inner` over context windows and blends the results. Each window is
/// evaluated as a clip of its own: its frames see positions 0, 1, …, len−1, as in
/// AnimateDiff-Evolved; the step, guidance layout and run observer are passed on.
///
/// A request for a subset of the clip (a frame strategy's selection, with `frame_positions`)
/// is windowed over the clip positions it spans (0 to its last position): each window takes the
/// requested frames that fall inside it, at their positions within the window, so a key frame
/// sits where it would if the whole window were evaluated.
pub struct ContextWindows<'a> {
    pub inner: &'a dyn NoisePredictor,
    pub options: ContextOptions,
}

/// The requested frames that one window holds.
struct WindowPart {
    /// Indices into the request's frames.
    frames: Vec<usize>,
    /// Their positions inside the window.
    positions: Vec<usize>,
    /// Their fusion weights.
    weights: Vec<f64>,
}

impl WindowPart {
    /// The positions to pass on: `None` when they are 0, 1, …, n−1, as for a whole window.
    fn frame_positions(&self) -> Option<&[usize]> {
        let contiguous = self.positions.iter().enumerate().all(|(i, &p)| i == p);
        (!contiguous).then_some(self.positions.as_slice())
    }
}

impl ContextWindows<'_> {
    /// The windows of `request`'s step as the requested frames each holds, or `None` when one
    /// window covers every position the request spans and it goes to `inner` as it is.
    fn parts(&self, request: &PredictRequest) -> Result<Option<Vec<WindowPart>>> {
        let (_, _, frames, _, _) = request.latents.dims5()?;
        let identity: Vec<usize>;
        let positions = match request.frame_positions {
            Some(positions) if positions.len() == frames => positions,
            Some(positions) => {
                candle_core::bail!("{} frame positions for {frames} frames", positions.len())
            }
            None => {
                identity = (0..frames).collect();
                &identity
            }
        };
        let span = positions.iter().max().map_or(0, |&last| last + 1);
        let windows = self
            .options
            .windows(span, request.step.map_or(0, |s| s.index));
        if windows.len() == 1 && windows[0].len() == span {
            return Ok(None);
        }
        let mut requested_at = vec![None; span];
        for (i, &position) in positions.iter().enumerate() {
            requested_at[position] = Some(i);
        }
        let parts = windows
            .iter()
            .filter_map(|window| {
                let weights = self.options.weights(window, span);
                let mut part = WindowPart {
                    frames: Vec::new(),
                    positions: Vec::new(),
                    weights: Vec::new(),
                };
                for (inside, &position) in window.iter().enumerate() {
                    if let Some(frame) = requested_at[position] {
                        part.frames.push(frame);
                        part.positions.push(inside);
                        part.weights.push(weights[inside]);
                    }
                }
                (!part.frames.is_empty()).then_some(part)
            })
            .collect();
        Ok(Some(parts))
    }
}

impl NoisePredictor for ContextWindows<'_> {
    fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
        let Some(parts) = self.parts(request)? else {
            return self.inner.predict(request);
        };
        let latents = request.latents;
        let (_, _, frames, _, _) = latents.dims5()?;
        let device = latents.device();
        let mut sum = latents.zeros_like()?;
        let mut weight_sum = vec![0.0f64; frames];
        let (batch, ..) = latents.dims5()?;
        // Text of one embedding per frame (prompt travel) goes with its frames.
        let per_frame_text = frames > 1 && request.text.dim(0)? == batch * frames;
        for part in &parts {
            let gathered = gather_frames(latents, &part.frames)?;
            let text = if per_frame_text {
                let rows: Vec<u32> = (0..batch)
                    .flat_map(|b| part.frames.iter().map(move |&f| (b * frames + f) as u32))
                    .collect();
                let count = rows.len();
                request
                    .text
                    .index_select(&Tensor::from_vec(rows, count, device)?, 0)?
            } else {
                request.text.clone()
            };
            let eps = self.inner.predict(&PredictRequest {
                latents: &gathered,
                text: &text,
                frame_positions: part.frame_positions(),
                ..*request
            })?;
            let count = part.frames.len();
            let w = Tensor::from_vec(
                part.weights.iter().map(|&v| v as f32).collect::<Vec<_>>(),
                (1, 1, count, 1, 1),
                device,
            )?
            .to_dtype(eps.dtype())?;
            let index = Tensor::from_vec(
                part.frames.iter().map(|&i| i as u32).collect::<Vec<_>>(),
                count,
                device,
            )?;
            sum = sum.index_add(&index, &eps.broadcast_mul(&w)?, 2)?;
            for (&f, &v) in part.frames.iter().zip(&part.weights) {
                weight_sum[f] += v;
            }
        }
        let norm: Vec<f32> = weight_sum
            .iter()
            .map(|&v| if v > 0.0 { (1.0 / v) as f32 } else { 0.0 })
            .collect();
        let norm = Tensor::from_vec(norm, (1, 1, frames, 1, 1), device)?.to_dtype(sum.dtype())?;
        sum.broadcast_mul(&norm)
    }

    fn max_frames(&self) -> Option<usize> {
        None
    }

    /// Every window's requested frames, overlaps counted once per window.
    fn frame_evaluations(&self, request: &PredictRequest) -> Result<usize> {
        let Some(parts) = self.parts(request)? else {
            return self.inner.frame_evaluations(request);
        };
        let batch = request.latents.dim(0)?;
        Ok(parts.iter().map(|p| p.frames.len()).sum::<usize>() * batch)
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    #[test]
    fn standard_uniform_windows_match_animatediff_evolved() {
        // (frames, length, overlap, stride, step) and AnimateDiff-Evolved's
        // `create_windows_uniform_standard` for them.
        let range = |a: usize, b: usize| (a..b).collect::<Vec<_>>();
        let cases = [
            ((24, 16, 4, 1, 0), vec![range(0, 16), range(8, 24)]),
            ((24, 16, 4, 1, 1), vec![range(8, 24), range(0, 16)]),
            (
                (24, 16, 4, 1, 3),
                vec![range(8, 24), range(0, 16), range(6, 22)],
            ),
            (
                (20, 8, 2, 2, 5),
                vec![
                    range(12, 20),
                    range(0, 8),
                    range(4, 12),
                    (5..20).step_by(2).collect(),
                    range(1, 9),
                ],
            ),
        ];
        for ((frames, length, overlap, stride, step), expected) in cases {
            let options = ContextOptions {
                length,
                overlap,
                stride,
                closed_loop: false,
                schedule: ContextSchedule::StandardUniform,
                fuse: ContextFuse::Flat,
            };
            assert_eq!(
                options.windows(frames, step),
                expected,
                "{frames} frames, step {step}"
            );
        }
    }

    #[test]
    fn overlap_linear_ramps_only_inner_edges() {
        let options = ContextOptions {
            length: 6,
            overlap: 3,
            fuse: ContextFuse::OverlapLinear,
            ..ContextOptions::default()
        };
        let first = options.weights(&[0, 1, 2, 3, 4, 5], 12);
        assert_eq!(&first[..3], [1.0, 1.0, 1.0]);
        assert_eq!(first[3], 1.0);
        assert!((first[4] - 0.5).abs() < 1e-12 && first[5] < 1e-30);
        let middle = options.weights(&[3, 4, 5, 6, 7, 8], 12);
        assert!(middle[0] < 1e-30 && (middle[1] - 0.5).abs() < 1e-12 && middle[2] == 1.0);
    }

    use super::*;
    use crate::models::call::SamplingStep;
    use candle_core::Device;

    fn options(schedule: ContextSchedule, closed_loop: bool) -> ContextOptions {
        ContextOptions {
            length: 8,
            overlap: 2,
            stride: 3,
            closed_loop,
            schedule,
            fuse: ContextFuse::Pyramid,
        }
    }

    #[test]
    fn windows_cover_every_frame_and_have_the_context_length() {
        for schedule in [ContextSchedule::Static, ContextSchedule::Uniform] {
            for closed_loop in [false, true] {
                for frames in [8, 9, 20, 48] {
                    for step in 0..5 {
                        let opts = options(schedule, closed_loop);
                        let windows = opts.windows(frames, step);
                        let mut covered = vec![false; frames];
                        for w in &windows {
                            assert_eq!(w.len(), frames.min(8), "{schedule:?} {frames}");
                            w.iter().for_each(|&i| covered[i] = true);
                        }
                        assert!(covered.iter().all(|&c| c), "{schedule:?} loop={closed_loop} frames={frames} step={step}: {windows:?}");
                    }
                }
            }
        }
    }

    #[test]
    fn static_windows_overlap_by_the_overlap() {
        let windows = options(ContextSchedule::Static, false).windows(20, 0);
        assert_eq!(windows[0], (0..8).collect::<Vec<_>>());
        assert_eq!(windows[1], (6..14).collect::<Vec<_>>());
        assert_eq!(windows.last().unwrap(), &(12..20).collect::<Vec<_>>());
    }

    /// A predictor acting on each frame alone: windows must then not change the result.
    struct PerFrame;
    impl NoisePredictor for PerFrame {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            (request.latents.sin()? * request.timestep)? + 0.5
        }
        fn max_frames(&self) -> Option<usize> {
            Some(8)
        }
    }

    #[test]
    fn blending_a_per_frame_predictor_changes_nothing() -> Result<()> {
        let latents = Tensor::randn(0f32, 1.0, (2, 4, 21, 3, 5), &Device::Cpu)?;
        let text = Tensor::zeros((2, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let request = |step| PredictRequest {
            latents: &latents,
            timestep: 0.7,
            text: &text,
            step,
            guidance: Default::default(),
            frame_positions: None,
            run: None,
        };
        let full = PerFrame.predict(&request(None))?;
        for schedule in [ContextSchedule::Static, ContextSchedule::Uniform] {
            for fuse in [ContextFuse::Flat, ContextFuse::Pyramid] {
                let opts = ContextOptions {
                    fuse,
                    ..options(schedule, true)
                };
                let windowed = ContextWindows {
                    inner: &PerFrame,
                    options: opts,
                }
                .predict(&request(Some(SamplingStep {
                    index: 3,
                    count: 5,
                    timestep: 0.7,
                })))?;
                let err = crate::test_util::max_abs_diff(&windowed, &full);
                assert!(err < 1e-5, "{schedule:?} {fuse:?}: {err}");
            }
        }
        Ok(())
    }

    /// What one window call saw: its frame positions, step index and frame count.
    type WindowCall = (Option<Vec<usize>>, Option<usize>, usize);

    /// Records the positions and steps each window call sees.
    #[derive(Default)]
    struct Positions {
        seen: RefCell<Vec<WindowCall>>,
    }
    impl NoisePredictor for Positions {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            self.seen.borrow_mut().push((
                request.frame_positions.map(<[usize]>::to_vec),
                request.step.map(|s| s.index),
                request.latents.dim(2)?,
            ));
            request.latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            Some(8)
        }
    }

    #[test]
    fn windows_see_positions_from_zero_and_the_step_and_are_counted() -> Result<()> {
        let latents = Tensor::zeros((2, 1, 20, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let text = Tensor::zeros((2, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let positions: Vec<usize> = (0..20).collect();
        let request = PredictRequest {
            latents: &latents,
            timestep: 1.0,
            text: &text,
            step: Some(SamplingStep {
                index: 2,
                count: 4,
                timestep: 1.0,
            }),
            guidance: Default::default(),
            frame_positions: Some(&positions),
            run: None,
        };
        let inner = Positions::default();
        let windows = ContextWindows {
            inner: &inner,
            options: options(ContextSchedule::Static, false),
        };
        windows.predict(&request)?;
        let seen = inner.seen.borrow();
        assert_eq!(seen.len(), 3);
        assert!(seen.iter().all(|s| *s == (None, Some(2), 8)));
        assert_eq!(windows.frame_evaluations(&request)?, 3 * 8 * 2);
        Ok(())
    }

    #[test]
    fn a_subset_is_windowed_over_the_clip_positions_it_spans() -> Result<()> {
        // Frames at clip positions 0, 4, …, 16: windows over the 17 positions they span are
        // 0..8, 6..14 and 9..17.
        let subset = [0, 4, 8, 12, 16];
        let latents = Tensor::randn(0f32, 1.0, (2, 3, subset.len(), 2, 2), &Device::Cpu)?;
        let text = Tensor::zeros((2, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let request = PredictRequest {
            latents: &latents,
            timestep: 0.4,
            text: &text,
            step: Some(SamplingStep {
                index: 1,
                count: 4,
                timestep: 0.4,
            }),
            guidance: Default::default(),
            frame_positions: Some(&subset),
            run: None,
        };
        let inner = Positions::default();
        let windows = ContextWindows {
            inner: &inner,
            options: options(ContextSchedule::Static, false),
        };
        windows.predict(&request)?;
        let seen = inner.seen.borrow();
        // Each window sees the subset's frames inside it at their positions in the window.
        assert_eq!(
            *seen,
            [
                (Some(vec![0, 4]), Some(1), 2),
                (Some(vec![2, 6]), Some(1), 2),
                (Some(vec![3, 7]), Some(1), 2),
            ]
        );
        assert_eq!(windows.frame_evaluations(&request)?, 6 * 2);

        // A predictor acting on each frame alone gives the same ε as without windows.
        let per_frame = ContextWindows {
            inner: &PerFrame,
            options: options(ContextSchedule::Uniform, false),
        };
        let full = PerFrame.predict(&request)?;
        let windowed = per_frame.predict(&request)?;
        let err = crate::test_util::max_abs_diff(&windowed, &full);
        assert!(err < 1e-5, "{err}");
        Ok(())
    }

    #[test]
    fn pyramid_weights_peak_in_the_middle() {
        let opts = ContextOptions::default();
        assert_eq!(
            opts.weights(&[0, 1, 2, 3, 4, 5], 6),
            [1.0, 2.0, 3.0, 3.0, 2.0, 1.0]
        );
        assert_eq!(opts.weights(&[0, 1, 2, 3, 4], 5), [1.0, 2.0, 3.0, 2.0, 1.0]);
    }
}
