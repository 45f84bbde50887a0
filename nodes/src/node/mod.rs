//! The nodes: each family in its own file, a declarative descriptor plus an `execute` that
//! converts ABI values, calls the domain code and converts back.
//!
//! This module holds what every node shares: the [`Node`] trait, typed access to inputs with
//! errors that name the input, the objects that travel as handles, and the registry.

mod comfy;
mod demo;
mod editing;
mod entropy;
mod latent;
pub mod memory;
mod models;
mod motion;
mod noise;
pub mod objects;
mod sampler;
mod spec;
mod train;
mod video_io;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use abi_stable::std_types::{RNone, RSome, RStr, RString, RVec};
use candle_core::Device;
use vdm_ffi::{
    ErrorKind, Handle, HostContext_TO, NamedValue, NodeDescriptor, NodeError, PluginObject, Value,
};

pub use objects::{Images, Latent};
pub use spec::DescriptorBuilder;

/// A node: what it declares, and how it runs.
pub trait Node: Send + Sync {
    fn descriptor(&self) -> NodeDescriptor;
    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure>;

    /// What can be seen wrong before anything runs, from the literal inputs alone (linked
    /// inputs are absent here): a named file that does not exist, say. Every problem is listed,
    /// so that a workflow's come back together.
    fn check(&self, _inputs: &Inputs, _ctx: &Context) -> Vec<NodeFailure> {
        Vec::new()
    }
}

/// Every node of the plugin, built once.
pub fn registry() -> &'static [Box<dyn Node>] {
    static NODES: OnceLock<Vec<Box<dyn Node>>> = OnceLock::new();
    NODES.get_or_init(|| {
        let mut nodes: Vec<Box<dyn Node>> = Vec::new();
        nodes.extend(noise::nodes());
        nodes.extend(latent::nodes());
        nodes.extend(video_io::nodes());
        nodes.extend(motion::nodes());
        nodes.extend(models::nodes());
        nodes.extend(sampler::nodes());
        nodes.extend(entropy::nodes());
        nodes.extend(editing::nodes());
        nodes.extend(train::nodes());
        nodes.extend(demo::nodes());
        nodes.extend(comfy::nodes());
        nodes
    })
}

/// Looks a node up by its `class_type`.
pub fn find(class_type: &str) -> Option<&'static dyn Node> {
    registry()
        .iter()
        .find(|n| n.descriptor().class_type.as_str() == class_type)
        .map(|n| n.as_ref())
}

/// Why a node failed, before the boundary adds the node id and class.
#[derive(Debug, Clone, PartialEq)]
pub struct NodeFailure {
    pub kind: ErrorKind,
    pub input: Option<String>,
    pub message: String,
}

impl NodeFailure {
    /// The value given for `input` is unusable.
    pub fn input(input: &str, message: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::InvalidInput,
            input: Some(input.to_owned()),
            message: message.to_string(),
        }
    }

    /// The node failed while running.
    pub fn execution(message: impl std::fmt::Display) -> Self {
        Self {
            kind: ErrorKind::Execution,
            input: None,
            message: message.to_string(),
        }
    }

    pub fn cancelled() -> Self {
        Self {
            kind: ErrorKind::Cancelled,
            input: None,
            message: "cancelled".to_owned(),
        }
    }

    pub fn into_error(self, node_id: &str, class_type: &str) -> NodeError {
        NodeError {
            kind: self.kind,
            node_id: node_id.into(),
            class_type: class_type.into(),
            input: self.input.map(RString::from).into(),
            message: self.message.into(),
        }
    }
}

impl From<candle_core::Error> for NodeFailure {
    fn from(e: candle_core::Error) -> Self {
        Self::execution(without_backtrace(e))
    }
}

/// `error` without the backtrace candle attaches when `RUST_BACKTRACE` is set: a node error is
/// a message for the user, not a crash report.
pub fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    use candle_core::Error;
    match error {
        Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        Error::Context { inner, context } => Error::Context {
            inner: Box::new(without_backtrace(*inner)),
            context,
        },
        Error::WithPath { inner, path } => Error::WithPath {
            inner: Box::new(without_backtrace(*inner)),
            path,
        },
        other => other,
    }
}

