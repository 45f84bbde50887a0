//! What `vdm serve` relies on: node outputs kept across runs by input signature, so that a
//! re-queued workflow computes only what changed.

mod common;

use serde_json::json;
use vdm::{Executor, OutputCache, PluginSet, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-test-plugin")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

fn sum_of(a: i64, b: i64) -> Workflow {
    Workflow::from_json(json!({
        "1": {"class_type": "TestCounter", "inputs": {"value": a}},
        "2": {"class_type": "TestCounter", "inputs": {"value": b}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestSink", "inputs": {"value": ["3", 0]}}
    }))
    .expect("well-formed workflow")
}

#[test]
fn an_unchanged_workflow_runs_only_its_output_nodes_the_second_time() {
    let set = plugins();
    let executor = Executor::new(&set, &vdm::events::Silent);
    let mut cache = OutputCache::default();

    let first = executor.run_cached(&sum_of(2, 3), &mut cache).unwrap();
    assert_eq!(first.executed, ["1", "2", "3", "4"]);
    assert_eq!(first.ui["4"]["value"], 5);

    let again = executor.run_cached(&sum_of(2, 3), &mut cache).unwrap();
    assert_eq!(again.executed, ["4"], "the output node always runs");
    assert_eq!(again.cached, ["1", "2", "3"]);
    assert_eq!(again.ui["4"]["value"], 5);
}

#[test]
fn a_changed_input_reruns_only_what_depends_on_it() {
    let set = plugins();
    let executor = Executor::new(&set, &vdm::events::Silent);
    let mut cache = OutputCache::default();
    executor.run_cached(&sum_of(2, 3), &mut cache).unwrap();

    let changed = executor.run_cached(&sum_of(2, 4), &mut cache).unwrap();
    assert_eq!(changed.cached, ["1"]);
    assert_eq!(changed.executed, ["2", "3", "4"]);
    assert_eq!(changed.ui["4"]["value"], 6);
    assert_eq!(
        cache.len(),
        4,
        "only the last run's outputs are kept: those of nodes 1 to 4 (the sink's is empty)"
    );
}

#[test]
fn a_plain_run_keeps_nothing_between_runs() {
    let set = plugins();
    let executor = Executor::new(&set, &vdm::events::Silent);
    executor.run(&sum_of(5, 6)).unwrap();
    let again = executor.run(&sum_of(5, 6)).unwrap();
    assert_eq!(again.executed, ["1", "2", "3", "4"]);
    assert!(again.cached.is_empty());
}

// The server over HTTP and its websocket, on an ephemeral port.

struct TestServer {
    base: String,
    address: std::net::SocketAddr,
    output: std::path::PathBuf,
    input: std::path::PathBuf,
    user: std::path::PathBuf,
    _dirs: tempfile::TempDir,
}

fn serve() -> TestServer {
    serve_with_models(None)
}

/// A server whose `--models` folder is `models`.
fn serve_with_models(models: Option<std::path::PathBuf>) -> TestServer {
    let set = PluginSet::load(
        &[],
        &[
            common::plugin_library("vdm-nodes"),
            common::plugin_library("vdm-test-plugin"),
        ],
    );
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    let dirs = tempfile::tempdir().unwrap();
    let output = dirs.path().join("output");
    let mut options = vdm::serve::ServeOptions::new(output.clone());
    options.port = 0;
    options.input = dirs.path().join("input");
    options.temp = dirs.path().join("temp");
    options.user = dirs.path().join("user");
    options.models = models;
    options.settings.insert("device".into(), "cpu".into());
    let server = vdm::serve::start(set, options).unwrap();
    TestServer {
        base: format!("http://{}", server.address),
        address: server.address,
        output,
        input: dirs.path().join("input"),
        user: dirs.path().join("user"),
        _dirs: dirs,
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into()
}

/// Status and body of a GET.
fn get(server: &TestServer, path: &str) -> (u16, Vec<u8>) {
    let mut response = agent()
        .get(format!("{}{path}", server.base))
        .call()
        .unwrap();
    let status = response.status().as_u16();
    let body = response
        .body_mut()
        .with_config()
        .limit(1 << 30)
        .read_to_vec()
        .unwrap();
    (status, body)
}

fn get_json(server: &TestServer, path: &str) -> serde_json::Value {
    let (status, body) = get(server, path);
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).unwrap()
}

fn post(server: &TestServer, path: &str, body: &[u8]) -> (u16, serde_json::Value) {
    let mut response = agent()
        .post(format!("{}{path}", server.base))
        .send(body)
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(json!(text)))
}

type Socket = tungstenite::WebSocket<tungstenite::stream::MaybeTlsStream<std::net::TcpStream>>;

fn connect(server: &TestServer, client_id: &str) -> Socket {
    let (mut socket, _) =
        tungstenite::connect(format!("ws://{}/ws?clientId={client_id}", server.address)).unwrap();
    if let tungstenite::stream::MaybeTlsStream::Plain(stream) = socket.get_mut() {
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(120)))
            .unwrap();
    }
    let hello = next_message(&mut socket);
    assert_eq!(hello["type"], "status");
    assert_eq!(hello["data"]["sid"], client_id);
    socket
}

