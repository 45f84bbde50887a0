//! The AnimateDiff pipeline against diffusers on the `pipeline` and `pipeline_freeinit`
//! fixtures: the sampling loop (guidance, DDIM, FreeInit) replaying diffusers' own UNet
//! outputs, and the whole pipeline with our UNet and motion modules.

mod common;

use std::cell::RefCell;
use std::path::Path;

use candle_core::{Result, Tensor};
use vdm_nodes::sampling::{
    FrameSelection, FrameStrategy, NoisePredictor, PredictRequest, SampleInputs, SampleSettings,
    Sampler, TextConditioning,
};
use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
use vdm_nodes::video::freeinit::{sample_with_freeinit, FilterKind, FreeInitConfig};

struct Case {
    tensors: std::collections::HashMap<String, Tensor>,
    scheduler: DdimSchedulerConfig,
    settings: SampleSettings,
    freeinit: Option<FreeInitConfig>,
}

fn load_case(dir: &Path) -> Case {
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("README.json")).unwrap()).unwrap();
    let components = &readme["components"]["scheduler"];
    assert_eq!(
        components["class"],
        "DDIMScheduler",
        "{}: unexpected scheduler",
        dir.display()
    );
    let scheduler: DdimSchedulerConfig =
        serde_json::from_value(components["kwargs"].clone()).unwrap();
    let p = &readme["parameters"];
    let freeinit = p["freeinit"].as_object().map(|f| FreeInitConfig {
        iterations: f["num_iters"].as_u64().unwrap() as usize,
        filter: f["method"].as_str().unwrap().parse::<FilterKind>().unwrap(),
        order: f["order"].as_u64().unwrap() as u32,
        spatial_stop_frequency: f["spatial_stop_frequency"].as_f64().unwrap(),
        temporal_stop_frequency: f["temporal_stop_frequency"].as_f64().unwrap(),
        fast_sampling: f["use_fast_sampling"].as_bool().unwrap(),
    });
    let settings = SampleSettings {
        steps: p["num_inference_steps"]
            .as_u64()
            .expect("num_inference_steps") as usize,
        guidance_scale: p["guidance_scale"].as_f64().expect("guidance_scale"),
        strength: 1.0,
    };
    Case {
        tensors: common::load_tensors(&dir.join("io.safetensors")),
        scheduler,
        settings,
        freeinit,
    }
}

/// Every frame, through the gather-and-write-back path of the loop.
struct EveryFrameAsSubset;

impl FrameStrategy for EveryFrameAsSubset {
    fn frames_to_evaluate(
        &mut self,
        _: &vdm_nodes::models::call::SamplingStep,
        latents: &Tensor,
    ) -> Result<FrameSelection> {
        Ok(FrameSelection::Frames((0..latents.dim(2)?).collect()))
    }
}

fn run_with(
    case: &Case,
    predictor: &dyn NoisePredictor,
    strategy: Option<&mut dyn FrameStrategy>,
) -> Result<Tensor> {
    let t = &case.tensors;
    let scheduler = DdimScheduler::new(case.scheduler.clone())?;
    let inputs = SampleInputs {
        noise: &t["init_latents"],
        init_latents: None,
        text: TextConditioning {
            positive: &t["prompt_embeds"],
            negative: &t["negative_prompt_embeds"],
        },
    };
    let mut sampler = Sampler::new(predictor, &scheduler);
    if let Some(strategy) = strategy {
        sampler = sampler.with_strategy(strategy);
    }
    let output = match &case.freeinit {
        Some(config) => {
            let z_rand = t.get("freeinit.z_rand").cloned();
            let mut fresh = |_: usize| -> Result<Tensor> {
                Ok(z_rand.clone().expect("FreeInit case stores z_rand"))
            };
            sample_with_freeinit(&mut sampler, config, &case.settings, &inputs, &mut fresh)?
        }
        None => sampler.sample(&case.settings, &inputs)?,
    };
    Ok(output.latents)
}

fn run(case: &Case, predictor: &dyn NoisePredictor) -> Result<Tensor> {
    run_with(case, predictor, None)
}

/// Returns diffusers' recorded UNet outputs in order, checking each input on the way.
struct Replay<'a> {
    case: &'a Case,
    call: RefCell<usize>,
}

impl NoisePredictor for Replay<'_> {
    fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
        let (latents, timestep) = (request.latents, request.timestep);
        let mut call = self.call.borrow_mut();
        let t = &self.case.tensors;
        let expected_t = t["timesteps"].get(*call)?.to_scalar::<i64>()? as f64;
        assert_eq!(timestep, expected_t, "call {call}");
        common::assert_close(
            &format!("unet input {call}"),
            latents,
            &t["step_unet_input"].get(*call)?,
            1e-4,
        );
        let out = t["step_noise_pred"].get(*call)?;
        *call += 1;
        Ok(out)
    }

    fn max_frames(&self) -> Option<usize> {
        None
    }
}

#[test]
fn sampling_loop_parity_with_recorded_unet_outputs() {
    for name in ["pipeline", "pipeline_freeinit"] {
        for dir in common::cases(name) {
            let case = load_case(&dir);
            let replay = Replay {
                case: &case,
                call: RefCell::new(0),
            };
            let out = run(&case, &replay).unwrap();
            assert_eq!(
                *replay.call.borrow(),
                case.tensors["timesteps"].dim(0).unwrap(),
                "UNet calls"
            );
            common::assert_close(
                &format!("{name}: final_latents (replayed UNet)"),
                &out,
                &case.tensors["final_latents"],
                1e-4,
            );
        }
    }
}