/// Attaches the input name to errors of a fallible call about that input.
pub trait ForInput<T> {
    fn for_input(self, input: &str) -> Result<T, NodeFailure>;
}

impl<T, E: std::fmt::Display> ForInput<T> for Result<T, E> {
    fn for_input(self, input: &str) -> Result<T, NodeFailure> {
        self.map_err(|e| NodeFailure::input(input, e))
    }
}

/// The inputs of one call, by name.
pub struct Inputs {
    values: Vec<NamedValue>,
}

impl Inputs {
    pub fn new(values: RVec<NamedValue>) -> Self {
        Self {
            values: values.into_vec(),
        }
    }

    /// The raw value of `name`, if given.
    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values
            .iter()
            .find(|v| v.name.as_str() == name)
            .map(|v| &v.value)
    }

    fn required(&self, name: &str) -> Result<&Value, NodeFailure> {
        self.get(name)
            .ok_or_else(|| NodeFailure::input(name, "required input is missing"))
    }

    fn mismatch(name: &str, want: &str, got: &Value) -> NodeFailure {
        NodeFailure::input(name, format!("expected {want}, got {}", got.kind_name()))
    }

    pub fn int(&self, name: &str) -> Result<i64, NodeFailure> {
        match self.required(name)? {
            Value::Int(v) => Ok(*v),
            other => Err(Self::mismatch(name, "INT", other)),
        }
    }

    /// A seed input (declared with `DescriptorBuilder::seed`): its u64 crosses as the i64 of
    /// the same bits.
    pub fn seed(&self, name: &str) -> Result<u64, NodeFailure> {
        Ok(self.int(name)? as u64)
    }

    /// An INT that must fit in `usize` (sizes, counts).
    pub fn usize(&self, name: &str) -> Result<usize, NodeFailure> {
        let v = self.int(name)?;
        usize::try_from(v).map_err(|_| NodeFailure::input(name, format!("{v} is negative")))
    }

    /// An optional usize input, or `default` when it is not given.
    pub fn usize_or(&self, name: &str, default: usize) -> Result<usize, NodeFailure> {
        match self.get(name) {
            Some(_) => self.usize(name),
            None => Ok(default),
        }
    }

    /// An optional BOOLEAN input, or `default` when it is not given.
    pub fn bool_or(&self, name: &str, default: bool) -> Result<bool, NodeFailure> {
        match self.get(name) {
            Some(_) => self.bool(name),
            None => Ok(default),
        }
    }

    pub fn float(&self, name: &str) -> Result<f64, NodeFailure> {
        match self.required(name)? {
            Value::Float(v) => Ok(*v),
            Value::Int(v) => Ok(*v as f64),
            other => Err(Self::mismatch(name, "FLOAT", other)),
        }
    }

    /// An optional FLOAT input, or `default` when it is not given.
    pub fn float_or(&self, name: &str, default: f64) -> Result<f64, NodeFailure> {
        match self.get(name) {
            Some(_) => self.float(name),
            None => Ok(default),
        }
    }

    pub fn bool(&self, name: &str) -> Result<bool, NodeFailure> {
        match self.required(name)? {
            Value::Bool(v) => Ok(*v),
            other => Err(Self::mismatch(name, "BOOLEAN", other)),
        }
    }

    pub fn string(&self, name: &str) -> Result<&str, NodeFailure> {
        match self.required(name)? {
            Value::Str(v) => Ok(v.as_str()),
            other => Err(Self::mismatch(name, "STRING", other)),
        }
    }

    /// A plugin object of type `T` on input `name`, produced by this plugin.
    pub fn object<T: PluginType>(&self, name: &str) -> Result<T, NodeFailure> {
        match self.required(name)? {
            Value::Handle(handle) if handle.type_tag.as_str() != T::TYPE_TAG => {
                Err(NodeFailure::input(
                    name,
                    format!("expected {}, got {}", T::TYPE_TAG, handle.type_tag),
                ))
            }
            Value::Handle(handle) => T::from_handle(handle).ok_or_else(|| {
                let made_by = handle.object.describe();
                NodeFailure::input(
                    name,
                    format!("this {made_by} was made by another plugin and cannot be read here"),
                )
            }),
            Value::Tensor(tensor) => T::from_host_tensor(tensor).for_input(name),
            other => Err(Self::mismatch(name, T::TYPE_TAG, other)),
        }
    }

    /// Like [`Inputs::object`], for an optional input.
    pub fn optional_object<T: PluginType>(&self, name: &str) -> Result<Option<T>, NodeFailure> {
        match self.get(name) {
            None => Ok(None),
            Some(_) => self.object(name).map(Some),
        }
    }
}

