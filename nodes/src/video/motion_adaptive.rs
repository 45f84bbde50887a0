//! Motion-adaptive temporal attention (METHODS.md §1) as patches on a frozen UNet with motion
//! modules: the receptive field of the up blocks' temporal attention narrows as the clip's motion
//! amplitude m grows, and a motion-aware gate scales their temporal branch.
//!
//! Three patches work together in every forward pass:
//! - [`AmplitudeTap`] puts m into the pass's values: a fixed m (an override, or a measured
//!   `MOTION`'s amplitude), or m estimated from the lowest-resolution features (the last down
//!   block's output), once per call and without gradient;
//! - [`MotionAdaptiveAttention`], an attention processor on the temporal layers of the up blocks,
//!   adds −λ(m)·|i − j| to the logits (bias mode) or masks |i − j| > w(m) (window mode), with i
//!   and j the frames' positions in the clip; down and mid blocks keep global attention;
//! - [`MotionAwareGate`] multiplies the up-block motion modules' residual by
//!   g(m) = sigmoid(a·m + b) / sigmoid(b), neutral at m = 0.
//!
//! At m = 0 the processor falls back to plain attention and the gate is exactly 1, so the model
//! is bit-identical to the one without the patches. The processor addresses layers by path and
//! kind, not by module type: the lightweight trained temporal modules of the paper, applied as
//! motion modules, get the same field and gate.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::models::attention::{
    attention_probs, attention_probs_with_bias, row_index, scaled_dot_product_with_bias,
    AttentionCall, AttentionKind, AttentionProcessor, ProcessorBinding, ScaledDotProduct,
};
use crate::models::call::{FeatureTap, ForwardPass};
use crate::models::motion::ModuleGate;
use crate::models::patcher::{Patch, PatchedUNet};

/// The name of m in [`crate::models::call::ForwardValues`].
pub const AMPLITUDE_VALUE: &str = "motion_amplitude";
/// Run-observer key of the `BTreeSet<String>` of layers whose attention was biased or masked.
pub const ADAPTED_LAYERS: &str = "motion_adaptive.layers";
/// Run-observer key of the `Vec<f64>` of the amplitudes estimated, one per model call.
pub const ESTIMATED_AMPLITUDES: &str = "motion_adaptive.estimates";
/// The layers that get the motion-adaptive field and gate: the up blocks.
const ADAPTED_PREFIX: &str = "up_blocks.";
/// Denominator guard of the amplitude estimate.
const AMPLITUDE_EPS: f64 = 1e-6;

/// How m narrows the temporal receptive field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceptiveField {
    /// −λ(m)·|i − j| on the logits, λ(m) = λ_max·m: a soft preference for near frames.
    Bias,
    /// Logits of frames farther apart than w(m) masked out: a hard window.
    Window,
}

impl ReceptiveField {
    pub const NAMES: [&'static str; 2] = ["bias", "window"];
}

impl std::str::FromStr for ReceptiveField {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "bias" => Ok(Self::Bias),
            "window" => Ok(Self::Window),
            other => Err(format!("unknown mode `{other}` (expected bias or window)")),
        }
    }
}

/// The knobs of motion-adaptive temporal attention.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct MotionAdaptiveConfig {
    pub field: ReceptiveField,
    /// λ at m = 1 (bias mode).
    pub lambda_max: f64,
    /// The narrowest window, at m = 1 (window mode).
    pub window_min: usize,
    /// a of the gate g(m) = sigmoid(a·m + b) / sigmoid(b): positive strengthens the temporal
    /// branch of fast clips, negative weakens it, 0 switches the gate off.
    pub gate_weight: f64,
    /// b of the gate (0 for pretrained motion modules; learned for trained ones).
    pub gate_bias: f64,
    /// κ of the amplitude estimate: the relative feature change per frame that saturates m.
    pub kappa: f64,
}

impl Default for MotionAdaptiveConfig {
    fn default() -> Self {
        Self {
            field: ReceptiveField::Bias,
            lambda_max: 1.0,
            window_min: 2,
            gate_weight: 0.0,
            gate_bias: 0.0,
            kappa: 0.3,
        }
    }
}

