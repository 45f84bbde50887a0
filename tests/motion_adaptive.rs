//! Motion-adaptive temporal attention on the tiny UNet + motion modules (v2-style, with a mid
//! block module): m = 0 leaves sampling bit-identical, the field reaches only the up blocks'
//! temporal layers, the amplitude is estimated per call, and the patches stack with context
//! windows and FreeInit.

mod common;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};

use candle_core::{Device, Result, Tensor};
use vdm_nodes::models::attention::{
    AttentionCall, AttentionKind, AttentionProcessor, ScaledDotProduct,
};
use vdm_nodes::models::call::RunObserver;
use vdm_nodes::models::patcher::{PatchedUNet, UNetInputs};
use vdm_nodes::sampling::{
    ContextOptions, ContextWindows, NoisePredictor, SampleInputs, SampleSettings, Sampler,
    TextConditioning,
};
use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
use vdm_nodes::video::freeinit::{sample_with_freeinit, FreeInitConfig};
use vdm_nodes::video::motion_adaptive::{
    apply_motion_adaptive, Amplitude, MotionAdaptiveConfig, ReceptiveField, ADAPTED_LAYERS,
    ESTIMATED_AMPLITUDES,
};

fn adaptive(model: &PatchedUNet, field: ReceptiveField, amplitude: Amplitude) -> PatchedUNet {
    let config = MotionAdaptiveConfig {
        field,
        gate_weight: 2.0,
        ..MotionAdaptiveConfig::default()
    };
    apply_motion_adaptive(model, config, amplitude).unwrap()
}

fn fixed(m: f64) -> Amplitude {
    Amplitude::Fixed { m, reference: None }
}

fn sample(
    predictor: &dyn NoisePredictor,
    f: &common::MotionFixture,
    noise: &Tensor,
) -> Result<Tensor> {
    f.sample(predictor, noise, 2)
}

#[test]
fn without_motion_sampling_is_bit_identical() -> Result<()> {
    let f = common::motion_fixture();
    let noise = &f.noise();
    let plain = sample(&f.model, &f, noise)?;
    for field in [ReceptiveField::Bias, ReceptiveField::Window] {
        let still = adaptive(&f.model, field, fixed(0.0));
        let latents = sample(&still, &f, noise)?;
        assert_eq!(common::max_abs_diff(&plain, &latents), 0.0, "{field:?}");
    }
    let moving = adaptive(&f.model, ReceptiveField::Bias, fixed(1.0));
    assert!(common::max_abs_diff(&plain, &sample(&moving, &f, noise)?) > 1e-4);
    Ok(())
}

/// Records every temporal attention layer it is called for, computing plain attention.
#[derive(Default)]
struct TemporalLayers(Mutex<BTreeSet<String>>);

impl AttentionProcessor for TemporalLayers {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        self.0.lock().unwrap().insert(call.layer.to_string());
        ScaledDotProduct.attend(call, q, k, v)
    }
}

#[test]
fn the_field_reaches_only_the_up_blocks_temporal_layers() -> Result<()> {
    let f = common::motion_fixture();
    let probe = Arc::new(TemporalLayers::default());
    let probed = f
        .model
        .with_processor("", Some(AttentionKind::Temporal), probe.clone());
    probed.forward(&f.inputs())?;
    let temporal = probe.0.lock().unwrap().clone();
    let up: BTreeSet<String> = temporal
        .iter()
        .filter(|l| l.starts_with("up_blocks."))
        .cloned()
        .collect();
    assert!(temporal.iter().any(|l| l.starts_with("down_blocks.")));
    assert!(temporal.iter().any(|l| l.starts_with("mid_block.")));
    assert!(!up.is_empty());

    for field in [ReceptiveField::Bias, ReceptiveField::Window] {
        let run = RunObserver::new();
        let model = adaptive(&f.model, field, fixed(1.0));
        model.forward(&UNetInputs {
            run: Some(&run),
            ..f.inputs()
        })?;
        let adapted = run.get::<BTreeSet<String>>(ADAPTED_LAYERS).unwrap();
        assert_eq!(adapted, up, "{field:?}");
    }
    Ok(())
}

