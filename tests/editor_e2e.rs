//! The editor end to end: ComfyUI's unmodified frontend, in headless Chromium, against
//! `vdm serve` with the real plugin. The page must list vdm's nodes, load a vdm workflow,
//! queue it over the API and show the output it made.
//!
//! Chromium is driven through the DevTools protocol over a websocket (`tungstenite`), so the
//! test needs no browser-automation package. It skips, saying why, when there is no Chromium
//! (`VDM_CHROMIUM`, else `chromium`, `chromium-browser`, `google-chrome` on `PATH`) or no
//! frontend (`VDM_FRONTEND`, else the `comfyui_frontend_package` that `python3` imports): the
//! frontend is GPL and not part of this repository. With `VDM_SCREENSHOT=docs/editor.png` it
//! saves the page as it looks after the run.

mod common;

use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value as Json};
use tungstenite::stream::MaybeTlsStream;
use tungstenite::{Message, WebSocket};

/// The viewport, and the size of the screenshot.
const WIDTH: u32 = 1280;
const HEIGHT: u32 = 800;

/// How long each stage may take: several times what each takes on a 2-core machine (the
/// whole test runs in about 6 s there).
const START_TIMEOUT: Duration = Duration::from_secs(20);
const EDITOR_TIMEOUT: Duration = Duration::from_secs(40);
const RUN_TIMEOUT: Duration = Duration::from_secs(40);

/// The Chromium to drive, if one is installed.
fn find_chromium() -> Option<PathBuf> {
    if let Some(path) = std::env::var_os("VDM_CHROMIUM") {
        return Some(PathBuf::from(path)).filter(|path| path.is_file());
    }
    let path = std::env::var_os("PATH")?;
    [
        "chromium",
        "chromium-browser",
        "google-chrome",
        "google-chrome-stable",
    ]
    .iter()
    .flat_map(|name| std::env::split_paths(&path).map(move |dir| dir.join(name)))
    .find(|candidate| candidate.is_file())
}

/// The frontend's `static/` folder, as `vdm serve` finds it.
fn find_frontend() -> Option<PathBuf> {
    let explicit = std::env::var_os("VDM_FRONTEND").map(PathBuf::from);
    vdm::serve::find_frontend(explicit).filter(|dir| dir.join("index.html").is_file())
}

/// A headless Chromium with a profile of its own, killed when dropped.
struct Browser {
    child: Child,
    profile: tempfile::TempDir,
}

