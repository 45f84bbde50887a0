//! AnimateDiff motion modules: diffusers `MotionAdapter` folders and files, and the original
//! AnimateDiff releases (`mm_sd_v14.ckpt`, `mm_sd_v15.ckpt`, `mm_sd_v15_v2.ckpt`,
//! `v3_sd15_mm.ckpt` and their `.safetensors` copies), renamed to `MotionAdapter` keys.
//!
//! Original → diffusers, per key (diffusers' `convert_animatediff_checkpoint_to_diffusers`):
//! `.temporal_transformer` is dropped, `attention_blocks.{0,1}` → `attn{1,2}`, `norms.{0,1}` →
//! `norm{1,2}`, `ff_norm` → `norm3`. The original keeps one sinusoidal table per attention
//! block (`attention_blocks.N.pos_encoder.pe`); diffusers keeps one per transformer block
//! (`pos_embed.pe`), computed by the same formula, so the first table becomes `pos_embed.pe`
//! and the second, identical one is dropped.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use serde::{Deserialize, Deserializer, Serialize};

use super::diffusers::{open_folder_weights, DiffusersComponent};
use super::error::{LoadError, LoadResult};
use super::formats::open_weights;
use super::ldm::{describe_keys, distinct_indices, split_index};
use super::weights::WeightMap;

/// A diffusers `MotionAdapter` config (`config.json`), with diffusers' defaults.
///
/// Per-block values that diffusers also accepts as lists are read as one number and must then
/// be the same for every block.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MotionAdapterConfig {
    #[serde(default = "default_block_out_channels")]
    pub block_out_channels: Vec<usize>,
    #[serde(default = "default_two", deserialize_with = "uniform")]
    pub motion_layers_per_block: usize,
    #[serde(default = "default_one", deserialize_with = "uniform")]
    pub motion_transformer_layers_per_block: usize,
    #[serde(default = "default_one")]
    pub motion_mid_block_layers_per_block: usize,
    #[serde(default = "default_one", deserialize_with = "uniform")]
    pub motion_transformer_layers_per_mid_block: usize,
    #[serde(default = "default_heads", deserialize_with = "uniform")]
    pub motion_num_attention_heads: usize,
    #[serde(default = "default_thirty_two")]
    pub motion_norm_num_groups: usize,
    #[serde(default = "default_thirty_two")]
    pub motion_max_seq_length: usize,
    #[serde(default = "default_true")]
    pub use_motion_mid_block: bool,
    #[serde(default)]
    pub conv_in_channels: Option<usize>,
}

fn default_block_out_channels() -> Vec<usize> {
    vec![320, 640, 1280, 1280]
}
fn default_one() -> usize {
    1
}
fn default_two() -> usize {
    2
}
fn default_heads() -> usize {
    DEFAULT_MOTION_HEADS
}
fn default_thirty_two() -> usize {
    32
}
fn default_true() -> bool {
    true
}

/// AnimateDiff's motion modules all use 8 heads; the weights cannot tell the count.
pub const DEFAULT_MOTION_HEADS: usize = 8;

impl Default for MotionAdapterConfig {
    fn default() -> Self {
        Self {
            block_out_channels: default_block_out_channels(),
            motion_layers_per_block: 2,
            motion_transformer_layers_per_block: 1,
            motion_mid_block_layers_per_block: 1,
            motion_transformer_layers_per_mid_block: 1,
            motion_num_attention_heads: DEFAULT_MOTION_HEADS,
            motion_norm_num_groups: 32,
            motion_max_seq_length: 32,
            use_motion_mid_block: true,
            conv_in_channels: None,
        }
    }
}

fn uniform<'de, D: Deserializer<'de>>(deserializer: D) -> Result<usize, D::Error> {
    #[derive(Deserialize)]
    #[serde(untagged)]
    enum OneOrPerBlock {
        One(usize),
        PerBlock(Vec<usize>),
    }
    match OneOrPerBlock::deserialize(deserializer)? {
        OneOrPerBlock::One(n) => Ok(n),
        OneOrPerBlock::PerBlock(values) => match values.split_first() {
            Some((&first, rest)) if rest.iter().all(|&v| v == first) => Ok(first),
            _ => Err(serde::de::Error::custom(format!(
                "per-block values {values:?} differ; only uniform values are supported"
            ))),
        },
    }
}