/// A plugin-owned value type that travels as a [`Handle`] tagged with its socket type.
pub trait PluginType: PluginObject + Clone + Send + Sync + std::fmt::Debug + 'static {
    const TYPE_TAG: &'static str;

    fn into_value(self) -> Value {
        let object = vdm_ffi::PluginObject_TO::from_ptr(
            abi_stable::std_types::RArc::new(self),
            abi_stable::sabi_trait::TD_CanDowncast,
        );
        Value::Handle(Handle {
            type_tag: Self::TYPE_TAG.into(),
            object,
        })
    }

    fn from_handle(handle: &Handle) -> Option<Self> {
        if handle.type_tag.as_str() != Self::TYPE_TAG {
            return None;
        }
        handle.object.obj.downcast_as::<Self>().ok().cloned()
    }

    /// Accepts the same value sent as a host tensor (from the host or another plugin).
    fn from_host_tensor(_tensor: &vdm_ffi::HostTensor) -> Result<Self, String> {
        Err(format!(
            "{} cannot be given as a plain tensor",
            Self::TYPE_TAG
        ))
    }
}

/// What a node returns: its output values and, for output nodes, the UI JSON.
#[derive(Default)]
pub struct Outputs {
    pub values: Vec<Value>,
    pub ui: Option<serde_json::Value>,
}

impl Outputs {
    pub fn one(value: Value) -> Self {
        Self {
            values: vec![value],
            ui: None,
        }
    }
}

/// The longer side of a sampling preview, in pixels (ComfyUI's default `--preview-size`).
const PREVIEW_MAX_SIDE: usize = 512;

/// The host side of a call: progress, cancellation, settings and previews.
pub struct Context<'a> {
    host: HostContext_TO<'a, abi_stable::sabi_types::RRef<'a, ()>>,
}

impl<'a> Context<'a> {
    pub fn new(host: HostContext_TO<'a, abi_stable::sabi_types::RRef<'a, ()>>) -> Self {
        Self { host }
    }

    pub fn progress(&self, step: u64, total: u64, text: &str) {
        self.host.progress(step, total, RStr::from(text));
    }

    /// Returns `Err(cancelled)` once the user asked to stop.
    pub fn check_cancelled(&self) -> Result<(), NodeFailure> {
        if self.host.cancelled() {
            Err(NodeFailure::cancelled())
        } else {
            Ok(())
        }
    }

    pub fn setting(&self, key: &str) -> Option<String> {
        match self.host.setting(RStr::from(key)) {
            RSome(v) => Some(v.into_string()),
            RNone => None,
        }
    }

    /// Sends the host a preview of `latents` being sampled (the first frame as a PNG), when it
    /// asked for previews with its `previews` setting. A latent the preview cannot show (not 4
    /// channels) sends nothing.
    pub fn preview_latents(&self, latents: &candle_core::Tensor) {
        if self.previews_wanted() {
            if let Ok(png) = crate::video::preview::preview_png(latents, PREVIEW_MAX_SIDE) {
                self.host
                    .preview(abi_stable::std_types::RSlice::from_slice(&png));
            }
        }
    }

    fn previews_wanted(&self) -> bool {
        self.setting("previews")
            .is_some_and(|value| !matches!(value.as_str(), "" | "0" | "off" | "none"))
    }

    /// Where output nodes write: the host's `output_dir`, else the current folder.
    pub fn output_dir(&self) -> PathBuf {
        self.setting("output_dir")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
    }

    /// How much a node may allocate on `device` (see [`memory`]).
    pub fn memory_budget(&self, device: &Device) -> memory::MemoryBudget {
        memory::MemoryBudget::for_device(self, device)
    }

