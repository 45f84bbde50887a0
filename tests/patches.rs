//! The model's extension points on the tiny UNet + motion modules: ordered patches on a frozen
//! base (motion modules with gates, processors, taps, weight overrides), the call context a
//! processor sees, per-frame timesteps and frame positions, and per-run state.

mod common;

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Tensor};
use vdm_nodes::models::attention::{
    AttentionCall, AttentionKind, AttentionProcessor, ScaledDotProduct,
};
use vdm_nodes::models::call::{FeatureTap, ForwardPass, GuidanceLayout, RunObserver, SamplingStep};
use vdm_nodes::models::motion::ModuleGate;
use vdm_nodes::models::patcher::{MotionModules, Patch, PatchedUNet, UNetInputs};

struct ConstantGate(f64);

impl ModuleGate for ConstantGate {
    fn gate(&self, _slot: &str, _pass: &ForwardPass) -> Result<f64> {
        Ok(self.0)
    }
}

fn gated(f: &common::MotionFixture, gate: f64) -> PatchedUNet {
    PatchedUNet::new(Arc::new(f.model.base().clone()))
        .with_patch(Patch::Motion(MotionModules {
            adapter: f.adapter.clone(),
            scale: 1.0,
            gate: Some(Arc::new(ConstantGate(gate))),
        }))
        .unwrap()
}

#[test]
fn a_neutral_gate_is_bit_identical_and_a_closed_gate_is_the_image_unet() -> Result<()> {
    let f = common::motion_fixture();
    let plain = f.model.forward(&f.inputs())?;
    let neutral = gated(&f, 1.0).forward(&f.inputs())?;
    assert_eq!(common::max_abs_diff(&plain, &neutral), 0.0);
    let closed = gated(&f, 0.0).forward(&f.inputs())?;
    let image = PatchedUNet::new(Arc::new(f.model.base().clone())).forward(&f.inputs())?;
    common::assert_close("gate 0 vs no motion modules", &closed, &image, 1e-6);
    Ok(())
}

#[test]
fn explicit_positions_and_per_frame_timesteps_match_the_defaults() -> Result<()> {
    let f = common::motion_fixture();
    let plain = f.model.forward(&f.inputs())?;
    let (batch, _, frames, _, _) = f.io["sample"].dims5()?;

    let positions: Vec<usize> = (0..frames).collect();
    let inputs = UNetInputs {
        frame_positions: Some(&positions),
        ..f.inputs()
    };
    assert_eq!(
        common::max_abs_diff(&plain, &f.model.forward(&inputs)?),
        0.0
    );

    // The same timestep for every frame, given frame by frame.
    let t = f.io["timestep"]
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?[0];
    let per_frame = Tensor::full(t, batch * frames, &Device::Cpu)?;
    let inputs = UNetInputs {
        timestep: (&per_frame).into(),
        ..f.inputs()
    };
    common::assert_close(
        "per-frame timesteps vs one timestep",
        &f.model.forward(&inputs)?,
        &plain,
        1e-6,
    );

    // Frames 0, 2, 4 at their clip positions differ from the same frames at 0, 1, 2.
    let index = Tensor::new(&[0u32, 2, 4], &Device::Cpu)?;
    let subset = f.io["sample"].index_select(&index, 2)?;
    let text = &f.io["encoder_hidden_states"];
    let text = text
        .reshape((batch, frames, text.dim(1)?, text.dim(2)?))?
        .narrow(1, 0, 1)?
        .squeeze(1)?;
    let at_positions = UNetInputs {
        frame_positions: Some(&[0, 2, 4]),
        ..UNetInputs::new(&subset, &f.io["timestep"], &text)
    };
    let spread = f.model.forward(&at_positions)?;
    let packed = f
        .model
        .forward(&UNetInputs::new(&subset, &f.io["timestep"], &text))?;
    assert!(common::max_abs_diff(&spread, &packed) > 0.0);

    let beyond = UNetInputs {
        frame_positions: Some(&[0, 2, 400]),
        ..UNetInputs::new(&subset, &f.io["timestep"], &text)
    };
    let err = f.model.forward(&beyond).unwrap_err().to_string();
    assert!(err.contains("motion_max_seq_length"), "{err}");
    Ok(())
}

