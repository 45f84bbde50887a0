//! The spatial transformer of the UNet (diffusers `Transformer2DModel` with
//! `BasicTransformerBlock`s), and the attention and feed-forward layers the motion modules share.

use candle_core::{Result, Tensor, D};
use candle_nn::VarBuilder;

use super::linear::{linear, linear_no_bias, Linear};
use super::norm::{GroupNorm, LayerNorm};
use crate::models::attention::{AttentionKind, AttentionSite, TokenLayout};
use crate::models::call::ForwardPass;
use crate::models::ops::{self as fused, geglu::Geglu};

/// The diffusers module path of the layer that `vb` addresses, relative to the model root.
pub(crate) fn module_path(vb: &VarBuilder, root: &str) -> String {
    let full = vb.prefix();
    if root.is_empty() {
        return full;
    }
    match full.strip_prefix(root) {
        Some(rest) => rest.trim_start_matches('.').to_string(),
        None => full,
    }
}

/// Multi-head attention with bias-free Q/K/V projections and a biased output projection
/// (diffusers `Attention` as the UNet and the motion modules configure it). The attention itself
/// runs through the [`AttentionHook`] under this layer's module path.
#[derive(Debug, Clone)]
pub struct Attention {
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    heads: usize,
    head_dim: usize,
    path: String,
    kind: AttentionKind,
}

impl Attention {
    /// `keys_dim` is the width of what the keys are computed from: the query width for self-attention.
    pub fn new(
        vb: VarBuilder,
        root: &str,
        query_dim: usize,
        keys_dim: usize,
        heads: usize,
        head_dim: usize,
        kind: AttentionKind,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(keys_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(keys_dim, inner, vb.pp("to_v"))?,
            to_out: linear(inner, query_dim, vb.pp("to_out").pp("0"))?,
            heads,
            head_dim,
            path: module_path(&vb, root),
            kind,
        })
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    /// `xs`: (N, T, C); `keys_from`: (N, S, D) for cross-attention, or `None` for
    /// self-attention → (N, T, C). `layout` says how the N·T tokens lie in the video.
    pub fn forward(
        &self,
        xs: &Tensor,
        keys_from: Option<&Tensor>,
        pass: &ForwardPass,
        layout: TokenLayout,
    ) -> Result<Tensor> {
        self.forward_with_residual(xs, keys_from, pass, layout, None)
    }

    /// `forward(xs, keys_from) + residual`, the add folded into the output projection.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        keys_from: Option<&Tensor>,
        pass: &ForwardPass,
        layout: TokenLayout,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_residual(xs, keys_from, pass, layout, Some(residual))
    }

    fn forward_with_residual(
        &self,
        xs: &Tensor,
        keys_from: Option<&Tensor>,
        pass: &ForwardPass,
        layout: TokenLayout,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, tokens, _channels) = xs.dims3()?;
        let keys_from = keys_from.unwrap_or(xs);
        let keys = keys_from.dim(1)?;
        let split_heads = |x: Tensor, len: usize| {
            x.reshape((batch, len, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = split_heads(self.to_q.forward(xs)?, tokens)?;
        let k = split_heads(self.to_k.forward(keys_from)?, keys)?;
        let v = split_heads(self.to_v.forward(keys_from)?, keys)?;
        let site = AttentionSite {
            layer: &self.path,
            kind: self.kind,
            layout,
        };
        let out = pass.hook.attend(site, pass, &q, &k, &v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, tokens, self.heads * self.head_dim))?;
        if let Some(scale) = pass.values.take_output_scale(&self.path) {
            let projected = (self.to_out.forward(&out)? * scale)?;
            return match residual {
                Some(residual) => projected + residual,
                None => Ok(projected),
            };
        }
        match residual {
            Some(residual) => self.to_out.forward_add(&out, residual),
            None => self.to_out.forward(&out),
        }
    }
}

/// GEGLU feed-forward with exact (erf) GELU: `net.2(a · gelu(b))` where `[a, b] = net.0.proj(x)`.
#[derive(Debug, Clone)]
pub struct FeedForward {
    proj: Linear,
    out: Linear,
    inner: usize,
}

impl FeedForward {
    pub fn new(vb: VarBuilder, dim: usize) -> Result<Self> {
        let inner = 4 * dim;
        let proj = linear(dim, 2 * inner, vb.pp("net").pp("0").pp("proj"))?;
        let out = linear(inner, dim, vb.pp("net").pp("2"))?;
        Ok(Self { proj, out, inner })
    }

    /// (N, T, C) → (N, T, C).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.out.forward(&self.gated(xs)?)
    }

    /// `forward(xs) + residual`, the add folded into the output layer.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        self.out.forward_add(&self.gated(xs)?, residual)
    }

    /// `a · gelu(b)`: the input of the output layer.
    fn gated(&self, xs: &Tensor) -> Result<Tensor> {
        let projected = self.proj.forward(xs)?;
        if fused::applies(&[&projected]) {
            return projected.contiguous()?.apply_op1_no_bwd(&Geglu);
        }
        let hidden = projected.narrow(D::Minus1, 0, self.inner)?;
        let gate = projected
            .narrow(D::Minus1, self.inner, self.inner)?
            .gelu_erf()?;
        hidden * gate
    }
}

pub(crate) fn layer_norm(vb: VarBuilder, dim: usize) -> Result<LayerNorm> {
    LayerNorm::new(vb, dim, 1e-5)
}

