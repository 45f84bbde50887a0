//! Running cases: one deterministic input per (seed, target, case number), run under
//! `catch_unwind`, with the heap it takes measured.

use std::cell::RefCell;
use std::panic::{self, AssertUnwindSafe};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Mutex, Once};
use std::time::Instant;

use fastrand::Rng;

use crate::alloc;
use crate::targets::{Context, Target};

/// What went wrong with one case.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FindingKind {
    /// The target panicked (caught).
    Panic,
    /// The case held more heap at once than the per-case limit.
    Memory,
    /// The process died while running the case (abort, refused allocation, signal).
    Abort,
    /// The case did not finish within the time limit.
    Hang,
}

impl FindingKind {
    pub fn name(self) -> &'static str {
        match self {
            FindingKind::Panic => "panic",
            FindingKind::Memory => "memory",
            FindingKind::Abort => "abort",
            FindingKind::Hang => "hang",
        }
    }

    pub fn from_name(name: &str) -> Option<Self> {
        [Self::Panic, Self::Memory, Self::Abort, Self::Hang]
            .into_iter()
            .find(|k| k.name() == name)
    }
}

/// One crashing case.
#[derive(Debug, Clone)]
pub struct Finding {
    pub target: Target,
    pub case: u64,
    pub kind: FindingKind,
    /// The panic message and location, or what the process said before dying.
    pub message: String,
    /// Where the input was saved, when crashes are saved.
    pub saved: Option<PathBuf>,
}

impl std::fmt::Display for Finding {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} case {}: {}: {}",
            self.target.name(),
            self.case,
            self.kind.name(),
            self.message
        )?;
        if let Some(path) = &self.saved {
            write!(f, " (input saved to {})", path.display())?;
        }
        Ok(())
    }
}

/// How a run is set up.
#[derive(Debug, Clone)]
pub struct Options {
    pub seed: u64,
    /// Case numbers `first_case .. first_case + cases` are run.
    pub first_case: u64,
    pub cases: u64,
    /// Stop early once this many seconds have passed.
    pub max_seconds: Option<f64>,
    /// Folder for the inputs of crashing cases.
    pub save_crashes: Option<PathBuf>,
    /// A case that holds more heap than this at once is a finding (when the counting allocator
    /// is installed).
    pub max_case_bytes: usize,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            seed: 0,
            first_case: 0,
            cases: 1000,
            max_seconds: None,
            save_crashes: None,
            max_case_bytes: 512 << 20,
        }
    }
}

/// The result of running one target.
#[derive(Debug, Clone)]
pub struct Report {
    pub target: Target,
    pub cases: u64,
    /// Cases whose input the reader accepted (the rest were refused with an error, or
    /// crashed): how deep the mutations reach.
    pub accepted: u64,
    pub findings: Vec<Finding>,
    pub seconds: f64,
}

impl Report {
    /// `target: N cases, K crashes, T s (R cases/s, A% accepted)`.
    pub fn summary(&self) -> String {
        format!(
            "{}: {} cases, {} crashes, {:.1} s ({:.0} cases/s, {:.1}% accepted)",
            self.target.name(),
            self.cases,
            self.findings.len(),
            self.seconds,
            self.cases as f64 / self.seconds.max(1e-9),
            100.0 * self.accepted as f64 / self.cases.max(1) as f64
        )
    }
}

/// The generator of one case: the same (seed, target, case) always gives the same input.
pub fn case_rng(seed: u64, target: Target, case: u64) -> Rng {
    // splitmix64 of the three, so that neighbouring cases get unrelated streams.
    let mut z = seed
        ^ (target as u64).wrapping_mul(0x9e37_79b9_7f4a_7c15)
        ^ case.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    Rng::with_seed(z ^ (z >> 31))
}

/// The input of one case.
pub fn case_input(ctx: &Context, target: Target, seed: u64, case: u64) -> Vec<u8> {
    target.generate(ctx, &mut case_rng(seed, target, case))
}

thread_local! {
    /// Set while this thread runs a case: the hook stores the panic here instead of printing.
    static CAPTURE: RefCell<Option<Option<String>>> = const { RefCell::new(None) };
}
/// Cases running on any thread; a panic on a helper thread (rayon) during one is kept here.
static RUNNING: AtomicUsize = AtomicUsize::new(0);
static FOREIGN: Mutex<Option<String>> = Mutex::new(None);

