//! The Stable Diffusion VAE: diffusers' `AutoencoderKL` (encoder with `DownEncoderBlock2D`s,
//! decoder with `UpDecoderBlock2D`s, a mid block with one single-head self-attention, and the
//! 1×1 `quant_conv` / `post_quant_conv`), built from diffusers-named weights.
//!
//! Scaling: [`AutoencoderKL::encode`] and [`AutoencoderKL::decode`] are raw, like diffusers'
//! model methods: they neither multiply nor divide by `scaling_factor`. The video helpers
//! [`AutoencoderKL::encode_video`] and [`AutoencoderKL::decode_video`] work on the scaled
//! latents the sampler sees, as the pipelines do: `encode_video` returns
//! `(z − shift_factor) · scaling_factor` and `decode_video` decodes
//! `latents / scaling_factor + shift_factor` (`shift_factor` is absent, i.e. 0, for SD 1.x).
//!
//! Loading: build from a [`crate::models::load::WeightMap`] (`open_vae` accepts diffusers
//! folders and files, standalone LDM VAE files and single-file checkpoints, and renames the
//! deprecated `query/key/value/proj_attn` attention names).

use candle_core::{Device, Module, Result, Tensor};
use candle_nn::{Conv2d, Conv2dConfig, GroupNorm, Linear, VarBuilder};
use serde::{Deserialize, Serialize};

use super::attention::{AttentionHook, AttentionKind, AttentionSite, TokenLayout};
use super::call::ForwardPass;

/// GroupNorm epsilon of every VAE normalisation (diffusers passes `resnet_eps=1e-6`).
const NORM_EPS: f64 = 1e-6;

/// The `vae/config.json` of a diffusers `AutoencoderKL`, with diffusers' defaults.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AutoencoderKLConfig {
    #[serde(default = "default_image_channels")]
    pub in_channels: usize,
    #[serde(default = "default_image_channels")]
    pub out_channels: usize,
    #[serde(default = "default_down_block_types")]
    pub down_block_types: Vec<String>,
    #[serde(default = "default_up_block_types")]
    pub up_block_types: Vec<String>,
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_layers_per_block")]
    pub layers_per_block: usize,
    #[serde(default = "default_act_fn")]
    pub act_fn: String,
    #[serde(default = "default_latent_channels")]
    pub latent_channels: usize,
    #[serde(default = "default_norm_num_groups")]
    pub norm_num_groups: usize,
    #[serde(default = "default_scaling_factor")]
    pub scaling_factor: f64,
    #[serde(default)]
    pub shift_factor: Option<f64>,
    #[serde(default = "default_true")]
    pub use_quant_conv: bool,
    #[serde(default = "default_true")]
    pub use_post_quant_conv: bool,
    #[serde(default = "default_true")]
    pub mid_block_add_attention: bool,
}

fn default_image_channels() -> usize {
    3
}
fn default_down_block_types() -> Vec<String> {
    vec!["DownEncoderBlock2D".into()]
}
fn default_up_block_types() -> Vec<String> {
    vec!["UpDecoderBlock2D".into()]
}
fn default_block_out_channels() -> Vec<usize> {
    vec![64]
}
fn default_layers_per_block() -> usize {
    1
}
fn default_act_fn() -> String {
    "silu".into()
}
fn default_latent_channels() -> usize {
    4
}
fn default_norm_num_groups() -> usize {
    32
}
fn default_scaling_factor() -> f64 {
    0.18215
}
fn default_true() -> bool {
    true
}

impl Default for AutoencoderKLConfig {
    fn default() -> Self {
        Self {
            in_channels: 3,
            out_channels: 3,
            down_block_types: default_down_block_types(),
            up_block_types: default_up_block_types(),
            block_out_channels: default_block_out_channels(),
            layers_per_block: 1,
            act_fn: default_act_fn(),
            latent_channels: 4,
            norm_num_groups: 32,
            scaling_factor: default_scaling_factor(),
            shift_factor: None,
            use_quant_conv: true,
            use_post_quant_conv: true,
            mid_block_add_attention: true,
        }
    }
}

impl AutoencoderKLConfig {
    /// The VAE of Stable Diffusion 1.x (`runwayml/stable-diffusion-v1-5/vae/config.json`).
    pub fn sd1() -> Self {
        let levels = 4;
        Self {
            down_block_types: vec!["DownEncoderBlock2D".into(); levels],
            up_block_types: vec!["UpDecoderBlock2D".into(); levels],
            block_out_channels: vec![128, 256, 512, 512],
            layers_per_block: 2,
            ..Self::default()
        }
    }

