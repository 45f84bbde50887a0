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

use candle_core::Device;

use super::diffusers::{open_folder_weights, DiffusersComponent};
use super::error::{LoadError, LoadResult};
use super::formats::open_weights;
use super::ldm::{describe_keys, distinct_indices, split_index};
use super::weights::WeightMap;
use crate::models::motion::config::per_block;
use crate::models::motion::positions::sinusoidal_positions;
use crate::models::motion::{Depth, MotionAdapterConfig, MotionBlockLayout};

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
    /// heads [`DEFAULT_MOTION_HEADS`](crate::models::motion::DEFAULT_MOTION_HEADS)).
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

/// The motion modules of one block as the weights lay them out: the transformer blocks of
/// each module (`<prefix>M.transformer_blocks.T.…`), and the channels of the first module.
struct BlockInWeights {
    depths: Vec<usize>,
    channels: Option<usize>,
}

fn block_in_weights(weights: &WeightMap, prefix: &str) -> BlockInWeights {
    let block = weights.strip_prefix(prefix);
    let depths = distinct_indices(&block, "")
        .into_iter()
        .map(|m| {
            distinct_indices(&block.strip_prefix(&format!("{m}.")), "transformer_blocks.").len()
        })
        .collect();
    let first = block.strip_prefix("0.");
    let channels = match first
        .shape("norm.weight")
        .or_else(|| first.shape("proj_in.bias"))
    {
        Some(&[channels]) => Some(channels),
        _ => None,
    };
    BlockInWeights { depths, channels }
}

/// Reads a `MotionAdapter` config off diffusers-named weights: channels from the GroupNorm
/// shapes, module and transformer-block counts per block from the indices (uniform values as
/// one number, differing ones as per-block lists, as diffusers writes them), the positional
/// table length from `pos_embed.pe` (32 when no table is stored); heads and norm groups cannot
/// be read off weights and keep diffusers' defaults. The up blocks must mirror the down blocks
/// as diffusers' `MotionAdapter` builds them.
pub fn derive_motion_adapter_config(
    path: &Path,
    weights: &WeightMap,
) -> LoadResult<MotionAdapterConfig> {
    let unrecognised = |found: String| LoadError::UnrecognisedFormat {
        path: path.to_path_buf(),
        expected: "motion modules laid out as diffusers' MotionAdapter: down blocks 0, 1, … \
                   with modules 0, 1, …, each up block one module more than its down block"
            .into(),
        found,
    };
    let levels = distinct_indices(weights, "down_blocks.");
    if levels.is_empty() || levels.iter().copied().ne(0..levels.len()) {
        return Err(unrecognised(format!("down blocks {levels:?}")));
    }
    let mut block_out_channels = Vec::with_capacity(levels.len());
    let mut layer_counts = Vec::with_capacity(levels.len());
    let mut depths = Vec::with_capacity(levels.len());
    for level in &levels {
        let prefix = format!("down_blocks.{level}.motion_modules.");
        let block = block_in_weights(weights, &prefix);
        let Some(channels) = block.channels else {
            return Err(unrecognised(format!("no `{prefix}0.norm.weight` vector")));
        };
        block_out_channels.push(channels);
        layer_counts.push(block.depths.len());
        depths.push(Depth::from_depths(block.depths));
    }

    let mid = block_in_weights(weights, "mid_block.motion_modules.");
    let use_motion_mid_block = !mid.depths.is_empty();

    let motion_max_seq_length = weights
        .keys()
        .filter(|k| k.ends_with(".pos_embed.pe"))
        .find_map(|k| weights.shape(k).and_then(|s| s.get(1).copied()))
        .unwrap_or(32);

    let config = MotionAdapterConfig {
        block_out_channels,
        motion_layers_per_block: per_block(layer_counts),
        motion_transformer_layers_per_block: per_block(depths),
        motion_mid_block_layers_per_block: mid.depths.len().max(1),
        motion_transformer_layers_per_mid_block: if use_motion_mid_block {
            Depth::from_depths(mid.depths)
        } else {
            Depth::All(1)
        },
        motion_max_seq_length,
        use_motion_mid_block,
        ..MotionAdapterConfig::default()
    };
    let layout = config.layout().map_err(|e| unrecognised(e.to_string()))?;
    for (i, expected) in layout.up_blocks.iter().enumerate() {
        let found = block_in_weights(weights, &format!("up_blocks.{i}.motion_modules."));
        if found.depths != expected.depths || found.channels != Some(expected.channels) {
            return Err(unrecognised(format!(
                "up block {i}: transformer blocks per module {:?}, channels {:?}; the down \
                 blocks imply {}",
                found.depths,
                found.channels,
                describe_block(expected)
            )));
        }
    }
    Ok(config)
}

fn describe_block(block: &MotionBlockLayout) -> String {
    format!(
        "transformer blocks per module {:?}, channels {}",
        block.depths, block.channels
    )
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
        let table = sinusoidal_positions(max_seq_length, channels, &Device::Cpu)
            .and_then(|table| table.unsqueeze(0))
            .map_err(|source| LoadError::Tensor {
                origin: weights.origin().to_string(),
                key: key.clone(),
                source: Box::new(source),
            })?;
        weights.insert(key, table);
    }
    Ok(weights)
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
}