impl Browser {
    fn launch(executable: &Path) -> Browser {
        let profile = tempfile::tempdir().unwrap();
        let log = std::fs::File::create(profile.path().join("chromium.log")).unwrap();
        let child = Command::new(executable)
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--no-first-run",
                "--no-default-browser-check",
                "--disable-extensions",
                "--hide-scrollbars",
                "--mute-audio",
                "--remote-debugging-port=0",
                &format!("--window-size={WIDTH},{HEIGHT}"),
                &format!("--user-data-dir={}", profile.path().display()),
                "about:blank",
            ])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{} did not start: {e}", executable.display()));
        Browser { child, profile }
    }

    /// What Chromium wrote to stderr, for failure messages.
    fn log(&self) -> String {
        let text =
            std::fs::read_to_string(self.profile.path().join("chromium.log")).unwrap_or_default();
        let tail: Vec<&str> = text.lines().rev().take(20).collect();
        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
    }

    /// The DevTools port, which Chromium writes to `DevToolsActivePort` in its profile once it
    /// listens (asking for port 0 avoids clashes between test runs).
    fn devtools_port(&mut self) -> u16 {
        let file = self.profile.path().join("DevToolsActivePort");
        let started = Instant::now();
        loop {
            if let Some(port) = std::fs::read_to_string(&file)
                .ok()
                .and_then(|text| text.lines().next()?.trim().parse().ok())
            {
                return port;
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "Chromium exited ({status}) before listening:\n{}",
                    self.log()
                );
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "Chromium did not open its DevTools port within {START_TIMEOUT:?}:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// A DevTools connection to the browser's first page, which may be listed a moment after
    /// the port opens.
    fn page(&mut self) -> Page {
        let port = self.devtools_port();
        let started = Instant::now();
        let url = loop {
            let targets: Json = ureq::get(format!("http://127.0.0.1:{port}/json/list"))
                .call()
                .ok()
                .and_then(|mut r| r.body_mut().read_to_string().ok())
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Json::Null);
            let page = targets
                .as_array()
                .into_iter()
                .flatten()
                .find(|t| t["type"] == "page")
                .and_then(|t| t["webSocketDebuggerUrl"].as_str());
            if let Some(url) = page {
                break url.to_owned();
            }
            assert!(
                started.elapsed() < START_TIMEOUT,
                "no page among Chromium's targets within {START_TIMEOUT:?}: {targets}\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(100));
        };
        let (mut socket, _) = tungstenite::connect(url).unwrap();
        if let MaybeTlsStream::Plain(stream) = socket.get_mut() {
            stream
                .set_read_timeout(Some(Duration::from_secs(30)))
                .unwrap();
        }
        Page { socket, next_id: 0 }
    }
}

impl Drop for Browser {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// One page, driven by DevTools commands.
struct Page {
    socket: WebSocket<MaybeTlsStream<TcpStream>>,
    next_id: u64,
}

impl Page {
    /// Sends a command and returns its result, skipping the events that arrive meanwhile.
    fn call(&mut self, method: &str, params: Json) -> Result<Json, String> {
        self.next_id += 1;
        let id = self.next_id;
        let command = json!({"id": id, "method": method, "params": params});
        self.socket
            .send(Message::text(command.to_string()))
            .map_err(|e| format!("{method}: {e}"))?;
        loop {
            let message = self.socket.read().map_err(|e| format!("{method}: {e}"))?;
            let Message::Text(text) = message else {
                continue;
            };
            let reply: Json = serde_json::from_str(text.as_str()).map_err(|e| e.to_string())?;
            if reply["id"] != id {
                continue;
            }
            if let Some(error) = reply.get("error") {
                return Err(format!("{method}: {error}"));
            }
            return Ok(reply["result"].clone());
        }
    }

    /// The value of a JavaScript expression in the page, promises awaited.
    fn evaluate(&mut self, expression: &str) -> Result<Json, String> {
        let result = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "awaitPromise": true, "returnByValue": true}),
        )?;
        if let Some(exception) = result.get("exceptionDetails") {
            let description = exception["exception"]["description"]
                .as_str()
                .or_else(|| exception["text"].as_str())
                .unwrap_or("an exception");
            return Err(description.to_owned());
        }
        Ok(result["result"]["value"].clone())
    }

    /// Polls `expression` until it gives a truthy value, and returns that value; panics
    /// naming `what`, with the last value or error and what `diagnose` finds, after `timeout`.
    fn wait_for(
        &mut self,
        what: &str,
        expression: &str,
        timeout: Duration,
        diagnose: impl Fn(&mut Page) -> String,
    ) -> Json {
        let started = Instant::now();
        loop {
            let last = self.evaluate(expression);
            match &last {
                Ok(Json::Null | Json::Bool(false)) | Err(_) => {}
                Ok(value) => return value.clone(),
            }
            if started.elapsed() > timeout {
                let found = diagnose(self);
                panic!("{what}: not within {timeout:?} (last: {last:?})\n{found}");
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// The page as a PNG.
    fn screenshot(&mut self) -> Vec<u8> {
        let result = self
            .call("Page.captureScreenshot", json!({"format": "png"}))
            .unwrap();
        decode_base64(result["data"].as_str().unwrap()).expect("DevTools sends valid base64")
    }
}

/// Standard base64, padding optional; `None` on any other character.
fn decode_base64(text: &str) -> Option<Vec<u8>> {
    let value = |c: u8| -> Option<u32> {
        Some(match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            _ => return None,
        } as u32)
    };
    let digits = text.trim_end_matches('=').as_bytes();
    let mut bytes = Vec::with_capacity(digits.len() * 3 / 4);
    for chunk in digits.chunks(4) {
        let mut word = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            word |= value(c)? << (18 - 6 * i);
        }
        let produced = (chunk.len() * 6) / 8;
        bytes.extend_from_slice(&word.to_be_bytes()[1..1 + produced]);
    }
    Some(bytes)
}

/// `vdm serve` with the real plugin and the frontend, on an ephemeral port, in a temporary
/// folder whose editor settings skip the first-run tour.
fn serve(frontend: PathBuf, dirs: &Path) -> std::net::SocketAddr {
    let plugins = vdm::PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(plugins.refused.is_empty(), "{:?}", plugins.refused);
    let mut options = vdm::serve::ServeOptions::new(dirs.join("output"));
    options.port = 0;
    options.frontend = Some(frontend);
    options.input = dirs.join("input");
    options.temp = dirs.join("temp");
    options.user = dirs.join("user");
    options.models = Some(dirs.join("models"));
    options.settings.insert("device".into(), "cpu".into());
    std::fs::create_dir_all(&options.user).unwrap();
    std::fs::write(
        options.user.join("comfy.settings.json"),
        json!({"Comfy.TutorialCompleted": true}).to_string(),
    )
    .unwrap();
    vdm::serve::start(plugins, options).unwrap().address
}

/// `workflows/noise-preview.json`, smaller so the run takes a moment in a debug build.
fn noise_preview() -> Json {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("workflows/noise-preview.json");
    let mut workflow: Json = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let noise = &mut workflow["1"]["inputs"];
    noise["frames"] = json!(8);
    noise["width"] = json!(256);
    noise["height"] = json!(160);
    workflow
}

