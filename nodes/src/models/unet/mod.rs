//! The Stable Diffusion 1.x UNet (diffusers `UNet2DConditionModel`), run on videos as frames, with
//! AnimateDiff motion modules applied as a patch (diffusers `UNetMotionModel` semantics).
//!
//! The UNet is frozen: motion modules, attention processors and taps are passed to
//! [`UNet2DConditionModel::forward`] as [`UNetPatches`] rather than baked into the model, so one
//! loaded UNet serves any adapter, any motion scale, or none.
//! Without motion modules every frame is denoised as an independent image.

pub mod blocks;
pub mod conv;
pub mod embeddings;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod transformer;

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::attention::AttentionHook;
use crate::models::call::{
    FeatureTap, ForwardPass, ForwardValues, GuidanceLayout, RunObserver, SamplingStep,
};
use crate::models::motion::{MotionAdapter, MotionPatch};
use crate::models::temporal_adapter::TemporalAdapter;
use crate::models::weights::{self, NamedWeights};
use blocks::{BlockInputs, DownBlock, DownBlockConfig, MidBlock, UpBlock, UpBlockConfig};
use conv::Conv2d;
use embeddings::{timestep_features, TimestepEmbedding};
pub use embeddings::{PerFrame, Timestep};
use norm::GroupNorm;
use resnet::ResnetConfig;
use transformer::SpatialTransformerConfig;

/// A setting given once for all blocks or as one value per block (diffusers accepts both).
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(untagged)]
pub enum PerBlock<T> {
    PerBlock(Vec<T>),
    All(T),
}

impl<T: Clone> PerBlock<T> {
    /// The values for `blocks` blocks; errors when a list has another length.
    pub fn expand(&self, blocks: usize, name: &str) -> Result<Vec<T>> {
        match self {
            PerBlock::All(value) => Ok(vec![value.clone(); blocks]),
            PerBlock::PerBlock(values) if values.len() == blocks => Ok(values.clone()),
            PerBlock::PerBlock(values) => candle_core::bail!(
                "config `{name}` has {} entries for {blocks} blocks",
                values.len()
            ),
        }
    }
}

