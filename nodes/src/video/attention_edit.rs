//! Processors that change attention by layer and step range (METHODS.md §3 and §5):
//! - [`AttentionPerturbation`]: A' = (1 − s)·A + s·P with P the identity (output V) or the
//!   uniform map (output the mean of V over keys), never materialising P;
//! - [`EntropyAdapt`] (IE-Adapt): the temporal layers of highest entropy, measured on the
//!   run's first step, blended toward the uniform map during the first part of the schedule;
//! - [`EnhanceAVideo`]: each temporal attention output scaled by max((F + w)·CFI, 1), CFI the
//!   mean off-diagonal temporal attention weight.
//!
//! Layers are chosen as ComfyUI users choose them (block names or layer-path prefixes, a kind),
//! steps by `start_percent` / `end_percent` of the schedule.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

use candle_core::{DType, Result, Tensor};

use crate::models::attention::{
    attention_probs, select_query_rows, AttentionCall, AttentionKind, AttentionProcessor,
    ProcessorBinding, ScaledDotProduct,
};
use crate::models::call::SamplingStep;

use super::entropy::{mean_row_entropy, sampled_rows, PROBE_QUERY_ROWS};

/// Attention layers chosen by path prefix and kind.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LayerSelection {
    /// Diffusers path prefixes; an empty prefix is every layer.
    pub prefixes: Vec<String>,
    /// One kind, or every kind.
    pub kind: Option<AttentionKind>,
}

impl LayerSelection {
    /// `layers`: `all`, `down`, `mid`, `up`, or a comma list of layer-path prefixes;
    /// `kind`: `all`, `spatial`, `cross` or `temporal`.
    pub fn parse(layers: &str, kind: &str) -> std::result::Result<Self, String> {
        let prefixes: Vec<String> = match layers.trim() {
            "all" => vec![String::new()],
            "down" => vec!["down_blocks.".to_string()],
            "mid" => vec!["mid_block.".to_string()],
            "up" => vec!["up_blocks.".to_string()],
            list => list
                .split(',')
                .map(str::trim)
                .filter(|p| !p.is_empty())
                .map(str::to_string)
                .collect(),
        };
        if prefixes.is_empty() {
            return Err(
                "no layers given (all, down, mid, up, or layer paths separated by commas)".into(),
            );
        }
        let kind = match kind {
            "all" => None,
            other => Some(other.parse::<AttentionKind>()?),
        };
        Ok(Self { prefixes, kind })
    }

    pub fn matches(&self, layer: &str, kind: AttentionKind) -> bool {
        self.kind.is_none_or(|k| k == kind)
            && self.prefixes.iter().any(|p| layer.starts_with(p.as_str()))
    }

    /// The layers of `available` (path, kind) that are selected; an error naming the first
    /// prefix that selects none of them.
    pub fn resolve(
        &self,
        available: &[(String, AttentionKind)],
    ) -> std::result::Result<Vec<(String, AttentionKind)>, String> {
        for prefix in &self.prefixes {
            let any = available.iter().any(|(layer, kind)| {
                layer.starts_with(prefix.as_str()) && self.kind.is_none_or(|k| k == *kind)
            });
            if !any {
                let kind = self.kind.map_or("attention", |k| k.name());
                let shown = if prefix.is_empty() { "(all)" } else { prefix };
                return Err(format!(
                    "`{shown}` selects no {kind} layer of this model (its layers look like `{}`)",
                    available.first().map_or("", |(l, _)| l.as_str())
                ));
            }
        }
        Ok(available
            .iter()
            .filter(|(layer, kind)| self.matches(layer, *kind))
            .cloned()
            .collect())
    }
}

/// A share of the schedule, as ComfyUI's `start_percent` / `end_percent`: a step is inside when
/// start ≤ index / count < end (so end = 1 includes the last step). Calls outside a sampling run
/// are inside.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepRange {
    pub start: f64,
    pub end: f64,
}

impl StepRange {
    pub const ALL: Self = Self {
        start: 0.0,
        end: 1.0,
    };

    pub fn new(start: f64, end: f64) -> std::result::Result<Self, String> {
        if !(0.0..=1.0).contains(&start) || !(0.0..=1.0).contains(&end) {
            return Err(format!("the step range {start}..{end} is outside 0..1"));
        }
        if start >= end {
            return Err(format!(
                "start_percent {start} must be below end_percent {end}"
            ));
        }
        Ok(Self { start, end })
    }

    pub fn contains(&self, step: Option<SamplingStep>) -> bool {
        step.is_none_or(|s| {
            let fraction = s.fraction();
            fraction >= self.start && fraction < self.end
        })
    }
}