fn install_hook() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let previous = panic::take_hook();
        panic::set_hook(Box::new(move |info| {
            let payload = info.payload();
            let text = payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "(non-string panic payload)".to_string());
            let message = match info.location() {
                Some(at) => format!("{text} at {}:{}", at.file(), at.line()),
                None => text,
            };
            let captured = CAPTURE.with(|c| match &mut *c.borrow_mut() {
                Some(slot) => {
                    slot.get_or_insert(message.clone());
                    true
                }
                None => false,
            });
            if captured {
                return;
            }
            if RUNNING.load(Ordering::SeqCst) > 0 {
                FOREIGN
                    .lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .get_or_insert(message);
            } else {
                previous(info);
            }
        }));
    });
}

/// What running one input gave.
#[derive(Debug, Clone)]
pub struct Outcome {
    /// The reader accepted the input (no error, no crash).
    pub accepted: bool,
    /// What went wrong, if anything: a panic or too much memory. Errors the reader returns
    /// are the expected answer to most mutated inputs, not findings.
    pub finding: Option<(FindingKind, String)>,
}

/// Runs one input under `catch_unwind`, measuring the heap it takes.
pub fn run_input(ctx: &Context, target: Target, input: &[u8], max_case_bytes: usize) -> Outcome {
    install_hook();
    CAPTURE.with(|c| *c.borrow_mut() = Some(None));
    RUNNING.fetch_add(1, Ordering::SeqCst);
    let base = alloc::start_case();
    let result = panic::catch_unwind(AssertUnwindSafe(|| target.execute(ctx, input).is_ok()));
    let peak = alloc::peak().saturating_sub(base);
    RUNNING.fetch_sub(1, Ordering::SeqCst);
    let captured = CAPTURE.with(|c| c.borrow_mut().take()).flatten();
    let Ok(accepted) = result else {
        let foreign = FOREIGN.lock().unwrap_or_else(|e| e.into_inner()).take();
        let message = captured
            .or(foreign)
            .unwrap_or_else(|| "panic without a message".to_string());
        return Outcome {
            accepted: false,
            finding: Some((FindingKind::Panic, message)),
        };
    };
    let finding = (alloc::installed() && peak > max_case_bytes).then(|| {
        (
            FindingKind::Memory,
            format!(
                "held {} MiB at once (limit {} MiB)",
                peak >> 20,
                max_case_bytes >> 20
            ),
        )
    });
    Outcome { accepted, finding }
}

/// Writes the input of a crashing case to `dir` as
/// `{target}-{kind}-seed{seed}-case{case}.{extension}` and returns its path.
pub fn save_input(
    dir: &Path,
    target: Target,
    kind: FindingKind,
    seed: u64,
    case: u64,
    input: &[u8],
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let path = dir.join(format!(
        "{}-{}-seed{seed}-case{case}.{}",
        target.name(),
        kind.name(),
        target.extension()
    ));
    std::fs::write(&path, input)?;
    Ok(path)
}

/// Runs the cases of `options` on `target` in this process. `before_case` is called with each
/// case number and the number of cases accepted so far before the case runs (the worker
/// process reports progress with it); `on_finding` with each finding as it happens.
pub fn fuzz(
    ctx: &Context,
    target: Target,
    options: &Options,
    mut before_case: impl FnMut(u64, u64),
    mut on_finding: impl FnMut(&Finding),
) -> Report {
    let start = Instant::now();
    let mut findings = Vec::new();
    let (mut cases, mut accepted) = (0, 0);
    for case in options.first_case..options.first_case.saturating_add(options.cases) {
        if let Some(limit) = options.max_seconds {
            if start.elapsed().as_secs_f64() >= limit {
                break;
            }
        }
        before_case(case, accepted);
        let input = case_input(ctx, target, options.seed, case);
        cases += 1;
        let outcome = run_input(ctx, target, &input, options.max_case_bytes);
        accepted += u64::from(outcome.accepted);
        if let Some((kind, message)) = outcome.finding {
            let saved = options
                .save_crashes
                .as_deref()
                .and_then(|dir| save_input(dir, target, kind, options.seed, case, &input).ok());
            let finding = Finding {
                target,
                case,
                kind,
                message,
                saved,
            };
            on_finding(&finding);
            findings.push(finding);
        }
    }
    Report {
        target,
        cases,
        accepted,
        findings,
        seconds: start.elapsed().as_secs_f64(),
    }
}
