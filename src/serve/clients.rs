//! Connected websocket clients, and the event sink that forwards a prompt's run to them in
//! ComfyUI's message shapes.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use serde_json::{json, Map, Value as Json};
use tokio::sync::mpsc::UnboundedSender;

use crate::events::{Event, EventSink};

/// A websocket message on its way to a client.
pub enum Outgoing {
    /// A JSON event.
    Text(String),
    /// A binary frame: a preview image.
    Binary(Vec<u8>),
}

/// ComfyUI's binary event type of a preview image, and its image type for PNG: a preview frame
/// is both, as big-endian u32s, then the image.
const PREVIEW_IMAGE_EVENT: u32 = 1;
const PNG_IMAGE_TYPE: u32 = 2;

/// The open websockets, by client id.
#[derive(Default)]
pub struct Clients {
    senders: Mutex<HashMap<String, UnboundedSender<Outgoing>>>,
}

impl Clients {
    pub fn connect(&self, client_id: &str, sender: UnboundedSender<Outgoing>) {
        self.lock().insert(client_id.to_owned(), sender);
    }

    pub fn disconnect(&self, client_id: &str) {
        self.lock().remove(client_id);
    }

    /// Sends `{"type": kind, "data": data}` to `client_id`, or to every client when there is
    /// none (a prompt queued without a client id is everyone's). A client that has gone
    /// misses the message.
    pub fn send(&self, client_id: Option<&str>, kind: &str, data: Json) {
        let text = json!({"type": kind, "data": data}).to_string();
        self.deliver(client_id, || Outgoing::Text(text.clone()));
    }

    /// Sends a PNG preview as ComfyUI's binary frame, to `client_id` or to every client.
    pub fn send_preview(&self, client_id: Option<&str>, png: &[u8]) {
        let mut frame = Vec::with_capacity(8 + png.len());
        frame.extend(PREVIEW_IMAGE_EVENT.to_be_bytes());
        frame.extend(PNG_IMAGE_TYPE.to_be_bytes());
        frame.extend_from_slice(png);
        self.deliver(client_id, || Outgoing::Binary(frame.clone()));
    }

