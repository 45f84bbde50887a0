//! AnimateDiff motion modules (diffusers `MotionAdapter`), applied to the frozen UNet as a patch.

pub mod config;
pub mod positions;
pub mod transformer;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;

use std::sync::Arc;

use crate::models::call::ForwardPass;
use crate::models::weights::{self, NamedWeights};
pub use config::{
    Depth, MotionAdapterConfig, MotionAdapterLayout, MotionBlockLayout, DEFAULT_MOTION_HEADS,
};
pub use transformer::{TemporalTransformer, TemporalTransformerBlock, TemporalTransformerConfig};

/// The motion modules of every UNet block, addressed as in diffusers' `MotionAdapter` state dict
/// (`down_blocks.N.motion_modules.M.…`, `mid_block.motion_modules.0.…`, `up_blocks.N.…`).
#[derive(Debug, Clone)]
pub struct MotionAdapter {
    down_blocks: Vec<Vec<TemporalTransformer>>,
    mid_block: Option<Vec<TemporalTransformer>>,
    up_blocks: Vec<Vec<TemporalTransformer>>,
    config: MotionAdapterConfig,
    /// Every weight the modules were built from, by checkpoint key.
    weights: Arc<NamedWeights>,
    unet_norm_num_groups: usize,
}

/// The motion modules of one block (`<block>.motion_modules.M.…`), one per depth in `block`.
fn motion_modules(
    vb: VarBuilder,
    root: &str,
    block: &MotionBlockLayout,
    groups: usize,
    max_frames: usize,
) -> Result<Vec<TemporalTransformer>> {
    block
        .depths
        .iter()
        .enumerate()
        .map(|(m, &depth)| {
            let cfg = TemporalTransformerConfig {
                channels: block.channels,
                heads: block.heads,
                depth,
                groups,
                max_frames,
            };
            TemporalTransformer::new(vb.pp("motion_modules").pp(m), root, &cfg)
        })
        .collect()
}

impl MotionAdapter {
    /// Builds the adapter from diffusers-named weights. `unet_norm_num_groups` is the
    /// `norm_num_groups` of the UNet it will patch: the modules' GroupNorm uses it.
    pub fn new(
        vb: VarBuilder,
        cfg: &MotionAdapterConfig,
        unet_norm_num_groups: usize,
    ) -> Result<Self> {
        let (vb, recorded) = weights::recording(vb);
        let mut adapter = Self::build(vb, cfg, unet_norm_num_groups)?;
        adapter.weights = Arc::new(recorded.take());
        Ok(adapter)
    }

    /// The same adapter with the weights of `replaced` (by checkpoint key) in place of its
    /// own; every other weight is shared. Keys it does not have are ignored.
    pub fn with_weights(&self, replaced: &Arc<NamedWeights>) -> Result<Self> {
        let (dtype, device) = match self.weights.values().next() {
            Some(t) => (t.dtype(), t.device().clone()),
            None => return Ok(self.clone()),
        };
        let vb = weights::overlay(&self.weights, replaced, dtype, &device);
        let mut adapter = Self::build(vb, &self.config, self.unet_norm_num_groups)?;
        adapter.weights = self.weights.clone();
        Ok(adapter)
    }

    /// Every weight by checkpoint key, as the adapter was built.
    pub fn weights(&self) -> &NamedWeights {
        &self.weights
    }

    fn build(
        vb: VarBuilder,
        cfg: &MotionAdapterConfig,
        unet_norm_num_groups: usize,
    ) -> Result<Self> {
        if let Some(channels) = cfg.conv_in_channels {
            candle_core::bail!(
                "motion adapter with its own conv_in ({channels} input channels, PIA-style) is not \
                 supported"
            )
        }
        let root = vb.prefix();
        let layout = cfg.layout()?;
        let groups = unet_norm_num_groups;
        let max_frames = cfg.motion_max_seq_length;
        let blocks = |name: &str, layouts: &[MotionBlockLayout]| {
            layouts
                .iter()
                .enumerate()
                .map(|(i, block)| {
                    motion_modules(vb.pp(name).pp(i), &root, block, groups, max_frames)
                })
                .collect::<Result<Vec<_>>>()
        };
        let down_blocks = blocks("down_blocks", &layout.down_blocks)?;
        let mid_block = layout
            .mid_block
            .as_ref()
            .map(|block| motion_modules(vb.pp("mid_block"), &root, block, groups, max_frames))
            .transpose()?;
        let up_blocks = blocks("up_blocks", &layout.up_blocks)?;
        Ok(Self {
            down_blocks,
            mid_block,
            up_blocks,
            config: cfg.clone(),
            weights: Arc::default(),
            unet_norm_num_groups,
        })
    }

