//! Whole checkpoints and motion modules as users keep them, built into models: a diffusers
//! folder (with its configs) or an SD 1.x single file (`.safetensors` / `.ckpt`, built with SD
//! 1.x's configs, as ComfyUI does for that model family).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use candle_nn::VarBuilder;

use super::clip::{ClipTextConfig, ClipTextTransformer};
use super::load::{
    DiffusersPipeline, LoadError, MotionAdapterWeights, SingleFileCheckpoint, SingleFileLayout,
    WeightMap,
};
use super::lora::TextEncoderWeights;
use super::motion::{MotionAdapter, MotionAdapterConfig};
use super::tokenizer::ClipTokenizer;
use super::unet::{UNet2DConditionConfig, UNet2DConditionModel};
use super::vae::{AutoencoderKL, AutoencoderKLConfig};
use super::weights;

/// Why a checkpoint could not be built.
#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error(transparent)]
    Load(#[from] LoadError),
    #[error("{path}: {component}: {message}")]
    Build {
        path: PathBuf,
        component: &'static str,
        message: String,
    },
}

fn build_error<'a>(
    path: &'a Path,
    component: &'static str,
) -> impl Fn(candle_core::Error) -> CheckpointError + 'a {
    move |e| CheckpointError::Build {
        path: path.to_owned(),
        component,
        message: e.to_string(),
    }
}

/// The three models of an SD 1.x checkpoint.
pub struct Checkpoint {
    pub unet: UNet2DConditionModel,
    pub text_encoder: ClipTextTransformer,
    /// The text encoder's weights as built, from which a copy with some of them replaced (a
    /// LoRA merged in) is rebuilt.
    pub text_encoder_weights: TextEncoderWeights,
    /// The tokenizer shipped with the checkpoint, if any (single files carry none).
    pub tokenizer: Option<ClipTokenizer>,
    pub vae: AutoencoderKL,
}

/// Loads a diffusers folder or an SD 1.x single-file checkpoint. The UNet and text encoder
/// are built in `dtype`; the VAE always in f32 (SD 1.x VAEs overflow in f16).
/// `tokenizer_dirs` are searched, in order, for `vocab.json` + `merges.txt` when the
/// checkpoint has no tokenizer of its own.
pub fn load_checkpoint(
    path: &Path,
    dtype: DType,
    device: &Device,
    tokenizer_dirs: &[PathBuf],
) -> Result<Checkpoint, CheckpointError> {
    if !path.exists() {
        return Err(LoadError::NotFound {
            path: path.to_owned(),
        }
        .into());
    }
    let mut checkpoint = if path.is_dir() {
        load_diffusers(path, dtype, device)?
    } else {
        load_single_file(path, dtype, device)?
    };
    if checkpoint.tokenizer.is_none() {
        checkpoint.tokenizer = tokenizer_dirs
            .iter()
            .filter(|d| d.join("vocab.json").is_file() && d.join("merges.txt").is_file())
            .find_map(|d| ClipTokenizer::from_dir(d).ok());
    }
    Ok(checkpoint)
}

