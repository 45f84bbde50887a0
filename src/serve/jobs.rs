//! ComfyUI's jobs API (`/api/jobs`), which recent editors read for their queue panel: the
//! running and waiting prompts and the history, as one list of jobs with a status, filtered,
//! sorted and paged. Jobs are derived from the queue's listings (`[number, id, prompt,
//! extra_data, outputs]`) and the history entries, as ComfyUI's `comfy_execution/jobs.py` does.

use serde_json::{json, Map, Value as Json};

pub const PENDING: &str = "pending";
pub const IN_PROGRESS: &str = "in_progress";
pub const COMPLETED: &str = "completed";
pub const FAILED: &str = "failed";
const ALL: [&str; 4] = [PENDING, IN_PROGRESS, COMPLETED, FAILED];

/// Output kinds the editor can preview.
const PREVIEWABLE: [&str; 3] = ["images", "video", "audio"];

/// `create_time` (ms, set when queued) and the editor's workflow id from a prompt's
/// `extra_data`.
fn metadata(extra_data: &Json) -> (Json, Json) {
    let create_time = extra_data.get("create_time").cloned().unwrap_or(json!(0));
    let workflow_id = extra_data
        .pointer("/extra_pnginfo/workflow/id")
        .cloned()
        .unwrap_or(Json::Null);
    (create_time, workflow_id)
}

/// A waiting or running prompt, from its queue listing.
pub fn queued_job(listing: &Json, status: &str) -> Json {
    let (create_time, workflow_id) = metadata(&listing[3]);
    json!({
        "id": listing[1],
        "status": status,
        "priority": listing[0],
        "create_time": create_time,
        "outputs_count": 0,
        "previewable_outputs_count": 0,
        "workflow_id": workflow_id,
    })
}

/// A finished prompt, from its history entry; with its outputs and workflow when `detail`.
pub fn finished_job(prompt_id: &str, entry: &Json, detail: bool) -> Json {
    let listing = &entry["prompt"];
    let (create_time, workflow_id) = metadata(&listing[3]);
    let status = match entry.pointer("/status/status_str").and_then(Json::as_str) {
        Some("error") => FAILED,
        _ => COMPLETED,
    };
    let mut start = Json::Null;
    let mut end = Json::Null;
    let mut error = Json::Null;
    let messages = entry.pointer("/status/messages").and_then(Json::as_array);
    for message in messages.into_iter().flatten() {
        let (Some(kind), data) = (message[0].as_str(), &message[1]) else {
            continue;
        };
        match kind {
            "execution_start" => start = data["timestamp"].clone(),
            "execution_success" | "execution_interrupted" => end = data["timestamp"].clone(),
            "execution_error" => {
                end = data["timestamp"].clone();
                error = execution_error(data);
            }
            _ => {}
        }
    }
    let (count, previewable, preview) = outputs_summary(&entry["outputs"]);
    let mut job = json!({
        "id": prompt_id,
        "status": status,
        "priority": listing[0],
        "create_time": create_time,
        "execution_start_time": start,
        "execution_end_time": end,
        "execution_error": error,
        "outputs_count": count,
        "previewable_outputs_count": previewable,
        "preview_output": preview,
        "workflow_id": workflow_id,
    });
    if detail {
        job["outputs"] = entry["outputs"].clone();
        job["execution_status"] = entry["status"].clone();
        job["workflow"] = json!({"prompt": listing[2], "extra_data": listing[3]});
    }
    job
}

/// An `execution_error` message's data in the shape the editor validates: every field it
/// requires present.
fn execution_error(data: &Json) -> Json {
    let text = |key: &str| json!(data[key].as_str().unwrap_or_default());
    json!({
        "prompt_id": data["prompt_id"],
        "timestamp": data["timestamp"],
        "node_id": text("node_id"),
        "node_type": text("node_type"),
        "exception_message": text("exception_message"),
        "exception_type": text("exception_type"),
        "traceback": data.get("traceback").cloned().unwrap_or(json!([])),
    })
}

