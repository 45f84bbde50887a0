//! The HTTP routes, at ComfyUI's paths and again under `/api`.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::ws::{Message, WebSocket, WebSocketUpgrade};
use axum::extract::{DefaultBodyLimit, Multipart, Path as UrlPath, Query, State};
use axum::http::{header, StatusCode};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json as Reply, Router};
use serde_json::{json, Map, Value as Json};
use tower_http::limit::RequestBodyLimitLayer;
use tower_http::services::ServeDir;

use super::clients::Outgoing;
use super::jobs;
use super::queue::QueuedPrompt;
use super::{models, paths, AppState};
use crate::events::Silent;
use crate::execute::Executor;
use crate::validate;

type Shared = State<Arc<AppState>>;

/// The most a JSON request body may hold.
const JSON_LIMIT: usize = 16 << 20;
/// The most an upload may hold.
const UPLOAD_LIMIT: usize = 256 << 20;

pub fn router(state: Arc<AppState>) -> Router {
    // Bodies are bounded from their declared length, before any is read, so an oversize
    // request is answered 413 at once rather than after 16 MiB have been taken in.
    let uploads = Router::new()
        .route("/upload/image", post(upload_image))
        .layer(RequestBodyLimitLayer::new(UPLOAD_LIMIT));
    let requests = Router::new()
        .route("/ws", get(websocket))
        .route("/object_info", get(object_info))
        .route("/object_info/{class}", get(object_info_of))
        .route("/prompt", get(prompt_status).post(queue_prompt))
        .route("/queue", get(queue_listing).post(queue_edit))
        .route("/interrupt", post(interrupt))
        .route("/jobs", get(jobs_list))
        .route("/jobs/cancel", post(jobs_cancel))
        .route("/jobs/{job_id}", get(job_detail))
        .route("/jobs/{job_id}/cancel", post(job_cancel))
        .route("/history", get(history).post(history_edit))
        .route("/history/{prompt_id}", get(history_of))
        .route("/view", get(view))
        .route("/system_stats", get(system_stats))
        .route("/embeddings", get(|| async { Reply(json!([])) }))
        .route("/extensions", get(|| async { Reply(json!([])) }))
        .route("/i18n", get(|| async { Reply(json!({})) }))
        .route("/features", get(features))
        .route("/models", get(model_folders))
        .route("/models/{folder}", get(model_files))
        .route(
            "/users",
            get(|| async { Reply(json!({"storage": "server", "migrated": true})) }),
        )
        .route("/settings", get(settings).post(settings_update))
        .route("/settings/{id}", get(setting).post(setting_update))
        .route("/userdata", get(userdata_list))
        .route(
            "/userdata/{*file}",
            get(userdata_read)
                .post(userdata_post)
                .delete(userdata_delete),
        )
        .layer(RequestBodyLimitLayer::new(JSON_LIMIT));
    let api = requests.merge(uploads);
    let app = Router::new()
        .merge(api.clone())
        .nest("/api", api)
        .layer(DefaultBodyLimit::disable());
    let app = match &state.options.frontend {
        Some(dir) => app.fallback_service(ServeDir::new(dir)),
        None => app.route("/", get(no_frontend)),
    };
    app.with_state(state)
}

/// `{error, node_errors}` with a prompt-level error, as ComfyUI answers a bad prompt.
fn prompt_error(kind: &str, message: String) -> Response {
    let body = json!({
        "error": {"type": kind, "message": message, "details": "", "extra_info": {}},
        "node_errors": {}
    });
    (StatusCode::BAD_REQUEST, Reply(body)).into_response()
}

fn bad_request(message: &str) -> Response {
    (StatusCode::BAD_REQUEST, message.to_owned()).into_response()
}

fn not_found() -> Response {
    StatusCode::NOT_FOUND.into_response()
}

async fn no_frontend() -> Html<&'static str> {
    Html(
        "<!doctype html><title>vdm serve</title><h1>vdm serve</h1>\
         <p>The API is running, but no editor frontend was found. Install ComfyUI's frontend \
         with <code>pip install comfyui-frontend-package</code> and restart, or point \
         <code>vdm serve --frontend DIR</code> (or <code>VDM_FRONTEND</code>) at its \
         <code>static</code> folder.</p>",
    )
}

