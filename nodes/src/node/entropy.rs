//! The entropy editor's nodes: `EntropyProbe` and `EntropyReport` (attention entropy per layer
//! and step, as CSV, heatmap and ranking), `AttentionPerturb` (identity / uniform maps) and
//! `EntropyEnhance` (IE-Adapt, Enhance-A-Video).

use std::sync::Arc;

use serde_json::json;

use crate::models::attention::{AttentionKind, AttentionProcessor};
use crate::models::patcher::{Patch, PatchedUNet};
use crate::video::attention_edit::{
    bindings, AttentionPerturbation, EnhanceAVideo, EntropyAdapt, LayerSelection, Perturbation,
    StepRange,
};
use crate::video::entropy::{EntropyProbe as Probe, EntropyTable, CSV_HEADER, PROBE_QUERY_ROWS};

use super::objects::{EntropyProbe, Latent, Model};
use super::{
    check_filename_prefix, file_entry, Context, DescriptorBuilder, ForInput, Inputs, Node,
    NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(EntropyProbeNode),
        Box::new(EntropyReport),
        Box::new(AttentionPerturb),
        Box::new(EntropyEnhance),
    ]
}

/// The `layers` and `kind` inputs, checked against the model's attention layers.
fn layer_selection(inputs: &Inputs, unet: &PatchedUNet) -> Result<LayerSelection, NodeFailure> {
    let selection = LayerSelection::parse(inputs.string("layers")?, inputs.string("kind")?)
        .for_input("layers")?;
    selection
        .resolve(&unet.attention_layers())
        .for_input("layers")?;
    Ok(selection)
}

/// The `start_percent` / `end_percent` inputs.
fn step_range(inputs: &Inputs, default_end: f64) -> Result<StepRange, NodeFailure> {
    let start = inputs.float_or("start_percent", 0.0)?;
    let end = inputs.float_or("end_percent", default_end)?;
    StepRange::new(start, end).for_input("start_percent")
}

/// `unet` with `processor` bound to `selection`.
fn with_bindings(
    unet: &PatchedUNet,
    selection: &LayerSelection,
    processor: Arc<dyn AttentionProcessor>,
) -> Result<PatchedUNet, NodeFailure> {
    bindings(selection, processor)
        .into_iter()
        .try_fold(unet.clone(), |unet, binding| {
            unet.with_patch(Patch::Attention(binding))
        })
        .map_err(NodeFailure::execution)
}

struct EntropyProbeNode;

impl Node for EntropyProbeNode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EntropyProbe", "Entropy Probe", "vdm/entropy")
            .description(
                "Measures every attention layer (spatial, cross, temporal) at every sampling step of the \
                 runs of the model it returns, without changing them: the mean entropy H of the weights \
                 applied (after any perturbation), H / ln N in [0, 1], and the output energy E. Feed the \
                 MODEL to a sampler and the ENTROPY_PROBE, with the sampler's LATENT, to Entropy Report.",
            )
            .object("model", "MODEL", "The model to measure.")
            .optional()
            .int(
                "query_rows",
                PROBE_QUERY_ROWS as i64,
                1,
                65_536,
                "Query rows measured per map (evenly spaced) when a map has more: the entropy is their mean.",
            )
            .output("MODEL", "MODEL")
            .output("ENTROPY_PROBE", "probe")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let rows = inputs.usize_or("query_rows", PROBE_QUERY_ROWS)?;
        let table = Arc::new(EntropyTable::new());
        let probe = Arc::new(Probe::with_query_rows(table.clone(), rows));
        let unet = model
            .unet
            .with_patch(Patch::Observer(probe))
            .map_err(NodeFailure::execution)?;
        Ok(Outputs {
            values: vec![
                model.with_unet(unet).into_value(),
                EntropyProbe { table }.into_value(),
            ],
            ui: None,
        })
    }
}

struct EntropyReport;

