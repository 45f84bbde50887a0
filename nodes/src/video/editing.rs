//! Entropy-aware video editing (METHODS.md §3): the source video is DDIM-inverted with its
//! prompt while a probe measures every attention layer; the self-attention layers of lowest
//! entropy (the ones that carry the layout) are chosen; then the source and the target video
//! are sampled together, from the same inverted latents, as one batch of two videos, and in
//! the chosen layers for the first part of the schedule the target's queries and keys are the
//! source's, so the target follows the source's attention maps there and its own prompt
//! everywhere else.
//!
//! Because both videos are in the same model call, the source's maps are injected as they are
//! computed: nothing is recorded across calls. The extra memory is one copy of Q and K of the
//! layer being injected (at most 2·videos·frames·heads·H·W·head_dim floats: 336 MB for SD 1.5's
//! largest layer at 16 frames of 64×64 latents with guidance), against holding every map of
//! every step, which would not fit.

use std::collections::BTreeSet;
use std::sync::Arc;

use candle_core::{Result, Tensor};

use crate::models::attention::{
    AttentionCall, AttentionKind, AttentionProcessor, ProcessorBinding, ScaledDotProduct,
};
use crate::models::patcher::{Patch, PatchedUNet};
use crate::sampling::inversion::invert;
use crate::sampling::{
    ContextOptions, ContextWindows, NoisePredictor, SampleInputs, SampleSettings, Sampler,
    StepReport, TextConditioning,
};
use crate::schedulers::Scheduler;

use super::attention_edit::StepRange;
use super::entropy::{EntropyProbe, EntropyTable};

/// Source and target videos alternate in the batch the editor samples: video 2i is a source,
/// video 2i + 1 its target (within each guidance half).
pub struct SourceAttentionInjection {
    pub layers: BTreeSet<String>,
    pub range: StepRange,
}

impl SourceAttentionInjection {
    /// `x` (videos·rows, heads, tokens, dim) with every target video's rows replaced by its
    /// source's.
    fn from_sources(x: &Tensor, videos: usize) -> Result<Tensor> {
        let (batch, heads, tokens, dim) = x.dims4()?;
        if videos < 2 || !videos.is_multiple_of(2) || !batch.is_multiple_of(videos) {
            candle_core::bail!(
                "source attention injection needs source/target pairs of videos, got {videos} \
                 videos in a batch of {batch}"
            )
        }
        let per_video = batch / videos;
        let sources: Vec<u32> = (0..videos).map(|v| (v - v % 2) as u32).collect();
        let index = Tensor::from_vec(sources, videos, x.device())?;
        x.contiguous()?
            .reshape((videos, per_video, heads, tokens, dim))?
            .index_select(&index, 0)?
            .reshape((batch, heads, tokens, dim))
    }
}

impl AttentionProcessor for SourceAttentionInjection {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if !self.layers.contains(call.layer) || !self.range.contains(call.step()) {
            return ScaledDotProduct.attend(call, q, k, v);
        }
        let videos = call.layout.videos;
        let q = Self::from_sources(q, videos)?;
        let k = Self::from_sources(k, videos)?;
        ScaledDotProduct.attend(call, &q, &k, v)
    }
}

/// What an edit starts from: the source video's clean latents (1, C, F, h, w), the prompts as
/// per-video text embeddings (1, S, D), and the fresh noise (the shape of the source) that
/// `noise_blend` mixes in.
#[derive(Clone, Copy)]
pub struct EditInputs<'a> {
    pub source: &'a Tensor,
    pub source_prompt: &'a Tensor,
    pub target_prompt: &'a Tensor,
    pub negative_prompt: &'a Tensor,
    pub fresh_noise: &'a Tensor,
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub struct EditSettings {
    pub steps: usize,
    pub guidance_scale: f64,
    /// The share of the schedule, from the start, during which the maps are injected.
    pub inject_until: f64,
    /// The share of self-attention layers, lowest entropy first, whose maps are injected.
    pub low_entropy_fraction: f64,
    /// β of the start latents √(1 − β)·z_T + √β·ε, mixing fresh noise ε into the inverted z_T
    /// (more freedom for the target, less fidelity to the source); 0 starts from z_T exactly.
    pub noise_blend: f64,
}

impl EditSettings {
    pub fn validate(&self) -> std::result::Result<(), String> {
        if self.steps == 0 {
            return Err("steps must be at least 1".into());
        }
        if !(0.0..=1.0).contains(&self.inject_until) {
            return Err(format!(
                "inject_until {} is outside [0, 1]",
                self.inject_until
            ));
        }
        if !(0.0..=1.0).contains(&self.noise_blend) {
            return Err(format!(
                "noise_blend {} is outside [0, 1]",
                self.noise_blend
            ));
        }
        if !(0.0..=1.0).contains(&self.low_entropy_fraction) {
            return Err(format!(
                "low_entropy_percent {} is outside [0, 1]",
                self.low_entropy_fraction
            ));
        }
        Ok(())
    }
}