/// Bindings that put `processor` on the layers of `selection`.
pub fn bindings(
    selection: &LayerSelection,
    processor: Arc<dyn AttentionProcessor>,
) -> Vec<ProcessorBinding> {
    selection
        .prefixes
        .iter()
        .map(|prefix| ProcessorBinding {
            prefix: prefix.clone(),
            kind: selection.kind,
            processor: processor.clone(),
        })
        .collect()
}

/// The map attention is pushed toward.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Perturbation {
    /// A = I: every query attends to itself only; the output is V (self-attention only).
    Identity,
    /// A = U: every query attends to every key equally; the output is the mean of V.
    Uniform,
}

impl Perturbation {
    pub const NAMES: [&'static str; 2] = ["identity", "uniform"];

    /// P·V, (batch, heads, queries, head_dim), without materialising P.
    fn output(&self, call: &AttentionCall, q: &Tensor, v: &Tensor) -> Result<Tensor> {
        match self {
            Self::Identity => {
                if q.dim(2)? != v.dim(2)? {
                    candle_core::bail!(
                        "{}: the identity map needs self-attention ({} queries, {} keys)",
                        call.layer,
                        q.dim(2)?,
                        v.dim(2)?
                    )
                }
                Ok(v.clone())
            }
            Self::Uniform => {
                let (batch, heads, queries, _) = q.dims4()?;
                v.mean_keepdim(2)?
                    .broadcast_as((batch, heads, queries, v.dim(3)?))?
                    .contiguous()
            }
        }
    }

    /// Rows `rows` of P, (batch, heads, rows, keys).
    fn weights(&self, like: &Tensor, rows: &[usize]) -> Result<Tensor> {
        let (batch, heads, _, keys) = like.dims4()?;
        match self {
            Self::Identity => {
                let mut one_hot = vec![0f32; rows.len() * keys];
                for (i, &row) in rows.iter().enumerate() {
                    if row < keys {
                        one_hot[i * keys + row] = 1.0;
                    }
                }
                Tensor::from_vec(one_hot, (1, 1, rows.len(), keys), like.device())?
                    .to_dtype(like.dtype())?
                    .broadcast_as((batch, heads, rows.len(), keys))?
                    .contiguous()
            }
            Self::Uniform => Tensor::full(
                1.0 / keys as f64,
                (batch, heads, rows.len(), keys),
                like.device(),
            )?
            .to_dtype(like.dtype()),
        }
    }
}

impl std::str::FromStr for Perturbation {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "identity" => Ok(Self::Identity),
            "uniform" => Ok(Self::Uniform),
            other => Err(format!(
                "unknown mode `{other}` (expected identity or uniform)"
            )),
        }
    }
}

/// (1 − s)·plain + s·target, with s = 1 giving `target` exactly (and not computing `plain`).
fn blend(plain: impl FnOnce() -> Result<Tensor>, target: Tensor, strength: f64) -> Result<Tensor> {
    if strength >= 1.0 {
        return Ok(target);
    }
    (plain()? * (1.0 - strength))? + (target * strength)?
}

/// A' = (1 − s)·A + s·P on the layers it is bound to, within a step range.
pub struct AttentionPerturbation {
    pub target: Perturbation,
    pub strength: f64,
    pub range: StepRange,
}

impl AttentionPerturbation {
    fn active(&self, call: &AttentionCall) -> bool {
        self.strength > 0.0 && self.range.contains(call.step())
    }
}

impl AttentionProcessor for AttentionPerturbation {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if !self.active(call) {
            return ScaledDotProduct.attend(call, q, k, v);
        }
        let target = self.target.output(call, q, v)?;
        blend(
            || ScaledDotProduct.attend(call, q, k, v),
            target,
            self.strength,
        )
    }

    fn weights(
        &self,
        call: &AttentionCall,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
    ) -> Result<Tensor> {
        let plain = attention_probs(q, k, call.scale)?;
        if !self.active(call) {
            return Ok(plain);
        }
        let target = self.target.weights(&plain, rows)?;
        blend(|| Ok(plain), target, self.strength)
    }
}

/// Run-observer key of IE-Adapt's per-layer entropy sums on the first step.
const FIRST_STEP_ENTROPY: &str = "ie_adapt.first_step_entropy";
/// Run-observer key of the layers IE-Adapt chose.
pub const IE_ADAPT_LAYERS: &str = "ie_adapt.layers";

/// IE-Adapt: on the run's first step, the entropy of every temporal layer is measured; from
/// then on, within the step range, the top `top_fraction` of them by entropy have their maps
/// blended toward the uniform map with weight `alpha`.
pub struct EntropyAdapt {
    pub alpha: f64,
    pub top_fraction: f64,
    pub range: StepRange,
}