    /// Builds the adapter from a diffusers safetensors file
    /// (`diffusion_pytorch_model.safetensors` of a `MotionAdapter`).
    pub fn from_safetensors<P: AsRef<std::path::Path>>(
        files: &[P],
        cfg: &MotionAdapterConfig,
        unet_norm_num_groups: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // SAFETY: as for `UNet2DConditionModel::from_safetensors`: the weights are copied out of
        // the mapping while the adapter is built.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        Self::new(vb, cfg, unet_norm_num_groups)
    }

    pub fn config(&self) -> &MotionAdapterConfig {
        &self.config
    }

    /// Number of UNet levels the adapter covers.
    pub fn num_blocks(&self) -> usize {
        self.down_blocks.len()
    }

    /// The motion modules of down block `i` (empty past the last block).
    pub fn down_block(&self, i: usize) -> &[TemporalTransformer] {
        self.down_blocks.get(i).map_or(&[], Vec::as_slice)
    }

    /// The mid-block motion modules, when the adapter has them (AnimateDiff v2/v3).
    pub fn mid_block(&self) -> Option<&[TemporalTransformer]> {
        self.mid_block.as_deref()
    }

    /// The motion modules of up block `i` (empty past the last block).
    pub fn up_block(&self, i: usize) -> &[TemporalTransformer] {
        self.up_blocks.get(i).map_or(&[], Vec::as_slice)
    }

    /// The module at `slot`, its diffusers path (`down_blocks.0.motion_modules.1`).
    pub fn module(&self, slot: &str) -> Option<&TemporalTransformer> {
        self.modules().find(|m| m.path() == slot)
    }

    /// Every motion module, in forward order.
    pub fn modules(&self) -> impl Iterator<Item = &TemporalTransformer> {
        self.down_blocks
            .iter()
            .flatten()
            .chain(self.mid_block.iter().flatten())
            .chain(self.up_blocks.iter().flatten())
    }
}

/// A per-module multiplier of a motion patch, evaluated at every forward pass: it may read
/// values computed earlier in the pass (such as a motion amplitude) to gate the temporal branch.
pub trait ModuleGate: Send + Sync {
    /// The factor on the residual of the module in `slot` (its diffusers path, e.g.
    /// `up_blocks.1.motion_modules.0`); 1 leaves it as it is.
    fn gate(&self, slot: &str, pass: &ForwardPass) -> Result<f64>;
}

/// A gate that lets the motion modules act only while the noise level is within a range of
/// the sampling schedule, given as ComfyUI's percentages: from `start_percent` (0 = the
/// noisiest end) to `end_percent` (1 = clean). Percent p is the timestep (1 − p)·(T − 1) of
/// T training timesteps; outside a sampling loop (no step known) the modules act.
#[derive(Debug, Clone, Copy)]
pub struct TimestepRangeGate {
    pub start_percent: f64,
    pub end_percent: f64,
    pub train_timesteps: usize,
}

impl ModuleGate for TimestepRangeGate {
    fn gate(&self, _slot: &str, pass: &ForwardPass) -> Result<f64> {
        let Some(step) = pass.step else {
            return Ok(1.0);
        };
        let last = (self.train_timesteps - 1) as f64;
        let from = (1.0 - self.start_percent) * last;
        let inside_start = self.start_percent <= 0.0 || step.timestep <= from;
        let inside_end = self.end_percent >= 1.0 || step.timestep > (1.0 - self.end_percent) * last;
        Ok(if inside_start && inside_end { 1.0 } else { 0.0 })
    }
}

/// Motion modules applied to one UNet forward pass: each module's residual contribution is
/// multiplied by `scale` (1 = diffusers, 0 = the plain image UNet) and by the gate's factor for
/// its slot, when a gate is given.
#[derive(Clone, Copy)]
pub struct MotionPatch<'a> {
    pub adapter: &'a MotionAdapter,
    pub scale: f64,
    pub gate: Option<&'a dyn ModuleGate>,
}

impl<'a> MotionPatch<'a> {
    pub fn new(adapter: &'a MotionAdapter) -> Self {
        Self::with_scale(adapter, 1.0)
    }

    pub fn with_scale(adapter: &'a MotionAdapter, scale: f64) -> Self {
        Self {
            adapter,
            scale,
            gate: None,
        }
    }

    /// Runs this patch's module for `slot` on `xs` ((B·F, C, H, W) of `frames`-frame videos),
    /// or returns `xs` when the adapter has no module there.
    pub fn apply(
        &self,
        slot: &str,
        xs: &Tensor,
        frames: usize,
        pass: &ForwardPass,
    ) -> Result<Tensor> {
        let Some(module) = self.adapter.module(slot) else {
            return Ok(xs.clone());
        };
        let scale = match self.gate {
            Some(gate) => self.scale * gate.gate(slot, pass)?,
            None => self.scale,
        };
        module.forward(xs, frames, scale, pass)
    }
}
