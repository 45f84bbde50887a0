//! Workflows: `vdm::Workflow::parse` and `vdm::validate`.
//!
//! Inputs are the example workflows with structured edits (literals set to the edges of their
//! input's range and past them, links rewired to other nodes and outputs, nodes removed,
//! copied or retyped, cycles), random graphs over the plugin's node descriptors (with links of
//! matching and mismatched types, missing nodes, self-links and cycles), and byte mutations of
//! the JSON text on top of both.
//!
//! Descriptors come from plugins the host does not control, so a third of the cases also add
//! a plugin of random descriptors (inverted and extreme integer ranges, zero and negative steps,
//! non-finite float bounds, type unions, class types that collide with the real ones). Such an
//! input starts with a line `//vdm-fuzz-descriptors <seed>` naming the generator of those
//! descriptors, so that a saved input replays alone.

use std::path::PathBuf;

use abi_stable::std_types::{RString, RVec};
use fastrand::Rng;
use serde_json::{json, Map, Value};
use vdm::{Plugin, PluginSet, Workflow};
use vdm_ffi::{InputKind, InputSpec, NodeDescriptor, OutputSpec};

use super::safetensors::random_json;
use super::{donors, pick, Context};
use crate::mutate::{interesting, mutate_bytes, random_string};

const HEADER: &str = "//vdm-fuzz-descriptors ";

const EXAMPLES: [&str; 10] = [
    include_str!("../../../workflows/enhance.json"),
    include_str!("../../../workflows/entropy-edit.json"),
    include_str!("../../../workflows/entropy-probe.json"),
    include_str!("../../../workflows/fast-reuse.json"),
    include_str!("../../../workflows/long-video.json"),
    include_str!("../../../workflows/motion-adaptive.json"),
    include_str!("../../../workflows/motion-estimate.json"),
    include_str!("../../../workflows/noise-preview.json"),
    include_str!("../../../workflows/txt2vid.json"),
    include_str!("../../../workflows/vid2vid.json"),
];

/// Type names for synthetic inputs and outputs: real ones, the wildcard, unions, odd spacing.
const TYPE_NAMES: [&str; 10] = [
    "IMAGE",
    "LATENT",
    "MODEL",
    "INT",
    "STRING",
    "*",
    "IMAGE,LATENT",
    " IMAGE ",
    "",
    ",",
];

/// The plugin linked into this binary, loaded once.
pub(super) struct Plugins {
    base: PluginSet,
    plugin: Plugin,
}

impl Plugins {
    /// The real plugin's root module, called directly: the descriptors are the ones the
    /// host gets through the ABI.
    pub(super) fn load() -> Self {
        let module = vdm_nodes::plugin::plugin_root_module();
        let plugin = Plugin {
            name: module.plugin_name()().into_string(),
            path: PathBuf::from("vdm-nodes (linked into vdm-fuzz)"),
            features: module.features()()
                .into_iter()
                .map(|f| f.into_string())
                .collect(),
            module,
            nodes: module.nodes()().into_vec(),
        };
        assert!(!plugin.nodes.is_empty(), "the plugin lists no nodes");
        let mut base = PluginSet::default();
        base.add(plugin.clone());
        Self { base, plugin }
    }

    /// The real plugin and, for `Some(seed)`, a synthetic one generated from `seed` (added
    /// first on odd seeds, so that its class types win collisions).
    fn set(&self, synthetic: Option<u64>) -> PluginSet {
        let Some(seed) = synthetic else {
            return self.base.clone();
        };
        let mut fake = self.plugin.clone();
        fake.name = "synthetic".into();
        fake.nodes = synthetic_descriptors(seed, &self.plugin.nodes);
        let mut set = PluginSet::default();
        if seed % 2 == 1 {
            set.add(fake);
            set.add(self.plugin.clone());
        } else {
            set.add(self.plugin.clone());
            set.add(fake);
        }
        set
    }
}

fn rstring(s: &str) -> RString {
    RString::from(s)
}

fn synthetic_kind(rng: &mut Rng) -> InputKind {
    let int = |rng: &mut Rng| -> i64 {
        match rng.u8(..6) {
            0 => i64::MIN,
            1 => i64::MAX,
            2 => interesting(rng) as i64,
            _ => rng.i64(-10..10),
        }
    };
    let float = |rng: &mut Rng| -> f64 {
        *pick(
            rng,
            &[
                0.0,
                1.0,
                -1.0,
                f64::NAN,
                f64::INFINITY,
                f64::NEG_INFINITY,
                1e308,
                -1e308,
                0.1,
            ],
        )
    };
    match rng.u8(..7) {
        0 | 1 => InputKind::Int {
            default: int(rng),
            min: int(rng),
            max: int(rng),
            step: int(rng),
        },
        2 => InputKind::Float {
            default: float(rng),
            min: float(rng),
            max: float(rng),
            step: float(rng),
        },
        3 => InputKind::Boolean {
            default: rng.bool(),
        },
        4 => InputKind::String {
            default: rstring(&random_string(rng)),
            multiline: rng.bool(),
        },
        5 => InputKind::Combo {
            options: (0..rng.usize(..4))
                .map(|_| rstring(&random_string(rng)))
                .collect(),
            default: rstring(&random_string(rng)),
        },
        _ => InputKind::Object {
            type_name: rstring(pick::<&str>(rng, &TYPE_NAMES)),
        },
    }
}