fn next_message(socket: &mut Socket) -> serde_json::Value {
    loop {
        if let tungstenite::Message::Text(text) = socket.read().unwrap() {
            return serde_json::from_str(text.as_str()).unwrap();
        }
    }
}

/// The messages of `prompt_id` up to its final `executing` with `node: null`.
fn messages_until_done(socket: &mut Socket, prompt_id: &str) -> Vec<serde_json::Value> {
    let mut messages = Vec::new();
    loop {
        let message = next_message(socket);
        if message["data"]["prompt_id"] != prompt_id {
            continue;
        }
        let done = message["type"] == "executing" && message["data"]["node"].is_null();
        messages.push(message);
        if done {
            return messages;
        }
    }
}

fn queue(server: &TestServer, client_id: &str, prompt: serde_json::Value) -> String {
    let body = json!({"client_id": client_id, "prompt": prompt, "extra_data": {}});
    let (status, reply) = post(server, "/prompt", body.to_string().as_bytes());
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["node_errors"], json!({}));
    reply["prompt_id"].as_str().unwrap().to_owned()
}

fn small_noise_preview(seed: i64) -> serde_json::Value {
    let text = std::fs::read_to_string(
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/noise-preview.json"),
    )
    .unwrap();
    let mut prompt: serde_json::Value = serde_json::from_str(&text).unwrap();
    prompt["1"]["inputs"]["frames"] = json!(3);
    prompt["1"]["inputs"]["width"] = json!(32);
    prompt["1"]["inputs"]["height"] = json!(32);
    prompt["1"]["inputs"]["seed"] = json!(seed);
    prompt
}

fn kinds(messages: &[serde_json::Value]) -> Vec<&str> {
    messages
        .iter()
        .map(|m| m["type"].as_str().unwrap())
        .collect()
}

#[test]
fn object_info_lists_every_node_with_and_without_the_api_prefix() {
    let server = serve();
    let info = get_json(&server, "/object_info");
    for class in [
        "VideoNoise",
        "LatentPreview",
        "SaveVideoFile",
        "TestCountdown",
    ] {
        assert!(info.get(class).is_some(), "{class} missing");
    }
    assert_eq!(get_json(&server, "/api/object_info"), info);
    let one = get_json(&server, "/object_info/VideoNoise");
    assert_eq!(one["VideoNoise"], info["VideoNoise"]);
    assert_eq!(
        get_json(&server, "/users"),
        json!({"storage": "server", "migrated": true})
    );
}

