//! Checkpoint loading: the file formats users have, renamed to the diffusers keys the models
//! are built with.
//!
//! Every loader returns a [`WeightMap`]: lazily read tensors under diffusers names, from which
//! a model is built with [`WeightMap::var_builder`] in the dtype and on the device asked for
//! (fp16 or bf16 files load as f32, or stay half precision if asked). What is understood:
//!
//! | what | entry point |
//! | --- | --- |
//! | any one weight file (safetensors, PyTorch zip `.ckpt`/`.pt`/`.pth`/`.bin`) | [`open_weights`] |
//! | a diffusers pipeline folder (`model_index.json`, `unet/`, `vae/`, `text_encoder/`, `tokenizer/`) | [`DiffusersPipeline`] |
//! | one diffusers component folder (`config.json` + weights, incl. `.fp16` variants, shards) | [`DiffusersComponent`] |
//! | a single-file SD 1.x checkpoint (`model.diffusion_model.…`, `first_stage_model.…`, `cond_stage_model.transformer.…`) | [`SingleFileCheckpoint`] |
//! | a VAE in any of the above layouts, or a standalone LDM VAE file | [`open_vae`] |
//! | a motion adapter: diffusers folder or file, or an original AnimateDiff module | [`MotionAdapterWeights`] |
//!
//! Renaming happens here, never in layer code. Errors ([`LoadError`]) name the file and the
//! problem: missing file, truncated or corrupt data, an unrecognised layout (with what was
//! expected), missing weights, or a shape mismatch.

mod animatediff;
mod diffusers;
mod error;
mod formats;
mod ldm;
mod weights;

pub use animatediff::{
    animatediff_key_to_diffusers, convert_animatediff_motion_module, derive_motion_adapter_config,
    AnimateDiffVersion, MotionAdapterWeights, MotionModuleFormat,
};
pub use diffusers::{
    sd_pipeline_index, DiffusersComponent, DiffusersPipeline, TokenizerFiles, WEIGHT_FILE_NAMES,
};
pub use error::{LoadError, LoadResult, LISTED_KEYS};
pub use formats::{
    detect_format, open_safetensors, open_safetensors_index, open_torch_checkpoint, open_weights,
    WeightFileKind,
};
pub use ldm::{
    convert_ldm_clip, convert_ldm_unet, convert_ldm_vae, ldm_unet_key_to_diffusers,
    ldm_vae_key_to_diffusers, normalize_clip_keys, normalize_vae_keys, open_vae,
    SingleFileCheckpoint, SingleFileLayout, LDM_CLIP_PREFIXES, LDM_UNET_PREFIX, LDM_VAE_PREFIXES,
};
pub use weights::WeightMap;
