//! LoRA files merged into model weights, as ComfyUI's `LoraLoader` and AnimateDiff-Evolved's
//! motion LoRAs apply them.
//!
//! A LoRA file stores, per adapted layer (a *module*), a low-rank change `up · down` (with an
//! optional `alpha`) or a full difference. Its module names follow one of several conventions;
//! each is mapped to the checkpoint key of the weight it changes, the diffusers name the model
//! was built with:
//!
//! | convention | module name (file keys add the suffixes below) |
//! | --- | --- |
//! | kohya / A1111, diffusers names | `lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q` (also `lycoris_…`) |
//! | kohya / A1111, LDM names | `lora_unet_input_blocks_1_1_transformer_blocks_0_attn1_to_q`, renamed with the single-file checkpoint mapping |
//! | LDM, dotted | `diffusion_model.input_blocks.1.1.proj_in` |
//! | diffusers / PEFT | `unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q` (with or without `unet.`) |
//! | diffusers attention processors | `unet.down_blocks.0.….attn1.processor.to_q` (`to_out` for `to_out.0`) |
//! | kohya text encoder | `lora_te_text_model_encoder_layers_0_self_attn_q_proj` (also `lora_te1_…`) |
//! | diffusers text encoder | `text_encoder.text_model.encoder.layers.0.self_attn.q_proj` |
//! | AnimateDiff motion LoRA | `down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q` |
//!
//! ComfyUI's own map names diffusers attention projections only in the processor form; the plain
//! module path, as diffusers and PEFT save it, is accepted as well.
//!
//! The text-encoder modules are the six projections of each layer ComfyUI adapts (`q_proj`,
//! `k_proj`, `v_proj`, `out_proj`, `mlp.fc1`, `mlp.fc2`). Suffixes: `.lora_up.weight` /
//! `.lora_down.weight` (kohya), `.lora_B.weight` / `.lora_A.weight` (PEFT), `_lora.up.weight` /
//! `_lora.down.weight` (diffusers processors, motion LoRAs), `.lora.up.weight` /
//! `.lora.down.weight`, `.lora_linear_layer.up.weight` / `.down.weight` (transformers), `.alpha`,
//! and `.diff` / `.diff_b` for a full difference of the weight / of the bias.
//!
//! The merge is ComfyUI's: `W' = W + strength · (alpha / rank) · up · down`, with `rank` the
//! rows of `down` and `alpha` the rank when the file has none, computed in f32 and cast back to
//! `W`'s dtype. Convolution changes (LoCon) are flattened to matrices (`up` to
//! `(out, rank)`, `down` to `(rank, in·kh·kw)`) and the product is reshaped to the kernel.
//! Motion LoRAs carry no alpha and add `strength · up · down`, as AnimateDiff-Evolved does.
//! Keys of modules that map to no weight, or that need what is not supported (Tucker
//! `lora_mid`, DoRA `dora_scale`, and the LoHa / LoKr / GLoRA factors, which have none of the
//! suffixes), are reported as not applied, as ComfyUI's "lora key not loaded".

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::checkpoint::MotionModuleFile;
use super::clip::{ClipTextConfig, ClipTextTransformer};
use super::load::{animatediff_key_to_diffusers, ldm_unet_key_to_diffusers, open_weights};
use super::load::{LoadError, WeightMap};
use super::patcher::{Patch, PatchedUNet};
use super::unet::UNet2DConditionModel;
use super::weights::{self, NamedWeights};

/// Why a LoRA could not be read or merged.
#[derive(Debug, thiserror::Error)]
pub enum LoraError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{origin}: LoRA module `{module}`: {message}")]
    Merge {
        origin: String,
        module: String,
        message: String,
    },
    #[error("{origin}: {message}")]
    Model { origin: String, message: String },
}

/// What one file key of a LoRA is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Part {
    Up,
    Down,
    Alpha,
    Diff,
    DiffBias,
    /// A part of a format that is not supported (Tucker `lora_mid`, DoRA `dora_scale`): the
    /// whole module is left out.
    Unsupported,
}

/// The key suffixes a LoRA file uses, with the part each names.
const SUFFIXES: [(&str, Part); 15] = [
    (".lora_up.weight", Part::Up),
    (".lora_down.weight", Part::Down),
    (".lora_B.weight", Part::Up),
    (".lora_A.weight", Part::Down),
    ("_lora.up.weight", Part::Up),
    ("_lora.down.weight", Part::Down),
    (".lora_linear_layer.up.weight", Part::Up),
    (".lora_linear_layer.down.weight", Part::Down),
    (".lora.up.weight", Part::Up),
    (".lora.down.weight", Part::Down),
    (".alpha", Part::Alpha),
    (".diff", Part::Diff),
    (".diff_b", Part::DiffBias),
    (".lora_mid.weight", Part::Unsupported),
    (".dora_scale", Part::Unsupported),
];

/// The file keys of one adapted layer.
#[derive(Debug, Clone, Default)]
struct Module {
    parts: Vec<(Part, String)>,
}

impl Module {
    fn key(&self, part: Part) -> Option<&str> {
        self.parts
            .iter()
            .find(|(p, _)| *p == part)
            .map(|(_, key)| key.as_str())
    }

    fn keys(&self) -> impl Iterator<Item = &str> {
        self.parts.iter().map(|(_, key)| key.as_str())
    }

    /// Whether the module has a complete up/down pair.
    fn is_low_rank(&self) -> bool {
        self.key(Part::Up).is_some() && self.key(Part::Down).is_some()
    }

    /// Whether the module can be merged: a complete up/down pair or a difference, no up
    /// without its down (or the reverse), and nothing unsupported.
    fn is_mergeable(&self) -> bool {
        let half_pair = self.key(Part::Up).is_some() != self.key(Part::Down).is_some();
        let diff = self.key(Part::Diff).is_some() || self.key(Part::DiffBias).is_some();
        self.key(Part::Unsupported).is_none() && !half_pair && (self.is_low_rank() || diff)
    }
}

