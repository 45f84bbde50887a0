//! Benchmark of the host's graph work on large workflows: parsing the JSON, validating it
//! against the node descriptors (links, types, ranges, cycles) and ordering the nodes to run,
//! for chains of 1,000, 10,000 and 100,000 nodes of the test plugin (every node reading the
//! previous one, so that the graph is as deep as it is long). All three grow linearly.
//!
//! Run with `cargo bench -p vdm --bench validate`.

use std::path::PathBuf;
use std::time::Instant;

use vdm::{validate, PluginSet, Workflow};

/// The test plugin, built beside this benchmark as a dev-dependency.
fn test_plugin() -> PathBuf {
    let deps = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(PathBuf::from))
        .unwrap_or_default();
    deps.join(format!(
        "{}vdm_test_plugin{}",
        std::env::consts::DLL_PREFIX,
        std::env::consts::DLL_SUFFIX
    ))
}

/// A workflow of `n` chained additions ending in a sink, as API-format JSON.
fn chain_json(n: usize) -> String {
    let mut nodes = serde_json::Map::new();
    for i in 0..n {
        let a = if i + 1 < n {
            serde_json::json!([(i + 1).to_string(), 0])
        } else {
            serde_json::json!(1)
        };
        nodes.insert(
            i.to_string(),
            serde_json::json!({"class_type": "TestAdd", "inputs": {"a": a, "b": 1}}),
        );
    }
    nodes.insert(
        "sink".into(),
        serde_json::json!({"class_type": "TestSink", "inputs": {"value": ["0", 0]}}),
    );
    serde_json::Value::Object(nodes).to_string()
}

fn main() {
    let plugins = PluginSet::load(&[], &[test_plugin()]);
    if plugins.plugins.is_empty() {
        eprintln!(
            "the test plugin was not found next to the benchmark: {:?}",
            plugins.refused
        );
        std::process::exit(1);
    }
    println!("| nodes | parse | validate | order | total |");
    println!("|---|---|---|---|---|");
    for n in [1_000, 10_000, 100_000] {
        let text = chain_json(n);
        let start = Instant::now();
        let workflow = Workflow::parse(&text).expect("well-formed");
        let parsed = start.elapsed().as_secs_f64();
        let start = Instant::now();
        let report = validate(&workflow, &plugins);
        let validated = start.elapsed().as_secs_f64();
        assert!(report.is_ok(), "{}", report.to_text());
        let start = Instant::now();
        let order = vdm::execute::execution_order(&workflow, &["sink".to_string()]);
        let ordered = start.elapsed().as_secs_f64();
        assert_eq!(order.len(), n + 1);
        println!(
            "| {n} | {:.3} s | {validated:.3} s | {ordered:.3} s | {:.3} s |",
            parsed,
            parsed + validated + ordered
        );
    }
}