fn synthetic_descriptors(seed: u64, real: &[NodeDescriptor]) -> Vec<NodeDescriptor> {
    let mut rng = Rng::with_seed(seed);
    let rng = &mut rng;
    (0..1 + rng.usize(..4))
        .map(|i| {
            let class_type = match rng.u8(..4) {
                0 => pick(rng, real).class_type.to_string(),
                1 => random_string(rng),
                _ => format!("Synthetic{i}"),
            };
            let specs = |rng: &mut Rng| -> RVec<InputSpec> {
                (0..rng.usize(..5))
                    .map(|_| InputSpec {
                        name: rstring(pick::<&str>(rng, &["a", "b", "seed", "image", ""])),
                        kind: synthetic_kind(rng),
                        tooltip: RString::new(),
                    })
                    .collect()
            };
            let (required, optional) = (specs(rng), specs(rng));
            NodeDescriptor {
                class_type: rstring(&class_type),
                display_name: rstring(&class_type),
                category: rstring("fuzz"),
                description: RString::new(),
                required,
                optional,
                outputs: (0..rng.usize(..4))
                    .map(|_| OutputSpec {
                        type_name: rstring(pick::<&str>(rng, &TYPE_NAMES)),
                        name: rstring("out"),
                    })
                    .collect(),
                output_node: rng.bool(),
            }
        })
        .collect()
}

pub(super) fn seeds(_ctx: &Context) -> Vec<Vec<u8>> {
    EXAMPLES.iter().map(|e| e.as_bytes().to_vec()).collect()
}

/// A literal for `kind`: valid, on the edges of its range, just past them, or of another type.
fn literal(rng: &mut Rng, kind: &InputKind) -> Value {
    if rng.u8(..10) == 0 {
        return random_json(rng, 2);
    }
    match kind {
        InputKind::Int {
            default,
            min,
            max,
            step,
        } => match rng.u8(..12) {
            0 => json!(default),
            1 => json!(min),
            2 => json!(max),
            3 => json!(min.saturating_sub(1)),
            4 => json!(max.saturating_add(1)),
            5 => json!(min.saturating_add(step.saturating_mul(rng.i64(0..4)))),
            6 => json!(min.saturating_add(1)),
            7 => json!(*pick(rng, &[i64::MIN, i64::MAX, 0, -1])),
            8 => json!(interesting(rng)),
            9 => json!(*default as f64),
            10 => json!(*pick(
                rng,
                &[8.5, 1e19, -1e19, 9.007_199_254_740_993e15, -0.0]
            )),
            _ => json!(default.to_string()),
        },
        InputKind::Float {
            default, min, max, ..
        } => {
            let finite = |v: f64| {
                if v.is_finite() {
                    json!(v)
                } else {
                    json!(1e308)
                }
            };
            match rng.u8(..8) {
                0 => finite(*default),
                1 => finite(*min),
                2 => finite(*max),
                3 => finite(*min - 1e-9),
                4 => finite(max * 2.0 + 1.0),
                5 => json!(*pick(rng, &[1e308, -1e308, 5e-324, 0.0, -0.0])),
                6 => json!(rng.i64(-3..100)),
                _ => json!(default.to_string()),
            }
        }
        InputKind::Boolean { default } => match rng.u8(..4) {
            0 => json!(default),
            1 => json!(!default),
            2 => json!(1),
            _ => json!("true"),
        },
        InputKind::String { default, .. } => match rng.u8(..4) {
            0 => json!(default.as_str()),
            1 => json!(7),
            _ => json!(random_string(rng)),
        },
        InputKind::Combo { options, default } => match rng.u8(..5) {
            0 => json!(default.as_str()),
            1 | 2 if !options.is_empty() => json!(pick(rng, options).as_str()),
            3 => json!(format!("{} ", default.as_str())),
            _ => json!(random_string(rng)),
        },
        InputKind::Object { type_name } => json!(type_name.as_str()),
    }
}

/// A graph under construction: ids and the output types of each node.
struct Graph<'a> {
    ids: Vec<String>,
    outputs: Vec<Option<&'a NodeDescriptor>>,
}

