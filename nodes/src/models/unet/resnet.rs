//! Residual blocks and the resampling layers between UNet levels (diffusers `ResnetBlock2D`,
//! `Downsample2D`, `Upsample2D`).

use candle_core::{Result, Tensor, D};
use candle_nn::{Linear, Module, VarBuilder};

use super::conv::Conv2d;

use super::norm::GroupNorm;

/// Settings shared by every resnet of the UNet.
#[derive(Debug, Clone, Copy)]
pub struct ResnetConfig {
    pub groups: usize,
    pub eps: f64,
    pub temb_channels: usize,
    /// The sum of residual and block output is divided by this.
    pub output_scale_factor: f64,
}

/// `GroupNorm → SiLU → conv → + time projection → GroupNorm → SiLU → conv`, plus the input
/// (through a 1×1 convolution when the channel count changes).
#[derive(Debug, Clone)]
pub struct ResnetBlock2D {
    norm1: GroupNorm,
    conv1: Conv2d,
    time_emb_proj: Linear,
    norm2: GroupNorm,
    conv2: Conv2d,
    conv_shortcut: Option<Conv2d>,
    output_scale_factor: f64,
}

fn conv3x3(vb: VarBuilder, in_channels: usize, out_channels: usize) -> Result<Conv2d> {
    Conv2d::new(vb, in_channels, out_channels, 3, 1, 1)
}

impl ResnetBlock2D {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        cfg: &ResnetConfig,
    ) -> Result<Self> {
        let norm1 = GroupNorm::new(vb.pp("norm1"), cfg.groups, in_channels, cfg.eps)?;
        let conv1 = conv3x3(vb.pp("conv1"), in_channels, out_channels)?;
        let time_emb_proj =
            candle_nn::linear(cfg.temb_channels, out_channels, vb.pp("time_emb_proj"))?;
        let norm2 = GroupNorm::new(vb.pp("norm2"), cfg.groups, out_channels, cfg.eps)?;
        let conv2 = conv3x3(vb.pp("conv2"), out_channels, out_channels)?;
        let conv_shortcut = if in_channels != out_channels {
            let shortcut = vb.pp("conv_shortcut");
            Some(Conv2d::new(shortcut, in_channels, out_channels, 1, 1, 0)?)
        } else {
            None
        };
        Ok(Self {
            norm1,
            conv1,
            time_emb_proj,
            norm2,
            conv2,
            conv_shortcut,
            output_scale_factor: cfg.output_scale_factor,
        })
    }

    /// `xs`: (N, C_in, H, W); `temb_act`: SiLU of the time embedding, (N, T) → (N, C_out, H, W).
    pub fn forward(&self, xs: &Tensor, temb_act: &Tensor) -> Result<Tensor> {
        let (batch, _channels, _height, _width) = xs.dims4()?;
        let hidden = self.conv1.forward(&self.norm1.forward_silu(xs)?)?;
        let time = self.time_emb_proj.forward(temb_act)?;
        let time = time.reshape((batch, time.dim(1)?, 1, 1))?;
        let hidden = hidden.broadcast_add(&time)?;
        let hidden = self.conv2.forward(&self.norm2.forward_silu(&hidden)?)?;
        let shortcut = match &self.conv_shortcut {
            Some(conv) => conv.forward(xs)?,
            None => xs.clone(),
        };
        let out = (shortcut + hidden)?;
        if self.output_scale_factor == 1.0 {
            Ok(out)
        } else {
            out / self.output_scale_factor
        }
    }
}

/// Stride-2 3×3 convolution halving the resolution.
#[derive(Debug, Clone)]
pub struct Downsample2D {
    conv: Conv2d,
    /// With padding 0, diffusers pads one zero row and column at the bottom/right instead.
    pad_bottom_right: bool,
}

impl Downsample2D {
    pub fn new(vb: VarBuilder, channels: usize, padding: usize) -> Result<Self> {
        let conv = Conv2d::new(vb.pp("conv"), channels, channels, 3, 2, padding)?;
        Ok(Self {
            conv,
            pad_bottom_right: padding == 0,
        })
    }

    /// (N, C, H, W) → (N, C, ⌈H/2⌉, ⌈W/2⌉) with padding 1.
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if self.pad_bottom_right {
            let padded = xs
                .pad_with_zeros(D::Minus1, 0, 1)?
                .pad_with_zeros(D::Minus2, 0, 1)?;
            self.conv.forward(&padded)
        } else {
            self.conv.forward(xs)
        }
    }
}

/// Nearest-neighbour upsampling followed by a 3×3 convolution.
#[derive(Debug, Clone)]
pub struct Upsample2D {
    conv: Conv2d,
}

impl Upsample2D {
    pub fn new(vb: VarBuilder, channels: usize) -> Result<Self> {
        Ok(Self {
            conv: conv3x3(vb.pp("conv"), channels, channels)?,
        })
    }

    /// (N, C, H, W) → (N, C, out_h, out_w); the size is that of the skip connection the next
    /// block consumes, which is (2H, 2W) unless the input size was odd somewhere on the way down.
    pub fn forward(&self, xs: &Tensor, (out_h, out_w): (usize, usize)) -> Result<Tensor> {
        self.conv.forward(&xs.upsample_nearest2d(out_h, out_w)?)
    }
}
