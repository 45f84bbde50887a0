//! Validation of a whole workflow against the node descriptors, before anything runs.
//!
//! Every problem is reported at once, shaped like ComfyUI's `/prompt` error response:
//! a top-level `error` plus `node_errors` keyed by node id, each entry with the node's
//! `class_type` and a list of `{type, message, details, extra_info: {input_name, ...}}`.

use std::collections::{BTreeMap, BTreeSet};

use serde::Serialize;
use serde_json::{json, Value as Json};
use vdm_ffi::{InputKind, InputSpec, NodeDescriptor};

use crate::plugin::PluginSet;
use crate::workflow::{Input, Workflow};

/// One problem with one node (ComfyUI's error entry).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeIssue {
    /// Machine-readable kind, ComfyUI's names where ComfyUI has one
    /// (`required_input_missing`, `value_bigger_than_max`, `return_type_mismatch`, ...).
    #[serde(rename = "type")]
    pub kind: String,
    pub message: String,
    pub details: String,
    pub extra_info: Json,
}

impl NodeIssue {
    fn new(kind: &str, message: &str, details: String, input: Option<&str>) -> Self {
        let extra_info = match input {
            Some(name) => json!({ "input_name": name }),
            None => json!({}),
        };
        NodeIssue {
            kind: kind.to_owned(),
            message: message.to_owned(),
            details,
            extra_info,
        }
    }

    /// The input this problem is about, if any.
    pub fn input_name(&self) -> Option<&str> {
        self.extra_info.get("input_name").and_then(Json::as_str)
    }
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct NodeErrors {
    pub errors: Vec<NodeIssue>,
    pub dependent_outputs: Vec<String>,
    pub class_type: String,
}

/// The result of validation; empty when the workflow may run.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct ValidationReport {
    pub error: Option<NodeIssue>,
    pub node_errors: BTreeMap<String, NodeErrors>,
}

impl ValidationReport {
    pub fn is_ok(&self) -> bool {
        self.error.is_none() && self.node_errors.is_empty()
    }

    /// The issues of node `id`.
    pub fn issues(&self, id: &str) -> &[NodeIssue] {
        self.node_errors
            .get(id)
            .map(|n| n.errors.as_slice())
            .unwrap_or(&[])
    }

    fn push(&mut self, id: &str, class_type: &str, issue: NodeIssue) {
        self.node_errors
            .entry(id.to_owned())
            .or_insert_with(|| NodeErrors {
                errors: Vec::new(),
                dependent_outputs: Vec::new(),
                class_type: class_type.to_owned(),
            })
            .errors
            .push(issue);
    }

    /// One line per problem, for the terminal.
    pub fn to_text(&self) -> String {
        let mut out = String::new();
        if let Some(e) = &self.error {
            out.push_str(&format!("{}: {}\n", e.message, e.details));
        }
        for (id, node) in &self.node_errors {
            for issue in &node.errors {
                let input = issue
                    .input_name()
                    .map(|i| format!(", input `{i}`"))
                    .unwrap_or_default();
                out.push_str(&format!(
                    "node {id} ({}){input}: {}: {}\n",
                    node.class_type, issue.message, issue.details
                ));
            }
        }
        out
    }
}

/// Validates `workflow` against the nodes of `plugins`.
pub fn validate(workflow: &Workflow, plugins: &PluginSet) -> ValidationReport {
    let mut report = ValidationReport::default();
    for (id, node) in &workflow.nodes {
        let Some((_, descriptor)) = plugins.node(&node.class_type) else {
            report.push(
                id,
                &node.class_type,
                NodeIssue::new(
                    "missing_node_type",
                    "Unknown node type",
                    format!("no loaded plugin provides `{}`", node.class_type),
                    None,
                ),
            );
            continue;
        };
        for issue in validate_node(workflow, plugins, descriptor, &node.inputs) {
            report.push(id, &node.class_type, issue);
        }
    }
    for id in nodes_in_cycles(workflow) {
        let class_type = &workflow.nodes[&id].class_type;
        report.push(
            &id,
            class_type,
            NodeIssue::new(
                "dependency_cycle",
                "Dependency cycle",
                "this node depends on its own output".into(),
                None,
            ),
        );
    }
    let outputs = output_nodes(workflow, plugins);
    if outputs.is_empty() {
        report.error = Some(NodeIssue::new(
            "prompt_no_outputs",
            "Prompt has no outputs",
            "the workflow has no output node (SaveVideo, SaveLatent, ...)".into(),
            None,
        ));
    } else if !report.node_errors.is_empty() {
        for output in &outputs {
            for dep in dependencies(workflow, output) {
                if let Some(entry) = report.node_errors.get_mut(&dep) {
                    entry.dependent_outputs.push(output.clone());
                }
            }
        }
        report.error = Some(NodeIssue::new(
            "prompt_outputs_failed_validation",
            "Prompt outputs failed validation",
            String::new(),
            None,
        ));
    }
    report
}

