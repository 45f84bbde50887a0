//! The plugin's root module: the only functions the host calls. Each catches panics, so a
//! bug in a node becomes an error for that node and never unwinds into the host.

use std::panic::{catch_unwind, AssertUnwindSafe};

use abi_stable::{
    export_root_module,
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, ROk, RResult, RString, RVec},
};
use vdm_ffi::{
    ErrorKind, ExecuteRequest, NodeDescriptor, NodeError, NodeOutput, PluginMod, PluginModRef,
};

use crate::node::{self, Context, Inputs, NodeFailure};

#[export_root_module]
pub fn plugin_root_module() -> PluginModRef {
    PluginMod {
        interface_version,
        features,
        plugin_name,
        nodes,
        execute,
    }
    .leak_into_prefix()
}

extern "C" fn interface_version() -> u32 {
    vdm_ffi::INTERFACE_VERSION
}

extern "C" fn features() -> RVec<RString> {
    let mut features: Vec<RString> = vdm_ffi::INTERFACE_FEATURES
        .iter()
        .map(|f| RString::from(*f))
        .collect();
    if cfg!(feature = "cuda") {
        features.push("cuda".into());
    }
    features.into()
}

extern "C" fn plugin_name() -> RString {
    concat!(env!("CARGO_PKG_NAME"), " ", env!("CARGO_PKG_VERSION")).into()
}

extern "C" fn nodes() -> RVec<NodeDescriptor> {
    // Descriptors are static data; a panic here would be a bug in a builder, so an empty list
    // (the host then reports no nodes from this plugin) is the safe answer.
    catch_unwind(|| node::registry().iter().map(|n| n.descriptor()).collect()).unwrap_or_default()
}

extern "C" fn execute(request: ExecuteRequest<'_>) -> RResult<NodeOutput, NodeError> {
    let class_type = request.class_type.as_str().to_owned();
    let node_id = request.node_id.as_str().to_owned();
    let result = catch_unwind(AssertUnwindSafe(|| run(request)));
    let failure = match result {
        Ok(Ok(output)) => return ROk(output),
        Ok(Err(failure)) => failure,
        Err(payload) => NodeFailure {
            kind: ErrorKind::Panic,
            input: None,
            message: panic_message(&*payload),
        },
    };
    RErr(failure.into_error(&node_id, &class_type))
}

fn run(request: ExecuteRequest<'_>) -> Result<NodeOutput, NodeFailure> {
    let ExecuteRequest {
        class_type,
        inputs,
        host,
        ..
    } = request;
    let node = node::find(class_type.as_str())
        .ok_or_else(|| NodeFailure::execution(format!("this plugin has no node `{class_type}`")))?;
    let inputs = Inputs::new(inputs);
    let ctx = Context::new(host);
    let outputs = node.execute(&inputs, &ctx)?;
    let ui_json = outputs.ui.map(|ui| ui.to_string()).unwrap_or_default();
    Ok(NodeOutput {
        values: outputs.values.into(),
        ui_json: ui_json.into(),
    })
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    format!("panicked: {text}")
}
