//! vdm-nodes: the video-diffusion node plugin.
//!
//! `node/` wraps the domain code for the host (descriptors, ABI values); `models/`,
//! `schedulers/` and `video/` are plain Rust over candle and know nothing of the ABI.

pub mod allocator;
pub mod models;
pub mod node;
pub mod plugin;
pub mod sampling;
pub mod schedulers;
pub mod train;
pub mod video;

#[cfg(test)]
pub(crate) mod test_util;