#[test]
fn a_prompt_runs_and_its_gif_comes_back_and_a_second_run_is_cached() {
    let server = serve();
    let mut socket = connect(&server, "runner");
    let prompt_id = queue(&server, "runner", small_noise_preview(42));
    let messages = messages_until_done(&mut socket, &prompt_id);
    let kinds_seen = kinds(&messages);
    assert!(kinds_seen.contains(&"execution_start"), "{kinds_seen:?}");
    assert!(kinds_seen.contains(&"execution_success"), "{kinds_seen:?}");
    assert!(messages.iter().all(|m| m["data"]["timestamp"].is_u64()));
    let executed: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "executed")
        .map(|m| m["data"]["node"].as_str().unwrap())
        .collect();
    assert!(executed.contains(&"3"), "{executed:?}");

    let history = get_json(&server, &format!("/history/{prompt_id}"));
    let entry = &history[&prompt_id];
    assert_eq!(entry["status"]["status_str"], "success");
    assert_eq!(entry["status"]["completed"], true);
    let outputs = entry["outputs"]["3"].as_object().unwrap();
    let file = outputs
        .values()
        .filter_map(|v| v.as_array())
        .flatten()
        .find(|f| f.get("filename").is_some())
        .unwrap();
    let (status, gif) = get(
        &server,
        &format!(
            "/view?filename={}&subfolder={}&type=output",
            file["filename"].as_str().unwrap(),
            file["subfolder"].as_str().unwrap_or("")
        ),
    );
    assert_eq!(status, 200);
    assert!(gif.starts_with(b"GIF8"));
    assert!(server.output.exists());
    // What the editor previews: the GIF under `images`, as ComfyUI's own nodes report files,
    // with no server path in it; and ComfyUI's `meta` for the output node.
    assert_eq!(
        entry["outputs"]["3"]["images"][0]["filename"],
        file["filename"]
    );
    assert!(
        !entry.to_string().contains("fullpath"),
        "a server path leaked: {entry}"
    );
    assert_eq!(entry["meta"]["3"]["display_node"], "3");
    let executed = messages
        .iter()
        .find(|m| m["type"] == "executed" && m["data"]["node"] == "3");
    let executed = executed.unwrap();
    assert_eq!(executed["data"]["display_node"], "3");
    assert!(!executed.to_string().contains("fullpath"));

    let again = queue(&server, "runner", small_noise_preview(42));
    let messages = messages_until_done(&mut socket, &again);
    let cached: Vec<serde_json::Value> = messages
        .iter()
        .filter(|m| m["type"] == "execution_cached")
        .flat_map(|m| m["data"]["nodes"].as_array().cloned().unwrap_or_default())
        .collect();
    assert_eq!(cached, [json!("1"), json!("2")]);

    let reseeded = queue(&server, "runner", small_noise_preview(7));
    let messages = messages_until_done(&mut socket, &reseeded);
    let executing: Vec<&str> = messages
        .iter()
        .filter(|m| m["type"] == "executing")
        .filter_map(|m| m["data"]["node"].as_str())
        .collect();
    assert_eq!(
        executing,
        ["1", "2", "3"],
        "a new seed reruns what follows it"
    );
}

#[test]
fn an_idle_interrupt_and_a_panicking_node_leave_the_server_serving() {
    let server = serve();
    let mut socket = connect(&server, "stopper");
    // Nothing runs: interrupting is a no-op that must not stop the next prompt.
    assert_eq!(post(&server, "/interrupt", b"{}").0, 200);
    let panicking = json!({
        "1": {"class_type": "TestPanic", "inputs": {"value": 1}},
        "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
    });
    let failed = queue(&server, "stopper", panicking);
    let messages = messages_until_done(&mut socket, &failed);
    assert!(kinds(&messages).contains(&"execution_error"));
    let history = get_json(&server, &format!("/history/{failed}"));
    assert_eq!(history[&failed]["status"]["status_str"], "error");

    let fine = json!({
        "1": {"class_type": "TestConst", "inputs": {"value": 3}},
        "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
    });
    let ok = queue(&server, "stopper", fine);
    let messages = messages_until_done(&mut socket, &ok);
    assert!(kinds(&messages).contains(&"execution_success"));
    assert_eq!(
        get_json(&server, "/prompt"),
        json!({"exec_info": {"queue_remaining": 0}})
    );
}

