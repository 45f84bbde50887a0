//! The `vdm` command: run, validate and list node workflows.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use clap::{Args, Parser, Subcommand};
use serde_json::json;
use vdm::events::{EventSink, JsonLines, ProgressBars, Silent};
use vdm::{plugin, ui_workflow, Executor, PluginSet, RunError, Workflow};

/// Exit status of a workflow that failed validation (or could not be read as one).
const EXIT_INVALID: u8 = 2;
/// Exit status of a workflow that failed while running.
const EXIT_FAILED: u8 = 1;
/// Exit status of a run stopped by Ctrl-C (128 + SIGINT, as shells report it).
const EXIT_INTERRUPTED: u8 = 130;

#[derive(Parser)]
#[command(
    name = "vdm",
    version,
    about = "Run video-diffusion node workflows (ComfyUI API format)"
)]
struct Cli {
    /// Folder of plugins to load (repeatable); also VDM_PLUGIN_PATH and the binary's folder.
    #[arg(long = "plugins", global = true, value_name = "DIR")]
    plugins: Vec<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Validate and run a workflow.
    Run {
        #[command(flatten)]
        workflow: WorkflowArgs,
        /// Output folder for saved files (default: the current folder).
        #[arg(long, value_name = "DIR")]
        out: Option<PathBuf>,
        #[command(flatten)]
        settings: Settings,
        /// Keep NaN or infinite values in a node's output latents or frames (printing a
        /// warning) instead of stopping the run with an error naming the node.
        #[arg(long)]
        allow_non_finite: bool,
        /// Print one JSON object per line for each event (ComfyUI's websocket messages).
        #[arg(long)]
        json_events: bool,
        /// No progress bars.
        #[arg(long, short)]
        quiet: bool,
        /// Let glibc return freed memory to the system. By default `vdm run` keeps freed memory
        /// for reuse (large tensors then skip page faults, about a quarter of a UNet forward on
        /// the CPU), at the price of holding the process's peak memory until it exits.
        #[arg(
            long,
            env = "VDM_NO_RETAIN_FREED_MEMORY",
            value_parser = clap::builder::FalseyValueParser::new()
        )]
        no_retain_freed_memory: bool,
    },
    /// Check a workflow against the loaded nodes without running it: links, types and ranges,
    /// and what the nodes check before running (every model file named exists, ...).
    Validate {
        #[command(flatten)]
        workflow: WorkflowArgs,
        #[command(flatten)]
        settings: Settings,
        /// Print the report as ComfyUI's {"error", "node_errors"} JSON.
        #[arg(long)]
        json: bool,
    },
    /// Run every shipped workflow on tiny models with random weights (written once into a cache
    /// folder), small and fast: each node end to end without downloading anything. The videos
    /// are noise; the point is to see the nodes work.
    Demo {
        /// Output folder.
        #[arg(long, value_name = "DIR", default_value = "vdm-demo")]
        out: PathBuf,
        /// Where the tiny models are kept (default: VDM_CACHE, else ~/.cache/vdm).
        #[arg(long, value_name = "DIR")]
        cache: Option<PathBuf>,
        /// Width and height of the videos, in pixels (a multiple of 16).
        #[arg(long, default_value_t = 128, value_parser = parse_demo_size)]
        size: u32,
        /// Frames per video.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u32).range(2..=32))]
        frames: u32,
        /// Sampling steps.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=50))]
        steps: u32,
        /// Compute device: auto, cpu, cuda or cuda:N.
        #[arg(long, default_value = "auto", value_parser = parse_device)]
        device: String,
    },
    /// Serve ComfyUI's server API, and its web editor when installed
    /// (`pip install comfyui-frontend-package`), to build and run workflows in a browser.
    Serve {
        /// Address to listen on. Anything but loopback exposes the server, which has no
        /// authentication, to the network.
        #[arg(long, default_value = "127.0.0.1")]
        listen: std::net::IpAddr,
        /// Port to listen on (0: any free port, printed at start).
        #[arg(long, default_value_t = 8188)]
        port: u16,
        /// The editor's static files (default: the `static` folder of the installed
        /// `comfyui_frontend_package` Python package).
        #[arg(long, value_name = "DIR", env = "VDM_FRONTEND")]
        frontend: Option<PathBuf>,
        /// Output folder for saved files.
        #[arg(long, value_name = "DIR", default_value = "output")]
        out: PathBuf,
        /// Latent previews while sampling, as ComfyUI's option: `latent2rgb` (or `auto`) sends
        /// each step's estimate, `none` sends nothing.
        #[arg(long, default_value = "auto", value_parser = ["auto", "latent2rgb", "none"])]
        preview_method: String,
        #[command(flatten)]
        settings: Settings,
    },
    /// Train: customise a motion module on one clip (VMC), or train the lightweight temporal
    /// adapter on a folder of clips.
    Train {
        #[command(subcommand)]
        job: TrainCommand,
    },
    /// Print a ComfyUI UI-format workflow (what the editor's "Save" writes) in the API format,
    /// as the editor's "Export (API)" would; an API-format file is printed as it is read.
    /// `run` and `validate` read UI files directly.
    Convert {
        /// Workflow file in either format.
        workflow: PathBuf,
    },
    /// List the loaded nodes (and any refused plugins, on stderr).
    Nodes {
        /// Print what ComfyUI's /object_info would return for these nodes.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum TrainCommand {
    /// VMC: learn the motion of one clip by fine-tuning the temporal attention (Q, K, V) of a
    /// motion module; writes the tuned projections as a small safetensors patch into --out
    /// (with a training state, from which an interrupted run resumes, and the losses as CSV).
    Vmc {
        #[command(flatten)]
        job: vdm::training::VmcJob,
        #[command(flatten)]
        run: TrainRun,
    },
    /// Train the lightweight motion-adaptive temporal modules (Hong & Quan) on a frozen SD 1.x
    /// UNet, on a folder of clips; writes the adapter into --out (with a training state, from
    /// which an interrupted run resumes, and the losses as CSV). It loads through
    /// TemporalAttentionInjector's `adapter` input or LoadTemporalAdapter.
    Temporal {
        #[command(flatten)]
        job: vdm::training::TemporalJob,
        #[command(flatten)]
        run: TrainRun,
    },
}

