//! The CLIP text encoder (transformers' `CLIPTextModel`), the prompt encoder of Stable Diffusion.
//!
//! Weight paths are the transformers checkpoint keys (`embeddings.token_embedding.weight`,
//! `encoder.layers.{i}.self_attn.q_proj.weight`, `final_layer_norm.weight`, ...). Hub files such
//! as SD 1.5's `text_encoder/model.safetensors` carry a `text_model.` prefix in front of them;
//! [`ClipTextTransformer::new`] accepts files with and without it.
//!
//! Attention is causal and there is no padding mask: SD pipelines never pass an attention mask,
//! so the padding tokens after the prompt attend to the prompt and to each other.

use std::path::Path;

use candle_core::{DType, Device, IndexOp, Module, Result, Tensor};
use candle_nn::{Embedding, Linear, VarBuilder};

use super::unet::norm::LayerNorm;
use serde::Deserialize;

/// The activation of the CLIP feed-forward block, named as in transformers' `hidden_act`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
pub enum ClipActivation {
    /// `x · sigmoid(1.702 x)`: OpenAI CLIP (SD 1.x).
    #[serde(rename = "quick_gelu")]
    QuickGelu,
    /// Exact (erf) GELU: OpenCLIP towers (SD 2.x, SDXL's second encoder).
    #[serde(rename = "gelu")]
    Gelu,
    /// The tanh approximation of GELU.
    #[serde(rename = "gelu_new", alias = "gelu_pytorch_tanh", alias = "gelu_fast")]
    GeluTanh,
}

impl Module for ClipActivation {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        match self {
            Self::QuickGelu => xs * candle_nn::ops::sigmoid(&(xs * 1.702)?)?,
            Self::Gelu => xs.gelu_erf(),
            Self::GeluTanh => xs.gelu(),
        }
    }
}

/// The text tower configuration, deserialised from a transformers `config.json`
/// (`CLIPTextConfig`). Missing fields take the values of SD 1.5's text encoder
/// (OpenAI CLIP ViT-L/14), which is also [`ClipTextConfig::sd15`]; unknown fields are ignored.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct ClipTextConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub intermediate_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub max_position_embeddings: usize,
    pub hidden_act: ClipActivation,
    pub layer_norm_eps: f64,
    pub bos_token_id: u32,
    /// `2` in the legacy OpenAI configs, where pooling falls back to the position of the
    /// largest id (the real EOS, 49407, is the largest id in the CLIP vocabulary).
    pub eos_token_id: u32,
    pub pad_token_id: u32,
    pub projection_dim: usize,
}

impl Default for ClipTextConfig {
    fn default() -> Self {
        Self::sd15()
    }
}

impl ClipTextConfig {
    /// SD 1.5's `text_encoder/config.json` (openai/clip-vit-large-patch14's text tower).
    pub fn sd15() -> Self {
        Self {
            vocab_size: 49408,
            hidden_size: 768,
            intermediate_size: 3072,
            num_hidden_layers: 12,
            num_attention_heads: 12,
            max_position_embeddings: 77,
            hidden_act: ClipActivation::QuickGelu,
            layer_norm_eps: 1e-5,
            bos_token_id: 0,
            eos_token_id: 2,
            pad_token_id: 1,
            projection_dim: 768,
        }
    }

    /// Reads a transformers `config.json`; errors name the file.
    pub fn from_file(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        let config: Self = serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        config
            .validate()
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        Ok(config)
    }

    fn validate(&self) -> std::result::Result<(), String> {
        if self.num_attention_heads == 0
            || !self.hidden_size.is_multiple_of(self.num_attention_heads)
        {
            return Err(format!(
                "hidden_size {} is not divisible by num_attention_heads {}",
                self.hidden_size, self.num_attention_heads
            ));
        }
        Ok(())
    }
}

/// Token embedding plus learned absolute position embedding.
#[derive(Debug, Clone)]
struct ClipTextEmbeddings {
    token_embedding: Embedding,
    position_embedding: Embedding,
    max_position_embeddings: usize,
}

