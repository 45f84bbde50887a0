//! The AnimateDiff motion module: a transformer over the frames at each pixel (diffusers
//! `AnimateDiffTransformer3D` with `BasicTransformerBlock`s configured for temporal
//! self-attention).

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use super::positions::sinusoidal_positions;
use crate::models::attention::{AttentionKind, TokenLayout};
use crate::models::call::ForwardPass;
use crate::models::unet::linear::Linear;
use crate::models::unet::norm::{GroupNorm, LayerNorm};
use crate::models::unet::transformer::{
    channel_projection, layer_norm, module_path, Attention, FeedForward,
};

/// Settings of one motion module.
#[derive(Debug, Clone, Copy)]
pub struct TemporalTransformerConfig {
    pub channels: usize,
    pub heads: usize,
    pub depth: usize,
    /// Groups of the input GroupNorm: the UNet's `norm_num_groups`, as in `UNetMotionModel`.
    pub groups: usize,
    pub max_frames: usize,
}

/// Two temporal self-attentions (each after a LayerNorm and the frame positions) and a GEGLU
/// feed-forward, all residual.
#[derive(Debug, Clone)]
pub struct TemporalTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
    /// (1, max_frames, C) sinusoidal frame positions.
    positions: Tensor,
}

impl TemporalTransformerBlock {
    pub fn new(vb: VarBuilder, root: &str, cfg: &TemporalTransformerConfig) -> Result<Self> {
        let dim = cfg.channels;
        let head_dim = dim / cfg.heads;
        let attention = |name: &str| {
            Attention::new(
                vb.pp(name),
                root,
                dim,
                dim,
                cfg.heads,
                head_dim,
                AttentionKind::Temporal,
            )
        };
        let pe = vb.pp("pos_embed");
        let positions = if pe.contains_tensor("pe") {
            pe.get((1, cfg.max_frames, dim), "pe")?
        } else {
            sinusoidal_positions(cfg.max_frames, dim, vb.device())?
                .to_dtype(vb.dtype())?
                .unsqueeze(0)?
        };
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), dim)?,
            attn1: attention("attn1")?,
            norm2: layer_norm(vb.pp("norm2"), dim)?,
            attn2: attention("attn2")?,
            norm3: layer_norm(vb.pp("norm3"), dim)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
            positions,
        })
    }

    /// `xs`: (N, F, C), one row of F frames per pixel → (N, F, C). The frames sit at
    /// `pass.frame_positions` in the clip (0, 1, …, F−1 when not given), which selects their
    /// rows of the position table.
    pub fn forward(&self, xs: &Tensor, pass: &ForwardPass, layout: TokenLayout) -> Result<Tensor> {
        let (_pixels, frames, _channels) = xs.dims3()?;
        let positions = self.frame_positions(frames, pass.frame_positions)?;
        let normed = self.norm1.forward(xs)?.broadcast_add(&positions)?;
        let xs = self.attn1.forward_add(&normed, None, pass, layout, xs)?;
        let normed = self.norm2.forward(&xs)?.broadcast_add(&positions)?;
        let xs = self.attn2.forward_add(&normed, None, pass, layout, &xs)?;
        self.ff.forward_add(&self.norm3.forward(&xs)?, &xs)
    }

    /// The (1, F, C) rows of the position table for frames at `positions`.
    fn frame_positions(&self, frames: usize, positions: Option<&[usize]>) -> Result<Tensor> {
        let Some(positions) = positions else {
            return self.positions.narrow(1, 0, frames);
        };
        let table_len = self.positions.dim(1)?;
        if positions.len() != frames {
            candle_core::bail!("{} frame positions for {frames} frames", positions.len())
        }
        if let Some(&beyond) = positions.iter().find(|&&p| p >= table_len) {
            candle_core::bail!(
                "frame position {beyond} is beyond the motion module's table of {table_len} \
                 positions (motion_max_seq_length)"
            )
        }
        let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let index = Tensor::from_vec(index, frames, self.positions.device())?;
        self.positions.index_select(&index, 1)
    }
}

/// GroupNorm over each video → proj_in → temporal blocks over the frames of each pixel →
/// proj_out, added to the input.
#[derive(Debug, Clone)]
pub struct TemporalTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<TemporalTransformerBlock>,
    proj_out: Linear,
    channels: usize,
    max_frames: usize,
    path: String,
}

impl TemporalTransformer {
    pub fn new(vb: VarBuilder, root: &str, cfg: &TemporalTransformerConfig) -> Result<Self> {
        let channels = cfg.channels;
        if cfg.heads == 0 || !channels.is_multiple_of(cfg.heads) {
            candle_core::bail!(
                "{}: {channels} channels cannot be split into {} heads",
                vb.prefix(),
                cfg.heads
            )
        }
        let norm = GroupNorm::new(vb.pp("norm"), cfg.groups, channels, 1e-6)?;
        let proj_in = channel_projection(vb.pp("proj_in"), channels, channels, false)?;
        let blocks = (0..cfg.depth)
            .map(|i| TemporalTransformerBlock::new(vb.pp("transformer_blocks").pp(i), root, cfg))
            .collect::<Result<Vec<_>>>()?;
        let proj_out = channel_projection(vb.pp("proj_out"), channels, channels, false)?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
            channels,
            max_frames: cfg.max_frames,
            path: module_path(&vb, root),
        })
    }

    pub fn channels(&self) -> usize {
        self.channels
    }

    /// The diffusers module path, e.g. `down_blocks.0.motion_modules.0`.
    pub fn path(&self) -> &str {
        &self.path
    }

    /// `xs`: (B·F, C, H, W), frame-major within each video → (B·F, C, H, W). `scale` multiplies
    /// the module's contribution (1 = diffusers).
    pub fn forward(
        &self,
        xs: &Tensor,
        frames: usize,
        scale: f64,
        pass: &ForwardPass,
    ) -> Result<Tensor> {
        let (batch_frames, channels, height, width) = xs.dims4()?;
        if frames == 0 || batch_frames % frames != 0 {
            candle_core::bail!(
                "{}: {batch_frames} rows are not a whole number of {frames}-frame videos",
                self.path
            )
        }
        if frames > self.max_frames {
            candle_core::bail!(
                "{}: {frames} frames exceed the maximum of {}",
                self.path,
                self.max_frames
            )
        }
        let batch = batch_frames / frames;
        let pixels = height * width;
        // GroupNorm over each whole video, straight into one row of frames per pixel.
        let rows =
            self.norm
                .forward_to_rows(xs, frames)?
                .reshape((batch * pixels, frames, channels))?;
        let layout = TokenLayout {
            videos: batch,
            frames,
            height,
            width,
        };
        let mut hidden = self.proj_in.forward(&rows)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden, pass, layout)?;
        }
        let hidden = hidden.reshape((batch, pixels, frames, channels))?;
        self.proj_out.forward_to_images_add(&hidden, xs, scale)
    }
}
