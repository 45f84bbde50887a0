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
use crate::workflow::{Input, Workflow, WorkflowNode};

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
    /// What is ignored rather than refused, one line each naming the node: inputs a node does
    /// not have (ComfyUI ignores them too, and older workflows carry removed inputs).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
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

/// One line per input that a node's class does not declare, naming the node: such inputs are
/// ignored (as ComfyUI ignores them; older workflows carry inputs that were removed since).
pub fn ignored_inputs(workflow: &Workflow, plugins: &PluginSet) -> Vec<String> {
    let mut warnings = Vec::new();
    for (id, node) in &workflow.nodes {
        let Some((_, descriptor)) = plugins.node(&node.class_type) else {
            continue;
        };
        for name in unknown_inputs(descriptor, &node.inputs) {
            warnings.push(format!(
                "node {id} ({}): `{name}` is not an input of this node and is ignored",
                node.class_type
            ));
        }
    }
    warnings
}

/// The inputs of a node that its class does not declare.
fn unknown_inputs<'a>(
    descriptor: &NodeDescriptor,
    inputs: &'a BTreeMap<String, Input>,
) -> impl Iterator<Item = &'a str> + 'a {
    let declared: BTreeSet<String> = descriptor
        .required
        .iter()
        .chain(descriptor.optional.iter())
        .map(|s| s.name.to_string())
        .collect();
    inputs
        .keys()
        .filter(move |name| !declared.contains(name.as_str()))
        .map(String::as_str)
}

/// Node packs whose classes are recognisable by name, for the message about a missing class.
const NODE_PACKS: [(&str, &str); 8] = [
    ("ADE_", "ComfyUI-AnimateDiff-Evolved"),
    ("VHS_", "ComfyUI-VideoHelperSuite"),
    ("ACN_", "ComfyUI-Advanced-ControlNet"),
    ("IPAdapter", "ComfyUI_IPAdapter_plus"),
    ("easy ", "ComfyUI-Easy-Use"),
    ("Impact", "ComfyUI-Impact-Pack"),
    ("BatchPromptSchedule", "ComfyUI_FizzNodes"),
    ("CR ", "ComfyUI_Comfyroll_CustomNodes"),
];

/// Why a class is missing: no plugin provides it, and the node pack it probably comes from.
fn missing_class_details(class_type: &str) -> String {
    let pack = NODE_PACKS
        .iter()
        .find(|(prefix, _)| class_type.starts_with(prefix))
        .map(|(_, pack)| *pack)
        .or_else(|| {
            class_type
                .ends_with("|pysssss")
                .then_some("ComfyUI-Custom-Scripts")
        })
        .or_else(|| class_type.ends_with("(rgthree)").then_some("rgthree-comfy"));
    match pack {
        Some(pack) => format!(
            "no loaded plugin provides `{class_type}` (by its name, a node of the {pack} pack)"
        ),
        None => format!("no loaded plugin provides `{class_type}`"),
    }
}

/// Validates `workflow` against the nodes of `plugins`.
pub fn validate(workflow: &Workflow, plugins: &PluginSet) -> ValidationReport {
    validate_with(workflow, plugins, |_, _| Vec::new())
}

/// What a plugin's own check of a node found: (the input at fault, if one is; the problem).
pub type CheckedIssue = (Option<String>, String);