impl Node for EntropyReport {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EntropyReport", "Entropy Report", "vdm/entropy")
            .description(&format!(
                "Writes what an Entropy Probe measured, atomically into the output folder: a CSV \
                 ({CSV_HEADER}) and a PNG heatmap of H / ln N (layers × steps). Returns the layers \
                 ranked by H / ln N averaged over the steps, as comma lists of layer paths that \
                 Attention Perturb's `layers` takes."
            ))
            .object("probe", "ENTROPY_PROBE", "From Entropy Probe.")
            .object(
                "samples",
                "LATENT",
                "The sampler's result: the report is written after the run it measured.",
            )
            .string(
                "filename_prefix",
                "entropy/probe",
                "File name prefix; may contain subfolders of the output folder.",
            )
            .optional()
            .combo(
                "kind",
                &["all", "spatial", "cross", "temporal"],
                "The kind of layers ranked.",
            )
            .float(
                "percent",
                0.25,
                (0.0, 1.0, 0.01),
                "The share of layers in the lowest and highest lists.",
            )
            .output("STRING", "ranking")
            .output("STRING", "low_entropy_layers")
            .output("STRING", "high_entropy_layers")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let probe: EntropyProbe = inputs.object("probe")?;
        let _: Latent = inputs.object("samples")?;
        let prefix = inputs.string("filename_prefix")?;
        let kind = match inputs
            .get("kind")
            .map(|_| inputs.string("kind"))
            .transpose()?
        {
            None | Some("all") => None,
            Some(kind) => Some(kind.parse::<AttentionKind>().for_input("kind")?),
        };
        let percent = inputs.float_or("percent", 0.25)?;
        if probe.table.is_empty() {
            return Err(NodeFailure::input(
                "probe",
                "the probe measured nothing: its MODEL output must feed the sampler whose LATENT \
                 is given",
            ));
        }
        let out_dir = ctx.output_dir();
        let (csv, png) = probe
            .table
            .save(&out_dir, prefix)
            .for_input("filename_prefix")?;
        let ranking: Vec<String> = probe
            .table
            .ranking(kind)
            .into_iter()
            .map(|(layer, _)| layer)
            .collect();
        let share = ((ranking.len() as f64 * percent).round() as usize).min(ranking.len());
        let low = ranking[..share].join(",");
        let high = ranking[ranking.len() - share..]
            .iter()
            .rev()
            .cloned()
            .collect::<Vec<_>>()
            .join(",");
        Ok(Outputs {
            values: vec![
                vdm_ffi::Value::Str(ranking.join(",").into()),
                vdm_ffi::Value::Str(low.into()),
                vdm_ffi::Value::Str(high.into()),
            ],
            ui: Some(json!({
                "images": [file_entry(&out_dir, &png)],
                "tables": [file_entry(&out_dir, &csv)],
                "ranking": ranking,
            })),
        })
    }
}

struct AttentionPerturb;

impl Node for AttentionPerturb {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("AttentionPerturb", "Attention Perturb", "vdm/entropy")
            .description(
                "Replaces the attention map A of the chosen layers, within a step range, by \
                 A' = (1 − strength)·A + strength·P: P = I (identity: each query attends to itself, \
                 the output is V; entropy 0; self-attention only) or P = U (uniform: the output is \
                 the mean of V over keys; entropy ln N). P is never materialised.",
            )
            .object("model", "MODEL", "The model.")
            .combo("mode", &Perturbation::NAMES, "identity (I) or uniform (U).")
            .string("layers", "all", "all, down, mid, up, or layer-path prefixes separated by commas (e.g. a ranking from Entropy Report).")
            .combo("kind", &["all", "spatial", "cross", "temporal"], "Kind of attention; identity applies to self-attention (spatial, temporal) only.")
            .float("start_percent", 0.0, (0.0, 1.0, 0.01), "Start of the step range, as a share of the schedule.")
            .float("end_percent", 1.0, (0.0, 1.0, 0.01), "End of the step range (exclusive; 1 includes the last step).")
            .float("strength", 1.0, (0.0, 1.0, 0.01), "s of the blend: 0 leaves the model unchanged.")
            .output("MODEL", "MODEL")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let target: Perturbation = inputs.string("mode")?.parse().for_input("mode")?;
        let mut selection = layer_selection(inputs, &model.unet)?;
        let range = step_range(inputs, 1.0)?;
        let strength = inputs.float("strength")?;
        if !(0.0..=1.0).contains(&strength) {
            return Err(NodeFailure::input(
                "strength",
                format!("{strength} is outside [0, 1]"),
            ));
        }
        let processor: Arc<dyn AttentionProcessor> = Arc::new(AttentionPerturbation {
            target,
            strength,
            range,
        });
        let unet = if target == Perturbation::Identity {
            // The identity map is defined for self-attention only.
            if selection.kind == Some(AttentionKind::Cross) {
                return Err(NodeFailure::input(
                    "kind",
                    "the identity map needs self-attention: choose spatial, temporal or all",
                ));
            }
            let mut unet = model.unet.clone();
            let kinds = match selection.kind {
                Some(kind) => vec![kind],
                None => vec![AttentionKind::SpatialSelf, AttentionKind::Temporal],
            };
            for kind in kinds {
                selection.kind = Some(kind);
                unet = with_bindings(&unet, &selection, processor.clone())?;
            }
            unet
        } else {
            with_bindings(&model.unet, &selection, processor)?
        };
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}