/// The result of an edit.
#[derive(Debug, Clone)]
pub struct EditOutput {
    /// The edited video's latents (1, C, F, h, w).
    pub edited: Tensor,
    /// The source sampled back from its inversion with its own prompt (1, C, F, h, w).
    pub reconstruction: Tensor,
    /// The inverted latents both were sampled from.
    pub inverted: Tensor,
    /// The layers whose maps were injected, lowest entropy first.
    pub injected_layers: Vec<String>,
}

/// Progress of an edit: the phase (`inverting` or `editing`), steps done and in all.
pub type EditProgress<'a> = dyn FnMut(&str, usize, usize) -> Result<()> + 'a;

/// `model` itself, or in context windows when `context` is given.
fn predictor<'a>(
    model: &'a PatchedUNet,
    context: Option<ContextOptions>,
    windows: &'a mut Option<ContextWindows<'a>>,
) -> &'a dyn NoisePredictor {
    match context {
        Some(options) => windows.insert(ContextWindows {
            inner: model,
            options,
        }),
        None => model,
    }
}

/// Edits the source video from its prompt to the target prompt, sampling in context windows
/// when `context` is given.
pub fn edit_video(
    model: &PatchedUNet,
    context: Option<ContextOptions>,
    scheduler: &dyn Scheduler,
    inputs: &EditInputs<'_>,
    settings: &EditSettings,
    progress: &mut EditProgress<'_>,
) -> Result<EditOutput> {
    let source = inputs.source;
    settings.validate().map_err(candle_core::Error::Msg)?;
    let (batch, _, _, _, _) = source.dims5()?;
    if batch != 1 {
        candle_core::bail!("the editor edits one video at a time, got {batch}");
    }

    // 1. Invert the source with its prompt, measuring every attention layer on the way.
    let table = Arc::new(EntropyTable::new());
    let probed = model
        .with_patch(Patch::Observer(Arc::new(EntropyProbe::new(table.clone()))))
        .map_err(candle_core::Error::Msg)?;
    let inverted = invert(
        predictor(&probed, context, &mut None),
        scheduler,
        source,
        inputs.source_prompt,
        settings.steps,
        None,
        &mut |done, total| progress("inverting", done, total),
    )?;

    // 2. The self-attention layers of lowest entropy over the inversion.
    let mut self_attention: Vec<(String, f64)> = table
        .ranking(Some(AttentionKind::SpatialSelf))
        .into_iter()
        .chain(table.ranking(Some(AttentionKind::Temporal)))
        .collect();
    self_attention.sort_by(|a, b| a.1.total_cmp(&b.1).then_with(|| a.0.cmp(&b.0)));
    let count = (self_attention.len() as f64 * settings.low_entropy_fraction).round() as usize;
    let injected_layers: Vec<String> = self_attention
        .into_iter()
        .take(count)
        .map(|(layer, _)| layer)
        .collect();

    // 3. Source and target sampled together, the source's maps injected into the target.
    let injection = SourceAttentionInjection {
        layers: injected_layers.iter().cloned().collect(),
        range: StepRange {
            start: 0.0,
            end: settings.inject_until,
        },
    };
    let editing = if injected_layers.is_empty() || settings.inject_until <= 0.0 {
        model.clone()
    } else {
        model
            .with_patch(Patch::Attention(ProcessorBinding {
                prefix: String::new(),
                kind: None,
                processor: Arc::new(injection),
            }))
            .map_err(candle_core::Error::Msg)?
    };
    let start = match settings.noise_blend {
        0.0 => inverted.clone(),
        beta => ((&inverted * (1.0 - beta).sqrt())? + (inputs.fresh_noise * beta.sqrt())?)?,
    };
    let pair = Tensor::cat(&[&start, &start], 0)?;
    let positive = Tensor::cat(&[inputs.source_prompt, inputs.target_prompt], 0)?;
    let negative = Tensor::cat(&[inputs.negative_prompt, inputs.negative_prompt], 0)?;
    let sample_settings = SampleSettings {
        steps: settings.steps,
        guidance_scale: settings.guidance_scale,
        strength: 1.0,
    };
    let sample_inputs = SampleInputs {
        noise: &pair,
        init_latents: None,
        text: TextConditioning {
            positive: &positive,
            negative: &negative,
        },
    };
    let mut on_step =
        |report: &StepReport<'_>| progress("editing", report.step.index + 1, report.step.count);
    let both = Sampler::new(predictor(&editing, context, &mut None), scheduler)
        .on_step(&mut on_step)
        .sample(&sample_settings, &sample_inputs)?
        .latents;
    Ok(EditOutput {
        reconstruction: both.narrow(0, 0, 1)?,
        edited: both.narrow(0, 1, 1)?,
        inverted,
        injected_layers,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn targets_take_their_sources_rows() -> Result<()> {
        // Four videos (two guidance halves of a source/target pair), two rows each.
        let x = Tensor::arange(0f32, 8.0, &Device::Cpu)?.reshape((8, 1, 1, 1))?;
        let injected = SourceAttentionInjection::from_sources(&x, 4)?;
        assert_eq!(
            injected.flatten_all()?.to_vec1::<f32>()?,
            [0.0, 1.0, 0.0, 1.0, 4.0, 5.0, 4.0, 5.0]
        );
        assert!(SourceAttentionInjection::from_sources(&x, 3).is_err());
        Ok(())
    }
}