#[test]
fn malformed_prompts_get_400_with_node_errors() {
    let server = serve();
    let (status, reply) = post(&server, "/prompt", b"{not json");
    assert_eq!(status, 400);
    assert!(reply.get("node_errors").is_some(), "{reply}");
    let (status, reply) = post(
        &server,
        "/prompt",
        json!({"prompt": {"1": {"class_type": "TestSink", "inputs": {"value": ["9", 0]}}}})
            .to_string()
            .as_bytes(),
    );
    assert_eq!(status, 400);
    assert!(reply["node_errors"]["1"].is_object(), "{reply}");
}

#[test]
fn traversal_and_oversize_bodies_are_refused() {
    let server = serve();
    std::fs::write(server.output.join("inside.txt"), "x").unwrap();
    assert_eq!(get(&server, "/view?filename=inside.txt&type=output").0, 200);
    for query in [
        "filename=..%2F..%2Fetc%2Fpasswd",
        "filename=passwd&subfolder=..%2F..%2F..%2Fetc",
        "filename=%2Fetc%2Fpasswd",
        "filename=passwd&subfolder=%2Fetc",
        "filename=a%252F..%252Fb",
        "filename=x&subfolder=..",
    ] {
        let (status, _) = get(&server, &format!("/view?{query}&type=output"));
        assert!(status == 403 || status == 404, "{query}: {status}");
        assert_ne!(status, 200, "{query}");
    }
    #[cfg(unix)]
    {
        std::os::unix::fs::symlink("/etc", server.output.join("out")).unwrap();
        let (status, _) = get(&server, "/view?filename=passwd&subfolder=out&type=output");
        assert_eq!(status, 403);
    }
    assert_eq!(status_of_oversize_post(&server, "/prompt", 17 << 20), 413);
    assert_eq!(status_of_oversize_post(&server, "/settings", 17 << 20), 413);
    assert_eq!(
        status_of_oversize_post(&server, "/upload/image", 257 << 20),
        413
    );
}

/// The status the server answers to a POST that declares `length` bytes, read before any of
/// the body is sent: a refused body must be refused from its header, and the server may close
/// the connection without reading it (a client still writing would see a broken pipe).
fn status_of_oversize_post(server: &TestServer, path: &str, length: usize) -> u16 {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(server.address).unwrap();
    stream
        .set_read_timeout(Some(std::time::Duration::from_secs(30)))
        .unwrap();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\n\
         Content-Length: {length}\r\n\r\n",
        server.address
    )
    .unwrap();
    let mut head = [0u8; 12];
    stream.read_exact(&mut head).unwrap();
    let line = String::from_utf8_lossy(&head);
    line["HTTP/1.1 ".len()..].trim().parse().unwrap()
}

#[test]
fn an_interrupt_stops_the_running_prompt_within_a_step_and_the_next_one_runs() {
    let server = serve();
    let mut socket = connect(&server, "interrupter");
    // 1000 steps of 20 ms: 20 s if the interrupt were missed, far past what the test allows.
    let slow = json!({
        "1": {"class_type": "TestSlow", "inputs": {"steps": 1000, "ms_per_step": 20}},
        "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
    });
    let running = queue(&server, "interrupter", slow);
    loop {
        let message = next_message(&mut socket);
        if message["type"] == "progress" && message["data"]["prompt_id"] == running {
            break;
        }
    }
    let asked = std::time::Instant::now();
    assert_eq!(post(&server, "/interrupt", b"").0, 200);
    let messages = messages_until_done(&mut socket, &running);
    let stopped_after = asked.elapsed();
    let interrupted = messages
        .iter()
        .find(|m| m["type"] == "execution_interrupted")
        .unwrap_or_else(|| panic!("no execution_interrupted in {:?}", kinds(&messages)));
    assert_eq!(interrupted["data"]["node_id"], "1");
    assert_eq!(interrupted["data"]["node_type"], "TestSlow");
    assert!(
        stopped_after < std::time::Duration::from_secs(2),
        "the run went on {stopped_after:?} after the interrupt"
    );
    let history = get_json(&server, &format!("/history/{running}"));
    let status = &history[&running]["status"];
    assert_eq!(status["status_str"], "error");
    assert_eq!(status["completed"], false);
    assert!(
        status["messages"]
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m[0] == "execution_interrupted"),
        "{status}"
    );

    let next = queue(
        &server,
        "interrupter",
        json!({
            "1": {"class_type": "TestSlow", "inputs": {"steps": 2, "ms_per_step": 1}},
            "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
        }),
    );
    let messages = messages_until_done(&mut socket, &next);
    assert!(
        kinds(&messages).contains(&"execution_success"),
        "{:?}",
        kinds(&messages)
    );
}

