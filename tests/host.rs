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

    let executor = Executor::new(&set, &vdm::events::Silent);
    executor.cancel_flag().store(true, Ordering::SeqCst);
    let Err(RunError::Node(error)) = executor.run(&wf) else {
        panic!("expected cancellation")
    };
    assert_eq!(error.kind, vdm_ffi::ErrorKind::Cancelled);
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