/// Ids of the output nodes whose class is known.
pub fn output_nodes(workflow: &Workflow, plugins: &PluginSet) -> Vec<String> {
    workflow
        .nodes
        .iter()
        .filter(|(_, n)| {
            plugins
                .node(&n.class_type)
                .is_some_and(|(_, d)| d.output_node)
        })
        .map(|(id, _)| id.clone())
        .collect()
}

/// `root` and every node it depends on through links (links to missing nodes are skipped).
pub fn dependencies(workflow: &Workflow, root: &str) -> BTreeSet<String> {
    let mut seen = BTreeSet::new();
    let mut stack = vec![root.to_owned()];
    while let Some(id) = stack.pop() {
        let Some(node) = workflow.nodes.get(&id) else {
            continue;
        };
        if !seen.insert(id) {
            continue;
        }
        for input in node.inputs.values() {
            if let Input::Link { node, .. } = input {
                stack.push(node.clone());
            }
        }
    }
    seen
}

fn validate_node(
    workflow: &Workflow,
    plugins: &PluginSet,
    descriptor: &NodeDescriptor,
    inputs: &BTreeMap<String, Input>,
) -> Vec<NodeIssue> {
    let mut issues = Vec::new();
    let specs = descriptor
        .required
        .iter()
        .map(|s| (s, true))
        .chain(descriptor.optional.iter().map(|s| (s, false)));
    for (spec, required) in specs {
        match inputs.get(spec.name.as_str()) {
            None if required => issues.push(NodeIssue::new(
                "required_input_missing",
                "Required input is missing",
                spec.name.to_string(),
                Some(&spec.name),
            )),
            None => {}
            Some(Input::Link { node, output }) => {
                issues.extend(check_link(workflow, plugins, spec, node, *output))
            }
            Some(Input::Literal(value)) => issues.extend(check_literal(spec, value).err()),
        }
    }
    for name in inputs.keys() {
        let known = descriptor
            .required
            .iter()
            .chain(descriptor.optional.iter())
            .any(|s| s.name.as_str() == name);
        if !known {
            let names: Vec<&str> = descriptor
                .required
                .iter()
                .chain(descriptor.optional.iter())
                .map(|s| s.name.as_str())
                .collect();
            issues.push(NodeIssue::new(
                "unknown_input",
                "Unknown input",
                format!(
                    "`{name}` is not an input of {} (inputs: {})",
                    descriptor.class_type,
                    names.join(", ")
                ),
                Some(name),
            ));
        }
    }
    issues
}

fn check_link(
    workflow: &Workflow,
    plugins: &PluginSet,
    spec: &InputSpec,
    source: &str,
    output: usize,
) -> Option<NodeIssue> {
    let bad = |details: String| {
        Some(NodeIssue::new(
            "bad_linked_input",
            "Bad linked input",
            details,
            Some(&spec.name),
        ))
    };
    let Some(source_node) = workflow.nodes.get(source) else {
        return bad(format!(
            "{}: links to node `{source}`, which is not in the workflow",
            spec.name
        ));
    };
    // An unknown source class is reported on the source node itself.
    let (_, source_descriptor) = plugins.node(&source_node.class_type)?;
    let Some(out) = source_descriptor.outputs.get(output) else {
        return bad(format!(
            "{}: node {source} ({}) has {} output(s), output {output} does not exist",
            spec.name,
            source_node.class_type,
            source_descriptor.outputs.len()
        ));
    };
    let received = out.type_name.as_str();
    if types_match(received, &spec.kind) {
        None
    } else {
        Some(NodeIssue {
            kind: "return_type_mismatch".into(),
            message: "Return type mismatch between linked nodes".into(),
            details: format!(
                "{}: received_type({received}) mismatch input_type({}) from node {source} ({})",
                spec.name,
                spec.kind.type_name(),
                source_node.class_type
            ),
            extra_info: json!({ "input_name": spec.name.as_str(), "received_type": received, "input_type": spec.kind.type_name(), "linked_node": [source, output] }),
        })
    }
}

