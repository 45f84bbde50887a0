//! Helpers shared by the integration tests: the reference fixtures and error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The folder of diffusers reference fixtures: `$VDM_REFERENCE_DIR`, else
/// `../shared/reference/fixtures` beside the workspace.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("VDM_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/fixtures"),
    }
}

/// Every case folder whose README.json names `case` (case names may repeat with suffixes in
/// other fixture sets, so match on the README rather than on the folder name). Panics when the
/// fixture folder is missing: parity is never skipped silently.
pub fn cases(case: &str) -> Vec<PathBuf> {
    let root = reference_dir();
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("reference fixtures not found at {}: {e}", root.display()));
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let readme = p.join("README.json");
            let Ok(text) = std::fs::read_to_string(&readme) else {
                return false;
            };
            let json: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", readme.display()));
            json["case"].as_str() == Some(case)
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no fixture case `{case}` under {}",
        root.display()
    );
    found
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn load_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// ‖out − ref‖ / ‖ref‖ and max |out − ref|, in f64.
pub fn errors(out: &Tensor, reference: &Tensor) -> (f64, f64) {
    assert_eq!(out.dims(), reference.dims(), "shape mismatch");
    let out = out
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let diff = (&out - &reference).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let max = diff
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (norm(&diff) / norm(&reference).max(1e-30), max)
}

/// Asserts parity within relative error `tol`, printing both measures.
pub fn assert_close(what: &str, out: &Tensor, reference: &Tensor, tol: f64) {
    let (rel, max) = errors(out, reference);
    println!("{what}: relative error {rel:.3e}, max abs error {max:.3e}");
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} (max abs {max:.3e})"
    );
}