impl Graph<'_> {
    /// A link to some node's output, preferring outputs of the type wanted; sometimes to a
    /// node or output that does not exist, sometimes malformed.
    fn link(&self, rng: &mut Rng, wanted: Option<&str>) -> Value {
        let mut candidates = Vec::new();
        if let Some(wanted) = wanted {
            for (i, d) in self.outputs.iter().enumerate() {
                if let Some(d) = d {
                    for (j, out) in d.outputs.iter().enumerate() {
                        if out.type_name.as_str() == wanted {
                            candidates.push((i, j as u64));
                        }
                    }
                }
            }
        }
        let (node, output) = if !candidates.is_empty() && rng.u8(..10) < 7 {
            *pick(rng, &candidates)
        } else {
            let node = rng.usize(..self.ids.len());
            let outputs = self.outputs[node].map_or(1, |d| d.outputs.len().max(1));
            let output = if rng.u8(..6) == 0 {
                interesting(rng)
            } else {
                rng.u64(..outputs as u64)
            };
            (node, output)
        };
        let id = &self.ids[node];
        match rng.u8(..30) {
            0 => json!(["no-such-node", output]),
            1 => json!([id]),
            2 => json!([id, -1]),
            3 => json!([id, 0.5]),
            4 => json!([null, output]),
            5 => json!([id, output, 0]),
            6 => match id.parse::<u64>() {
                Ok(n) => json!([n, output]),
                Err(_) => json!([id, output]),
            },
            _ => json!([id, output]),
        }
    }
}

fn node_id(rng: &mut Rng, i: usize) -> String {
    match rng.u8(..20) {
        0 => random_string(rng),
        1 => format!("{i}:{}", rng.u8(..4)),
        _ => (i + 1).to_string(),
    }
}

/// A random workflow over `descriptors`.
fn random_graph(rng: &mut Rng, descriptors: &[&NodeDescriptor]) -> Value {
    let most = if rng.u8(..8) == 0 { 60 } else { 10 };
    let n = 1 + rng.usize(..most);
    let mut ids: Vec<String> = (0..n).map(|i| node_id(rng, i)).collect();
    ids.dedup();
    let outputs: Vec<Option<&NodeDescriptor>> = ids
        .iter()
        .map(|_| (rng.u8(..12) != 0).then(|| *pick(rng, descriptors)))
        .collect();
    let graph = Graph { ids, outputs };
    let mut nodes = Map::new();
    for (id, descriptor) in graph.ids.iter().zip(&graph.outputs) {
        let mut inputs = Map::new();
        if let Some(d) = descriptor {
            let specs = d
                .required
                .iter()
                .map(|s| (s, 9))
                .chain(d.optional.iter().map(|s| (s, 4)));
            for (spec, tenths) in specs {
                if rng.u8(..10) >= tenths {
                    continue;
                }
                let value = match &spec.kind {
                    InputKind::Object { type_name } if rng.u8(..10) != 0 => {
                        graph.link(rng, Some(type_name.as_str()))
                    }
                    kind if rng.u8(..8) == 0 => graph.link(rng, Some(kind.type_name())),
                    kind => literal(rng, kind),
                };
                inputs.insert(spec.name.to_string(), value);
            }
        }
        if rng.u8(..10) == 0 {
            inputs.insert(random_string(rng), random_json(rng, 1));
        }
        let class_type = match descriptor {
            Some(d) => json!(d.class_type.as_str()),
            None => json!(random_string(rng)),
        };
        let mut node = json!({ "class_type": class_type, "inputs": inputs });
        match rng.u8(..40) {
            0 => node["class_type"] = random_json(rng, 1),
            1 => node["inputs"] = random_json(rng, 1),
            2 => node = random_json(rng, 2),
            3..=8 => node["_meta"] = json!({ "title": random_string(rng) }),
            _ => {}
        }
        nodes.insert(id.clone(), node);
    }
    match rng.u8(..12) {
        0 => json!({ "prompt": nodes, "client_id": "fuzz" }),
        1 => json!({ "nodes": [], "links": [] }),
        _ => Value::Object(nodes),
    }
}

