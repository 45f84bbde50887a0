//! Exports the current layout but announces a later interface version, as a plugin built
//! for a newer host would: the host must refuse it by the handshake, not crash.

use abi_stable::{
    export_root_module,
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, RResult, RString, RVec},
};
use vdm_ffi::{
    ErrorKind, ExecuteRequest, NodeDescriptor, NodeError, NodeOutput, PluginMod, PluginModRef,
};

#[export_root_module]
pub fn root() -> PluginModRef {
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
    vdm_ffi::INTERFACE_VERSION + 1
}

extern "C" fn features() -> RVec<RString> {
    RVec::new()
}

extern "C" fn plugin_name() -> RString {
    "vdm-test-plugin-future".into()
}

extern "C" fn nodes() -> RVec<NodeDescriptor> {
    RVec::new()
}

extern "C" fn execute(request: ExecuteRequest<'_>) -> RResult<NodeOutput, NodeError> {
    RErr(NodeError {
        kind: ErrorKind::Execution,
        node_id: request.node_id.into(),
        class_type: request.class_type.into(),
        input: abi_stable::std_types::RNone,
        message: "not runnable".into(),
    })
}

extern "C" fn check(_: ExecuteRequest<'_>) -> RVec<NodeError> {
    RVec::new()
}
