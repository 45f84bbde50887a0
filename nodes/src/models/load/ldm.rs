//! Single-file Stable Diffusion 1.x checkpoints (the CompVis/LDM layout ComfyUI users keep as
//! `.safetensors` or `.ckpt`) and standalone LDM VAE files, renamed to diffusers keys.
//!
//! The renaming follows diffusers' `convert_ldm_unet_checkpoint`, `convert_ldm_vae_checkpoint`
//! and `convert_ldm_clip_checkpoint` (`loaders/single_file_utils.py`), key by key, with the
//! block arithmetic taken from the model configs so that any block count and any
//! `layers_per_block` map correctly:
//!
//! - UNet `input_blocks.0.0` → `conv_in`; `input_blocks.i` (i ≥ 1) belongs to down block
//!   `(i-1) / (layers_per_block+1)`, layer `(i-1) % (layers_per_block+1)`: `.0` is a resnet
//!   (or the downsampler `.0.op` for the last layer), `.1` a spatial transformer;
//!   `middle_block.{0,1,2}` → `mid_block.{resnets.0, attentions.0, resnets.1}`; `output_blocks.i`
//!   belongs to up block `i / (layers_per_block+1)`, layer `i % (layers_per_block+1)`, with the
//!   upsampler at `.1.conv` or `.2.conv`; `time_embed.{0,2}` → `time_embedding.linear_{1,2}`,
//!   `out.{0,2}` → `conv_norm_out`, `conv_out`. Resnets: `in_layers.{0,2}` → `norm1`, `conv1`,
//!   `out_layers.{0,3}` → `norm2`, `conv2`, `emb_layers.1` → `time_emb_proj`,
//!   `skip_connection` → `conv_shortcut`. Transformer internals keep their names.
//! - VAE `{encoder,decoder}.norm_out` → `conv_norm_out`; `encoder.down.i.block.j` →
//!   `encoder.down_blocks.i.resnets.j`, `down.i.downsample` → `downsamplers.0`; `decoder.up.b` →
//!   `decoder.up_blocks.(levels-1-b)` (LDM numbers decoder levels from the bottom);
//!   `mid.block_{1,2}` → `mid_block.resnets.{0,1}`; `mid.attn_1.{norm,q,k,v,proj_out}` →
//!   `mid_block.attentions.0.{group_norm,to_q,to_k,to_v,to_out.0}` with the 1×1 convolution
//!   kernels seen as linear weights; `nin_shortcut` → `conv_shortcut`.
//! - CLIP: the `cond_stage_model.transformer.` prefix is removed, leaving transformers' names.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use super::error::{LoadError, LoadResult};
use super::formats::open_weights;
use super::weights::WeightMap;

pub const LDM_UNET_PREFIX: &str = "model.diffusion_model.";
pub const LDM_VAE_PREFIXES: [&str; 2] = ["first_stage_model.", "vae."];
pub const LDM_CLIP_PREFIXES: [&str; 2] = [
    "cond_stage_model.transformer.",
    "conditioner.embedders.0.transformer.",
];

/// The facts about the model configs that the LDM → diffusers renaming depends on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SingleFileLayout {
    /// The UNet's `layers_per_block` (LDM's `num_res_blocks`).
    pub unet_layers_per_block: usize,
    /// The VAE's number of resolution levels: `len(block_out_channels)` of its config.
    pub vae_levels: usize,
}

impl SingleFileLayout {
    /// Stable Diffusion 1.x: 2 resnets per UNet block, a 4-level VAE.
    pub const SD1: Self = Self {
        unet_layers_per_block: 2,
        vae_levels: 4,
    };

    /// Reads the layout off an LDM checkpoint (all three prefixes present or not): the UNet has
    /// one downsampler per level but the last and `levels · (layers_per_block+1)` output blocks;
    /// the VAE has one `encoder.down.i` per level.
    pub fn infer(checkpoint: &WeightMap) -> LoadResult<Self> {
        let unet = checkpoint.strip_prefix(LDM_UNET_PREFIX);
        let vae = ldm_vae_part(checkpoint);
        let unet_layers_per_block = if unet.is_empty() {
            0
        } else {
            infer_unet_layers_per_block(&unet).ok_or_else(|| LoadError::UnrecognisedFormat {
                path: PathBuf::from(checkpoint.origin()),
                expected: "LDM UNet blocks (`input_blocks.i.0.op` downsamplers and \
                           `output_blocks.i`) whose counts fit some layers_per_block"
                    .into(),
                found: format!("{} UNet weights that fit none", unet.len()),
            })?
        };
        Ok(Self {
            unet_layers_per_block,
            vae_levels: infer_vae_levels(&vae),
        })
    }
}