/// Where a training command writes and what it runs on.
#[derive(Args)]
struct TrainRun {
    /// Output folder.
    #[arg(long, value_name = "DIR", default_value = "output")]
    out: PathBuf,
    /// Print the workflow that the command runs (API format) and exit.
    #[arg(long)]
    print_workflow: bool,
    #[command(flatten)]
    settings: Settings,
}

/// Where nodes find their files, and what they compute on.
#[derive(Args)]
struct Settings {
    /// Models folder with ComfyUI's layout (checkpoints/, animatediff_models/, vae/); also VDM_MODELS.
    #[arg(long, value_name = "DIR", env = "VDM_MODELS")]
    models: Option<PathBuf>,
    /// Folder that relative input paths are resolved against when they are not found from the
    /// current folder (default: the workflow file's folder).
    #[arg(long, value_name = "DIR")]
    input: Option<PathBuf>,
    /// Compute device: auto, cpu, cuda or cuda:N.
    #[arg(long, default_value = "auto", value_parser = parse_device)]
    device: String,
    /// The most host memory one node may allocate (512M, 8G, 1.5GiB, ...); a node that
    /// estimates more refuses to start. Default: 90% of the memory available when it starts.
    #[arg(long, value_name = "SIZE", env = "VDM_MAX_MEMORY", value_parser = parse_size)]
    max_memory: Option<u64>,
    /// The same for GPU memory. Default: 90% of the GPU's free memory when the node starts.
    #[arg(long, value_name = "SIZE", env = "VDM_MAX_GPU_MEMORY", value_parser = parse_size)]
    max_gpu_memory: Option<u64>,
}

