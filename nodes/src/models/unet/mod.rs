//! The Stable Diffusion 1.x UNet (diffusers `UNet2DConditionModel`), run on videos as frames, with
//! AnimateDiff motion modules applied as a patch (diffusers `UNetMotionModel` semantics).
//!
//! The UNet is frozen: the motion adapter is passed to [`UNet2DConditionModel::forward`] rather
//! than baked into the model, so one loaded UNet serves any adapter, any motion scale, or none.
//! Without motion modules every frame is denoised as an independent image.

pub mod blocks;
pub mod conv;
pub mod embeddings;
pub mod linear;
pub mod norm;
pub mod resnet;
pub mod transformer;
mod winograd;

use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::VarBuilder;
use serde::Deserialize;

use crate::models::attention::AttentionHook;
use crate::models::motion::{MotionAdapter, MotionPatch, TemporalTransformer};
use blocks::{
    BlockInputs, DownBlock, DownBlockConfig, MidBlock, MotionStage, UpBlock, UpBlockConfig,
};
use conv::Conv2d;
pub use embeddings::Timestep;
use embeddings::{timestep_features, TimestepEmbedding};
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

fn motion_stage(modules: &[TemporalTransformer], frames: usize, scale: f64) -> MotionStage<'_> {
    MotionStage {
        modules,
        frames,
        scale,
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

/// Named activations captured during a forward pass, keyed by diffusers module path
/// (`time_embedding`, `conv_in`, `down_blocks.0.resnets.0`, `down_blocks.0.attentions.0`,
/// `down_blocks.0.motion_modules.0`, `down_blocks.i`, `mid_block`, `up_blocks.i`); all but
/// `time_embedding` are (batch·frames, C, H, W).
#[derive(Debug, Default)]
pub struct ActivationRecorder {
    activations: Mutex<HashMap<String, Tensor>>,
}

impl ActivationRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    pub(crate) fn record(&self, name: String, xs: &Tensor) {
        if let Ok(mut activations) = self.activations.lock() {
            activations.insert(name, xs.clone());
        }
    }

    /// The recorded activation of module `name`, if the forward pass went through it.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        self.activations.lock().ok()?.get(name).cloned()
    }

    /// Every recorded module path, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut names: Vec<String> = match self.activations.lock() {
            Ok(activations) => activations.keys().cloned().collect(),
            Err(_) => Vec::new(),
        };
        names.sort();
        names
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
}

impl UNet2DConditionModel {
    /// Builds the UNet from diffusers-named weights (`conv_in.weight`, `down_blocks.0.…`). The
    /// attention layers report their paths relative to `vb`'s prefix.
    pub fn new(vb: VarBuilder, cfg: &UNet2DConditionConfig) -> Result<Self> {
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

    /// Predicts the noise of a batch of videos.
    ///
    /// `sample`: (B, C, F, H, W) latents; `timestep`: one value for all videos or one per video;
    /// `encoder_hidden_states`: (B·F, S, D), each video's text embedding repeated over its frames
    /// (frame-major: row b·F + f). With `motion = None` the frames are independent images.
    /// Every attention goes through `hook`. Returns (B, C_out, F, H, W).
    pub fn forward<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        motion: Option<MotionPatch<'_>>,
        hook: &AttentionHook,
    ) -> Result<Tensor> {
        self.forward_video(
            sample,
            timestep.into(),
            encoder_hidden_states,
            motion,
            hook,
            None,
        )
    }

