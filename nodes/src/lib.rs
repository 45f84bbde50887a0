//! vdm-nodes: the video-diffusion node plugin.
//!
//! `node/` wraps the domain code for the host (descriptors, ABI values); `models/`,
//! `schedulers/` and `video/` are plain Rust over candle and know nothing of the ABI.

/// Every layer of a forward pass allocates activation buffers of up to hundreds of MB and frees
/// them a layer later; the system allocator hands such blocks back to the kernel on free, so each
/// new one costs page faults and zeroing. mimalloc keeps them for reuse.
#[cfg(feature = "mimalloc")]
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

pub mod models;
pub mod node;
pub mod plugin;
pub mod sampling;
pub mod schedulers;
pub mod video;