async fn websocket(
    State(state): Shared,
    Query(query): Query<HashMap<String, String>>,
    upgrade: WebSocketUpgrade,
) -> Response {
    let client_id = query
        .get("clientId")
        .filter(|id| !id.is_empty())
        .cloned()
        .unwrap_or_else(new_id);
    upgrade.on_upgrade(move |socket| client_session(state, client_id, socket))
}

/// Forwards the client's messages until it goes away.
async fn client_session(state: Arc<AppState>, client_id: String, mut socket: WebSocket) {
    let (sender, mut receiver) = tokio::sync::mpsc::unbounded_channel();
    state.clients.connect(&client_id, sender);
    let hello = json!({"type": "status", "data": state.queue.status(Some(&client_id))});
    if socket
        .send(Message::Text(hello.to_string().into()))
        .await
        .is_ok()
    {
        loop {
            tokio::select! {
                outgoing = receiver.recv() => match outgoing {
                    Some(outgoing) => {
                        let message = match outgoing {
                            Outgoing::Text(text) => Message::Text(text.into()),
                            Outgoing::Binary(bytes) => Message::Binary(bytes.into()),
                        };
                        if socket.send(message).await.is_err() {
                            break;
                        }
                    }
                    None => break,
                },
                incoming = socket.recv() => match incoming {
                    Some(Ok(Message::Close(_))) | Some(Err(_)) | None => break,
                    Some(Ok(_)) => {}
                },
            }
        }
    }
    state.clients.disconnect(&client_id);
}

