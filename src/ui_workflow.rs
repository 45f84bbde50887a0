//! Workflows in ComfyUI's UI format (what the editor's "Save" writes and what most workflows
//! are shared as), turned into the API format the way the ComfyUI frontend's `graphToPrompt`
//! does it:
//!
//! - every node that is neither muted (mode 2) nor bypassed (mode 4) nor virtual (`Note`,
//!   `MarkdownNote`, `PrimitiveNode`, `Reroute`) becomes an API node with its id;
//! - widget values (`widgets_values`, a list in widget order or, for some node packs, an
//!   object keyed by widget name) become literal inputs, by the order of the node's
//!   widget inputs (required then optional, sockets skipped). The editor stores extra values
//!   that are not inputs: the `control_after_generate` choice after a seed ("fixed",
//!   "randomize", ...) and the upload button's value after a file combo; they are skipped;
//! - a link becomes `[origin id, origin slot]`, followed through reroutes and through
//!   bypassed nodes (which pass on their input of the link's type); a primitive node's value
//!   is already in its target's widget values, so its link is dropped;
//! - an input linked to a muted or missing node is dropped, as the frontend drops it.
//!
//! Widget order needs each class's inputs, so conversion takes them from the loaded nodes;
//! a class no plugin provides keeps its links (validation then names it).

use std::collections::{BTreeMap, HashMap};

use serde_json::{json, Map, Value as Json};
use vdm_ffi::{InputKind, NodeDescriptor};

use crate::plugin::PluginSet;
use crate::workflow::{self, ParseError, Workflow};

/// Node modes of the editor: 0 always, 2 never (muted), 4 bypassed.
const MODE_MUTED: i64 = 2;
const MODE_BYPASSED: i64 = 4;

/// UI-only classes: they are not run and pass links on (reroutes) or keep values (primitives).
const VIRTUAL_CLASSES: [&str; 4] = ["Note", "MarkdownNote", "PrimitiveNode", "Reroute"];

/// The values the editor's `control_after_generate` widget takes.
const CONTROL_VALUES: [&str; 4] = ["fixed", "increment", "decrement", "randomize"];

/// The values of the upload buttons that follow file combos (`image_upload`, ...).
const UPLOAD_VALUES: [&str; 3] = ["image", "video", "audio"];

/// One widget input of a class, in the order the editor creates its widgets.
#[derive(Debug, Clone, PartialEq)]
pub struct WidgetInput {
    pub name: String,
    pub kind: WidgetKind,
}

#[derive(Debug, Clone, PartialEq)]
pub enum WidgetKind {
    Int,
    Float,
    Boolean,
    String,
    Combo(Vec<String>),
}

impl WidgetKind {
    /// Whether `value` could be this widget's value (used to tell an extra stored value from
    /// the next widget's).
    fn accepts(&self, value: &Json) -> bool {
        match self {
            WidgetKind::Int | WidgetKind::Float => value.is_number(),
            WidgetKind::Boolean => value.is_boolean(),
            WidgetKind::String => value.is_string(),
            WidgetKind::Combo(options) => value
                .as_str()
                .is_some_and(|v| options.iter().any(|o| o == v)),
        }
    }
}

/// The widget inputs of a node, in the editor's order: every scalar or combo input, required
/// then optional.
pub fn widget_inputs(descriptor: &NodeDescriptor) -> Vec<WidgetInput> {
    descriptor
        .required
        .iter()
        .chain(descriptor.optional.iter())
        .filter_map(|spec| {
            let kind = match &spec.kind {
                InputKind::Int { .. } => WidgetKind::Int,
                InputKind::Float { .. } => WidgetKind::Float,
                InputKind::Boolean { .. } => WidgetKind::Boolean,
                InputKind::String { .. } => WidgetKind::String,
                InputKind::Combo { options, .. } => {
                    WidgetKind::Combo(options.iter().map(|o| o.to_string()).collect())
                }
                InputKind::Object { .. } => return None,
            };
            Some(WidgetInput {
                name: spec.name.to_string(),
                kind,
            })
        })
        .collect()
}

/// Reads a workflow in either format: the API format as it is, the UI format converted with
/// the widget inputs of the loaded nodes. Returns the conversion's warnings with it.
pub fn parse_workflow(
    text: &str,
    plugins: &PluginSet,
) -> Result<(Workflow, Vec<String>), ParseError> {
    let json = workflow::parse_json(text)?;
    if !is_ui_workflow(&json) {
        return Ok((Workflow::from_json(json)?, Vec::new()));
    }
    let converted = to_api(&json, |class| {
        plugins
            .node(class)
            .map(|(_, descriptor)| widget_inputs(descriptor))
    })?;
    Ok((Workflow::from_json(converted.api)?, converted.warnings))
}