/// How many output items there are, how many the editor can preview, and the first of those
/// (an `output` file before a temporary one), tagged with its node and kind.
fn outputs_summary(outputs: &Json) -> (usize, usize, Json) {
    let mut count = 0;
    let mut previewable = 0;
    let mut preview = Json::Null;
    let mut fallback = Json::Null;
    for (node_id, node_outputs) in outputs.as_object().into_iter().flatten() {
        for (kind, items) in node_outputs.as_object().into_iter().flatten() {
            let Some(items) = items.as_array() else {
                continue;
            };
            for item in items.iter().filter(|item| item.is_object()) {
                count += 1;
                let format = item["format"].as_str().unwrap_or_default();
                let shows = PREVIEWABLE.contains(&kind.as_str())
                    || format.starts_with("video/")
                    || format.starts_with("audio/");
                if !shows {
                    continue;
                }
                previewable += 1;
                let mut tagged = item.clone();
                tagged["nodeId"] = json!(node_id);
                tagged["mediaType"] = json!(kind);
                if preview.is_null() && item["type"] == "output" {
                    preview = tagged;
                } else if fallback.is_null() {
                    fallback = tagged;
                }
            }
        }
    }
    (
        count,
        previewable,
        if preview.is_null() { fallback } else { preview },
    )
}

/// What `/api/jobs` was asked for.
pub struct JobsQuery {
    pub statuses: Vec<String>,
    pub workflow_id: Option<String>,
    /// `created_at` or `execution_duration`.
    pub sort_by: String,
    pub descending: bool,
    pub limit: Option<usize>,
    pub offset: usize,
}

impl JobsQuery {
    /// From the query string's fields; an unknown status or sort is an error message.
    pub fn parse(query: &std::collections::HashMap<String, String>) -> Result<Self, String> {
        let statuses: Vec<String> = match query.get("status") {
            Some(list) => list
                .split(',')
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
                .collect(),
            None => ALL.iter().map(|s| s.to_string()).collect(),
        };
        if let Some(unknown) = statuses.iter().find(|s| !ALL.contains(&s.as_str())) {
            return Err(format!(
                "unknown status `{unknown}` (one of {})",
                ALL.join(", ")
            ));
        }
        let sort_by = query
            .get("sort_by")
            .cloned()
            .unwrap_or_else(|| "created_at".into());
        if !["created_at", "execution_duration"].contains(&sort_by.as_str()) {
            return Err(format!("unknown sort_by `{sort_by}`"));
        }
        let number = |key: &str| -> Result<Option<usize>, String> {
            query
                .get(key)
                .map(|v| {
                    v.parse()
                        .map_err(|_| format!("{key} must be a whole number"))
                })
                .transpose()
        };
        Ok(Self {
            statuses,
            workflow_id: query.get("workflow_id").cloned(),
            sort_by,
            descending: query.get("sort_order").map(String::as_str) != Some("asc"),
            limit: number("limit")?,
            offset: number("offset")?.unwrap_or(0),
        })
    }
}

/// `{jobs, pagination}` for `query` over the running, waiting and finished prompts.
pub fn list(
    running: &[Json],
    pending: &[Json],
    history: &Map<String, Json>,
    query: &JobsQuery,
) -> Json {
    let wants = |status: &str| query.statuses.iter().any(|s| s == status);
    let mut jobs: Vec<Json> = Vec::new();
    if wants(IN_PROGRESS) {
        jobs.extend(running.iter().map(|l| queued_job(l, IN_PROGRESS)));
    }
    if wants(PENDING) {
        jobs.extend(pending.iter().map(|l| queued_job(l, PENDING)));
    }
    for (id, entry) in history {
        let job = finished_job(id, entry, false);
        if wants(job["status"].as_str().unwrap_or_default()) {
            jobs.push(job);
        }
    }
    if let Some(workflow_id) = &query.workflow_id {
        jobs.retain(|job| job["workflow_id"].as_str() == Some(workflow_id));
    }
    let key = |job: &Json| -> i64 {
        let at = |field: &str| job[field].as_i64().unwrap_or(0);
        match query.sort_by.as_str() {
            "execution_duration"
                if at("execution_start_time") > 0 && at("execution_end_time") > 0 =>
            {
                at("execution_end_time") - at("execution_start_time")
            }
            "execution_duration" => 0,
            _ => at("create_time"),
        }
    };
    // Stable: jobs of equal keys keep running, waiting, then finished order.
    jobs.sort_by_key(|job| key(job));
    if query.descending {
        jobs.reverse();
    }
    let total = jobs.len();
    let page: Vec<Json> = jobs
        .into_iter()
        .skip(query.offset)
        .take(query.limit.unwrap_or(usize::MAX))
        .collect();
    let has_more = query.offset + page.len() < total;
    json!({
        "jobs": page,
        "pagination": {
            "offset": query.offset,
            "limit": query.limit.unwrap_or(total),
            "total": total,
            "has_more": has_more,
        }
    })
}