impl MotionAdaptiveConfig {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if !(self.lambda_max.is_finite() && self.lambda_max >= 0.0) {
            return Err(format!("lambda_max must be ≥ 0, got {}", self.lambda_max));
        }
        if !(self.gate_weight.is_finite() && self.gate_bias.is_finite()) {
            return Err("the gate's weight and bias must be finite".to_string());
        }
        if !(self.kappa.is_finite() && self.kappa > 0.0) {
            return Err(format!("kappa must be > 0, got {}", self.kappa));
        }
        Ok(())
    }

    /// λ(m) = λ_max·m.
    pub fn lambda(&self, m: f64) -> f64 {
        self.lambda_max * m
    }

    /// w(m) = round(w_min + (1 − m)(F − 1 − w_min)) for a clip span of `frames` frames.
    pub fn window(&self, m: f64, frames: usize) -> usize {
        let w_min = self.window_min as f64;
        let w = w_min + (1.0 - m) * (frames as f64 - 1.0 - w_min);
        w.round().max(0.0) as usize
    }

    /// g(m) = sigmoid(a·m + b) / sigmoid(b): exactly 1 at m = 0.
    pub fn gate(&self, m: f64) -> f64 {
        sigmoid(self.gate_weight * m + self.gate_bias) / sigmoid(self.gate_bias)
    }

    /// The (F, F) logit term for frames at clip `positions`, row-major, or `None` when attention
    /// stays global (λ = 0, or a window that spans every pair).
    pub fn logit_bias(&self, m: f64, positions: &[usize]) -> Option<Vec<f32>> {
        let (Some(&first), Some(&last)) = (positions.iter().min(), positions.iter().max()) else {
            return None;
        };
        let span = last - first + 1;
        let distances = positions
            .iter()
            .flat_map(|&i| positions.iter().map(move |&j| i.abs_diff(j)));
        match self.field {
            ReceptiveField::Bias => {
                let lambda = self.lambda(m);
                (lambda > 0.0).then(|| distances.map(|d| (-lambda * d as f64) as f32).collect())
            }
            ReceptiveField::Window => {
                let window = self.window(m, span);
                (window < span - 1).then(|| {
                    distances
                        .map(|d| if d > window { f32::NEG_INFINITY } else { 0.0 })
                        .collect()
                })
            }
        }
    }
}

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// The clip a measured motion field describes, to check it against the latents being sampled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClipReference {
    pub frames: usize,
    /// The frame height and width in pixels.
    pub height: usize,
    pub width: usize,
    /// Where the field came from, for the error (e.g. the node and input that gave it).
    pub source: String,
}

impl ClipReference {
    /// Whether frames of this size can be the decoded frames of `height`×`width` latents: the
    /// same shape, larger by one whole factor (8 for SD's VAE).
    pub fn fits_latents(&self, height: usize, width: usize) -> bool {
        height > 0
            && width > 0
            && self.height.is_multiple_of(height)
            && self.width.is_multiple_of(width)
            && self.height / height == self.width / width
    }

    /// Checks the first layer's activations (videos·frames, C, h, w) of a call against the
    /// reference clip.
    fn check(&self, xs: &Tensor, pass: &ForwardPass) -> Result<()> {
        let (_, _, height, width) = xs.dims4()?;
        let fits_frames = match pass.frame_positions {
            None => pass.frames == self.frames,
            Some(positions) => positions.iter().all(|&p| p < self.frames),
        };
        if !fits_frames || !self.fits_latents(height, width) {
            candle_core::bail!(
                "{}: the motion is for {} frames of {}×{} pixels, the clip being sampled has {} \
                 frames of {width}×{height} latents",
                self.source,
                self.frames,
                self.width,
                self.height,
                pass.frame_positions
                    .and_then(|p| p.iter().max().map(|m| format!("at least {}", m + 1)))
                    .unwrap_or_else(|| pass.frames.to_string()),
            )
        }
        Ok(())
    }
}

