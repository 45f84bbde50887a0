//! Node descriptors as ComfyUI's `/object_info` returns them, so tools of that ecosystem can
//! read vdm's nodes.

use serde_json::{json, Map, Value as Json};
use vdm_ffi::{InputKind, InputSpec, NodeDescriptor};

/// `{class_type: info, ...}` for every descriptor.
pub fn object_info<'a>(
    descriptors: impl IntoIterator<Item = &'a NodeDescriptor>,
    module: &str,
) -> Json {
    let map: Map<String, Json> = descriptors
        .into_iter()
        .map(|d| (d.class_type.to_string(), node_info(d, module)))
        .collect();
    Json::Object(map)
}

pub fn node_info(d: &NodeDescriptor, module: &str) -> Json {
    let inputs = |specs: &[InputSpec]| -> Map<String, Json> {
        specs
            .iter()
            .map(|s| (s.name.to_string(), input_info(s)))
            .collect()
    };
    let names = |specs: &[InputSpec]| specs.iter().map(|s| s.name.to_string()).collect::<Vec<_>>();
    json!({
        "input": { "required": inputs(&d.required), "optional": inputs(&d.optional) },
        "input_order": { "required": names(&d.required), "optional": names(&d.optional) },
        "output": d.outputs.iter().map(|o| o.type_name.to_string()).collect::<Vec<_>>(),
        "output_is_list": d.outputs.iter().map(|_| false).collect::<Vec<_>>(),
        "output_name": d.outputs.iter().map(|o| o.name.to_string()).collect::<Vec<_>>(),
        "name": d.class_type.as_str(),
        "display_name": d.display_name.as_str(),
        "description": d.description.as_str(),
        "python_module": module,
        "category": d.category.as_str(),
        "output_node": d.output_node,
    })
}

fn input_info(spec: &InputSpec) -> Json {
    let mut options = match &spec.kind {
        kind @ InputKind::Int { default, step, .. } if kind.is_unsigned_int() => {
            json!({"default": *default as u64, "min": 0, "max": u64::MAX, "step": step, "control_after_generate": true})
        }
        InputKind::Int {
            default,
            min,
            max,
            step,
        } => json!({"default": default, "min": min, "max": max, "step": step}),
        InputKind::Float {
            default,
            min,
            max,
            step,
        } => json!({"default": default, "min": min, "max": max, "step": step}),
        InputKind::Boolean { default } => json!({"default": default}),
        InputKind::String { default, multiline } => {
            json!({"default": default.as_str(), "multiline": multiline})
        }
        InputKind::Combo { default, .. } => json!({"default": default.as_str()}),
        InputKind::Object { .. } => json!({}),
    };
    if !spec.tooltip.is_empty() {
        options["tooltip"] = json!(spec.tooltip.as_str());
    }
    let type_field = match &spec.kind {
        InputKind::Combo { options, .. } => {
            json!(options.iter().map(|o| o.as_str()).collect::<Vec<_>>())
        }
        kind => json!(kind.type_name()),
    };
    json!([type_field, options])
}
