//! DDIM and Euler against diffusers' `DDIMScheduler` / `EulerDiscreteScheduler` on every variant
//! of the `scheduler` fixture case: schedule tables, single steps and a full 25-step loop.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use vdm_nodes::schedulers::{
    load_config, DdimScheduler, EulerDiscreteScheduler, Scheduler, SchedulerKind, Timestep,
};

const TOLERANCE: f64 = 1e-4;

/// One variant of the case: its name, diffusers class and tensors.
struct Variant {
    name: String,
    class: String,
    tensors: HashMap<String, Tensor>,
}

/// The variants named by README.json, checked against the `*_config.json` files on disk so that
/// neither can list a variant the other lacks.
fn variants(case: &Path) -> Vec<Variant> {
    let readme_path = case.join("README.json");
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&readme_path).unwrap()).unwrap();
    let listed = readme["variants"]
        .as_object()
        .unwrap_or_else(|| panic!("{}: no `variants` object", readme_path.display()));
    let on_disk: BTreeSet<String> = std::fs::read_dir(case)
        .unwrap()
        .filter_map(|e| {
            let name = e.ok()?.file_name().into_string().ok()?;
            name.strip_suffix("_config.json").map(str::to_owned)
        })
        .collect();
    let in_readme: BTreeSet<String> = listed.keys().cloned().collect();
    assert_eq!(
        in_readme,
        on_disk,
        "{}: README variants and *_config.json files disagree",
        case.display()
    );
    assert!(
        !on_disk.is_empty(),
        "{}: no scheduler variants",
        case.display()
    );
    listed
        .iter()
        .map(|(name, info)| Variant {
            name: name.clone(),
            class: info["class"]
                .as_str()
                .unwrap_or_else(|| panic!("{}: variant {name} has no class", readme_path.display()))
                .to_owned(),
            tensors: common::load_tensors(&case.join(format!("{name}.safetensors"))),
        })
        .collect()
}

fn tensor<'a>(variant: &'a Variant, key: &str) -> &'a Tensor {
    variant
        .tensors
        .get(key)
        .unwrap_or_else(|| panic!("{}: missing tensor {key}", variant.name))
}

