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

use candle_core::{DType, Tensor};
use vdm_ffi::Value;

use crate::node::{self, Context, Images, Inputs, Latent, NodeFailure, PluginType};

#[export_root_module]
pub fn plugin_root_module() -> PluginModRef {
    PluginMod {
        interface_version,
        features,
        plugin_name,
        nodes,
        execute,
        check,
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
    check_finite(&outputs.values, &ctx)?;
    let ui_json = outputs.ui.map(|ui| ui.to_string()).unwrap_or_default();
    Ok(NodeOutput {
        values: outputs.values.into(),
        ui_json: ui_json.into(),
    })
}

extern "C" fn check(request: ExecuteRequest<'_>) -> RVec<NodeError> {
    let class_type = request.class_type.as_str().to_owned();
    let node_id = request.node_id.as_str().to_owned();
    let ExecuteRequest { inputs, host, .. } = request;
    let failures = catch_unwind(AssertUnwindSafe(|| match node::find(&class_type) {
        Some(node) => node.check(&Inputs::new(inputs), &Context::new(host)),
        None => Vec::new(),
    }))
    .unwrap_or_else(|payload| {
        vec![NodeFailure {
            kind: ErrorKind::Panic,
            input: None,
            message: panic_message(&*payload),
        }]
    });
    failures
        .into_iter()
        .map(|f| f.into_error(&node_id, &class_type))
        .collect()
}

/// A NaN or infinite value in output latents or frames is an error of the node that made them
/// (a diverging sampler, half precision overflowing), found where it arises rather than as a
/// black video later; with the host's `allow_non_finite` setting it is only a warning.
fn check_finite(values: &[Value], ctx: &Context) -> Result<(), NodeFailure> {
    for (index, value) in values.iter().enumerate() {
        let Value::Handle(handle) = value else {
            continue;
        };
        let tensor = Latent::from_handle(handle)
            .map(|latent| latent.samples)
            .or_else(|| Images::from_handle(handle).map(|images| images.frames));
        let Some(tensor) = tensor else {
            continue;
        };
        let count = non_finite_count(&tensor)?;
        if count == 0 {
            continue;
        }
        let message = format!(
            "output {index} ({}) holds NaN or infinite values: {count} of {} (a diverging \
             sampler, or a model overflowing in half precision?)",
            handle.type_tag,
            tensor.elem_count()
        );
        if ctx.setting("allow_non_finite").as_deref() == Some("true") {
            eprintln!("warning: {message}");
        } else {
            return Err(NodeFailure::execution(format!(
                "{message}; run with --allow-non-finite to keep them"
            )));
        }
    }
    Ok(())
}

/// How many elements of `tensor` are NaN or infinite.
fn non_finite_count(tensor: &Tensor) -> candle_core::Result<usize> {
    // |x| ≤ f32::MAX holds for every finite x and fails for ±∞ and NaN.
    let finite = tensor
        .to_dtype(DType::F32)?
        .abs()?
        .le(f64::from(f32::MAX))?
        .to_dtype(DType::U32)?
        .sum_all()?
        .to_scalar::<u32>()? as usize;
    Ok(tensor.elem_count() - finite)
}

fn panic_message(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload
        .downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| payload.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "unknown cause".to_owned());
    format!("panicked: {text}")
}