/// A LoRA file, its keys grouped by the module they change.
#[derive(Debug, Clone)]
pub struct LoraFile {
    path: PathBuf,
    tensors: WeightMap,
    modules: BTreeMap<String, Module>,
}

/// The weights a LoRA changes in one model, merged, and the file keys that went into them.
#[derive(Debug, Clone, Default)]
pub struct MergedLora {
    /// The merged weights by checkpoint key of the model.
    pub weights: NamedWeights,
    /// The file keys of the modules merged.
    pub applied: BTreeSet<String>,
}

impl LoraFile {
    /// Opens a LoRA: safetensors or a PyTorch zip pickle (`.ckpt`, `.pt`, `.bin`).
    pub fn open(path: &Path) -> Result<Self, LoraError> {
        Ok(Self::from_weights(path, open_weights(path)?))
    }

    /// Groups already opened tensors by module.
    pub fn from_weights(path: &Path, tensors: WeightMap) -> Self {
        let mut modules: BTreeMap<String, Module> = BTreeMap::new();
        for key in tensors.keys() {
            let found = SUFFIXES
                .iter()
                .find_map(|(suffix, part)| key.strip_suffix(suffix).map(|name| (name, *part)));
            // Keys with none of the suffixes belong to no module and are never applied.
            if let Some((name, part)) = found {
                modules
                    .entry(name.to_string())
                    .or_default()
                    .parts
                    .push((part, key.to_string()));
            }
        }
        Self {
            path: path.to_path_buf(),
            tensors,
            modules,
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The number of tensors in the file.
    pub fn key_count(&self) -> usize {
        self.tensors.len()
    }

    /// The file keys none of `merges` applied, sorted: ComfyUI's "lora key not loaded".
    pub fn not_applied(&self, merges: &[&MergedLora]) -> Vec<String> {
        self.tensors
            .keys()
            .filter(|key| !merges.iter().any(|m| m.applied.contains(*key)))
            .map(str::to_string)
            .collect()
    }

    /// The modules `target` maps to a weight key, with that key; unmergeable modules are left
    /// out.
    fn targets(&self, target: impl Fn(&str) -> Option<String>) -> Vec<(&str, &Module, String)> {
        self.modules
            .iter()
            .filter(|(_, module)| module.is_mergeable())
            .filter_map(|(name, module)| target(name).map(|key| (name.as_str(), module, key)))
            .collect()
    }

    /// The file keys of the modules `target` maps, without merging anything (what a strength of
    /// 0 still counts as loaded, as ComfyUI does).
    fn claimed(&self, target: impl Fn(&str) -> Option<String>) -> MergedLora {
        let applied = self
            .targets(target)
            .into_iter()
            .flat_map(|(_, module, _)| module.keys().map(str::to_string))
            .collect();
        MergedLora {
            weights: NamedWeights::new(),
            applied,
        }
    }

    /// Merges every module `target` maps to a weight key (of the weight; a `.diff_b` goes to the
    /// `.bias` beside it) into the weight `current` returns for that key, scaled by `strength`.
    /// Results are cast to the current weight's dtype when `keep_dtype`, else left in f32.
    fn merge(
        &self,
        strength: f64,
        target: impl Fn(&str) -> Option<String>,
        current: impl Fn(&str) -> Option<Tensor>,
        keep_dtype: bool,
    ) -> Result<MergedLora, LoraError> {
        let mut merged = MergedLora::default();
        for (name, module, weight_key) in self.targets(target) {
            let fail = |message: String| LoraError::Merge {
                origin: self.tensors.origin().to_string(),
                module: name.to_string(),
                message,
            };
            let mut changes: Vec<(String, Tensor)> = Vec::new();
            if module.is_low_rank() || module.key(Part::Diff).is_some() {
                changes.push((weight_key.clone(), self.weight_change(name, module)?));
            }
            if let Some(diff_key) = module.key(Part::DiffBias) {
                let bias_key = match weight_key.strip_suffix(".weight") {
                    Some(stem) => format!("{stem}.bias"),
                    None => return Err(fail(format!("`{weight_key}` has no bias beside it"))),
                };
                changes.push((bias_key, self.read(diff_key)?));
            }
            for (key, change) in changes {
                let base = merged
                    .weights
                    .get(&key)
                    .cloned()
                    .or_else(|| current(&key))
                    .ok_or_else(|| fail(format!("the model has no weight `{key}`")))?;
                let result = add_scaled(&base, &change, strength, keep_dtype)
                    .map_err(|e| fail(format!("cannot merge into `{key}`: {e}")))?;
                merged.weights.insert(key, result);
            }
            merged.applied.extend(module.keys().map(str::to_string));
        }
        Ok(merged)
    }

    /// The unscaled change a module makes to its weight: `(alpha / rank) · up · down` (flattened
    /// to matrices), or its `.diff`.
    fn weight_change(&self, name: &str, module: &Module) -> Result<Tensor, LoraError> {
        let name_error = |message: String| LoraError::Merge {
            origin: self.tensors.origin().to_string(),
            module: name.to_string(),
            message,
        };
        let (Some(up_key), Some(down_key)) = (module.key(Part::Up), module.key(Part::Down)) else {
            let diff_key = module
                .key(Part::Diff)
                .ok_or_else(|| name_error("neither up/down nor diff".into()))?;
            return self.read(diff_key);
        };
        let up = self.read(up_key)?;
        let down = self.read(down_key)?;
        let product = || -> candle_core::Result<Tensor> {
            let rank = down.dim(0)?;
            let up = up.flatten_from(1)?;
            let down = down.flatten_from(1)?;
            if up.dim(1)? != rank {
                candle_core::bail!(
                    "up {:?} and down {:?} do not share a rank",
                    up.dims(),
                    down.dims()
                )
            }
            up.matmul(&down)
        };
        let product = product().map_err(|e| name_error(e.to_string()))?;
        let rank = down.dims().first().copied().unwrap_or(1).max(1) as f64;
        let scale = match module.key(Part::Alpha) {
            Some(alpha_key) => {
                let alpha = self
                    .read(alpha_key)?
                    .flatten_all()
                    .and_then(|t| t.get(0))
                    .and_then(|t| t.to_scalar::<f32>())
                    .map_err(|e| name_error(format!("alpha: {e}")))?;
                f64::from(alpha) / rank
            }
            None => 1.0,
        };
        (product * scale).map_err(|e| name_error(e.to_string()))
    }

    /// A tensor of the file as f32 on the CPU.
    fn read(&self, key: &str) -> Result<Tensor, LoraError> {
        Ok(self.tensors.load(key, DType::F32, &Device::Cpu)?)
    }
}

/// `base + strength · change`, in f32, reshaped to `base`'s shape, on `base`'s device; cast
/// back to `base`'s dtype when `keep_dtype`.
fn add_scaled(
    base: &Tensor,
    change: &Tensor,
    strength: f64,
    keep_dtype: bool,
) -> candle_core::Result<Tensor> {
    if change.elem_count() != base.elem_count() {
        candle_core::bail!(
            "the change has shape {:?}, the weight {:?}",
            change.dims(),
            base.dims()
        )
    }
    let change = change.reshape(base.shape())?.to_device(base.device())?;
    let sum = (base.to_dtype(DType::F32)? + (change * strength)?)?;
    if keep_dtype {
        sum.to_dtype(base.dtype())
    } else {
        Ok(sum)
    }
}

/// `name` with every `.` as `_`, as kohya names modules.
fn underscored(name: &str) -> String {
    name.replace('.', "_")
}

/// The names in LDM UNet keys that contain an underscore; every other `_` of a kohya LDM name
/// stands for a `.`.
const LDM_COMPOUND_NAMES: [&str; 16] = [
    "input_blocks",
    "middle_block",
    "output_blocks",
    "time_embed",
    "label_emb",
    "in_layers",
    "out_layers",
    "emb_layers",
    "skip_connection",
    "transformer_blocks",
    "proj_in",
    "proj_out",
    "to_q",
    "to_k",
    "to_v",
    "to_out",
];

/// The dotted LDM path of a kohya LDM module name: `input_blocks_1_1_transformer_blocks_0_attn1_to_q`
/// → `input_blocks.1.1.transformer_blocks.0.attn1.to_q`.
fn ldm_path(name: &str) -> String {
    let tokens: Vec<&str> = name.split('_').collect();
    let mut parts: Vec<String> = Vec::with_capacity(tokens.len());
    let mut i = 0;
    while i < tokens.len() {
        let joined = tokens
            .get(i + 1)
            .map(|next| format!("{}_{next}", tokens[i]));
        match joined {
            Some(compound) if LDM_COMPOUND_NAMES.contains(&compound.as_str()) => {
                parts.push(compound);
                i += 2;
            }
            _ => {
                parts.push(tokens[i].to_string());
                i += 1;
            }
        }
    }
    parts.join(".")
}

/// A diffusers module path as the model names it: without `unet.`, without the attention
/// `processor.` level, `to_out` as `to_out.0`.
fn diffusers_path(name: &str) -> String {
    let name = name.strip_prefix("unet.").unwrap_or(name);
    let name = name.replace(".processor.", ".");
    match name.strip_suffix(".to_out") {
        Some(stem) => format!("{stem}.to_out.0"),
        None => name,
    }
}

/// Maps LoRA module names to the UNet weight they change.
struct UnetTargets<'a> {
    keys: &'a NamedWeights,
    /// kohya diffusers-named modules: `down_blocks_0_…_to_q` → `down_blocks.0.….to_q.weight`.
    kohya: HashMap<String, &'a str>,
    layers_per_block: usize,
}

impl<'a> UnetTargets<'a> {
    fn new(unet: &'a UNet2DConditionModel) -> Self {
        let keys = unet.weights();
        let kohya = keys
            .keys()
            .filter_map(|key| key.strip_suffix(".weight").map(|stem| (stem, key)))
            .map(|(stem, key)| (underscored(stem), key.as_str()))
            .collect();
        let config = unet.config();
        let layers_per_block = config
            .layers_per_block
            .expand(config.block_out_channels.len(), "layers_per_block")
            .ok()
            .and_then(|per_block| per_block.first().copied())
            .unwrap_or(2);
        Self {
            keys,
            kohya,
            layers_per_block,
        }
    }