#[test]
fn the_amplitude_is_estimated_once_per_call() -> Result<()> {
    let f = common::motion_fixture();
    let estimated = adaptive(
        &f.model,
        ReceptiveField::Bias,
        Amplitude::Estimated { kappa: 0.3 },
    );
    let run = RunObserver::new();
    let out = estimated.forward(&UNetInputs {
        run: Some(&run),
        ..f.inputs()
    })?;
    let estimates = run.get::<Vec<f64>>(ESTIMATED_AMPLITUDES).unwrap();
    assert_eq!(estimates.len(), 1);
    let m = estimates[0];
    assert!(m > 0.0 && m <= 1.0, "{m}");
    // The estimate drives the same computation as that m given.
    let given = adaptive(&f.model, ReceptiveField::Bias, fixed(m)).forward(&f.inputs())?;
    assert_eq!(common::max_abs_diff(&out, &given), 0.0);
    Ok(())
}

fn windows(model: &PatchedUNet, options: ContextOptions) -> ContextWindows<'_> {
    ContextWindows {
        inner: model,
        options,
    }
}

#[test]
fn it_stacks_with_context_windows_and_freeinit() -> Result<()> {
    let f = common::motion_fixture();
    let (_, channels, frames, height, width) = f.io["sample"].dims5()?;
    // A clip half as long again as the fixture's, sampled in two windows of its length.
    let long = Tensor::randn(
        0f32,
        1.0,
        (1, channels, frames + frames / 2, height, width),
        &Device::Cpu,
    )?;
    let options = ContextOptions {
        length: frames,
        overlap: frames / 2,
        ..ContextOptions::default()
    };
    let still = adaptive(&f.model, ReceptiveField::Window, fixed(0.0));
    let plain = sample(&windows(&f.model, options), &f, &long)?;
    assert_eq!(
        common::max_abs_diff(&plain, &sample(&windows(&still, options), &f, &long)?),
        0.0
    );
    let moving = adaptive(&f.model, ReceptiveField::Window, fixed(1.0));
    let adapted = sample(&windows(&moving, options), &f, &long)?;
    assert!(common::max_abs_diff(&plain, &adapted) > 1e-4);

    let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
    let text = f.text();
    let noise = f.noise();
    let inputs = SampleInputs {
        noise: &noise,
        init_latents: None,
        text: TextConditioning {
            positive: &text,
            negative: &text,
        },
    };
    let settings = SampleSettings {
        steps: 2,
        guidance_scale: 1.0,
        strength: 1.0,
    };
    let config = FreeInitConfig {
        iterations: 2,
        ..FreeInitConfig::default()
    };
    let freeinit = |model: &PatchedUNet| -> Result<Tensor> {
        let mut sampler = Sampler::new(model, &scheduler);
        let mut fresh = |pass: usize| &noise * (1.0 + pass as f64 * 0.1);
        Ok(sample_with_freeinit(&mut sampler, &config, &settings, &inputs, &mut fresh)?.latents)
    };
    let plain = freeinit(&f.model)?;
    assert_eq!(common::max_abs_diff(&plain, &freeinit(&still)?), 0.0);
    let adapted = freeinit(&moving)?;
    assert!(adapted
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .all(|v| v.is_finite()));
    assert!(common::max_abs_diff(&plain, &adapted) > 1e-4);
    Ok(())
}

#[test]
fn out_of_range_settings_are_refused() {
    let f = common::motion_fixture();
    let config = MotionAdaptiveConfig::default();
    assert!(apply_motion_adaptive(&f.model, config, fixed(1.5)).is_err());
    let negative = MotionAdaptiveConfig {
        lambda_max: -1.0,
        ..config
    };
    assert!(apply_motion_adaptive(&f.model, negative, fixed(0.5)).is_err());
}