/// α of IE-Adapt and w of Enhance-A-Video when `weight` is left at −1.
const IE_ADAPT_ALPHA: f64 = 0.15;
const ENHANCE_WEIGHT: f64 = 2.0;

struct EntropyEnhance;

impl Node for EntropyEnhance {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EntropyEnhance", "Entropy Enhance", "vdm/entropy")
            .description(&format!(
                "Sharper, steadier video from the temporal attention. ie-adapt (IE-Adapt): on the \
                 run's first step the entropy of every temporal layer is measured; from the next \
                 step, within the step range, the top `top_percent` by entropy have their maps \
                 blended toward uniform, A' = (1 − α)·A + α·U, α = weight (default {IE_ADAPT_ALPHA}). \
                 enhance-a-video: within the step range each temporal attention output (after its \
                 projection) is multiplied by max((F + weight)·CFI, 1), CFI the mean off-diagonal \
                 weight of its F×F maps (default weight {ENHANCE_WEIGHT})."
            ))
            .object("model", "MODEL", "The model with its motion module.")
            .combo("method", &["ie-adapt", "enhance-a-video"], "IE-Adapt or Enhance-A-Video.")
            .float("weight", -1.0, (-1.0, 100.0, 0.01), "α (ie-adapt, in [0, 1]) or w (enhance-a-video); −1: the method's default. 0 leaves the model unchanged (ie-adapt).")
            .float("top_percent", 0.25, (0.0, 1.0, 0.01), "ie-adapt: the share of temporal layers blended, highest entropy first.")
            .float("start_percent", 0.0, (0.0, 1.0, 0.01), "Start of the step range, as a share of the schedule.")
            .float("end_percent", 0.4, (0.0, 1.0, 0.01), "End of the step range (exclusive; 1 includes the last step).")
            .output("MODEL", "MODEL")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let temporal = LayerSelection {
            prefixes: vec![String::new()],
            kind: Some(AttentionKind::Temporal),
        };
        temporal
            .resolve(&model.unet.attention_layers())
            .map_err(|_| {
                NodeFailure::input(
                    "model",
                    "the model has no temporal attention: apply a motion module first",
                )
            })?;
        let range = step_range(inputs, 0.4)?;
        let weight = inputs.float_or("weight", -1.0)?;
        let processor: Arc<dyn AttentionProcessor> = match inputs.string("method")? {
            "ie-adapt" => {
                let alpha = if weight < 0.0 { IE_ADAPT_ALPHA } else { weight };
                if alpha > 1.0 {
                    return Err(NodeFailure::input(
                        "weight",
                        format!("ie-adapt's α must be in [0, 1], got {alpha}"),
                    ));
                }
                let top_fraction = inputs.float_or("top_percent", 0.25)?;
                if !(top_fraction > 0.0 && top_fraction <= 1.0) {
                    return Err(NodeFailure::input(
                        "top_percent",
                        format!("{top_fraction} is outside (0, 1]"),
                    ));
                }
                Arc::new(EntropyAdapt {
                    alpha,
                    top_fraction,
                    range,
                })
            }
            "enhance-a-video" => Arc::new(EnhanceAVideo {
                weight: if weight < 0.0 { ENHANCE_WEIGHT } else { weight },
                range,
            }),
            other => {
                return Err(NodeFailure::input(
                    "method",
                    format!("unknown method `{other}`"),
                ))
            }
        };
        let unet = with_bindings(&model.unet, &temporal, processor)?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}