/// A fresh random id in the UUID text form the frontend expects.
fn new_id() -> String {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let mut words = [0u64; 2];
    for word in &mut words {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u64(COUNTER.fetch_add(1, Ordering::Relaxed));
        hasher.write_u128(super::clients::timestamp_ms() as u128);
        *word = hasher.finish();
    }
    let hex = format!("{:016x}{:016x}", words[0], words[1]);
    format!(
        "{}-{}-4{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

async fn object_info(State(state): Shared) -> Reply<Json> {
    let mut info = crate::object_info::object_info(state.plugins.descriptors(), "vdm_nodes");
    models::fill_model_combos(&mut info, state.options.models.as_deref());
    Reply(info)
}

async fn object_info_of(State(state): Shared, UrlPath(class): UrlPath<String>) -> Reply<Json> {
    let found = state
        .plugins
        .descriptors()
        .find(|d| d.class_type.as_str() == class)
        .map(|d| crate::object_info::node_info(d, "vdm_nodes"));
    let mut info = match found {
        Some(info) => json!({ class: info }),
        None => json!({}),
    };
    models::fill_model_combos(&mut info, state.options.models.as_deref());
    Reply(info)
}

async fn prompt_status(State(state): Shared) -> Reply<Json> {
    Reply(json!({"exec_info": {"queue_remaining": state.queue.remaining()}}))
}

/// Parses, validates and queues `{client_id, prompt, extra_data}`.
async fn queue_prompt(State(state): Shared, body: Bytes) -> Response {
    let request: Json = match serde_json::from_slice(&body) {
        Ok(request @ Json::Object(_)) => request,
        Ok(_) => return prompt_error("invalid_prompt", "the body is not a JSON object".into()),
        Err(e) => return prompt_error("invalid_prompt", format!("the body is not JSON: {e}")),
    };
    let Some(prompt) = request.get("prompt").filter(|p| p.is_object()).cloned() else {
        return prompt_error("no_prompt", "no prompt in the request".into());
    };
    let workflow = match crate::ui_workflow::parse_workflow(&prompt.to_string(), &state.plugins) {
        Ok((workflow, _warnings)) => workflow,
        Err(e) => return prompt_error("invalid_prompt", e.to_string()),
    };
    let validation_state = state.clone();
    let checked = tokio::task::spawn_blocking(move || {
        let state = validation_state;
        let mut executor = Executor::new(&state.plugins, &Silent);
        for (key, value) in super::executor_settings(&state.options) {
            executor = executor.with_setting(&key, value);
        }
        let report = executor.validate(&workflow);
        (workflow, report)
    })
    .await;
    let (workflow, report) = match checked {
        Ok(checked) => checked,
        Err(e) => return prompt_error("invalid_prompt", format!("validation failed: {e}")),
    };
    if !report.is_ok() {
        let body = serde_json::to_value(&report).unwrap_or_else(|_| json!({}));
        return (StatusCode::BAD_REQUEST, Reply(body)).into_response();
    }
    let number = state.queue.number();
    let prompt_id = request
        .get("prompt_id")
        .and_then(Json::as_str)
        .filter(|id| !id.is_empty())
        .map_or_else(new_id, str::to_owned);
    let client_id = request
        .get("client_id")
        .and_then(Json::as_str)
        .filter(|id| !id.is_empty())
        .map(str::to_owned);
    let mut extra_data = request.get("extra_data").cloned().unwrap_or(json!({}));
    if let Json::Object(extra) = &mut extra_data {
        if let Some(id) = &client_id {
            extra.insert("client_id".into(), json!(id));
        }
        // As ComfyUI: the jobs API sorts and shows jobs by it.
        extra.insert("create_time".into(), json!(super::clients::timestamp_ms()));
    }
    let outputs_to_execute = validate::output_nodes(&workflow, &state.plugins);
    let front = request
        .get("front")
        .and_then(Json::as_bool)
        .unwrap_or(false);
    state.queue.push(
        QueuedPrompt {
            number,
            id: prompt_id.clone(),
            prompt,
            workflow,
            extra_data,
            client_id,
            outputs_to_execute,
        },
        front,
    );
    Reply(json!({"prompt_id": prompt_id, "number": number, "node_errors": {}})).into_response()
}

async fn queue_listing(State(state): Shared) -> Reply<Json> {
    Reply(state.queue.listing())
}

/// The ids in a `{"delete": [...]}` body.
fn ids_to_delete(body: &Json) -> Vec<String> {
    body.get("delete")
        .and_then(Json::as_array)
        .map(|ids| {
            ids.iter()
                .filter_map(Json::as_str)
                .map(str::to_owned)
                .collect()
        })
        .unwrap_or_default()
}

/// The body as JSON, or `None` when it is not JSON.
fn json_body(body: &Bytes) -> Option<Json> {
    serde_json::from_slice(body).ok()
}

async fn queue_edit(State(state): Shared, body: Bytes) -> Response {
    let Some(body) = json_body(&body) else {
        return bad_request("the body is not JSON");
    };
    if body.get("clear").and_then(Json::as_bool) == Some(true) {
        state.queue.clear_pending();
    }
    state.queue.delete_pending(&ids_to_delete(&body));
    StatusCode::OK.into_response()
}

/// `{}` or `{"prompt_id": …}`: the latter stops only that prompt, if it is the one running.
async fn interrupt(State(state): Shared, body: Bytes) -> StatusCode {
    let body = json_body(&body).unwrap_or(Json::Null);
    state.queue.interrupt(body["prompt_id"].as_str());
    StatusCode::OK
}

async fn jobs_list(State(state): Shared, Query(query): Query<HashMap<String, String>>) -> Response {
    let query = match jobs::JobsQuery::parse(&query) {
        Ok(query) => query,
        Err(message) => return bad_request(&message),
    };
    let queue = state.queue.listing();
    let history = state.queue.history(None);
    let listings = |key: &str| queue[key].as_array().cloned().unwrap_or_default();
    let history = history.as_object().cloned().unwrap_or_default();
    Reply(jobs::list(
        &listings("queue_running"),
        &listings("queue_pending"),
        &history,
        &query,
    ))
    .into_response()
}

async fn job_detail(State(state): Shared, UrlPath(job_id): UrlPath<String>) -> Response {
    if let Some(entry) = state.queue.history_of(&job_id).get(&job_id) {
        return Reply(jobs::finished_job(&job_id, entry, true)).into_response();
    }
    let queue = state.queue.listing();
    let find = |key: &str| {
        queue[key]
            .as_array()
            .and_then(|listings| listings.iter().find(|l| l[1] == job_id.as_str()))
            .cloned()
    };
    let job = match (find("queue_running"), find("queue_pending")) {
        (Some(listing), _) => jobs::queued_job(&listing, jobs::IN_PROGRESS),
        (None, Some(listing)) => jobs::queued_job(&listing, jobs::PENDING),
        (None, None) => {
            let body = json!({"error": format!("no job `{job_id}`")});
            return (StatusCode::NOT_FOUND, Reply(body)).into_response();
        }
    };
    Reply(job).into_response()
}

async fn job_cancel(State(state): Shared, UrlPath(job_id): UrlPath<String>) -> Response {
    if state.queue.cancel_job(&job_id) {
        StatusCode::OK.into_response()
    } else {
        let body = json!({"error": format!("no running or waiting job `{job_id}`")});
        (StatusCode::NOT_FOUND, Reply(body)).into_response()
    }
}

/// `{"job_ids": [...]}`: each running or waiting one is stopped or dropped.
async fn jobs_cancel(State(state): Shared, body: Bytes) -> Response {
    let Some(body) = json_body(&body) else {
        return bad_request("the body is not JSON");
    };
    let ids = body["job_ids"].as_array().cloned().unwrap_or_default();
    let cancelled: Vec<&str> = ids
        .iter()
        .filter_map(Json::as_str)
        .filter(|id| state.queue.cancel_job(id))
        .collect();
    Reply(json!({"cancelled": cancelled})).into_response()
}

async fn history(
    State(state): Shared,
    Query(query): Query<HashMap<String, String>>,
) -> Reply<Json> {
    let max_items = query.get("max_items").and_then(|n| n.parse().ok());
    Reply(state.queue.history(max_items))
}

async fn history_of(State(state): Shared, UrlPath(prompt_id): UrlPath<String>) -> Reply<Json> {
    Reply(state.queue.history_of(&prompt_id))
}

async fn history_edit(State(state): Shared, body: Bytes) -> Response {
    let Some(body) = json_body(&body) else {
        return bad_request("the body is not JSON");
    };
    if body.get("clear").and_then(Json::as_bool) == Some(true) {
        state.queue.clear_history();
    }
    state.queue.delete_history(&ids_to_delete(&body));
    StatusCode::OK.into_response()
}

/// The folder a `type` names: `output` (the default for viewing), `input` or `temp`.
fn folder_of<'a>(state: &'a AppState, kind: Option<&str>, default: &'a Path) -> Option<&'a Path> {
    match kind {
        None | Some("") => Some(default),
        Some("output") => Some(&state.options.output),
        Some("input") => Some(&state.options.input),
        Some("temp") => Some(&state.options.temp),
        Some(_) => None,
    }
}

async fn view(State(state): Shared, Query(query): Query<HashMap<String, String>>) -> Response {
    let Some(filename) = query.get("filename") else {
        return bad_request("filename is required");
    };
    let Some(base) = folder_of(
        &state,
        query.get("type").map(String::as_str),
        &state.options.output,
    ) else {
        return bad_request("type must be output, input or temp");
    };
    let subfolder = query.get("subfolder").map_or("", String::as_str);
    let Some(path) = paths::join(base, subfolder, filename) else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    if !path.is_file() {
        return not_found();
    }
    if !paths::inside(base, &path) {
        return (StatusCode::FORBIDDEN, "the file leads outside its folder").into_response();
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type(&path))], bytes).into_response(),
        Err(_) => not_found(),
    }
}

