//! What a run reports while it goes: ComfyUI's websocket messages, as a stream of events.

use std::sync::Mutex;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{json, Value as Json};

/// One event of a run.
#[derive(Debug, Clone, PartialEq)]
pub enum Event {
    ExecutionStart {
        nodes: usize,
    },
    /// Nodes whose outputs came from the cache.
    Cached {
        nodes: Vec<String>,
    },
    Executing {
        node: String,
        class_type: String,
        title: Option<String>,
    },
    Progress {
        node: String,
        value: u64,
        max: u64,
        text: String,
    },
    Executed {
        node: String,
        output: Json,
    },
    ExecutionError {
        node: String,
        class_type: String,
        kind: String,
        input: Option<String>,
        message: String,
    },
    /// The run stopped at `node` because the user asked it to; `executed` ran before.
    ExecutionInterrupted {
        node: String,
        class_type: String,
        executed: Vec<String>,
    },
    ExecutionSuccess,
}

impl Event {
    /// The event as ComfyUI's websocket sends it: `{"type": ..., "data": {...}}`.
    pub fn to_json(&self) -> Json {
        match self {
            Event::ExecutionStart { nodes } => {
                json!({"type": "execution_start", "data": {"nodes": nodes}})
            }
            Event::Cached { nodes } => {
                json!({"type": "execution_cached", "data": {"nodes": nodes}})
            }
            Event::Executing {
                node,
                class_type,
                title,
            } => {
                json!({"type": "executing", "data": {"node": node, "class_type": class_type, "display_node": node, "title": title}})
            }
            Event::Progress {
                node,
                value,
                max,
                text,
            } => {
                json!({"type": "progress", "data": {"node": node, "value": value, "max": max, "text": text}})
            }
            Event::Executed { node, output } => {
                json!({"type": "executed", "data": {"node": node, "output": output}})
            }
            Event::ExecutionError {
                node,
                class_type,
                kind,
                input,
                message,
            } => json!({"type": "execution_error", "data": {
                "node_id": node, "node_type": class_type, "exception_type": kind, "input_name": input, "exception_message": message}}),
            Event::ExecutionInterrupted {
                node,
                class_type,
                executed,
            } => json!({"type": "execution_interrupted", "data": {
                "node_id": node, "node_type": class_type, "executed": executed}}),
            Event::ExecutionSuccess => json!({"type": "execution_success", "data": {}}),
        }
    }
}

/// Where events go.
pub trait EventSink: Send + Sync {
    fn emit(&self, event: Event);

    /// A PNG preview of `node`'s current state (sent only when the `previews` setting is on);
    /// sinks without a display drop it.
    fn preview(&self, _node: &str, _png: &[u8]) {}
}

/// Drops every event.
pub struct Silent;

impl EventSink for Silent {
    fn emit(&self, _: Event) {}
}

/// One JSON object per line on stdout (`--json-events`).
pub struct JsonLines;

impl EventSink for JsonLines {
    fn emit(&self, event: Event) {
        use std::io::Write;
        let mut out = std::io::stdout().lock();
        // A closed stdout must not abort the run; the outputs on disk are what matters.
        let _ = writeln!(out, "{}", event.to_json());
        let _ = out.flush();
    }
}

/// Collects events in memory (tests, embedding).
#[derive(Default)]
pub struct Recorder(pub Mutex<Vec<Event>>);

impl EventSink for Recorder {
    fn emit(&self, event: Event) {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).push(event);
    }
}

/// Progress bars on the terminal: one over the nodes, one over the steps of the current node.
pub struct ProgressBars {
    bars: MultiProgress,
    state: Mutex<Bars>,
}

#[derive(Default)]
struct Bars {
    nodes: Option<ProgressBar>,
    steps: Option<ProgressBar>,
}

impl ProgressBars {
    pub fn new() -> Self {
        Self {
            bars: MultiProgress::new(),
            state: Mutex::new(Bars::default()),
        }
    }
}

impl Default for ProgressBars {
    fn default() -> Self {
        Self::new()
    }
}

impl EventSink for ProgressBars {
    fn emit(&self, event: Event) {
        let mut state = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match event {
            Event::ExecutionStart { nodes } => {
                let bar = self.bars.add(ProgressBar::new(nodes as u64));
                bar.set_style(
                    ProgressStyle::with_template("{prefix:>8} [{bar:30}] {pos}/{len} {msg}")
                        .expect("static template")
                        .progress_chars("=> "),
                );
                bar.set_prefix("nodes");
                state.nodes = Some(bar);
            }
            Event::Cached { nodes } => {
                if let Some(bar) = &state.nodes {
                    bar.inc(nodes.len() as u64);
                }
            }
            Event::Executing {
                node,
                class_type,
                title,
            } => {
                if let Some(steps) = state.steps.take() {
                    steps.finish_and_clear();
                }
                if let Some(bar) = &state.nodes {
                    bar.set_message(format!("{node} {}", title.unwrap_or(class_type)));
                }
            }
            Event::Progress {
                value, max, text, ..
            } => {
                if state.steps.is_none() {
                    let bar = self.bars.add(ProgressBar::new(max));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{prefix:>8} [{bar:30}] {pos}/{len} {msg} ({eta})",
                        )
                        .expect("static template")
                        .progress_chars("=> "),
                    );
                    bar.set_prefix("steps");
                    state.steps = Some(bar);
                }
                if let Some(bar) = &state.steps {
                    bar.set_length(max);
                    bar.set_position(value);
                    bar.set_message(text);
                }
            }
            Event::Executed { .. } => {
                if let Some(steps) = state.steps.take() {
                    steps.finish_and_clear();
                }
                if let Some(bar) = &state.nodes {
                    bar.inc(1);
                }
            }
            Event::ExecutionError { .. }
            | Event::ExecutionInterrupted { .. }
            | Event::ExecutionSuccess => {
                if let Some(steps) = state.steps.take() {
                    steps.finish_and_clear();
                }
                if let Some(bar) = state.nodes.take() {
                    bar.finish();
                }
            }
        }
    }
}