fn default_down_block_types() -> Vec<String> {
    [
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "CrossAttnDownBlock2D",
        "DownBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

fn default_up_block_types() -> Vec<String> {
    [
        "UpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
        "CrossAttnUpBlock2D",
    ]
    .map(String::from)
    .to_vec()
}

/// diffusers' `UNet2DConditionModel` config (`unet/config.json`); missing fields take the
/// Stable Diffusion 1.5 values. Fields of variants this port does not implement (class or
/// addition embeddings, other resnet time-shift modes, …) are read so that a config that sets
/// them is refused by [`UNet2DConditionModel::new`] instead of being silently misread.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct UNet2DConditionConfig {
    pub in_channels: usize,
    pub out_channels: usize,
    pub center_input_sample: bool,
    pub flip_sin_to_cos: bool,
    pub freq_shift: f64,
    pub down_block_types: Vec<String>,
    pub mid_block_type: Option<String>,
    pub up_block_types: Vec<String>,
    pub only_cross_attention: PerBlock<bool>,
    pub block_out_channels: Vec<usize>,
    pub layers_per_block: PerBlock<usize>,
    pub downsample_padding: usize,
    pub mid_block_scale_factor: f64,
    pub act_fn: String,
    pub norm_num_groups: usize,
    pub norm_eps: f64,
    pub cross_attention_dim: PerBlock<usize>,
    pub transformer_layers_per_block: PerBlock<usize>,
    pub reverse_transformer_layers_per_block: Option<Vec<usize>>,
    /// The number of attention heads per block, despite its name (legacy diffusers naming).
    pub attention_head_dim: PerBlock<usize>,
    /// When set, takes precedence over `attention_head_dim` as the number of heads.
    pub num_attention_heads: Option<PerBlock<usize>>,
    pub dual_cross_attention: bool,
    pub use_linear_projection: bool,
    pub upcast_attention: bool,
    pub class_embed_type: Option<String>,
    pub addition_embed_type: Option<String>,
    pub num_class_embeds: Option<usize>,
    pub encoder_hid_dim: Option<usize>,
    pub resnet_time_scale_shift: String,
    pub resnet_skip_time_act: bool,
    pub resnet_out_scale_factor: f64,
    pub time_embedding_type: String,
    pub time_embedding_dim: Option<usize>,
    pub time_embedding_act_fn: Option<String>,
    pub timestep_post_act: Option<String>,
    pub time_cond_proj_dim: Option<usize>,
    pub conv_in_kernel: usize,
    pub conv_out_kernel: usize,
    pub attention_type: String,
    pub cross_attention_norm: Option<String>,
}

impl Default for UNet2DConditionConfig {
    fn default() -> Self {
        Self {
            in_channels: 4,
            out_channels: 4,
            center_input_sample: false,
            flip_sin_to_cos: true,
            freq_shift: 0.0,
            down_block_types: default_down_block_types(),
            mid_block_type: Some("UNetMidBlock2DCrossAttn".to_string()),
            up_block_types: default_up_block_types(),
            only_cross_attention: PerBlock::All(false),
            block_out_channels: vec![320, 640, 1280, 1280],
            layers_per_block: PerBlock::All(2),
            downsample_padding: 1,
            mid_block_scale_factor: 1.0,
            act_fn: "silu".to_string(),
            norm_num_groups: 32,
            norm_eps: 1e-5,
            cross_attention_dim: PerBlock::All(768),
            transformer_layers_per_block: PerBlock::All(1),
            reverse_transformer_layers_per_block: None,
            attention_head_dim: PerBlock::All(8),
            num_attention_heads: None,
            dual_cross_attention: false,
            use_linear_projection: false,
            upcast_attention: false,
            class_embed_type: None,
            addition_embed_type: None,
            num_class_embeds: None,
            encoder_hid_dim: None,
            resnet_time_scale_shift: "default".to_string(),
            resnet_skip_time_act: false,
            resnet_out_scale_factor: 1.0,
            time_embedding_type: "positional".to_string(),
            time_embedding_dim: None,
            time_embedding_act_fn: None,
            timestep_post_act: None,
            time_cond_proj_dim: None,
            conv_in_kernel: 3,
            conv_out_kernel: 3,
            attention_type: "default".to_string(),
            cross_attention_norm: None,
        }
    }
}

impl UNet2DConditionConfig {
    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Refuses the variants this port does not implement.
    fn check_supported(&self) -> Result<()> {
        let unsupported = |what: &str| -> Result<()> {
            candle_core::bail!("UNet config: {what} is not supported")
        };
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            return unsupported("an empty block_out_channels");
        }
        if self.down_block_types.len() != blocks || self.up_block_types.len() != blocks {
            candle_core::bail!(
                "UNet config: {} down and {} up block types for {blocks} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            )
        }
        if self
            .only_cross_attention
            .expand(blocks, "only_cross_attention")?
            .contains(&true)
        {
            return unsupported("only_cross_attention");
        }
        if self.dual_cross_attention {
            return unsupported("dual_cross_attention");
        }
        if self.act_fn != "silu" {
            return unsupported(&format!("act_fn {:?}", self.act_fn));
        }
        if let Some(kind) = &self.class_embed_type {
            return unsupported(&format!("class_embed_type {kind:?}"));
        }
        if self.num_class_embeds.is_some() {
            return unsupported("num_class_embeds");
        }
        if let Some(kind) = &self.addition_embed_type {
            return unsupported(&format!("addition_embed_type {kind:?}"));
        }
        if self.encoder_hid_dim.is_some() {
            return unsupported("encoder_hid_dim");
        }
        if self.resnet_time_scale_shift != "default" {
            return unsupported(&format!(
                "resnet_time_scale_shift {:?}",
                self.resnet_time_scale_shift
            ));
        }
        if self.resnet_skip_time_act || self.resnet_out_scale_factor != 1.0 {
            return unsupported("resnet_skip_time_act / resnet_out_scale_factor");
        }
        if self.time_embedding_type != "positional" {
            return unsupported(&format!(
                "time_embedding_type {:?}",
                self.time_embedding_type
            ));
        }
        if self.time_embedding_act_fn.is_some() || self.timestep_post_act.is_some() {
            return unsupported("time_embedding_act_fn / timestep_post_act");
        }
        if self.time_cond_proj_dim.is_some() {
            return unsupported("time_cond_proj_dim");
        }
        if self.attention_type != "default" {
            return unsupported(&format!("attention_type {:?}", self.attention_type));
        }
        if self.cross_attention_norm.is_some() {
            return unsupported("cross_attention_norm");
        }
        if self.conv_in_kernel.is_multiple_of(2) || self.conv_out_kernel.is_multiple_of(2) {
            return unsupported("an even conv_in/conv_out kernel");
        }
        match self.mid_block_type.as_deref() {
            None | Some("UNetMidBlock2DCrossAttn") => Ok(()),
            Some(other) => unsupported(&format!("mid_block_type {other:?}")),
        }
    }
}

fn has_cross_attention(block_type: &str) -> Result<bool> {
    match block_type {
        "CrossAttnDownBlock2D"
        | "CrossAttnUpBlock2D"
        | "CrossAttnDownBlockMotion"
        | "CrossAttnUpBlockMotion" => Ok(true),
        "DownBlock2D" | "UpBlock2D" | "DownBlockMotion" | "UpBlockMotion" => Ok(false),
        other => candle_core::bail!("UNet config: block type {other:?} is not supported"),
    }
}

/// The Stable Diffusion 1.x conditional UNet.
#[derive(Debug, Clone)]
pub struct UNet2DConditionModel {
    conv_in: Conv2d,
    time_embedding: TimestepEmbedding,
    down_blocks: Vec<DownBlock>,
    mid_block: Option<MidBlock>,
    up_blocks: Vec<UpBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
    config: UNet2DConditionConfig,
    /// Every weight the layers were built from, by checkpoint key (shared with the layers).
    weights: Arc<NamedWeights>,
}

impl UNet2DConditionModel {
    /// Builds the UNet from diffusers-named weights (`conv_in.weight`, `down_blocks.0.…`). The
    /// attention layers report their paths relative to `vb`'s prefix.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        let (vb, recorded) = weights::recording(vb);
        let mut unet = Self::build(vb, cfg)?;
        unet.weights = Arc::new(recorded.take());
        Ok(unet)
    }

    /// The same UNet with the weights of `replaced` (by checkpoint key) in place of its own;
    /// every other weight is shared. Keys this UNet does not have are ignored (see
    /// [`weights::matching`] to find them).
    pub fn with_weights(&self, replaced: &Arc<NamedWeights>) -> Result<Self> {
        let vb = weights::overlay(&self.weights, replaced, self.dtype(), self.device());
        let mut unet = Self::build(vb, &self.config)?;
        unet.weights = self.weights.clone();
        Ok(unet)
    }

    /// Every weight by checkpoint key, as the model was built.
    pub fn weights(&self) -> &NamedWeights {
        &self.weights
    }

    fn build(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
        cfg.check_supported()?;
        let root = vb.prefix();
        let blocks = cfg.block_out_channels.len();
        let channels = &cfg.block_out_channels;
        let layers = cfg.layers_per_block.expand(blocks, "layers_per_block")?;
        let heads = match &cfg.num_attention_heads {
            Some(heads) => heads.expand(blocks, "num_attention_heads")?,
            None => cfg
                .attention_head_dim
                .expand(blocks, "attention_head_dim")?,
        };
        let cross_dims = cfg
            .cross_attention_dim
            .expand(blocks, "cross_attention_dim")?;
        let depths = cfg
            .transformer_layers_per_block
            .expand(blocks, "transformer_layers_per_block")?;
        let reverse_depths = match &cfg.reverse_transformer_layers_per_block {
            Some(depths) if depths.len() == blocks => depths.clone(),
            Some(depths) => candle_core::bail!(
                "UNet config: reverse_transformer_layers_per_block has {} entries for {blocks} blocks",
                depths.len()
            ),
            None => depths.iter().rev().copied().collect(),
        };
        for (i, (&c, &h)) in channels.iter().zip(&heads).enumerate() {
            if h == 0 || c % h != 0 {
                candle_core::bail!("UNet config: block {i} has {c} channels for {h} heads")
            }
        }
        let transformer = |i: usize, depth: usize| SpatialTransformerConfig {
            heads: heads[i],
            depth,
            cross_attention_dim: cross_dims[i],
            groups: cfg.norm_num_groups,
            use_linear_projection: cfg.use_linear_projection,
        };

        let conv = |vb: VarBuilder, cin: usize, cout: usize, kernel: usize| {
            Conv2d::new(vb, cin, cout, kernel, 1, (kernel - 1) / 2)
        };
        let conv_in = conv(
            vb.pp("conv_in"),
            cfg.in_channels,
            channels[0],
            cfg.conv_in_kernel,
        )?;
        let temb_channels = cfg.time_embedding_dim.unwrap_or(4 * channels[0]);
        let time_embedding =
            TimestepEmbedding::new(vb.pp("time_embedding"), channels[0], temb_channels)?;
        let resnet_cfg = ResnetConfig {
            groups: cfg.norm_num_groups,
            eps: cfg.norm_eps,
            temb_channels,
            output_scale_factor: 1.0,
        };

        let mut down_blocks = Vec::with_capacity(blocks);
        for (i, block_type) in cfg.down_block_types.iter().enumerate() {
            let is_final = i + 1 == blocks;
            let block_cfg = DownBlockConfig {
                index: i,
                in_channels: if i == 0 { channels[0] } else { channels[i - 1] },
                out_channels: channels[i],
                layers: layers[i],
                transformer: has_cross_attention(block_type)?.then(|| transformer(i, depths[i])),
                downsample_padding: (!is_final).then_some(cfg.downsample_padding),
            };
            let vb_block = vb.pp("down_blocks").pp(i);
            down_blocks.push(DownBlock::new(vb_block, &root, &block_cfg, &resnet_cfg)?);
        }

        let mid_block = match cfg.mid_block_type {
            Some(_) => {
                let mid_resnet_cfg = ResnetConfig {
                    output_scale_factor: cfg.mid_block_scale_factor,
                    ..resnet_cfg
                };
                let last = blocks - 1;
                Some(MidBlock::new(
                    vb.pp("mid_block"),
                    &root,
                    channels[last],
                    &transformer(last, depths[last]),
                    &mid_resnet_cfg,
                )?)
            }
            None => None,
        };

        let mut up_blocks = Vec::with_capacity(blocks);
        for (i, block_type) in cfg.up_block_types.iter().enumerate() {
            let level = blocks - 1 - i;
            let block_cfg = UpBlockConfig {
                index: i,
                in_channels: channels[level.saturating_sub(1)],
                prev_output_channels: channels[(level + 1).min(blocks - 1)],
                out_channels: channels[level],
                layers: layers[level] + 1,
                transformer: has_cross_attention(block_type)?
                    .then(|| transformer(level, reverse_depths[i])),
                upsample: level != 0,
            };
            let vb_block = vb.pp("up_blocks").pp(i);
            up_blocks.push(UpBlock::new(vb_block, &root, &block_cfg, &resnet_cfg)?);
        }

        let conv_norm_out = GroupNorm::new(
            vb.pp("conv_norm_out"),
            cfg.norm_num_groups,
            channels[0],
            cfg.norm_eps,
        )?;
        let conv_out = conv(
            vb.pp("conv_out"),
            channels[0],
            cfg.out_channels,
            cfg.conv_out_kernel,
        )?;
        Ok(Self {
            conv_in,
            time_embedding,
            down_blocks,
            mid_block,
            up_blocks,
            conv_norm_out,
            conv_out,
            config: cfg.clone(),
            weights: Arc::default(),
        })
    }

    /// Builds the UNet from diffusers safetensors files (`diffusion_pytorch_model.safetensors`,
    /// possibly sharded), converting the weights to `dtype` on `device`.
    pub fn from_safetensors<P: AsRef<std::path::Path>>(
        files: &[P],
        cfg: &UNet2DConditionConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        // SAFETY: the files are only read while the model is built, and the weights are copied
        // out of the mapping; a file changed concurrently by another process is outside the
        // contract of this loader, as with any memory-mapped weights.
        let vb = unsafe { VarBuilder::from_mmaped_safetensors(files, dtype, device)? };
        Self::new(vb, cfg)
    }

    pub fn config(&self) -> &UNet2DConditionConfig {
        &self.config
    }

    /// The dtype of the weights (inputs are cast to it).
    pub fn dtype(&self) -> candle_core::DType {
        self.conv_in.weight().dtype()
    }

    /// The device the weights live on.
    pub fn device(&self) -> &candle_core::Device {
        self.conv_in.weight().device()
    }

    /// Predicts the noise of a batch of videos: (B, C_out, F, H, W).
    ///
    /// Every attention goes through `patches.hook`; the motion patches run in order at each
    /// motion-module slot (without any, the frames are independent images); the taps see the
    /// activations at their named points.
    pub fn forward(&self, inputs: &UNetInputs, patches: &UNetPatches) -> Result<Tensor> {
        self.forward_with_adapters(inputs, patches, &[])
    }

    /// [`Self::forward`] with the modules of `adapters` after every spatial transformer, in
    /// order (the lightweight temporal modules of [`crate::models::temporal_adapter`]).
    pub fn forward_with_adapters(
        &self,
        inputs: &UNetInputs,
        patches: &UNetPatches,
        adapters: &[&TemporalAdapter],
    ) -> Result<Tensor> {
        let sample = inputs.sample;
        let (batch, channels, frames, height, width) = sample.dims5()?;
        if channels != self.config.in_channels {
            candle_core::bail!(
                "UNet expects {} input channels, got {channels}",
                self.config.in_channels
            )
        }
        let batch_frames = batch * frames;
        let text = per_frame_text(inputs.text, batch, frames)?.to_dtype(sample.dtype())?;
        for patch in patches.motion {
            let max_frames = patch.adapter.config().motion_max_seq_length;
            if frames > max_frames {
                candle_core::bail!(
                    "{frames} frames exceed the motion modules' maximum of {max_frames} \
                     (motion_max_seq_length)"
                )
            }
        }
        if let Some(positions) = inputs.frame_positions {
            if positions.len() != frames {
                candle_core::bail!("{} frame positions for {frames} frames", positions.len())
            }
        }
        let pass = ForwardPass {
            hook: patches.hook,
            step: inputs.step,
            guidance: inputs.guidance,
            frames,
            frame_positions: inputs.frame_positions,
            run: inputs.run,
            values: ForwardValues::default(),
            taps: patches.taps.to_vec(),
        };

        let device = sample.device();
        let temb_act = match inputs.timestep.per_frame(batch, frames, device)? {
            // One timestep per video: embed once per video, as diffusers does, then repeat.
            PerFrame::PerVideo(timesteps) => {
                let emb = self.time_embedding(&timesteps, sample.dtype())?;
                pass.observe(|| "time_embedding".to_string(), &emb)?;
                let temb_channels = emb.dim(1)?;
                emb.silu()?
                    .unsqueeze(1)?
                    .broadcast_as((batch, frames, temb_channels))?
                    .reshape((batch_frames, temb_channels))?
            }
            PerFrame::PerFrame(timesteps) => {
                let emb = self.time_embedding(&timesteps, sample.dtype())?;
                pass.observe(|| "time_embedding".to_string(), &emb)?;
                emb.silu()?
            }
        };

        let frames_first =
            sample
                .permute((0, 2, 1, 3, 4))?
                .reshape((batch_frames, channels, height, width))?;
        let frames_first = if self.config.center_input_sample {
            frames_first.affine(2.0, -1.0)?
        } else {
            frames_first
        };
        let mut xs = self.conv_in.forward(&frames_first)?;
        pass.observe(|| "conv_in".to_string(), &xs)?;

        let block_inputs = BlockInputs {
            temb_act: &temb_act,
            text: &text,
            frames,
            motion: patches.motion,
            adapters,
            pass: &pass,
        };
        let mut skips = vec![xs.clone()];
        for block in &self.down_blocks {
            let (out, block_skips) = block.forward(&xs, &block_inputs)?;
            xs = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            xs = mid.forward(&xs, &block_inputs)?;
        }
        for block in &self.up_blocks {
            xs = block.forward(&xs, &mut skips, &block_inputs)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        let out = self.conv_out.forward(&xs)?;
        let out_channels = out.dim(1)?;
        out.reshape((batch, frames, out_channels, height, width))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }

    /// The time embedding of (n,) timesteps, (n, T).
    fn time_embedding(&self, timesteps: &Tensor, dtype: DType) -> Result<Tensor> {
        let features = timestep_features(
            timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        self.time_embedding.forward(&features.to_dtype(dtype)?)
    }

    /// Every motion-module slot of this UNet (the diffusers path a motion module there has,
    /// e.g. `down_blocks.0.motion_modules.1`), with the channels of the features there.
    pub fn motion_slots(&self) -> Vec<(String, usize)> {
        let mut slots: Vec<(String, usize)> = Vec::new();
        for block in &self.down_blocks {
            slots.extend(block.motion_slots());
        }
        if let Some(mid) = &self.mid_block {
            slots.extend(mid.motion_slots());
        }
        for block in &self.up_blocks {
            slots.extend(block.motion_slots());
        }
        slots
    }

    /// Checks that every module of `adapter` has a slot in this UNet with its channel width.
    pub fn check_motion(&self, adapter: &MotionAdapter) -> std::result::Result<(), String> {
        let slots: HashMap<String, usize> = self.motion_slots().into_iter().collect();
        for module in adapter.modules() {
            match slots.get(module.path()) {
                None => {
                    return Err(format!(
                    "the motion adapter has a module at {}, where this UNet has no motion-module \
                         slot (slots: {} in all)",
                    module.path(),
                    slots.len()
                ))
                }
                Some(&channels) if channels != module.channels() => {
                    return Err(format!(
                        "the motion module at {} has {} channels, the UNet has {channels} there \
                         (an SD 1.x motion module needs an SD 1.x checkpoint)",
                        module.path(),
                        module.channels()
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }
}

/// One call of the UNet: the latents and their conditioning, and what the call knows of the
/// run around it.
#[derive(Clone, Copy)]
pub struct UNetInputs<'a> {
    /// (B, C, F, H, W) latents, already scaled for the model.
    pub sample: &'a Tensor,
    /// One timestep for all, one per video (B) or one per frame (B·F, frame-major).
    pub timestep: Timestep<'a>,
    /// Text embeddings: one per video (B, S, D) or one per frame (B·F, S, D), frame-major.
    pub text: &'a Tensor,
    /// The position in the clip of each of the F frames, for the motion modules' position
    /// table; `None` means 0, 1, …, F−1.
    pub frame_positions: Option<&'a [usize]>,
    pub step: Option<SamplingStep>,
    pub guidance: GuidanceLayout,
    /// The run's state, where processors record what they observe.
    pub run: Option<&'a RunObserver>,
}

impl<'a> UNetInputs<'a> {
    /// A call outside any sampling run.
    pub fn new(sample: &'a Tensor, timestep: impl Into<Timestep<'a>>, text: &'a Tensor) -> Self {
        Self {
            sample,
            timestep: timestep.into(),
            text,
            frame_positions: None,
            step: None,
            guidance: GuidanceLayout::default(),
            run: None,
        }
    }
}

/// What one forward applies on top of the frozen UNet.
#[derive(Clone, Copy)]
pub struct UNetPatches<'a> {
    pub hook: &'a AttentionHook,
    /// Motion patches, run in this order at every motion-module slot.
    pub motion: &'a [MotionPatch<'a>],
    pub taps: &'a [&'a dyn FeatureTap],
}

impl<'a> UNetPatches<'a> {
    /// Only the processors of `hook`: the image UNet.
    pub fn attention(hook: &'a AttentionHook) -> Self {
        Self {
            hook,
            motion: &[],
            taps: &[],
        }
    }
}

/// Text embeddings as (B·F, S, D) rows, frame-major, from one per video or one per frame.
pub(crate) fn per_frame_text(text: &Tensor, batch: usize, frames: usize) -> Result<Tensor> {
    let (rows, tokens, width) = text.dims3()?;
    if rows == batch * frames {
        return Ok(text.clone());
    }
    if rows == batch {
        return text
            .unsqueeze(1)?
            .broadcast_as((batch, frames, tokens, width))?
            .reshape((batch * frames, tokens, width));
    }
    candle_core::bail!(
        "text embeddings (encoder_hidden_states) have {rows} rows; expected one per video \
         ({batch}) or one per frame (batch × frames = {})",
        batch * frames
    )
}