/// One structured edit of a workflow.
fn edit(rng: &mut Rng, workflow: &mut Map<String, Value>, descriptors: &[&NodeDescriptor]) {
    let ids: Vec<String> = workflow.keys().cloned().collect();
    if ids.is_empty() {
        workflow.insert(
            "1".into(),
            json!({ "class_type": pick(rng, descriptors).class_type.as_str() }),
        );
        return;
    }
    let id = pick(rng, &ids).clone();
    let class = workflow[&id]["class_type"]
        .as_str()
        .unwrap_or_default()
        .to_owned();
    let descriptor = descriptors.iter().find(|d| d.class_type.as_str() == class);
    match rng.u8(..10) {
        0 => {
            workflow.remove(&id);
        }
        1 => {
            let copy = workflow[&id].clone();
            workflow.insert(format!("{id}{}", rng.u8(..10)), copy);
        }
        2 => {
            let class_type = json!(pick(rng, descriptors).class_type.as_str());
            if let Some(node) = workflow[&id].as_object_mut() {
                node.insert("class_type".into(), class_type);
            }
        }
        _ => {
            let Some(inputs) = workflow
                .get_mut(&id)
                .and_then(|n| n.get_mut("inputs"))
                .and_then(Value::as_object_mut)
            else {
                return;
            };
            let specs: Vec<&InputSpec> = descriptor
                .map(|d| d.required.iter().chain(d.optional.iter()).collect())
                .unwrap_or_default();
            match rng.u8(..5) {
                // A literal on or past the edge of its range.
                0 | 1 if !specs.is_empty() => {
                    let spec = pick(rng, &specs);
                    inputs.insert(spec.name.to_string(), literal(rng, &spec.kind));
                }
                // Rewired to any node: to itself, upstream or downstream (cycles).
                2 if !inputs.is_empty() => {
                    let names: Vec<String> = inputs.keys().cloned().collect();
                    let name = pick(rng, &names).clone();
                    let source = pick(rng, &ids);
                    inputs.insert(name, json!([source, rng.u64(..4)]));
                }
                3 if !inputs.is_empty() => {
                    let names: Vec<String> = inputs.keys().cloned().collect();
                    inputs.remove(pick(rng, &names));
                }
                _ => {
                    inputs.insert(random_string(rng), random_json(rng, 1));
                }
            }
        }
    }
}

pub(super) fn generate(ctx: &Context, rng: &mut Rng) -> Vec<u8> {
    let plugins = ctx.plugins();
    let synthetic = (rng.u8(..3) == 0).then(|| rng.u64(..));
    let set = plugins.set(synthetic);
    let descriptors: Vec<&NodeDescriptor> = set.descriptors().collect();
    let seeds = ctx.seeds(super::Target::Workflow);
    let mut text = match rng.u8(..10) {
        0..=3 => {
            let example = pick(rng, seeds);
            let mut value: Value = serde_json::from_slice(example).expect("examples are JSON");
            if let Some(map) = value.as_object_mut() {
                for _ in 0..1 + rng.usize(..4) {
                    edit(rng, map, &descriptors);
                }
            }
            serde_json::to_vec(&value).expect("JSON values serialise")
        }
        4..=8 => {
            let mut value = random_graph(rng, &descriptors);
            if let Some(map) = value.as_object_mut() {
                if rng.bool() {
                    edit(rng, map, &descriptors);
                }
            }
            let pretty = rng.bool();
            if pretty {
                serde_json::to_vec_pretty(&value).expect("JSON values serialise")
            } else {
                serde_json::to_vec(&value).expect("JSON values serialise")
            }
        }
        _ => serde_json::to_vec(&random_json(rng, 4)).expect("JSON values serialise"),
    };
    if rng.u8(..4) == 0 {
        mutate_bytes(rng, &mut text, &donors(seeds), 4);
    }
    match synthetic {
        Some(seed) => {
            let mut out = format!("{HEADER}{seed}\n").into_bytes();
            out.extend(text);
            out
        }
        None => text,
    }
}

pub(super) fn execute(ctx: &Context, input: &[u8]) -> Result<(), String> {
    let (synthetic, text) = match input.strip_prefix(HEADER.as_bytes()) {
        Some(rest) => {
            let end = rest.iter().position(|&b| b == b'\n').unwrap_or(rest.len());
            let seed = std::str::from_utf8(&rest[..end])
                .ok()
                .and_then(|s| s.parse().ok());
            (seed, rest.get(end + 1..).unwrap_or_default())
        }
        None => (None, input),
    };
    let text = String::from_utf8_lossy(text);
    let workflow = Workflow::parse(&text).map_err(|e| e.to_string())?;
    let plugins = ctx.plugins().set(synthetic);
    let report = vdm::validate(&workflow, &plugins);
    let _ = serde_json::to_string(&report);
    let outputs = vdm::validate::output_nodes(&workflow, &plugins);
    if report.is_ok() {
        // A workflow that may run has an output and only known, acyclic nodes.
        assert!(!outputs.is_empty(), "a valid workflow without outputs");
        for (id, node) in &workflow.nodes {
            assert!(
                plugins.node(&node.class_type).is_some(),
                "node {id} of unknown class `{}` passed validation",
                node.class_type
            );
        }
        Ok(())
    } else {
        Err(report.to_text())
    }
}