fn load_diffusers(
    root: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Checkpoint, CheckpointError> {
    let pipeline = DiffusersPipeline::open(root)?;
    let unet_part = pipeline.unet()?;
    let unet_cfg: UNet2DConditionConfig = unet_part.parse_config()?;
    let unet = UNet2DConditionModel::new(unet_part.weights.var_builder(dtype, device), &unet_cfg)
        .map_err(build_error(&unet_part.dir, "unet"))?;
    let text_part = pipeline.text_encoder()?;
    let clip_cfg: ClipTextConfig = text_part.parse_config()?;
    let (text_encoder, text_encoder_weights) =
        build_text_encoder(text_part.weights.var_builder(dtype, device), clip_cfg)
            .map_err(build_error(&text_part.dir, "text_encoder"))?;
    let vae_part = pipeline.vae()?;
    let vae_cfg: AutoencoderKLConfig = vae_part.parse_config()?;
    let vae = AutoencoderKL::new(vae_part.weights.var_builder(DType::F32, device), &vae_cfg)
        .map_err(build_error(&vae_part.dir, "vae"))?;
    let tokenizer = match pipeline.tokenizer() {
        Ok(files) => {
            Some(
                ClipTokenizer::from_dir(&files.dir).map_err(|e| CheckpointError::Build {
                    path: files.dir.clone(),
                    component: "tokenizer",
                    message: e.to_string(),
                })?,
            )
        }
        Err(_) => None,
    };
    Ok(Checkpoint {
        unet,
        text_encoder,
        text_encoder_weights,
        tokenizer,
        vae,
    })
}

/// Builds the text encoder and keeps the weights it read.
fn build_text_encoder(
    vb: VarBuilder<'_>,
    config: ClipTextConfig,
) -> candle_core::Result<(ClipTextTransformer, TextEncoderWeights)> {
    let (vb, recorded) = weights::recording(vb);
    let encoder = ClipTextTransformer::new(vb, &config)?;
    Ok((encoder, TextEncoderWeights::new(config, recorded.take())))
}

fn load_single_file(
    path: &Path,
    dtype: DType,
    device: &Device,
) -> Result<Checkpoint, CheckpointError> {
    let file = SingleFileCheckpoint::open(path, Some(SingleFileLayout::SD1))?;
    let unet = UNet2DConditionModel::new(
        file.unet.var_builder(dtype, device),
        &UNet2DConditionConfig::default(),
    )
    .map_err(build_error(path, "unet (model.diffusion_model.*)"))?;
    let (text_encoder, text_encoder_weights) = build_text_encoder(
        file.text_encoder.var_builder(dtype, device),
        ClipTextConfig::sd15(),
    )
    .map_err(build_error(
        path,
        "text encoder (cond_stage_model.transformer.*)",
    ))?;
    let vae = AutoencoderKL::new(
        file.vae.var_builder(DType::F32, device),
        &AutoencoderKLConfig::sd1(),
    )
    .map_err(build_error(path, "vae (first_stage_model.*)"))?;
    Ok(Checkpoint {
        unet,
        text_encoder,
        text_encoder_weights,
        tokenizer: None,
        vae,
    })
}

/// A motion module read from disk, not yet bound to a UNet: its GroupNorms take the group
/// count of the UNet it patches, so the adapter is built when applied.
#[derive(Clone)]
pub struct MotionModuleFile {
    pub path: PathBuf,
    pub config: MotionAdapterConfig,
    pub description: String,
    weights: WeightMap,
}

impl std::fmt::Debug for MotionModuleFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MotionModuleFile")
            .field("path", &self.path)
            .field("description", &self.description)
            .finish()
    }
}

/// Opens a motion module: an original AnimateDiff file (`mm_sd_v15*.ckpt`/`.safetensors`), a
/// diffusers MotionAdapter folder or file.
pub fn open_motion_module(path: &Path) -> Result<MotionModuleFile, CheckpointError> {
    let file = MotionAdapterWeights::open(path)?;
    let description = match file.version {
        Some(version) => format!("AnimateDiff {version:?}, {:?} format", file.format),
        None => format!("{:?} format", file.format),
    };
    Ok(MotionModuleFile {
        path: path.to_owned(),
        config: file.config,
        description,
        weights: file.weights,
    })
}

impl MotionModuleFile {
    /// The module's weights under `MotionAdapter` keys, as read from the file.
    pub fn weights(&self) -> &WeightMap {
        &self.weights
    }

    /// Builds the adapter for a UNet with `unet_norm_num_groups`, in `dtype` on `device`.
    pub fn build(
        &self,
        unet_norm_num_groups: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Arc<MotionAdapter>, CheckpointError> {
        let adapter = MotionAdapter::new(
            self.weights.var_builder(dtype, device),
            &self.config,
            unet_norm_num_groups,
        )
        .map_err(build_error(&self.path, "motion module"))?;
        Ok(Arc::new(adapter))
    }
}
