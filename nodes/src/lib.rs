//! vdm-nodes: the video-diffusion node plugin.

pub mod models;
pub mod node;
pub mod schedulers;
pub mod video;