#[test]
fn model_inputs_list_the_models_folder_again_on_each_request() {
    let models = tempfile::tempdir().unwrap();
    for dir in ["checkpoints/sd15", "animatediff_models", "vae"] {
        std::fs::create_dir_all(models.path().join(dir)).unwrap();
    }
    for file in [
        "checkpoints/sd15/dreamshaper.safetensors",
        "checkpoints/readme.txt",
        "animatediff_models/mm_sd_v15_v2.ckpt",
    ] {
        std::fs::write(models.path().join(file), "").unwrap();
    }
    let server = serve_with_models(Some(models.path().to_path_buf()));
    let combo = |info: &serde_json::Value, class: &str, input: &str| {
        info[class]["input"]["required"][input][0].clone()
    };

    let info = get_json(&server, "/object_info");
    assert_eq!(
        combo(&info, "CheckpointLoaderSimple", "ckpt_name"),
        json!(["sd15/dreamshaper.safetensors"])
    );
    assert_eq!(
        combo(&info, "CheckpointLoader", "ckpt_name"),
        json!(["sd15/dreamshaper.safetensors"])
    );
    assert_eq!(
        combo(&info, "ADE_LoadAnimateDiffModel", "model_name"),
        json!(["mm_sd_v15_v2.ckpt"])
    );
    assert_eq!(combo(&info, "VAELoader", "vae_name"), json!([]));
    assert_eq!(
        combo(&info, "LoraLoader", "lora_name"),
        json!([]),
        "a missing folder lists nothing"
    );

    // The editor's refresh: a new request sees the file added since.
    std::fs::write(models.path().join("vae/kl-f8.pt"), "").unwrap();
    let info = get_json(&server, "/object_info");
    assert_eq!(combo(&info, "VAELoader", "vae_name"), json!(["kl-f8.pt"]));
    let one = get_json(&server, "/api/object_info/VAELoader");
    assert_eq!(one["VAELoader"], info["VAELoader"]);
    assert_eq!(get_json(&server, "/models/vae"), json!(["kl-f8.pt"]));
    assert_eq!(
        get_json(&server, "/models/checkpoints"),
        json!(["sd15/dreamshaper.safetensors"])
    );
    assert_eq!(get(&server, "/models/..").0, 404);
}

#[test]
fn system_stats_reports_the_machines_memory() {
    let server = serve();
    let stats = get_json(&server, "/system_stats");
    let system = &stats["system"];
    for key in ["os", "comfyui_version", "python_version", "pytorch_version"] {
        assert!(system[key].is_string(), "{key}: {stats}");
    }
    assert!(system["argv"].is_array(), "{stats}");
    assert_eq!(stats["devices"][0]["type"], "cpu");
    if cfg!(target_os = "linux") {
        let total = system["ram_total"].as_u64().unwrap();
        let free = system["ram_free"].as_u64().unwrap();
        assert!(total > 64 << 20, "{stats}");
        assert!(free > 0 && free <= total, "{stats}");
    }
}

