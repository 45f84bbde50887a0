//! Running a validated workflow: only what the output nodes need, in dependency order, each
//! distinct computation once.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use abi_stable::sabi_trait::TD_Opaque;
use abi_stable::sabi_types::RRef;
use abi_stable::std_types::{RErr, RNone, ROk, ROption, RSlice, RSome, RStr, RString, RVec};
use serde_json::Value as Json;
use vdm_ffi::{
    ErrorKind, ExecuteRequest, HostContext, HostContext_TO, InputKind, NamedValue, NodeDescriptor,
    NodeError, Value,
};

use crate::events::{Event, EventSink};
use crate::plugin::PluginSet;
use crate::validate::{self, as_integer, LinkGraph, ValidationReport};
use crate::workflow::{Input, Workflow};

/// Why a run stopped.
#[derive(Debug, thiserror::Error)]
pub enum RunError {
    // Boxed, so that a run's `Result` stays small.
    #[error("the workflow is invalid:\n{}", .0.to_text())]
    Invalid(Box<ValidationReport>),
    #[error("{0}")]
    Node(Box<NodeError>),
    /// The cancel flag was set: the run stopped at node `node` (before it ran, or at one of its
    /// checks) and nothing after it ran.
    #[error("interrupted at node {node} ({class_type})")]
    Interrupted { node: String, class_type: String },
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

/// Node outputs kept from one run to the next, keyed by input signature, so that a caller
/// running a sequence of workflows (a server's queue) computes each node only when its class,
/// its inputs or anything upstream of it changed. After each run the cache holds only the
/// outputs that run used or produced, so it never grows beyond one workflow's worth.
#[derive(Default)]
pub struct OutputCache {
    outputs: HashMap<u64, Vec<Value>>,
}

impl OutputCache {
    /// Number of node outputs held.
    pub fn len(&self) -> usize {
        self.outputs.len()
    }

    /// Whether nothing is held.
    pub fn is_empty(&self) -> bool {
        self.outputs.is_empty()
    }

    /// Drops every held output (and the plugin objects they keep alive).
    pub fn clear(&mut self) {
        self.outputs.clear();
    }
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

    /// Shares `flag` as the cancel flag (a signal handler's, say).
    pub fn with_cancel_flag(mut self, flag: Arc<AtomicBool>) -> Self {
        self.cancel = flag;
        self
    }

    /// Checks `workflow` against the node descriptors, then asks each node's plugin to check
    /// the node's literal inputs under this executor's settings (model files exist, ...), so
    /// that every problem found before running is reported at once.
    pub fn validate(&self, workflow: &Workflow) -> ValidationReport {
        let quiet = crate::events::Silent;
        validate::validate_with(workflow, self.plugins, |id, node| {
            let Some((plugin, descriptor)) = self.plugins.node(&node.class_type) else {
                return Vec::new();
            };
            let Some(check) = plugin.module.check() else {
                return Vec::new();
            };
            let host = NodeHost {
                node: id,
                sink: &quiet,
                cancel: &self.cancel,
                settings: &self.settings,
            };
            let request = ExecuteRequest {
                class_type: RStr::from(node.class_type.as_str()),
                node_id: RStr::from(id),
                inputs: literal_inputs(descriptor, &node.inputs),
                host: HostContext_TO::from_ptr(RRef::new(&host), TD_Opaque),
            };
            check(request)
                .into_iter()
                .map(|e| {
                    (
                        e.input.into_option().map(RString::into_string),
                        e.message.into_string(),
                    )
                })
                .collect()
        })
    }

    /// Validates, then runs what the output nodes need; identical computations within the
    /// run happen once.
    pub fn run(&self, workflow: &Workflow) -> Result<RunSummary, RunError> {
        self.run_cached(workflow, &mut OutputCache::default())
    }

    /// Like [`Executor::run`], but reuses the outputs `cache` holds from earlier runs and
    /// leaves this run's outputs in it. Output nodes still always run, as in a single run:
    /// writing or showing their result is the point of queueing the workflow.
    pub fn run_cached(
        &self,
        workflow: &Workflow,
        cache: &mut OutputCache,
    ) -> Result<RunSummary, RunError> {
        let mut used = HashSet::new();
        let result = self.run_with(workflow, &mut cache.outputs, &mut used);
        cache
            .outputs
            .retain(|signature, _| used.contains(signature));
        result
    }

