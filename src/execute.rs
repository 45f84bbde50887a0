//! Running a validated workflow: only what the output nodes need, in dependency order, each
//! distinct computation once.

use std::collections::{BTreeMap, HashMap};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RErr, RNone, ROk, ROption, RSome, RStr, RString, RVec};
use serde_json::Value as Json;
use vdm_ffi::{
    ErrorKind, ExecuteRequest, HostContext, HostContext_TO, InputKind, NamedValue, NodeDescriptor,
    NodeError, Value,
};

use crate::events::{Event, EventSink};
use crate::plugin::PluginSet;
use crate::validate::{self, as_integer, ValidationReport};
use crate::workflow::{Input, Workflow};

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    #[error("the workflow is invalid:\n{}", .0.to_text())]
    Invalid(ValidationReport),
    #[error("{0}")]
    Node(NodeError),
}

/// What a finished run produced.
#[derive(Debug, Default)]
pub struct RunSummary {
    /// Nodes run, in order.
    pub executed: Vec<String>,
    /// Nodes whose outputs came from an identical computation earlier in the run.
    pub cached: Vec<String>,
    /// The `ui` JSON of each output node, by node id.
    pub ui: BTreeMap<String, Json>,
}

/// Runs workflows against a set of plugins.
pub struct Executor<'a> {
    plugins: &'a PluginSet,
    settings: BTreeMap<String, String>,
    sink: &'a dyn EventSink,
    cancel: Arc<AtomicBool>,
}

impl<'a> Executor<'a> {
    pub fn new(plugins: &'a PluginSet, sink: &'a dyn EventSink) -> Self {
        Self {
            plugins,
            settings: BTreeMap::new(),
            sink,
            cancel: Arc::new(AtomicBool::new(false)),
        }
    }

    /// A setting nodes can read (`output_dir`, `models_dir`, `input_dir`, `device`).
    pub fn with_setting(mut self, key: &str, value: impl Into<String>) -> Self {
        self.settings.insert(key.to_owned(), value.into());
        self
    }

    /// The flag that, once set, makes nodes stop at their next check.
    pub fn cancel_flag(&self) -> Arc<AtomicBool> {
        self.cancel.clone()
    }

    /// Validates, then runs what the output nodes need.
    pub fn run(&self, workflow: &Workflow) -> Result<RunSummary, RunError> {
        let report = validate::validate(workflow, self.plugins);
        if !report.is_ok() {
            return Err(RunError::Invalid(report));
        }
        let order = execution_order(workflow, &validate::output_nodes(workflow, self.plugins));
        self.sink.emit(Event::ExecutionStart { nodes: order.len() });

        let mut summary = RunSummary::default();
        let mut signatures: HashMap<&str, u64> = HashMap::new();
        let mut outputs: HashMap<u64, Vec<Value>> = HashMap::new();
        for id in &order {
            let node = &workflow.nodes[id];
            let (plugin, descriptor) = self.plugins.node(&node.class_type).expect("validated");
            let signature = signature(&node.class_type, &node.inputs, &signatures);
            signatures.insert(id.as_str(), signature);
            // Output nodes always run: writing the file is the point of running them.
            if !descriptor.output_node && outputs.contains_key(&signature) {
                summary.cached.push(id.clone());
                self.sink.emit(Event::Cached {
                    nodes: vec![id.clone()],
                });
                continue;
            }
            self.sink.emit(Event::Executing {
                node: id.clone(),
                class_type: node.class_type.clone(),
                title: node.title.clone(),
            });
            let inputs = resolve_inputs(descriptor, &node.inputs, &signatures, &outputs);
            let host = NodeHost {
                node: id,
                sink: self.sink,
                cancel: &self.cancel,
                settings: &self.settings,
            };
            let request = ExecuteRequest {
                class_type: RStr::from(node.class_type.as_str()),
                node_id: RStr::from(id.as_str()),
                inputs,
                host: HostContext_TO::from_ptr(RRef::new(&host), TD_Opaque),
            };
            let result = (plugin.module.execute())(request);
            let output = match result {
                ROk(output) => output,
                RErr(error) => {
                    self.sink.emit(Event::ExecutionError {
                        node: id.clone(),
                        class_type: node.class_type.clone(),
                        kind: format!("{:?}", error.kind),
                        input: error.input.clone().into_option().map(RString::into_string),
                        message: error.message.to_string(),
                    });
                    return Err(RunError::Node(error));
                }
            };
            if output.values.len() != descriptor.outputs.len() {
                let error = NodeError {
                    kind: ErrorKind::Execution,
                    node_id: id.as_str().into(),
                    class_type: node.class_type.as_str().into(),
                    input: RNone,
                    message: format!(
                        "returned {} values for {} declared outputs",
                        output.values.len(),
                        descriptor.outputs.len()
                    )
                    .into(),
                };
                return Err(RunError::Node(error));
            }
            let ui: Json = if output.ui_json.is_empty() {
                Json::Null
            } else {
                serde_json::from_str(&output.ui_json)
                    .unwrap_or_else(|_| Json::String(output.ui_json.to_string()))
            };
            if !ui.is_null() {
                summary.ui.insert(id.clone(), ui.clone());
            }
            self.sink.emit(Event::Executed {
                node: id.clone(),
                output: ui,
            });
            outputs.insert(signature, output.values.into_vec());
            summary.executed.push(id.clone());
        }
        self.sink.emit(Event::ExecutionSuccess);
        Ok(summary)
    }
}