    fn deliver(&self, client_id: Option<&str>, message: impl Fn() -> Outgoing) {
        let senders = self.lock();
        match client_id {
            Some(id) => {
                if let Some(sender) = senders.get(id) {
                    let _ = sender.send(message());
                }
            }
            None => {
                for sender in senders.values() {
                    let _ = sender.send(message());
                }
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, UnboundedSender<Outgoing>>> {
        self.senders.lock().unwrap_or_else(|e| e.into_inner())
    }
}

/// Milliseconds since the Unix epoch, as ComfyUI stamps its messages.
pub fn timestamp_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// How often one node's progress is forwarded at most: a node that reports every one of
/// millions of tiny steps must not flood the websocket. The first and the last step always go.
const PROGRESS_INTERVAL: Duration = Duration::from_millis(100);

/// What a prompt's run reported, for its history entry.
#[derive(Default)]
pub struct RunRecord {
    /// `[type, data]` of the start, cache, and end messages, as ComfyUI's history keeps them.
    pub messages: Vec<Json>,
    /// Each output node's `ui` JSON, by node id.
    pub outputs: Map<String, Json>,
}

/// Forwards one prompt's events to its client, with the prompt id and a timestamp, and keeps
/// what the history entry needs.
pub struct PromptEvents<'a> {
    pub clients: &'a Clients,
    pub client_id: Option<String>,
    pub prompt_id: String,
    pub record: Mutex<RunRecord>,
    last_progress: Mutex<Option<Instant>>,
}

impl<'a> PromptEvents<'a> {
    pub fn new(clients: &'a Clients, client_id: Option<String>, prompt_id: String) -> Self {
        Self {
            clients,
            client_id,
            prompt_id,
            record: Mutex::new(RunRecord::default()),
            last_progress: Mutex::new(None),
        }
    }

    /// Sends one message of this prompt.
    pub fn send(&self, kind: &str, mut data: Map<String, Json>) {
        data.insert("prompt_id".into(), json!(self.prompt_id));
        data.insert("timestamp".into(), json!(timestamp_ms()));
        let data = Json::Object(data);
        if matches!(
            kind,
            "execution_start"
                | "execution_cached"
                | "execution_success"
                | "execution_error"
                | "execution_interrupted"
        ) {
            self.record
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .messages
                .push(json!([kind, data]));
        }
        self.clients.send(self.client_id.as_deref(), kind, data);
    }

    /// Whether a progress step is worth sending now (see [`PROGRESS_INTERVAL`]).
    fn progress_due(&self, value: u64, max: u64) -> bool {
        let mut last = self.last_progress.lock().unwrap_or_else(|e| e.into_inner());
        let now = Instant::now();
        let due = value <= 1
            || value >= max
            || last.is_none_or(|at| now.duration_since(at) >= PROGRESS_INTERVAL);
        if due {
            *last = Some(now);
        }
        due
    }
}

impl EventSink for PromptEvents<'_> {
    fn preview(&self, _node: &str, png: &[u8]) {
        self.clients.send_preview(self.client_id.as_deref(), png);
    }

    fn emit(&self, event: Event) {
        if let Event::Progress { value, max, .. } = &event {
            if !self.progress_due(*value, *max) {
                return;
            }
        }
        let event = match event {
            Event::Executed { node, output } => {
                let output = for_the_editor(output);
                if !output.is_null() {
                    self.record
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .outputs
                        .insert(node.clone(), output.clone());
                }
                Event::Executed { node, output }
            }
            other => other,
        };
        let message = event.to_json();
        let kind = message["type"].as_str().unwrap_or_default().to_owned();
        let mut data = match message.get("data") {
            Some(Json::Object(data)) => data.clone(),
            _ => Map::new(),
        };
        if kind == "executed" {
            // ComfyUI names the node whose widget shows the output; without groups it is the
            // node itself.
            let node = data.get("node").cloned().unwrap_or(Json::Null);
            data.insert("display_node".into(), node);
        }
        self.send(&kind, data);
    }
}

/// The extensions of files the editor shows in a `<video>` element.
const VIDEO_EXTENSIONS: &[&str] = &[".mp4", ".webm", ".mov", ".mkv"];

/// A node's `ui` output as the editor takes it. File entries lose their `fullpath`: the
/// server's folders are nobody's business over the network, and `/view` finds files by
/// `filename`, `subfolder` and `type`. The editor previews only `images` (ComfyUI's core
/// video nodes report theirs there, with `animated: [true]`); vdm's `videos` and Video Helper
/// Suite's `gifs` (whose own previews come from that pack's script, not loaded here) are
/// listed under `images` as well, flagged `animated` when they are video files, which the
/// editor plays as video. A GIF is left unflagged: the editor would put it in a `<video>`
/// element, which cannot play it, while an `<img>` animates it.
pub fn for_the_editor(mut output: Json) -> Json {
    strip_full_paths(&mut output);
    let Json::Object(fields) = &mut output else {
        return output;
    };
    if fields.contains_key("images") {
        return output;
    }
    let files: Vec<Json> = ["videos", "gifs"]
        .iter()
        .filter_map(|key| fields.get(*key)?.as_array())
        .flatten()
        .filter(|entry| entry.get("filename").is_some_and(Json::is_string))
        .cloned()
        .collect();
    if files.is_empty() {
        return output;
    }
    let all_video = files.iter().all(|entry| {
        let name = entry["filename"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        VIDEO_EXTENSIONS.iter().any(|ext| name.ends_with(ext))
    });
    if all_video {
        fields.insert("animated".into(), json!([true]));
    }
    fields.insert("images".into(), Json::Array(files));
    output
}

/// Removes every `fullpath` field, at any depth.
fn strip_full_paths(value: &mut Json) {
    match value {
        Json::Object(fields) => {
            fields.remove("fullpath");
            fields.values_mut().for_each(strip_full_paths);
        }
        Json::Array(items) => items.iter_mut().for_each(strip_full_paths),
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn outputs_lose_full_paths_and_videos_are_listed_as_images() {
        let gif = for_the_editor(json!({"videos": [
            {"filename": "a.gif", "subfolder": "", "type": "output", "fullpath": "/srv/out/a.gif"}]}));
        let entry = json!({"filename": "a.gif", "subfolder": "", "type": "output"});
        assert_eq!(gif, json!({"videos": [entry], "images": [entry]}));

        let mp4 = for_the_editor(json!({"gifs": [
            {"filename": "b.mp4", "subfolder": "s", "type": "output", "format": "video/h264-mp4",
             "fullpath": "/srv/out/s/b.mp4"}]}));
        assert_eq!(mp4["animated"], json!([true]));
        assert_eq!(mp4["images"], mp4["gifs"]);
        assert!(mp4["images"][0].get("fullpath").is_none());

        let images = json!({"images": [{"filename": "c.png"}], "videos": [{"filename": "d.gif"}]});
        assert_eq!(for_the_editor(images.clone()), images);
        assert_eq!(for_the_editor(json!({"value": 5})), json!({"value": 5}));
    }
}
