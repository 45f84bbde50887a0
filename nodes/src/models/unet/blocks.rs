//! The down, mid and up blocks of the UNet, with the motion-module slots of diffusers'
//! `CrossAttnDownBlockMotion`, `DownBlockMotion`, `UNetMidBlockCrossAttnMotion`,
//! `CrossAttnUpBlockMotion` and `UpBlockMotion`: after each spatial transformer (or each resnet in
//! blocks without one) a motion module runs when a motion patch is applied. Right after each
//! spatial transformer (`…attentions.M`), before that, the temporal adapter's module runs when
//! one is applied.

use candle_core::{Result, Tensor};

use super::resnet::{Downsample2D, ResnetBlock2D, ResnetConfig, Upsample2D};
use super::transformer::{SpatialTransformer, SpatialTransformerConfig};
use crate::models::call::ForwardPass;
use crate::models::motion::MotionPatch;
use crate::models::temporal_adapter::TemporalAdapter;
use candle_nn::VarBuilder;

/// Everything a block's forward reads besides its input.
#[derive(Clone, Copy)]
pub(crate) struct BlockInputs<'a> {
    /// SiLU of the time embedding, (N, T).
    pub temb_act: &'a Tensor,
    /// Text embeddings, (N, S, D).
    pub text: &'a Tensor,
    /// Frames per video: N = videos × frames.
    pub frames: usize,
    /// The motion patches, applied in order at every motion-module slot.
    pub motion: &'a [MotionPatch<'a>],
    /// Temporal adapters, applied in order after every spatial transformer.
    pub adapters: &'a [&'a TemporalAdapter],
    pub pass: &'a ForwardPass<'a>,
}

impl BlockInputs<'_> {
    fn observe(&self, point: impl FnOnce() -> String, xs: &Tensor) -> Result<()> {
        self.pass.observe(point, xs)
    }

    fn spatial(&self, attention: &SpatialTransformer, xs: &Tensor) -> Result<Tensor> {
        attention.forward(xs, self.text, self.pass, self.frames)
    }

    /// The spatial transformer at `path` (`down_blocks.0.attentions.1`, built only when an
    /// adapter is applied), then every temporal adapter's module there, in patch order.
    fn spatial_then_adapters(
        &self,
        attention: &SpatialTransformer,
        path: impl FnOnce() -> String,
        xs: &Tensor,
    ) -> Result<Tensor> {
        let xs = self.spatial(attention, xs)?;
        if self.adapters.is_empty() {
            return Ok(xs);
        }
        let path = path();
        self.adapters.iter().try_fold(xs, |xs, adapter| {
            adapter.apply(&path, &xs, self.frames, self.pass)
        })
    }

    /// The motion-module slot `slot` (its diffusers path): every motion patch that has a module
    /// there runs, in patch order.
    fn temporal(&self, slot: &str, xs: &Tensor) -> Result<Tensor> {
        let mut xs = xs.clone();
        for patch in self.motion {
            xs = patch.apply(slot, &xs, self.frames, self.pass)?;
        }
        Ok(xs)
    }
}