/// Whether `json` is a UI-format workflow (a `nodes` list and `links`) rather than an API one.
pub fn is_ui_workflow(json: &Json) -> bool {
    json.get("nodes").is_some_and(Json::is_array) && json.get("links").is_some()
}

/// An API-format workflow converted from a UI one, and what the conversion could not carry.
#[derive(Debug, Clone, PartialEq)]
pub struct Converted {
    /// `{"<id>": {"class_type", "inputs", "_meta": {"title"}}}`.
    pub api: Json,
    /// Values that had no widget to go to, and similar losses; one line each, naming the node.
    pub warnings: Vec<String>,
}

/// One link of the graph: where it comes from.
#[derive(Debug, Clone, Copy)]
struct LinkSource {
    origin: i64,
    slot: usize,
}

struct UiNode<'a> {
    id: i64,
    class_type: &'a str,
    mode: i64,
    title: Option<&'a str>,
    /// (input name, type, link id) of every input slot, in slot order.
    inputs: Vec<(&'a str, &'a str, Option<i64>)>,
    widget_values: Option<&'a Json>,
}

/// Converts a UI-format workflow; `widgets_of` gives a class's widget inputs, or `None` for a
/// class no plugin provides.
pub fn to_api(
    ui: &Json,
    widgets_of: impl Fn(&str) -> Option<Vec<WidgetInput>>,
) -> Result<Converted, ParseError> {
    let shape = |what: String| ParseError::Shape(format!("UI workflow: {what}"));
    let nodes_json = ui
        .get("nodes")
        .and_then(Json::as_array)
        .ok_or_else(|| shape("`nodes` must be a list".into()))?;
    let links = parse_links(ui.get("links").unwrap_or(&Json::Null)).map_err(shape)?;
    let subgraphs: Vec<&str> = ui
        .pointer("/definitions/subgraphs")
        .and_then(Json::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|s| s.get("id").and_then(Json::as_str))
                .collect()
        })
        .unwrap_or_default();

    let mut nodes: BTreeMap<i64, UiNode> = BTreeMap::new();
    for (index, node) in nodes_json.iter().enumerate() {
        let parsed = parse_node(node).map_err(|e| shape(format!("node #{index}: {e}")))?;
        if parsed.class_type.starts_with("workflow>")
            || parsed.class_type.starts_with("workflow/")
            || subgraphs.contains(&parsed.class_type)
        {
            return Err(shape(format!(
                "node {} is a group node or subgraph (`{}`); convert it back to its nodes in \
                 the editor (right-click, \"Convert to nodes\" / \"Unpack subgraph\") and save again",
                parsed.id, parsed.class_type
            )));
        }
        if nodes.insert(parsed.id, parsed).is_some() {
            return Err(shape(format!("two nodes have the id {}", node["id"])));
        }
    }

    let mut warnings = Vec::new();
    let mut api = Map::new();
    for node in nodes.values() {
        if node.mode == MODE_MUTED
            || node.mode == MODE_BYPASSED
            || VIRTUAL_CLASSES.contains(&node.class_type)
        {
            continue;
        }
        let mut inputs = Map::new();
        if let Some(widgets) = widgets_of(node.class_type) {
            let values = widget_values(node, &widgets, &mut warnings);
            inputs.extend(values);
        }
        for &(name, input_type, link) in &node.inputs {
            let Some(link) = link else { continue };
            if let Some(source) = resolve_link(link, input_type, &nodes, &links) {
                inputs.insert(
                    name.to_owned(),
                    json!([source.origin.to_string(), source.slot]),
                );
            }
        }
        let mut entry = json!({"class_type": node.class_type, "inputs": inputs});
        if let Some(title) = node.title {
            entry["_meta"] = json!({"title": title});
        }
        api.insert(node.id.to_string(), entry);
    }
    // Links into nodes that are not run (muted) are dropped, as the frontend drops them.
    let kept: Vec<String> = api.keys().cloned().collect();
    for entry in api.values_mut() {
        if let Some(inputs) = entry["inputs"].as_object_mut() {
            inputs.retain(|_, v| match v.as_array() {
                Some(link) if link.len() == 2 && link[1].is_u64() => link[0]
                    .as_str()
                    .is_some_and(|id| kept.iter().any(|k| k == id)),
                _ => true,
            });
        }
    }
    if api.is_empty() {
        return Err(shape(
            "no node would run (all are muted, bypassed or notes)".into(),
        ));
    }
    Ok(Converted {
        api: Json::Object(api),
        warnings,
    })
}