    /// [`Self::forward`], also capturing the activations listed on [`ActivationRecorder`].
    pub fn forward_recorded<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        motion: Option<MotionPatch<'_>>,
        hook: &AttentionHook,
        recorder: &ActivationRecorder,
    ) -> Result<Tensor> {
        let timestep = timestep.into();
        self.forward_video(
            sample,
            timestep,
            encoder_hidden_states,
            motion,
            hook,
            Some(recorder),
        )
    }

    /// The plain image UNet: `sample` (N, C, H, W), `encoder_hidden_states` (N, S, D) →
    /// (N, C_out, H, W).
    pub fn forward_images<'t>(
        &self,
        sample: &Tensor,
        timestep: impl Into<Timestep<'t>>,
        encoder_hidden_states: &Tensor,
        hook: &AttentionHook,
    ) -> Result<Tensor> {
        let (batch, _channels, _height, _width) = sample.dims4()?;
        let timestep = timestep.into();
        self.forward_frames(
            sample,
            batch,
            1,
            timestep,
            encoder_hidden_states,
            None,
            hook,
            None,
        )
    }

    fn forward_video(
        &self,
        sample: &Tensor,
        timestep: Timestep,
        encoder_hidden_states: &Tensor,
        motion: Option<MotionPatch>,
        hook: &AttentionHook,
        recorder: Option<&ActivationRecorder>,
    ) -> Result<Tensor> {
        let (batch, channels, frames, height, width) = sample.dims5()?;
        let frames_first =
            sample
                .permute((0, 2, 1, 3, 4))?
                .reshape((batch * frames, channels, height, width))?;
        let out = self.forward_frames(
            &frames_first,
            batch,
            frames,
            timestep,
            encoder_hidden_states,
            motion,
            hook,
            recorder,
        )?;
        let out_channels = out.dim(1)?;
        out.reshape((batch, frames, out_channels, height, width))?
            .permute((0, 2, 1, 3, 4))?
            .contiguous()
    }

    /// The UNet on (B·F, C, H, W) frames, frame-major within each of the B videos.
    #[allow(clippy::too_many_arguments)]
    fn forward_frames(
        &self,
        sample: &Tensor,
        batch: usize,
        frames: usize,
        timestep: Timestep,
        encoder_hidden_states: &Tensor,
        motion: Option<MotionPatch>,
        hook: &AttentionHook,
        recorder: Option<&ActivationRecorder>,
    ) -> Result<Tensor> {
        let (batch_frames, in_channels, _height, _width) = sample.dims4()?;
        if in_channels != self.config.in_channels {
            candle_core::bail!(
                "UNet expects {} input channels, got {in_channels}",
                self.config.in_channels
            )
        }
        let (context_rows, _tokens, _context_dim) = encoder_hidden_states.dims3()?;
        if context_rows != batch_frames {
            candle_core::bail!(
                "encoder_hidden_states has {context_rows} rows; expected batch × frames = \
                 {batch_frames} (repeat each video's embedding over its frames)"
            )
        }
        if let Some(patch) = &motion {
            self.check_motion(patch.adapter, frames)?;
        }
        let record = |name: &str, xs: &Tensor| {
            if let Some(recorder) = recorder {
                recorder.record(name.to_string(), xs)
            }
        };

        let device = sample.device();
        let timesteps = timestep.per_sample(batch, device)?;
        let features = timestep_features(
            &timesteps,
            self.config.block_out_channels[0],
            self.config.flip_sin_to_cos,
            self.config.freq_shift,
        )?;
        let emb = self
            .time_embedding
            .forward(&features.to_dtype(sample.dtype())?)?;
        record("time_embedding", &emb);
        let temb_channels = emb.dim(1)?;
        let temb_act = emb
            .silu()?
            .unsqueeze(1)?
            .broadcast_as((batch, frames, temb_channels))?
            .reshape((batch_frames, temb_channels))?;

        let sample = if self.config.center_input_sample {
            sample.affine(2.0, -1.0)?
        } else {
            sample.clone()
        };
        let mut xs = self.conv_in.forward(&sample)?;
        record("conv_in", &xs);

        let inputs = BlockInputs {
            temb_act: &temb_act,
            context: encoder_hidden_states,
            hook,
            recorder,
        };
        let mut skips = vec![xs.clone()];
        for (i, block) in self.down_blocks.iter().enumerate() {
            let motion = motion
                .as_ref()
                .map(|p| motion_stage(p.adapter.down_block(i), frames, p.scale));
            let (out, block_skips) = block.forward(&xs, &inputs, motion)?;
            xs = out;
            skips.extend(block_skips);
        }
        if let Some(mid) = &self.mid_block {
            let motion = motion.as_ref().and_then(|p| {
                p.adapter
                    .mid_block()
                    .map(|modules| motion_stage(modules, frames, p.scale))
            });
            xs = mid.forward(&xs, &inputs, motion)?;
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            let motion = motion
                .as_ref()
                .map(|p| motion_stage(p.adapter.up_block(i), frames, p.scale));
            xs = block.forward(&xs, &mut skips, &inputs, motion)?;
        }
        let xs = self.conv_norm_out.forward_silu(&xs)?;
        self.conv_out.forward(&xs)
    }

    /// Checks that `adapter` has a motion module for every slot it will be asked to fill.
    fn check_motion(&self, adapter: &MotionAdapter, frames: usize) -> Result<()> {
        let max_frames = adapter.config().motion_max_seq_length;
        if frames > max_frames {
            candle_core::bail!(
                "{frames} frames exceed the motion modules' maximum of {max_frames} \
                 (motion_max_seq_length)"
            )
        }
        let mismatch = |block: String, have: usize, want: usize| -> Result<()> {
            candle_core::bail!(
                "motion adapter does not fit this UNet: {block} has {have} motion modules, \
                 the UNet block has {want} layers"
            )
        };
        let blocks = self.down_blocks.len();
        if adapter.num_blocks() != blocks {
            candle_core::bail!(
                "motion adapter has {} blocks, the UNet has {blocks}",
                adapter.num_blocks()
            )
        }
        for (i, block) in self.down_blocks.iter().enumerate() {
            let have = adapter.down_block(i).len();
            if have != block.layers() {
                return mismatch(format!("down_blocks.{i}"), have, block.layers());
            }
            let channels = block.out_channels();
            if let Some(module) = adapter
                .down_block(i)
                .iter()
                .find(|m| m.channels() != channels)
            {
                candle_core::bail!(
                    "motion adapter does not fit this UNet: down_blocks.{i} motion modules have {} \
                     channels, the UNet block has {channels}",
                    module.channels()
                )
            }
        }
        for (i, block) in self.up_blocks.iter().enumerate() {
            let have = adapter.up_block(i).len();
            if have != block.layers() {
                return mismatch(format!("up_blocks.{i}"), have, block.layers());
            }
        }
        if let (Some(modules), Some(mid)) = (adapter.mid_block(), &self.mid_block) {
            if modules.len() != mid.layers() {
                return mismatch("mid_block".to_string(), modules.len(), mid.layers());
            }
        }
        if adapter.mid_block().is_some() && self.mid_block.is_none() {
            candle_core::bail!(
                "motion adapter has a mid-block motion module; the UNet has no mid block"
            )
        }
        Ok(())
    }
}
