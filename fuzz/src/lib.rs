//! Property and mutation fuzzing of vdm's readers on stable Rust (no libFuzzer, no nightly).
//!
//! Each [`Target`] makes small valid inputs in code and mutates them with a seeded generator;
//! case `n` of seed `s` is always the same input, so a crash reproduces from two numbers. A
//! case runs inside `catch_unwind`: a panic is a crash, as is holding more heap than the
//! per-case limit (with [`alloc::CappedAllocator`] installed). The `vdm-fuzz` binary also runs
//! the cases in a child process, so that aborts, refused allocations and hangs are reported
//! with their case instead of ending the run.
//!
//! ```text
//! cargo run --release -p vdm-fuzz -- --cases 1000000 --save-crashes crashes   # every target
//! cargo run --release -p vdm-fuzz -- --cases 50000 pickle gif                 # some targets
//! cargo run --release -p vdm-fuzz -- --seed 7 --first-case 1234 --cases 1 png # one case again
//! cargo run --release -p vdm-fuzz -- --replay crashes/png-panic-seed7-case1234.png png
//! ```
//!
//! Arithmetic overflow is a bug worth finding, and release builds do not check for it: build
//! with `CARGO_PROFILE_RELEASE_OVERFLOW_CHECKS=true` for long runs.

pub mod alloc;
mod harness;
pub mod mutate;
pub mod targets;

pub use harness::{
    case_input, case_rng, fuzz, run_input, save_input, Finding, FindingKind, Options, Outcome,
    Report,
};
pub use targets::{Context, Target};