    fn weight(&self, key: String) -> Option<String> {
        self.keys.contains_key(&key).then_some(key)
    }

    fn ldm_weight(&self, path: &str) -> Option<String> {
        let key = ldm_unet_key_to_diffusers(&format!("{path}.weight"), self.layers_per_block)?;
        self.weight(key)
    }

    fn target(&self, module: &str) -> Option<String> {
        let kohya = module
            .strip_prefix("lora_unet_")
            .or_else(|| module.strip_prefix("lycoris_"));
        if let Some(name) = kohya {
            return match self.kohya.get(name) {
                Some(key) => Some(key.to_string()),
                None => self.ldm_weight(&ldm_path(name)),
            };
        }
        if let Some(path) = module.strip_prefix("diffusion_model.") {
            return self.ldm_weight(path);
        }
        self.weight(format!("{}.weight", diffusers_path(module)))
    }
}

/// The text-encoder projections ComfyUI adapts, by transformers path and kohya name.
const CLIP_PROJECTIONS: [(&str, &str); 6] = [
    ("mlp.fc1", "mlp_fc1"),
    ("mlp.fc2", "mlp_fc2"),
    ("self_attn.k_proj", "self_attn_k_proj"),
    ("self_attn.q_proj", "self_attn_q_proj"),
    ("self_attn.v_proj", "self_attn_v_proj"),
    ("self_attn.out_proj", "self_attn_out_proj"),
];

/// The text-encoder weight a LoRA module changes: `text_model.encoder.layers.N.<projection>.weight`
/// as `base` names it (with or without the `text_model.` prefix).
fn text_encoder_target(module: &str, base: &NamedWeights) -> Option<String> {
    let (layer, projection) = if let Some(rest) = module
        .strip_prefix("lora_te_text_model_encoder_layers_")
        .or_else(|| module.strip_prefix("lora_te1_text_model_encoder_layers_"))
    {
        let (layer, name) = rest.split_once('_')?;
        let (path, _) = CLIP_PROJECTIONS.iter().find(|(_, n)| *n == name)?;
        (layer, *path)
    } else {
        let rest = module.strip_prefix("text_encoder.text_model.encoder.layers.")?;
        let (layer, path) = rest.split_once('.')?;
        let (path, _) = CLIP_PROJECTIONS.iter().find(|(p, _)| *p == path)?;
        (layer, *path)
    };
    let layer: usize = layer.parse().ok()?;
    let key = format!("encoder.layers.{layer}.{projection}.weight");
    [format!("text_model.{key}"), key]
        .into_iter()
        .find(|k| base.contains_key(k))
}

/// The motion-module weight an AnimateDiff motion LoRA module changes, as AnimateDiff-Evolved
/// names it (the `processor.` level dropped, `to_out` as `to_out.0`), renamed to the
/// diffusers `MotionAdapter` key and kept when `has` knows it. Only `temporal` modules count.
fn motion_target(module: &str, has: impl Fn(&str) -> bool) -> Option<String> {
    if !module.contains("temporal") {
        return None;
    }
    let original = format!("{}.weight", diffusers_path(module));
    let key = animatediff_key_to_diffusers(&original)?;
    has(&key).then_some(key)
}

/// A text encoder's frozen weights by checkpoint key, its config, and the weights replaced so
/// far (LoRAs merged in, in order): a patched encoder is rebuilt from these, sharing every
/// weight not replaced with the frozen one.
#[derive(Clone)]
pub struct TextEncoderWeights {
    pub config: ClipTextConfig,
    pub base: Arc<NamedWeights>,
    pub replaced: Arc<NamedWeights>,
}

impl std::fmt::Debug for TextEncoderWeights {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TextEncoderWeights")
            .field("weights", &self.base.len())
            .field("replaced", &self.replaced.len())
            .finish()
    }
}