#[test]
fn saved_workflows_can_be_renamed_without_leaving_the_user_folder() {
    let server = serve();
    let (status, reply) = post(&server, "/userdata/workflows%2Fa.json", b"{\"a\": 1}");
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!("workflows/a.json"));

    let (status, reply) = post(
        &server,
        "/api/userdata/workflows%2Fa.json/move/workflows%2Fb.json",
        b"",
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply, json!("workflows/b.json"));
    assert!(!server.user.join("workflows/a.json").exists());
    assert_eq!(
        get_json(&server, "/userdata/workflows%2Fb.json"),
        json!({"a": 1})
    );
    assert_eq!(
        get_json(&server, "/userdata?dir=workflows"),
        json!(["b.json"])
    );
    // The editor's workflow browser asks for every file below, described.
    post(&server, "/userdata/workflows%2Fdeep%2Fd.json", b"{}");
    assert_eq!(
        get_json(&server, "/userdata?dir=workflows"),
        json!(["b.json"]),
        "subfolders only with recurse"
    );
    let listing = get_json(
        &server,
        "/api/userdata?dir=workflows&recurse=true&split=false&full_info=true",
    );
    let described: Vec<(&str, u64)> = listing
        .as_array()
        .unwrap()
        .iter()
        .map(|f| (f["path"].as_str().unwrap(), f["size"].as_u64().unwrap()))
        .collect();
    assert_eq!(described, [("b.json", 8), ("deep/d.json", 2)]);
    assert!(listing[0]["modified"].as_f64().unwrap() > 1e9, "{listing}");
    assert!(listing[0]["created"].as_f64().unwrap() > 1e9, "{listing}");
    assert_eq!(
        get_json(&server, "/userdata?dir=workflows&recurse=true&split=true"),
        json!([["b.json", "b.json"], ["deep/d.json", "deep", "d.json"]])
    );

    // An existing destination is kept with overwrite=false, replaced otherwise.
    post(&server, "/userdata/workflows%2Fc.json", b"{\"c\": 1}");
    let (status, _) = post(
        &server,
        "/userdata/workflows%2Fb.json/move/workflows%2Fc.json?overwrite=false",
        b"",
    );
    assert_eq!(status, 409);
    let (status, reply) = post(
        &server,
        "/userdata/workflows%2Fb.json/move/workflows%2Fc.json?full_info=true",
        b"",
    );
    assert_eq!(status, 200, "{reply}");
    assert_eq!(reply["path"], "workflows/c.json");
    assert_eq!(reply["size"], 8);
    assert_eq!(
        get_json(&server, "/userdata/workflows%2Fc.json"),
        json!({"a": 1})
    );

    assert_eq!(
        post(
            &server,
            "/userdata/workflows%2Fmissing.json/move/x.json",
            b""
        )
        .0,
        404
    );
    for (from, to) in [
        ("workflows%2Fc.json", "..%2Fescaped.json"),
        ("workflows%2Fc.json", "%2Ftmp%2Fescaped.json"),
        ("..%2Foutput%2Fx", "stolen.json"),
    ] {
        let (status, _) = post(&server, &format!("/userdata/{from}/move/{to}"), b"");
        assert!(status == 403 || status == 404, "{from} -> {to}: {status}");
    }
    assert!(server.user.join("workflows/c.json").is_file());
    assert!(!server.user.parent().unwrap().join("escaped.json").exists());
}

/// A `multipart/form-data` body with the file as `image` and the given text fields.
fn multipart(filename: &str, bytes: &[u8], fields: &[(&str, &str)]) -> (String, Vec<u8>) {
    let boundary = "vdm-test-boundary-7d1f3a";
    let mut body = Vec::new();
    for (name, value) in fields {
        body.extend_from_slice(
            format!(
                "--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n"
            )
            .as_bytes(),
        );
    }
    body.extend_from_slice(
        format!(
            "--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; \
             filename=\"{filename}\"\r\nContent-Type: image/png\r\n\r\n"
        )
        .as_bytes(),
    );
    body.extend_from_slice(bytes);
    body.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    (format!("multipart/form-data; boundary={boundary}"), body)
}

fn upload(server: &TestServer, filename: &str, bytes: &[u8]) -> (u16, serde_json::Value) {
    let (content_type, body) = multipart(filename, bytes, &[("type", "input")]);
    let mut response = agent()
        .post(format!("{}/upload/image", server.base))
        .header("Content-Type", &content_type)
        .send(&body[..])
        .unwrap();
    let status = response.status().as_u16();
    let text = response.body_mut().read_to_string().unwrap_or_default();
    (status, serde_json::from_str(&text).unwrap_or(json!(text)))
}