/// Whether node 3 (the GIF writer) shows a loaded image served by `/view`: on the canvas
/// (`node.imgs`) or, with the editor's DOM node rendering, as an `<img>` in the page.
const OUTPUT_SHOWN: &str = r#"(() => {
    const loaded = (img) => img && img.complete && img.naturalWidth > 0
        && String(img.src).includes('/view?');
    const node = app.graph.getNodeById(3);
    if (node && (node.imgs || []).some(loaded)) return 'node.imgs';
    if ([...document.images].some(loaded)) return 'document.images';
    return false;
})()"#;

#[test]
fn the_editor_lists_vdm_nodes_runs_a_workflow_and_shows_its_output() {
    let Some(chromium) = find_chromium() else {
        println!(
            "SKIPPED editor_e2e: no Chromium (install the `chromium` package, or set \
             VDM_CHROMIUM to a Chromium or Chrome binary; VDM_CHROMIUM={:?})",
            std::env::var_os("VDM_CHROMIUM")
        );
        return;
    };
    let Some(frontend) = find_frontend() else {
        println!(
            "SKIPPED editor_e2e: no ComfyUI frontend (`pip install comfyui-frontend-package` \
             for the python3 on PATH, or set VDM_FRONTEND to its static/ folder; \
             VDM_FRONTEND={:?})",
            std::env::var_os("VDM_FRONTEND")
        );
        return;
    };
    let started = Instant::now();
    let dirs = tempfile::tempdir().unwrap();
    let address = serve(frontend, dirs.path());
    let history = |page: &mut Page| {
        let shown = page_text(page);
        let history = ureq::get(format!("http://{address}/history"))
            .call()
            .ok()
            .and_then(|mut r| r.body_mut().read_to_string().ok())
            .unwrap_or_default();
        format!("{shown}\nthe server's history: {history}")
    };

    let mut browser = Browser::launch(&chromium);
    let mut page = browser.page();
    page.call(
        "Emulation.setDeviceMetricsOverride",
        json!({"width": WIDTH, "height": HEIGHT, "deviceScaleFactor": 1, "mobile": false}),
    )
    .unwrap();
    page.call(
        "Page.navigate",
        json!({"url": format!("http://{address}/")}),
    )
    .unwrap();

    page.wait_for(
        "vdm's nodes in the editor's node library",
        "!!(window.app && window.LiteGraph && LiteGraph.registered_node_types['VideoNoise'] \
           && LiteGraph.registered_node_types['SaveVideoFile'] && app.graph)",
        EDITOR_TIMEOUT,
        page_text,
    );
    let loaded_in = started.elapsed();

    let workflow = noise_preview();
    page.evaluate(&format!(
        "(async () => {{ await app.loadApiJson({workflow}, 'noise-preview.json'); return true; }})()"
    ))
    .unwrap();
    let node_types = page
        .evaluate("app.graph.nodes.map(n => n.type).sort()")
        .unwrap();
    assert_eq!(
        node_types,
        json!(["LatentPreview", "SaveVideoFile", "VideoNoise"])
    );

    page.evaluate("(async () => { await app.queuePrompt(0, 1); return true; })()")
        .unwrap();
    let shown_by = page.wait_for(
        "the GIF of node 3 shown in the editor after the run",
        OUTPUT_SHOWN,
        RUN_TIMEOUT,
        history,
    );
    let outputs = page.evaluate("JSON.stringify(app.nodeOutputs)").unwrap();
    assert!(
        outputs
            .as_str()
            .unwrap_or_default()
            .contains("noise-preview"),
        "the editor's node outputs name no noise-preview file: {outputs}"
    );
    println!(
        "editor_e2e: editor ready after {loaded_in:.1?}, output shown ({shown_by}) after {:.1?}",
        started.elapsed()
    );

    if let Some(path) = std::env::var_os("VDM_SCREENSHOT") {
        // Fit the graph to the window, then give the canvas a frame to draw.
        let _ = page.evaluate(
            "(async () => { await app.extensionManager.command.execute('Comfy.Canvas.FitView'); \
             await new Promise(r => setTimeout(r, 500)); return true; })()",
        );
        let png = page.screenshot();
        std::fs::write(&path, &png).unwrap_or_else(|e| {
            panic!("{}: {e}", Path::new(&path).display());
        });
        println!(
            "editor_e2e: screenshot saved to {} ({} KB)",
            Path::new(&path).display(),
            png.len() / 1024
        );
    }
}

/// What the page shows, for a failure message.
fn page_text(page: &mut Page) -> String {
    let text = page
        .evaluate("document.title + ' | ' + (document.body ? document.body.innerText : '')")
        .map(|t| {
            t.as_str()
                .unwrap_or_default()
                .chars()
                .take(600)
                .collect::<String>()
        });
    format!("the page shows: {text:?}")
}

#[test]
fn base64_decodes_as_devtools_encodes() {
    assert_eq!(decode_base64("aGVsbG8=").unwrap(), b"hello");
    assert_eq!(decode_base64("aGVsbG8h").unwrap(), b"hello!");
    assert_eq!(decode_base64("").unwrap(), b"");
    assert_eq!(decode_base64("a$=="), None);
}
