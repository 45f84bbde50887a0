//! The host engine against a plugin whose nodes the tests control: loading and the
//! handshake, validation errors, execution order, caching, progress, cancellation, and
//! panics caught at the boundary.

mod common;

use std::sync::atomic::Ordering;

use serde_json::json;
use vdm::events::{Event, Recorder};
use vdm::{validate, Executor, PluginError, PluginSet, RunError, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-test-plugin")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

fn workflow(json: serde_json::Value) -> Workflow {
    Workflow::from_json(json).expect("well-formed workflow")
}

#[test]
fn plugin_of_another_interface_version_is_refused_and_others_still_load() {
    let set = PluginSet::load(
        &[],
        &[
            common::plugin_library("vdm-test-plugin-future"),
            common::plugin_library("vdm-test-plugin"),
        ],
    );
    assert_eq!(set.plugins.len(), 1, "the current plugin still loads");
    assert_eq!(set.refused.len(), 1);
    let PluginError::InterfaceVersion {
        found, supported, ..
    } = &set.refused[0]
    else {
        panic!(
            "expected an interface-version refusal, got {:?}",
            set.refused[0]
        );
    };
    assert_eq!(
        (*found, *supported),
        (vdm_ffi::INTERFACE_VERSION + 1, vdm_ffi::INTERFACE_VERSION)
    );
    let message = set.refused[0].to_string();
    assert!(
        message.contains(&format!("version {}", vdm_ffi::INTERFACE_VERSION + 1))
            && message.contains(&format!("version {}", vdm_ffi::INTERFACE_VERSION)),
        "{message}"
    );
}

#[test]
fn a_file_that_is_not_a_plugin_is_refused_with_a_message() {
    let dir = tempfile::tempdir().unwrap();
    let fake = dir
        .path()
        .join(format!("libvdm_fake{}", std::env::consts::DLL_SUFFIX));
    std::fs::write(&fake, b"not a library").unwrap();
    let set = PluginSet::load(&[dir.path().to_path_buf()], &[]);
    assert!(set.plugins.is_empty());
    assert!(
        matches!(set.refused.as_slice(), [PluginError::NotAPlugin { .. }]),
        "{:?}",
        set.refused
    );
}

#[test]
fn runs_only_what_outputs_need_in_dependency_order() {
    let set = plugins();
    let recorder = Recorder::default();
    let wf = workflow(json!({
        "1": {"class_type": "TestConst", "inputs": {"value": 2}},
        "2": {"class_type": "TestConst", "inputs": {"value": 3}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestSink", "inputs": {"value": ["3", 0]}},
        "5": {"class_type": "TestConst", "inputs": {"value": 99}}
    }));
    let summary = Executor::new(&set, &recorder).run(&wf).unwrap();
    assert_eq!(
        summary.executed,
        ["1", "2", "3", "4"],
        "node 5 feeds no output"
    );
    assert_eq!(summary.ui["4"], json!({"value": 5}));
    let events = recorder.0.lock().unwrap();
    assert!(matches!(
        events.first(),
        Some(Event::ExecutionStart { nodes: 4 })
    ));
    assert!(matches!(events.last(), Some(Event::ExecutionSuccess)));
}

#[test]
fn identical_computations_run_once() {
    let set = plugins();
    let wf = workflow(json!({
        "1": {"class_type": "TestCounter", "inputs": {"value": 7}},
        "2": {"class_type": "TestCounter", "inputs": {"value": 7}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["1", 0]}},
        "5": {"class_type": "TestAdd", "inputs": {"a": ["3", 0], "b": ["4", 0]}},
        "6": {"class_type": "TestRuns", "inputs": {}},
        "7": {"class_type": "TestAdd", "inputs": {"a": ["5", 0], "b": ["6", 0]}},
        "8": {"class_type": "TestSink", "inputs": {"value": ["7", 0]}}
    }));
    let before = {
        let probe = workflow(
            json!({"1": {"class_type": "TestRuns", "inputs": {}}, "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}}),
        );
        Executor::new(&set, &vdm::events::Silent)
            .run(&probe)
            .unwrap()
            .ui["2"]["value"]
            .as_i64()
            .unwrap()
    };
    let summary = Executor::new(&set, &vdm::events::Silent).run(&wf).unwrap();
    assert_eq!(
        summary.cached,
        ["2", "4"],
        "node 2 equals node 1, node 4 equals node 3"
    );
    // 5 = (7 + 7) + (7 + 7) = 28, plus the counter's runs: one more than before.
    assert_eq!(summary.ui["8"]["value"].as_i64().unwrap(), 28 + before + 1);
}

#[test]
fn a_panicking_node_becomes_an_error_naming_it() {
    let set = plugins();
    let recorder = Recorder::default();
    let wf = workflow(json!({
        "1": {"class_type": "TestConst", "inputs": {"value": 1}},
        "2": {"class_type": "TestPanic", "inputs": {"value": ["1", 0]}},
        "3": {"class_type": "TestSink", "inputs": {"value": ["2", 0]}}
    }));
    let Err(RunError::Node(error)) = Executor::new(&set, &recorder).run(&wf) else {
        panic!("expected a node error")
    };
    assert_eq!(error.node_id.as_str(), "2");
    assert_eq!(error.class_type.as_str(), "TestPanic");
    assert_eq!(error.kind, vdm_ffi::ErrorKind::Panic);
    let events = recorder.0.lock().unwrap();
    assert!(events
        .iter()
        .any(|e| matches!(e, Event::ExecutionError { node, .. } if node == "2")));
    // The host is still usable after the panic.
    drop(events);
    let ok = workflow(
        json!({"1": {"class_type": "TestConst", "inputs": {"value": 1}}, "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}}),
    );
    assert!(Executor::new(&set, &vdm::events::Silent).run(&ok).is_ok());
}

#[test]
fn a_failing_node_names_the_input() {
    let set = plugins();
    let wf = workflow(json!({
        "1": {"class_type": "TestFailOnNegative", "inputs": {"value": -4}},
        "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
    }));
    let Err(RunError::Node(error)) = Executor::new(&set, &vdm::events::Silent).run(&wf) else {
        panic!()
    };
    assert_eq!(
        error.input.as_ref().map(|s| s.as_str()).into_option(),
        Some("value")
    );
    assert!(
        error
            .to_string()
            .contains("node 1 (TestFailOnNegative), input `value`: -4 is negative"),
        "{error}"
    );
}

#[test]
fn progress_is_reported_and_cancel_stops_the_node() {
    let set = plugins();
    let recorder = Recorder::default();
    let wf = workflow(json!({
        "1": {"class_type": "TestCountdown", "inputs": {"steps": 3}},
        "2": {"class_type": "TestSink", "inputs": {"value": ["1", 0]}}
    }));
    Executor::new(&set, &recorder).run(&wf).unwrap();
    let steps: Vec<(u64, u64)> = recorder
        .0
        .lock()
        .unwrap()
        .iter()
        .filter_map(|e| match e {
            Event::Progress {
                node, value, max, ..
            } if node == "1" => Some((*value, *max)),
            _ => None,
        })
        .collect();
    assert_eq!(steps, [(1, 3), (2, 3), (3, 3)]);

    let executor = Executor::new(&set, &recorder);
    executor.cancel_flag().store(true, Ordering::SeqCst);
    let Err(RunError::Interrupted { node, .. }) = executor.run(&wf) else {
        panic!("expected an interruption")
    };
    assert_eq!(node, "1");
    let last = recorder.0.lock().unwrap().last().cloned();
    assert_eq!(
        last.map(|e| e.to_json()),
        Some(json!({"type": "execution_interrupted", "data": {
            "node_id": "1", "node_type": "TestCountdown", "executed": []}}))
    );
}

#[test]
fn a_node_that_sees_the_cancel_flag_interrupts_the_run() {
    // Sets the cancel flag at the first progress report, as Ctrl-C would during a step.
    struct CancelOnProgress(Recorder, std::sync::Arc<std::sync::atomic::AtomicBool>);
    impl vdm::EventSink for CancelOnProgress {
        fn emit(&self, event: Event) {
            if matches!(event, Event::Progress { .. }) {
                self.1.store(true, Ordering::SeqCst);
            }
            self.0.emit(event);
        }
    }
    let set = plugins();
    let flag = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
    let sink = CancelOnProgress(Recorder::default(), flag.clone());
    let executor = Executor::new(&set, &sink).with_cancel_flag(flag);
    let wf = workflow(json!({
        "1": {"class_type": "TestConst", "inputs": {"value": 5}},
        "2": {"class_type": "TestCountdown", "inputs": {"steps": ["1", 0]}},
        "3": {"class_type": "TestSink", "inputs": {"value": ["2", 0]}}
    }));
    let Err(RunError::Interrupted { node, .. }) = executor.run(&wf) else {
        panic!("expected an interruption")
    };
    assert_eq!(node, "2");
    let events = sink.0 .0.lock().unwrap();
    let steps = events
        .iter()
        .filter(|e| matches!(e, Event::Progress { .. }))
        .count();
    assert_eq!(steps, 1, "the node stops at its next check");
    assert_eq!(
        events.last().map(Event::to_json),
        Some(json!({"type": "execution_interrupted", "data": {
            "node_id": "2", "node_type": "TestCountdown", "executed": ["1"]}}))
    );
}

#[test]
fn json_events_look_like_comfyui_messages() {
    let event = Event::Progress {
        node: "3".into(),
        value: 2,
        max: 20,
        text: "step".into(),
    };
    assert_eq!(
        event.to_json(),
        json!({"type": "progress", "data": {"node": "3", "value": 2, "max": 20, "text": "step"}})
    );
}

#[test]
fn cycles_are_reported_on_every_node_of_the_cycle() {
    let set = plugins();
    let wf = workflow(json!({
        "1": {"class_type": "TestAdd", "inputs": {"a": ["2", 0], "b": 1}},
        "2": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}},
        "3": {"class_type": "TestSink", "inputs": {"value": ["2", 0]}}
    }));
    let report = validate(&wf, &set);
    for id in ["1", "2"] {
        assert!(
            report
                .issues(id)
                .iter()
                .any(|i| i.kind == "dependency_cycle"),
            "{id}: {report:?}"
        );
    }
    assert!(report.issues("3").is_empty());
    assert_eq!(report.node_errors["1"].dependent_outputs, ["3"]);
}

#[test]
fn only_nodes_on_a_cycle_are_reported_not_those_downstream_or_beside_it() {
    let set = plugins();
    let wf = workflow(json!({
        "1": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}},
        "2": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": 1}},
        "3": {"class_type": "TestAdd", "inputs": {"a": ["4", 0], "b": ["2", 0]}},
        "4": {"class_type": "TestAdd", "inputs": {"a": ["5", 0], "b": 1}},
        "5": {"class_type": "TestAdd", "inputs": {"a": ["3", 0], "b": 1}},
        "6": {"class_type": "TestSink", "inputs": {"value": ["5", 0]}},
        "7": {"class_type": "TestConst", "inputs": {"value": 1}},
        "8": {"class_type": "TestSink", "inputs": {"value": ["7", 0]}}
    }));
    let report = validate(&wf, &set);
    let cyclic: Vec<&str> = report
        .node_errors
        .iter()
        .filter(|(_, n)| n.errors.iter().any(|i| i.kind == "dependency_cycle"))
        .map(|(id, _)| id.as_str())
        .collect();
    // 1 reads itself; 3 → 5 → 4 → 3; 2 and 6 depend on cycles without lying on one.
    assert_eq!(cyclic, ["1", "3", "4", "5"]);
    assert_eq!(report.node_errors["1"].dependent_outputs, ["6"]);
}

/// A chain of `n` TestAdd nodes ending in a sink, ids in reverse order of execution.
fn chain(n: usize) -> Workflow {
    let mut nodes = serde_json::Map::new();
    for i in 0..n {
        let a = if i + 1 < n {
            json!([(i + 1).to_string(), 0])
        } else {
            json!(1)
        };
        nodes.insert(
            i.to_string(),
            json!({"class_type": "TestAdd", "inputs": {"a": a, "b": 1}}),
        );
    }
    nodes.insert(
        "sink".into(),
        json!({"class_type": "TestSink", "inputs": {"value": ["0", 0]}}),
    );
    workflow(serde_json::Value::Object(nodes))
}

#[test]
fn a_chain_of_a_hundred_thousand_nodes_validates_and_orders_without_recursion() {
    let set = plugins();
    let n = 100_000;
    let wf = chain(n);
    assert!(validate(&wf, &set).is_ok());
    let order = vdm::execute::execution_order(&wf, &["sink".to_string()]);
    assert_eq!(order.len(), n + 1);
    assert_eq!(order.first().map(String::as_str), Some("99999"));
    assert_eq!(order.last().map(String::as_str), Some("sink"));
}

#[test]
fn plugin_checks_report_every_problem_before_anything_runs() {
    let set = plugins();
    let recorder = Recorder::default();
    let wf = workflow(json!({
        "1": {"class_type": "TestCheckPositive", "inputs": {"value": 0}},
        "2": {"class_type": "TestCheckPositive", "inputs": {"value": -3}},
        "3": {"class_type": "TestCheckPositive", "inputs": {"value": 4}},
        "4": {"class_type": "TestAdd", "inputs": {"a": ["1", 0], "b": ["2", 0]}},
        "5": {"class_type": "TestAdd", "inputs": {"a": ["4", 0], "b": ["3", 0]}},
        "6": {"class_type": "TestSink", "inputs": {"value": ["5", 0]}},
        // A structural problem is reported, and the node's own check is not asked.
        "7": {"class_type": "TestCheckPositive", "inputs": {"value": 5000}},
        "8": {"class_type": "TestSink", "inputs": {"value": ["7", 0]}}
    }));
    let executor = Executor::new(&set, &recorder);
    let Err(RunError::Invalid(report)) = executor.run(&wf) else {
        panic!("expected a validation error")
    };
    assert!(recorder.0.lock().unwrap().is_empty(), "nothing ran");
    for (id, message) in [("1", "0 is not positive"), ("2", "-3 is not positive")] {
        let issues = report.issues(id);
        assert_eq!(issues.len(), 1, "{id}: {issues:?}");
        assert_eq!(issues[0].kind, "custom_validation_failed");
        assert_eq!(issues[0].input_name(), Some("value"));
        assert_eq!(issues[0].details, message);
        assert_eq!(report.node_errors[id].dependent_outputs, ["6"]);
    }
    assert!(report.issues("3").is_empty());
    assert_eq!(
        report
            .issues("7")
            .iter()
            .map(|i| i.kind.as_str())
            .collect::<Vec<_>>(),
        ["value_bigger_than_max"]
    );
    // The plain descriptor check knows nothing of plugin checks.
    assert!(validate(&wf, &set).issues("1").is_empty());
}

#[test]
fn without_plugins_the_report_says_where_it_looked() {
    let dir = tempfile::tempdir().unwrap();
    let set = PluginSet::load(&[dir.path().to_path_buf()], &[]);
    let wf = workflow(json!({"1": {"class_type": "VideoNoise", "inputs": {}}}));
    let report = validate(&wf, &set);
    let error = report.error.as_ref().unwrap();
    assert_eq!(error.kind, "no_plugins_loaded");
    assert!(
        error.details.contains(&*dir.path().to_string_lossy()),
        "{error:?}"
    );
    assert_eq!(report.issues("1")[0].kind, "missing_node_type");
}
