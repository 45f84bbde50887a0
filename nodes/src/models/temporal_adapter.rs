//! The lightweight motion-adaptive temporal modules of Hong & Quan (METHODS.md §1), trained on
//! a frozen image UNet: one small temporal attention after every spatial transformer of the
//! UNet (`down_blocks.N.attentions.M`, `mid_block.attentions.0`, `up_blocks.N.attentions.M`:
//! 16 at SD 1.5), applied as [`crate::models::patcher::Patch::TemporalAdapter`].
//!
//! Each module, on the (B·F, C, H, W) output of its spatial transformer `h`:
//! - takes one row of F frames per pixel, (B·H·W, F, C); LayerNorm; adds the sinusoidal frame
//!   positions (the rows of [`ForwardPass::frame_positions`] when a call sees a subset of the
//!   clip, as the AnimateDiff motion modules do);
//! - Q, K, V of inner width C/2 (bias-free), attention over the frames: global in the down and
//!   mid blocks, with the motion-adaptive logit bias `−λ(m)·|i − j|`, `λ(m) = λ_max·m`, in the up
//!   blocks (i, j the frames' positions in the clip);
//! - an output projection back to C, zero-initialised, so the untrained adapter leaves the
//!   image model exactly as it was;
//! - `h ← h + g·out` with the motion-aware gate `g = sigmoid(a·m + b)`, a and b learned
//!   scalars per module, initialised to 0 (g = 0.5 at init; the zero output projection still
//!   makes the untrained adapter the identity).
//!
//! m ∈ [0, 1] is the clip's motion amplitude in the forward pass's values under
//! [`AMPLITUDE_VALUE`] (put there by the `AmplitudeTap` of `video::motion_adaptive`, e.g. through
//! the `TemporalAttentionInjector` node); without it m = 0.
//!
//! The module's attention does not go through the attention hook: its bias is part of what was
//! trained, and the hook's motion-adaptive processor (on the up blocks' temporal layers) would
//! apply its own bias on top.
//!
//! # Weights
//!
//! Keys, per module, under the path of the spatial transformer it follows:
//!
//! ```text
//! down_blocks.0.attentions.0.temporal.norm.weight    (C)
//! down_blocks.0.attentions.0.temporal.norm.bias      (C)
//! down_blocks.0.attentions.0.temporal.to_q.weight    (C/2, C)
//! down_blocks.0.attentions.0.temporal.to_k.weight    (C/2, C)
//! down_blocks.0.attentions.0.temporal.to_v.weight    (C/2, C)
//! down_blocks.0.attentions.0.temporal.to_out.weight  (C, C/2)
//! down_blocks.0.attentions.0.temporal.to_out.bias    (C)
//! down_blocks.0.attentions.0.temporal.gate.a         (1)
//! down_blocks.0.attentions.0.temporal.gate.b         (1)
//! ```
//!
//! Files are safetensors with these keys and the hyperparameters in the metadata
//! ([`TemporalAdapter::save`], [`TemporalAdapter::load`]).
//!
//! # Training API
//!
//! Only the adapter's parameters are trained; the UNet stays plain tensors (building the
//! whole UNet from `Var`s keeps every intermediate for backprop):
//!
//! ```ignore
//! let cfg = TemporalAdapterConfig::for_unet(unet.base().config())?;
//! // The paper's initialisation, reproducible from a seed (out projection zero).
//! let init = TemporalAdapter::init_weights(&cfg, seed, DType::F32, &device)?;
//! let vars: BTreeMap<String, Var> = init
//!     .iter()
//!     .map(|(key, t)| Ok((key.clone(), Var::from_tensor(t)?)))
//!     .collect::<Result<_>>()?;
//! // Each step (or once: the modules hold the Vars' tensors, which `Var::set` updates in place):
//! let weights = vars.iter().map(|(k, v)| (k.clone(), v.as_tensor().clone())).collect();
//! let adapter = TemporalAdapter::from_weights(&cfg, weights)?;
//! let model = unet.with_temporal_adapter(Arc::new(adapter))?; // a PatchedUNet
//! let loss = model.forward(&inputs)?.sub(&noise)?.sqr()?.mean_all()?;
//! let grads = loss.backward()?; // gradients for every key of `cfg.trainable_keys()`
//! ```
//!
//! For sampling, build the adapter from detached tensors (`var.as_tensor().detach()`) or load
//! the saved file: layers whose weights track gradients take the composed ops, never the fused
//! CPU kernels. Keys of an adapter applied can also be replaced later with [`Patch::Weights`],
//! as for motion modules. m during training comes from the pass's values as at inference (an
//! `AmplitudeTap` patch), else 0. Save the trained weights with [`TemporalAdapter::save`] (or
//! [`save_weights`]).
//!
//! [`Patch::Weights`]: crate::models::patcher::Patch::Weights

use std::collections::{BTreeMap, HashMap};
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::attention::{scaled_dot_product, scaled_dot_product_with_bias};
use super::call::ForwardPass;
use super::motion::positions::sinusoidal_positions;
use super::unet::linear::Linear;
use super::unet::norm::LayerNorm;
use super::unet::UNet2DConditionConfig;
use super::weights::{self, NamedWeights};

/// The name of the motion amplitude m in [`crate::models::call::ForwardValues`]; the same name
/// as `video::motion_adaptive::AMPLITUDE_VALUE`, which writes it (models cannot import video).
pub const AMPLITUDE_VALUE: &str = "motion_amplitude";

/// The `format` entry of an adapter file's metadata.
pub const FILE_FORMAT: &str = "vdm.temporal_adapter.v1";

/// The key of every module's weights under its slot path.
const MODULE_PREFIX: &str = "temporal";

/// How a module's frames attend to each other.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TemporalField {
    /// Every frame attends to every frame (down and mid blocks).
    Global,
    /// Logits biased by `−λ(m)·|i − j|` (up blocks): the field narrows as motion grows.
    MotionAdaptive,
}

/// One module's place in the UNet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdapterSlot {
    /// The diffusers path of the spatial transformer the module follows,
    /// e.g. `down_blocks.0.attentions.1`; the module's keys are under `<path>.temporal.`.
    pub path: String,
    /// C, the channels of the features there.
    pub channels: usize,
    pub field: TemporalField,
}

impl AdapterSlot {
    /// C/2, the width of Q, K and V.
    pub fn inner(&self) -> usize {
        self.channels / 2
    }

    /// The prefix of the module's keys.
    pub fn prefix(&self) -> String {
        format!("{}.{MODULE_PREFIX}", self.path)
    }