    /// Pixels per latent along each side: `2^(levels − 1)`.
    pub fn spatial_scale(&self) -> usize {
        1 << self.block_out_channels.len().saturating_sub(1)
    }

    fn validate(&self) -> Result<()> {
        let levels = self.block_out_channels.len();
        let bad = |what: String| {
            Err(candle_core::Error::Msg(format!(
                "AutoencoderKL config: {what}"
            )))
        };
        if levels == 0 {
            return bad("block_out_channels is empty".into());
        }
        if self.down_block_types.len() != levels || self.up_block_types.len() != levels {
            return bad(format!(
                "{} down and {} up block types for {levels} block_out_channels",
                self.down_block_types.len(),
                self.up_block_types.len()
            ));
        }
        if let Some(t) = self
            .down_block_types
            .iter()
            .find(|t| *t != "DownEncoderBlock2D")
        {
            return bad(format!(
                "unsupported down block type {t} (only DownEncoderBlock2D)"
            ));
        }
        if let Some(t) = self
            .up_block_types
            .iter()
            .find(|t| *t != "UpDecoderBlock2D")
        {
            return bad(format!(
                "unsupported up block type {t} (only UpDecoderBlock2D)"
            ));
        }
        if self.act_fn != "silu" {
            return bad(format!("unsupported act_fn {} (only silu)", self.act_fn));
        }
        if let Some(c) = self
            .block_out_channels
            .iter()
            .find(|&&c| c % self.norm_num_groups != 0)
        {
            return bad(format!(
                "{c} channels do not split into {} groups",
                self.norm_num_groups
            ));
        }
        if self.scaling_factor == 0.0 {
            return bad("scaling_factor is 0".into());
        }
        Ok(())
    }
}

fn conv(vb: VarBuilder, in_c: usize, out_c: usize, kernel: usize, stride: usize) -> Result<Conv2d> {
    let padding = if kernel == 3 && stride == 1 { 1 } else { 0 };
    candle_nn::conv2d(
        in_c,
        out_c,
        kernel,
        Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        },
        vb,
    )
}

/// diffusers' `ResnetBlock2D` without time embedding.
#[derive(Debug, Clone)]
struct ResnetBlock {
    norm1: GroupNorm,
    conv1: Conv2d,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
}

impl ResnetBlock {
    fn new(vb: VarBuilder, in_c: usize, out_c: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            norm1: candle_nn::group_norm(groups, in_c, NORM_EPS, vb.pp("norm1"))?,
            conv1: conv(vb.pp("conv1"), in_c, out_c, 3, 1)?,
            norm2: candle_nn::group_norm(groups, out_c, NORM_EPS, vb.pp("norm2"))?,
            conv2: conv(vb.pp("conv2"), out_c, out_c, 3, 1)?,
            conv_shortcut: if in_c != out_c {
                Some(conv(vb.pp("conv_shortcut"), in_c, out_c, 1, 1)?)
            } else {
                None
            },
        })
    }

    /// (N, in, H, W) → (N, out, H, W).
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let h = self.conv1.forward(&self.norm1.forward(x)?.silu()?)?;
        let h = self.conv2.forward(&self.norm2.forward(&h)?.silu()?)?;
        match &self.conv_shortcut {
            Some(shortcut) => shortcut.forward(x)? + h,
            None => x + h,
        }
    }
}

/// The mid-block self-attention over all pixels: one head of the full channel width, GroupNorm
/// first, residual after (diffusers' `Attention` built from the deprecated `AttentionBlock`).
#[derive(Debug, Clone)]
struct MidAttention {
    /// Module path, which the attention hook addresses.
    path: String,
    group_norm: GroupNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
}

impl MidAttention {
    fn new(vb: VarBuilder, path: String, channels: usize, groups: usize) -> Result<Self> {
        Ok(Self {
            path,
            group_norm: candle_nn::group_norm(groups, channels, NORM_EPS, vb.pp("group_norm"))?,
            to_q: candle_nn::linear(channels, channels, vb.pp("to_q"))?,
            to_k: candle_nn::linear(channels, channels, vb.pp("to_k"))?,
            to_v: candle_nn::linear(channels, channels, vb.pp("to_v"))?,
            to_out: candle_nn::linear(channels, channels, vb.pp("to_out").pp("0"))?,
        })
    }