    /// The device nodes compute on: the host's `device` setting (`cpu`, `cuda`, `cuda:N`),
    /// else CUDA when this build has it and a GPU is present, else the CPU.
    pub fn device(&self) -> Result<Device, NodeFailure> {
        let wanted = self.setting("device").unwrap_or_else(|| "auto".to_owned());
        parse_device(&wanted).map_err(NodeFailure::execution)
    }
}

/// `auto`, `cpu`, `cuda` or `cuda:N` to a candle device.
pub fn parse_device(name: &str) -> Result<Device, String> {
    match name {
        "cpu" => Ok(Device::Cpu),
        "auto" => Ok(Device::cuda_if_available(0).unwrap_or(Device::Cpu)),
        "cuda" => Device::new_cuda(0).map_err(|e| format!("CUDA device unavailable: {e}")),
        other => match other
            .strip_prefix("cuda:")
            .and_then(|n| n.parse::<usize>().ok())
        {
            Some(ordinal) => Device::new_cuda(ordinal)
                .map_err(|e| format!("CUDA device {ordinal} unavailable: {e}")),
            None => Err(format!(
                "unknown device `{other}` (expected auto, cpu, cuda or cuda:N)"
            )),
        },
    }
}

/// A user-given path: absolute, or relative to the host's input folder when it has one.
pub(crate) fn resolve_input_path(ctx: &Context, given: &str) -> PathBuf {
    let path = PathBuf::from(given);
    match ctx.setting("input_dir") {
        Some(dir) if path.is_relative() && !path.exists() => Path::new(&dir).join(path),
        _ => path,
    }
}

/// The check of an input naming a file to read (under the input folder when relative): that
/// the file exists, when the input is a literal.
pub(crate) fn check_input_file(inputs: &Inputs, ctx: &Context, input: &str) -> Vec<NodeFailure> {
    let Some(Value::Str(given)) = inputs.get(input) else {
        return Vec::new();
    };
    let path = resolve_input_path(ctx, given);
    if path.exists() {
        Vec::new()
    } else {
        vec![NodeFailure::input(
            input,
            format!("`{given}` not found (looked at {})", path.display()),
        )]
    }
}

/// The check of a literal `filename_prefix`: that it names a file inside the output folder.
pub(crate) fn check_filename_prefix(inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
    let Some(Value::Str(prefix)) = inputs.get("filename_prefix") else {
        return Vec::new();
    };
    match crate::video::io::resolve_prefix(&ctx.output_dir(), prefix) {
        Ok(_) => Vec::new(),
        Err(e) => vec![NodeFailure::input("filename_prefix", e.to_string())],
    }
}

/// The failure of a save: the prefix's own problems are the `filename_prefix` input's.
pub(crate) fn save_failure(error: crate::video::io::MediaError) -> NodeFailure {
    match error {
        crate::video::io::MediaError::Prefix { .. } => {
            NodeFailure::input("filename_prefix", error.to_string())
        }
        other => NodeFailure::execution(other),
    }
}

/// The failure for an error of a long computation: cancelled when the user asked to stop.
pub(crate) fn cancelled_or(ctx: &Context, error: candle_core::Error) -> NodeFailure {
    match ctx.check_cancelled() {
        Err(cancelled) => cancelled,
        Ok(()) => NodeFailure::from(error),
    }
}

/// ComfyUI's description of a written file: name, subfolder of the output folder, type.
pub(crate) fn file_entry(out_dir: &Path, path: &Path) -> serde_json::Value {
    let relative = path.strip_prefix(out_dir).unwrap_or(path);
    let subfolder = relative
        .parent()
        .map(|p| p.to_string_lossy().into_owned())
        .unwrap_or_default();
    let filename = path
        .file_name()
        .map(|f| f.to_string_lossy().into_owned())
        .unwrap_or_default();
    serde_json::json!({ "filename": filename, "subfolder": subfolder, "type": "output", "fullpath": path.to_string_lossy() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn node_errors_carry_no_backtrace() {
        let error = candle_core::Error::WithBacktrace {
            inner: Box::new(candle_core::Error::Msg("shapes differ".into())),
            backtrace: Box::new(std::backtrace::Backtrace::force_capture()),
        }
        .context("in the VAE");
        let failure = NodeFailure::from(error);
        assert_eq!(failure.message, "in the VAE\nshapes differ");
    }
}
