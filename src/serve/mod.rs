//! `vdm serve`: ComfyUI's server API over vdm's engine, so that ComfyUI's web editor (served
//! unmodified from where the user installed it) lists vdm's nodes, queues workflows and shows
//! their progress and outputs.
//!
//! One queue and one worker thread run prompts in order with the synchronous [`Executor`];
//! node outputs are kept across prompts by input signature, so re-queueing an unchanged graph
//! runs only its output nodes, which always run (writing or showing the result is the point
//! of queueing), and a changed seed reruns only what depends on it.
//!
//! [`Executor`]: crate::Executor

mod clients;
mod jobs;
mod models;
mod paths;
mod queue;
mod routes;

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use crate::plugin::PluginSet;
use clients::Clients;
use queue::{Queue, Worker};

/// Where the server listens and keeps its files.
#[derive(Debug, Clone)]
pub struct ServeOptions {
    pub listen: IpAddr,
    /// 0 picks a free port.
    pub port: u16,
    /// The frontend's static files (the `static/` folder of `comfyui_frontend_package`).
    pub frontend: Option<PathBuf>,
    pub models: Option<PathBuf>,
    /// Uploads, and the folder nodes resolve relative input files against.
    pub input: PathBuf,
    /// Where output nodes write.
    pub output: PathBuf,
    /// Previews that are not kept (`type=temp`).
    pub temp: PathBuf,
    /// The editor's settings and saved workflows.
    pub user: PathBuf,
    /// Further executor settings (`device`, `max_memory`, ...).
    pub settings: BTreeMap<String, String>,
}

impl ServeOptions {
    /// Loopback on ComfyUI's port, `input/` and `output/` in the current folder, `user/`
    /// beside the output folder.
    pub fn new(output: PathBuf) -> Self {
        let user = output
            .parent()
            .map_or_else(|| PathBuf::from("user"), |p| p.join("user"));
        Self {
            listen: IpAddr::V4(Ipv4Addr::LOCALHOST),
            port: 8188,
            frontend: None,
            models: None,
            input: PathBuf::from("input"),
            output,
            temp: std::env::temp_dir().join("vdm-serve-temp"),
            user,
            settings: BTreeMap::new(),
        }
    }
}

/// What the request handlers share.
pub(crate) struct AppState {
    plugins: Arc<PluginSet>,
    options: ServeOptions,
    queue: Arc<Queue>,
    clients: Arc<Clients>,
}

/// A server running on threads of its own.
pub struct RunningServer {
    /// The address it is bound to (the port chosen when 0 was asked for).
    pub address: SocketAddr,
    thread: std::thread::JoinHandle<std::io::Result<()>>,
}

impl RunningServer {
    /// Blocks while the server runs; returns only if it fails.
    pub fn wait(self) -> std::io::Result<()> {
        self.thread
            .join()
            .unwrap_or_else(|_| Err(std::io::Error::other("the server thread panicked")))
    }
}

/// Creates the folders, binds the address, starts the worker and the HTTP server, and returns
/// once it accepts connections.
pub fn start(plugins: PluginSet, options: ServeOptions) -> std::io::Result<RunningServer> {
    for dir in [
        &options.input,
        &options.output,
        &options.temp,
        &options.user,
    ] {
        std::fs::create_dir_all(dir)?;
    }
    let listener = std::net::TcpListener::bind((options.listen, options.port))?;
    listener.set_nonblocking(true)?;
    let address = listener.local_addr()?;

    let plugins = Arc::new(plugins);
    let clients = Arc::new(Clients::default());
    let queue = Arc::new(Queue::new(clients.clone()));
    let worker = Worker {
        queue: queue.clone(),
        plugins: plugins.clone(),
        settings: executor_settings(&options),
    };
    std::thread::Builder::new()
        .name("vdm-serve-worker".into())
        .spawn(move || worker.run_forever())?;

    let state = Arc::new(AppState {
        plugins,
        options,
        queue,
        clients,
    });
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_io()
        .build()?;
    let thread = std::thread::Builder::new()
        .name("vdm-serve-http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let listener = tokio::net::TcpListener::from_std(listener)?;
                axum::serve(listener, routes::router(state)).await
            })
        })?;
    Ok(RunningServer { address, thread })
}

/// The executor settings prompts are validated and run with: the server's own, and its
/// folders, `temp_dir` included so that previews land where `/view?type=temp` serves them.
fn executor_settings(options: &ServeOptions) -> BTreeMap<String, String> {
    let mut settings = options.settings.clone();
    settings.insert("output_dir".into(), path_setting(&options.output));
    settings.insert("input_dir".into(), path_setting(&options.input));
    settings.insert("temp_dir".into(), path_setting(&options.temp));
    // Samplers send a latent preview per step to the prompt's client unless turned off.
    settings
        .entry("previews".into())
        .or_insert_with(|| "latent2rgb".into());
    if let Some(models) = &options.models {
        settings.insert("models_dir".into(), path_setting(models));
    }
    settings
}

/// A folder as an executor setting.
fn path_setting(path: &Path) -> String {
    path.to_string_lossy().into_owned()
}

/// The frontend's static files: `explicit` (`--frontend` or `VDM_FRONTEND`), else the
/// `static/` folder of the `comfyui_frontend_package` Python package when `python3` can find
/// it. `None` when neither gives an existing folder.
pub fn find_frontend(explicit: Option<PathBuf>) -> Option<PathBuf> {
    if let Some(dir) = explicit {
        return Some(dir);
    }
    let output = std::process::Command::new("python3")
        .args([
            "-c",
            "import comfyui_frontend_package, os; print(os.path.dirname(comfyui_frontend_package.__file__))",
        ])
        .stderr(std::process::Stdio::null())
        .output()
        .ok()?;
    if !output.status.success() {
        return None;
    }
    let package = PathBuf::from(String::from_utf8_lossy(&output.stdout).trim());
    let dir = package.join("static");
    dir.join("index.html").is_file().then_some(dir)
}