fn infer_unet_layers_per_block(unet: &WeightMap) -> Option<usize> {
    let downsamplers = unet
        .keys()
        .filter(|k| k.starts_with("input_blocks.") && k.ends_with(".0.op.weight"))
        .count();
    let output_blocks = distinct_indices(unet, "output_blocks.").len();
    let levels = downsamplers + 1;
    (output_blocks > 0 && output_blocks.is_multiple_of(levels)).then(|| output_blocks / levels - 1)
}

fn infer_vae_levels(vae: &WeightMap) -> usize {
    distinct_indices(vae, "encoder.down.").len()
}

/// The distinct `N` of the keys `{prefix}N.…`.
pub(crate) fn distinct_indices(weights: &WeightMap, prefix: &str) -> BTreeSet<usize> {
    weights
        .keys()
        .filter_map(|k| split_index(k.strip_prefix(prefix)?).map(|(i, _)| i))
        .collect()
}

/// `"12.rest"` → `(12, "rest")`.
pub(crate) fn split_index(key: &str) -> Option<(usize, &str)> {
    let (index, rest) = key.split_once('.')?;
    Some((index.parse().ok()?, rest))
}

/// The three models of a single-file checkpoint, each under diffusers keys.
#[derive(Debug, Clone)]
pub struct SingleFileCheckpoint {
    pub path: PathBuf,
    pub layout: SingleFileLayout,
    /// `UNet2DConditionModel` weights.
    pub unet: WeightMap,
    /// `AutoencoderKL` weights; empty when the file carries no VAE.
    pub vae: WeightMap,
    /// `CLIPTextModel` weights (`text_model.…`); empty when the file carries no text encoder.
    pub text_encoder: WeightMap,
    /// Keys under the three model prefixes that no rule maps (they are left out).
    pub unmapped: Vec<String>,
}

impl SingleFileCheckpoint {
    /// Opens a `.safetensors` or `.ckpt` SD 1.x checkpoint. `layout` comes from the UNet and
    /// VAE configs the weights are meant for; `None` reads it off the keys.
    pub fn open(path: impl AsRef<Path>, layout: Option<SingleFileLayout>) -> LoadResult<Self> {
        let path = path.as_ref();
        Self::from_weights(path, open_weights(path)?, layout)
    }

    /// Splits and renames an already opened LDM checkpoint.
    pub fn from_weights(
        path: &Path,
        checkpoint: WeightMap,
        layout: Option<SingleFileLayout>,
    ) -> LoadResult<Self> {
        let unet = checkpoint.strip_prefix(LDM_UNET_PREFIX);
        if unet.is_empty() {
            return Err(LoadError::UnrecognisedFormat {
                path: path.to_path_buf(),
                expected: format!(
                    "a Stable Diffusion single-file checkpoint (keys `{LDM_UNET_PREFIX}…`, \
                     `first_stage_model.…`, `cond_stage_model.transformer.…`)"
                ),
                found: describe_keys(&checkpoint),
            });
        }
        let layout = match layout {
            Some(layout) => layout,
            None => SingleFileLayout::infer(&checkpoint)?,
        };
        let mut unmapped = Vec::new();
        let unet = convert_ldm_unet(unet, layout.unet_layers_per_block, &mut unmapped)?;
        let vae = convert_ldm_vae(ldm_vae_part(&checkpoint), layout.vae_levels, &mut unmapped)?;
        let text_encoder = convert_ldm_clip(&checkpoint)?;
        Ok(Self {
            path: path.to_path_buf(),
            layout,
            unet,
            vae,
            text_encoder,
            unmapped,
        })
    }
}

