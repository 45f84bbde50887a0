//! `vdm-fuzz`: runs the fuzz targets and reports crashing cases.
//!
//! By default each target runs in a child process (this binary with `--worker`) that reports
//! each case before running it. A panic is caught in the child and reported; when the child
//! dies instead (an abort, an allocation past the heap cap, a signal) or stops reporting for
//! longer than `--timeout`, the parent reports the case that was running, saves its input
//! (regenerated from the seed and case number) and starts a new child after it.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::path::PathBuf;
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use vdm_fuzz::alloc::{self, CappedAllocator};
use vdm_fuzz::{
    case_input, fuzz, run_input, save_input, Context, Finding, FindingKind, Options, Report, Target,
};

#[global_allocator]
static ALLOCATOR: CappedAllocator = CappedAllocator;

/// Mutation fuzzing of vdm's readers: workflows, safetensors, PyTorch checkpoints, GIF, PNG,
/// APNG and latent files. Case N of seed S is always the same input.
#[derive(Parser, Debug)]
#[command(name = "vdm-fuzz", version)]
struct Cli {
    /// Cases to run per target.
    #[arg(long, default_value_t = 10_000)]
    cases: u64,
    /// Seed of the case generator.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// First case number (with --cases 1, reruns one case).
    #[arg(long, default_value_t = 0, value_name = "N")]
    first_case: u64,
    /// Save the input of every crashing case in this folder.
    #[arg(long, value_name = "DIR")]
    save_crashes: Option<PathBuf>,
    /// Stop each target after this many seconds and report the cases run so far.
    #[arg(long, value_name = "SECONDS")]
    max_seconds: Option<f64>,
    /// A case that holds more heap than this at once is reported.
    #[arg(long, default_value_t = 512, value_name = "MIB")]
    case_memory_mb: usize,
    /// Heap cap of the process running the cases: an allocation past it aborts that process,
    /// and the case is reported.
    #[arg(long, default_value_t = 2048, value_name = "MIB")]
    memory_limit_mb: usize,
    /// A case running longer than this is reported as a hang.
    #[arg(long, default_value_t = 30.0, value_name = "SECONDS")]
    timeout: f64,
    /// Run the cases in this process: faster to start, but an abort ends the run.
    #[arg(long)]
    in_process: bool,
    /// Run one saved input (of the one target named) and report what happens.
    #[arg(long, value_name = "FILE")]
    replay: Option<PathBuf>,
    /// Internal: be the child process of a supervised run.
    #[arg(long, hide = true)]
    worker: bool,
    /// Targets to run (all when none is named).
    #[arg(value_enum)]
    targets: Vec<Target>,
}

impl Cli {
    fn options(&self) -> Options {
        Options {
            seed: self.seed,
            first_case: self.first_case,
            cases: self.cases,
            max_seconds: self.max_seconds,
            save_crashes: self.save_crashes.clone(),
            max_case_bytes: self.case_memory_mb << 20,
        }
    }
}

/// Caps the heap (and, as a backstop for memory the counting allocator does not see, the
/// address space) of the process that runs the cases.
fn limit_memory(mib: usize) {
    alloc::set_cap(mib << 20);
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        let bytes = ((mib as u64) << 21) + (4 << 30);
        let limit = libc::rlimit {
            rlim_cur: bytes,
            rlim_max: bytes,
        };
        // SAFETY: setrlimit reads the struct passed; lowering a limit of this process only.
        unsafe {
            libc::setrlimit(libc::RLIMIT_AS, &limit);
        }
    }
}

fn one_line(text: &str) -> String {
    text.replace(['\n', '\r', '\t'], " ")
}

/// The child: runs the cases, reporting each before it runs and each finding after.
fn worker(cli: &Cli, target: Target) -> ExitCode {
    limit_memory(cli.memory_limit_mb);
    let ctx = Context::new().expect("a scratch folder");
    // Seeds are made before the first case, so that a failure there is not blamed on a case.
    ctx.seeds(target);
    // Line-buffered: each line reaches the parent before the case it announces runs.
    let report = fuzz(
        &ctx,
        target,
        &cli.options(),
        |case, accepted| println!("S\t{case}\t{accepted}"),
        |f| {
            let saved = f
                .saved
                .as_ref()
                .map_or("-".to_string(), |p| p.display().to_string());
            println!(
                "F\t{}\t{}\t{}\t{}",
                f.case,
                f.kind.name(),
                one_line(&saved),
                one_line(&f.message)
            );
        },
    );
    println!("D\t{}\t{}", report.cases, report.accepted);
    ExitCode::SUCCESS
}