impl ClipTextEmbeddings {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            token_embedding: candle_nn::embedding(
                cfg.vocab_size,
                cfg.hidden_size,
                vb.pp("token_embedding"),
            )?,
            position_embedding: candle_nn::embedding(
                cfg.max_position_embeddings,
                cfg.hidden_size,
                vb.pp("position_embedding"),
            )?,
            max_position_embeddings: cfg.max_position_embeddings,
        })
    }

    /// `input_ids`: (batch, tokens) → (batch, tokens, hidden).
    fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        let (_batch, tokens) = input_ids.dims2()?;
        if tokens > self.max_position_embeddings {
            candle_core::bail!(
                "CLIP input has {tokens} tokens, more than max_position_embeddings {}",
                self.max_position_embeddings
            );
        }
        let positions = Tensor::arange(0u32, tokens as u32, input_ids.device())?;
        let position_embeds = self.position_embedding.forward(&positions)?;
        self.token_embedding
            .forward(input_ids)?
            .broadcast_add(&position_embeds)
    }
}

#[derive(Debug, Clone)]
struct ClipAttention {
    q_proj: Linear,
    k_proj: Linear,
    v_proj: Linear,
    out_proj: Linear,
    heads: usize,
    head_dim: usize,
}

impl ClipAttention {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let hidden = cfg.hidden_size;
        Ok(Self {
            q_proj: candle_nn::linear(hidden, hidden, vb.pp("q_proj"))?,
            k_proj: candle_nn::linear(hidden, hidden, vb.pp("k_proj"))?,
            v_proj: candle_nn::linear(hidden, hidden, vb.pp("v_proj"))?,
            out_proj: candle_nn::linear(hidden, hidden, vb.pp("out_proj"))?,
            heads: cfg.num_attention_heads,
            head_dim: hidden / cfg.num_attention_heads,
        })
    }

    /// `xs`: (batch, tokens, hidden); `causal_mask`: (tokens, tokens), 0 or −∞.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let (batch, tokens, hidden) = xs.dims3()?;
        let split_heads = |t: Tensor| -> Result<Tensor> {
            t.reshape((batch, tokens, self.heads, self.head_dim))?
                .transpose(1, 2)?
                .contiguous()
        };
        let q = split_heads((self.q_proj.forward(xs)? * (self.head_dim as f64).powf(-0.5))?)?;
        let k = split_heads(self.k_proj.forward(xs)?)?;
        let v = split_heads(self.v_proj.forward(xs)?)?;
        let scores = q
            .matmul(&k.t()?.contiguous()?)?
            .broadcast_add(causal_mask)?;
        let probs = super::ops::softmax_last_dim(&scores)?;
        let attended = probs
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((batch, tokens, hidden))?;
        self.out_proj.forward(&attended)
    }
}

#[derive(Debug, Clone)]
struct ClipMlp {
    fc1: Linear,
    fc2: Linear,
    activation: ClipActivation,
}

impl ClipMlp {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        Ok(Self {
            fc1: candle_nn::linear(cfg.hidden_size, cfg.intermediate_size, vb.pp("fc1"))?,
            fc2: candle_nn::linear(cfg.intermediate_size, cfg.hidden_size, vb.pp("fc2"))?,
            activation: cfg.hidden_act,
        })
    }

    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        self.fc2
            .forward(&self.activation.forward(&self.fc1.forward(xs)?)?)
    }
}

/// Pre-norm transformer layer: `x + attn(ln1(x))`, then `x + mlp(ln2(x))`.
#[derive(Debug, Clone)]
struct ClipEncoderLayer {
    layer_norm1: LayerNorm,
    self_attn: ClipAttention,
    layer_norm2: LayerNorm,
    mlp: ClipMlp,
}

