//! Nodes that exercise the host: a constant, an adder, a sink (output node), one that panics,
//! one that fails on an input, and two that report progress until cancelled (one of them
//! slowly, so that a test can interrupt it while it runs). Kept free of
//! the real plugin so host tests control exactly what each node does.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};

use abi_stable::{
    export_root_module,
    prefix_type::PrefixTypeTrait,
    std_types::{RErr, ROk, RResult, RString, RVec},
};
use vdm_ffi::{
    ErrorKind, ExecuteRequest, InputKind, InputSpec, NodeDescriptor, NodeError, NodeOutput,
    OutputSpec, PluginMod, PluginModRef, Value,
};

/// How many times `TestCounter` ran, so tests can see what the cache saved.
static COUNTER_RUNS: AtomicUsize = AtomicUsize::new(0);

#[export_root_module]
pub fn root() -> PluginModRef {
    PluginMod {
        interface_version,
        features,
        plugin_name,
        nodes,
        execute,
        check,
    }
    .leak_into_prefix()
}

extern "C" fn interface_version() -> u32 {
    vdm_ffi::INTERFACE_VERSION
}

extern "C" fn features() -> RVec<RString> {
    vdm_ffi::INTERFACE_FEATURES
        .iter()
        .map(|f| RString::from(*f))
        .collect()
}

extern "C" fn plugin_name() -> RString {
    "vdm-test-plugin".into()
}

fn input(name: &str, kind: InputKind) -> InputSpec {
    InputSpec {
        name: name.into(),
        kind,
        tooltip: RString::new(),
    }
}

fn int(name: &str) -> InputSpec {
    input(
        name,
        InputKind::Int {
            default: 0,
            min: -1000,
            max: 1000,
            step: 1,
        },
    )
}

fn node(
    class: &str,
    required: Vec<InputSpec>,
    outputs: &[&str],
    output_node: bool,
) -> NodeDescriptor {
    NodeDescriptor {
        class_type: class.into(),
        display_name: class.into(),
        category: "test".into(),
        description: RString::new(),
        required: required.into(),
        optional: RVec::new(),
        outputs: outputs
            .iter()
            .map(|t| OutputSpec {
                type_name: (*t).into(),
                name: (*t).into(),
            })
            .collect(),
        output_node,
    }
}

extern "C" fn nodes() -> RVec<NodeDescriptor> {
    vec![
        node("TestConst", vec![int("value")], &["INT"], false),
        node("TestCounter", vec![int("value")], &["INT"], false),
        node("TestAdd", vec![int("a"), int("b")], &["INT"], false),
        node("TestSink", vec![int("value")], &[], true),
        node("TestPanic", vec![int("value")], &["INT"], false),
        node("TestFailOnNegative", vec![int("value")], &["INT"], false),
        node("TestCountdown", vec![int("steps")], &["INT"], false),
        node(
            "TestSlow",
            vec![int("steps"), int("ms_per_step")],
            &["INT"],
            false,
        ),
        node("TestRuns", vec![], &["INT"], false),
        node("TestCheckPositive", vec![int("value")], &["INT"], false),
    ]
    .into()
}

/// `TestCheckPositive` objects to a literal `value` below 1 before anything runs.
extern "C" fn check(request: ExecuteRequest<'_>) -> RVec<NodeError> {
    if request.class_type.as_str() != "TestCheckPositive" {
        return RVec::new();
    }
    let issue = |message: String| NodeError {
        kind: ErrorKind::InvalidInput,
        node_id: request.node_id.into(),
        class_type: request.class_type.into(),
        input: abi_stable::std_types::RSome("value".into()),
        message: message.into(),
    };
    match int_of(&request, "value") {
        Some(v) if v < 1 => vec![issue(format!("{v} is not positive"))].into(),
        _ => RVec::new(),
    }
}

extern "C" fn execute(request: ExecuteRequest<'_>) -> RResult<NodeOutput, NodeError> {
    let class_type = request.class_type.to_string();
    let node_id = request.node_id.to_string();
    let error = |kind, input: Option<&str>, message: String| NodeError {
        kind,
        node_id: node_id.as_str().into(),
        class_type: class_type.as_str().into(),
        input: input.map(RString::from).into(),
        message: message.into(),
    };
    let result = catch_unwind(AssertUnwindSafe(|| run(&request)));
    match result {
        Ok(Ok(values)) => ROk(NodeOutput {
            values: values.into(),
            ui_json: if class_type == "TestSink" {
                format!(
                    "{{\"value\": {}}}",
                    int_of(&request, "value").unwrap_or_default()
                )
                .into()
            } else {
                RString::new()
            },
        }),
        Ok(Err((kind, input, message))) => RErr(error(kind, input, message)),
        Err(_) => RErr(error(ErrorKind::Panic, None, "panicked".into())),
    }
}

fn int_of(request: &ExecuteRequest<'_>, name: &str) -> Option<i64> {
    request
        .inputs
        .iter()
        .find(|v| v.name.as_str() == name)
        .and_then(|v| match v.value {
            Value::Int(i) => Some(i),
            _ => None,
        })
}

type Failure = (ErrorKind, Option<&'static str>, String);

fn run(request: &ExecuteRequest<'_>) -> Result<Vec<Value>, Failure> {
    let get = |name: &'static str| {
        int_of(request, name).ok_or((ErrorKind::InvalidInput, Some(name), "missing".to_owned()))
    };
    match request.class_type.as_str() {
        "TestConst" | "TestCheckPositive" => Ok(vec![Value::Int(get("value")?)]),
        "TestCounter" => {
            COUNTER_RUNS.fetch_add(1, Ordering::SeqCst);
            Ok(vec![Value::Int(get("value")?)])
        }
        "TestRuns" => Ok(vec![Value::Int(COUNTER_RUNS.load(Ordering::SeqCst) as i64)]),
        "TestAdd" => Ok(vec![Value::Int(get("a")? + get("b")?)]),
        "TestSink" => Ok(vec![]),
        "TestPanic" => panic!("test node panicked on purpose with value {}", get("value")?),
        "TestFailOnNegative" => match get("value")? {
            v if v < 0 => Err((
                ErrorKind::InvalidInput,
                Some("value"),
                format!("{v} is negative"),
            )),
            v => Ok(vec![Value::Int(v)]),
        },
        "TestCountdown" => {
            let steps = get("steps")?.max(0) as u64;
            for step in 1..=steps {
                if request.host.cancelled() {
                    return Err((ErrorKind::Cancelled, None, "cancelled".into()));
                }
                request.host.progress(step, steps, "counting".into());
            }
            Ok(vec![Value::Int(steps as i64)])
        }
        "TestSlow" => {
            // A sampler's shape: a step of work, then the progress report and the cancel
            // check, which is where a real node notices an interrupt.
            let steps = get("steps")?.max(0) as u64;
            let pause = std::time::Duration::from_millis(get("ms_per_step")?.max(0) as u64);
            for step in 1..=steps {
                std::thread::sleep(pause);
                request.host.progress(step, steps, "waiting".into());
                if request.host.cancelled() {
                    return Err((
                        ErrorKind::Cancelled,
                        None,
                        format!("cancelled at step {step}"),
                    ));
                }
            }
            Ok(vec![Value::Int(steps as i64)])
        }
        other => Err((ErrorKind::Execution, None, format!("unknown node {other}"))),
    }
}