impl TextEncoderWeights {
    /// The frozen weights of an encoder built with `config`, none replaced.
    pub fn new(config: ClipTextConfig, base: NamedWeights) -> Self {
        Self {
            config,
            base: Arc::new(base),
            replaced: Arc::default(),
        }
    }

    /// The weight in use under `key`: replaced, else frozen.
    pub fn current(&self, key: &str) -> Option<&Tensor> {
        self.replaced.get(key).or_else(|| self.base.get(key))
    }

    /// The same weights with those of `replaced` in place as well (later ones win).
    pub fn with_replaced(&self, replaced: NamedWeights) -> Self {
        let mut all = (*self.replaced).clone();
        all.extend(replaced);
        Self {
            config: self.config.clone(),
            base: self.base.clone(),
            replaced: Arc::new(all),
        }
    }

    /// Builds the encoder with the replaced weights in place, in the frozen weights' dtype and
    /// on their device.
    pub fn build(&self) -> candle_core::Result<ClipTextTransformer> {
        let Some(any) = self.base.values().next() else {
            candle_core::bail!("the text encoder has no weights")
        };
        let vb = weights::overlay(&self.base, &self.replaced, any.dtype(), any.device());
        ClipTextTransformer::new(vb, &self.config)
    }
}

/// The weight in use in `unet` under `key`: from the latest weight override that has it, else
/// the frozen UNet's.
fn current_unet_weight(unet: &PatchedUNet, key: &str) -> Option<Tensor> {
    unet.patches()
        .iter()
        .rev()
        .find_map(|patch| match patch {
            Patch::Weights(replaced) => replaced.get(key).cloned(),
            _ => None,
        })
        .or_else(|| unet.base().weights().get(key).cloned())
}

/// The UNet weights `lora` changes, merged with `strength` into the weights `unet` uses now
/// (its earlier LoRAs included), in their dtype: to be applied as [`Patch::Weights`]. A
/// strength of 0 merges nothing but still claims the modules that map to the UNet.
pub fn merge_into_unet(
    lora: &LoraFile,
    unet: &PatchedUNet,
    strength: f64,
) -> Result<MergedLora, LoraError> {
    let targets = UnetTargets::new(unet.base());
    let target = |module: &str| targets.target(module);
    if strength == 0.0 {
        return Ok(lora.claimed(target));
    }
    lora.merge(strength, target, |key| current_unet_weight(unet, key), true)
}

/// The text-encoder weights `lora` changes, merged with `strength` into the weights in use now,
/// in their dtype: to be given to [`TextEncoderWeights::with_replaced`]. A strength of 0 merges
/// nothing but still claims the modules that map to the text encoder.
pub fn merge_into_text_encoder(
    lora: &LoraFile,
    encoder: &TextEncoderWeights,
    strength: f64,
) -> Result<MergedLora, LoraError> {
    let target = |module: &str| text_encoder_target(module, &encoder.base);
    if strength == 0.0 {
        return Ok(lora.claimed(target));
    }
    lora.merge(strength, target, |key| encoder.current(key).cloned(), true)
}