impl Settings {
    /// The executor with these settings, after checking that a CUDA device can be served.
    fn executor<'a>(
        &self,
        plugins: &'a PluginSet,
        sink: &'a dyn EventSink,
        workflow_file: &std::path::Path,
    ) -> Result<Executor<'a>, String> {
        let wants_cuda = self.device.starts_with("cuda");
        let has_cuda = plugins
            .plugins
            .iter()
            .any(|p| p.features.iter().any(|f| f == "cuda"));
        if wants_cuda && !plugins.plugins.is_empty() && !has_cuda {
            return Err(format!(
                "--device {}: the loaded plugins are built without CUDA (build with \
                 `--features vdm-nodes/cuda`), use --device cpu or auto",
                self.device
            ));
        }
        let mut executor = Executor::new(plugins, sink).with_setting("device", &self.device);
        if let Some(models) = &self.models {
            executor = executor.with_setting("models_dir", models.to_string_lossy());
        }
        // A workflow's own clips travel with it: `vid2vid.json` names `sample-clip.gif` beside it.
        let input_dir = self.input.clone().or_else(|| {
            workflow_file.parent().map(|dir| {
                if dir.as_os_str().is_empty() {
                    PathBuf::from(".")
                } else {
                    dir.to_path_buf()
                }
            })
        });
        if let Some(input) = input_dir {
            executor = executor.with_setting("input_dir", input.to_string_lossy());
        }
        if let Some(bytes) = self.max_memory {
            executor = executor.with_setting("max_memory", bytes.to_string());
        }
        if let Some(bytes) = self.max_gpu_memory {
            executor = executor.with_setting("max_gpu_memory", bytes.to_string());
        }
        Ok(executor)
    }
}

/// A size in bytes, or with a unit: `512M`, `8G`, `1.5GiB`, `2T` (K, M, G, T are binary, as
/// memory is counted).
fn parse_size(text: &str) -> Result<u64, String> {
    let trimmed = text.trim();
    let split = trimmed
        .find(|c: char| !(c.is_ascii_digit() || c == '.'))
        .unwrap_or(trimmed.len());
    let (number, unit) = trimmed.split_at(split);
    let value: f64 = number
        .parse()
        .map_err(|_| "expected a size such as 512M, 8G or 1.5GiB".to_owned())?;
    let scale: u64 = match unit.trim().to_ascii_lowercase().as_str() {
        "" | "b" => 1,
        "k" | "kb" | "kib" => 1 << 10,
        "m" | "mb" | "mib" => 1 << 20,
        "g" | "gb" | "gib" => 1 << 30,
        "t" | "tb" | "tib" => 1 << 40,
        other => return Err(format!("unknown unit `{other}` (use K, M, G or T)")),
    };
    let bytes = value * scale as f64;
    if !(bytes.is_finite() && bytes >= 1.0 && bytes < u64::MAX as f64) {
        return Err("the size must be at least one byte".to_owned());
    }
    Ok(bytes as u64)
}

/// A demo video size: a multiple of 16 pixels (latents of a multiple of 2), 16 to 1024.
fn parse_demo_size(text: &str) -> Result<u32, String> {
    match text.parse::<u32>() {
        Ok(size) if (16..=1024).contains(&size) && size % 16 == 0 => Ok(size),
        _ => Err("expected a multiple of 16 from 16 to 1024".to_owned()),
    }
}

/// `auto`, `cpu`, `cuda` or `cuda:N`.
fn parse_device(name: &str) -> Result<String, String> {
    let known = matches!(name, "auto" | "cpu" | "cuda")
        || name
            .strip_prefix("cuda:")
            .is_some_and(|n| n.parse::<usize>().is_ok());
    if known {
        Ok(name.to_owned())
    } else {
        Err("expected auto, cpu, cuda or cuda:N".to_owned())
    }
}