    /// Every weight of the module: key and shape, in a fixed order.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        let (c, inner) = (self.channels, self.inner());
        let prefix = self.prefix();
        [
            ("norm.weight", vec![c]),
            ("norm.bias", vec![c]),
            ("to_q.weight", vec![inner, c]),
            ("to_k.weight", vec![inner, c]),
            ("to_v.weight", vec![inner, c]),
            ("to_out.weight", vec![c, inner]),
            ("to_out.bias", vec![c]),
            ("gate.a", vec![1]),
            ("gate.b", vec![1]),
        ]
        .into_iter()
        .map(|(name, shape)| (format!("{prefix}.{name}"), shape))
        .collect()
    }

    /// Parameters of the module: Q, K, V without bias (3·C·C/2, as diffusers' attention), the
    /// output projection with bias (C/2·C + C), the LayerNorm (2C), the gate (2): 2C² + 3C + 2.
    pub fn parameter_count(&self) -> usize {
        self.weight_shapes()
            .iter()
            .map(|(_, shape)| shape.iter().product::<usize>())
            .sum()
    }
}

/// The adapter's hyperparameters and its modules' slots.
#[derive(Debug, Clone, PartialEq)]
pub struct TemporalAdapterConfig {
    /// Attention heads of every module; each module's C/2 must be a multiple of it (8: head
    /// width 20, 40 and 80 at SD 1.5's 320, 640 and 1280 channels).
    pub heads: usize,
    /// λ at m = 1 of the up blocks' bias `−λ_max·m·|i − j|` (1: about ±2 frames at m = 1).
    pub lambda_max: f64,
    /// Rows of the frame-position table: the most frames (or the largest clip position + 1)
    /// one call can see.
    pub max_frames: usize,
    /// ε of the LayerNorm.
    pub norm_eps: f64,
    /// The modules, in forward order (down, mid, up).
    pub slots: Vec<AdapterSlot>,
}

impl TemporalAdapterConfig {
    pub const DEFAULT_HEADS: usize = 8;
    pub const DEFAULT_LAMBDA_MAX: f64 = 1.0;
    /// AnimateDiff's `motion_max_seq_length`.
    pub const DEFAULT_MAX_FRAMES: usize = 32;
    pub const DEFAULT_NORM_EPS: f64 = 1e-5;

    /// One module after every spatial transformer of a UNet of config `unet`, with the
    /// default hyperparameters. The slots follow the UNet's block layout: `attentions.M` for
    /// each layer of a cross-attention down block, of the mid block and of a cross-attention up
    /// block (which has one layer more).
    pub fn for_unet(unet: &UNet2DConditionConfig) -> Result<Self> {
        let blocks = unet.block_out_channels.len();
        let channels = &unet.block_out_channels;
        if unet.down_block_types.len() != blocks || unet.up_block_types.len() != blocks {
            candle_core::bail!(
                "UNet config: {} down and {} up block types for {blocks} block_out_channels",
                unet.down_block_types.len(),
                unet.up_block_types.len()
            )
        }
        let layers = unet.layers_per_block.expand(blocks, "layers_per_block")?;
        let has_attention = |block_type: &str| block_type.starts_with("CrossAttn");
        let mut slots = Vec::new();
        let mut push = |path: String, channels: usize, field: TemporalField| {
            slots.push(AdapterSlot {
                path,
                channels,
                field,
            })
        };
        for (i, block_type) in unet.down_block_types.iter().enumerate() {
            if has_attention(block_type) {
                for j in 0..layers[i] {
                    let path = format!("down_blocks.{i}.attentions.{j}");
                    push(path, channels[i], TemporalField::Global);
                }
            }
        }
        if unet.mid_block_type.is_some() {
            let path = "mid_block.attentions.0".to_string();
            push(path, channels[blocks - 1], TemporalField::Global);
        }
        for (i, block_type) in unet.up_block_types.iter().enumerate() {
            let level = blocks - 1 - i;
            if has_attention(block_type) {
                for j in 0..=layers[level] {
                    let path = format!("up_blocks.{i}.attentions.{j}");
                    push(path, channels[level], TemporalField::MotionAdaptive);
                }
            }
        }
        Ok(Self {
            heads: Self::DEFAULT_HEADS,
            lambda_max: Self::DEFAULT_LAMBDA_MAX,
            max_frames: Self::DEFAULT_MAX_FRAMES,
            norm_eps: Self::DEFAULT_NORM_EPS,
            slots,
        })
    }

    /// Refuses settings no module can be built with.
    pub fn validate(&self) -> Result<()> {
        if !(self.lambda_max.is_finite() && self.lambda_max >= 0.0) {
            candle_core::bail!(
                "temporal adapter: lambda_max must be ≥ 0, got {}",
                self.lambda_max
            )
        }
        if self.max_frames == 0 {
            candle_core::bail!("temporal adapter: max_frames must be at least 1")
        }
        if !(self.norm_eps.is_finite() && self.norm_eps > 0.0) {
            candle_core::bail!(
                "temporal adapter: norm_eps must be > 0, got {}",
                self.norm_eps
            )
        }
        for slot in &self.slots {
            let inner = slot.inner();
            if slot.channels % 2 != 0 || self.heads == 0 || inner % self.heads != 0 {
                candle_core::bail!(
                    "temporal adapter at {}: {} channels give an inner width of C/2 = {inner}, \
                     which cannot be split into {} heads",
                    slot.path,
                    slot.channels,
                    self.heads
                )
            }
        }
        Ok(())
    }

    /// Every weight of every module: key and shape, in forward order.
    pub fn weight_shapes(&self) -> Vec<(String, Vec<usize>)> {
        self.slots
            .iter()
            .flat_map(AdapterSlot::weight_shapes)
            .collect()
    }

    /// The keys a training run optimises: every weight of the adapter (the frame positions are
    /// fixed sinusoids, not weights).
    pub fn trainable_keys(&self) -> Vec<String> {
        self.weight_shapes()
            .into_iter()
            .map(|(key, _)| key)
            .collect()
    }

    /// Parameters of the adapter, counted from the config without allocating.
    pub fn parameter_count(&self) -> usize {
        self.slots.iter().map(AdapterSlot::parameter_count).sum()
    }