/// The pipeline's UNet: the `unet_motion_mid` fixture weights (components are referenced
/// relative to the case folder).
fn fixture_unet(case_dir: &Path) -> vdm_nodes::models::patcher::PatchedUNet {
    use std::sync::Arc;
    use vdm_nodes::models::motion::{MotionAdapter, MotionAdapterConfig};
    use vdm_nodes::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case_dir.join("README.json")).unwrap())
            .unwrap();
    let component = |name: &str| -> std::path::PathBuf {
        let text = readme["components"][name]
            .as_str()
            .unwrap_or_else(|| panic!("{}: no component {name}", case_dir.display()));
        case_dir.join(text.split_whitespace().next().unwrap())
    };
    let unet_file = component("unet");
    let adapter_file = component("motion_adapter");
    let dir = unet_file.parent().unwrap();
    let cfg = UNet2DConditionConfig::from_json_file(&dir.join("unet_config.json")).unwrap();
    let unet = UNet2DConditionModel::from_safetensors(
        &[&unet_file],
        &cfg,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    let mcfg = MotionAdapterConfig::from_json_file(
        &adapter_file
            .parent()
            .unwrap()
            .join("motion_adapter_config.json"),
    )
    .unwrap();
    let adapter = MotionAdapter::from_safetensors(
        &[&adapter_file],
        &mcfg,
        cfg.norm_num_groups,
        candle_core::DType::F32,
        &candle_core::Device::Cpu,
    )
    .unwrap();
    vdm_nodes::models::patcher::PatchedUNet::new(Arc::new(unet))
        .with_motion(Arc::new(adapter), 1.0)
        .unwrap()
}

#[test]
fn animatediff_pipeline_parity() {
    animatediff_pipeline_check();
}

/// The composed candle ops (the differentiable path) give diffusers' pipeline result too.
#[test]
fn animatediff_pipeline_parity_on_the_composed_path() {
    vdm_nodes::models::ops::with_composed_ops(animatediff_pipeline_check);
}

fn animatediff_pipeline_check() {
    for name in ["pipeline", "pipeline_freeinit"] {
        for dir in common::cases(name) {
            let case = load_case(&dir);
            let unet = fixture_unet(&dir);
            let out = run(&case, &unet).unwrap();
            common::assert_close(
                &format!("{name}: final_latents"),
                &out,
                &case.tensors["final_latents"],
                1e-4,
            );
        }
    }
}

/// Gathering every frame (positions 0..F) and writing the stepped frames back changes nothing:
/// the fixture UNet gives bit-identical latents through both paths of the loop.
#[test]
fn every_frame_through_the_subset_path_matches_the_plain_loop_bit_for_bit() {
    for dir in common::cases("pipeline") {
        let case = load_case(&dir);
        let unet = fixture_unet(&dir);
        let plain = run(&case, &unet).unwrap();
        let subset = run_with(&case, &unet, Some(&mut EveryFrameAsSubset)).unwrap();
        let diff = common::max_abs_diff(&plain, &subset);
        assert_eq!(diff, 0.0, "max abs difference between the two paths");
    }
}

/// One DDIM inversion step and one denoising step with the same ε of the tiny UNet return to
/// the start; with ε evaluated again at the noisier latents (what an inversion followed by
/// sampling does), the round trip is approximate and its error is printed.
#[test]
fn ddim_inversion_then_step_returns_to_the_start_on_the_tiny_model() -> Result<()> {
    use vdm_nodes::models::patcher::UNetInputs;
    use vdm_nodes::schedulers::{Scheduler, Timestep};
    let dir = &common::cases("pipeline")[0];
    let case = load_case(dir);
    let unet = fixture_unet(dir);
    let scheduler = DdimScheduler::new(case.scheduler.clone())?;
    let t = &case.tensors;
    let text = &t["prompt_embeds"];
    // Latents at the noise level of 251, stepping up to 501.
    let start = (&t["init_latents"] * 0.5)?;
    let eps = unet.forward(&UNetInputs::new(&start, 251.0, text))?;
    let noisier = scheduler
        .invert_step(&eps, Timestep::At(251.0), 501.0, &start)?
        .prev_sample;
    let back = scheduler
        .step(&eps, 501.0, Timestep::At(251.0), &noisier)?
        .prev_sample;
    let scale = common::max_abs_diff(&start, &start.zeros_like()?).max(1.0);
    let error = common::max_abs_diff(&back, &start);
    println!("inversion round trip with the same ε: max abs error {error:.3e}");
    assert!(error <= 1e-5 * scale, "{error}");

    let eps_again = unet.forward(&UNetInputs::new(&noisier, 501.0, text))?;
    let resampled = scheduler
        .step(&eps_again, 501.0, Timestep::At(251.0), &noisier)?
        .prev_sample;
    let (relative, max) = common::errors(&resampled, &start);
    println!(
        "inversion then sampling with ε evaluated again: relative error {relative:.3e}, max abs {max:.3e}"
    );
    Ok(())
}