#[derive(Args)]
struct WorkflowArgs {
    /// Workflow file in ComfyUI's API format.
    workflow: PathBuf,
    /// Override a literal input: ID.INPUT=VALUE (VALUE is JSON, or else a string).
    #[arg(long = "set", value_name = "ID.INPUT=VALUE")]
    set: Vec<String>,
}

fn main() -> ExitCode {
    // Library code (candle) captures a backtrace into every error when RUST_BACKTRACE is set,
    // which would then trail ordinary node errors; panics keep their backtraces.
    if std::env::var_os("RUST_LIB_BACKTRACE").is_none() {
        std::env::set_var("RUST_LIB_BACKTRACE", "0");
    }
    let cli = Cli::parse();
    // Before the plugins load and anything large is allocated, so that every tensor of the run
    // comes from the retained heap.
    if matches!(
        cli.command,
        Command::Run {
            no_retain_freed_memory: false,
            ..
        }
    ) {
        vdm::allocator::retain_freed_memory();
    }
    let plugins = PluginSet::load(&plugin::default_dirs(&cli.plugins), &[]);
    for refused in &plugins.refused {
        eprintln!("warning: plugin refused: {refused}");
    }
    match cli.command {
        Command::Nodes { json } => list_nodes(&plugins, json),
        Command::Convert { workflow } => convert(&workflow, &plugins),
        Command::Demo {
            out,
            cache,
            size,
            frames,
            steps,
            device,
        } => {
            if let Some(why) = plugins.none_found() {
                eprintln!("{why}");
                return ExitCode::from(EXIT_INVALID);
            }
            let options = vdm::demo::DemoOptions {
                size,
                frames,
                steps,
                models_dir: cache
                    .unwrap_or_else(vdm::demo::default_cache_dir)
                    .join("demo-models"),
                out_dir: out,
                device,
            };
            println!(
                "vdm demo: every workflow on tiny models with RANDOM weights (the videos are \
                 noise), {size}×{size} pixels, {frames} frames, {steps} steps\nmodels: {}\n\
                 outputs: {}",
                options.models_dir.display(),
                options.out_dir.display()
            );
            let runs = vdm::demo::run_demo(&plugins, &options, |run| match &run.result {
                Ok(files) => println!(
                    "  ok    {:<22} {:>6.1} s  {}",
                    run.workflow,
                    run.seconds,
                    files.join(", ")
                ),
                Err(e) => println!(
                    "  FAIL  {:<22} {:>6.1} s  {}",
                    run.workflow,
                    run.seconds,
                    e.trim_end()
                ),
            });
            match runs {
                Ok(runs) if runs.iter().all(|r| r.result.is_ok()) => ExitCode::SUCCESS,
                Ok(_) => ExitCode::from(EXIT_FAILED),
                Err(e) => {
                    eprintln!("error: {e}");
                    ExitCode::from(EXIT_FAILED)
                }
            }
        }
        Command::Train { job } => train(&plugins, job),
        Command::Serve {
            listen,
            port,
            frontend,
            out,
            preview_method,
            settings,
        } => serve(
            plugins,
            listen,
            port,
            frontend,
            out,
            &preview_method,
            settings,
        ),
        Command::Validate {
            workflow,
            settings,
            json,
        } => {
            let workflow_file = workflow.workflow.clone();
            let workflow = match read_workflow(&workflow, &plugins, json) {
                Ok(w) => w,
                Err(code) => return code,
            };
            let executor = match settings.executor(&plugins, &Silent, &workflow_file) {
                Ok(executor) => executor,
                Err(message) => return refuse(&message, json),
            };
            let report = executor.validate(&workflow);
            if json {
                println!(
                    "{}",
                    serde_json::to_string_pretty(&report).expect("serialisable")
                );
            } else if report.is_ok() {
                println!("valid: {} nodes", workflow.nodes.len());
            } else {
                eprint!("{}", report.to_text());
            }
            if report.is_ok() {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(EXIT_INVALID)
            }
        }
        Command::Run {
            workflow,
            out,
            settings,
            allow_non_finite,
            json_events,
            quiet,
            no_retain_freed_memory: _,
        } => {
            let workflow_file = workflow.workflow.clone();
            let workflow = match read_workflow(&workflow, &plugins, json_events) {
                Ok(w) => w,
                Err(code) => return code,
            };
            execute(
                &plugins,
                &workflow,
                &workflow_file,
                out,
                &settings,
                RunFlags {
                    allow_non_finite,
                    json_events,
                    quiet,
                },
            )
        }
    }
}

