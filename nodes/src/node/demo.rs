//! `TinyRandomModels`: writes a tiny SD 1.x checkpoint (a diffusers folder) and a tiny
//! AnimateDiff motion module with random weights into the models folder, so that every
//! workflow can be tried end to end without downloading weights. Their videos are noise: the
//! point is to see each node run, through the same loaders that read real models.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::Tensor;
use serde_json::{json, Value as Json};

use crate::models::clip::{ClipTextConfig, ClipTextTransformer};
use crate::models::load::sd_pipeline_index;
use crate::models::motion::{MotionAdapter, MotionAdapterConfig};
use crate::models::random::random_weights_for;
use crate::models::tokenizer::write_letter_vocabulary;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use crate::models::vae::{AutoencoderKL, AutoencoderKLConfig};

use super::{Context, DescriptorBuilder, Inputs, Node, NodeFailure, Outputs};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(TinyRandomModels)]
}

/// The UNet: SD 1.x's layout at 32/64 channels, two levels.
fn unet_config() -> Json {
    json!({
        "_class_name": "UNet2DConditionModel",
        "in_channels": 4, "out_channels": 4, "sample_size": 32,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "layers_per_block": 2, "norm_num_groups": 8, "norm_eps": 1e-5,
        "cross_attention_dim": 32, "attention_head_dim": 8,
        "act_fn": "silu", "flip_sin_to_cos": true, "freq_shift": 0
    })
}

/// The VAE: four levels, so that latents are 1/8 of the pixels as with SD's.
fn vae_config() -> Json {
    json!({
        "_class_name": "AutoencoderKL",
        "in_channels": 3, "out_channels": 3, "latent_channels": 4,
        "block_out_channels": [16, 16, 32, 32],
        "down_block_types": ["DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D", "DownEncoderBlock2D"],
        "up_block_types": ["UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D", "UpDecoderBlock2D"],
        "layers_per_block": 1, "norm_num_groups": 8, "act_fn": "silu",
        "sample_size": 256, "scaling_factor": 0.18215
    })
}

/// The CLIP text encoder, for a vocabulary of `vocab_size` tokens ending in BOS and EOS.
fn text_encoder_config(vocab_size: usize) -> Json {
    json!({
        "model_type": "clip_text_model",
        "vocab_size": vocab_size, "hidden_size": 32, "intermediate_size": 64,
        "num_attention_heads": 4, "num_hidden_layers": 2, "max_position_embeddings": 77,
        "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "projection_dim": 32,
        "bos_token_id": vocab_size - 2, "eos_token_id": vocab_size - 1,
        "pad_token_id": vocab_size - 1
    })
}

/// The motion module for the UNet above (AnimateDiff v2's layout: a mid block, 32 positions).
fn motion_config() -> Json {
    json!({
        "_class_name": "MotionAdapter",
        "block_out_channels": [32, 64],
        "motion_layers_per_block": 2, "motion_mid_block_layers_per_block": 1,
        "motion_max_seq_length": 32, "motion_num_attention_heads": 8,
        "motion_norm_num_groups": 8, "use_motion_mid_block": true,
        "motion_transformer_layers_per_block": 1, "motion_transformer_layers_per_mid_block": 1
    })
}

fn parse<T: serde::de::DeserializeOwned>(config: &Json) -> candle_core::Result<T> {
    serde_json::from_value(config.clone()).map_err(candle_core::Error::wrap)
}

fn write_json(path: &Path, value: &Json) -> candle_core::Result<()> {
    let text = serde_json::to_string_pretty(value).map_err(candle_core::Error::wrap)?;
    fs::write(path, text).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))
}

/// Writes one diffusers component: `config.json` and the weights under `weights_file`.
fn write_component(
    dir: &Path,
    config: &Json,
    weights_file: &str,
    weights: &HashMap<String, Tensor>,
) -> candle_core::Result<()> {
    fs::create_dir_all(dir)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", dir.display())))?;
    write_json(&dir.join("config.json"), config)?;
    candle_core::safetensors::save(weights, dir.join(weights_file))
}