#[test]
fn uploaded_images_small_and_past_the_json_limit_come_back_from_view() {
    let server = serve();
    let mut png = std::io::Cursor::new(Vec::new());
    image::RgbImage::from_fn(4, 3, |x, y| image::Rgb([x as u8 * 60, y as u8 * 80, 200]))
        .write_to(&mut png, image::ImageFormat::Png)
        .unwrap();
    let png = png.into_inner();
    let (status, reply) = upload(&server, "small.png", &png);
    assert_eq!(status, 200, "{reply}");
    assert_eq!(
        reply,
        json!({"name": "small.png", "subfolder": "", "type": "input"})
    );
    let (status, body) = get(&server, "/view?filename=small.png&type=input");
    assert_eq!(status, 200);
    assert_eq!(body, png);

    // Uploads may hold 256 MiB, well past the 16 MiB of a JSON body.
    let mut large = png.clone();
    large.resize(20 << 20, 0x5a);
    let (status, reply) = upload(&server, "large.png", &large);
    assert_eq!(status, 200, "{reply}");
    let (status, body) = get(&server, "/view?filename=large.png&type=input");
    assert_eq!(status, 200);
    assert!(body == large, "the 20 MiB upload came back changed");
    assert!(server.input.join("large.png").is_file());

    // The same name again is stored beside it, not over it.
    let (_, reply) = upload(&server, "small.png", &png);
    assert_eq!(reply["name"], "small (1).png");
}

#[test]
fn previews_are_written_where_view_serves_temporary_files() {
    let server = serve();
    let mut socket = connect(&server, "previewer");
    let mut prompt = small_noise_preview(3);
    prompt["3"] = json!({"class_type": "PreviewImage", "inputs": {"images": ["2", 0]}});
    let prompt_id = queue(&server, "previewer", prompt);
    let messages = messages_until_done(&mut socket, &prompt_id);
    assert!(
        kinds(&messages).contains(&"execution_success"),
        "{messages:?}"
    );
    let history = get_json(&server, &format!("/history/{prompt_id}"));
    let images = history[&prompt_id]["outputs"]["3"]["images"]
        .as_array()
        .unwrap()
        .clone();
    assert_eq!(images.len(), 3, "one PNG per frame: {images:?}");
    for image in images {
        assert_eq!(image["type"], "temp");
        let (status, png) = get(
            &server,
            &format!(
                "/view?filename={}&subfolder={}&type=temp",
                image["filename"].as_str().unwrap(),
                image["subfolder"].as_str().unwrap()
            ),
        );
        assert_eq!(status, 200, "{image}");
        assert!(png.starts_with(b"\x89PNG"));
    }
}

#[test]
fn sampling_sends_a_latent_preview_per_step_as_binary_frames() {
    let models_dir = tempfile::tempdir().unwrap();
    let models = common::write_tiny_models(models_dir.path());
    let server = serve_with_models(Some(models.root.clone()));
    let mut socket = connect(&server, "viewer");
    let prompt = json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": "tiny-sd"}},
        "2": {"class_type": "TextEncode", "inputs": {"clip": ["1", 1], "text": "a ball"}},
        "3": {"class_type": "EmptyVideoLatent", "inputs": {"width": 96, "height": 128, "frames": 2, "batch_size": 1}},
        "4": {"class_type": "VideoSampler", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["2", 0],
              "latent_image": ["3", 0], "seed": 1, "steps": 2, "cfg": 1.0, "scheduler": "ddim", "denoise": 1.0}},
        "5": {"class_type": "SaveLatent", "inputs": {"samples": ["4", 0], "filename_prefix": "previewed"}}
    });
    let prompt_id = queue(&server, "viewer", prompt);
    let mut previews = Vec::new();
    loop {
        match socket.read().unwrap() {
            tungstenite::Message::Binary(frame) => previews.push(frame.to_vec()),
            tungstenite::Message::Text(text) => {
                let message: serde_json::Value = serde_json::from_str(text.as_str()).unwrap();
                let done = message["type"] == "executing"
                    && message["data"]["node"].is_null()
                    && message["data"]["prompt_id"] == prompt_id.as_str();
                if done {
                    break;
                }
            }
            _ => {}
        }
    }
    assert_eq!(previews.len(), 2, "one preview per step");
    for frame in &previews {
        // ComfyUI's binary event: PREVIEW_IMAGE (1), PNG (2), then the image.
        assert_eq!(frame[..8], [0, 0, 0, 1, 0, 0, 0, 2]);
        let image = image::load_from_memory(&frame[8..]).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (96, 128),
            "the latents at 8×"
        );
    }
}