/// How `execute` reports.
#[derive(Clone, Copy)]
struct RunFlags {
    allow_non_finite: bool,
    json_events: bool,
    quiet: bool,
}

/// Runs `workflow` (read from `workflow_file`, whose folder is the default input folder) with
/// `settings`, writing into `out`, and reports what it wrote or why it stopped.
fn execute(
    plugins: &PluginSet,
    workflow: &Workflow,
    workflow_file: &std::path::Path,
    out: Option<PathBuf>,
    settings: &Settings,
    RunFlags {
        allow_non_finite,
        json_events,
        quiet,
    }: RunFlags,
) -> ExitCode {
    let sink: Box<dyn EventSink> = if json_events {
        Box::new(JsonLines)
    } else if quiet {
        Box::new(Silent)
    } else {
        Box::new(ProgressBars::new())
    };
    let out = out.unwrap_or_else(|| PathBuf::from("."));
    let executor = match settings.executor(plugins, sink.as_ref(), workflow_file) {
        Ok(executor) => executor
            .with_setting("output_dir", out.to_string_lossy())
            .with_setting("allow_non_finite", allow_non_finite.to_string()),
        Err(message) => return refuse(&message, json_events),
    };
    stop_on_interrupt(executor.cancel_flag());
    match executor.run(workflow) {
        Ok(summary) => {
            if !json_events {
                for (node, ui) in &summary.ui {
                    for file in ui
                        .as_object()
                        .into_iter()
                        .flat_map(|o| o.values())
                        .flat_map(|v| v.as_array().cloned().unwrap_or_default())
                    {
                        if let Some(path) = file.get("fullpath").and_then(|p| p.as_str()) {
                            println!("node {node}: wrote {path}");
                        }
                    }
                }
            }
            ExitCode::SUCCESS
        }
        Err(RunError::Invalid(report)) => {
            if json_events {
                println!("{}", json!({"type": "validation_error", "data": report}));
            } else {
                eprint!("{}", report.to_text());
            }
            ExitCode::from(EXIT_INVALID)
        }
        Err(RunError::Node(error)) => {
            eprintln!("error: {error}");
            ExitCode::from(EXIT_FAILED)
        }
        Err(RunError::Interrupted { node, class_type }) => {
            eprintln!("interrupted (at node {node}, {class_type})");
            ExitCode::from(EXIT_INTERRUPTED)
        }
    }
}

/// `vdm train …`: builds the job's workflow and runs it.
fn train(plugins: &PluginSet, command: TrainCommand) -> ExitCode {
    let (workflow, run) = match command {
        TrainCommand::Vmc { job, run } => (vdm::training::vmc_workflow(&job), run),
        TrainCommand::Temporal { job, run } => (vdm::training::temporal_workflow(&job), run),
    };
    if run.print_workflow {
        println!(
            "{}",
            serde_json::to_string_pretty(&workflow).expect("serialisable")
        );
        return ExitCode::SUCCESS;
    }
    if let Some(why) = plugins.none_found() {
        eprintln!("{why}");
        return ExitCode::from(EXIT_INVALID);
    }
    let workflow = match Workflow::from_json(workflow) {
        Ok(workflow) => workflow,
        Err(e) => return refuse(&e.to_string(), false),
    };
    // Relative clip paths are the current folder's.
    let here = PathBuf::from("vdm-train");
    let flags = RunFlags {
        allow_non_finite: false,
        json_events: false,
        quiet: false,
    };
    execute(
        plugins,
        &workflow,
        &here,
        Some(run.out),
        &run.settings,
        flags,
    )
}