/// ComfyUI's rule: equal names, `*` on either side, or a comma-separated union containing the
/// other; a widget input (INT, STRING, ...) accepts a link of its own type, a combo a STRING.
fn types_match(received: &str, kind: &InputKind) -> bool {
    let wanted = kind.type_name();
    if received == "*" || wanted == "*" {
        return true;
    }
    let split = |s: &str| {
        s.split(',')
            .map(|t| t.trim().to_owned())
            .collect::<BTreeSet<_>>()
    };
    let (r, w) = (split(received), split(wanted));
    if r.intersection(&w).next().is_some() {
        return true;
    }
    matches!(kind, InputKind::Combo { .. }) && received == "STRING"
        || matches!(kind, InputKind::Float { .. }) && received == "INT"
}

/// Checks a literal against its input's kind.
pub fn check_literal(spec: &InputSpec, value: &Json) -> Result<(), NodeIssue> {
    let name = spec.name.as_str();
    let wrong_type = |want: &str| {
        Err(NodeIssue::new(
            "invalid_input_type",
            "Invalid input type",
            format!("{name}: expected {want}, got {value}"),
            Some(name),
        ))
    };
    let range = |v: f64, min: f64, max: f64| -> Result<(), NodeIssue> {
        if v < min {
            Err(NodeIssue::new(
                "value_smaller_than_min",
                "Value smaller than min",
                format!("{name}: {v} < {min}"),
                Some(name),
            ))
        } else if v > max {
            Err(NodeIssue::new(
                "value_bigger_than_max",
                "Value bigger than max",
                format!("{name}: {v} > {max}"),
                Some(name),
            ))
        } else {
            Ok(())
        }
    };
    match &spec.kind {
        InputKind::Int { min, max, .. } => match as_integer(value) {
            Some(v) => range(v as f64, *min as f64, *max as f64),
            None => wrong_type("an integer"),
        },
        InputKind::Float { min, max, .. } => match value.as_f64() {
            Some(v) if v.is_finite() => range(v, *min, *max),
            _ => wrong_type("a number"),
        },
        InputKind::Boolean { .. } => match value {
            Json::Bool(_) => Ok(()),
            _ => wrong_type("true or false"),
        },
        InputKind::String { .. } => match value {
            Json::String(_) => Ok(()),
            _ => wrong_type("a string"),
        },
        InputKind::Combo { options, .. } => match value.as_str() {
            Some(s) if options.iter().any(|o| o.as_str() == s) => Ok(()),
            Some(s) => Err(NodeIssue::new(
                "value_not_in_list",
                "Value not in list",
                format!("{name}: '{s}' not in [{}]", options.iter().map(|o| format!("'{o}'")).collect::<Vec<_>>().join(", ")),
                Some(name),
            )),
            None => wrong_type("one of the listed strings"),
        },
        InputKind::Object { type_name } => Err(NodeIssue::new(
            "invalid_input_type",
            "Invalid input type",
            format!("{name}: a {type_name} comes from another node's output (a [\"id\", index] link), not a literal"),
            Some(name),
        )),
    }
}

/// An integer literal: a JSON integer, or a float with no fractional part (ComfyUI's UI
/// writes some INT widgets as `8.0`).
pub fn as_integer(value: &Json) -> Option<i64> {
    value.as_i64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && f.abs() < 9.0e15)
            .map(|f| f as i64)
    })
}

/// Nodes that lie on a cycle of links (sorted).
fn nodes_in_cycles(workflow: &Workflow) -> Vec<String> {
    // Tarjan-free approach: a node is on a cycle iff it can reach itself.
    workflow
        .nodes
        .keys()
        .filter(|id| {
            let node = &workflow.nodes[*id];
            node.inputs.values().any(|input| match input {
                Input::Link { node: src, .. } => dependencies(workflow, src).contains(*id),
                Input::Literal(_) => false,
            })
        })
        .cloned()
        .collect()
}