/// Self-attention, cross-attention to the text, feed-forward; each pre-normed and residual.
#[derive(Debug, Clone)]
pub struct BasicTransformerBlock {
    norm1: LayerNorm,
    attn1: Attention,
    norm2: LayerNorm,
    attn2: Attention,
    norm3: LayerNorm,
    ff: FeedForward,
}

impl BasicTransformerBlock {
    pub fn new(
        vb: VarBuilder,
        root: &str,
        dim: usize,
        heads: usize,
        cross_attention_dim: usize,
    ) -> Result<Self> {
        let head_dim = dim / heads;
        let self_kind = AttentionKind::SpatialSelf;
        Ok(Self {
            norm1: layer_norm(vb.pp("norm1"), dim)?,
            attn1: Attention::new(vb.pp("attn1"), root, dim, dim, heads, head_dim, self_kind)?,
            norm2: layer_norm(vb.pp("norm2"), dim)?,
            attn2: Attention::new(
                vb.pp("attn2"),
                root,
                dim,
                cross_attention_dim,
                heads,
                head_dim,
                AttentionKind::Cross,
            )?,
            norm3: layer_norm(vb.pp("norm3"), dim)?,
            ff: FeedForward::new(vb.pp("ff"), dim)?,
        })
    }

    /// `xs`: (N, T, C); `text`: (N, S, D) → (N, T, C).
    pub fn forward(
        &self,
        xs: &Tensor,
        text: &Tensor,
        pass: &ForwardPass,
        layout: TokenLayout,
    ) -> Result<Tensor> {
        let xs = self
            .attn1
            .forward_add(&self.norm1.forward(xs)?, None, pass, layout, xs)?;
        let normed = self.norm2.forward(&xs)?;
        let xs = self
            .attn2
            .forward_add(&normed, Some(text), pass, layout, &xs)?;
        self.ff.forward_add(&self.norm3.forward(&xs)?, &xs)
    }
}

/// A channel projection stored either as a 1×1 convolution (`use_linear_projection = false`) or
/// as a linear layer; both are the same map over the channel axis, applied here as a linear layer
/// on (…, C) rows.
pub(crate) fn channel_projection(
    vb: VarBuilder,
    in_dim: usize,
    out_dim: usize,
    stored_as_conv: bool,
) -> Result<Linear> {
    let weight = if stored_as_conv {
        vb.get((out_dim, in_dim, 1, 1), "weight")?
            .reshape((out_dim, in_dim))?
    } else {
        vb.get((out_dim, in_dim), "weight")?
    };
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// Settings of the spatial transformers of one UNet block.
#[derive(Debug, Clone, Copy)]
pub struct SpatialTransformerConfig {
    pub heads: usize,
    pub depth: usize,
    pub cross_attention_dim: usize,
    pub groups: usize,
    pub use_linear_projection: bool,
}

/// GroupNorm → proj_in → transformer blocks over the H·W pixels of each image → proj_out, plus
/// the input (diffusers `Transformer2DModel` for continuous inputs).
#[derive(Debug, Clone)]
pub struct SpatialTransformer {
    norm: GroupNorm,
    proj_in: Linear,
    blocks: Vec<BasicTransformerBlock>,
    proj_out: Linear,
}

impl SpatialTransformer {
    pub fn new(
        vb: VarBuilder,
        root: &str,
        channels: usize,
        cfg: &SpatialTransformerConfig,
    ) -> Result<Self> {
        let as_conv = !cfg.use_linear_projection;
        let norm = GroupNorm::new(vb.pp("norm"), cfg.groups, channels, 1e-6)?;
        let proj_in = channel_projection(vb.pp("proj_in"), channels, channels, as_conv)?;
        let blocks = (0..cfg.depth)
            .map(|i| {
                let vb = vb.pp("transformer_blocks").pp(i);
                BasicTransformerBlock::new(vb, root, channels, cfg.heads, cfg.cross_attention_dim)
            })
            .collect::<Result<Vec<_>>>()?;
        let proj_out = channel_projection(vb.pp("proj_out"), channels, channels, as_conv)?;
        Ok(Self {
            norm,
            proj_in,
            blocks,
            proj_out,
        })
    }

    /// `xs`: (N, C, H, W), N = videos × `frames`; `text`: (N, S, D) → (N, C, H, W).
    pub fn forward(
        &self,
        xs: &Tensor,
        text: &Tensor,
        pass: &ForwardPass,
        frames: usize,
    ) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        let layout = TokenLayout {
            videos: batch / frames.max(1),
            frames,
            height,
            width,
        };
        // Each image is its own group-norm sample: rows of one "frame".
        let tokens =
            self.norm
                .forward_to_rows(xs, 1)?
                .reshape((batch, height * width, channels))?;
        let mut hidden = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden, text, pass, layout)?;
        }
        let hidden = hidden.reshape((batch, height * width, 1, channels))?;
        self.proj_out.forward_to_images_add(&hidden, xs, 1.0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn fused_geglu_matches_candle_gelu_erf() -> Result<()> {
        let projected = (Tensor::randn(0f32, 2.0, (3, 5, 16), &Device::Cpu)? - 0.5)?;
        let fused = projected.apply_op1_no_bwd(&Geglu)?;
        let composed = (projected.narrow(D::Minus1, 0, 8)?
            * projected.narrow(D::Minus1, 8, 8)?.gelu_erf()?)?;
        assert_eq!(fused.dims(), &[3, 5, 8]);
        let diff = crate::test_util::max_abs_diff(&fused, &composed);
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