/// The nodes the outputs depend on, each after its dependencies (Kahn's algorithm; ties by id
/// so runs are reproducible). Assumes a validated, acyclic workflow.
pub fn execution_order(workflow: &Workflow, outputs: &[String]) -> Vec<String> {
    let needed: std::collections::BTreeSet<String> = outputs
        .iter()
        .flat_map(|o| validate::dependencies(workflow, o))
        .collect();
    let sources = |id: &str| -> Vec<String> {
        let mut s: Vec<String> = workflow.nodes[id]
            .inputs
            .values()
            .filter_map(|i| match i {
                Input::Link { node, .. } => Some(node.clone()),
                Input::Literal(_) => None,
            })
            .collect();
        s.sort();
        s.dedup();
        s
    };
    let mut pending: BTreeMap<String, usize> = needed
        .iter()
        .map(|id| (id.clone(), sources(id).len()))
        .collect();
    let mut order = Vec::with_capacity(needed.len());
    while let Some(ready) = pending
        .iter()
        .find(|(_, &n)| n == 0)
        .map(|(id, _)| id.clone())
    {
        pending.remove(&ready);
        for (id, count) in pending.iter_mut() {
            if sources(id).contains(&ready) {
                *count -= 1;
            }
        }
        order.push(ready);
    }
    order
}

/// A node's input signature: its class and literal inputs, and the signatures of what its
/// links point to. Equal signatures mean equal outputs, for deterministic nodes.
fn signature(
    class_type: &str,
    inputs: &BTreeMap<String, Input>,
    known: &HashMap<&str, u64>,
) -> u64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    class_type.hash(&mut hasher);
    for (name, input) in inputs {
        name.hash(&mut hasher);
        match input {
            Input::Literal(value) => value.to_string().hash(&mut hasher),
            Input::Link { node, output } => {
                known.get(node.as_str()).hash(&mut hasher);
                output.hash(&mut hasher);
            }
        }
    }
    hasher.finish()
}

/// The values to send: literals converted to their declared kind, links to the cached output.
fn resolve_inputs(
    descriptor: &NodeDescriptor,
    inputs: &BTreeMap<String, Input>,
    signatures: &HashMap<&str, u64>,
    outputs: &HashMap<u64, Vec<Value>>,
) -> RVec<NamedValue> {
    let specs = descriptor.required.iter().chain(descriptor.optional.iter());
    specs
        .filter_map(|spec| {
            let value = match inputs.get(spec.name.as_str())? {
                Input::Link { node, output } => {
                    outputs[&signatures[node.as_str()]][*output].clone()
                }
                Input::Literal(json) => literal_value(&spec.kind, json),
            };
            Some(NamedValue {
                name: spec.name.clone(),
                value,
            })
        })
        .collect()
}

/// A validated literal as the value its kind declares.
fn literal_value(kind: &InputKind, json: &Json) -> Value {
    match kind {
        InputKind::Int { .. } => Value::Int(as_integer(json).unwrap_or_default()),
        InputKind::Float { .. } => Value::Float(json.as_f64().unwrap_or_default()),
        InputKind::Boolean { .. } => Value::Bool(json.as_bool().unwrap_or_default()),
        _ => Value::Str(
            json.as_str()
                .map(RString::from)
                .unwrap_or_else(|| json.to_string().into()),
        ),
    }
}

/// The host side of one node's execution.
struct NodeHost<'a> {
    node: &'a str,
    sink: &'a dyn EventSink,
    cancel: &'a AtomicBool,
    settings: &'a BTreeMap<String, String>,
}

impl HostContext for NodeHost<'_> {
    fn progress(&self, step: u64, total: u64, text: RStr<'_>) {
        self.sink.emit(Event::Progress {
            node: self.node.to_owned(),
            value: step,
            max: total,
            text: text.to_string(),
        });
    }

    fn cancelled(&self) -> bool {
        self.cancel.load(Ordering::Relaxed)
    }

    fn setting(&self, key: RStr<'_>) -> ROption<RString> {
        match self.settings.get(key.as_str()) {
            Some(v) => RSome(v.as_str().into()),
            None => RNone,
        }
    }
}
