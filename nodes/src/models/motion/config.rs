//! diffusers' `MotionAdapter` config: what a `motion_adapter/config.json` says, what the loader
//! derives from the weights of files without one, and what [`super::MotionAdapter`] is built
//! from.

use candle_core::Result;
use serde::Deserialize;

use crate::models::unet::PerBlock;

/// AnimateDiff's motion modules all use 8 heads (diffusers' default); the weights cannot tell
/// the count, so configs derived from weights use it.
pub const DEFAULT_MOTION_HEADS: usize = 8;

/// Transformer depth of the motion modules of one block: one value for all, or one per module.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(untagged)]
pub enum Depth {
    PerModule(Vec<usize>),
    All(usize),
}

impl Depth {
    /// The depth of each of `modules` modules; errors when a list has another length.
    pub fn expand(&self, modules: usize, name: &str) -> Result<Vec<usize>> {
        match self {
            Depth::All(depth) => Ok(vec![*depth; modules]),
            Depth::PerModule(depths) if depths.len() == modules => Ok(depths.clone()),
            Depth::PerModule(depths) => candle_core::bail!(
                "motion adapter config `{name}` has {} depths for {modules} motion modules",
                depths.len()
            ),
        }
    }

    /// `All` when every module has the same depth, so that a derived config reads like the
    /// ones diffusers writes.
    pub fn from_depths(depths: Vec<usize>) -> Self {
        match depths.split_first() {
            Some((&first, rest)) if rest.iter().all(|&d| d == first) => Depth::All(first),
            _ => Depth::PerModule(depths),
        }
    }
}

/// `All` when every block has the same value, `PerBlock` otherwise.
pub fn per_block<T: Clone + PartialEq>(values: Vec<T>) -> PerBlock<T> {
    match values.split_first() {
        Some((first, rest)) if rest.iter().all(|v| v == first) => PerBlock::All(first.clone()),
        _ => PerBlock::PerBlock(values),
    }
}

/// diffusers' `MotionAdapter` config (`motion_adapter/config.json`), with its defaults (the
/// AnimateDiff v2/v3 layout). Every per-block field takes one value for all blocks or a list
/// with one value per block, as diffusers does; the transformer depths may also be given per
/// motion module.
#[derive(Debug, Clone, PartialEq, Deserialize)]
#[serde(default)]
pub struct MotionAdapterConfig {
    pub block_out_channels: Vec<usize>,
    /// Motion modules per down block; each up block has one more.
    pub motion_layers_per_block: PerBlock<usize>,
    /// Transformer blocks per motion module, per block (or per module of a block). The up
    /// blocks take the down blocks' values in reverse order.
    pub motion_transformer_layers_per_block: PerBlock<Depth>,
    pub motion_mid_block_layers_per_block: usize,
    pub motion_transformer_layers_per_mid_block: Depth,
    /// Heads per block; the mid block takes the last block's count, the up blocks the down
    /// blocks' counts in reverse order.
    pub motion_num_attention_heads: PerBlock<usize>,
    /// Ignored when the adapter is applied: the modules' GroupNorm uses the UNet's
    /// `norm_num_groups`, as `UNetMotionModel` does.
    pub motion_norm_num_groups: usize,
    /// Length of the frame-position table, the most frames one window may have (24 for v1/v2
    /// checkpoints of 16 frames, 32 for v3).
    pub motion_max_seq_length: usize,
    pub use_motion_mid_block: bool,
    /// Set by PIA-style adapters that replace the UNet's `conv_in`; not supported.
    pub conv_in_channels: Option<usize>,
}

impl Default for MotionAdapterConfig {
    fn default() -> Self {
        Self {
            block_out_channels: vec![320, 640, 1280, 1280],
            motion_layers_per_block: PerBlock::All(2),
            motion_transformer_layers_per_block: PerBlock::All(Depth::All(1)),
            motion_mid_block_layers_per_block: 1,
            motion_transformer_layers_per_mid_block: Depth::All(1),
            motion_num_attention_heads: PerBlock::All(DEFAULT_MOTION_HEADS),
            motion_norm_num_groups: 32,
            motion_max_seq_length: 32,
            use_motion_mid_block: true,
            conv_in_channels: None,
        }
    }
}

/// The motion modules of one UNet block, with every per-block value resolved.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotionBlockLayout {
    pub channels: usize,
    pub heads: usize,
    /// Transformer blocks of each motion module, in module order.
    pub depths: Vec<usize>,
}

/// Every motion module an adapter has, block by block, in the order of diffusers'
/// `MotionAdapter`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MotionAdapterLayout {
    pub down_blocks: Vec<MotionBlockLayout>,
    pub mid_block: Option<MotionBlockLayout>,
    /// Up block `i` mirrors down block `len − 1 − i`.
    pub up_blocks: Vec<MotionBlockLayout>,
}

impl MotionAdapterConfig {
    /// Reads a diffusers `config.json`.
    pub fn from_json_file(path: &std::path::Path) -> Result<Self> {
        let text = std::fs::read_to_string(path)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        serde_json::from_str(&text)
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
    }