/// `vdm serve`: runs until the process is stopped.
fn serve(
    plugins: PluginSet,
    listen: std::net::IpAddr,
    port: u16,
    frontend: Option<PathBuf>,
    out: PathBuf,
    preview_method: &str,
    settings: Settings,
) -> ExitCode {
    if let Some(why) = plugins.none_found() {
        eprintln!("warning: {why}");
    }
    let mut options = vdm::serve::ServeOptions::new(out);
    options.listen = listen;
    options.port = port;
    options.frontend = vdm::serve::find_frontend(frontend);
    options.models = settings.models.clone();
    if let Some(input) = &settings.input {
        options.input = input.clone();
    }
    options
        .settings
        .insert("device".into(), settings.device.clone());
    let previews = match preview_method {
        "none" => "none",
        _ => "latent2rgb",
    };
    options.settings.insert("previews".into(), previews.into());
    if let Some(bytes) = settings.max_memory {
        options
            .settings
            .insert("max_memory".into(), bytes.to_string());
    }
    if let Some(bytes) = settings.max_gpu_memory {
        options
            .settings
            .insert("max_gpu_memory".into(), bytes.to_string());
    }
    if !listen.is_loopback() {
        eprintln!(
            "warning: listening on {listen}: the server has no authentication, anyone who can \
             reach this address can run workflows and read the output folder"
        );
    }
    match &options.frontend {
        Some(dir) => println!("editor: {}", dir.display()),
        None => println!(
            "no editor frontend found (pip install comfyui-frontend-package, or --frontend DIR); \
             serving the API only"
        ),
    }
    let server = match vdm::serve::start(plugins, options) {
        Ok(server) => server,
        Err(e) => {
            eprintln!("error: cannot start the server: {e}");
            return ExitCode::from(EXIT_FAILED);
        }
    };
    println!("listening on http://{}", server.address);
    match server.wait() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILED)
        }
    }
}

/// A problem with the command line itself: printed (as the `error` of a report under
/// `--json`/`--json-events`), exit status 2.
fn refuse(message: &str, json_output: bool) -> ExitCode {
    if json_output {
        println!(
            "{}",
            json!({"error": {"type": "invalid_settings", "message": message, "details": "", "extra_info": {}}, "node_errors": {}})
        );
    } else {
        eprintln!("error: {message}");
    }
    ExitCode::from(EXIT_INVALID)
}

/// Ctrl-C (SIGINT, and SIGTERM) sets the run's cancel flag: the running node stops at its next
/// check (a sampling step), nothing after it runs, and the run ends as `interrupted` with exit
/// status 130. A second Ctrl-C quits at once.
fn stop_on_interrupt(cancel: Arc<AtomicBool>) {
    let result = ctrlc::set_handler(move || {
        if cancel.swap(true, Ordering::SeqCst) {
            std::process::exit(i32::from(EXIT_INTERRUPTED));
        }
        eprintln!("\ninterrupting: the run stops at the next step (Ctrl-C again to quit now)");
    });
    if let Err(e) = result {
        eprintln!("warning: Ctrl-C will not stop the run cleanly: {e}");
    }
}

