//! Workflows in ComfyUI's API format:
//! `{"<id>": {"class_type": "...", "inputs": {"<name>": <literal> | ["<source id>", <output index>]}, "_meta": {"title": "..."}}}`,
//! also accepted wrapped as `{"prompt": {...}}`.

use std::collections::BTreeMap;

use serde_json::Value as Json;

/// A parsed workflow: nodes by id (ordered, so reports are stable).
#[derive(Debug, Clone, PartialEq)]
pub struct Workflow {
    pub nodes: BTreeMap<String, WorkflowNode>,
}

#[derive(Debug, Clone, PartialEq)]
pub struct WorkflowNode {
    pub class_type: String,
    pub inputs: BTreeMap<String, Input>,
    pub title: Option<String>,
}

/// An input is either a link to another node's output or a literal.
#[derive(Debug, Clone, PartialEq)]
pub enum Input {
    Link { node: String, output: usize },
    Literal(Json),
}

/// The workflow file cannot be read as a workflow at all (as opposed to a workflow with
/// invalid nodes, which validation reports per node).
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum ParseError {
    #[error("malformed JSON at line {line}, column {column}: {message}")]
    Json {
        line: usize,
        column: usize,
        message: String,
    },
    #[error("{0}")]
    Shape(String),
}

impl Workflow {
    pub fn parse(text: &str) -> Result<Self, ParseError> {
        Self::from_json(parse_json(text)?)
    }

    pub fn from_json(json: Json) -> Result<Self, ParseError> {
        let Json::Object(mut top) = json else {
            return Err(ParseError::Shape(
                "a workflow is a JSON object of nodes keyed by id".into(),
            ));
        };
        // ComfyUI's /prompt body wraps the graph as {"prompt": {...}, "client_id": ...}.
        if let Some(Json::Object(prompt)) = top.remove("prompt") {
            top = prompt;
        }
        if top.values().any(|v| v.get("class_type").is_none())
            && top.contains_key("nodes")
            && top.contains_key("links")
        {
            return Err(ParseError::Shape(
                "this is a ComfyUI UI workflow (nodes/links): read it with `ui_workflow::parse_workflow`, \
                 which needs the loaded nodes"
                    .into(),
            ));
        }
        let mut nodes = BTreeMap::new();
        for (id, node) in top {
            nodes.insert(id.clone(), parse_node(&id, node)?);
        }
        if nodes.is_empty() {
            return Err(ParseError::Shape("the workflow has no nodes".into()));
        }
        Ok(Workflow { nodes })
    }

    /// The workflow in the API format.
    pub fn to_json(&self) -> Json {
        let nodes: serde_json::Map<String, Json> = self
            .nodes
            .iter()
            .map(|(id, node)| {
                let inputs: serde_json::Map<String, Json> = node
                    .inputs
                    .iter()
                    .map(|(name, input)| {
                        let value = match input {
                            Input::Link { node, output } => serde_json::json!([node, output]),
                            Input::Literal(value) => value.clone(),
                        };
                        (name.clone(), value)
                    })
                    .collect();
                let mut entry =
                    serde_json::json!({"class_type": node.class_type, "inputs": inputs});
                if let Some(title) = &node.title {
                    entry["_meta"] = serde_json::json!({ "title": title });
                }
                (id.clone(), entry)
            })
            .collect();
        Json::Object(nodes)
    }

    /// Replaces the literal `input` of node `id` (`--set ID.INPUT=VALUE`).
    pub fn set_literal(&mut self, id: &str, input: &str, value: Json) -> Result<(), String> {
        let node = self
            .nodes
            .get_mut(id)
            .ok_or_else(|| format!("--set: there is no node `{id}`"))?;
        node.inputs.insert(input.to_owned(), Input::Literal(value));
        Ok(())
    }
}

/// JSON text as a value, with the position of a syntax error.
pub fn parse_json(text: &str) -> Result<Json, ParseError> {
    serde_json::from_str(text).map_err(|e| ParseError::Json {
        line: e.line(),
        column: e.column(),
        message: strip_position(&e.to_string()),
    })
}

fn parse_node(id: &str, node: Json) -> Result<WorkflowNode, ParseError> {
    let shape = |what: &str| ParseError::Shape(format!("node {id}: {what}"));
    let Json::Object(mut node) = node else {
        return Err(shape("must be an object"));
    };
    let class_type = match node.remove("class_type") {
        Some(Json::String(s)) => s,
        Some(_) => return Err(shape("`class_type` must be a string")),
        None => return Err(shape("has no `class_type`")),
    };
    let inputs = match node.remove("inputs") {
        None => BTreeMap::new(),
        Some(Json::Object(inputs)) => inputs
            .into_iter()
            .map(|(name, v)| (name, parse_input(v)))
            .collect(),
        Some(_) => return Err(shape("`inputs` must be an object")),
    };
    let title = node
        .get("_meta")
        .and_then(|m| m.get("title"))
        .and_then(Json::as_str)
        .map(str::to_owned);
    Ok(WorkflowNode {
        class_type,
        inputs,
        title,
    })
}

/// `["id", index]` (id as string or number) is a link; anything else is a literal.
fn parse_input(value: Json) -> Input {
    if let Json::Array(items) = &value {
        if let [source, Json::Number(index)] = items.as_slice() {
            let node = match source {
                Json::String(s) => Some(s.clone()),
                Json::Number(n) => Some(n.to_string()),
                _ => None,
            };
            if let (Some(node), Some(output)) = (node, index.as_u64()) {
                return Input::Link {
                    node,
                    output: output as usize,
                };
            }
        }
    }
    Input::Literal(value)
}

/// serde_json appends " at line L column C"; the error carries those separately.
fn strip_position(message: &str) -> String {
    match message.rfind(" at line ") {
        Some(i) => message[..i].to_owned(),
        None => message.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_links_literals_and_wrapped_prompts() {
        let text = r#"{"prompt": {"1": {"class_type": "A", "inputs": {"x": 3, "y": ["2", 0], "z": [1, 2]}, "_meta": {"title": "t"}},
                                 "2": {"class_type": "B", "inputs": {}}}}"#;
        let wf = Workflow::parse(text).unwrap();
        let a = &wf.nodes["1"];
        assert_eq!(a.title.as_deref(), Some("t"));
        assert_eq!(a.inputs["x"], Input::Literal(serde_json::json!(3)));
        assert_eq!(
            a.inputs["y"],
            Input::Link {
                node: "2".into(),
                output: 0
            }
        );
        assert_eq!(
            a.inputs["z"],
            Input::Link {
                node: "1".into(),
                output: 2
            }
        );
    }

    #[test]
    fn malformed_json_reports_line_and_column() {
        let err = Workflow::parse("{\n  \"1\": {\"class_type\": }\n}").unwrap_err();
        match err {
            ParseError::Json { line, column, .. } => assert_eq!((line, column), (2, 23)),
            other => panic!("unexpected {other:?}"),
        }
    }
}