#[test]
fn the_jobs_api_lists_running_waiting_and_finished_prompts_and_cancels_them() {
    let server = serve();
    let mut socket = connect(&server, "jobs");
    let finished = queue(&server, "jobs", small_noise_preview(3));
    messages_until_done(&mut socket, &finished);
    let slow = |steps: u32| {
        json!({
            "1": {"class_type": "TestSlow", "inputs": {"steps": steps, "ms_per_step": 20}},
            "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
        })
    };
    let running = queue(&server, "jobs", slow(1000));
    loop {
        let message = next_message(&mut socket);
        if message["type"] == "progress" && message["data"]["prompt_id"] == running {
            break;
        }
    }
    let waiting = queue(&server, "jobs", slow(2));

    let all = get_json(&server, "/api/jobs");
    assert_eq!(all["pagination"]["total"], 3, "{all}");
    assert_eq!(all["pagination"]["has_more"], false);
    let status_of = |id: &str| {
        all["jobs"]
            .as_array()
            .unwrap()
            .iter()
            .find(|job| job["id"] == id)
            .unwrap_or_else(|| panic!("{id} missing from {all}"))["status"]
            .clone()
    };
    assert_eq!(status_of(&running), "in_progress");
    assert_eq!(status_of(&waiting), "pending");
    assert_eq!(status_of(&finished), "completed");
    assert!(all["jobs"]
        .as_array()
        .unwrap()
        .iter()
        .all(|job| job["create_time"].as_u64().unwrap() > 0));
    // Newest first.
    assert_eq!(all["jobs"][0]["id"], waiting.as_str());

    let page = get_json(
        &server,
        "/api/jobs?status=completed,pending&limit=1&offset=0&sort_order=asc",
    );
    assert_eq!(page["pagination"]["total"], 2);
    assert_eq!(page["pagination"]["has_more"], true);
    assert_eq!(page["jobs"][0]["id"], finished.as_str());
    let done = &page["jobs"][0];
    assert!(done["outputs_count"].as_u64().unwrap() >= 1, "{done}");
    assert_eq!(done["preview_output"]["nodeId"], "3");
    assert_eq!(done["preview_output"]["mediaType"], "images");
    assert!(done["execution_end_time"].as_u64() >= done["execution_start_time"].as_u64());

    let detail = get_json(&server, &format!("/api/jobs/{finished}"));
    assert_eq!(detail["outputs"]["3"]["images"][0]["type"], "output");
    assert_eq!(
        detail["workflow"]["prompt"]["1"]["class_type"],
        "VideoNoise"
    );
    assert_eq!(get(&server, "/api/jobs/no-such-job").0, 404);
    assert_eq!(get(&server, "/api/jobs?status=bogus").0, 400);

    // An interrupt naming another prompt stops nothing; cancelling the waiting job drops it,
    // cancelling the running one stops it.
    assert_eq!(
        post(
            &server,
            "/interrupt",
            json!({"prompt_id": waiting}).to_string().as_bytes()
        )
        .0,
        200
    );
    assert_eq!(
        get_json(&server, &format!("/api/jobs/{running}"))["status"],
        "in_progress"
    );
    assert_eq!(
        post(&server, &format!("/api/jobs/{waiting}/cancel"), b"").0,
        200
    );
    assert_eq!(
        get_json(&server, "/api/jobs?status=pending")["pagination"]["total"],
        0
    );
    let (status, reply) = post(
        &server,
        "/api/jobs/cancel",
        json!({"job_ids": [running]}).to_string().as_bytes(),
    );
    assert_eq!(
        (status, reply["cancelled"].clone()),
        (200, json!([running]))
    );
    messages_until_done(&mut socket, &running);
    let stopped = get_json(&server, &format!("/api/jobs/{running}"));
    assert_eq!(stopped["status"], "failed", "{stopped}");
}