/// Writes the checkpoint folder `checkpoint` and the motion module folder `motion`, each first
/// under a temporary name beside it and renamed once complete.
pub fn write_tiny_random_models(checkpoint: &Path, motion: &Path) -> candle_core::Result<()> {
    let temporary = |final_path: &Path| {
        let name = final_path.file_name().unwrap_or_default().to_string_lossy();
        final_path.with_file_name(format!(".{name}.{}.tmp", std::process::id()))
    };
    let publish = |from: &Path, to: &Path| {
        fs::rename(from, to).map_err(|e| candle_core::Error::Msg(format!("{}: {e}", to.display())))
    };

    let staging = temporary(checkpoint);
    let _ = fs::remove_dir_all(&staging);
    let tokenizer_dir = staging.join("tokenizer");
    fs::create_dir_all(&tokenizer_dir)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tokenizer_dir.display())))?;
    let vocab_size = write_letter_vocabulary(&tokenizer_dir)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", tokenizer_dir.display())))?;

    let unet = unet_config();
    let unet_cfg: UNet2DConditionConfig = parse(&unet)?;
    let weights = random_weights_for(|vb| UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ()))?;
    write_component(
        &staging.join("unet"),
        &unet,
        "diffusion_pytorch_model.safetensors",
        &weights,
    )?;

    let vae = vae_config();
    let vae_cfg: AutoencoderKLConfig = parse(&vae)?;
    let weights = random_weights_for(|vb| AutoencoderKL::new(vb, &vae_cfg).map(|_| ()))?;
    write_component(
        &staging.join("vae"),
        &vae,
        "diffusion_pytorch_model.safetensors",
        &weights,
    )?;

    let text = text_encoder_config(vocab_size);
    let text_cfg: ClipTextConfig = parse(&text)?;
    let weights = random_weights_for(|vb| ClipTextTransformer::new(vb, &text_cfg).map(|_| ()))?;
    write_component(
        &staging.join("text_encoder"),
        &text,
        "model.safetensors",
        &weights,
    )?;

    write_json(&staging.join("model_index.json"), &sd_pipeline_index())?;

    let motion_staging = temporary(motion);
    let _ = fs::remove_dir_all(&motion_staging);
    let motion_json = motion_config();
    let motion_cfg: MotionAdapterConfig = parse(&motion_json)?;
    let groups = unet_cfg.norm_num_groups;
    let weights = random_weights_for(|vb| MotionAdapter::new(vb, &motion_cfg, groups).map(|_| ()))?;
    write_component(
        &motion_staging,
        &motion_json,
        "diffusion_pytorch_model.safetensors",
        &weights,
    )?;

    for (from, to) in [(&staging, checkpoint), (&motion_staging, motion)] {
        if let Some(parent) = to.parent() {
            fs::create_dir_all(parent)
                .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", parent.display())))?;
        }
        let _ = fs::remove_dir_all(to);
        publish(from, to)?;
    }
    Ok(())
}

struct TinyRandomModels;

impl Node for TinyRandomModels {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("TinyRandomModels", "Tiny Random Models", "vdm/testing")
            .description(
                "Writes a tiny SD 1.x checkpoint (diffusers folder, with a letters-only CLIP \
                 tokenizer) and a tiny AnimateDiff motion module, both with RANDOM weights, into \
                 the models folder as checkpoints/<name> and animatediff_models/<name>-motion, \
                 so that workflows can be tried without downloading anything. They load through \
                 the real loaders and run every node, fast; their videos are noise. Existing \
                 folders of these names are kept unless `overwrite`.",
            )
            .string(
                "name",
                "vdm-demo-tiny-random",
                "Name of the checkpoint folder; the motion module is <name>-motion.",
            )
            .optional()
            .boolean(
                "overwrite",
                false,
                "Write the models again when they exist.",
            )
            .output_node()
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let name = inputs.string("name")?;
        let valid = !name.is_empty()
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
            && !name.starts_with('.');
        if !valid {
            return Err(NodeFailure::input(
                "name",
                format!("`{name}`: use letters, digits, `-`, `_` and `.` (not first)"),
            ));
        }
        let Some(models) = ctx.setting("models_dir") else {
            return Err(NodeFailure::execution(
                "no models folder to write into: pass --models DIR or set VDM_MODELS",
            ));
        };
        let models = PathBuf::from(models);
        let checkpoint = models.join("checkpoints").join(name);
        let motion = models
            .join("animatediff_models")
            .join(format!("{name}-motion"));
        let overwrite = matches!(inputs.get("overwrite"), Some(vdm_ffi::Value::Bool(true)));
        if overwrite || !(checkpoint.is_dir() && motion.is_dir()) {
            ctx.progress(0, 1, "writing tiny random models");
            write_tiny_random_models(&checkpoint, &motion)?;
            ctx.progress(1, 1, "written");
        }
        let entry = |path: &Path| {
            json!({
                "filename": path.file_name().map(|n| n.to_string_lossy().into_owned()),
                "fullpath": path.to_string_lossy(),
            })
        };
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "models": [entry(&checkpoint), entry(&motion)] })),
        })
    }
}