/// `CrossAttnDownBlock2D` (with spatial transformers) or `DownBlock2D` (without).
#[derive(Debug, Clone)]
pub struct DownBlock {
    index: usize,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    downsampler: Option<Downsample2D>,
    out_channels: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct DownBlockConfig {
    pub index: usize,
    pub in_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub transformer: Option<SpatialTransformerConfig>,
    /// Padding of the downsampling convolution, or `None` for the last block.
    pub downsample_padding: Option<usize>,
}

impl DownBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        root: &str,
        cfg: &DownBlockConfig,
        resnet_cfg: &ResnetConfig,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(cfg.layers);
        let mut attentions = Vec::new();
        for j in 0..cfg.layers {
            let in_channels = if j == 0 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            let vb_resnet = vb.pp("resnets").pp(j);
            resnets.push(ResnetBlock2D::new(
                vb_resnet,
                in_channels,
                cfg.out_channels,
                resnet_cfg,
            )?);
            if let Some(tcfg) = &cfg.transformer {
                let vb_attn = vb.pp("attentions").pp(j);
                attentions.push(SpatialTransformer::new(
                    vb_attn,
                    root,
                    cfg.out_channels,
                    tcfg,
                )?);
            }
        }
        let downsampler = match cfg.downsample_padding {
            Some(padding) => Some(Downsample2D::new(
                vb.pp("downsamplers").pp(0),
                cfg.out_channels,
                padding,
            )?),
            None => None,
        };
        Ok(Self {
            index: cfg.index,
            resnets,
            attentions,
            downsampler,
            out_channels: cfg.out_channels,
        })
    }

    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    pub fn out_channels(&self) -> usize {
        self.out_channels
    }

    /// (N, C_in, H, W) → the block output (N, C_out, H', W') and the skip connections it leaves
    /// for the up path (one per layer, plus the downsampled output).
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        inputs: &BlockInputs,
    ) -> Result<(Tensor, Vec<Tensor>)> {
        let i = self.index;
        let mut skips = Vec::with_capacity(self.resnets.len() + 1);
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            xs = resnet.forward(&xs, inputs.temb_act)?;
            inputs.observe(|| format!("down_blocks.{i}.resnets.{j}"), &xs)?;
            if let Some(attention) = self.attentions.get(j) {
                let path = || format!("down_blocks.{i}.attentions.{j}");
                xs = inputs.spatial_then_adapters(attention, path, &xs)?;
                inputs.observe(|| format!("down_blocks.{i}.attentions.{j}"), &xs)?;
            }
            if !inputs.motion.is_empty() {
                xs = inputs.temporal(&format!("down_blocks.{i}.motion_modules.{j}"), &xs)?;
                inputs.observe(|| format!("down_blocks.{i}.motion_modules.{j}"), &xs)?;
            }
            skips.push(xs.clone());
        }
        if let Some(downsampler) = &self.downsampler {
            xs = downsampler.forward(&xs)?;
            skips.push(xs.clone());
        }
        inputs.observe(|| format!("down_blocks.{i}"), &xs)?;
        Ok((xs, skips))
    }

    /// The diffusers paths of the motion-module slots after each layer, with their channels.
    pub(crate) fn motion_slots(&self) -> Vec<(String, usize)> {
        (0..self.resnets.len())
            .map(|j| {
                let slot = format!("down_blocks.{}.motion_modules.{j}", self.index);
                (slot, self.out_channels)
            })
            .collect()
    }
}

/// `UNetMidBlock2DCrossAttn`: resnet, then (transformer, motion module, resnet) per layer.
#[derive(Debug, Clone)]
pub struct MidBlock {
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    channels: usize,
}

impl MidBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        root: &str,
        channels: usize,
        transformer: &SpatialTransformerConfig,
        resnet_cfg: &ResnetConfig,
    ) -> Result<Self> {
        let layers = 1;
        let resnets = (0..=layers)
            .map(|j| ResnetBlock2D::new(vb.pp("resnets").pp(j), channels, channels, resnet_cfg))
            .collect::<Result<Vec<_>>>()?;
        let attentions = (0..layers)
            .map(|j| {
                SpatialTransformer::new(vb.pp("attentions").pp(j), root, channels, transformer)
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            resnets,
            attentions,
            channels,
        })
    }

    pub fn layers(&self) -> usize {
        self.attentions.len()
    }

    /// (N, C, H, W) → (N, C, H, W).
    pub(crate) fn forward(&self, xs: &Tensor, inputs: &BlockInputs) -> Result<Tensor> {
        let mut xs = self.resnets[0].forward(xs, inputs.temb_act)?;
        for (j, (attention, resnet)) in self.attentions.iter().zip(&self.resnets[1..]).enumerate() {
            xs = inputs.spatial_then_adapters(
                attention,
                || format!("mid_block.attentions.{j}"),
                &xs,
            )?;
            if !inputs.motion.is_empty() {
                xs = inputs.temporal(&format!("mid_block.motion_modules.{j}"), &xs)?;
            }
            xs = resnet.forward(&xs, inputs.temb_act)?;
        }
        inputs.observe(|| "mid_block".to_string(), &xs)?;
        Ok(xs)
    }

    /// The diffusers paths of the motion-module slots, with their channels.
    pub(crate) fn motion_slots(&self) -> Vec<(String, usize)> {
        (0..self.attentions.len())
            .map(|j| (format!("mid_block.motion_modules.{j}"), self.channels))
            .collect()
    }
}