impl ClipEncoderLayer {
    fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        let eps = cfg.layer_norm_eps;
        Ok(Self {
            layer_norm1: LayerNorm::new(vb.pp("layer_norm1"), cfg.hidden_size, eps)?,
            self_attn: ClipAttention::new(vb.pp("self_attn"), cfg)?,
            layer_norm2: LayerNorm::new(vb.pp("layer_norm2"), cfg.hidden_size, eps)?,
            mlp: ClipMlp::new(vb.pp("mlp"), cfg)?,
        })
    }

    /// `xs`: (batch, tokens, hidden) → same shape.
    fn forward(&self, xs: &Tensor, causal_mask: &Tensor) -> Result<Tensor> {
        let attended = self
            .self_attn
            .forward(&self.layer_norm1.forward(xs)?, causal_mask)?;
        let xs = (xs + attended)?;
        let fed = self.mlp.forward(&self.layer_norm2.forward(&xs)?)?;
        xs + fed
    }
}

/// Everything `CLIPTextModel(..., output_hidden_states=True)` returns.
#[derive(Debug, Clone)]
pub struct ClipTextOutput {
    /// (batch, tokens, hidden), after `final_layer_norm`: SD's prompt embeddings.
    pub last_hidden_state: Tensor,
    /// (batch, hidden): `last_hidden_state` at the EOS position of each row.
    pub pooler_output: Tensor,
    /// `num_hidden_layers + 1` tensors of (batch, tokens, hidden): the embedding output, then the
    /// output of every layer, all before `final_layer_norm`.
    pub hidden_states: Vec<Tensor>,
}

/// transformers' `CLIPTextTransformer` (the `text_model` of `CLIPTextModel`).
#[derive(Debug, Clone)]
pub struct ClipTextTransformer {
    embeddings: ClipTextEmbeddings,
    layers: Vec<ClipEncoderLayer>,
    final_layer_norm: LayerNorm,
    eos_token_id: u32,
}

impl ClipTextTransformer {
    /// The device the weights live on.
    pub fn device(&self) -> &Device {
        self.embeddings.token_embedding.embeddings().device()
    }

    /// Builds the tower from transformers keys, with or without the `text_model.` prefix.
    pub fn new(vb: VarBuilder, cfg: &ClipTextConfig) -> Result<Self> {
        cfg.validate().map_err(candle_core::Error::Msg)?;
        let vb = if vb.contains_tensor("text_model.embeddings.token_embedding.weight") {
            vb.pp("text_model")
        } else {
            vb
        };
        let embeddings = ClipTextEmbeddings::new(vb.pp("embeddings"), cfg)?;
        let layers_vb = vb.pp("encoder").pp("layers");
        let layers = (0..cfg.num_hidden_layers)
            .map(|i| ClipEncoderLayer::new(layers_vb.pp(i), cfg))
            .collect::<Result<Vec<_>>>()?;
        let final_layer_norm = LayerNorm::new(
            vb.pp("final_layer_norm"),
            cfg.hidden_size,
            cfg.layer_norm_eps,
        )?;
        Ok(Self {
            embeddings,
            layers,
            final_layer_norm,
            eos_token_id: cfg.eos_token_id,
        })
    }

    /// Loads the tower from a safetensors file (transformers keys, with or without the
    /// `text_model.` prefix), converting the weights to `dtype`. Errors name the file.
    pub fn from_safetensors(
        weights: impl AsRef<Path>,
        cfg: &ClipTextConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let path = weights.as_ref();
        let with_path =
            |e: candle_core::Error| candle_core::Error::Msg(format!("{}: {e}", path.display()));
        let tensors = candle_core::safetensors::load(path, device).map_err(with_path)?;
        Self::new(VarBuilder::from_tensors(tensors, dtype, device), cfg).map_err(with_path)
    }

    pub fn num_hidden_layers(&self) -> usize {
        self.layers.len()
    }

    /// `input_ids` (batch, tokens), u32 or i64 → `last_hidden_state` (batch, tokens, hidden).
    pub fn forward(&self, input_ids: &Tensor) -> Result<Tensor> {
        self.forward_with_clip_skip(input_ids, 1)
    }

