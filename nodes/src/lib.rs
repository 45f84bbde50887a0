//! vdm-nodes: the video-diffusion node plugin.

pub mod models;
pub mod schedulers;
pub mod video;
pub mod node;