    /// (N, C, H, W) → (N, C, H, W).
    fn forward(&self, x: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let tokens = self
            .group_norm
            .forward(x)?
            .reshape((n, c, h * w))?
            .transpose(1, 2)?
            .contiguous()?;
        // One head: (N, 1, HW, C) is the hook's (batch, heads, tokens, head_dim).
        let q = self.to_q.forward(&tokens)?.unsqueeze(1)?;
        let k = self.to_k.forward(&tokens)?.unsqueeze(1)?;
        let v = self.to_v.forward(&tokens)?.unsqueeze(1)?;
        let site = AttentionSite {
            layer: &self.path,
            kind: AttentionKind::SpatialSelf,
            layout: TokenLayout {
                videos: n,
                frames: 1,
                height: h,
                width: w,
            },
        };
        let attended = hook
            .attend(site, &ForwardPass::new(hook), &q, &k, &v)?
            .squeeze(1)?;
        let out = self
            .to_out
            .forward(&attended)?
            .transpose(1, 2)?
            .reshape((n, c, h, w))?;
        out + x
    }
}

/// diffusers' `UNetMidBlock2D` without time embedding: resnet, [attention], resnet.
#[derive(Debug, Clone)]
struct MidBlock {
    first: ResnetBlock,
    attention: Option<MidAttention>,
    second: ResnetBlock,
}

impl MidBlock {
    fn new(vb: VarBuilder, path: &str, channels: usize, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let groups = cfg.norm_num_groups;
        let attention = if cfg.mid_block_add_attention {
            let attn_path = format!("{path}.mid_block.attentions.0");
            Some(MidAttention::new(
                vb.pp("attentions").pp("0"),
                attn_path,
                channels,
                groups,
            )?)
        } else {
            None
        };
        Ok(Self {
            first: ResnetBlock::new(vb.pp("resnets").pp("0"), channels, channels, groups)?,
            attention,
            second: ResnetBlock::new(vb.pp("resnets").pp("1"), channels, channels, groups)?,
        })
    }

    fn forward(&self, x: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let mut h = self.first.forward(x)?;
        if let Some(attention) = &self.attention {
            h = attention.forward(&h, hook)?;
        }
        self.second.forward(&h)
    }
}

/// Resnets, then (except at the last level) a stride-2 convolution with diffusers'
/// asymmetric padding: one zero row/column after the input, none before.
#[derive(Debug, Clone)]
struct DownEncoderBlock {
    resnets: Vec<ResnetBlock>,
    downsampler: Option<Conv2d>,
}

impl DownEncoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        match &self.downsampler {
            Some(down) => down.forward(&h.pad_with_zeros(3, 0, 1)?.pad_with_zeros(2, 0, 1)?),
            None => Ok(h),
        }
    }
}

/// Resnets, then (except at the last level) nearest 2× upsampling and a 3×3 convolution.
#[derive(Debug, Clone)]
struct UpDecoderBlock {
    resnets: Vec<ResnetBlock>,
    upsampler: Option<Conv2d>,
}

impl UpDecoderBlock {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut h = x.clone();
        for resnet in &self.resnets {
            h = resnet.forward(&h)?;
        }
        match &self.upsampler {
            Some(up) => {
                let (_, _, height, width) = h.dims4()?;
                up.forward(&h.upsample_nearest2d(2 * height, 2 * width)?)
            }
            None => Ok(h),
        }
    }
}