    /// Resolves the per-block fields into one layout per block, as diffusers' `MotionAdapter`
    /// does: errors when a list has the wrong length or a head count does not divide its
    /// block's channels.
    pub fn layout(&self) -> Result<MotionAdapterLayout> {
        let blocks = self.block_out_channels.len();
        if blocks == 0 {
            candle_core::bail!("motion adapter config has no `block_out_channels`")
        }
        let layers = self
            .motion_layers_per_block
            .expand(blocks, "motion_layers_per_block")?;
        let heads = self
            .motion_num_attention_heads
            .expand(blocks, "motion_num_attention_heads")?;
        let depths = self
            .motion_transformer_layers_per_block
            .expand(blocks, "motion_transformer_layers_per_block")?;
        let block = |level: usize, modules: usize, depth: &Depth, name: &str| {
            let channels = self.block_out_channels[level];
            let heads = heads[level];
            if heads == 0 || !channels.is_multiple_of(heads) {
                candle_core::bail!(
                    "motion adapter config: {heads} attention heads do not divide the {channels} \
                     channels of block {level}"
                )
            }
            Ok(MotionBlockLayout {
                channels,
                heads,
                depths: depth.expand(modules, name)?,
            })
        };
        let name = "motion_transformer_layers_per_block";
        let down_blocks = (0..blocks)
            .map(|level| block(level, layers[level], &depths[level], name))
            .collect::<Result<Vec<_>>>()?;
        let mid_block = if self.use_motion_mid_block {
            Some(block(
                blocks - 1,
                self.motion_mid_block_layers_per_block,
                &self.motion_transformer_layers_per_mid_block,
                "motion_transformer_layers_per_mid_block",
            )?)
        } else {
            None
        };
        let up_blocks = (0..blocks)
            .rev()
            .map(|level| block(level, layers[level] + 1, &depths[level], name))
            .collect::<Result<Vec<_>>>()?;
        Ok(MotionAdapterLayout {
            down_blocks,
            mid_block,
            up_blocks,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uniform_and_per_block_values_read_alike() {
        let uniform: MotionAdapterConfig = serde_json::from_str(
            r#"{"block_out_channels": [32, 64], "motion_layers_per_block": 1,
                "motion_num_attention_heads": 8, "motion_transformer_layers_per_block": 2}"#,
        )
        .unwrap();
        let lists: MotionAdapterConfig = serde_json::from_str(
            r#"{"block_out_channels": [32, 64], "motion_layers_per_block": [1, 1],
                "motion_num_attention_heads": [8, 8], "motion_transformer_layers_per_block": [2, 2]}"#,
        )
        .unwrap();
        assert_eq!(uniform.layout().unwrap(), lists.layout().unwrap());
        assert_eq!(uniform.motion_max_seq_length, 32);
    }

    #[test]
    fn per_block_values_reach_every_block() {
        let config: MotionAdapterConfig = serde_json::from_str(
            r#"{"block_out_channels": [32, 64], "motion_layers_per_block": [1, 2],
                "motion_num_attention_heads": [4, 8],
                "motion_transformer_layers_per_block": [1, 2],
                "motion_transformer_layers_per_mid_block": [2, 3],
                "motion_mid_block_layers_per_block": 2}"#,
        )
        .unwrap();
        let layout = config.layout().unwrap();
        let summary = |b: &MotionBlockLayout| (b.channels, b.heads, b.depths.clone());
        let down: Vec<_> = layout.down_blocks.iter().map(summary).collect();
        assert_eq!(down, [(32, 4, vec![1]), (64, 8, vec![2, 2])]);
        assert_eq!(
            layout.mid_block.as_ref().map(summary),
            Some((64, 8, vec![2, 3]))
        );
        let up: Vec<_> = layout.up_blocks.iter().map(summary).collect();
        assert_eq!(up, [(64, 8, vec![2, 2, 2]), (32, 4, vec![1, 1])]);
    }

    /// diffusers hands a down block's per-module depths to its up block too, which has one
    /// module more, and refuses the config; so does the layout.
    #[test]
    fn per_module_depths_cannot_describe_the_up_blocks() {
        let config: MotionAdapterConfig = serde_json::from_str(
            r#"{"block_out_channels": [32, 64], "motion_layers_per_block": 2,
                "motion_transformer_layers_per_block": [[1, 2], 1]}"#,
        )
        .unwrap();
        let message = config.layout().unwrap_err().to_string();
        assert!(
            message.contains("2 depths for 3 motion modules"),
            "{message}"
        );
    }

    #[test]
    fn wrong_lengths_and_heads_are_refused() {
        let parse = |json: &str| serde_json::from_str::<MotionAdapterConfig>(json).unwrap();
        let wrong_length =
            parse(r#"{"block_out_channels": [32, 64], "motion_num_attention_heads": [4]}"#);
        let message = wrong_length.layout().unwrap_err().to_string();
        assert!(message.contains("motion_num_attention_heads"), "{message}");
        let indivisible =
            parse(r#"{"block_out_channels": [32, 64], "motion_num_attention_heads": [5, 8]}"#);
        let message = indivisible.layout().unwrap_err().to_string();
        assert!(message.contains("do not divide"), "{message}");
    }
}