/// Validates `workflow` against the nodes of `plugins`, asking `check` about each node that
/// passed the descriptor checks (the plugin's own checks: files that must exist, ...).
pub fn validate_with(
    workflow: &Workflow,
    plugins: &PluginSet,
    mut check: impl FnMut(&str, &WorkflowNode) -> Vec<CheckedIssue>,
) -> ValidationReport {
    let mut report = ValidationReport {
        warnings: ignored_inputs(workflow, plugins),
        ..ValidationReport::default()
    };
    for (id, node) in &workflow.nodes {
        let Some((_, descriptor)) = plugins.node(&node.class_type) else {
            report.push(
                id,
                &node.class_type,
                NodeIssue::new(
                    "missing_node_type",
                    "Unknown node type",
                    missing_class_details(&node.class_type),
                    None,
                ),
            );
            continue;
        };

        let issues = validate_node(workflow, plugins, descriptor, &node.inputs);
        let issues = if issues.is_empty() {
            check(id, node)
                .into_iter()
                .map(|(input, message)| {
                    NodeIssue::new(
                        "custom_validation_failed",
                        "Failed custom validation",
                        message,
                        input.as_deref(),
                    )
                })
                .collect()
        } else {
            issues
        };
        for issue in issues {
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
            "the workflow has no output node (SaveVideoFile, SaveLatent, ...)".into(),
            None,
        ));
    } else if !report.node_errors.is_empty() {
        let graph = LinkGraph::new(workflow);
        for output in &outputs {
            let Some(root) = graph.index_of(output) else {
                continue;
            };
            for (i, needed) in graph.needed_by(&[root]).into_iter().enumerate() {
                if let Some(entry) = needed
                    .then(|| report.node_errors.get_mut(graph.ids[i].as_str()))
                    .flatten()
                {
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
    if let Some(why) = plugins.none_found() {
        report.error = Some(NodeIssue::new(
            "no_plugins_loaded",
            "No plugins loaded",
            why,
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
        kind if kind.is_unsigned_int() => match (as_unsigned(value), as_integer(value)) {
            (Some(_), _) => Ok(()),
            (None, Some(negative)) => range(negative as f64, 0.0, u64::MAX as f64),
            (None, None) => wrong_type("an integer from 0 to 18446744073709551615"),
        },
        InputKind::Int {
            min, max, step, ..
        } => match as_integer(value) {
            Some(v) => range(v as f64, *min as f64, *max as f64)
                .and_then(|()| on_step(name, v, *min, *step)),
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

/// An integer input with a step above 1 (a size that must divide evenly, say) takes only
/// min + k·step: other values are refused rather than silently rounded.
fn on_step(name: &str, value: i64, min: i64, step: i64) -> Result<(), NodeIssue> {
    // In i128: a descriptor's range may span more than i64 holds.
    let (value, min, step) = (i128::from(value), i128::from(min), i128::from(step));
    if step <= 1 || (value - min).rem_euclid(step) == 0 {
        return Ok(());
    }
    let below = value - (value - min).rem_euclid(step);
    let steps = if min.rem_euclid(step) == 0 {
        format!("a multiple of {step}")
    } else {
        format!("{min} plus a multiple of {step}")
    };
    Err(NodeIssue::new(
        "value_not_on_step",
        "Value not on the input's step",
        format!(
            "{name}: {value} is not {steps}; the nearest allowed values are {below} and {}",
            below + step
        ),
        Some(name),
    ))
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

/// An integer literal of the u64 range: a JSON integer from 0 to 2⁶⁴ − 1, or a float with no
/// fractional part within it.
pub fn as_unsigned(value: &Json) -> Option<u64> {
    value.as_u64().or_else(|| {
        value
            .as_f64()
            .filter(|f| f.fract() == 0.0 && *f >= 0.0 && *f < 9.0e15)
            .map(|f| f as u64)
    })
}

/// Nodes that lie on a cycle of links (sorted), in time linear in the size of the graph.
fn nodes_in_cycles(workflow: &Workflow) -> Vec<String> {
    let graph = LinkGraph::new(workflow);
    let mut on_cycle: Vec<usize> = graph
        .strongly_connected_components()
        .into_iter()
        .filter(|component| match component.as_slice() {
            [single] => graph.sources[*single].contains(single),
            _ => true,
        })
        .flatten()
        .collect();
    on_cycle.sort_unstable();
    on_cycle.into_iter().map(|i| graph.ids[i].clone()).collect()
}

/// The workflow's links as adjacency lists over node indices (in id order): `sources[i]` are
/// the nodes whose outputs node `i` reads, each once; links to missing nodes are left out.
pub(crate) struct LinkGraph<'w> {
    pub ids: Vec<&'w String>,
    pub sources: Vec<Vec<usize>>,
}

impl<'w> LinkGraph<'w> {
    pub fn new(workflow: &'w Workflow) -> Self {
        let ids: Vec<&String> = workflow.nodes.keys().collect();
        let index: std::collections::HashMap<&str, usize> = ids
            .iter()
            .enumerate()
            .map(|(i, id)| (id.as_str(), i))
            .collect();
        let sources = workflow
            .nodes
            .values()
            .map(|node| {
                let mut sources: Vec<usize> = node
                    .inputs
                    .values()
                    .filter_map(|input| match input {
                        Input::Link { node, .. } => index.get(node.as_str()).copied(),
                        Input::Literal(_) => None,
                    })
                    .collect();
                sources.sort_unstable();
                sources.dedup();
                sources
            })
            .collect();
        Self { ids, sources }
    }

    /// Whether each node is one of `roots` or something they depend on through links.
    pub fn needed_by(&self, roots: &[usize]) -> Vec<bool> {
        let mut needed = vec![false; self.ids.len()];
        let mut stack = roots.to_vec();
        while let Some(node) = stack.pop() {
            if !std::mem::replace(&mut needed[node], true) {
                stack.extend(&self.sources[node]);
            }
        }
        needed
    }

    pub fn index_of(&self, id: &str) -> Option<usize> {
        self.ids
            .binary_search_by(|probe| probe.as_str().cmp(id))
            .ok()
    }

    /// The strongly connected components (Tarjan's algorithm, iterative so that a chain of
    /// 100,000 nodes does not overflow the stack).
    fn strongly_connected_components(&self) -> Vec<Vec<usize>> {
        const UNVISITED: usize = usize::MAX;
        let n = self.ids.len();
        let mut order = vec![UNVISITED; n];
        let mut low = vec![0; n];
        let mut on_stack = vec![false; n];
        let mut stack = Vec::new();
        let mut components = Vec::new();
        let mut next = 0;
        // (node, how many of its sources have been explored)
        let mut calls: Vec<(usize, usize)> = Vec::new();
        for root in 0..n {
            if order[root] != UNVISITED {
                continue;
            }
            calls.push((root, 0));
            while let Some(&mut (node, ref mut explored)) = calls.last_mut() {
                if *explored == 0 {
                    order[node] = next;
                    low[node] = next;
                    next += 1;
                    stack.push(node);
                    on_stack[node] = true;
                }
                if let Some(&source) = self.sources[node].get(*explored) {
                    *explored += 1;
                    if order[source] == UNVISITED {
                        calls.push((source, 0));
                    } else if on_stack[source] {
                        low[node] = low[node].min(order[source]);
                    }
                    continue;
                }
                calls.pop();
                if let Some(&(parent, _)) = calls.last() {
                    low[parent] = low[parent].min(low[node]);
                }
                if low[node] == order[node] {
                    let mut component = Vec::new();
                    while let Some(member) = stack.pop() {
                        on_stack[member] = false;
                        component.push(member);
                        if member == node {
                            break;
                        }
                    }
                    components.push(component);
                }
            }
        }
        components
    }
}
