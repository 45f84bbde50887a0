//! The entropy editor's processors and probe on the tiny UNet + motion modules: the probe
//! changes nothing and sees the weights actually applied, perturbations at strength 0 are
//! bit-identical and at strength 1 return V or its key mean, IE-Adapt at weight 0 and
//! Enhance-A-Video outside its range are bit-identical.

mod common;

use std::sync::{Arc, Mutex};

use candle_core::{Result, Tensor};
use vdm_nodes::models::attention::{
    attention_probs, AttentionCall, AttentionKind, AttentionObserver, ObservedAttention,
};
use vdm_nodes::models::call::{RunObserver, SamplingStep};
use vdm_nodes::models::patcher::{Patch, PatchedUNet, UNetInputs};
use vdm_nodes::video::attention_edit::{
    bindings, cross_frame_intensity, enhance_score, AttentionPerturbation, EnhanceAVideo,
    EntropyAdapt, LayerSelection, Perturbation, StepRange, ENHANCE_SCORES, IE_ADAPT_LAYERS,
};
use vdm_nodes::video::entropy::{EntropyProbe, EntropyTable};

fn probed(model: &PatchedUNet, rows: usize) -> (PatchedUNet, Arc<EntropyTable>) {
    let table = Arc::new(EntropyTable::new());
    let probe = Arc::new(EntropyProbe::with_query_rows(table.clone(), rows));
    (model.with_patch(Patch::Observer(probe)).unwrap(), table)
}

fn bound(
    model: &PatchedUNet,
    selection: &LayerSelection,
    processor: Arc<dyn vdm_nodes::models::attention::AttentionProcessor>,
) -> PatchedUNet {
    bindings(selection, processor)
        .into_iter()
        .fold(model.clone(), |m, b| {
            m.with_patch(Patch::Attention(b)).unwrap()
        })
}

#[test]
fn the_probe_changes_nothing_and_measures_every_layer_at_every_step() -> Result<()> {
    let f = common::motion_fixture();
    let noise = f.noise();
    let plain = f.sample(&f.model, &noise, 2)?;
    let (model, table) = probed(&f.model, 64);
    let latents = f.sample(&model, &noise, 2)?;
    assert_eq!(common::max_abs_diff(&plain, &latents), 0.0);
    let rows = table.rows();
    let layers = f.model.attention_layers();
    assert_eq!(rows.len(), 2 * layers.len());
    for row in &rows {
        assert!(layers
            .iter()
            .any(|(l, k)| *l == row.layer && *k == row.kind));
        assert!(
            (0.0..=1.0 + 1e-6).contains(&row.entropy_normalized),
            "{row:?}"
        );
        assert!(row.energy > 0.0 && row.timestep > 0.0);
    }
    Ok(())
}

#[test]
fn subsampled_rows_estimate_the_full_entropy_within_one_percent() -> Result<()> {
    let f = common::motion_fixture();
    let (sub, sub_table) = probed(&f.model, 16);
    let (full, full_table) = probed(&f.model, usize::MAX);
    sub.forward(&f.inputs())?;
    full.forward(&f.inputs())?;
    let mut worst: f64 = 0.0;
    for (s, w) in sub_table.rows().iter().zip(full_table.rows()) {
        assert_eq!(s.layer, w.layer);
        worst = worst.max((s.entropy - w.entropy).abs() / w.entropy.abs().max(1e-12));
        assert_eq!(s.energy, w.energy, "the energy uses every row");
    }
    println!("worst relative error of 16 sampled rows: {worst:.2e}");
    assert!(worst < 0.01, "{worst}");
    Ok(())
}

#[test]
fn the_probe_reads_the_same_on_the_fused_and_the_composed_path() -> Result<()> {
    let f = common::motion_fixture();
    let (model, fused) = probed(&f.model, 64);
    model.forward(&f.inputs())?;
    let (model, composed) = probed(&f.model, 64);
    vdm_nodes::models::ops::with_composed_ops(|| model.forward(&f.inputs()))?;
    for (a, b) in fused.rows().iter().zip(composed.rows()) {
        assert!(
            (a.entropy - b.entropy).abs() < 1e-4 * a.entropy.max(1.0),
            "{a:?} {b:?}"
        );
        assert!(
            (a.energy - b.energy).abs() < 1e-4 * a.energy.max(1.0),
            "{a:?} {b:?}"
        );
    }
    Ok(())
}

/// Keeps V and the output of the calls of one layer.
struct Capture {
    layer: String,
    seen: Mutex<Vec<(Tensor, Tensor)>>,
}

impl AttentionObserver for Capture {
    fn observe(&self, call: &AttentionCall, seen: &ObservedAttention) -> Result<()> {
        if call.layer == self.layer {
            self.seen
                .lock()
                .unwrap()
                .push((seen.v.clone(), seen.output.clone()));
        }
        Ok(())
    }
}