/// Which original AnimateDiff release a motion module is, told apart as the AnimateDiff tools
/// do: v2 alone has a mid-block motion module; without one, a 32-frame positional table is v3
/// and a 24-frame one v1.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AnimateDiffVersion {
    V1,
    V2,
    V3,
    /// Not an SD 1.x module of a known release (other block counts or table lengths).
    Other,
}

impl AnimateDiffVersion {
    pub fn of(config: &MotionAdapterConfig) -> Self {
        if config.block_out_channels.len() != 4 {
            return Self::Other;
        }
        match (config.use_motion_mid_block, config.motion_max_seq_length) {
            (true, _) => Self::V2,
            (false, 32) => Self::V3,
            (false, 24) => Self::V1,
            _ => Self::Other,
        }
    }
}

/// How a motion-module file was laid out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MotionModuleFormat {
    /// diffusers `MotionAdapter` keys (a folder with `config.json`, or a bare file).
    Diffusers,
    /// The original AnimateDiff keys (`…motion_modules.N.temporal_transformer.…`).
    AnimateDiff,
}

/// A motion adapter under diffusers `MotionAdapter` keys, with its config.
#[derive(Debug, Clone)]
pub struct MotionAdapterWeights {
    pub path: PathBuf,
    pub format: MotionModuleFormat,
    /// The release, for original AnimateDiff files.
    pub version: Option<AnimateDiffVersion>,
    /// From `config.json` when the folder has one, otherwise derived from the weights
    /// (channels from shapes, layer counts from keys, the table length from `pos_embed.pe`,
    /// heads [`DEFAULT_MOTION_HEADS`]).
    pub config: MotionAdapterConfig,
    /// Every transformer block carries its `pos_embed.pe` table.
    pub weights: WeightMap,
}

impl MotionAdapterWeights {
    /// Opens a diffusers `MotionAdapter` folder (`config.json` +
    /// `diffusion_pytorch_model[.fp16].safetensors`), a diffusers-format adapter file, or an
    /// original AnimateDiff `.ckpt` / `.safetensors` motion module.
    pub fn open(path: impl AsRef<Path>) -> LoadResult<Self> {
        let path = path.as_ref();
        if path.is_dir() && path.join("config.json").is_file() {
            let component = DiffusersComponent::open(path)?;
            let config: MotionAdapterConfig = component.parse_config()?;
            return Self::from_weights(path, component.weights, Some(config));
        }
        if path.is_dir() {
            let (_, weights) = open_folder_weights(path)?;
            return Self::from_weights(path, weights, None);
        }
        Self::from_weights(path, open_weights(path)?, None)
    }

    /// Recognises the layout of opened weights and renames them; `config` (from a
    /// `config.json`) wins over the derived one.
    pub fn from_weights(
        path: &Path,
        weights: WeightMap,
        config: Option<MotionAdapterConfig>,
    ) -> LoadResult<Self> {
        let (format, weights) = if weights.keys().any(|k| k.contains(".temporal_transformer.")) {
            (
                MotionModuleFormat::AnimateDiff,
                convert_animatediff_motion_module(weights)?,
            )
        } else if weights.keys().any(is_diffusers_motion_key) {
            (MotionModuleFormat::Diffusers, weights)
        } else {
            return Err(LoadError::UnrecognisedFormat {
                path: path.to_path_buf(),
                expected: "an AnimateDiff motion module: `down_blocks.N.motion_modules.M.…` keys, \
                           with or without `.temporal_transformer.`"
                    .into(),
                found: describe_keys(&weights),
            });
        };
        let derived = derive_motion_adapter_config(path, &weights)?;
        let version =
            (format == MotionModuleFormat::AnimateDiff).then(|| AnimateDiffVersion::of(&derived));
        let config = config.unwrap_or(derived);
        let weights = with_position_tables(weights, config.motion_max_seq_length)?;
        Ok(Self {
            path: path.to_path_buf(),
            format,
            version,
            config,
            weights,
        })
    }
}

fn is_diffusers_motion_key(key: &str) -> bool {
    (key.starts_with("down_blocks.")
        || key.starts_with("mid_block.")
        || key.starts_with("up_blocks."))
        && key.contains(".motion_modules.")
}

/// Renames an original AnimateDiff motion module to diffusers `MotionAdapter` keys.
pub fn convert_animatediff_motion_module(weights: WeightMap) -> LoadResult<WeightMap> {
    weights.rename(animatediff_key_to_diffusers)
}

