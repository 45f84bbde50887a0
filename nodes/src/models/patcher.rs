//! A frozen UNet plus an ordered list of patches, as ComfyUI's model patcher: applying a
//! motion module or an attention processor returns a new [`PatchedUNet`] that shares the
//! base weights, so cached and branching workflows never see each other's changes.

use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::attention::{AttentionHook, AttentionKind, AttentionProcessor};
use super::motion::{MotionAdapter, MotionAdapterConfig, MotionPatch};
use super::unet::UNet2DConditionModel;
use super::call::{GuidanceLayout, RunObserver, SamplingStep};

/// A UNet with its patches.
#[derive(Clone)]
pub struct PatchedUNet {
    base: Arc<UNet2DConditionModel>,
    motion: Option<(Arc<MotionAdapter>, f64)>,
    hook: AttentionHook,
}

impl std::fmt::Debug for PatchedUNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PatchedUNet")
            .field("motion_scale", &self.motion.as_ref().map(|(_, s)| *s))
            .field("processors", &self.hook.bindings().len())
            .finish()
    }
}

impl PatchedUNet {
    pub fn new(base: Arc<UNet2DConditionModel>) -> Self {
        Self {
            base,
            motion: None,
            hook: AttentionHook::new(),
        }
    }

    pub fn base(&self) -> &UNet2DConditionModel {
        &self.base
    }

    pub fn motion(&self) -> Option<&MotionAdapter> {
        self.motion.as_ref().map(|(m, _)| m.as_ref())
    }

    /// The same UNet with `adapter`'s motion modules (replacing any earlier ones), their
    /// residuals scaled by `scale`. Fails when the adapter was made for other channel widths.
    pub fn with_motion(
        &self,
        adapter: Arc<MotionAdapter>,
        scale: f64,
    ) -> std::result::Result<Self, String> {
        self.check_motion_config(adapter.config())?;
        Ok(Self {
            motion: Some((adapter, scale)),
            ..self.clone()
        })
    }

    /// Whether motion modules of `config` fit this UNet (the same channels per block).
    pub fn check_motion_config(
        &self,
        config: &MotionAdapterConfig,
    ) -> std::result::Result<(), String> {
        let unet_channels = &self.base.config().block_out_channels;
        let motion_channels = &config.block_out_channels;
        if unet_channels != motion_channels {
            return Err(format!(
                "the motion module is for UNet channels {motion_channels:?}, this UNet has {unet_channels:?} \
                 (an SD 1.x motion module needs an SD 1.x checkpoint)"
            ));
        }
        Ok(())
    }

    /// The same UNet with `processor` on every attention layer whose path starts with `prefix`.
    pub fn with_processor(
        &self,
        prefix: &str,
        kind: Option<AttentionKind>,
        processor: Arc<dyn AttentionProcessor>,
    ) -> Self {
        Self {
            hook: self.hook.clone().with_processor(prefix, kind, processor),
            ..self.clone()
        }
    }
}

/// One call of a patched UNet: the latents and their conditioning, and what the call knows of
/// the run around it.
#[derive(Clone, Copy)]
pub struct UNetInputs<'a> {
    /// (B, C, F, H, W) latents, already scaled for the model.
    pub sample: &'a Tensor,
    /// The timestep: one for all videos, one per video, or one per frame (B·F).
    pub timestep: f64,
    /// Per-video text embeddings (B, S, D).
    pub text: &'a Tensor,
    /// The position in the clip of each evaluated frame (F values), for the motion modules'
    /// frame positions; `None` means 0, 1, …, F−1.
    pub frame_positions: Option<&'a [usize]>,
    pub step: Option<SamplingStep>,
    pub guidance: GuidanceLayout,
    /// The run's state, where processors record what they observe.
    pub run: Option<&'a RunObserver>,
}

impl PatchedUNet {
    /// Predicts the noise of `inputs.sample`, (B, C_out, F, H, W).
    pub fn forward(&self, inputs: &UNetInputs) -> Result<Tensor> {
        let latents = inputs.sample;
        let (batch, _, frames, _, _) = latents.dims5()?;
        let (text_batch, seq, dim) = inputs.text.dims3()?;
        if text_batch != batch {
            candle_core::bail!("{text_batch} text embeddings for {batch} videos");
        }
        // One embedding per frame, frame-major within each video, as the UNet expects.
        let per_frame = inputs
            .text
            .unsqueeze(1)?
            .broadcast_as((batch, frames, seq, dim))?
            .reshape((batch * frames, seq, dim))?;
        let per_frame = per_frame.to_dtype(latents.dtype())?;
        let hook = self
            .hook
            .clone()
            .with_step(inputs.step.map(|s| s.index));
        let motion = self
            .motion
            .as_ref()
            .map(|(m, s)| MotionPatch::with_scale(m, *s));
        self.base
            .forward(latents, inputs.timestep, &per_frame, motion, &hook)
    }

    /// The most frames one call can see (the motion modules' positional table), if bounded.
    pub fn max_frames(&self) -> Option<usize> {
        self.motion().map(|m| m.config().motion_max_seq_length)
    }
}