/// The media type of a served file, by its extension.
fn content_type(path: &Path) -> &'static str {
    match path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .as_deref()
    {
        Some("gif") => "image/gif",
        Some("png") | Some("apng") => "image/png",
        Some("jpg") | Some("jpeg") => "image/jpeg",
        Some("webp") => "image/webp",
        Some("mp4") => "video/mp4",
        Some("webm") => "video/webm",
        Some("json") => "application/json",
        _ => "application/octet-stream",
    }
}

/// Stores a multipart `image` (with `subfolder`, `type`, `overwrite`) and names where it went.
async fn upload_image(State(state): Shared, mut form: Multipart) -> Response {
    let mut file: Option<(String, Bytes)> = None;
    let mut fields: HashMap<String, String> = HashMap::new();
    loop {
        let field = match form.next_field().await {
            Ok(Some(field)) => field,
            Ok(None) => break,
            Err(e) => return (e.status(), e.body_text()).into_response(),
        };
        let name = field.name().unwrap_or_default().to_owned();
        if name == "image" {
            let filename = field.file_name().unwrap_or_default().to_owned();
            match field.bytes().await {
                Ok(bytes) => file = Some((filename, bytes)),
                Err(e) => return (e.status(), e.body_text()).into_response(),
            }
        } else {
            match field.text().await {
                Ok(text) => {
                    fields.insert(name, text);
                }
                Err(e) => return (e.status(), e.body_text()).into_response(),
            }
        }
    }
    let Some((filename, bytes)) = file else {
        return bad_request("no image in the form");
    };
    let kind = fields.get("type").map(String::as_str);
    let Some(base) = folder_of(&state, kind, &state.options.input) else {
        return bad_request("type must be output, input or temp");
    };
    let base = base.to_path_buf();
    let subfolder = fields.get("subfolder").cloned().unwrap_or_default();
    let overwrite = matches!(
        fields.get("overwrite").map(String::as_str),
        Some("true" | "1")
    );
    let Some(mut path) = paths::join(&base, &subfolder, &filename) else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    let Some(dir) = path.parent().map(Path::to_path_buf) else {
        return bad_request("invalid file name");
    };
    if std::fs::create_dir_all(&dir).is_err() || !paths::inside(&base, &dir) {
        return (
            StatusCode::FORBIDDEN,
            "the folder leads outside the input folder",
        )
            .into_response();
    }
    if !overwrite {
        path = free_name(&path);
    }
    if path
        .symlink_metadata()
        .is_ok_and(|m| m.file_type().is_symlink())
    {
        return (
            StatusCode::FORBIDDEN,
            "will not write through a symbolic link",
        )
            .into_response();
    }
    if let Err(e) = tokio::fs::write(&path, &bytes).await {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or(filename);
    Reply(json!({"name": name, "subfolder": subfolder, "type": kind.unwrap_or("input")}))
        .into_response()
}

/// `path`, or `stem (1).ext`, `stem (2).ext`, ... the first that does not exist.
fn free_name(path: &Path) -> PathBuf {
    if path.symlink_metadata().is_err() {
        return path.to_path_buf();
    }
    let stem = path
        .file_stem()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let extension = path
        .extension()
        .map(|e| format!(".{}", e.to_string_lossy()))
        .unwrap_or_default();
    (1..)
        .map(|n| path.with_file_name(format!("{stem} ({n}){extension}")))
        .find(|candidate| candidate.symlink_metadata().is_err())
        .unwrap_or_else(|| path.to_path_buf())
}

async fn system_stats(State(state): Shared) -> Reply<Json> {
    let devices: Vec<Json> = state
        .options
        .settings
        .get("device")
        .map(|d| json!({"name": d, "type": d, "index": 0, "vram_total": 0, "vram_free": 0, "torch_vram_total": 0, "torch_vram_free": 0}))
        .into_iter()
        .collect();
    let (ram_total, ram_free) = memory_bytes().unwrap_or((0, 0));
    Reply(json!({
        "system": {
            "os": std::env::consts::OS,
            "ram_total": ram_total,
            "ram_free": ram_free,
            "comfyui_version": concat!("vdm ", env!("CARGO_PKG_VERSION")),
            "python_version": "",
            "pytorch_version": "",
            "embedded_python": false,
            "argv": std::env::args().collect::<Vec<_>>(),
        },
        "devices": devices,
    }))
}

/// The machine's memory, total and available, in bytes, from `/proc/meminfo` (ComfyUI reports
/// psutil's `total` and `available`, which are these two lines); `None` where there is no
/// such file.
fn memory_bytes() -> Option<(u64, u64)> {
    parse_meminfo(&std::fs::read_to_string("/proc/meminfo").ok()?)
}

/// `MemTotal` and `MemAvailable` of a `/proc/meminfo` text, in bytes.
fn parse_meminfo(text: &str) -> Option<(u64, u64)> {
    let kib = |key: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(key)?.strip_prefix(':'))
            .and_then(|rest| rest.split_whitespace().next()?.parse::<u64>().ok())
            .map(|n| n * 1024)
    };
    Some((kib("MemTotal")?, kib("MemAvailable")?))
}