/// A few of the keys, to say what a file of the wrong kind holds.
pub(crate) fn describe_keys(weights: &WeightMap) -> String {
    let shown: Vec<&str> = weights.keys().take(4).collect();
    if shown.is_empty() {
        "no tensors".into()
    } else {
        format!("{} tensors such as {}", weights.len(), shown.join(", "))
    }
}

/// The VAE weights of a checkpoint with their LDM prefix removed.
fn ldm_vae_part(checkpoint: &WeightMap) -> WeightMap {
    LDM_VAE_PREFIXES
        .iter()
        .map(|prefix| checkpoint.strip_prefix(prefix))
        .find(|part| !part.is_empty())
        .unwrap_or_else(|| WeightMap::empty(checkpoint.origin()))
}

/// Renames an LDM UNet (prefix already removed) to `UNet2DConditionModel` keys.
pub fn convert_ldm_unet(
    unet: WeightMap,
    layers_per_block: usize,
    unmapped: &mut Vec<String>,
) -> LoadResult<WeightMap> {
    unet.remap(
        |key, _| match ldm_unet_key_to_diffusers(key, layers_per_block) {
            Some(new_key) => Some((new_key, None)),
            None => {
                unmapped.push(format!("{LDM_UNET_PREFIX}{key}"));
                None
            }
        },
    )
}

