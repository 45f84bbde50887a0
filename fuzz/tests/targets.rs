//! Short fuzz runs of every target, so that `cargo test --workspace` keeps the readers free of
//! crashes on a fixed set of mutated inputs, and a check that every seed is a valid input (a
//! seed its reader refuses would leave the mutations exploring error paths only).

use std::process::Command;

use vdm_fuzz::{Context, Target};

/// Cases per target: enough to reach the structured mutations of each, a few seconds a target
/// in a debug build.
const CASES: u64 = 400;

#[test]
fn every_seed_is_accepted_by_its_reader() {
    let ctx = Context::new().unwrap();
    for target in Target::ALL {
        for (i, seed) in ctx.seeds(target).iter().enumerate() {
            match target.execute(&ctx, seed) {
                Ok(()) => {}
                // Frame selection follows from a hash of the input; skipping past the last
                // frame of a valid file is a refusal of the selection, not of the file.
                Err(e) if e.contains("no frames left after skip_first_frames") => {}
                Err(e) => panic!("{} seed {i} is refused: {e}", target.name()),
            }
        }
    }
}

/// Runs the fuzzer binary, whose child processes report aborts and excessive allocations as
/// findings instead of taking the test down with them.
#[test]
fn every_target_survives_a_short_run() {
    let output = Command::new(env!("CARGO_BIN_EXE_vdm-fuzz"))
        .args(["--cases", &CASES.to_string(), "--seed", "20250101"])
        .args(["--memory-limit-mb", "2048", "--timeout", "120"])
        .output()
        .expect("running vdm-fuzz");
    let stdout = String::from_utf8_lossy(&output.stdout);
    println!("{stdout}");
    let mut failures = Vec::new();
    for target in Target::ALL {
        let summary = format!("{}: {CASES} cases, ", target.name());
        assert!(
            stdout.lines().any(|l| l.starts_with(&summary)),
            "no summary for {}:\n{stdout}\n{}",
            target.name(),
            String::from_utf8_lossy(&output.stderr)
        );
        let finding = format!("  {} case ", target.name());
        failures.extend(
            stdout
                .lines()
                .filter(|l| l.starts_with(&finding))
                .map(str::to_owned),
        );
    }
    assert!(failures.is_empty(), "crashes:\n{}", failures.join("\n"));
}