impl EntropyAdapt {
    /// Whether `call` is on a chosen layer at a step where the blend applies. On the first
    /// step it measures instead; the choice is made once, at the first call after it.
    fn chosen(&self, call: &AttentionCall, q: &Tensor, k: &Tensor) -> Result<bool> {
        let (Some(step), Some(run)) = (call.step(), call.pass.run) else {
            return Ok(false);
        };
        if self.alpha <= 0.0 || call.kind != AttentionKind::Temporal {
            return Ok(false);
        }
        if step.index == 0 {
            let rows = sampled_rows(q.dim(2)?, PROBE_QUERY_ROWS);
            let entropy = mean_row_entropy(&attention_probs(
                &select_query_rows(q, &rows)?,
                k,
                call.scale,
            )?)?;
            run.with::<BTreeMap<String, (f64, usize)>, _>(FIRST_STEP_ENTROPY, |sums| {
                let sum = sums.entry(call.layer.to_string()).or_default();
                sum.0 += entropy;
                sum.1 += 1;
            });
            return Ok(false);
        }
        if !self.range.contains(Some(step)) {
            return Ok(false);
        }
        let decided = run.with::<Option<BTreeSet<String>>, _>(IE_ADAPT_LAYERS, |chosen| {
            chosen.as_ref().map(|c| c.contains(call.layer))
        });
        if let Some(chosen) = decided {
            return Ok(chosen);
        }
        let sums = run
            .get::<BTreeMap<String, (f64, usize)>>(FIRST_STEP_ENTROPY)
            .unwrap_or_default();
        let top = top_by_entropy(&sums, self.top_fraction);
        let chosen = top.contains(call.layer);
        run.with::<Option<BTreeSet<String>>, _>(IE_ADAPT_LAYERS, |slot| *slot = Some(top));
        Ok(chosen)
    }
}

/// The `fraction` of layers with the highest mean entropy (at least one when there are any).
fn top_by_entropy(sums: &BTreeMap<String, (f64, usize)>, fraction: f64) -> BTreeSet<String> {
    let mut layers: Vec<(&String, f64)> = sums
        .iter()
        .map(|(layer, (sum, n))| (layer, sum / (*n).max(1) as f64))
        .collect();
    layers.sort_by(|a, b| b.1.total_cmp(&a.1).then_with(|| a.0.cmp(b.0)));
    let count = ((layers.len() as f64 * fraction).round() as usize)
        .clamp(1.min(layers.len()), layers.len());
    layers
        .into_iter()
        .take(count)
        .map(|(l, _)| l.clone())
        .collect()
}

impl AttentionProcessor for EntropyAdapt {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        if !self.chosen(call, q, k)? {
            return ScaledDotProduct.attend(call, q, k, v);
        }
        let target = Perturbation::Uniform.output(call, q, v)?;
        blend(
            || ScaledDotProduct.attend(call, q, k, v),
            target,
            self.alpha,
        )
    }

    fn weights(
        &self,
        call: &AttentionCall,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
    ) -> Result<Tensor> {
        let plain = attention_probs(q, k, call.scale)?;
        let chosen = match (call.step(), call.pass.run) {
            // The choice is read, not made, here: the call's own attend made it.
            (Some(step), Some(run)) if step.index > 0 && self.range.contains(Some(step)) => run
                .get::<Option<BTreeSet<String>>>(IE_ADAPT_LAYERS)
                .flatten()
                .is_some_and(|c| c.contains(call.layer)),
            _ => false,
        };
        if !chosen || self.alpha <= 0.0 || call.kind != AttentionKind::Temporal {
            return Ok(plain);
        }
        let target = Perturbation::Uniform.weights(&plain, rows)?;
        blend(|| Ok(plain), target, self.alpha)
    }
}

/// CFI: the mean off-diagonal weight of (…, F, F) temporal attention maps,
/// Σ_{i≠j} A_ij / (F² − F) averaged over the leading dimensions. 0 for a single frame.
pub fn cross_frame_intensity(maps: &Tensor) -> Result<f64> {
    let frames = maps.dim(maps.rank() - 1)?;
    if frames < 2 {
        return Ok(0.0);
    }
    let maps = maps.to_dtype(DType::F32)?;
    let count = maps.elem_count() / (frames * frames);
    let total = maps.sum_all()?.to_scalar::<f32>()? as f64;
    let diagonal = Tensor::eye(frames, DType::F32, maps.device())?;
    let trace = maps
        .broadcast_mul(&diagonal)?
        .sum_all()?
        .to_scalar::<f32>()? as f64;
    Ok((total - trace) / ((frames * frames - frames) * count.max(1)) as f64)
}