/// Reads, parses and applies `--set`; on failure prints the problem and gives the exit code.
fn read_workflow(
    args: &WorkflowArgs,
    plugins: &PluginSet,
    json_output: bool,
) -> Result<Workflow, ExitCode> {
    let fail = |kind: &str, message: String| {
        if json_output {
            println!(
                "{}",
                json!({"error": {"type": kind, "message": message, "details": "", "extra_info": {}}, "node_errors": {}})
            );
        } else {
            eprintln!("error: {message}");
        }
        ExitCode::from(EXIT_INVALID)
    };
    let text = std::fs::read_to_string(&args.workflow).map_err(|e| {
        fail(
            "invalid_prompt",
            format!("cannot read {}: {e}", args.workflow.display()),
        )
    })?;
    let (mut workflow, warnings) = ui_workflow::parse_workflow(&text, plugins).map_err(|e| {
        fail(
            "invalid_prompt",
            format!("{}: {e}", args.workflow.display()),
        )
    })?;
    for warning in warnings
        .iter()
        .chain(&vdm::validate::ignored_inputs(&workflow, plugins))
    {
        eprintln!("warning: {warning}");
    }
    for assignment in &args.set {
        apply_set(&mut workflow, assignment).map_err(|e| fail("invalid_prompt", e))?;
    }
    Ok(workflow)
}

/// `ID.INPUT=VALUE`: the value is parsed as JSON when it is JSON, else taken as a string.
fn apply_set(workflow: &mut Workflow, assignment: &str) -> Result<(), String> {
    let (target, value) = assignment
        .split_once('=')
        .ok_or_else(|| format!("--set {assignment}: expected ID.INPUT=VALUE"))?;
    let (id, input) = target
        .split_once('.')
        .ok_or_else(|| format!("--set {assignment}: expected ID.INPUT=VALUE"))?;
    let value = serde_json::from_str(value).unwrap_or_else(|_| json!(value));
    workflow.set_literal(id, input, value)
}

fn convert(path: &std::path::Path, plugins: &PluginSet) -> ExitCode {
    let args = WorkflowArgs {
        workflow: path.to_owned(),
        set: Vec::new(),
    };
    let workflow = match read_workflow(&args, plugins, false) {
        Ok(workflow) => workflow,
        Err(code) => return code,
    };
    println!(
        "{}",
        serde_json::to_string_pretty(&workflow.to_json()).expect("serialisable")
    );
    if let Some(why) = plugins.none_found() {
        eprintln!("{why}");
    }
    ExitCode::SUCCESS
}

fn list_nodes(plugins: &PluginSet, json: bool) -> ExitCode {
    if json {
        let info = vdm::object_info::object_info(plugins.descriptors(), "vdm_nodes");
        println!(
            "{}",
            serde_json::to_string_pretty(&info).expect("serialisable")
        );
    } else {
        for plugin in &plugins.plugins {
            println!(
                "{} ({}; features: {})",
                plugin.name,
                plugin.path.display(),
                plugin.features.join(", ")
            );
        }
        for d in plugins.descriptors() {
            let output = if d.output_node { " [output]" } else { "" };
            println!(
                "  {:<24} {:<12} {}{output}",
                d.class_type.as_str(),
                d.category.as_str(),
                d.display_name.as_str()
            );
        }
    }
    if let Some(why) = plugins.none_found() {
        eprintln!("{why}");
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_parse_in_binary_units() {
        assert_eq!(parse_size("512M"), Ok(512 << 20));
        assert_eq!(parse_size("8G"), Ok(8 << 30));
        assert_eq!(parse_size("1.5GiB"), Ok(3 << 29));
        assert_eq!(parse_size("4096"), Ok(4096));
        for bad in ["lots", "8X", "0", "", "-1G"] {
            assert!(parse_size(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn devices_are_checked_by_name() {
        for good in ["auto", "cpu", "cuda", "cuda:1"] {
            assert!(parse_device(good).is_ok(), "{good}");
        }
        for bad in ["bogus", "cuda:", "cuda:x", "gpu"] {
            assert!(parse_device(bad).is_err(), "{bad}");
        }
    }
}