/// The motion-module weights an AnimateDiff motion LoRA (`v2_lora_ZoomIn.ckpt`, …) at
/// `lora_path` changes in `module`, merged with `strength` as AnimateDiff-Evolved does
/// (`W + strength · up · down`), by `MotionAdapter` key. `earlier` holds the overrides of
/// motion LoRAs merged before (empty for the first), which this one adds to. The weights stay
/// f32: the adapter casts them to its dtype when rebuilt. Apply them as [`Patch::Weights`]
/// after the motion module itself. Modules of the mid block are left out (reported as not
/// applied) when the motion module has none.
pub fn motion_lora_overrides(
    module: &MotionModuleFile,
    lora_path: &Path,
    strength: f64,
    earlier: &NamedWeights,
) -> Result<(MergedLora, Vec<String>), LoraError> {
    let lora = LoraFile::open(lora_path)?;
    let weights = module.weights();
    if !lora.tensors.keys().any(|k| k.contains("temporal")) {
        return Err(LoraError::Model {
            origin: lora_path.display().to_string(),
            message: "no `temporal` keys: not an AnimateDiff motion LoRA".into(),
        });
    }
    let target = |name: &str| motion_target(name, |key| weights.contains(key));
    let merged = if strength == 0.0 {
        lora.claimed(target)
    } else {
        lora.merge(
            strength,
            target,
            |key| {
                earlier
                    .get(key)
                    .cloned()
                    .or_else(|| weights.load(key, DType::F32, &Device::Cpu).ok())
            },
            false,
        )?
    };
    let not_applied = lora.not_applied(&[&merged]);
    Ok((merged, not_applied))
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use candle_nn::VarBuilder;

    use super::*;
    use crate::models::checkpoint::open_motion_module;
    use crate::models::motion::{MotionAdapter, MotionAdapterConfig};
    use crate::models::patcher::UNetInputs;
    use crate::models::random::random_weights_for;
    use crate::models::unet::UNet2DConditionConfig;

    const RANK: usize = 4;

    /// SD 1.x's UNet layout at 32/64 channels, two levels.
    fn tiny_unet() -> UNet2DConditionModel {
        let config: UNet2DConditionConfig = serde_json::from_value(serde_json::json!({
            "in_channels": 4, "out_channels": 4, "sample_size": 8,
            "block_out_channels": [32, 64],
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 8
        }))
        .unwrap();
        let weights =
            random_weights_for(|vb| UNet2DConditionModel::new(vb, &config).map(|_| ())).unwrap();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        UNet2DConditionModel::new(vb, &config).unwrap()
    }

    /// A two-layer CLIP text encoder, its weights under `text_model.` keys as checkpoints have.
    fn tiny_text_encoder() -> TextEncoderWeights {
        let config = ClipTextConfig {
            vocab_size: 100,
            hidden_size: 32,
            intermediate_size: 64,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            projection_dim: 32,
            eos_token_id: 99,
            ..ClipTextConfig::sd15()
        };
        let weights =
            random_weights_for(|vb| ClipTextTransformer::new(vb, &config).map(|_| ())).unwrap();
        let base = weights
            .into_iter()
            .map(|(key, tensor)| (format!("text_model.{key}"), tensor))
            .collect();
        TextEncoderWeights::new(config, base)
    }

    /// One module of a test LoRA: its name, the suffixes of its up and down keys, the weight
    /// it must change and its alpha.
    struct Case {
        module: &'static str,
        up: &'static str,
        down: &'static str,
        target: &'static str,
        alpha: Option<f32>,
    }

    const KOHYA: (&str, &str) = (".lora_up.weight", ".lora_down.weight");
    const PEFT: (&str, &str) = (".lora_B.weight", ".lora_A.weight");
    const PROCESSOR: (&str, &str) = ("_lora.up.weight", "_lora.down.weight");
    const TRANSFORMERS: (&str, &str) = (
        ".lora_linear_layer.up.weight",
        ".lora_linear_layer.down.weight",
    );

    fn case(
        module: &'static str,
        (up, down): (&'static str, &'static str),
        target: &'static str,
        alpha: Option<f32>,
    ) -> Case {
        Case {
            module,
            up,
            down,
            target,
            alpha,
        }
    }

    /// Every key style ComfyUI reads for SD 1.x, each with the weight it changes.
    fn cases() -> Vec<Case> {
        vec![
            // kohya, diffusers names: attention, LoCon 3×3 and 1×1.
            case(
                "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_q",
                KOHYA,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q.weight",
                Some(2.0),
            ),
            case(
                "lora_unet_down_blocks_0_resnets_0_conv1",
                KOHYA,
                "down_blocks.0.resnets.0.conv1.weight",
                Some(1.0),
            ),
            case(
                "lora_unet_down_blocks_0_attentions_0_proj_in",
                KOHYA,
                "down_blocks.0.attentions.0.proj_in.weight",
                None,
            ),
            // kohya, LDM names.
            case(
                "lora_unet_input_blocks_1_1_transformer_blocks_0_attn2_to_k",
                KOHYA,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k.weight",
                Some(8.0),
            ),
            case(
                "lora_unet_input_blocks_2_0_in_layers_2",
                KOHYA,
                "down_blocks.0.resnets.1.conv1.weight",
                Some(2.0),
            ),
            case(
                "lora_unet_output_blocks_5_1_transformer_blocks_0_attn1_to_out_0",
                KOHYA,
                "up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_out.0.weight",
                None,
            ),
            case(
                "lora_unet_middle_block_1_transformer_blocks_0_ff_net_0_proj",
                KOHYA,
                "mid_block.attentions.0.transformer_blocks.0.ff.net.0.proj.weight",
                Some(3.0),
            ),
            case(
                "lora_unet_output_blocks_2_1_conv",
                KOHYA,
                "up_blocks.0.upsamplers.0.conv.weight",
                None,
            ),
            // kohya text encoder.
            case(
                "lora_te_text_model_encoder_layers_0_self_attn_q_proj",
                KOHYA,
                "text_model.encoder.layers.0.self_attn.q_proj.weight",
                Some(8.0),
            ),
            // PEFT.
            case(
                "unet.down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v",
                PEFT,
                "down_blocks.0.attentions.1.transformer_blocks.0.attn1.to_v.weight",
                None,
            ),
            case(
                "text_encoder.text_model.encoder.layers.1.mlp.fc2",
                PEFT,
                "text_model.encoder.layers.1.mlp.fc2.weight",
                None,
            ),
            // diffusers attention processors and transformers' text-encoder LoRA layers.
            case(
                "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.processor.to_out",
                PROCESSOR,
                "down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_out.0.weight",
                None,
            ),
            case(
                "text_encoder.text_model.encoder.layers.0.self_attn.k_proj",
                TRANSFORMERS,
                "text_model.encoder.layers.0.self_attn.k_proj.weight",
                Some(1.0),
            ),
        ]
    }

    /// up (out, r[, 1, 1]) and down (r, in[, kh, kw]) for a weight of `shape`.
    fn low_rank(shape: &[usize]) -> (Tensor, Tensor) {
        let mut down_shape = vec![RANK];
        down_shape.extend_from_slice(&shape[1..]);
        let mut up_shape = vec![shape[0], RANK];
        up_shape.extend(std::iter::repeat_n(1, shape.len() - 2));
        let up = Tensor::randn(0f32, 0.3, up_shape, &Device::Cpu).unwrap();
        let down = Tensor::randn(0f32, 0.3, down_shape, &Device::Cpu).unwrap();
        (up, down)
    }

    /// `W + strength · (alpha / rank) · up · down`, by explicit sums in f64.
    fn expected(weight: &Tensor, up: &Tensor, down: &Tensor, scale: f64) -> Vec<f64> {
        let out = up.dim(0).unwrap();
        let rank = down.dim(0).unwrap();
        let up: Vec<f32> = up.flatten_all().unwrap().to_vec1().unwrap();
        let down: Vec<f32> = down.flatten_all().unwrap().to_vec1().unwrap();
        let weight: Vec<f32> = weight.flatten_all().unwrap().to_vec1().unwrap();
        let columns = down.len() / rank;
        let mut merged = Vec::with_capacity(weight.len());
        for o in 0..out {
            for j in 0..columns {
                let product: f64 = (0..rank)
                    .map(|k| f64::from(up[o * rank + k]) * f64::from(down[k * columns + j]))
                    .sum();
                merged.push(f64::from(weight[o * columns + j]) + scale * product);
            }
        }
        merged
    }

    /// The largest |a − b| over the largest |b|.
    fn relative_error(merged: &Tensor, reference: &[f64]) -> f64 {
        let merged: Vec<f32> = merged.flatten_all().unwrap().to_vec1().unwrap();
        assert_eq!(merged.len(), reference.len());
        let scale = reference.iter().fold(0f64, |m, v| m.max(v.abs()));
        let diff = merged
            .iter()
            .zip(reference)
            .fold(0f64, |m, (a, b)| m.max((f64::from(*a) - b).abs()));
        diff / scale
    }

    fn write_lora(dir: &Path, name: &str, tensors: &HashMap<String, Tensor>) -> PathBuf {
        let path = dir.join(name);
        candle_core::safetensors::save(tensors, &path).unwrap();
        path
    }

    #[test]
    fn every_key_style_merges_as_w_plus_scaled_up_down() {
        let unet = PatchedUNet::new(Arc::new(tiny_unet()));
        let text = tiny_text_encoder();
        let base_weight = |target: &str| {
            unet.base()
                .weights()
                .get(target)
                .or_else(|| text.base.get(target))
                .unwrap_or_else(|| panic!("no weight {target}"))
                .clone()
        };
        let mut tensors = HashMap::new();
        let mut factors = BTreeMap::new();
        for case in cases() {
            let (up, down) = low_rank(base_weight(case.target).dims());
            tensors.insert(format!("{}{}", case.module, case.up), up.clone());
            tensors.insert(format!("{}{}", case.module, case.down), down.clone());
            if let Some(alpha) = case.alpha {
                tensors.insert(
                    format!("{}.alpha", case.module),
                    Tensor::new(alpha, &Device::Cpu).unwrap(),
                );
            }
            factors.insert(case.target, (up, down, case.alpha));
        }
        // A full difference on a bias-carrying LDM-dotted key.
        let diff_target = "down_blocks.0.attentions.0.proj_out.weight";
        let diff = Tensor::randn(0f32, 0.1, base_weight(diff_target).dims(), &Device::Cpu).unwrap();
        tensors.insert(
            "diffusion_model.input_blocks.1.1.proj_out.diff".into(),
            diff.clone(),
        );

        let dir = tempfile::tempdir().unwrap();
        let lora = LoraFile::open(&write_lora(dir.path(), "styles.safetensors", &tensors)).unwrap();
        let strength = -0.7;
        let on_unet = merge_into_unet(&lora, &unet, strength).unwrap();
        let on_text = merge_into_text_encoder(&lora, &text, strength).unwrap();
        assert_eq!(
            lora.not_applied(&[&on_unet, &on_text]),
            Vec::<String>::new(),
            "every key of the file is applied"
        );
        assert_eq!(
            on_unet.weights.len() + on_text.weights.len(),
            factors.len() + 1
        );

        for (target, (up, down, alpha)) in &factors {
            let merged = on_unet
                .weights
                .get(*target)
                .or_else(|| on_text.weights.get(*target))
                .unwrap_or_else(|| panic!("{target} was not merged"));
            let scale = strength * alpha.map_or(1.0, |a| f64::from(a) / RANK as f64);
            let reference = expected(&base_weight(target), up, down, scale);
            let error = relative_error(merged, &reference);
            assert!(error < 1e-6, "{target}: relative error {error}");
        }
        let diff_reference: Vec<f64> = {
            let base: Vec<f32> = base_weight(diff_target)
                .flatten_all()
                .unwrap()
                .to_vec1()
                .unwrap();
            let diff: Vec<f32> = diff.flatten_all().unwrap().to_vec1().unwrap();
            base.iter()
                .zip(&diff)
                .map(|(w, d)| f64::from(*w) + strength * f64::from(*d))
                .collect()
        };
        assert!(relative_error(&on_unet.weights[diff_target], &diff_reference) < 1e-6);

        // The merged weights patch the UNet and rebuild the text encoder.
        let patched = unet.with_weights(on_unet.weights.clone()).unwrap();
        let rebuilt = text.with_replaced(on_text.weights.clone());
        rebuilt.build().unwrap();

        // A second LoRA merges into the weights the first left.
        let again = merge_into_unet(&lora, &patched, strength).unwrap();
        let (up, down, alpha) = &factors[cases()[0].target];
        let target = cases()[0].target;
        let scale = strength * alpha.map_or(1.0, |a| f64::from(a) / RANK as f64);
        let once = expected(&base_weight(target), up, down, scale);
        let once = Tensor::new(
            once.iter().map(|v| *v as f32).collect::<Vec<_>>(),
            &Device::Cpu,
        )
        .unwrap()
        .reshape(base_weight(target).shape())
        .unwrap();
        let twice = expected(&once, up, down, scale);
        assert!(relative_error(&again.weights[target], &twice) < 1e-6);
    }

    #[test]
    fn unknown_and_unsupported_keys_are_reported_and_strength_zero_merges_nothing() {
        let unet = PatchedUNet::new(Arc::new(tiny_unet()));
        let text = tiny_text_encoder();
        let target = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_k";
        let (up, down) = low_rank(unet.base().weights()[&format!("{target}.weight")].dims());
        let known = "lora_unet_down_blocks_0_attentions_0_transformer_blocks_0_attn1_to_k";
        let tucker = "lora_unet_down_blocks_0_resnets_0_conv2";
        let tensors: HashMap<String, Tensor> = [
            (format!("{known}.lora_up.weight"), up.clone()),
            (format!("{known}.lora_down.weight"), down.clone()),
            ("lora_unet_no_such_layer.lora_up.weight".into(), up.clone()),
            (
                "lora_unet_no_such_layer.lora_down.weight".into(),
                down.clone(),
            ),
            (format!("{tucker}.lora_up.weight"), up.clone()),
            (format!("{tucker}.lora_down.weight"), down.clone()),
            (format!("{tucker}.lora_mid.weight"), down.clone()),
            (
                "lora_te_text_model_embeddings_token_embedding.lora_up.weight".into(),
                up,
            ),
            ("some_unrelated_tensor".into(), down),
        ]
        .into_iter()
        .collect();
        let dir = tempfile::tempdir().unwrap();
        let lora = LoraFile::open(&write_lora(dir.path(), "mixed.safetensors", &tensors)).unwrap();

        let on_unet = merge_into_unet(&lora, &unet, 1.0).unwrap();
        let on_text = merge_into_text_encoder(&lora, &text, 1.0).unwrap();
        assert_eq!(
            on_unet.weights.keys().collect::<Vec<_>>(),
            [&format!("{target}.weight")]
        );
        let not_applied = lora.not_applied(&[&on_unet, &on_text]);
        assert_eq!(not_applied.len(), 7, "{not_applied:?}");
        assert!(not_applied.iter().all(|k| !k.starts_with(known)));

        // Strength 0 changes no weight but still takes the keys it maps.
        let at_zero = merge_into_unet(&lora, &unet, 0.0).unwrap();
        assert!(at_zero.weights.is_empty());
        assert_eq!(lora.not_applied(&[&at_zero, &on_text]), not_applied);
    }

    #[test]
    fn kohya_ldm_names_get_their_dots_back() {
        assert_eq!(
            ldm_path("input_blocks_4_1_transformer_blocks_0_attn1_to_out_0"),
            "input_blocks.4.1.transformer_blocks.0.attn1.to_out.0"
        );
        assert_eq!(
            ldm_path("middle_block_0_emb_layers_1"),
            "middle_block.0.emb_layers.1"
        );
        assert_eq!(
            ldm_path("output_blocks_3_0_skip_connection"),
            "output_blocks.3.0.skip_connection"
        );
        assert_eq!(ldm_path("time_embed_2"), "time_embed.2");
        assert_eq!(ldm_path("out_2"), "out.2");
    }

    /// Every `.weight` of SD 1.5's UNet as a kohya LDM-named module, mapped as ComfyUI's
    /// `unet_to_diffusers` maps it (`tests/fixtures/lora/ldm_names.json`, made by
    /// `make_ldm_names.py` from ComfyUI's source).
    #[test]
    fn kohya_ldm_names_map_as_comfyui_maps_them_for_sd15() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora/ldm_names.json");
        let fixture: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        let names = fixture["names"].as_object().unwrap();
        assert!(names.len() > 300, "{} names", names.len());
        let mut wrong = Vec::new();
        for (module, expected) in names {
            let name = module.strip_prefix("lora_unet_").unwrap();
            let mapped = ldm_unet_key_to_diffusers(&format!("{}.weight", ldm_path(name)), 2);
            if mapped.as_deref() != expected.as_str() {
                wrong.push(format!("{module}: {mapped:?}, ComfyUI {expected}"));
            }
        }
        assert!(
            wrong.is_empty(),
            "{} of {}: {wrong:#?}",
            wrong.len(),
            names.len()
        );
    }

    /// A motion module of two levels without a mid block, saved under `MotionAdapter` keys.
    fn tiny_motion_module(dir: &Path) -> MotionModuleFile {
        let config: MotionAdapterConfig = serde_json::from_value(serde_json::json!({
            "block_out_channels": [32, 64],
            "motion_layers_per_block": 1,
            "motion_max_seq_length": 8,
            "use_motion_mid_block": false
        }))
        .unwrap();
        let weights =
            random_weights_for(|vb| MotionAdapter::new(vb, &config, 8).map(|_| ())).unwrap();
        let path = dir.join("motion.safetensors");
        candle_core::safetensors::save(&weights, &path).unwrap();
        open_motion_module(&path).unwrap()
    }

    /// `tests/fixtures/lora/motion_lora.ckpt`: a motion LoRA pickled by torch in fp16, as the
    /// released ones are; `make.py` stores its factors in `reference.safetensors` as well.
    #[test]
    fn a_pickled_fp16_motion_lora_merges_like_its_factors() {
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/lora");
        let factors =
            candle_core::safetensors::load(fixtures.join("reference.safetensors"), &Device::Cpu)
                .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let module = tiny_motion_module(dir.path());
        let strength = 0.9;
        let (merged, not_applied) = motion_lora_overrides(
            &module,
            &fixtures.join("motion_lora.ckpt"),
            strength,
            &NamedWeights::new(),
        )
        .unwrap();
        assert!(not_applied.is_empty(), "{not_applied:?}");
        let targets = [
            (
                "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q",
                "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_out",
                "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_out.0.weight",
            ),
        ];
        assert_eq!(merged.weights.len(), targets.len());
        for (lora_module, target) in targets {
            let factor = |part: &str| {
                factors[&format!("motion.{lora_module}_lora.{part}.weight")]
                    .to_dtype(DType::F32)
                    .unwrap()
            };
            let base = module.weights().get(target).unwrap();
            let reference = expected(&base, &factor("up"), &factor("down"), strength);
            let error = relative_error(&merged.weights[target], &reference);
            assert!(error < 1e-6, "{target}: relative error {error}");
        }
    }

    #[test]
    fn motion_lora_merges_into_the_motion_module_weights() {
        let dir = tempfile::tempdir().unwrap();
        let module = tiny_motion_module(dir.path());
        let cases = [
            (
                "down_blocks.0.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_q",
                "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_q.weight",
            ),
            (
                "up_blocks.1.motion_modules.1.temporal_transformer.transformer_blocks.0.attention_blocks.1.processor.to_out",
                "up_blocks.1.motion_modules.1.transformer_blocks.0.attn2.to_out.0.weight",
            ),
        ];
        let mut tensors = HashMap::new();
        let mut factors = Vec::new();
        for (lora_module, target) in cases {
            let base = module.weights().get(target).unwrap();
            let (up, down) = low_rank(base.dims());
            tensors.insert(format!("{lora_module}_lora.up.weight"), up.clone());
            tensors.insert(format!("{lora_module}_lora.down.weight"), down.clone());
            factors.push((target, base, up, down));
        }
        // A v2 motion LoRA's mid-block module, which this module has no place for.
        let mid = "mid_block.motion_modules.0.temporal_transformer.transformer_blocks.0.attention_blocks.0.processor.to_v";
        let (up, down) = low_rank(&[32, 32]);
        tensors.insert(format!("{mid}_lora.up.weight"), up);
        tensors.insert(format!("{mid}_lora.down.weight"), down);
        let lora_path = write_lora(dir.path(), "v2_lora_Tiny.safetensors", &tensors);

        let strength = 0.6;
        let (merged, not_applied) =
            motion_lora_overrides(&module, &lora_path, strength, &NamedWeights::new()).unwrap();
        assert_eq!(
            not_applied,
            [
                format!("{mid}_lora.down.weight"),
                format!("{mid}_lora.up.weight")
            ]
        );
        for (target, base, up, down) in &factors {
            let reference = expected(base, up, down, strength);
            let error = relative_error(&merged.weights[*target], &reference);
            assert!(error < 1e-6, "{target}: relative error {error}");
        }

        // The overrides patch the motion modules applied to a UNet.
        let adapter = module.build(8, DType::F32, &Device::Cpu).unwrap();
        let unet = PatchedUNet::new(Arc::new(tiny_unet()))
            .with_motion(adapter, 1.0)
            .unwrap();
        let patched = unet.with_weights(merged.weights.clone()).unwrap();
        let (zero, _) =
            motion_lora_overrides(&module, &lora_path, 0.0, &NamedWeights::new()).unwrap();
        assert!(zero.weights.is_empty());
        let unchanged = unet.with_weights(zero.weights).unwrap();

        let sample = Tensor::randn(0f32, 1.0, (1, 4, 3, 8, 8), &Device::Cpu).unwrap();
        let text = Tensor::randn(0f32, 1.0, (1, 5, 32), &Device::Cpu).unwrap();
        let inputs = UNetInputs::new(&sample, 500.0, &text);
        let plain = unet.forward(&inputs).unwrap();
        let at_zero = unchanged.forward(&inputs).unwrap();
        assert_eq!(crate::test_util::max_abs_diff(&plain, &at_zero), 0.0);
        let with_lora = patched.forward(&inputs).unwrap();
        assert!(crate::test_util::max_abs_diff(&plain, &with_lora) > 1e-6);
    }
}