/// Where m comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum Amplitude {
    /// Given: an override, or a measured clip's amplitude (checked against the clip sampled).
    Fixed {
        m: f64,
        reference: Option<ClipReference>,
    },
    /// Estimated from the lowest-resolution features of each model call.
    Estimated { kappa: f64 },
}

/// Puts m into the values of every forward pass, for the processor and the gate.
pub struct AmplitudeTap {
    amplitude: Amplitude,
    /// The point whose features give the estimate: the last down block's output.
    lowest_resolution: String,
}

impl AmplitudeTap {
    /// The tap for a UNet of `down_blocks` down blocks.
    pub fn new(amplitude: Amplitude, down_blocks: usize) -> Self {
        Self {
            amplitude,
            lowest_resolution: format!("down_blocks.{}", down_blocks.saturating_sub(1)),
        }
    }
}

impl FeatureTap for AmplitudeTap {
    fn observe(&self, point: &str, xs: &Tensor, pass: &ForwardPass) -> Result<()> {
        match &self.amplitude {
            Amplitude::Fixed { m, reference } if point == "conv_in" => {
                if let Some(reference) = reference {
                    reference.check(xs, pass)?;
                }
                pass.values.set(AMPLITUDE_VALUE, *m);
            }
            Amplitude::Estimated { kappa } if point == self.lowest_resolution => {
                let m = estimate_amplitude(xs, pass, *kappa)?;
                pass.values.set(AMPLITUDE_VALUE, m);
                if let Some(run) = pass.run {
                    run.with::<Vec<f64>, _>(ESTIMATED_AMPLITUDES, |all| all.push(m));
                }
            }
            _ => {}
        }
        Ok(())
    }
}

/// m = clamp(mean_f ‖x_{f+1} − x_f‖₁ / (mean_f ‖x_f‖₁ + eps) / κ, 0, 1) over the frames of each
/// video of `xs` (videos·frames, C, h, w), without gradient. When the call sees a subset of the
/// clip, each difference is divided by the frames between the two (a step of two frames moves
/// about twice as far). 0 for a single frame.
pub fn estimate_amplitude(xs: &Tensor, pass: &ForwardPass, kappa: f64) -> Result<f64> {
    let frames = pass.frames;
    if frames < 2 {
        return Ok(0.0);
    }
    let (rows, _, _, _) = xs.dims4()?;
    let videos = rows / frames;
    let x = xs
        .detach()
        .to_dtype(DType::F32)?
        .reshape((videos, frames, ()))?;
    let positions = pass.positions();
    let gaps: Vec<f32> = positions
        .windows(2)
        .map(|p| p[0].abs_diff(p[1]).max(1) as f32)
        .collect();
    let gaps = Tensor::from_vec(gaps, (1, frames - 1), xs.device())?;
    let change = (x.narrow(1, 1, frames - 1)? - x.narrow(1, 0, frames - 1)?)?
        .abs()?
        .sum(2)?
        .broadcast_div(&gaps)?
        .mean_all()?
        .to_scalar::<f32>()? as f64;
    let size = x.abs()?.sum(2)?.mean_all()?.to_scalar::<f32>()? as f64;
    Ok((change / (size + AMPLITUDE_EPS) / kappa).clamp(0.0, 1.0))
}

/// m of the current pass, put there by [`AmplitudeTap`].
fn amplitude_of(pass: &ForwardPass, layer: &str) -> Result<f64> {
    pass.values.get(AMPLITUDE_VALUE).ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "{layer}: no motion amplitude in this forward pass (the amplitude tap did not run)"
        ))
    })
}

/// The motion-adaptive field on temporal attention: bias or window by the frames' distance.
pub struct MotionAdaptiveAttention {
    config: MotionAdaptiveConfig,
}

impl MotionAdaptiveAttention {
    pub fn new(config: MotionAdaptiveConfig) -> Self {
        Self { config }
    }
}

