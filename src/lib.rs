//! vdm: the host graph engine for video-diffusion node workflows.
//!
//! Reads workflows in ComfyUI's API format, validates them against the node descriptors that
//! plugins publish through `vdm-ffi`, and runs what the output nodes need. It knows nothing
//! about diffusion: every node lives in a plugin.

pub mod allocator;
pub mod demo;
pub mod events;
pub mod execute;
pub mod object_info;
pub mod plugin;
pub mod serve;
pub mod training;
pub mod ui_workflow;
pub mod validate;
pub mod workflow;

pub use events::{Event, EventSink};
pub use execute::{Executor, OutputCache, RunError, RunSummary};
pub use plugin::{Plugin, PluginError, PluginSet};
pub use validate::{validate, ValidationReport};
pub use workflow::{Input, ParseError, Workflow};