async fn features() -> Reply<Json> {
    Reply(json!({"supports_preview_metadata": false, "max_upload_size": UPLOAD_LIMIT}))
}

async fn model_folders(State(state): Shared) -> Reply<Json> {
    let mut folders: Vec<String> = models::MODEL_FOLDERS
        .iter()
        .map(|f| f.to_string())
        .collect();
    if let Some(models) = &state.options.models {
        if let Ok(entries) = std::fs::read_dir(models) {
            for entry in entries.flatten() {
                let name = entry.file_name().to_string_lossy().into_owned();
                if entry.path().is_dir() && !folders.contains(&name) {
                    folders.push(name);
                }
            }
        }
    }
    Reply(json!(folders))
}

async fn model_files(State(state): Shared, UrlPath(folder): UrlPath<String>) -> Response {
    let Some(models) = &state.options.models else {
        return Reply(json!([])).into_response();
    };
    // One plain folder name; a folder that is a symbolic link (models kept on another disk)
    // is listed like any other, as ComfyUI does.
    if paths::join(models, "", &folder).is_none() {
        return not_found();
    }
    Reply(json!(models::list_models(models, &[folder.as_str()]))).into_response()
}

/// The files in `dir`, and with `recurse` in its subfolders, as `/`-separated paths relative
/// to it. Subfolders are searched to a bounded depth: a symbolic link to a folder above would
/// otherwise recurse without end.
fn list_files(dir: &Path, prefix: &str, recurse: bool, files: &mut Vec<String>) {
    const MAX_DEPTH: usize = 16;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let relative = if prefix.is_empty() {
            name
        } else {
            format!("{prefix}/{name}")
        };
        let path = entry.path();
        if path.is_dir() {
            if recurse && relative.split('/').count() < MAX_DEPTH {
                list_files(&path, &relative, recurse, files);
            }
        } else if path.is_file() {
            files.push(relative);
        }
    }
}