/// `links` as lists `[id, origin, slot, target, slot, type]` (format 0.4) or objects
/// `{id, origin_id, origin_slot, ...}` (format 1).
fn parse_links(links: &Json) -> Result<HashMap<i64, LinkSource>, String> {
    let mut out = HashMap::new();
    let Some(list) = links.as_array() else {
        return if links.is_null() {
            Ok(out)
        } else {
            Err("`links` must be a list".into())
        };
    };
    for link in list {
        let fields = match link {
            Json::Array(a) => (a.first(), a.get(1), a.get(2)),
            Json::Object(o) => (o.get("id"), o.get("origin_id"), o.get("origin_slot")),
            _ => (None, None, None),
        };
        let (Some(id), Some(origin), Some(slot)) = (
            fields.0.and_then(json_id),
            fields.1.and_then(json_id),
            fields.2.and_then(Json::as_u64),
        ) else {
            return Err(format!("malformed link {link}"));
        };
        out.insert(
            id,
            LinkSource {
                origin,
                slot: slot as usize,
            },
        );
    }
    Ok(out)
}

/// A node or link id: a number, or a string of one.
fn json_id(value: &Json) -> Option<i64> {
    value
        .as_i64()
        .or_else(|| value.as_str().and_then(|s| s.parse().ok()))
}

fn parse_node(node: &Json) -> Result<UiNode<'_>, String> {
    let id = node
        .get("id")
        .and_then(json_id)
        .ok_or("has no numeric `id`")?;
    let class_type = node
        .get("type")
        .and_then(Json::as_str)
        .ok_or_else(|| format!("node {id} has no `type`"))?;
    let inputs = match node.get("inputs") {
        None | Some(Json::Null) => Vec::new(),
        Some(Json::Array(slots)) => slots
            .iter()
            .map(|slot| {
                let name = slot
                    .get("name")
                    .and_then(Json::as_str)
                    .ok_or_else(|| format!("node {id}: an input has no name"))?;
                let input_type = slot.get("type").and_then(Json::as_str).unwrap_or("*");
                Ok((name, input_type, slot.get("link").and_then(json_id)))
            })
            .collect::<Result<_, String>>()?,
        Some(_) => return Err(format!("node {id}: `inputs` must be a list")),
    };
    Ok(UiNode {
        id,
        class_type,
        mode: node.get("mode").and_then(Json::as_i64).unwrap_or(0),
        title: node.get("title").and_then(Json::as_str),
        inputs,
        widget_values: node.get("widgets_values"),
    })
}

/// Follows link `link` back through reroutes and bypassed nodes to the node that produces the
/// value; `None` when it ends at a primitive, a muted node or an unconnected slot.
fn resolve_link(
    link: i64,
    input_type: &str,
    nodes: &BTreeMap<i64, UiNode>,
    links: &HashMap<i64, LinkSource>,
) -> Option<LinkSource> {
    let mut source = *links.get(&link)?;
    // Each hop moves to a different link; a cycle of reroutes would loop, so hops are bounded.
    for _ in 0..=nodes.len() {
        let origin = nodes.get(&source.origin)?;
        let next_link = if origin.class_type == "Reroute" {
            origin.inputs.first()?.2?
        } else if origin.mode == MODE_BYPASSED {
            // A bypassed node passes on the input at the output's slot when its type fits,
            // else its first input of the link's type.
            let fits =
                |slot_type: &str| slot_type == input_type || slot_type == "*" || input_type == "*";
            let same_slot = origin
                .inputs
                .get(source.slot)
                .filter(|(_, t, link)| fits(t) && link.is_some());
            let by_type = || {
                origin
                    .inputs
                    .iter()
                    .find(|(_, t, link)| *t == input_type && link.is_some())
            };
            same_slot.or_else(by_type)?.2?
        } else if VIRTUAL_CLASSES.contains(&origin.class_type) {
            return None;
        } else {
            return Some(source);
        };
        source = *links.get(&next_link)?;
    }
    None
}