/// The diffusers name of one original AnimateDiff key; `None` for the second positional table
/// of a transformer block, which duplicates the first.
pub fn animatediff_key_to_diffusers(key: &str) -> Option<String> {
    let Some((module, inner)) = key.split_once(".temporal_transformer.") else {
        return Some(key.to_string());
    };
    let Some(rest) = inner.strip_prefix("transformer_blocks.") else {
        return Some(format!("{module}.{inner}"));
    };
    let Some((block, rest)) = split_index(rest) else {
        return Some(format!("{module}.{inner}"));
    };
    let renamed = if let Some(rest) = rest.strip_prefix("attention_blocks.") {
        let (attention, leaf) = split_index(rest)?;
        if leaf == "pos_encoder.pe" {
            if attention != 0 {
                return None;
            }
            "pos_embed.pe".to_string()
        } else {
            format!("attn{}.{leaf}", attention + 1)
        }
    } else if let Some(rest) = rest.strip_prefix("norms.") {
        let (norm, leaf) = split_index(rest)?;
        format!("norm{}.{leaf}", norm + 1)
    } else if let Some(leaf) = rest.strip_prefix("ff_norm.") {
        format!("norm3.{leaf}")
    } else {
        rest.to_string()
    };
    Some(format!("{module}.transformer_blocks.{block}.{renamed}"))
}

/// Reads a `MotionAdapter` config off diffusers-named weights: channels from the GroupNorm
/// shapes, layer counts from the module and transformer-block indices, the positional table
/// length from `pos_embed.pe` (32 when no table is stored); heads and norm groups cannot be
/// read off weights and keep diffusers' defaults.
pub fn derive_motion_adapter_config(
    path: &Path,
    weights: &WeightMap,
) -> LoadResult<MotionAdapterConfig> {
    let unrecognised = |found: String| LoadError::UnrecognisedFormat {
        path: path.to_path_buf(),
        expected: "motion modules with the same layer counts in every down block".into(),
        found,
    };
    let levels = distinct_indices(weights, "down_blocks.");
    if levels.is_empty() || levels.iter().copied().ne(0..levels.len()) {
        return Err(unrecognised(format!("down blocks {levels:?}")));
    }
    let mut block_out_channels = Vec::with_capacity(levels.len());
    let mut layer_counts = BTreeSet::new();
    let mut transformer_counts = BTreeSet::new();
    for level in &levels {
        let block = weights.strip_prefix(&format!("down_blocks.{level}.motion_modules."));
        let modules = distinct_indices(&block, "");
        layer_counts.insert(modules.len());
        let module = block.strip_prefix("0.");
        transformer_counts.insert(distinct_indices(&module, "transformer_blocks.").len());
        let channels = module
            .shape("norm.weight")
            .or_else(|| module.shape("proj_in.bias"));
        match channels {
            Some(&[channels]) => block_out_channels.push(channels),
            _ => {
                return Err(unrecognised(format!(
                    "no `down_blocks.{level}.motion_modules.0.norm.weight` vector"
                )))
            }
        }
    }
    let single = |counts: &BTreeSet<usize>, what: &str| match counts.iter().collect::<Vec<_>>()[..]
    {
        [&n] => Ok(n),
        _ => Err(unrecognised(format!(
            "{what} counts {counts:?} across down blocks"
        ))),
    };
    let motion_layers_per_block = single(&layer_counts, "motion module")?;
    let motion_transformer_layers_per_block = single(&transformer_counts, "transformer block")?;

    let mid = weights.strip_prefix("mid_block.motion_modules.");
    let mid_modules = distinct_indices(&mid, "");
    let use_motion_mid_block = !mid_modules.is_empty();
    let mid_transformers = distinct_indices(&mid.strip_prefix("0."), "transformer_blocks.").len();

    let motion_max_seq_length = weights
        .keys()
        .filter(|k| k.ends_with(".pos_embed.pe"))
        .find_map(|k| weights.shape(k).and_then(|s| s.get(1).copied()))
        .unwrap_or(32);

    Ok(MotionAdapterConfig {
        block_out_channels,
        motion_layers_per_block,
        motion_transformer_layers_per_block,
        motion_mid_block_layers_per_block: mid_modules.len().max(1),
        motion_transformer_layers_per_mid_block: mid_transformers.max(1),
        motion_max_seq_length,
        use_motion_mid_block,
        ..MotionAdapterConfig::default()
    })
}