#[test]
fn perturbations_return_v_or_its_key_mean_and_the_probe_sees_them() -> Result<()> {
    let f = common::motion_fixture();
    let plain = f.model.forward(&f.inputs())?;
    for (layers, kind) in [
        ("up_blocks.1.attentions.0", "spatial"),
        ("mid_block.motion_modules", "temporal"),
    ] {
        let selection = LayerSelection::parse(layers, kind).unwrap();
        let chosen = selection.resolve(&f.model.attention_layers()).unwrap();
        for target in [Perturbation::Identity, Perturbation::Uniform] {
            let perturbation = |strength| {
                Arc::new(AttentionPerturbation {
                    target,
                    strength,
                    range: StepRange::ALL,
                })
            };
            let none = bound(&f.model, &selection, perturbation(0.0));
            assert_eq!(
                common::max_abs_diff(&plain, &none.forward(&f.inputs())?),
                0.0
            );

            let full = bound(&f.model, &selection, perturbation(1.0));
            let capture = Arc::new(Capture {
                layer: chosen[0].0.clone(),
                seen: Mutex::new(Vec::new()),
            });
            let (model, table) = probed(
                &full.with_patch(Patch::Observer(capture.clone())).unwrap(),
                64,
            );
            model.forward(&f.inputs())?;
            let (v, output) = capture.seen.lock().unwrap()[0].clone();
            let expected = match target {
                Perturbation::Identity => v.clone(),
                Perturbation::Uniform => v
                    .mean_keepdim(2)?
                    .broadcast_as(output.shape())?
                    .contiguous()?,
            };
            assert_eq!(
                common::max_abs_diff(&output, &expected),
                0.0,
                "{layers} {target:?}"
            );
            for row in table
                .rows()
                .iter()
                .filter(|r| chosen.iter().any(|(l, _)| *l == r.layer))
            {
                let want = match target {
                    Perturbation::Identity => 0.0,
                    Perturbation::Uniform => 1.0,
                };
                assert!((row.entropy_normalized - want).abs() < 1e-5, "{row:?}");
            }
        }
    }
    Ok(())
}

#[test]
fn ie_adapt_at_weight_zero_is_bit_identical_and_blends_the_highest_entropy_layers() -> Result<()> {
    let f = common::motion_fixture();
    let noise = f.noise();
    let plain = f.sample(&f.model, &noise, 3)?;
    let temporal = LayerSelection::parse("all", "temporal").unwrap();
    let adapt = |alpha| {
        bound(
            &f.model,
            &temporal,
            Arc::new(EntropyAdapt {
                alpha,
                top_fraction: 0.25,
                range: StepRange::ALL,
            }),
        )
    };
    assert_eq!(
        common::max_abs_diff(&plain, &f.sample(&adapt(0.0), &noise, 3)?),
        0.0
    );
    assert!(common::max_abs_diff(&plain, &f.sample(&adapt(0.5), &noise, 3)?) > 1e-5);

    // The first step measures only; the second blends a quarter of the temporal layers.
    let model = adapt(0.5);
    let run = RunObserver::new();
    let at_step = |index| UNetInputs {
        step: Some(SamplingStep {
            index,
            count: 3,
            timestep: 500.0,
        }),
        run: Some(&run),
        ..f.inputs()
    };
    let first = model.forward(&at_step(0))?;
    assert_eq!(common::max_abs_diff(&first, &plain_forward(&f)?), 0.0);
    model.forward(&at_step(1))?;
    let chosen = run
        .get::<Option<std::collections::BTreeSet<String>>>(IE_ADAPT_LAYERS)
        .flatten()
        .unwrap();
    let count = temporal.resolve(&f.model.attention_layers()).unwrap().len();
    assert_eq!(chosen.len(), ((count as f64) * 0.25).round() as usize);
    Ok(())
}

fn plain_forward(f: &common::MotionFixture) -> Result<Tensor> {
    f.model.forward(&UNetInputs {
        step: Some(SamplingStep {
            index: 0,
            count: 3,
            timestep: 500.0,
        }),
        ..f.inputs()
    })
}

/// Computes the Enhance-A-Video score of every temporal call from its Q and K.
#[derive(Default)]
struct Scores(Mutex<Vec<(String, f64)>>);

impl AttentionObserver for Scores {
    fn observe(&self, call: &AttentionCall, seen: &ObservedAttention) -> Result<()> {
        if call.kind == AttentionKind::Temporal {
            let maps = attention_probs(seen.q, seen.k, call.scale)?;
            let score = enhance_score(cross_frame_intensity(&maps)?, seen.q.dim(2)?, 2.0);
            self.0.lock().unwrap().push((call.layer.to_string(), score));
        }
        Ok(())
    }
}

#[test]
fn enhance_a_video_applies_its_score_in_range_and_nothing_outside() -> Result<()> {
    let f = common::motion_fixture();
    let temporal = LayerSelection::parse("all", "temporal").unwrap();
    let enhance = |range| {
        bound(
            &f.model,
            &temporal,
            Arc::new(EnhanceAVideo { weight: 2.0, range }),
        )
    };
    let at_step = |index, run| UNetInputs {
        step: Some(SamplingStep {
            index,
            count: 10,
            timestep: 500.0,
        }),
        run,
        ..f.inputs()
    };
    let outside = enhance(StepRange::new(0.5, 1.0).unwrap()).forward(&at_step(2, None))?;
    assert_eq!(
        common::max_abs_diff(&outside, &f.model.forward(&at_step(2, None))?),
        0.0
    );

    let scores = Arc::new(Scores::default());
    let run = RunObserver::new();
    let inside = enhance(StepRange::new(0.0, 0.5).unwrap())
        .with_patch(Patch::Observer(scores.clone()))
        .unwrap();
    inside.forward(&at_step(2, Some(&run)))?;
    let applied = run.get::<Vec<(String, f64)>>(ENHANCE_SCORES).unwrap();
    let direct = scores.0.lock().unwrap().clone();
    assert_eq!(applied.len(), direct.len());
    for ((layer, ours), (same, exact)) in applied.iter().zip(&direct) {
        assert_eq!(layer, same);
        assert!(
            (ours - exact).abs() < 1e-6 * exact,
            "{layer}: {ours} vs {exact}"
        );
    }
    Ok(())
}