#[derive(Debug, Clone)]
struct Encoder {
    conv_in: Conv2d,
    down_blocks: Vec<DownEncoderBlock>,
    mid_block: MidBlock,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Encoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let channels = &cfg.block_out_channels;
        let groups = cfg.norm_num_groups;
        let top = channels[channels.len() - 1];
        let mut down_blocks = Vec::with_capacity(channels.len());
        for (level, &out_c) in channels.iter().enumerate() {
            let vb = vb.pp("down_blocks").pp(level);
            let in_c = if level == 0 {
                channels[0]
            } else {
                channels[level - 1]
            };
            let resnets = (0..cfg.layers_per_block)
                .map(|i| {
                    let resnet_in = if i == 0 { in_c } else { out_c };
                    ResnetBlock::new(vb.pp("resnets").pp(i), resnet_in, out_c, groups)
                })
                .collect::<Result<_>>()?;
            let downsampler = if level + 1 < channels.len() {
                Some(conv(
                    vb.pp("downsamplers").pp("0").pp("conv"),
                    out_c,
                    out_c,
                    3,
                    2,
                )?)
            } else {
                None
            };
            down_blocks.push(DownEncoderBlock {
                resnets,
                downsampler,
            });
        }
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.in_channels, channels[0], 3, 1)?,
            down_blocks,
            mid_block: MidBlock::new(vb.pp("mid_block"), "encoder", top, cfg)?,
            conv_norm_out: candle_nn::group_norm(groups, top, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), top, 2 * cfg.latent_channels, 3, 1)?,
        })
    }

    /// (N, in_channels, H, W) → moments (N, 2·latent_channels, H/s, W/s).
    fn forward(&self, x: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let mut h = self.conv_in.forward(x)?;
        for block in &self.down_blocks {
            h = block.forward(&h)?;
        }
        let h = self.mid_block.forward(&h, hook)?;
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

#[derive(Debug, Clone)]
struct Decoder {
    conv_in: Conv2d,
    mid_block: MidBlock,
    up_blocks: Vec<UpDecoderBlock>,
    conv_norm_out: GroupNorm,
    conv_out: Conv2d,
}

impl Decoder {
    fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        let reversed: Vec<usize> = cfg.block_out_channels.iter().rev().copied().collect();
        let groups = cfg.norm_num_groups;
        let top = reversed[0];
        let bottom = reversed[reversed.len() - 1];
        let mut up_blocks = Vec::with_capacity(reversed.len());
        for (block, &out_c) in reversed.iter().enumerate() {
            let vb = vb.pp("up_blocks").pp(block);
            let in_c = if block == 0 { top } else { reversed[block - 1] };
            let resnets = (0..cfg.layers_per_block + 1)
                .map(|i| {
                    let resnet_in = if i == 0 { in_c } else { out_c };
                    ResnetBlock::new(vb.pp("resnets").pp(i), resnet_in, out_c, groups)
                })
                .collect::<Result<_>>()?;
            let upsampler = if block + 1 < reversed.len() {
                Some(conv(
                    vb.pp("upsamplers").pp("0").pp("conv"),
                    out_c,
                    out_c,
                    3,
                    1,
                )?)
            } else {
                None
            };
            up_blocks.push(UpDecoderBlock { resnets, upsampler });
        }
        Ok(Self {
            conv_in: conv(vb.pp("conv_in"), cfg.latent_channels, top, 3, 1)?,
            mid_block: MidBlock::new(vb.pp("mid_block"), "decoder", top, cfg)?,
            up_blocks,
            conv_norm_out: candle_nn::group_norm(groups, bottom, NORM_EPS, vb.pp("conv_norm_out"))?,
            conv_out: conv(vb.pp("conv_out"), bottom, cfg.out_channels, 3, 1)?,
        })
    }

    /// (N, latent_channels, h, w) → (N, out_channels, h·s, w·s).
    fn forward(&self, z: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let mut h = self.mid_block.forward(&self.conv_in.forward(z)?, hook)?;
        for block in &self.up_blocks {
            h = block.forward(&h)?;
        }
        self.conv_out
            .forward(&self.conv_norm_out.forward(&h)?.silu()?)
    }
}

/// The encoder's posterior: a Gaussian with diagonal covariance per latent element.
#[derive(Debug, Clone)]
pub struct DiagonalGaussian {
    pub mean: Tensor,
    /// Log-variance, clamped to [−30, 20] as diffusers does.
    pub logvar: Tensor,
    /// exp(logvar / 2).
    pub std: Tensor,
}

impl DiagonalGaussian {
    /// Splits encoder moments (N, 2C, h, w) into mean and log-variance along channels.
    pub fn from_moments(moments: &Tensor) -> Result<Self> {
        let (_, doubled, _, _) = moments.dims4()?;
        let channels = doubled / 2;
        let mean = moments.narrow(1, 0, channels)?;
        let logvar = moments
            .narrow(1, channels, channels)?
            .clamp(-30f32, 20f32)?;
        let std = (&logvar * 0.5)?.exp()?;
        Ok(Self { mean, logvar, std })
    }

    /// mean + std · noise, `noise` standard normal of the mean's shape.
    pub fn sample(&self, noise: &Tensor) -> Result<Tensor> {
        &self.mean + (&self.std * noise.to_dtype(self.mean.dtype())?)?
    }

    /// The most likely latent: the mean.
    pub fn mode(&self) -> Tensor {
        self.mean.clone()
    }
}

