//! The spatial transformer of the UNet (diffusers `Transformer2DModel` with
//! `BasicTransformerBlock`s), and the attention and feed-forward layers the motion modules share.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape, Tensor, D};
use candle_nn::{LayerNorm, Module, VarBuilder};
use rayon::prelude::*;

use super::linear::{linear, linear_no_bias, Linear};
use super::norm::GroupNorm;
use crate::models::attention::{AttentionHook, AttentionKind};
use crate::models::fused::{self, contiguous_f32};
use crate::models::vector_math::geglu;

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
    /// `context_dim` is the width of the keys' source: the query width for self-attention.
    pub fn new(
        vb: VarBuilder,
        root: &str,
        query_dim: usize,
        context_dim: usize,
        heads: usize,
        head_dim: usize,
        kind: AttentionKind,
    ) -> Result<Self> {
        let inner = heads * head_dim;
        Ok(Self {
            to_q: linear_no_bias(query_dim, inner, vb.pp("to_q"))?,
            to_k: linear_no_bias(context_dim, inner, vb.pp("to_k"))?,
            to_v: linear_no_bias(context_dim, inner, vb.pp("to_v"))?,
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

    /// `xs`: (N, T, C); `context`: (N, S, D), or `None` for self-attention → (N, T, C).
    pub fn forward(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        hook: &AttentionHook,
    ) -> Result<Tensor> {
        self.forward_with_residual(xs, context, hook, None)
    }

    /// `forward(xs, context) + residual`, the add folded into the output projection.
    pub fn forward_add(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        hook: &AttentionHook,
        residual: &Tensor,
    ) -> Result<Tensor> {
        self.forward_with_residual(xs, context, hook, Some(residual))
    }

    fn forward_with_residual(
        &self,
        xs: &Tensor,
        context: Option<&Tensor>,
        hook: &AttentionHook,
        residual: Option<&Tensor>,
    ) -> Result<Tensor> {
        let (batch, tokens, _channels) = xs.dims3()?;
        let context = context.unwrap_or(xs);
        let keys = context.dim(1)?;
        let split_heads = |x: Tensor, len: usize| {
            x.reshape((batch, len, self.heads, self.head_dim))?
                .transpose(1, 2)
        };
        let q = split_heads(self.to_q.forward(xs)?, tokens)?;
        let k = split_heads(self.to_k.forward(context)?, keys)?;
        let v = split_heads(self.to_v.forward(context)?, keys)?;
        let out = hook.attend(&self.path, self.kind, &q, &k, &v)?;
        let out = out
            .transpose(1, 2)?
            .reshape((batch, tokens, self.heads * self.head_dim))?;
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

/// `a · gelu(b)` for `[a, b]` the two halves of the last dimension, in one pass (CPU, f32).
struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("geglu: odd projection width {width}")
        }
        let inner = width / 2;
        let projected = contiguous_f32(storage, layout, "geglu input")?;
        let mut out = vec![0f32; projected.len() / 2];
        if inner > 0 {
            out.par_chunks_mut(inner)
                .zip(projected.par_chunks(width))
                .for_each(|(dst, row)| {
                    let (hidden, gate) = row.split_at(inner);
                    geglu(dst, hidden, gate);
                });
        }
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}

pub(crate) fn layer_norm(vb: VarBuilder, dim: usize) -> Result<LayerNorm> {
    candle_nn::layer_norm(dim, 1e-5, vb)
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

    /// `xs`: (N, T, C); `context`: (N, S, D) → (N, T, C).
    pub fn forward(&self, xs: &Tensor, context: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let xs = self
            .attn1
            .forward_add(&self.norm1.forward(xs)?, None, hook, xs)?;
        let xs = self
            .attn2
            .forward_add(&self.norm2.forward(&xs)?, Some(context), hook, &xs)?;
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

    /// `xs`: (N, C, H, W); `context`: (N, S, D) → (N, C, H, W).
    pub fn forward(&self, xs: &Tensor, context: &Tensor, hook: &AttentionHook) -> Result<Tensor> {
        let (batch, channels, height, width) = xs.dims4()?;
        // Each image is its own group-norm sample: rows of one "frame".
        let tokens =
            self.norm
                .forward_to_rows(xs, 1)?
                .reshape((batch, height * width, channels))?;
        let mut hidden = self.proj_in.forward(&tokens)?;
        for block in &self.blocks {
            hidden = block.forward(&hidden, context, hook)?;
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
        let diff = (fused - composed)?.abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(diff < 1e-5, "{diff}");
        Ok(())
    }
}