impl MotionAdaptiveAttention {
    /// The (F, F) logit bias of a temporal call, or `None` where attention stays plain.
    fn bias_of(&self, call: &AttentionCall, k: &Tensor) -> Result<Option<Tensor>> {
        if call.kind != AttentionKind::Temporal {
            return Ok(None);
        }
        let m = amplitude_of(call.pass, call.layer)?;
        let positions = call.pass.positions();
        let frames = k.dim(2)?;
        if positions.len() != frames {
            candle_core::bail!(
                "{}: temporal attention over {frames} frames, {} frame positions",
                call.layer,
                positions.len()
            )
        }
        self.config
            .logit_bias(m, &positions)
            .map(|bias| Tensor::from_vec(bias, (frames, frames), k.device()))
            .transpose()
    }
}

impl AttentionProcessor for MotionAdaptiveAttention {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let Some(bias) = self.bias_of(call, k)? else {
            return ScaledDotProduct.attend(call, q, k, v);
        };
        if let Some(run) = call.pass.run {
            run.with::<BTreeSet<String>, _>(ADAPTED_LAYERS, |layers| {
                layers.insert(call.layer.to_string())
            });
        }
        scaled_dot_product_with_bias(q, k, v, call.scale, &bias)
    }

    fn weights(
        &self,
        call: &AttentionCall,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
    ) -> Result<Tensor> {
        match self.bias_of(call, k)? {
            None => attention_probs(q, k, call.scale),
            Some(bias) => {
                let rows = bias.index_select(&row_index(rows, bias.device())?, 0)?;
                attention_probs_with_bias(q, k, call.scale, &rows)
            }
        }
    }
}

/// g(m) on the motion modules of the up blocks; 1 elsewhere.
pub struct MotionAwareGate {
    config: MotionAdaptiveConfig,
}

impl MotionAwareGate {
    pub fn new(config: MotionAdaptiveConfig) -> Self {
        Self { config }
    }
}

impl ModuleGate for MotionAwareGate {
    fn gate(&self, slot: &str, pass: &ForwardPass) -> Result<f64> {
        if !slot.starts_with(ADAPTED_PREFIX) {
            return Ok(1.0);
        }
        Ok(self.config.gate(amplitude_of(pass, slot)?))
    }
}