    /// The hyperparameters as file metadata (the slots follow from the UNet).
    fn metadata(&self) -> HashMap<String, String> {
        let channels: Vec<String> = self.slots.iter().map(|s| s.channels.to_string()).collect();
        HashMap::from([
            ("format".to_string(), FILE_FORMAT.to_string()),
            ("heads".to_string(), self.heads.to_string()),
            ("lambda_max".to_string(), self.lambda_max.to_string()),
            ("max_frames".to_string(), self.max_frames.to_string()),
            ("norm_eps".to_string(), self.norm_eps.to_string()),
            ("slot_channels".to_string(), channels.join(",")),
        ])
    }

    /// This config with the hyperparameters of a file's `metadata` (defaults where absent).
    fn with_metadata(mut self, metadata: &HashMap<String, String>) -> Result<Self> {
        fn read<T: std::str::FromStr>(
            metadata: &HashMap<String, String>,
            key: &str,
            default: T,
        ) -> Result<T> {
            match metadata.get(key) {
                None => Ok(default),
                Some(text) => text.parse().map_err(|_| {
                    candle_core::Error::Msg(format!("metadata `{key}` = {text:?} is not valid"))
                }),
            }
        }
        if let Some(format) = metadata.get("format") {
            if format != FILE_FORMAT {
                candle_core::bail!("the file's format is {format:?}, expected {FILE_FORMAT:?}")
            }
        }
        self.heads = read(metadata, "heads", self.heads)?;
        self.lambda_max = read(metadata, "lambda_max", self.lambda_max)?;
        self.max_frames = read(metadata, "max_frames", self.max_frames)?;
        self.norm_eps = read(metadata, "norm_eps", self.norm_eps)?;
        Ok(self)
    }
}

/// sigmoid(x) = 1 / (1 + e^(−x)) as a composition of ops, so that a gradient reaches x.
fn sigmoid(xs: &Tensor) -> Result<Tensor> {
    (xs.neg()?.exp()? + 1.0)?.recip()
}

/// One temporal module (see the module docs).
#[derive(Debug, Clone)]
pub struct TemporalModule {
    norm: LayerNorm,
    to_q: Linear,
    to_k: Linear,
    to_v: Linear,
    to_out: Linear,
    /// a and b of the gate sigmoid(a·m + b), (1,) each.
    gate_a: Tensor,
    gate_b: Tensor,
    /// (max_frames, C) sinusoidal frame positions.
    positions: Tensor,
    slot: AdapterSlot,
    heads: usize,
    lambda_max: f64,
}

impl TemporalModule {
    /// Builds the module of `slot` from the weights under `vb` (the UNet root: keys are
    /// `<slot>.temporal.…`). The hints give the paper's initialisation to a `VarMap` builder
    /// (random Q/K/V, everything else 0 except the LayerNorm's scale).
    pub fn new(vb: VarBuilder, slot: &AdapterSlot, cfg: &TemporalAdapterConfig) -> Result<Self> {
        let (c, inner) = (slot.channels, slot.inner());
        if c % 2 != 0 || cfg.heads == 0 || inner % cfg.heads != 0 {
            candle_core::bail!(
                "temporal adapter at {}: {c} channels give an inner width of C/2 = {inner}, \
                 which cannot be split into {} heads",
                slot.path,
                cfg.heads
            )
        }
        let vb = vb.pp(slot.prefix());
        let xavier = xavier_bound(c, inner);
        let projection = |name: &str, shape: (usize, usize), init: Init| -> Result<Linear> {
            Linear::new(vb.pp(name).get_with_hints(shape, "weight", init)?, None)
        };
        let uniform = Init::Uniform {
            lo: -xavier,
            up: xavier,
        };
        let to_out = Linear::new(
            vb.pp("to_out")
                .get_with_hints((c, inner), "weight", Init::Const(0.0))?,
            Some(
                vb.pp("to_out")
                    .get_with_hints(c, "bias", Init::Const(0.0))?,
            ),
        )?;
        let gate = vb.pp("gate");
        let positions =
            sinusoidal_positions(cfg.max_frames, c, vb.device())?.to_dtype(vb.dtype())?;
        Ok(Self {
            norm: LayerNorm::new(vb.pp("norm"), c, cfg.norm_eps)?,
            to_q: projection("to_q", (inner, c), uniform)?,
            to_k: projection("to_k", (inner, c), uniform)?,
            to_v: projection("to_v", (inner, c), uniform)?,
            to_out,
            gate_a: gate.get_with_hints(1, "a", Init::Const(0.0))?,
            gate_b: gate.get_with_hints(1, "b", Init::Const(0.0))?,
            positions,
            slot: slot.clone(),
            heads: cfg.heads,
            lambda_max: cfg.lambda_max,
        })
    }

    pub fn slot(&self) -> &AdapterSlot {
        &self.slot
    }

    /// `xs`: (B·F, C, H, W), the output of the slot's spatial transformer, each video's F
    /// frames together → (B·F, C, H, W), `xs + g·out`.
    pub fn forward(&self, xs: &Tensor, frames: usize, pass: &ForwardPass) -> Result<Tensor> {
        let (batch_frames, channels, height, width) = xs.dims4()?;
        let path = &self.slot.path;
        if channels != self.slot.channels {
            candle_core::bail!(
                "temporal adapter at {path}: {channels} channels, the module has {}",
                self.slot.channels
            )
        }
        if frames == 0 || batch_frames % frames != 0 {
            candle_core::bail!(
                "temporal adapter at {path}: {batch_frames} rows are not a whole number of \
                 {frames}-frame videos"
            )
        }
        let videos = batch_frames / frames;
        let pixels = height * width;
        // One row of F frames per pixel: (B·H·W, F, C).
        let rows = xs
            .reshape((videos, frames, channels, pixels))?
            .permute((0, 3, 1, 2))?
            .reshape((videos * pixels, frames, channels))?;
        let positions = self.frame_positions(frames, pass.frame_positions)?;
        let hidden = self.norm.forward(&rows)?.broadcast_add(&positions)?;

        let head_dim = self.slot.inner() / self.heads;
        let split_heads = |x: Tensor| {
            x.reshape((videos * pixels, frames, self.heads, head_dim))?
                .transpose(1, 2)
        };
        let q = split_heads(self.to_q.forward(&hidden)?)?;
        let k = split_heads(self.to_k.forward(&hidden)?)?;
        let v = split_heads(self.to_v.forward(&hidden)?)?;
        // m is measured without gradient (AmplitudeTap): a plain number here.
        let m = pass.values.get(AMPLITUDE_VALUE).unwrap_or(0.0);
        let scale = 1.0 / (head_dim as f64).sqrt();
        let attended =
            match self.logit_bias(m, &pass_positions(pass, frames), q.dtype(), q.device())? {
                Some(bias) => scaled_dot_product_with_bias(&q, &k, &v, scale, &bias)?,
                None => scaled_dot_product(&q, &k, &v, scale)?,
            };
        let attended =
            attended
                .transpose(1, 2)?
                .reshape((videos * pixels, frames, self.slot.inner()))?;
        let out = self.to_out.forward(&attended)?;
        let gate = sigmoid(&(self.gate_a.affine(m, 0.0)? + &self.gate_b)?)?;
        let update = out
            .broadcast_mul(&gate)?
            .reshape((videos, pixels, frames, channels))?
            .permute((0, 2, 3, 1))?
            .reshape((batch_frames, channels, height, width))?;
        xs + update
    }