enum Message {
    Line(String),
    End,
}

/// Runs `target` in child processes, restarting after each one that dies or hangs.
fn supervise(cli: &Cli, target: Target) -> Report {
    let start = Instant::now();
    let end = cli.first_case.saturating_add(cli.cases);
    let exe = std::env::current_exe().expect("the path of this program");
    let mut next = cli.first_case;
    let mut cases = 0;
    let mut accepted = 0;
    let mut findings = Vec::new();
    let mut ctx: Option<Context> = None;
    while next < end {
        let elapsed = start.elapsed().as_secs_f64();
        let remaining = cli.max_seconds.map(|limit| limit - elapsed);
        if remaining.is_some_and(|r| r <= 0.0) {
            break;
        }
        let mut command = Command::new(&exe);
        command
            .arg("--worker")
            .args(["--seed", &cli.seed.to_string()])
            .args(["--first-case", &next.to_string()])
            .args(["--cases", &(end - next).to_string()])
            .args(["--case-memory-mb", &cli.case_memory_mb.to_string()])
            .args(["--memory-limit-mb", &cli.memory_limit_mb.to_string()])
            .arg(target.name())
            // The abort message is what the report needs, not a backtrace.
            .env("RUST_BACKTRACE", "0")
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        if let Some(r) = remaining {
            command.args(["--max-seconds", &r.to_string()]);
        }
        if let Some(dir) = &cli.save_crashes {
            command.arg("--save-crashes").arg(dir);
        }
        let mut child = command.spawn().expect("starting a worker process");
        let (send, receive) = mpsc::channel();
        let stdout = child.stdout.take().expect("piped stdout");
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                if send.send(Message::Line(line)).is_err() {
                    return;
                }
            }
            let _ = send.send(Message::End);
        });
        // The last few kilobytes of the child's stderr: the abort message is at the end, and
        // readers' own warnings are not worth printing a million times.
        let stderr_tail = Arc::new(Mutex::new(Vec::<u8>::new()));
        let mut stderr = child.stderr.take().expect("piped stderr");
        let tail = stderr_tail.clone();
        let stderr_thread = std::thread::spawn(move || {
            let mut buffer = [0u8; 4096];
            while let Ok(n) = stderr.read(&mut buffer) {
                if n == 0 {
                    break;
                }
                let mut tail = tail.lock().unwrap_or_else(|e| e.into_inner());
                tail.extend_from_slice(&buffer[..n]);
                let excess = tail.len().saturating_sub(4096);
                tail.drain(..excess);
            }
        });
        let mut running: Option<u64> = None;
        let mut worker_accepted = 0;
        let mut finished = false;
        let mut hung = false;
        loop {
            match receive.recv_timeout(Duration::from_secs_f64(cli.timeout)) {
                Ok(Message::Line(line)) => {
                    let mut parts = line.splitn(5, '\t');
                    match (parts.next(), parts.next()) {
                        (Some("S"), Some(n)) => {
                            running = n.parse().ok();
                            // Accepted before this case, counted in this worker.
                            worker_accepted =
                                parts.next().and_then(|a| a.parse().ok()).unwrap_or(0);
                            cases += 1;
                        }
                        (Some("F"), Some(n)) => {
                            let kind = parts.next().and_then(FindingKind::from_name);
                            let saved = parts.next().filter(|p| *p != "-").map(PathBuf::from);
                            let finding = Finding {
                                target,
                                case: n.parse().unwrap_or(u64::MAX),
                                kind: kind.unwrap_or(FindingKind::Panic),
                                message: parts.next().unwrap_or_default().to_string(),
                                saved,
                            };
                            println!("  {finding}");
                            findings.push(finding);
                        }
                        (Some("D"), _) => {
                            worker_accepted =
                                parts.next().and_then(|a| a.parse().ok()).unwrap_or(0);
                            finished = true;
                        }
                        _ => {}
                    }
                }
                Ok(Message::End) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    hung = true;
                    let _ = child.kill();
                    break;
                }
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
            }
        }
        let status = child.wait().expect("waiting for the worker");
        let _ = stderr_thread.join();
        accepted += worker_accepted;
        if finished && !hung {
            break;
        }
        let tail = String::from_utf8_lossy(&stderr_tail.lock().unwrap_or_else(|e| e.into_inner()))
            .into_owned();
        let Some(case) = running else {
            eprintln!(
                "{}: the worker failed before its first case ({status}): {tail}",
                target.name()
            );
            break;
        };
        let (kind, message) = if hung {
            (
                FindingKind::Hang,
                format!("no progress for {} s", cli.timeout),
            )
        } else {
            // The last line that is not the backtrace hint: the allocation that failed, or the
            // runtime's own message.
            let said = tail
                .lines()
                .rev()
                .find(|l| !l.trim().is_empty() && !l.starts_with("note: "))
                .unwrap_or("(nothing on stderr)");
            (
                FindingKind::Abort,
                format!("worker died ({status}): {}", one_line(said)),
            )
        };
        let saved = cli.save_crashes.as_deref().and_then(|dir| {
            let ctx = ctx.get_or_insert_with(|| Context::new().expect("a scratch folder"));
            let input = case_input(ctx, target, cli.seed, case);
            save_input(dir, target, kind, cli.seed, case, &input).ok()
        });
        let finding = Finding {
            target,
            case,
            kind,
            message,
            saved,
        };
        println!("  {finding}");
        findings.push(finding);
        next = case + 1;
    }
    Report {
        target,
        cases,
        accepted,
        findings,
        seconds: start.elapsed().as_secs_f64(),
    }
}