/// `unet` with motion-adaptive temporal attention: the amplitude tap, the processor on the up
/// blocks' temporal layers and the gate, as three patches.
pub fn apply_motion_adaptive(
    unet: &PatchedUNet,
    config: MotionAdaptiveConfig,
    amplitude: Amplitude,
) -> std::result::Result<PatchedUNet, String> {
    config.validate()?;
    if let Amplitude::Fixed { m, .. } = amplitude {
        if !(0.0..=1.0).contains(&m) {
            return Err(format!("the motion amplitude must be in [0, 1], got {m}"));
        }
    }
    let down_blocks = unet.base().config().block_out_channels.len();
    unet.with_patch(Patch::Tap(Arc::new(AmplitudeTap::new(
        amplitude,
        down_blocks,
    ))))?
    .with_patch(Patch::Attention(ProcessorBinding {
        prefix: ADAPTED_PREFIX.to_string(),
        kind: Some(AttentionKind::Temporal),
        processor: Arc::new(MotionAdaptiveAttention::new(config)),
    }))?
    .with_patch(Patch::Gate(Arc::new(MotionAwareGate::new(config))))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::attention::{AttentionHook, AttentionSite, TokenLayout};
    use crate::models::call::RunObserver;
    use candle_core::Device;

    fn config(field: ReceptiveField) -> MotionAdaptiveConfig {
        MotionAdaptiveConfig {
            field,
            ..MotionAdaptiveConfig::default()
        }
    }

    #[test]
    fn the_field_follows_the_formulas() {
        let bias = config(ReceptiveField::Bias);
        assert_eq!(bias.lambda(0.5), 0.5);
        assert!(bias.logit_bias(0.0, &[0, 1, 2]).is_none());
        let at_one = bias.logit_bias(1.0, &[0, 1, 3]).unwrap();
        assert_eq!(at_one, [0.0, -1.0, -3.0, -1.0, 0.0, -2.0, -3.0, -2.0, 0.0]);
        let window = config(ReceptiveField::Window);
        // F = 16: w(0) = 15 (global), w(1) = w_min = 2, w(0.5) = round(2 + 6.5) = 9 (8.5 away
        // from zero).
        assert_eq!(window.window(0.0, 16), 15);
        assert_eq!(window.window(1.0, 16), 2);
        assert_eq!(window.window(0.5, 16), 9);
        assert!(window
            .logit_bias(0.0, &(0..16).collect::<Vec<_>>())
            .is_none());
        let masked = window.logit_bias(1.0, &[0, 2, 5]).unwrap();
        let inf = f32::NEG_INFINITY;
        assert_eq!(masked, [0.0, 0.0, inf, 0.0, 0.0, inf, inf, inf, 0.0]);
    }

    #[test]
    fn the_gate_is_neutral_without_motion() {
        for (a, b) in [(0.0, 0.0), (3.0, 0.0), (-2.0, 1.5)] {
            let config = MotionAdaptiveConfig {
                gate_weight: a,
                gate_bias: b,
                ..MotionAdaptiveConfig::default()
            };
            assert_eq!(config.gate(0.0), 1.0);
        }
        let stronger = MotionAdaptiveConfig {
            gate_weight: 2.0,
            ..MotionAdaptiveConfig::default()
        };
        assert!(stronger.gate(1.0) > stronger.gate(0.5) && stronger.gate(0.5) > 1.0);
    }

    /// Runs the processor on one temporal call of `frames` frames at amplitude `m`, with V the
    /// identity so that the output rows are the attention weights themselves.
    fn weights_through_the_processor(
        config: MotionAdaptiveConfig,
        m: f64,
        q: &Tensor,
        k: &Tensor,
    ) -> Result<Tensor> {
        let (batch, heads, frames, _) = q.dims4()?;
        let v = Tensor::eye(frames, DType::F32, q.device())?
            .reshape((1, 1, frames, frames))?
            .broadcast_as((batch, heads, frames, frames))?
            .contiguous()?;
        let hook = AttentionHook::new().with_processor(
            ADAPTED_PREFIX,
            Some(AttentionKind::Temporal),
            Arc::new(MotionAdaptiveAttention::new(config)),
        );
        let mut pass = ForwardPass::new(&hook);
        pass.frames = frames;
        pass.values.set(AMPLITUDE_VALUE, m);
        let site = AttentionSite {
            layer: "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1",
            kind: AttentionKind::Temporal,
            layout: TokenLayout {
                videos: 1,
                frames,
                height: 1,
                width: batch,
            },
        };
        hook.attend(site, &pass, q, k, &v)
    }

    /// Q and K with a head dimension of `frames`, so that V can be the identity.
    fn queries_and_keys(frames: usize) -> Result<(Tensor, Tensor)> {
        let dev = Device::Cpu;
        Ok((
            Tensor::randn(0f32, 1.0, (3, 2, frames, frames), &dev)?,
            Tensor::randn(0f32, 1.0, (3, 2, frames, frames), &dev)?,
        ))
    }

    /// The processor's weights on the fused kernel and on the composed path.
    fn on_both_paths(
        config: MotionAdaptiveConfig,
        m: f64,
        q: &Tensor,
        k: &Tensor,
    ) -> Result<[Vec<Vec<f32>>; 2]> {
        let run = || {
            weights_through_the_processor(config, m, q, k)?
                .flatten_to(2)?
                .to_vec2()
        };
        Ok([run()?, crate::models::ops::with_composed_ops(run)?])
    }

    #[test]
    fn at_full_motion_the_window_leaves_exact_zeros_beyond_it() -> Result<()> {
        let frames = 16;
        let (q, k) = queries_and_keys(frames)?;
        let config = config(ReceptiveField::Window);
        let window = config.window(1.0, frames);
        for rows in on_both_paths(config, 1.0, &q, &k)? {
            for (r, row) in rows.iter().enumerate() {
                let i = r % frames;
                for (j, &w) in row.iter().enumerate() {
                    if i.abs_diff(j) > window {
                        assert_eq!(w, 0.0, "row {i}, key {j}");
                    } else {
                        assert!(w > 0.0);
                    }
                }
                let sum: f32 = row.iter().sum();
                assert!((sum - 1.0).abs() < 1e-5);
            }
        }
        Ok(())
    }

    #[test]
    fn the_bias_follows_a_direct_softmax() -> Result<()> {
        let frames = 6;
        let (q, k) = queries_and_keys(frames)?;
        let config = config(ReceptiveField::Bias);
        let scale = 1.0 / (frames as f64).sqrt();
        let (q_rows, k_rows) = (
            q.flatten_to(1)?.to_vec3::<f32>()?,
            k.flatten_to(1)?.to_vec3::<f32>()?,
        );
        for m in [1.0, 0.4] {
            let lambda = config.lambda(m);
            for weights in on_both_paths(config, m, &q, &k)? {
                for (r, row) in weights.iter().enumerate() {
                    let (sequence, i) = (r / frames, r % frames);
                    let logits: Vec<f64> = (0..frames)
                        .map(|j| {
                            let dot: f64 = q_rows[sequence][i]
                                .iter()
                                .zip(&k_rows[sequence][j])
                                .map(|(a, b)| *a as f64 * *b as f64)
                                .sum();
                            dot * scale - lambda * i.abs_diff(j) as f64
                        })
                        .collect();
                    let max = logits.iter().cloned().fold(f64::MIN, f64::max);
                    let total: f64 = logits.iter().map(|l| (l - max).exp()).sum();
                    for (j, &w) in row.iter().enumerate() {
                        let exact = (logits[j] - max).exp() / total;
                        assert!((w as f64 - exact).abs() < 2e-6, "m {m}: {w} vs {exact}");
                    }
                }
            }
        }
        Ok(())
    }

    #[test]
    fn a_still_clip_estimates_zero_and_motion_more() -> Result<()> {
        let dev = Device::Cpu;
        let hook = AttentionHook::new();
        let mut pass = ForwardPass::new(&hook);
        pass.frames = 4;
        let frame = Tensor::randn(0f32, 1.0, (1, 3, 5, 5), &dev)?;
        let still = frame.repeat((8, 1, 1, 1))?;
        assert_eq!(estimate_amplitude(&still, &pass, 0.3)?, 0.0);
        let moving = Tensor::cat(
            &(0..8)
                .map(|f| frame.roll(f % 4, 3))
                .collect::<Result<Vec<_>>>()?,
            0,
        )?;
        let m = estimate_amplitude(&moving, &pass, 0.3)?;
        assert!(m > 0.5, "{m}");
        // A subset at positions two frames apart: the same differences count half per frame.
        let spread = [0, 2, 4, 6];
        pass.frame_positions = Some(&spread);
        let per_frame = estimate_amplitude(&moving, &pass, 3.0)?;
        pass.frame_positions = None;
        let adjacent = estimate_amplitude(&moving, &pass, 3.0)?;
        assert!(
            (per_frame - adjacent / 2.0).abs() < 1e-6,
            "{per_frame} vs {adjacent}"
        );
        Ok(())
    }

    #[test]
    fn a_reference_of_other_frames_or_size_is_refused() -> Result<()> {
        let hook = AttentionHook::new();
        let run = RunObserver::new();
        let mut pass = ForwardPass::new(&hook);
        pass.frames = 4;
        pass.run = Some(&run);
        let tap = AmplitudeTap::new(
            Amplitude::Fixed {
                m: 0.5,
                reference: Some(ClipReference {
                    frames: 4,
                    height: 48,
                    width: 40,
                    source: "Injector input `motion`".into(),
                }),
            },
            4,
        );
        let fits = Tensor::zeros((8, 3, 6, 5), DType::F32, &Device::Cpu)?;
        tap.observe("conv_in", &fits, &pass)?;
        assert_eq!(pass.values.get(AMPLITUDE_VALUE), Some(0.5));
        let other_size = Tensor::zeros((8, 3, 6, 6), DType::F32, &Device::Cpu)?;
        let error = tap.observe("conv_in", &other_size, &pass).unwrap_err();
        assert!(error.to_string().contains("input `motion`"), "{error}");
        pass.frames = 2;
        let other_frames = Tensor::zeros((4, 3, 6, 5), DType::F32, &Device::Cpu)?;
        assert!(tap.observe("conv_in", &other_frames, &pass).is_err());
        Ok(())
    }
}
