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