fn replay(cli: &Cli, path: &PathBuf) -> ExitCode {
    let [target] = cli.targets[..] else {
        eprintln!("--replay needs exactly one target");
        return ExitCode::from(2);
    };
    let input = match std::fs::read(path) {
        Ok(input) => input,
        Err(e) => {
            eprintln!("{}: {e}", path.display());
            return ExitCode::from(2);
        }
    };
    limit_memory(cli.memory_limit_mb);
    let ctx = Context::new().expect("a scratch folder");
    match run_input(&ctx, target, &input, cli.case_memory_mb << 20).finding {
        Some((kind, message)) => {
            println!("{}: {}: {message}", path.display(), kind.name());
            ExitCode::from(1)
        }
        None => {
            println!("{}: no crash", path.display());
            ExitCode::SUCCESS
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Some(path) = &cli.replay {
        return replay(&cli, path);
    }
    let targets = if cli.targets.is_empty() {
        Target::ALL.to_vec()
    } else {
        cli.targets.clone()
    };
    if cli.worker {
        return worker(&cli, targets[0]);
    }
    let mut crashed = false;
    let ctx = cli.in_process.then(|| {
        limit_memory(cli.memory_limit_mb);
        Context::new().expect("a scratch folder")
    });
    for target in targets {
        let report = match &ctx {
            Some(ctx) => fuzz(
                ctx,
                target,
                &cli.options(),
                |_, _| {},
                |f| println!("  {f}"),
            ),
            None => supervise(&cli, target),
        };
        println!("{}", report.summary());
        // The same bug usually crashes many cases: one line per distinct message.
        let mut distinct: BTreeMap<(&str, &str), (usize, u64)> = BTreeMap::new();
        for f in &report.findings {
            let entry = distinct
                .entry((f.kind.name(), f.message.as_str()))
                .or_insert((0, f.case));
            entry.0 += 1;
        }
        for ((kind, message), (count, first)) in &distinct {
            println!("  {count}× {kind}: {message} (first case {first})");
        }
        crashed |= !report.findings.is_empty();
        let _ = std::io::stdout().flush();
    }
    if crashed {
        ExitCode::from(1)
    } else {
        ExitCode::SUCCESS
    }
}