/// The literal inputs of `node` from its stored widget values.
fn widget_values(
    node: &UiNode,
    widgets: &[WidgetInput],
    warnings: &mut Vec<String>,
) -> Map<String, Json> {
    let mut inputs = Map::new();
    match node.widget_values {
        None | Some(Json::Null) => {}
        // Some node packs store their widgets by name.
        Some(Json::Object(by_name)) => {
            for widget in widgets {
                if let Some(value) = by_name.get(&widget.name) {
                    inputs.insert(widget.name.clone(), value.clone());
                }
            }
        }
        Some(Json::Array(values)) => {
            let mut next = 0;
            for (index, widget) in widgets.iter().enumerate() {
                let Some(value) = values.get(next) else { break };
                inputs.insert(widget.name.clone(), value.clone());
                next += 1;
                let following = widgets.get(index + 1);
                if let Some(extra) = values.get(next) {
                    if is_extra_value(widget, extra, following) {
                        next += 1;
                    }
                }
            }
            if next < values.len() {
                warnings.push(format!(
                    "node {} ({}): {} widget value(s) beyond its inputs were ignored: {}",
                    node.id,
                    node.class_type,
                    values.len() - next,
                    Json::Array(values[next..].to_vec())
                ));
            }
        }
        Some(other) => warnings.push(format!(
            "node {} ({}): widget values {other} are neither a list nor an object; ignored",
            node.id, node.class_type
        )),
    }
    inputs
}