#[test]
fn weight_overrides_replace_by_checkpoint_key_and_leave_the_base_alone() -> Result<()> {
    let f = common::motion_fixture();
    let plain = f.model.forward(&f.inputs())?;

    // The same tensors again: the rebuilt model computes the same function.
    let key = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1.to_v.weight";
    let unet_key = "conv_in.weight";
    let same = BTreeMap::from([
        (key.to_string(), f.adapter.weights()[key].clone()),
        (
            unet_key.to_string(),
            f.model.base().weights()[unet_key].clone(),
        ),
    ]);
    let rebuilt = f.model.with_weights(same).unwrap();
    assert_eq!(
        common::max_abs_diff(&plain, &rebuilt.forward(&f.inputs())?),
        0.0
    );

    // A changed motion-module weight changes the output; the base model is untouched.
    let doubled = (f.adapter.weights()[key].clone() * 2.0)?;
    let changed = f
        .model
        .with_weights(BTreeMap::from([(key.to_string(), doubled)]))
        .unwrap();
    assert!(common::max_abs_diff(&plain, &changed.forward(&f.inputs())?) > 1e-4);
    assert_eq!(
        common::max_abs_diff(&plain, &f.model.forward(&f.inputs())?),
        0.0
    );

    let unknown = BTreeMap::from([(
        "down_blocks.9.nothing.weight".to_string(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    )]);
    let err = f.model.with_weights(unknown).unwrap_err();
    assert!(err.contains("down_blocks.9.nothing.weight"), "{err}");
    let misshapen =
        BTreeMap::from([(key.to_string(), Tensor::zeros(3, DType::F32, &Device::Cpu)?)]);
    let err = f.model.with_weights(misshapen).unwrap_err();
    assert!(err.contains(key) && err.contains("shape"), "{err}");
    Ok(())
}

/// Writes the mean |x| of the mid block's features as a value of the forward pass: the way a
/// motion amplitude is estimated once per call from the lowest resolution.
struct MidBlockMean;

impl FeatureTap for MidBlockMean {
    fn observe(&self, point: &str, xs: &Tensor, pass: &ForwardPass) -> Result<()> {
        if point == "mid_block" {
            let mean = xs.abs()?.mean_all()?.to_scalar::<f32>()?;
            pass.values.set("mid_mean", f64::from(mean));
        }
        Ok(())
    }
}

/// Records, in the run's observer, what each temporal call saw of the forward around it.
struct Witness;

#[derive(Debug, Clone, Default, PartialEq)]
struct Seen {
    calls: usize,
    mid_mean: Option<f64>,
    step: Option<SamplingStep>,
    guidance: Option<GuidanceLayout>,
    frames: usize,
    pixels: usize,
}

impl AttentionProcessor for Witness {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if let Some(run) = call.pass.run {
            run.with::<Seen, _>(call.layer, |seen| {
                seen.calls += 1;
                seen.mid_mean = call.pass.values.get("mid_mean");
                seen.step = call.step();
                seen.guidance = Some(call.pass.guidance);
                seen.frames = call.layout.frames;
                seen.pixels = call.layout.height * call.layout.width;
            });
        }
        ScaledDotProduct.attend(call, q, k, v)
    }
}

#[test]
fn processors_see_the_call_context_and_record_into_the_run() -> Result<()> {
    let f = common::motion_fixture();
    let model = f
        .model
        .with_patch(Patch::Tap(Arc::new(MidBlockMean)))
        .unwrap()
        .with_processor("", Some(AttentionKind::Temporal), Arc::new(Witness));
    let step = SamplingStep {
        index: 2,
        count: 4,
        timestep: 501.0,
    };
    let first_run = RunObserver::new();
    let inputs = UNetInputs {
        step: Some(step),
        guidance: GuidanceLayout::UncondThenCond,
        run: Some(&first_run),
        ..f.inputs()
    };
    let out = model.forward(&inputs)?;
    // Observing changes nothing.
    assert_eq!(
        common::max_abs_diff(&out, &f.model.forward(&f.inputs())?),
        0.0
    );

    let down = "down_blocks.0.motion_modules.0.transformer_blocks.0.attn1";
    let up = "up_blocks.0.motion_modules.0.transformer_blocks.0.attn1";
    let seen_down = first_run.get::<Seen>(down).expect("down block recorded");
    let seen_up = first_run.get::<Seen>(up).expect("up block recorded");
    // The mid block runs after the down blocks and before the up blocks.
    assert_eq!(seen_down.mid_mean, None);
    assert!(seen_up.mid_mean.is_some_and(|m| m > 0.0));
    assert_eq!(seen_up.step, Some(step));
    assert_eq!(seen_up.guidance, Some(GuidanceLayout::UncondThenCond));
    let (_, _, frames, height, width) = f.io["sample"].dims5()?;
    assert_eq!(
        (seen_down.frames, seen_down.pixels),
        (frames, height * width)
    );
    // up_blocks.0 runs at half resolution.
    assert_eq!(seen_up.pixels, (height / 2) * (width / 2));

    // A second run keeps its own record.
    let second_run = RunObserver::new();
    model.forward(&UNetInputs {
        run: Some(&second_run),
        ..f.inputs()
    })?;
    model.forward(&UNetInputs {
        run: Some(&second_run),
        ..f.inputs()
    })?;
    assert_eq!(first_run.get::<Seen>(down).map(|s| s.calls), Some(1));
    assert_eq!(second_run.get::<Seen>(down).map(|s| s.calls), Some(2));
    let touched = Mutex::new(first_run.keys::<Seen>());
    assert!(touched
        .lock()
        .unwrap()
        .iter()
        .all(|layer| layer.contains("motion_modules")));
    Ok(())
}
