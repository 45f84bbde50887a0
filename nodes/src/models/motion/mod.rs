//! AnimateDiff motion modules (diffusers `MotionAdapter`), applied to the frozen UNet as a patch.

pub mod config;
pub mod positions;
pub mod transformer;

use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;

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

    /// Every motion module, in forward order.
    pub fn modules(&self) -> impl Iterator<Item = &TemporalTransformer> {
        self.down_blocks
            .iter()
            .flatten()
            .chain(self.mid_block.iter().flatten())
            .chain(self.up_blocks.iter().flatten())
    }
}

/// Motion modules applied to one UNet forward pass: `scale` multiplies each module's residual
/// contribution (1 = diffusers, 0 = the plain image UNet).
#[derive(Debug, Clone, Copy)]
pub struct MotionPatch<'a> {
    pub adapter: &'a MotionAdapter,
    pub scale: f64,
}

impl<'a> MotionPatch<'a> {
    pub fn new(adapter: &'a MotionAdapter) -> Self {
        Self {
            adapter,
            scale: 1.0,
        }
    }

    pub fn with_scale(adapter: &'a MotionAdapter, scale: f64) -> Self {
        Self { adapter, scale }
    }
}
