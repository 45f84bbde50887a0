//! The models every video workflow runs on, built with candle from diffusers-named weights.

pub mod attention;
pub mod call;
pub mod checkpoint;
pub mod clip;
pub mod load;
pub mod lora;
pub mod motion;
pub mod ops;
pub mod patcher;
pub mod random;
pub mod temporal_adapter;
pub mod tokenizer;
pub mod unet;
pub mod vae;
pub mod weighted_prompt;
pub mod weights;