    /// The (F, F) logit term `−λ_max·m·|i − j|` over the frames' clip positions, or `None`
    /// where attention is global (down and mid blocks, m = 0 or λ_max = 0).
    fn logit_bias(
        &self,
        m: f64,
        positions: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Option<Tensor>> {
        let lambda = self.lambda_max * m;
        if self.slot.field == TemporalField::Global || lambda <= 0.0 {
            return Ok(None);
        }
        let frames = positions.len();
        let bias: Vec<f64> = positions
            .iter()
            .flat_map(|&i| {
                positions
                    .iter()
                    .map(move |&j| -lambda * i.abs_diff(j) as f64)
            })
            .collect();
        Ok(Some(
            Tensor::from_vec(bias, (frames, frames), device)?.to_dtype(dtype)?,
        ))
    }

    /// The (F, C) rows of the position table for frames at `positions` (0, 1, …, F−1 when not
    /// given).
    fn frame_positions(&self, frames: usize, positions: Option<&[usize]>) -> Result<Tensor> {
        let table_len = self.positions.dim(0)?;
        let Some(positions) = positions else {
            if frames > table_len {
                candle_core::bail!(
                    "temporal adapter at {}: {frames} frames exceed its table of {table_len} \
                     positions (max_frames)",
                    self.slot.path
                )
            }
            return self.positions.narrow(0, 0, frames);
        };
        if positions.len() != frames {
            candle_core::bail!("{} frame positions for {frames} frames", positions.len())
        }
        if let Some(&beyond) = positions.iter().find(|&&p| p >= table_len) {
            candle_core::bail!(
                "temporal adapter at {}: frame position {beyond} is beyond its table of \
                 {table_len} positions (max_frames)",
                self.slot.path
            )
        }
        let index: Vec<u32> = positions.iter().map(|&p| p as u32).collect();
        let index = Tensor::from_vec(index, frames, self.positions.device())?;
        self.positions.index_select(&index, 0)
    }
}

/// The clip positions of the call's `frames` frames.
fn pass_positions(pass: &ForwardPass, frames: usize) -> Vec<usize> {
    match pass.frame_positions {
        Some(positions) => positions.to_vec(),
        None => (0..frames).collect(),
    }
}

/// Xavier (Glorot) uniform bound √(6 / (fan_in + fan_out)).
fn xavier_bound(fan_in: usize, fan_out: usize) -> f64 {
    (6.0 / (fan_in + fan_out) as f64).sqrt()
}

/// The temporal modules of every spatial transformer of a UNet.
#[derive(Debug, Clone)]
pub struct TemporalAdapter {
    modules: Vec<TemporalModule>,
    config: TemporalAdapterConfig,
    /// Every weight the modules were built from, by key.
    weights: Arc<NamedWeights>,
}

impl TemporalAdapter {
    /// Builds the adapter from weights named as in the module docs, under `vb`'s prefix.
    pub fn new(vb: VarBuilder, cfg: &TemporalAdapterConfig) -> Result<Self> {
        cfg.validate()?;
        let (vb, recorded) = weights::recording(vb);
        let modules = cfg
            .slots
            .iter()
            .map(|slot| TemporalModule::new(vb.clone(), slot, cfg))
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            modules,
            config: cfg.clone(),
            weights: Arc::new(recorded.take()),
        })
    }

    /// Builds the adapter from `weights` by key, used as they are: tensors of `Var`s make a
    /// trainable adapter whose forward carries gradients to them. Every key of
    /// `cfg.trainable_keys()` must be there with its shape, and no other.
    pub fn from_weights(cfg: &TemporalAdapterConfig, weights: NamedWeights) -> Result<Self> {
        check_weights(cfg, &weights, "the weights given")?;
        let (dtype, device) = match weights.values().next() {
            Some(t) => (t.dtype(), t.device().clone()),
            None => (DType::F32, Device::Cpu),
        };
        let weights = Arc::new(weights);
        let vb = weights::overlay(&weights, &Arc::default(), dtype, &device);
        Self::new(vb, cfg)
    }

    /// The paper's initialisation, reproducible from `seed`: Q, K and V Xavier-uniform (drawn
    /// from one ChaCha8 stream in key order), the output projection and the gate zero, the
    /// LayerNorm the identity. The adapter built from them leaves the UNet unchanged.
    pub fn init_weights(
        cfg: &TemporalAdapterConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<NamedWeights> {
        cfg.validate()?;
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let mut weights = NamedWeights::new();
        for slot in &cfg.slots {
            let bound = xavier_bound(slot.channels, slot.inner()) as f32;
            for (key, shape) in slot.weight_shapes() {
                let len: usize = shape.iter().product();
                let values: Vec<f32> = if key.ends_with(".to_q.weight")
                    || key.ends_with(".to_k.weight")
                    || key.ends_with(".to_v.weight")
                {
                    (0..len).map(|_| rng.random_range(-bound..bound)).collect()
                } else if key.ends_with(".norm.weight") {
                    vec![1.0; len]
                } else {
                    vec![0.0; len]
                };
                let tensor = Tensor::from_vec(values, shape, device)?.to_dtype(dtype)?;
                weights.insert(key, tensor);
            }
        }
        Ok(weights)
    }

    /// The initialised adapter of [`Self::init_weights`].
    pub fn init(
        cfg: &TemporalAdapterConfig,
        seed: u64,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        Self::from_weights(cfg, Self::init_weights(cfg, seed, dtype, device)?)
    }

    /// The same adapter with the weights of `replaced` (by key) in place of its own; every other
    /// weight is shared. Keys it does not have are ignored (see [`weights::matching`]).
    pub fn with_weights(&self, replaced: &Arc<NamedWeights>) -> Result<Self> {
        let (dtype, device) = match self.weights.values().next() {
            Some(t) => (t.dtype(), t.device().clone()),
            None => return Ok(self.clone()),
        };
        let vb = weights::overlay(&self.weights, replaced, dtype, &device);
        let mut adapter = Self::new(vb, &self.config)?;
        adapter.weights = self.weights.clone();
        Ok(adapter)
    }

    /// Every weight by key, as the adapter was built.
    pub fn weights(&self) -> &NamedWeights {
        &self.weights
    }

    pub fn config(&self) -> &TemporalAdapterConfig {
        &self.config
    }

    /// Every module, in forward order.
    pub fn modules(&self) -> &[TemporalModule] {
        &self.modules
    }

    /// The module after the spatial transformer at `path` (`down_blocks.0.attentions.1`).
    pub fn module(&self, path: &str) -> Option<&TemporalModule> {
        self.modules.iter().find(|m| m.slot.path == path)
    }

    /// Runs the module of slot `path` on `xs` ((B·F, C, H, W) of `frames`-frame videos), or
    /// returns `xs` when the adapter has none there.
    pub fn apply(
        &self,
        path: &str,
        xs: &Tensor,
        frames: usize,
        pass: &ForwardPass,
    ) -> Result<Tensor> {
        match self.module(path) {
            Some(module) => module.forward(xs, frames, pass),
            None => Ok(xs.clone()),
        }
    }

    /// Checks that every module has a spatial transformer of its width in a UNet with
    /// `unet_weights` (its checkpoint keys): the transformer's GroupNorm `<path>.norm.weight`;
    /// and that the adapter's weights have the UNet's dtype and device.
    pub fn check_fits(&self, unet_weights: &NamedWeights) -> std::result::Result<(), String> {
        if let (Some(ours), Some(unet)) =
            (self.weights.values().next(), unet_weights.values().next())
        {
            if ours.dtype() != unet.dtype() || !ours.device().same_device(unet.device()) {
                return Err(format!(
                    "the temporal adapter's weights are {:?} on {:?}, the UNet's {:?} on {:?} \
                     (build or load the adapter in the UNet's dtype and device)",
                    ours.dtype(),
                    ours.device(),
                    unet.dtype(),
                    unet.device()
                ));
            }
        }
        for slot in &self.config.slots {
            match unet_weights.get(&format!("{}.norm.weight", slot.path)) {
                None => {
                    return Err(format!(
                        "the temporal adapter has a module at {}, where this UNet has no spatial \
                         transformer",
                        slot.path
                    ))
                }
                Some(norm) if norm.dims() != [slot.channels] => {
                    return Err(format!(
                        "the temporal adapter's module at {} has {} channels, the UNet has {:?} \
                         there (an adapter trained on another UNet)",
                        slot.path,
                        slot.channels,
                        norm.dims()
                    ))
                }
                Some(_) => {}
            }
        }
        Ok(())
    }

    /// Writes the weights and hyperparameters to `path` (safetensors), atomically: to a
    /// temporary file beside it, then renamed over it.
    pub fn save(&self, path: &Path) -> Result<()> {
        save_weights(&self.config, &self.weights, path)
    }

    /// Reads an adapter file written by [`Self::save`] for a UNet of config `unet`, its weights
    /// converted to `dtype` on `device`. Refuses a file whose weights do not fit this UNet's
    /// layout (another UNet's adapter, or another file).
    pub fn load(
        path: &Path,
        unet: &UNet2DConditionConfig,
        dtype: DType,
        device: &Device,
    ) -> Result<Self> {
        let in_file = |e: candle_core::Error| {
            candle_core::Error::Msg(format!("temporal adapter {}: {e}", path.display()))
        };
        let bytes = std::fs::read(path).map_err(|e| {
            candle_core::Error::Msg(format!("temporal adapter {}: {e}", path.display()))
        })?;
        let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).map_err(|e| {
            candle_core::Error::Msg(format!(
                "temporal adapter {}: not a safetensors file ({e})",
                path.display()
            ))
        })?;
        let metadata = header.metadata().clone().unwrap_or_default();
        let cfg = TemporalAdapterConfig::for_unet(unet)
            .and_then(|cfg| cfg.with_metadata(&metadata))
            .map_err(in_file)?;
        let weights: NamedWeights = candle_core::safetensors::load_buffer(&bytes, device)
            .map_err(in_file)?
            .into_iter()
            .map(|(key, t)| Ok((key, t.to_dtype(dtype)?)))
            .collect::<Result<_>>()?;
        let saved_for = metadata.get("slot_channels").map_or(String::new(), |c| {
            format!(" (the file's modules have channels [{c}])")
        });
        check_weights(&cfg, &weights, "the file")
            .map_err(|e| {
                candle_core::Error::Msg(format!(
                    "{e}: it is not a temporal adapter for this UNet (block channels {:?}){saved_for}",
                    unet.block_out_channels
                ))
            })
            .map_err(in_file)?;
        Self::from_weights(&cfg, weights).map_err(in_file)
    }
}