    /// Runs `workflow`, taking and leaving node outputs in `outputs`; records in `used` the
    /// signature of every node it reached.
    fn run_with(
        &self,
        workflow: &Workflow,
        outputs: &mut HashMap<u64, Vec<Value>>,
        used: &mut HashSet<u64>,
    ) -> Result<RunSummary, RunError> {
        let report = self.validate(workflow);
        if !report.is_ok() {
            return Err(RunError::Invalid(Box::new(report)));
        }
        let order = execution_order(workflow, &validate::output_nodes(workflow, self.plugins));
        self.sink.emit(Event::ExecutionStart { nodes: order.len() });

        let mut summary = RunSummary::default();
        let mut signatures: HashMap<&str, u64> = HashMap::new();
        for id in &order {
            let node = &workflow.nodes[id];
            let (plugin, descriptor) = self.plugins.node(&node.class_type).expect("validated");
            if self.cancel.load(Ordering::Relaxed) {
                return Err(self.interrupted(id, &node.class_type, &summary));
            }
            let signature = signature(&node.class_type, &node.inputs, &signatures);
            signatures.insert(id.as_str(), signature);
            used.insert(signature);
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
            let inputs = resolve_inputs(descriptor, &node.inputs, &signatures, outputs);
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
                RErr(error) if error.kind == ErrorKind::Cancelled => {
                    return Err(self.interrupted(id, &node.class_type, &summary));
                }
                RErr(error) => {
                    self.sink.emit(Event::ExecutionError {
                        node: id.clone(),
                        class_type: node.class_type.clone(),
                        kind: format!("{:?}", error.kind),
                        input: error.input.clone().into_option().map(RString::into_string),
                        message: error.message.to_string(),
                    });
                    return Err(RunError::Node(Box::new(error)));
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
                return Err(RunError::Node(Box::new(error)));
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

    /// Reports that the run stopped at `node` on the user's request.
    fn interrupted(&self, node: &str, class_type: &str, summary: &RunSummary) -> RunError {
        self.sink.emit(Event::ExecutionInterrupted {
            node: node.to_owned(),
            class_type: class_type.to_owned(),
            executed: summary.executed.clone(),
        });
        RunError::Interrupted {
            node: node.to_owned(),
            class_type: class_type.to_owned(),
        }
    }
}

/// The nodes the outputs depend on, each after its dependencies (Kahn's algorithm; ties by id
/// so runs are reproducible), in time O((n + links) log n). Assumes a validated, acyclic
/// workflow.
pub fn execution_order(workflow: &Workflow, outputs: &[String]) -> Vec<String> {
    let graph = LinkGraph::new(workflow);
    let roots: Vec<usize> = outputs.iter().filter_map(|o| graph.index_of(o)).collect();
    let needed = graph.needed_by(&roots);
    let mut pending: Vec<usize> = graph.sources.iter().map(Vec::len).collect();
    let mut readers: Vec<Vec<usize>> = vec![Vec::new(); graph.ids.len()];
    for (reader, sources) in graph.sources.iter().enumerate() {
        for &source in sources {
            readers[source].push(reader);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..graph.ids.len())
        .filter(|&i| needed[i] && pending[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::new();
    while let Some(Reverse(node)) = ready.pop() {
        order.push(graph.ids[node].clone());
        for &reader in &readers[node] {
            pending[reader] -= 1;
            if needed[reader] && pending[reader] == 0 {
                ready.push(Reverse(reader));
            }
        }
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

/// The literal inputs of a node, converted to their declared kinds (links left out).
fn literal_inputs(
    descriptor: &NodeDescriptor,
    inputs: &BTreeMap<String, Input>,
) -> RVec<NamedValue> {
    let specs = descriptor.required.iter().chain(descriptor.optional.iter());
    specs
        .filter_map(|spec| match inputs.get(spec.name.as_str())? {
            Input::Literal(json) => Some(NamedValue {
                name: spec.name.clone(),
                value: literal_value(&spec.kind, json),
            }),
            Input::Link { .. } => None,
        })
        .collect()
}

/// A validated literal as the value its kind declares.
fn literal_value(kind: &InputKind, json: &Json) -> Value {
    match kind {
        // The u64 range crosses as the i64 of the same bits.
        kind if kind.is_unsigned_int() => {
            Value::Int(validate::as_unsigned(json).unwrap_or_default() as i64)
        }
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

    fn preview(&self, png: RSlice<'_, u8>) {
        self.sink.preview(self.node, png.as_slice());
    }
}