fn f64_vec(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

fn from_f64(values: &[f64]) -> Tensor {
    Tensor::new(values, &Device::Cpu).unwrap()
}

/// The `k` of every `step{k}.prev_sample` tensor.
fn step_indices(variant: &Variant) -> Vec<usize> {
    let mut indices: Vec<usize> = variant
        .tensors
        .keys()
        .filter_map(|k| {
            k.strip_prefix("step")?
                .strip_suffix(".prev_sample")?
                .parse()
                .ok()
        })
        .collect();
    indices.sort();
    assert!(!indices.is_empty(), "{}: no step tensors", variant.name);
    indices
}

fn build(case: &Path, variant: &Variant) -> Box<dyn Scheduler> {
    SchedulerKind::from_class_name(&variant.class)
        .unwrap()
        .load(case.join(format!("{}_config.json", variant.name)))
        .unwrap()
}

/// Tables specific to one class: DDIM's final ᾱ, Euler's σ.
fn check_class_tables(case: &Path, variant: &Variant, steps: usize) {
    let config_path = case.join(format!("{}_config.json", variant.name));
    let what = |item: &str| format!("{}/{item}", variant.name);
    match SchedulerKind::from_class_name(&variant.class).unwrap() {
        SchedulerKind::Ddim => {
            let scheduler = DdimScheduler::new(load_config(&config_path).unwrap()).unwrap();
            common::assert_close(
                &what("final_alpha_cumprod"),
                &from_f64(&[f64::from(scheduler.final_alpha_cumprod())]),
                &from_f64(&f64_vec(tensor(variant, "final_alpha_cumprod"))),
                TOLERANCE,
            );
        }
        SchedulerKind::EulerDiscrete => {
            let scheduler =
                EulerDiscreteScheduler::new(load_config(&config_path).unwrap()).unwrap();
            let sigmas: Vec<f64> = scheduler
                .sigmas(steps)
                .unwrap()
                .iter()
                .map(|&s| f64::from(s))
                .collect();
            common::assert_close(
                &what("sigmas"),
                &from_f64(&sigmas),
                &from_f64(&f64_vec(tensor(variant, "sigmas"))),
                TOLERANCE,
            );
        }
    }
}

#[test]
fn parity_scheduler_tables_and_steps() {
    for case in common::cases("scheduler") {
        for variant in variants(&case) {
            let what = |item: &str| format!("{}/{item}", variant.name);
            let reference_timesteps = f64_vec(tensor(&variant, "timesteps"));
            let steps = reference_timesteps.len();

            let scheduler = build(&case, &variant);
            let schedule = scheduler.timesteps(steps).unwrap();
            assert_eq!(
                schedule.timesteps(),
                reference_timesteps,
                "{}",
                what("timesteps")
            );
            println!("{}: {steps} timesteps identical", what("timesteps"));
            let alphas: Vec<f64> = scheduler
                .alphas_cumprod()
                .iter()
                .map(|&a| f64::from(a))
                .collect();
            let reference_alphas = f64_vec(tensor(&variant, "alphas_cumprod"));
            common::assert_close(
                &what("alphas_cumprod"),
                &from_f64(&alphas),
                &from_f64(&reference_alphas),
                TOLERANCE,
            );
            let exact = alphas
                .iter()
                .zip(&reference_alphas)
                .filter(|(a, b)| a == b)
                .count();
            println!(
                "{}: {exact}/{} bit-identical",
                what("alphas_cumprod"),
                alphas.len()
            );
            common::assert_close(
                &what("init_noise_sigma"),
                &from_f64(&[scheduler
                    .init_noise_sigma(schedule.first_timestep())
                    .unwrap()]),
                &from_f64(&f64_vec(tensor(&variant, "init_noise_sigma"))),
                TOLERANCE,
            );
            check_class_tables(&case, &variant, steps);

            for k in step_indices(&variant) {
                // Each step on its own, as the fixture was made with a fresh scheduler per step.
                let scheduled = schedule.steps()[k];
                let t = scheduled.timestep;
                let sample = tensor(&variant, &format!("step{k}.sample"));
                let model_output = tensor(&variant, &format!("step{k}.model_output"));
                let scaled = scheduler.scale_model_input(sample, t).unwrap();
                let output = scheduler
                    .step(model_output, t, scheduled.prev_timestep, sample)
                    .unwrap();
                for (item, out) in [
                    ("scaled_model_input", &scaled),
                    ("prev_sample", &output.prev_sample),
                    ("pred_original_sample", &output.pred_original_sample),
                ] {
                    let key = format!("step{k}.{item}");
                    common::assert_close(&what(&key), out, tensor(&variant, &key), TOLERANCE);
                }
            }
        }
    }
}

#[test]
fn parity_scheduler_trajectory() {
    for case in common::cases("scheduler") {
        for variant in variants(&case) {
            let what = |item: &str| format!("{}/{item}", variant.name);
            let steps = tensor(&variant, "timesteps").dim(0).unwrap();
            let model_outputs = tensor(&variant, "traj.model_outputs");
            let reference_inputs = tensor(&variant, "traj.scaled_model_inputs");
            let reference_samples = tensor(&variant, "traj.samples");
            assert_eq!(model_outputs.dim(0).unwrap(), steps, "{}", what("traj"));

            let scheduler = build(&case, &variant);
            let schedule = scheduler.timesteps(steps).unwrap();
            let init_noise_sigma = scheduler
                .init_noise_sigma(schedule.first_timestep())
                .unwrap();
            let mut x = (tensor(&variant, "traj.initial_noise") * init_noise_sigma).unwrap();
            let (mut inputs, mut samples) = (Vec::new(), Vec::new());
            for (i, step) in schedule.steps().iter().enumerate() {
                let t = step.timestep;
                inputs.push(scheduler.scale_model_input(&x, t).unwrap());
                x = scheduler
                    .step(&model_outputs.i(i).unwrap(), t, step.prev_timestep, &x)
                    .unwrap()
                    .prev_sample;
                samples.push(x.clone());
            }
            common::assert_close(
                &what("traj.scaled_model_inputs"),
                &Tensor::stack(&inputs, 0).unwrap(),
                reference_inputs,
                TOLERANCE,
            );
            common::assert_close(
                &what("traj.samples"),
                &Tensor::stack(&samples, 0).unwrap(),
                reference_samples,
                TOLERANCE,
            );
            common::assert_close(
                &what("traj.final"),
                &x,
                &reference_samples.i(steps - 1).unwrap(),
                TOLERANCE,
            );
        }
    }
}

/// The scheduler keeps no state, so a second run (FreeInit) repeats the first exactly.
#[test]
fn scheduler_rerun_repeats() {
    for case in common::cases("scheduler") {
        for variant in variants(&case) {
            let model_outputs = tensor(&variant, "traj.model_outputs");
            let steps = model_outputs.dim(0).unwrap();
            let scheduler = build(&case, &variant);
            let mut finals = Vec::new();
            for _ in 0..2 {
                let schedule = scheduler.timesteps(steps).unwrap();
                let init_noise_sigma = scheduler
                    .init_noise_sigma(schedule.first_timestep())
                    .unwrap();
                let mut x = (tensor(&variant, "traj.initial_noise") * init_noise_sigma).unwrap();
                for (i, step) in schedule.steps().iter().enumerate() {
                    let t = step.timestep;
                    let _ = scheduler.scale_model_input(&x, t).unwrap();
                    x = scheduler
                        .step(&model_outputs.i(i).unwrap(), t, step.prev_timestep, &x)
                        .unwrap()
                        .prev_sample;
                }
                finals.push(x);
            }
            let (rel, _) = common::errors(&finals[0], &finals[1]);
            assert_eq!(rel, 0.0, "{}: second run differs", variant.name);
        }
    }
}

/// add_noise at the first scheduled timestep matches the schedule's own noise level: for DDIM
/// √ᾱ·x₀ + √(1−ᾱ)·ε, for Euler x₀ + σ_max·ε.
#[test]
fn scheduler_add_noise_matches_noise_level() {
    for case in common::cases("scheduler") {
        for variant in variants(&case) {
            let steps = tensor(&variant, "timesteps").dim(0).unwrap();
            let scheduler = build(&case, &variant);
            let t = scheduler.timesteps(steps).unwrap().first_timestep();
            let original = tensor(&variant, "step0.sample");
            let noise = tensor(&variant, "step0.model_output");
            let noisy = scheduler.add_noise(original, noise, t).unwrap();
            let expected = match SchedulerKind::from_class_name(&variant.class).unwrap() {
                SchedulerKind::Ddim => {
                    let a = f64::from(scheduler.alphas_cumprod()[t as usize]);
                    ((original * a.sqrt()).unwrap() + (noise * (1.0 - a).sqrt()).unwrap()).unwrap()
                }
                SchedulerKind::EulerDiscrete => {
                    let sigma = f64_vec(tensor(&variant, "sigmas"))[0];
                    (original + (noise * sigma).unwrap()).unwrap()
                }
            };
            common::assert_close(
                &format!("{}/add_noise", variant.name),
                &noisy,
                &expected,
                1e-6,
            );
            // FreeInit diffuses to the last training timestep whatever the spacing.
            let last = (scheduler.alphas_cumprod().len() - 1) as f64;
            scheduler.add_noise(original, noise, last).unwrap();
        }
    }
}

#[test]
fn scheduler_rejects_bad_settings() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler_config.json");
    std::fs::write(&path, r#"{"use_karras_sigmas": true}"#).unwrap();
    let error = SchedulerKind::EulerDiscrete
        .load(&path)
        .unwrap_err()
        .to_string();
    assert!(
        error.contains("use_karras_sigmas") && error.contains("scheduler_config.json"),
        "{error}"
    );
    std::fs::write(&path, r#"{"beta_schedule": "cubic"}"#).unwrap();
    let error = SchedulerKind::Ddim.load(&path).unwrap_err().to_string();
    assert!(error.contains("scheduler_config.json"), "{error}");
    assert!(SchedulerKind::from_class_name("LMSDiscreteScheduler").is_err());

    let ddim = DdimScheduler::new(Default::default()).unwrap();
    assert!(ddim.timesteps(0).is_err());
    assert!(ddim.timesteps(1001).is_err());
    let x = Tensor::zeros((1, 4), DType::F32, &Device::Cpu).unwrap();
    assert!(ddim.step(&x, 10.5, Timestep::Final, &x).is_err());
    assert!(ddim.step(&x, 1000.0, Timestep::Final, &x).is_err());
    assert!(ddim.step(&x, 999.0, Timestep::At(-1.0), &x).is_err());
    assert!(ddim.invert_step(&x, Timestep::Final, 1000.0, &x).is_err());
    let euler = EulerDiscreteScheduler::new(Default::default()).unwrap();
    assert!(euler.timesteps(0).is_err());
    assert!(
        euler.init_noise_sigma(999.0).unwrap() > 1.0,
        "Euler starts at σ_max"
    );
    assert!(
        euler.step(&x, 999.5, Timestep::Final, &x).is_err(),
        "timestep past the training schedule"
    );
    assert!(euler.step(&x, 10.0, Timestep::At(-0.5), &x).is_err());
    assert!(euler.scale_model_input(&x, 1000.0).is_err());
    assert!(euler.add_noise(&x, &x, -1.0).is_err());
}