/// Whether `extra`, stored after `widget`'s value, belongs to an editor-only widget: the
/// `control_after_generate` choice after a seed (always present after `seed`/`noise_seed`
/// integers, and after other integers and combos that declare it), or an upload button's
/// value after a file combo. A value that fits the next widget is taken as that widget's.
fn is_extra_value(widget: &WidgetInput, extra: &Json, following: Option<&WidgetInput>) -> bool {
    let Some(text) = extra.as_str() else {
        return false;
    };
    let fits_next = following.is_some_and(|next| next.kind.accepts(extra));
    match widget.kind {
        WidgetKind::Int if matches!(widget.name.as_str(), "seed" | "noise_seed") => {
            CONTROL_VALUES.contains(&text)
        }
        WidgetKind::Int => CONTROL_VALUES.contains(&text) && !fits_next,
        WidgetKind::Combo(_) => {
            (CONTROL_VALUES.contains(&text) || UPLOAD_VALUES.contains(&text)) && !fits_next
        }
        _ => false,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn widgets(class: &str) -> Option<Vec<WidgetInput>> {
        let w = |name: &str, kind: WidgetKind| WidgetInput {
            name: name.into(),
            kind,
        };
        let combo =
            |options: &[&str]| WidgetKind::Combo(options.iter().map(|s| s.to_string()).collect());
        match class {
            "KSampler" => Some(vec![
                w("seed", WidgetKind::Int),
                w("steps", WidgetKind::Int),
                w("cfg", WidgetKind::Float),
                w("sampler_name", combo(&["euler", "ddim"])),
                w("scheduler", combo(&["normal", "karras"])),
                w("denoise", WidgetKind::Float),
            ]),
            "LoadImage" => Some(vec![w("image", combo(&["a.png", "b.png"]))]),
            "CLIPTextEncode" => Some(vec![w("text", WidgetKind::String)]),
            "Loader" | "Decode" => Some(vec![]),
            "Packed" => Some(vec![
                w("video", WidgetKind::String),
                w("force_rate", WidgetKind::Int),
            ]),
            _ => None,
        }
    }

    fn node(id: i64, class: &str, mode: i64, inputs: Json, values: Json) -> Json {
        json!({"id": id, "type": class, "mode": mode, "inputs": inputs, "outputs": [], "widgets_values": values})
    }

    #[test]
    fn widget_values_skip_the_seed_control_and_upload_values() {
        let ui = json!({
            "nodes": [
                node(3, "KSampler", 0, json!([{"name": "model", "type": "MODEL", "link": 1}]),
                     json!([156680208700286u64, "randomize", 20, 8.0, "euler", "normal", 1.0])),
                node(5, "LoadImage", 0, json!([]), json!(["b.png", "image"])),
                node(1, "Loader", 0, json!([]), json!([])),
            ],
            "links": [[1, 1, 0, 3, 0, "MODEL"]],
            "version": 0.4
        });
        let converted = to_api(&ui, widgets).unwrap();
        assert_eq!(converted.warnings, Vec::<String>::new());
        assert_eq!(
            converted.api["3"]["inputs"],
            json!({"seed": 156680208700286u64, "steps": 20, "cfg": 8.0, "sampler_name": "euler",
                   "scheduler": "normal", "denoise": 1.0, "model": ["1", 0]})
        );
        assert_eq!(converted.api["5"]["inputs"], json!({"image": "b.png"}));
    }

    #[test]
    fn links_pass_through_reroutes_and_bypassed_nodes_and_stop_at_muted_ones() {
        let ui = json!({
            "nodes": [
                node(1, "Loader", 0, json!([]), json!([])),
                node(2, "Reroute", 0, json!([{"name": "", "type": "*", "link": 10}]), json!([])),
                node(3, "Decode", 4, json!([{"name": "samples", "type": "LATENT", "link": 12},
                                            {"name": "model", "type": "MODEL", "link": 11}]), json!([])),
                node(4, "Decode", 0, json!([{"name": "model", "type": "MODEL", "link": 13}]), json!([])),
                node(5, "Loader", 2, json!([]), json!([])),
                node(6, "Decode", 0, json!([{"name": "model", "type": "MODEL", "link": 14}]), json!([])),
                node(7, "Note", 0, json!([]), json!(["hello"])),
            ],
            "links": [
                {"id": 10, "origin_id": 1, "origin_slot": 0, "target_id": 2, "target_slot": 0, "type": "MODEL"},
                {"id": 11, "origin_id": 2, "origin_slot": 0, "target_id": 3, "target_slot": 1, "type": "MODEL"},
                {"id": 13, "origin_id": 3, "origin_slot": 0, "target_id": 4, "target_slot": 0, "type": "MODEL"},
                {"id": 14, "origin_id": 5, "origin_slot": 0, "target_id": 6, "target_slot": 0, "type": "MODEL"}
            ],
            "version": 1
        });
        let converted = to_api(&ui, widgets).unwrap();
        let api = converted.api.as_object().unwrap();
        let mut ids: Vec<&String> = api.keys().collect();
        ids.sort();
        assert_eq!(ids, ["1", "4", "6"]);
        assert_eq!(api["4"]["inputs"], json!({"model": ["1", 0]}));
        assert_eq!(api["6"]["inputs"], json!({}));
    }

    #[test]
    fn widgets_stored_by_name_and_unknown_classes() {
        let ui = json!({
            "nodes": [
                node(1, "Packed", 0, json!([]), json!({"video": "clip.mp4", "force_rate": 8, "videopreview": {}})),
                node(2, "SomePack_Node", 0, json!([{"name": "x", "type": "IMAGE", "link": 1}]), json!([1, 2])),
            ],
            "links": [[1, 1, 0, 2, 0, "IMAGE"]]
        });
        let converted = to_api(&ui, widgets).unwrap();
        assert_eq!(
            converted.api["1"]["inputs"],
            json!({"video": "clip.mp4", "force_rate": 8})
        );
        assert_eq!(converted.api["2"]["class_type"], "SomePack_Node");
        assert_eq!(converted.api["2"]["inputs"], json!({"x": ["1", 0]}));
    }

    #[test]
    fn surplus_values_warn_and_group_nodes_are_refused() {
        let ui = json!({
            "nodes": [node(1, "CLIPTextEncode", 0, json!([]), json!(["a cat", 7]))],
            "links": []
        });
        let converted = to_api(&ui, widgets).unwrap();
        assert_eq!(converted.api["1"]["inputs"], json!({"text": "a cat"}));
        assert_eq!(converted.warnings.len(), 1);
        assert!(converted.warnings[0].contains("node 1 (CLIPTextEncode)"));

        let grouped =
            json!({"nodes": [node(1, "workflow>My group", 0, json!([]), json!([]))], "links": []});
        let error = to_api(&grouped, widgets).unwrap_err().to_string();
        assert!(error.contains("group node"), "{error}");
        let muted = json!({"nodes": [node(1, "Loader", 2, json!([]), json!([]))], "links": []});
        assert!(to_api(&muted, widgets).is_err());
    }

    #[test]
    fn reroute_cycles_end() {
        let ui = json!({
            "nodes": [
                node(1, "Reroute", 0, json!([{"name": "", "type": "*", "link": 2}]), json!([])),
                node(2, "Reroute", 0, json!([{"name": "", "type": "*", "link": 1}]), json!([])),
                node(3, "Decode", 0, json!([{"name": "model", "type": "MODEL", "link": 1}]), json!([])),
            ],
            "links": [[1, 1, 0, 2, 0, "*"], [2, 2, 0, 1, 0, "*"]]
        });
        let converted = to_api(&ui, widgets).unwrap();
        assert_eq!(converted.api["3"]["inputs"], json!({}));
    }
}