    /// The prompt embeddings with "CLIP skip", in the convention of ComfyUI's
    /// `CLIPSetLastLayer` (`stop_at_clip_layer = -clip_skip`) and A1111's "Clip skip" setting:
    /// `clip_skip = 1` is the last layer (the normal output), `2` the penultimate layer, and so
    /// on; the chosen layer's output then goes through `final_layer_norm`. diffusers pipelines
    /// count one lower: their `clip_skip = k` is `clip_skip = k + 1` here. Layers after the
    /// chosen one are not computed.
    ///
    /// `input_ids` (batch, tokens) → (batch, tokens, hidden).
    pub fn forward_with_clip_skip(&self, input_ids: &Tensor, clip_skip: usize) -> Result<Tensor> {
        let layers = self.layers.len();
        if clip_skip == 0 || clip_skip > layers {
            candle_core::bail!(
                "clip_skip {clip_skip} is out of range: 1 (last layer) to {layers} (first layer)"
            );
        }
        let mut xs = self.embeddings.forward(input_ids)?;
        let mask = causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?;
        for layer in &self.layers[..layers + 1 - clip_skip] {
            xs = layer.forward(&xs, &mask)?;
        }
        self.final_layer_norm.forward(&xs)
    }

    /// `last_hidden_state`, the pooled output and every hidden state, as transformers returns
    /// them with `output_hidden_states=True`. `input_ids`: (batch, tokens).
    pub fn forward_full(&self, input_ids: &Tensor) -> Result<ClipTextOutput> {
        let mut xs = self.embeddings.forward(input_ids)?;
        let mask = causal_mask(xs.dim(1)?, xs.dtype(), xs.device())?;
        let mut hidden_states = Vec::with_capacity(self.layers.len() + 1);
        hidden_states.push(xs.clone());
        for layer in &self.layers {
            xs = layer.forward(&xs, &mask)?;
            hidden_states.push(xs.clone());
        }
        let last_hidden_state = self.final_layer_norm.forward(&xs)?;
        let pooler_output = self.pool(&last_hidden_state, input_ids)?;
        Ok(ClipTextOutput {
            last_hidden_state,
            pooler_output,
            hidden_states,
        })
    }

    /// Picks one token per row of `last_hidden_state` (batch, tokens, hidden) → (batch, hidden),
    /// as transformers does: the first `eos_token_id` when that id is not the legacy `2`, else
    /// the position of the largest id. A row without EOS pools position 0, as in transformers.
    pub fn pool(&self, last_hidden_state: &Tensor, input_ids: &Tensor) -> Result<Tensor> {
        let (batch, _tokens, _hidden) = last_hidden_state.dims3()?;
        let ids = input_ids.to_dtype(DType::I64)?.to_vec2::<i64>()?;
        if ids.len() != batch {
            candle_core::bail!(
                "pooling: {} rows of input ids for a batch of {batch}",
                ids.len()
            );
        }
        let rows = ids
            .iter()
            .enumerate()
            .map(|(b, row)| {
                let position = if self.eos_token_id == 2 {
                    argmax_first(row)
                } else {
                    row.iter()
                        .position(|&id| id == i64::from(self.eos_token_id))
                        .unwrap_or(0)
                };
                last_hidden_state.i((b, position))
            })
            .collect::<Result<Vec<_>>>()?;
        Tensor::stack(&rows, 0)
    }
}

/// The index of the first maximum, as torch's `argmax`.
fn argmax_first(row: &[i64]) -> usize {
    let mut best = 0;
    for (i, &id) in row.iter().enumerate() {
        if id > row[best] {
            best = i;
        }
    }
    best
}

/// (tokens, tokens): 0 on and below the diagonal, −∞ above it.
fn causal_mask(tokens: usize, dtype: DType, device: &Device) -> Result<Tensor> {
    let values: Vec<f32> = (0..tokens)
        .flat_map(|row| (0..tokens).map(move |col| if col > row { f32::NEG_INFINITY } else { 0.0 }))
        .collect();
    Tensor::from_vec(values, (tokens, tokens), device)?.to_dtype(dtype)
}