/// The diffusers name of one LDM UNet key, `None` for keys no rule covers.
pub fn ldm_unet_key_to_diffusers(key: &str, layers_per_block: usize) -> Option<String> {
    let per_block = layers_per_block + 1;
    if let Some(rest) = key.strip_prefix("time_embed.") {
        let (index, param) = split_index(rest)?;
        let linear = match index {
            0 => "linear_1",
            2 => "linear_2",
            _ => return None,
        };
        return Some(format!("time_embedding.{linear}.{param}"));
    }
    if let Some(rest) = key.strip_prefix("out.") {
        let (index, param) = split_index(rest)?;
        let layer = match index {
            0 => "conv_norm_out",
            2 => "conv_out",
            _ => return None,
        };
        return Some(format!("{layer}.{param}"));
    }
    if let Some(rest) = key.strip_prefix("input_blocks.") {
        let (i, rest) = split_index(rest)?;
        let (j, rest) = split_index(rest)?;
        if i == 0 {
            return (j == 0).then(|| format!("conv_in.{rest}"));
        }
        let (block, layer) = ((i - 1) / per_block, (i - 1) % per_block);
        return match j {
            0 => match rest.strip_prefix("op.") {
                Some(param) if layer == layers_per_block => {
                    Some(format!("down_blocks.{block}.downsamplers.0.conv.{param}"))
                }
                Some(_) => None,
                None => Some(format!(
                    "down_blocks.{block}.resnets.{layer}.{}",
                    ldm_resnet(rest)?
                )),
            },
            1 => Some(format!("down_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("middle_block.") {
        return match split_index(rest)? {
            (0, rest) => Some(format!("mid_block.resnets.0.{}", ldm_resnet(rest)?)),
            (1, rest) => Some(format!("mid_block.attentions.0.{rest}")),
            (2, rest) => Some(format!("mid_block.resnets.1.{}", ldm_resnet(rest)?)),
            _ => None,
        };
    }
    if let Some(rest) = key.strip_prefix("output_blocks.") {
        let (i, rest) = split_index(rest)?;
        let (j, rest) = split_index(rest)?;
        let (block, layer) = (i / per_block, i % per_block);
        return match (j, rest.strip_prefix("conv.")) {
            (0, _) => Some(format!(
                "up_blocks.{block}.resnets.{layer}.{}",
                ldm_resnet(rest)?
            )),
            (1 | 2, Some(param)) => Some(format!("up_blocks.{block}.upsamplers.0.conv.{param}")),
            (1, None) => Some(format!("up_blocks.{block}.attentions.{layer}.{rest}")),
            _ => None,
        };
    }
    None
}

/// LDM `ResBlock` parameter names → diffusers `ResnetBlock2D` ones.
fn ldm_resnet(rest: &str) -> Option<String> {
    const RENAMES: [(&str, &str); 6] = [
        ("in_layers.0.", "norm1."),
        ("in_layers.2.", "conv1."),
        ("out_layers.0.", "norm2."),
        ("out_layers.3.", "conv2."),
        ("emb_layers.1.", "time_emb_proj."),
        ("skip_connection.", "conv_shortcut."),
    ];
    RENAMES
        .iter()
        .find_map(|(old, new)| rest.strip_prefix(old).map(|param| format!("{new}{param}")))
}

/// Renames an LDM VAE (prefix already removed) to `AutoencoderKL` keys; `levels` is
/// `len(block_out_channels)` of the VAE config.
pub fn convert_ldm_vae(
    vae: WeightMap,
    levels: usize,
    unmapped: &mut Vec<String>,
) -> LoadResult<WeightMap> {
    vae.remap(|key, shape| match ldm_vae_key_to_diffusers(key, levels) {
        Some(new_key) => {
            let view = is_vae_attention_projection(&new_key)
                .then(|| linear_view(shape))
                .flatten();
            Some((new_key, view))
        }
        None => {
            unmapped.push(key.to_string());
            None
        }
    })
}

fn is_vae_attention_projection(diffusers_key: &str) -> bool {
    diffusers_key.contains(".mid_block.attentions.0.")
        && [
            ".to_q.weight",
            ".to_k.weight",
            ".to_v.weight",
            ".to_out.0.weight",
        ]
        .iter()
        .any(|suffix| diffusers_key.ends_with(suffix))
}

/// A convolution kernel with unit spatial size, (out, in, 1[, 1]), seen as (out, in).
fn linear_view(shape: &[usize]) -> Option<Vec<usize>> {
    (shape.len() > 2 && shape[2..].iter().all(|&d| d == 1)).then(|| shape[..2].to_vec())
}

/// The diffusers name of one LDM VAE key, `None` for keys no rule covers.
pub fn ldm_vae_key_to_diffusers(key: &str, levels: usize) -> Option<String> {
    for name in ["quant_conv.", "post_quant_conv."] {
        if key.starts_with(name) {
            return Some(key.to_string());
        }
    }
    let (side, rest) = key.split_once('.')?;
    if side != "encoder" && side != "decoder" {
        return None;
    }
    let mapped = if rest.starts_with("conv_in.") || rest.starts_with("conv_out.") {
        rest.to_string()
    } else if let Some(param) = rest.strip_prefix("norm_out.") {
        format!("conv_norm_out.{param}")
    } else if let Some(rest) = rest.strip_prefix("down.").filter(|_| side == "encoder") {
        let (level, rest) = split_index(rest)?;
        if let Some(rest) = rest.strip_prefix("block.") {
            let (j, rest) = split_index(rest)?;
            format!("down_blocks.{level}.resnets.{j}.{}", ldm_vae_resnet(rest)?)
        } else {
            let param = rest.strip_prefix("downsample.conv.")?;
            format!("down_blocks.{level}.downsamplers.0.conv.{param}")
        }
    } else if let Some(rest) = rest.strip_prefix("up.").filter(|_| side == "decoder") {
        let (level, rest) = split_index(rest)?;
        let block = levels.checked_sub(level + 1)?;
        if let Some(rest) = rest.strip_prefix("block.") {
            let (j, rest) = split_index(rest)?;
            format!("up_blocks.{block}.resnets.{j}.{}", ldm_vae_resnet(rest)?)
        } else {
            let param = rest.strip_prefix("upsample.conv.")?;
            format!("up_blocks.{block}.upsamplers.0.conv.{param}")
        }
    } else if let Some(rest) = rest.strip_prefix("mid.block_1.") {
        format!("mid_block.resnets.0.{}", ldm_vae_resnet(rest)?)
    } else if let Some(rest) = rest.strip_prefix("mid.block_2.") {
        format!("mid_block.resnets.1.{}", ldm_vae_resnet(rest)?)
    } else if let Some(rest) = rest.strip_prefix("mid.attn_1.") {
        let (layer, param) = rest.split_once('.')?;
        let layer = match layer {
            "norm" => "group_norm",
            "q" => "to_q",
            "k" => "to_k",
            "v" => "to_v",
            "proj_out" => "to_out.0",
            _ => return None,
        };
        format!("mid_block.attentions.0.{layer}.{param}")
    } else {
        return None;
    };
    Some(format!("{side}.{mapped}"))
}

fn ldm_vae_resnet(rest: &str) -> Option<String> {
    let (layer, param) = rest.split_once('.')?;
    let layer = match layer {
        "norm1" | "conv1" | "norm2" | "conv2" => layer,
        "nin_shortcut" => "conv_shortcut",
        _ => return None,
    };
    Some(format!("{layer}.{param}"))
}

/// The CLIP text encoder of a checkpoint under transformers' `CLIPTextModel` keys.
pub fn convert_ldm_clip(checkpoint: &WeightMap) -> LoadResult<WeightMap> {
    let part = LDM_CLIP_PREFIXES
        .iter()
        .map(|prefix| checkpoint.strip_prefix(prefix))
        .find(|part| !part.is_empty())
        .unwrap_or_else(|| WeightMap::empty(checkpoint.origin()));
    normalize_clip_keys(part)
}

/// Brings CLIP text-encoder keys to `text_model.…`: files saved by some transformers versions
/// lack the `text_model.` prefix, and the `position_ids` buffer is not a weight.
pub fn normalize_clip_keys(weights: WeightMap) -> LoadResult<WeightMap> {
    weights.rename(|key| {
        if key.ends_with("embeddings.position_ids") {
            return None;
        }
        let unprefixed = ["embeddings.", "encoder.", "final_layer_norm."];
        if unprefixed.iter().any(|p| key.starts_with(p)) {
            Some(format!("text_model.{key}"))
        } else {
            Some(key.to_string())
        }
    })
}

/// Renames the mid-block attention of a diffusers `AutoencoderKL` saved under the deprecated
/// names (`query`, `key`, `value`, `proj_attn`) to the current ones (`to_q`, `to_k`, `to_v`,
/// `to_out.0`), seeing convolution-shaped projection kernels as linear weights, as diffusers
/// does on load. Current files pass through unchanged.
pub fn normalize_vae_keys(weights: WeightMap) -> LoadResult<WeightMap> {
    const RENAMES: [(&str, &str); 4] = [
        ("query.", "to_q."),
        ("key.", "to_k."),
        ("value.", "to_v."),
        ("proj_attn.", "to_out.0."),
    ];
    weights.remap(|key, shape| {
        let Some((block, leaf)) = key.split_once(".mid_block.attentions.0.") else {
            return Some((key.to_string(), None));
        };
        let leaf = RENAMES
            .iter()
            .find_map(|(old, new)| leaf.strip_prefix(old).map(|p| format!("{new}{p}")))
            .unwrap_or_else(|| leaf.to_string());
        let new_key = format!("{block}.mid_block.attentions.0.{leaf}");
        let view = is_vae_attention_projection(&new_key)
            .then(|| linear_view(shape))
            .flatten();
        Some((new_key, view))
    })
}

/// Opens a VAE in any of the layouts users have: a diffusers `vae/` folder, a diffusers
/// `AutoencoderKL` file (current or deprecated attention names), a standalone LDM VAE file
/// (`encoder.down.0.block.0…`, e.g. `vae-ft-mse-840000-ema-pruned.safetensors`) or a full
/// single-file checkpoint (its `first_stage_model.` part). `levels` is `len(block_out_channels)`
/// of the VAE config; `None` reads it off the keys.
pub fn open_vae(path: impl AsRef<Path>, levels: Option<usize>) -> LoadResult<WeightMap> {
    let path = path.as_ref();
    if path.is_dir() {
        return Ok(super::diffusers::DiffusersComponent::open(path)?.weights);
    }
    let weights = open_weights(path)?;
    let ldm = {
        let part = ldm_vae_part(&weights);
        if part.is_empty() {
            weights.clone()
        } else {
            part
        }
    };
    if ldm.keys().any(|k| k.starts_with("encoder.down.")) {
        let levels = levels.unwrap_or_else(|| infer_vae_levels(&ldm));
        return convert_ldm_vae(ldm, levels, &mut Vec::new());
    }
    if weights
        .keys()
        .any(|k| k.starts_with("encoder.down_blocks."))
    {
        return normalize_vae_keys(weights);
    }
    Err(LoadError::UnrecognisedFormat {
        path: path.to_path_buf(),
        expected: "a VAE: diffusers `encoder.down_blocks.…` keys, LDM `encoder.down.…` keys, or \
                   a checkpoint with `first_stage_model.…` keys"
            .into(),
        found: describe_keys(&weights),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Stable Diffusion 1.5 keys whose diffusers names are known from the released diffusers
    /// conversion of `v1-5-pruned-emaonly`.
    #[test]
    fn sd15_unet_keys() {
        let cases = [
            ("time_embed.2.weight", "time_embedding.linear_2.weight"),
            ("input_blocks.0.0.bias", "conv_in.bias"),
            (
                "input_blocks.1.0.in_layers.0.weight",
                "down_blocks.0.resnets.0.norm1.weight",
            ),
            (
                "input_blocks.1.1.proj_in.weight",
                "down_blocks.0.attentions.0.proj_in.weight",
            ),
            (
                "input_blocks.3.0.op.weight",
                "down_blocks.0.downsamplers.0.conv.weight",
            ),
            (
                "input_blocks.4.0.skip_connection.bias",
                "down_blocks.1.resnets.0.conv_shortcut.bias",
            ),
            (
                "input_blocks.11.0.emb_layers.1.weight",
                "down_blocks.3.resnets.1.time_emb_proj.weight",
            ),
            (
                "middle_block.1.transformer_blocks.0.attn2.to_k.weight",
                "mid_block.attentions.0.transformer_blocks.0.attn2.to_k.weight",
            ),
            (
                "middle_block.2.out_layers.3.bias",
                "mid_block.resnets.1.conv2.bias",
            ),
            (
                "output_blocks.2.1.conv.weight",
                "up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "output_blocks.5.2.conv.bias",
                "up_blocks.1.upsamplers.0.conv.bias",
            ),
            (
                "output_blocks.5.1.norm.weight",
                "up_blocks.1.attentions.2.norm.weight",
            ),
            (
                "output_blocks.11.0.out_layers.0.bias",
                "up_blocks.3.resnets.2.norm2.bias",
            ),
            ("out.2.weight", "conv_out.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                ldm_unet_key_to_diffusers(ldm, 2).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        assert_eq!(
            ldm_unet_key_to_diffusers("input_blocks.1.0.op.weight", 2),
            None
        );
        assert_eq!(ldm_unet_key_to_diffusers("label_emb.0.0.weight", 2), None);
    }

    #[test]
    fn sd15_vae_keys() {
        let cases = [
            (
                "encoder.down.0.block.1.conv2.weight",
                "encoder.down_blocks.0.resnets.1.conv2.weight",
            ),
            (
                "encoder.down.1.block.0.nin_shortcut.weight",
                "encoder.down_blocks.1.resnets.0.conv_shortcut.weight",
            ),
            (
                "encoder.down.2.downsample.conv.bias",
                "encoder.down_blocks.2.downsamplers.0.conv.bias",
            ),
            (
                "encoder.mid.attn_1.q.weight",
                "encoder.mid_block.attentions.0.to_q.weight",
            ),
            (
                "decoder.mid.attn_1.norm.bias",
                "decoder.mid_block.attentions.0.group_norm.bias",
            ),
            (
                "decoder.mid.attn_1.proj_out.weight",
                "decoder.mid_block.attentions.0.to_out.0.weight",
            ),
            (
                "decoder.mid.block_2.norm1.weight",
                "decoder.mid_block.resnets.1.norm1.weight",
            ),
            (
                "decoder.up.3.upsample.conv.weight",
                "decoder.up_blocks.0.upsamplers.0.conv.weight",
            ),
            (
                "decoder.up.0.block.2.conv1.bias",
                "decoder.up_blocks.3.resnets.2.conv1.bias",
            ),
            ("decoder.norm_out.weight", "decoder.conv_norm_out.weight"),
            ("post_quant_conv.weight", "post_quant_conv.weight"),
        ];
        for (ldm, diffusers) in cases {
            assert_eq!(
                ldm_vae_key_to_diffusers(ldm, 4).as_deref(),
                Some(diffusers),
                "{ldm}"
            );
        }
        assert_eq!(
            ldm_vae_key_to_diffusers("decoder.up.4.block.0.conv1.bias", 4),
            None
        );
        assert_eq!(ldm_vae_key_to_diffusers("loss.logvar", 4), None);
    }
}