/// The Enhance-A-Video factor max((F + weight)·CFI, 1).
pub fn enhance_score(cfi: f64, frames: usize, weight: f64) -> f64 {
    ((frames as f64 + weight) * cfi).max(1.0)
}

/// Run-observer key of the `Vec<(String, f64)>` of Enhance-A-Video factors applied.
pub const ENHANCE_SCORES: &str = "enhance_a_video.scores";

/// Enhance-A-Video on temporal attention, within a step range.
pub struct EnhanceAVideo {
    pub weight: f64,
    pub range: StepRange,
}

impl AttentionProcessor for EnhanceAVideo {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        let output = ScaledDotProduct.attend(call, q, k, v)?;
        if call.kind != AttentionKind::Temporal || !self.range.contains(call.step()) {
            return Ok(output);
        }
        let frames = q.dim(2)?;
        let maps = attention_probs(
            &q.to_dtype(DType::F32)?,
            &k.to_dtype(DType::F32)?,
            call.scale,
        )?;
        let score = enhance_score(cross_frame_intensity(&maps)?, frames, self.weight);
        call.pass.values.scale_output(call.layer, score);
        if let Some(run) = call.pass.run {
            run.with::<Vec<(String, f64)>, _>(ENHANCE_SCORES, |scores| {
                scores.push((call.layer.to_string(), score))
            });
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn layer_sets_parse_and_must_select_something() {
        let all = LayerSelection::parse("all", "all").unwrap();
        assert!(all.matches(
            "down_blocks.0.attentions.0.transformer_blocks.0.attn1",
            AttentionKind::SpatialSelf
        ));
        let up_temporal = LayerSelection::parse("up", "temporal").unwrap();
        assert!(up_temporal.matches(
            "up_blocks.1.motion_modules.0.transformer_blocks.0.attn1",
            AttentionKind::Temporal
        ));
        assert!(!up_temporal.matches(
            "up_blocks.1.attentions.0.transformer_blocks.0.attn1",
            AttentionKind::SpatialSelf
        ));
        let list = LayerSelection::parse("mid_block., up_blocks.1.", "spatial").unwrap();
        assert_eq!(list.prefixes, ["mid_block.", "up_blocks.1."]);
        assert!(LayerSelection::parse(" , ", "all").is_err());
        assert!(LayerSelection::parse("all", "diagonal").is_err());
        let available = vec![(
            "up_blocks.1.x.attn1".to_string(),
            AttentionKind::SpatialSelf,
        )];
        assert!(list.resolve(&available).unwrap_err().contains("mid_block."));
        assert_eq!(
            LayerSelection::parse("up", "spatial")
                .unwrap()
                .resolve(&available)
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn step_ranges_follow_comfyui_percentages() {
        let step = |index| {
            Some(SamplingStep {
                index,
                count: 10,
                timestep: 0.0,
            })
        };
        let range = StepRange::new(0.0, 0.4).unwrap();
        assert!(range.contains(step(3)) && !range.contains(step(4)));
        assert!(StepRange::ALL.contains(step(9)));
        assert!(StepRange::new(0.5, 0.5).is_err());
        assert!(StepRange::new(0.2, 1.5).is_err());
    }

    #[test]
    fn cross_frame_intensity_of_uniform_and_identity_maps() -> Result<()> {
        let dev = Device::Cpu;
        for frames in [2usize, 5, 16] {
            let uniform = Tensor::full(1.0 / frames as f32, (3, 2, frames, frames), &dev)?;
            let cfi = cross_frame_intensity(&uniform)?;
            assert!((cfi - 1.0 / frames as f64).abs() < 1e-6, "{cfi}");
            // A uniform map gives the score 1 + w/F.
            let score = enhance_score(cfi, frames, 2.0);
            assert!((score - (1.0 + 2.0 / frames as f64)).abs() < 1e-5);
            let identity =
                Tensor::eye(frames, DType::F32, &dev)?.reshape((1, 1, frames, frames))?;
            assert_eq!(cross_frame_intensity(&identity)?, 0.0);
            assert_eq!(enhance_score(0.0, frames, 2.0), 1.0);
        }
        Ok(())
    }

    #[test]
    fn the_highest_entropy_layers_are_chosen() {
        let sums: BTreeMap<String, (f64, usize)> = [("a", 1.0), ("b", 3.0), ("c", 2.0), ("d", 0.5)]
            .into_iter()
            .map(|(l, h)| (l.to_string(), (2.0 * h, 2)))
            .collect();
        assert_eq!(
            top_by_entropy(&sums, 0.25),
            BTreeSet::from(["b".to_string()])
        );
        assert_eq!(top_by_entropy(&sums, 0.5).len(), 2);
        assert_eq!(top_by_entropy(&sums, 0.01).len(), 1);
    }
}