/// diffusers' `AutoencoderKL`.
///
/// Build it in f32 (`WeightMap::var_builder(DType::F32, …)`) even from half-precision files:
/// SD 1.x VAEs overflow in f16, which is why diffusers sets `force_upcast` for them.
#[derive(Clone)]
pub struct AutoencoderKL {
    encoder: Encoder,
    decoder: Decoder,
    quant_conv: Option<Conv2d>,
    post_quant_conv: Option<Conv2d>,
    config: AutoencoderKLConfig,
    hook: AttentionHook,
}

impl std::fmt::Debug for AutoencoderKL {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AutoencoderKL")
            .field("config", &self.config)
            .finish_non_exhaustive()
    }
}

impl AutoencoderKL {
    /// Builds the VAE from diffusers keys (`encoder.…`, `decoder.…`, `quant_conv`,
    /// `post_quant_conv`).
    pub fn new(vb: VarBuilder, cfg: &AutoencoderKLConfig) -> Result<Self> {
        cfg.validate()?;
        let latent = cfg.latent_channels;
        let quant_conv = if cfg.use_quant_conv {
            Some(conv(vb.pp("quant_conv"), 2 * latent, 2 * latent, 1, 1)?)
        } else {
            None
        };
        let post_quant_conv = if cfg.use_post_quant_conv {
            Some(conv(vb.pp("post_quant_conv"), latent, latent, 1, 1)?)
        } else {
            None
        };
        Ok(Self {
            encoder: Encoder::new(vb.pp("encoder"), cfg)?,
            decoder: Decoder::new(vb.pp("decoder"), cfg)?,
            quant_conv,
            post_quant_conv,
            config: cfg.clone(),
            hook: AttentionHook::new(),
        })
    }

    pub fn config(&self) -> &AutoencoderKLConfig {
        &self.config
    }

    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.decoder.conv_out.weight().device()
    }

    /// The same VAE with `hook` routing its two mid-block attentions
    /// (`encoder.mid_block.attentions.0`, `decoder.mid_block.attentions.0`).
    pub fn with_attention_hook(mut self, hook: AttentionHook) -> Self {
        self.hook = hook;
        self
    }

    /// Images (N, in_channels, H, W) in [−1, 1] → the latent posterior at (N, C, H/s, W/s).
    /// Raw: no scaling_factor.
    pub fn encode(&self, images: &Tensor) -> Result<DiagonalGaussian> {
        let moments = self.encoder.forward(images, &self.hook)?;
        let moments = match &self.quant_conv {
            Some(quant_conv) => quant_conv.forward(&moments)?,
            None => moments,
        };
        DiagonalGaussian::from_moments(&moments)
    }

    /// Latents (N, C, h, w) → images (N, out_channels, h·s, w·s), not clamped. Raw: the
    /// latents are not divided by scaling_factor.
    pub fn decode(&self, latents: &Tensor) -> Result<Tensor> {
        let z = match &self.post_quant_conv {
            Some(post_quant_conv) => post_quant_conv.forward(latents)?,
            None => latents.clone(),
        };
        self.decoder.forward(&z, &self.hook)
    }

    /// Raw latents → the scaled latents a sampler works on: (z − shift) · scaling_factor.
    pub fn scale_latents(&self, raw: &Tensor) -> Result<Tensor> {
        let shifted = match self.config.shift_factor {
            Some(shift) => (raw - shift)?,
            None => raw.clone(),
        };
        shifted * self.config.scaling_factor
    }

    /// Scaled latents → raw latents: z / scaling_factor + shift.
    pub fn unscale_latents(&self, scaled: &Tensor) -> Result<Tensor> {
        let raw = (scaled / self.config.scaling_factor)?;
        match self.config.shift_factor {
            Some(shift) => raw + shift,
            None => Ok(raw),
        }
    }

    /// Decodes scaled latents, at most `chunk_frames` frames at a time, as the video pipelines'
    /// `decode_latents` does: `latents` is a video (B, C, F, h, w) or a frame batch (N, C, h, w);
    /// the result is (B, out_channels, F, H, W) or (N, out_channels, H, W), not clamped.
    /// Scales: divides by scaling_factor (and adds shift_factor) before decoding.
    pub fn decode_video(&self, latents: &Tensor, chunk_frames: usize) -> Result<Tensor> {
        self.decode_video_observed(latents, chunk_frames, &mut |_, _| Ok(()))
    }

    /// [`Self::decode_video`], calling `after_chunk(frames done, frames)` after each chunk; an
    /// error from it (the user cancelled, say) stops the decoding.
    pub fn decode_video_observed(
        &self,
        latents: &Tensor,
        chunk_frames: usize,
        after_chunk: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (frames, layout) = FrameLayout::flatten(latents)?;
        let raw = self.unscale_latents(&frames)?;
        let decoded = in_chunks(
            &raw,
            None,
            chunk_frames,
            |chunk, _| self.decode(chunk),
            after_chunk,
        )?;
        layout.unflatten(&decoded)
    }

    /// Encodes pixels, at most `chunk_frames` frames at a time: `video` is (B, in_channels, F, H,
    /// W) or (N, in_channels, H, W) in [−1, 1]; the result has the same layout at latent size.
    /// Each latent is the posterior mean, or `mean + std · noise` when `noise` (the shape of the
    /// result) is given. Scales: returns (z − shift_factor) · scaling_factor, the latents a
    /// sampler starts from.
    pub fn encode_video(
        &self,
        video: &Tensor,
        chunk_frames: usize,
        noise: Option<&Tensor>,
    ) -> Result<Tensor> {
        self.encode_video_observed(video, chunk_frames, noise, &mut |_, _| Ok(()))
    }

    /// [`Self::encode_video`], calling `after_chunk(frames done, frames)` after each chunk; an
    /// error from it stops the encoding.
    pub fn encode_video_observed(
        &self,
        video: &Tensor,
        chunk_frames: usize,
        noise: Option<&Tensor>,
        after_chunk: &mut dyn FnMut(usize, usize) -> Result<()>,
    ) -> Result<Tensor> {
        let (frames, layout) = FrameLayout::flatten(video)?;
        let noise = noise
            .map(|n| FrameLayout::flatten(n).map(|(flat, _)| flat))
            .transpose()?;
        let latents = in_chunks(
            &frames,
            noise.as_ref(),
            chunk_frames,
            |chunk, noise| {
                let posterior = self.encode(chunk)?;
                match noise {
                    Some(noise) => posterior.sample(&noise),
                    None => Ok(posterior.mode()),
                }
            },
            after_chunk,
        )?;
        layout.unflatten(&self.scale_latents(&latents)?)
    }
}