/// Adds the sinusoidal `pos_embed.pe` table to every transformer block that lacks one (pruned
/// files drop these buffers), so that the motion modules always find it among their weights.
fn with_position_tables(mut weights: WeightMap, max_seq_length: usize) -> LoadResult<WeightMap> {
    let blocks: BTreeSet<String> = weights
        .keys()
        .filter(|k| k.contains(".motion_modules.") && k.ends_with(".norm1.weight"))
        .filter_map(|k| k.strip_suffix("norm1.weight").map(str::to_string))
        .collect();
    for block in blocks {
        let key = format!("{block}pos_embed.pe");
        if weights.contains(&key) {
            continue;
        }
        let Some(&[channels]) = weights.shape(&format!("{block}norm1.weight")) else {
            continue;
        };
        let table =
            sinusoidal_table(max_seq_length, channels).map_err(|source| LoadError::Tensor {
                origin: weights.origin().to_string(),
                key: key.clone(),
                source: Box::new(source),
            })?;
        weights.insert(key, table);
    }
    Ok(weights)
}

/// The (1, length, channels) table `pe[p, 2i] = sin(p·w_i)`, `pe[p, 2i+1] = cos(p·w_i)`,
/// `w_i = 10000^(-2i/channels)`, as diffusers' `SinusoidalPositionalEmbedding` builds it.
pub fn sinusoidal_table(length: usize, channels: usize) -> candle_core::Result<Tensor> {
    let mut values = vec![0f32; length * channels];
    for position in 0..length {
        for i in (0..channels).step_by(2) {
            let frequency = (-(10000f64.ln()) * i as f64 / channels as f64).exp();
            let angle = position as f64 * frequency;
            values[position * channels + i] = angle.sin() as f32;
            if i + 1 < channels {
                values[position * channels + i + 1] = angle.cos() as f32;
            }
        }
    }
    Tensor::from_vec(values, (1, length, channels), &Device::Cpu)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn original_motion_keys() {
        let tt = "up_blocks.3.motion_modules.2.temporal_transformer";
        let d = "up_blocks.3.motion_modules.2";
        let cases = [
            (
                format!("{tt}.norm.weight"),
                Some(format!("{d}.norm.weight")),
            ),
            (
                format!("{tt}.proj_out.bias"),
                Some(format!("{d}.proj_out.bias")),
            ),
            (
                format!("{tt}.transformer_blocks.0.attention_blocks.1.to_out.0.weight"),
                Some(format!("{d}.transformer_blocks.0.attn2.to_out.0.weight")),
            ),
            (
                format!("{tt}.transformer_blocks.0.attention_blocks.0.pos_encoder.pe"),
                Some(format!("{d}.transformer_blocks.0.pos_embed.pe")),
            ),
            (
                format!("{tt}.transformer_blocks.0.attention_blocks.1.pos_encoder.pe"),
                None,
            ),
            (
                format!("{tt}.transformer_blocks.0.norms.1.bias"),
                Some(format!("{d}.transformer_blocks.0.norm2.bias")),
            ),
            (
                format!("{tt}.transformer_blocks.0.ff_norm.weight"),
                Some(format!("{d}.transformer_blocks.0.norm3.weight")),
            ),
            (
                format!("{tt}.transformer_blocks.0.ff.net.0.proj.weight"),
                Some(format!("{d}.transformer_blocks.0.ff.net.0.proj.weight")),
            ),
        ];
        for (original, diffusers) in cases {
            assert_eq!(
                animatediff_key_to_diffusers(&original),
                diffusers,
                "{original}"
            );
        }
    }

    #[test]
    fn config_reads_per_block_lists() {
        let config: MotionAdapterConfig = serde_json::from_str(
            r#"{"block_out_channels": [320, 640], "motion_layers_per_block": [2, 2],
                "motion_num_attention_heads": 8}"#,
        )
        .unwrap();
        assert_eq!(config.motion_layers_per_block, 2);
        assert_eq!(config.motion_max_seq_length, 32);
        assert!(serde_json::from_str::<MotionAdapterConfig>(
            r#"{"motion_layers_per_block": [1, 2]}"#
        )
        .is_err());
    }
}