/// `CrossAttnUpBlock2D` (with spatial transformers) or `UpBlock2D` (without).
#[derive(Debug, Clone)]
pub struct UpBlock {
    index: usize,
    resnets: Vec<ResnetBlock2D>,
    attentions: Vec<SpatialTransformer>,
    upsampler: Option<Upsample2D>,
    out_channels: usize,
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct UpBlockConfig {
    pub index: usize,
    /// Channels of the deepest skip this block consumes (the level below's output).
    pub in_channels: usize,
    pub prev_output_channels: usize,
    pub out_channels: usize,
    pub layers: usize,
    pub transformer: Option<SpatialTransformerConfig>,
    pub upsample: bool,
}

impl UpBlock {
    pub(crate) fn new(
        vb: VarBuilder,
        root: &str,
        cfg: &UpBlockConfig,
        resnet_cfg: &ResnetConfig,
    ) -> Result<Self> {
        let mut resnets = Vec::with_capacity(cfg.layers);
        let mut attentions = Vec::new();
        for j in 0..cfg.layers {
            let skip_channels = if j == cfg.layers - 1 {
                cfg.in_channels
            } else {
                cfg.out_channels
            };
            let in_channels = if j == 0 {
                cfg.prev_output_channels
            } else {
                cfg.out_channels
            };
            let vb_resnet = vb.pp("resnets").pp(j);
            resnets.push(ResnetBlock2D::new(
                vb_resnet,
                in_channels + skip_channels,
                cfg.out_channels,
                resnet_cfg,
            )?);
            if let Some(tcfg) = &cfg.transformer {
                let vb_attn = vb.pp("attentions").pp(j);
                attentions.push(SpatialTransformer::new(
                    vb_attn,
                    root,
                    cfg.out_channels,
                    tcfg,
                )?);
            }
        }
        let upsampler = if cfg.upsample {
            Some(Upsample2D::new(
                vb.pp("upsamplers").pp(0),
                cfg.out_channels,
            )?)
        } else {
            None
        };
        Ok(Self {
            index: cfg.index,
            resnets,
            attentions,
            upsampler,
            out_channels: cfg.out_channels,
        })
    }

    pub fn layers(&self) -> usize {
        self.resnets.len()
    }

    /// (N, C, H, W) plus the skips it pops from the end of `skips` → (N, C_out, H', W'), upsampled
    /// to the size of the next skip when the block has an upsampler.
    pub(crate) fn forward(
        &self,
        xs: &Tensor,
        skips: &mut Vec<Tensor>,
        inputs: &BlockInputs,
    ) -> Result<Tensor> {
        let i = self.index;
        let mut xs = xs.clone();
        for (j, resnet) in self.resnets.iter().enumerate() {
            let skip = skips.pop().ok_or_else(|| {
                candle_core::Error::Msg(format!("up_blocks.{i}: no skip connection left"))
            })?;
            xs = resnet.forward(&Tensor::cat(&[&xs, &skip], 1)?, inputs.temb_act)?;
            if let Some(attention) = self.attentions.get(j) {
                let path = || format!("up_blocks.{i}.attentions.{j}");
                xs = inputs.spatial_then_adapters(attention, path, &xs)?;
            }
            if !inputs.motion.is_empty() {
                xs = inputs.temporal(&format!("up_blocks.{i}.motion_modules.{j}"), &xs)?;
            }
        }
        if let Some(upsampler) = &self.upsampler {
            let (_, _, height, width) = skips
                .last()
                .ok_or_else(|| {
                    candle_core::Error::Msg(format!("up_blocks.{i}: no skip left to upsample to"))
                })?
                .dims4()?;
            xs = upsampler.forward(&xs, (height, width))?;
        }
        inputs.observe(|| format!("up_blocks.{i}"), &xs)?;
        Ok(xs)
    }

    /// The diffusers paths of the motion-module slots after each layer, with their channels.
    pub(crate) fn motion_slots(&self) -> Vec<(String, usize)> {
        (0..self.resnets.len())
            .map(|j| {
                let slot = format!("up_blocks.{}.motion_modules.{j}", self.index);
                (slot, self.out_channels)
            })
            .collect()
    }
}
