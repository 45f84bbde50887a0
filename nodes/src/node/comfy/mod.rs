//! ComfyUI's node classes, so that workflows made for ComfyUI (core, AnimateDiff-Evolved,
//! Video Helper Suite) run unchanged: the same class names, inputs, defaults and outputs,
//! each a thin adapter over vdm's objects and domain code.

mod ade;
pub(super) mod core;
mod ksampler;
mod lora;
mod vhs;
mod video;

use super::Node;

pub fn nodes() -> Vec<Box<dyn Node>> {
    let mut nodes = Vec::new();
    nodes.extend(core::nodes());
    nodes.extend(ade::nodes());
    nodes.extend(ksampler::nodes());
    nodes.extend(lora::nodes());
    nodes.extend(vhs::nodes());
    nodes.extend(video::nodes());
    nodes
}