/// ComfyUI's description of a user's file: its path relative to the folder listed, its size,
/// and its modification and creation times in seconds (the creation time is the modification
/// time on filesystems that do not record it).
fn file_info(path: &Path, relative: &str) -> Json {
    let metadata = std::fs::metadata(path).ok();
    let seconds = |time: std::io::Result<std::time::SystemTime>| {
        time.ok()
            .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
            .map(|d| d.as_secs_f64())
    };
    let modified = metadata.as_ref().and_then(|m| seconds(m.modified()));
    let created = metadata.as_ref().and_then(|m| seconds(m.created()));
    let size = metadata.map_or(0, |m| m.len());
    json!({
        "path": relative,
        "size": size,
        "modified": modified.unwrap_or(0.0),
        "created": created.or(modified).unwrap_or(0.0),
    })
}

/// The editor's settings file.
fn settings_path(state: &AppState) -> PathBuf {
    state.options.user.join("comfy.settings.json")
}

fn read_settings(state: &AppState) -> Map<String, Json> {
    std::fs::read(settings_path(state))
        .ok()
        .and_then(|bytes| serde_json::from_slice(&bytes).ok())
        .unwrap_or_default()
}

fn write_settings(state: &AppState, settings: &Map<String, Json>) -> Response {
    let text = Json::Object(settings.clone()).to_string();
    match std::fs::write(settings_path(state), text) {
        Ok(()) => StatusCode::OK.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

async fn settings(State(state): Shared) -> Reply<Json> {
    Reply(Json::Object(read_settings(&state)))
}

async fn settings_update(State(state): Shared, body: Bytes) -> Response {
    let Ok(Json::Object(update)) = serde_json::from_slice::<Json>(&body) else {
        return bad_request("the body must be a JSON object");
    };
    let mut settings = read_settings(&state);
    settings.extend(update);
    write_settings(&state, &settings)
}

async fn setting(State(state): Shared, UrlPath(id): UrlPath<String>) -> Reply<Json> {
    Reply(read_settings(&state).remove(&id).unwrap_or(Json::Null))
}

async fn setting_update(
    State(state): Shared,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Response {
    let Some(value) = json_body(&body) else {
        return bad_request("the body is not JSON");
    };
    let mut settings = read_settings(&state);
    settings.insert(id, value);
    write_settings(&state, &settings)
}

/// `GET /userdata?dir=workflows`: the files of that folder of the user's data, relative to
/// it, and with `recurse=true` those of its subfolders; 404 when the folder does not exist, as
/// the editor expects. `full_info=true` describes each file ([`file_info`]); `split=true`
/// gives each as `[path, component, ...]`.
async fn userdata_list(
    State(state): Shared,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let Some(dir) = query
        .get("dir")
        .and_then(|dir| paths::join_relative(&state.options.user, dir.trim_end_matches('/')))
    else {
        return bad_request("dir is required");
    };
    if !dir.is_dir() || !paths::inside(&state.options.user, &dir) {
        return not_found();
    }
    let flag = |name: &str| {
        query
            .get(name)
            .is_some_and(|v| v.eq_ignore_ascii_case("true"))
    };
    let mut files = Vec::new();
    list_files(&dir, "", flag("recurse"), &mut files);
    files.sort();
    let listing: Vec<Json> = files
        .iter()
        .map(|relative| {
            if flag("full_info") {
                file_info(&dir.join(relative), relative)
            } else if flag("split") {
                let mut parts = vec![json!(relative)];
                parts.extend(relative.split('/').map(|part| json!(part)));
                Json::Array(parts)
            } else {
                json!(relative)
            }
        })
        .collect();
    Reply(Json::Array(listing)).into_response()
}

/// The user's data file that `file` names, when it stays inside the user folder.
fn userdata_path(state: &AppState, file: &str) -> Option<PathBuf> {
    paths::join_relative(&state.options.user, file)
}

async fn userdata_read(State(state): Shared, UrlPath(file): UrlPath<String>) -> Response {
    let Some(path) = userdata_path(&state, &file) else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    if !path.is_file() || !paths::inside(&state.options.user, &path) {
        return not_found();
    }
    match tokio::fs::read(&path).await {
        Ok(bytes) => ([(header::CONTENT_TYPE, content_type(&path))], bytes).into_response(),
        Err(_) => not_found(),
    }
}

/// `POST /userdata/{file}`, or ComfyUI's `POST /userdata/{file}/move/{dest}`. The two share
/// one route because the router cannot hold a catch-all beside a route it overlaps; they are
/// told apart on the raw path, where the subfolders of each name are still encoded (`%2F`), so
/// a move is exactly three segments with `move` in the middle.
async fn userdata_post(
    state: Shared,
    uri: axum::http::Uri,
    UrlPath(file): UrlPath<String>,
    query: Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let raw = uri.path();
    let after = raw
        .find("/userdata/")
        .map_or("", |at| &raw[at + "/userdata/".len()..]);
    let segments: Vec<&str> = after.split('/').collect();
    if let [from, "move", to] = segments[..] {
        return match (percent_decode(from), percent_decode(to)) {
            (Some(from), Some(to)) => userdata_move(state, from, to, query).await,
            _ => bad_request("the file names are not valid percent-encoded UTF-8"),
        };
    }
    userdata_write(state, file, query, body).await
}

/// `%XX` escapes replaced by their bytes, or `None` when an escape is malformed or the result
/// is not UTF-8.
fn percent_decode(text: &str) -> Option<String> {
    let mut bytes = Vec::with_capacity(text.len());
    let mut rest = text.as_bytes();
    while let Some((&byte, tail)) = rest.split_first() {
        if byte == b'%' {
            let hex = std::str::from_utf8(tail.get(..2)?).ok()?;
            bytes.push(u8::from_str_radix(hex, 16).ok()?);
            rest = &tail[2..];
        } else {
            bytes.push(byte);
            rest = tail;
        }
    }
    String::from_utf8(bytes).ok()
}

async fn userdata_write(
    State(state): Shared,
    file: String,
    Query(query): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let Some(path) = userdata_path(&state, &file) else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    let Some(dir) = path.parent() else {
        return bad_request("invalid file name");
    };
    if std::fs::create_dir_all(dir).is_err() || !paths::inside(&state.options.user, dir) {
        return (
            StatusCode::FORBIDDEN,
            "the folder leads outside the user folder",
        )
            .into_response();
    }
    let overwrite = query.get("overwrite").is_none_or(|o| o != "false");
    if path.symlink_metadata().is_ok() {
        if !overwrite {
            return (StatusCode::CONFLICT, "file exists").into_response();
        }
        if !paths::inside(&state.options.user, &path) {
            return (
                StatusCode::FORBIDDEN,
                "the file leads outside the user folder",
            )
                .into_response();
        }
    }
    if let Err(e) = tokio::fs::write(&path, &body).await {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    userdata_reply(&file, &path, &query)
}

/// What ComfyUI answers after writing or moving a user's file: its path relative to the user
/// folder, or with `full_info=true` that path with its size and modification time.
fn userdata_reply(relative: &str, path: &Path, query: &HashMap<String, String>) -> Response {
    let relative = relative.trim_start_matches('/');
    if query.get("full_info").is_some_and(|f| f == "true") {
        Reply(file_info(path, relative)).into_response()
    } else {
        Reply(json!(relative)).into_response()
    }
}

/// `POST /userdata/{file}/move/{dest}`: renames a user's file (the editor renaming a saved
/// workflow); the names arrive URL-encoded with their subfolders (`workflows%2Fa.json`).
/// An existing destination is replaced unless `overwrite=false`, which answers 409.
async fn userdata_move(
    State(state): Shared,
    file: String,
    dest: String,
    Query(query): Query<HashMap<String, String>>,
) -> Response {
    let user = &state.options.user;
    let (Some(source), Some(target)) = (userdata_path(&state, &file), userdata_path(&state, &dest))
    else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    if !source.is_file() || !paths::inside(user, &source) {
        return not_found();
    }
    let Some(dir) = target.parent() else {
        return bad_request("invalid file name");
    };
    if std::fs::create_dir_all(dir).is_err() || !paths::inside(user, dir) {
        return (
            StatusCode::FORBIDDEN,
            "the folder leads outside the user folder",
        )
            .into_response();
    }
    if target.symlink_metadata().is_ok() {
        if query.get("overwrite").is_some_and(|o| o == "false") {
            return (StatusCode::CONFLICT, "file exists").into_response();
        }
        if !target.is_file() || !paths::inside(user, &target) {
            return (
                StatusCode::FORBIDDEN,
                "the destination is not a file inside the user folder",
            )
                .into_response();
        }
    }
    if let Err(e) = std::fs::rename(&source, &target) {
        return (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response();
    }
    userdata_reply(&dest, &target, &query)
}

async fn userdata_delete(State(state): Shared, UrlPath(file): UrlPath<String>) -> Response {
    let Some(path) = userdata_path(&state, &file) else {
        return (StatusCode::FORBIDDEN, "invalid file name").into_response();
    };
    if !path.is_file() || !paths::inside(&state.options.user, &path) {
        return not_found();
    }
    match std::fs::remove_file(&path) {
        Ok(()) => StatusCode::NO_CONTENT.into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, e.to_string()).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn meminfo_gives_total_and_available_bytes() {
        let text = "MemTotal:       16318412 kB\nMemFree:         1000000 kB\n\
                    MemAvailable:   12000000 kB\nBuffers:  1 kB\n";
        assert_eq!(
            parse_meminfo(text),
            Some((16318412 * 1024, 12000000 * 1024))
        );
        assert_eq!(parse_meminfo("MemTotal: 5 kB\n"), None);
    }

    #[test]
    fn percent_escapes_decode_and_bad_ones_are_refused() {
        assert_eq!(
            percent_decode("workflows%2Fa%20b.json").as_deref(),
            Some("workflows/a b.json")
        );
        assert_eq!(percent_decode("%C3%A9t%C3%A9").as_deref(), Some("été"));
        for bad in ["%2", "%zz", "%FF"] {
            assert_eq!(percent_decode(bad), None, "{bad}");
        }
    }
}