/// Checks that `weights` has exactly the keys and shapes of `cfg`; `what` names them in the
/// error.
fn check_weights(cfg: &TemporalAdapterConfig, weights: &NamedWeights, what: &str) -> Result<()> {
    let expected: BTreeMap<String, Vec<usize>> = cfg.weight_shapes().into_iter().collect();
    for (key, shape) in &expected {
        match weights.get(key) {
            None => candle_core::bail!("{what} has no weight `{key}`"),
            Some(t) if t.dims() != shape.as_slice() => candle_core::bail!(
                "{what} has weight `{key}` of shape {:?}, the module needs {shape:?}",
                t.dims()
            ),
            Some(_) => {}
        }
    }
    if let Some(extra) = weights.keys().find(|key| !expected.contains_key(*key)) {
        candle_core::bail!("{what} has weight `{extra}`, which no module of this layout has")
    }
    Ok(())
}

/// Writes adapter `weights` of config `cfg` to `path` as [`TemporalAdapter::save`] does
/// (e.g. the current values of the `Var`s of a training run), checking keys and shapes first.
pub fn save_weights(
    cfg: &TemporalAdapterConfig,
    weights: &NamedWeights,
    path: &Path,
) -> Result<()> {
    check_weights(cfg, weights, "the adapter")?;
    let file_name = path.file_name().ok_or_else(|| {
        candle_core::Error::Msg(format!(
            "temporal adapter: {} is not a file path",
            path.display()
        ))
    })?;
    let mut temp_name = file_name.to_os_string();
    temp_name.push(format!(".tmp-{}", std::process::id()));
    let temp = path.with_file_name(temp_name);
    let detached: Vec<(String, Tensor)> = weights
        .iter()
        .map(|(key, t)| Ok((key.clone(), t.detach().to_device(&Device::Cpu)?)))
        .collect::<Result<_>>()?;
    let written = safetensors::serialize_to_file(detached, Some(cfg.metadata()), &temp)
        .map_err(|e| candle_core::Error::Msg(format!("temporal adapter {}: {e}", temp.display())))
        .and_then(|()| {
            std::fs::rename(&temp, path).map_err(|e| {
                candle_core::Error::Msg(format!("temporal adapter {}: {e}", path.display()))
            })
        });
    if written.is_err() {
        // Nothing half-written is left behind; the error above is the one to report.
        let _ = std::fs::remove_file(&temp);
    }
    written
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::attention::AttentionHook;
    use crate::models::call::FeatureTap;
    use crate::models::ops::with_composed_ops;
    use crate::models::patcher::{Patch, PatchedUNet, UNetInputs};
    use crate::models::random::random_weights_for;
    use crate::models::unet::UNet2DConditionModel;
    use crate::test_util::max_abs_diff;
    use candle_core::Var;

    /// SD 1.x's UNet layout at 32/64 channels, two levels: transformers in the first down
    /// block (2 layers) and the last up block (3 layers), and the mid block.
    fn tiny_unet_config() -> UNet2DConditionConfig {
        serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 8
        }))
        .unwrap()
    }

    fn tiny_unet() -> Result<Arc<UNet2DConditionModel>> {
        let config = tiny_unet_config();
        let weights = random_weights_for(|vb| UNet2DConditionModel::new(vb, &config).map(|_| ()))?;
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        Ok(Arc::new(UNet2DConditionModel::new(vb, &config)?))
    }

    /// Puts a fixed m into every forward pass, as the injector's `AmplitudeTap` does.
    struct FixedAmplitude(f64);

    impl FeatureTap for FixedAmplitude {
        fn observe(&self, point: &str, _xs: &Tensor, pass: &ForwardPass) -> Result<()> {
            if point == "conv_in" {
                pass.values.set(AMPLITUDE_VALUE, self.0);
            }
            Ok(())
        }
    }

    /// The noise prediction of `unet` for one fixed 3-frame clip.
    fn predict(unet: &PatchedUNet) -> Result<Tensor> {
        let dev = Device::Cpu;
        let sample = Tensor::arange(0f32, 4.0 * 3.0 * 64.0, &dev)?
            .reshape((1, 4, 3, 8, 8))?
            .affine(0.01, -1.0)?
            .sin()?;
        let text = Tensor::arange(0f32, 5.0 * 32.0, &dev)?
            .reshape((1, 5, 32))?
            .affine(0.05, 0.0)?
            .cos()?;
        unet.forward(&UNetInputs::new(&sample, 500.0, &text))
    }

    #[test]
    fn sd15_has_sixteen_modules_of_24_8m_parameters() -> Result<()> {
        let cfg = TemporalAdapterConfig::for_unet(&UNet2DConditionConfig::default())?;
        let paths: Vec<&str> = cfg.slots.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(cfg.slots.len(), 16);
        assert_eq!(
            paths
                .iter()
                .filter(|p| p.starts_with("down_blocks."))
                .count(),
            6
        );
        assert_eq!(
            paths.iter().filter(|p| p.starts_with("mid_block.")).count(),
            1
        );
        assert_eq!(
            paths.iter().filter(|p| p.starts_with("up_blocks.")).count(),
            9
        );
        assert_eq!(paths[0], "down_blocks.0.attentions.0");
        assert_eq!(paths[6], "mid_block.attentions.0");
        assert_eq!(paths[7], "up_blocks.1.attentions.0");
        assert_eq!(paths[15], "up_blocks.3.attentions.2");
        for slot in &cfg.slots {
            let adaptive = slot.path.starts_with("up_blocks.");
            assert_eq!(
                slot.field == TemporalField::MotionAdaptive,
                adaptive,
                "{}",
                slot.path
            );
        }
        let widths: Vec<usize> = cfg.slots.iter().map(|s| s.channels).collect();
        assert_eq!(
            widths,
            [
                320, 320, 640, 640, 1280, 1280, 1280, 1280, 1280, 1280, 640, 640, 640, 320, 320,
                320
            ]
        );
        // Per module 2C² + 3C + 2 (Q, K, V bias-free; out with bias; LayerNorm; gate), with
        // C = 320 five times, 640 five times and 1280 six times: 24,818,272. METHODS.md quotes
        // 25.8M for inner width C/2; no choice of biases gets there (all biases: 24,836,992),
        // while 24.8M is the "2.9% of the UNet" it also quotes (SD 1.5's UNet: 859.5M).
        let count = cfg.parameter_count();
        println!("SD 1.5 temporal adapter parameters: {count}");
        assert_eq!(count, 24_818_272);
        let share = count as f64 / 859_520_964.0;
        assert!((share - 0.029).abs() < 0.0005, "{share}");
        assert_eq!(cfg.trainable_keys().len(), 16 * 9);
        Ok(())
    }

    #[test]
    fn slots_follow_the_unet_layout() -> Result<()> {
        let cfg = TemporalAdapterConfig::for_unet(&tiny_unet_config())?;
        let slots: Vec<(&str, usize, TemporalField)> = cfg
            .slots
            .iter()
            .map(|s| (s.path.as_str(), s.channels, s.field))
            .collect();
        use TemporalField::{Global, MotionAdaptive};
        assert_eq!(
            slots,
            [
                ("down_blocks.0.attentions.0", 32, Global),
                ("down_blocks.0.attentions.1", 32, Global),
                ("mid_block.attentions.0", 64, Global),
                ("up_blocks.1.attentions.0", 32, MotionAdaptive),
                ("up_blocks.1.attentions.1", 32, MotionAdaptive),
                ("up_blocks.1.attentions.2", 32, MotionAdaptive),
            ]
        );
        // The config counts what the built adapter holds.
        let adapter = TemporalAdapter::init(&cfg, 1, DType::F32, &Device::Cpu)?;
        let held: usize = adapter.weights().values().map(|t| t.elem_count()).sum();
        assert_eq!(held, cfg.parameter_count());
        let bad = TemporalAdapterConfig { heads: 3, ..cfg };
        let error = bad.validate().unwrap_err().to_string();
        assert!(error.contains("3 heads"), "{error}");
        Ok(())
    }

    #[test]
    fn the_initialisation_is_reproducible_and_zero_where_the_paper_says() -> Result<()> {
        let cfg = TemporalAdapterConfig::for_unet(&tiny_unet_config())?;
        let a = TemporalAdapter::init_weights(&cfg, 7, DType::F32, &Device::Cpu)?;
        let b = TemporalAdapter::init_weights(&cfg, 7, DType::F32, &Device::Cpu)?;
        let c = TemporalAdapter::init_weights(&cfg, 8, DType::F32, &Device::Cpu)?;
        let key = "up_blocks.1.attentions.2.temporal.to_k.weight";
        assert_eq!(max_abs_diff(&a[key], &b[key]), 0.0);
        assert!(max_abs_diff(&a[key], &c[key]) > 0.0);
        let zero = |k: &str| {
            a[k].abs()
                .unwrap()
                .max_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        for suffix in [
            "to_out.weight",
            "to_out.bias",
            "gate.a",
            "gate.b",
            "norm.bias",
        ] {
            assert_eq!(
                zero(&format!("mid_block.attentions.0.temporal.{suffix}")),
                0.0
            );
        }
        let bound = xavier_bound(32, 16) as f32;
        let largest = a[key].abs()?.max_all()?.to_scalar::<f32>()?;
        assert!(largest > 0.0 && largest <= bound, "{largest} vs {bound}");
        Ok(())
    }

    #[test]
    fn a_zero_initialised_adapter_leaves_the_unet_unchanged() -> Result<()> {
        let base = tiny_unet()?;
        let plain = PatchedUNet::new(base.clone());
        let cfg = TemporalAdapterConfig::for_unet(base.config())?;
        let adapter = Arc::new(TemporalAdapter::init(&cfg, 3, DType::F32, &Device::Cpu)?);
        let adapted = plain
            .with_temporal_adapter(adapter)
            .map_err(candle_core::Error::Msg)?;
        let expected = predict(&plain)?;
        assert_eq!(max_abs_diff(&predict(&adapted)?, &expected), 0.0);
        // With motion in the pass the up blocks' bias and the gates act, on a zero update.
        let moving = |unet: &PatchedUNet| {
            unet.with_patch(Patch::Tap(Arc::new(FixedAmplitude(0.8))))
                .map_err(candle_core::Error::Msg)
        };
        assert_eq!(max_abs_diff(&predict(&moving(&adapted)?)?, &expected), 0.0);
        assert_eq!(max_abs_diff(&predict(&moving(&plain)?)?, &expected), 0.0);
        Ok(())
    }

    /// Random weights for every key of `cfg`, scaled by `scale` (the LayerNorm's scale about 1).
    fn random_adapter_weights(
        cfg: &TemporalAdapterConfig,
        scale: f64,
        dtype: DType,
    ) -> Result<NamedWeights> {
        let mut weights = NamedWeights::new();
        for (key, shape) in cfg.weight_shapes() {
            let noise = (Tensor::randn(0f64, 1.0, shape, &Device::Cpu)? * scale)?;
            let tensor = if key.ends_with(".norm.weight") {
                (noise + 1.0)?
            } else {
                noise
            };
            weights.insert(key, tensor.to_dtype(dtype)?);
        }
        Ok(weights)
    }

    #[test]
    fn a_trained_adapter_changes_the_output_and_the_up_blocks_follow_m() -> Result<()> {
        let base = tiny_unet()?;
        let plain = PatchedUNet::new(base.clone());
        let cfg = TemporalAdapterConfig::for_unet(base.config())?;
        let adapter =
            TemporalAdapter::from_weights(&cfg, random_adapter_weights(&cfg, 0.2, DType::F32)?)?;
        let adapted = plain
            .with_temporal_adapter(Arc::new(adapter))
            .map_err(candle_core::Error::Msg)?;
        let still = predict(&adapted)?;
        assert!(max_abs_diff(&still, &predict(&plain)?) > 1e-4);
        let moving = adapted
            .with_patch(Patch::Tap(Arc::new(FixedAmplitude(1.0))))
            .map_err(candle_core::Error::Msg)?;
        assert!(max_abs_diff(&predict(&moving)?, &still) > 1e-5);
        // A weight override of an adapter key reaches the adapter.
        let key = "up_blocks.1.attentions.2.temporal.to_out.bias";
        let mut replaced = NamedWeights::new();
        replaced.insert(key.to_string(), Tensor::ones(32, DType::F32, &Device::Cpu)?);
        let overridden = adapted
            .with_weights(replaced)
            .map_err(candle_core::Error::Msg)?;
        assert!(max_abs_diff(&predict(&overridden)?, &still) > 1e-4);
        Ok(())
    }

    #[test]
    fn gradients_reach_every_adapter_key_through_the_unet() -> Result<()> {
        let base = tiny_unet()?;
        let cfg = TemporalAdapterConfig::for_unet(base.config())?;
        let vars: BTreeMap<String, Var> = random_adapter_weights(&cfg, 0.2, DType::F32)?
            .iter()
            .map(|(key, t)| Ok((key.clone(), Var::from_tensor(t)?)))
            .collect::<Result<_>>()?;
        let weights = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let adapter = TemporalAdapter::from_weights(&cfg, weights)?;
        let model = PatchedUNet::new(base)
            .with_temporal_adapter(Arc::new(adapter))
            .map_err(candle_core::Error::Msg)?
            .with_patch(Patch::Tap(Arc::new(FixedAmplitude(0.5))))
            .map_err(candle_core::Error::Msg)?;
        let grads = predict(&model)?.sqr()?.mean_all()?.backward()?;
        for key in cfg.trainable_keys() {
            let grad = grads
                .get(vars[&key].as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached `{key}`"));
            let largest = grad.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(largest > 0.0 && largest.is_finite(), "`{key}`: {largest}");
        }
        Ok(())
    }

    #[test]
    fn given_frame_positions_select_the_table_rows() -> Result<()> {
        let cfg = TemporalAdapterConfig::for_unet(&tiny_unet_config())?;
        let adapter =
            TemporalAdapter::from_weights(&cfg, random_adapter_weights(&cfg, 0.3, DType::F32)?)?;
        let xs = Tensor::randn(0f32, 1.0, (6, 32, 2, 2), &Device::Cpu)?;
        let hook = AttentionHook::new();
        let mut pass = ForwardPass::new(&hook);
        pass.frames = 3;
        pass.values.set(AMPLITUDE_VALUE, 0.5);
        let path = "up_blocks.1.attentions.0";
        let default = adapter.apply(path, &xs, 3, &pass)?;
        let positions = [0, 1, 2];
        pass.frame_positions = Some(&positions);
        assert_eq!(
            max_abs_diff(&adapter.apply(path, &xs, 3, &pass)?, &default),
            0.0
        );
        let spread = [0, 4, 8];
        pass.frame_positions = Some(&spread);
        assert!(max_abs_diff(&adapter.apply(path, &xs, 3, &pass)?, &default) > 1e-5);
        let beyond = [0, 1, 40];
        pass.frame_positions = Some(&beyond);
        let error = adapter.apply(path, &xs, 3, &pass).unwrap_err().to_string();
        assert!(error.contains("frame position 40"), "{error}");
        Ok(())
    }

    /// One f64 module at `path` of a 8-channel, 2-head adapter, with every weight a `Var`:
    /// autograd's gradient of a scalar loss equals central finite differences.
    fn gradients_match_finite_differences(path: &str, field: TemporalField) -> Result<()> {
        let cfg = TemporalAdapterConfig {
            heads: 2,
            lambda_max: 1.0,
            max_frames: 8,
            norm_eps: 1e-5,
            slots: vec![AdapterSlot {
                path: path.to_string(),
                channels: 8,
                field,
            }],
        };
        let dev = Device::Cpu;
        let start = random_adapter_weights(&cfg, 0.5, DType::F64)?;
        let vars: BTreeMap<String, Var> = start
            .iter()
            .map(|(key, t)| Ok((key.clone(), Var::from_tensor(t)?)))
            .collect::<Result<_>>()?;
        // Two videos of 4 frames of 2×2 pixels, m = 0.6 (the bias acts in the up blocks, the
        // gate everywhere).
        let frames = 4;
        let xs = Tensor::randn(0f64, 1.0, (2 * frames, 8, 2, 2), &dev)?;
        let probe = Tensor::randn(0f64, 1.0, (2 * frames, 8, 2, 2), &dev)?;
        let hook = AttentionHook::new();
        let mut pass = ForwardPass::new(&hook);
        pass.frames = frames;
        pass.values.set(AMPLITUDE_VALUE, 0.6);
        // Both evaluations on the composed (differentiable) ops, which the tracked one takes
        // anyway: candle's one-pass layer norm has no f64 kernel.
        let loss = |weights: NamedWeights| -> Result<Tensor> {
            with_composed_ops(|| {
                let adapter = TemporalAdapter::from_weights(&cfg, weights)?;
                (adapter.apply(path, &xs, frames, &pass)? * &probe)?.sum_all()
            })
        };
        let tracked: NamedWeights = vars
            .iter()
            .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
            .collect();
        let grads = loss(tracked)?.backward()?;
        let eps = 1e-5;
        for (key, var) in &vars {
            let grad = grads
                .get(var.as_tensor())
                .unwrap_or_else(|| panic!("no gradient reached `{key}`"))
                .flatten_all()?
                .to_vec1::<f64>()?;
            assert!(
                grad.iter().any(|g| g.abs() > 1e-8),
                "`{key}`: all-zero gradient"
            );
            let values = start[key].flatten_all()?.to_vec1::<f64>()?;
            let len = values.len();
            for index in [0, len / 2, len - 1] {
                let at = |delta: f64| -> Result<f64> {
                    let mut moved = values.clone();
                    moved[index] += delta;
                    let mut weights = start.clone();
                    let shape = start[key].shape().clone();
                    weights.insert(key.clone(), Tensor::from_vec(moved, shape, &dev)?);
                    loss(weights)?.to_scalar::<f64>()
                };
                let numeric = (at(eps)? - at(-eps)?) / (2.0 * eps);
                let analytic = grad[index];
                let error = (analytic - numeric).abs();
                assert!(
                    error <= 1e-4 * analytic.abs().max(numeric.abs()) + 1e-9,
                    "`{key}`[{index}]: autograd {analytic}, finite differences {numeric}"
                );
            }
        }
        Ok(())
    }

    #[test]
    fn gradients_of_a_global_module_match_finite_differences() -> Result<()> {
        gradients_match_finite_differences("down_blocks.0.attentions.0", TemporalField::Global)
    }

    #[test]
    fn gradients_of_a_motion_adaptive_module_match_finite_differences() -> Result<()> {
        gradients_match_finite_differences(
            "up_blocks.1.attentions.0",
            TemporalField::MotionAdaptive,
        )
    }

    #[test]
    fn a_saved_adapter_loads_back_and_another_unets_is_refused() -> Result<()> {
        let dir = std::env::temp_dir().join(format!("vdm-temporal-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir)?;
        let unet = tiny_unet_config();
        let mut cfg = TemporalAdapterConfig::for_unet(&unet)?;
        cfg.heads = 4;
        cfg.lambda_max = 0.5;
        let adapter =
            TemporalAdapter::from_weights(&cfg, random_adapter_weights(&cfg, 0.1, DType::F32)?)?;
        let path = dir.join("adapter.safetensors");
        adapter.save(&path)?;
        let loaded = TemporalAdapter::load(&path, &unet, DType::F32, &Device::Cpu)?;
        assert_eq!(loaded.config(), &cfg);
        for (key, tensor) in adapter.weights() {
            assert_eq!(max_abs_diff(&loaded.weights()[key], tensor), 0.0, "{key}");
        }
        let leftovers: Vec<_> = std::fs::read_dir(&dir)?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<std::io::Result<_>>()?;
        assert_eq!(leftovers, [std::ffi::OsString::from("adapter.safetensors")]);

        // The same layout at other widths: every shape differs.
        let wider = UNet2DConditionConfig {
            block_out_channels: vec![64, 128],
            ..unet.clone()
        };
        let error = TemporalAdapter::load(&path, &wider, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("not a temporal adapter for this UNet")
                && error.contains("[64, 128]")
                && error.contains("of shape"),
            "{error}"
        );
        // Another layout: modules where this UNet has none.
        let deeper = UNet2DConditionConfig {
            layers_per_block: crate::models::unet::PerBlock::All(1),
            ..unet
        };
        let error = TemporalAdapter::load(&path, &deeper, DType::F32, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("which no module of this layout has"),
            "{error}"
        );
        std::fs::remove_dir_all(&dir)?;
        Ok(())
    }
}
