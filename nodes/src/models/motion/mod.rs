//! AnimateDiff motion modules (diffusers `MotionAdapter`), applied to the frozen UNet as a patch.

pub mod positions;
pub mod transformer;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use std::sync::Arc;

use crate::models::call::ForwardPass;
use crate::models::weights::{self, NamedWeights};
use crate::models::unet::PerBlock;
pub use transformer::{TemporalTransformer, TemporalTransformerBlock, TemporalTransformerConfig};

/// Transformer depth of the motion modules of one block: one value for all, or one per module.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum Depth {
    PerModule(Vec<usize>),
    All(usize),
}

impl Depth {
    fn expand(&self, modules: usize, name: &str) -> Result<Vec<usize>> {
        match self {
            Depth::All(depth) => Ok(vec![*depth; modules]),
            Depth::PerModule(depths) if depths.len() == modules => Ok(depths.clone()),
            Depth::PerModule(depths) => candle_core::bail!(
                "motion adapter config `{name}` has {} depths for {modules} motion modules",
                depths.len()
            ),
        }
    }
}

/// diffusers' `MotionAdapter` config (`motion_adapter/config.json`), with its defaults (the
/// AnimateDiff v2/v3 layout).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MotionAdapterConfig {
    pub block_out_channels: Vec<usize>,
    pub motion_layers_per_block: PerBlock<usize>,
    pub motion_transformer_layers_per_block: PerBlock<Depth>,
    pub motion_mid_block_layers_per_block: usize,
    pub motion_transformer_layers_per_mid_block: Depth,
    pub motion_num_attention_heads: PerBlock<usize>,
    /// Ignored when the adapter is applied: the modules' GroupNorm uses the UNet's
    /// `norm_num_groups`, as `UNetMotionModel` does.
    pub motion_norm_num_groups: usize,
    /// Length of the frame-position table, the most frames one window may have (24 for v1/v2
    /// checkpoints of 16 frames, 32 for v3).
    pub motion_max_seq_length: usize,
    pub use_motion_mid_block: bool,
    /// Set by PIA-style adapters that replace the UNet's `conv_in`; not supported.
    pub conv_in_channels: Option<usize>,
}

impl Default for MotionAdapterConfig {
    fn default() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280, 1280],
            motion_layers_per_block: PerBlock::All(2),
            motion_transformer_layers_per_block: PerBlock::All(Depth::All(1)),
            motion_mid_block_layers_per_block: 1,
            motion_transformer_layers_per_mid_block: Depth::All(1),
            motion_num_attention_heads: PerBlock::All(8),
            motion_norm_num_groups: 32,
            motion_max_seq_length: 32,
            use_motion_mid_block: true,
            conv_in_channels: None,
        }
    }
}

impl MotionAdapterConfig {
    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }
}

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

fn motion_modules(
    vb: VarBuilder,
    root: &str,
    count: usize,
    depths: &[usize],
    base: TemporalTransformerConfig,
) -> Result<Vec<TemporalTransformer>> {
    (0..count)
        .map(|m| {
            let cfg = TemporalTransformerConfig {
                depth: depths[m],
                ..base
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
        let blocks = cfg.block_out_channels.len();
        let channels = &cfg.block_out_channels;
        let layers = cfg
            .motion_layers_per_block
            .expand(blocks, "motion_layers_per_block")?;
        let heads = cfg
            .motion_num_attention_heads
            .expand(blocks, "motion_num_attention_heads")?;
        let depths = cfg
            .motion_transformer_layers_per_block
            .expand(blocks, "motion_transformer_layers_per_block")?;
        let module_cfg = |level: usize| TemporalTransformerConfig {
            channels: channels[level],
            heads: heads[level],
            depth: 1,
            groups: unet_norm_num_groups,
            max_frames: cfg.motion_max_seq_length,
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for level in 0..blocks {
            let name = "motion_transformer_layers_per_block";
            let block_depths = depths[level].expand(layers[level], name)?;
            let vb_block = vb.pp("down_blocks").pp(level);
            down_blocks.push(motion_modules(
                vb_block,
                &root,
                layers[level],
                &block_depths,
                module_cfg(level),
            )?);
        }
        let mid_block = if cfg.use_motion_mid_block {
            let count = cfg.motion_mid_block_layers_per_block;
            let mid_depths = cfg
                .motion_transformer_layers_per_mid_block
                .expand(count, "motion_transformer_layers_per_mid_block")?;
            let vb_mid = vb.pp("mid_block");
            Some(motion_modules(
                vb_mid,
                &root,
                count,
                &mid_depths,
                module_cfg(blocks - 1),
            )?)
        } else {
            None
        };
        let mut up_blocks = Vec::with_capacity(blocks);
        for i in 0..blocks {
            let level = blocks - 1 - i;
            let count = layers[level] + 1;
            let name = "motion_transformer_layers_per_block";
            let block_depths = depths[level].expand(count, name)?;
            let vb_block = vb.pp("up_blocks").pp(i);
            up_blocks.push(motion_modules(
                vb_block,
                &root,
                count,
                &block_depths,
                module_cfg(level),
            )?);
        }
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
    pub fn apply(&self, slot: &str, xs: &Tensor, frames: usize, pass: &ForwardPass) -> Result<Tensor> {
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