/// Runs `f` on consecutive slices of at most `chunk` rows of `x` (and of `extra`, alike) and
/// concatenates the results.
fn in_chunks(
    x: &Tensor,
    extra: Option<&Tensor>,
    chunk: usize,
    mut f: impl FnMut(&Tensor, Option<Tensor>) -> Result<Tensor>,
    after_chunk: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    if chunk == 0 {
        candle_core::bail!("chunk_frames must be at least 1");
    }
    let rows = x.dim(0)?;
    if let Some(extra) = extra {
        if extra.dim(0)? != rows {
            candle_core::bail!("noise has {} frames, the input {rows}", extra.dim(0)?);
        }
    }
    let mut outputs = Vec::with_capacity(rows.div_ceil(chunk));
    for start in (0..rows).step_by(chunk) {
        let len = chunk.min(rows - start);
        let part_extra = extra.map(|e| e.narrow(0, start, len)).transpose()?;
        outputs.push(f(&x.narrow(0, start, len)?, part_extra)?);
        after_chunk(start + len, rows)?;
    }
    Tensor::cat(&outputs, 0)
}

/// How a video was flattened to a frame batch, to undo it.
enum FrameLayout {
    Frames,
    Video { batch: usize, frames: usize },
}

impl FrameLayout {
    /// (B, C, F, H, W) → (B·F, C, H, W), frame-major within each video; (N, C, H, W) as is.
    fn flatten(x: &Tensor) -> Result<(Tensor, Self)> {
        match x.dims() {
            &[_, _, _, _] => Ok((x.clone(), Self::Frames)),
            &[batch, channels, frames, height, width] => {
                let flat = x.permute((0, 2, 1, 3, 4))?.reshape((
                    batch * frames,
                    channels,
                    height,
                    width,
                ))?;
                Ok((flat, Self::Video { batch, frames }))
            }
            dims => candle_core::bail!("expected (B, C, F, H, W) or (N, C, H, W), got {dims:?}"),
        }
    }

    fn unflatten(&self, x: &Tensor) -> Result<Tensor> {
        match *self {
            Self::Frames => Ok(x.clone()),
            Self::Video { batch, frames } => {
                let (_, channels, height, width) = x.dims4()?;
                x.reshape((batch, frames, channels, height, width))?
                    .permute((0, 2, 1, 3, 4))?
                    .contiguous()
            }
        }
    }
}
