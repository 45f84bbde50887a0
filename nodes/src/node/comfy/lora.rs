//! ComfyUI's LoRA loaders: `LoraLoader` (UNet and text encoder) and `LoraLoaderModelOnly`.
//! The merged weights become a weight-override patch of the model and a rebuilt copy of the
//! text encoder; the inputs are never changed. File keys that map to no weight are reported in
//! the node's UI output, as ComfyUI logs "lora key not loaded".

use std::sync::Arc;

use serde_json::json;

use crate::models::lora::{merge_into_text_encoder, merge_into_unet, LoraFile, MergedLora};

use super::super::models::{check_model, resolve_model, LORA_FOLDERS};
use super::super::objects::{Clip, Model};
use super::super::{
    Context, DescriptorBuilder, ForInput, Inputs, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(LoraLoader), Box::new(LoraLoaderModelOnly)]
}

/// ComfyUI's strength range and step for both strengths.
const STRENGTH_RANGE: (f64, f64, f64) = (-100.0, 100.0, 0.01);

/// How many of the keys not applied the UI output lists.
const LISTED_NOT_APPLIED: usize = 20;

fn open_lora(inputs: &Inputs, ctx: &Context) -> Result<LoraFile, NodeFailure> {
    let path = resolve_model(ctx, "lora_name", LORA_FOLDERS, inputs.string("lora_name")?)?;
    LoraFile::open(&path).for_input("lora_name")
}

/// `model` with the UNet part of `lora` merged at `strength`, and the keys it claimed.
fn patch_model(
    model: &Model,
    lora: &LoraFile,
    strength: f64,
) -> Result<(Model, MergedLora), NodeFailure> {
    let merged = merge_into_unet(lora, &model.unet, strength).for_input("lora_name")?;
    if merged.weights.is_empty() {
        return Ok((model.clone(), merged));
    }
    let unet = model
        .unet
        .with_weights(merged.weights.clone())
        .map_err(|e| NodeFailure::input("lora_name", e))?;
    Ok((model.with_unet(unet), merged))
}

/// `clip` with the text-encoder part of `lora` merged at `strength`, and the keys it claimed.
fn patch_clip(
    clip: &Clip,
    lora: &LoraFile,
    strength: f64,
) -> Result<(Clip, MergedLora), NodeFailure> {
    let merged = merge_into_text_encoder(lora, &clip.weights, strength).for_input("lora_name")?;
    if merged.weights.is_empty() {
        return Ok((clip.clone(), merged));
    }
    let weights = clip.weights.with_replaced(merged.weights.clone());
    let encoder = weights.build().for_input("lora_name")?;
    let patched = Clip {
        encoder: Arc::new(encoder),
        weights,
        ..clip.clone()
    };
    Ok((patched, merged))
}

/// The UI report of the keys no model took, or none when every key was applied.
fn not_applied_report(lora: &LoraFile, merges: &[&MergedLora]) -> Option<serde_json::Value> {
    let not_applied = lora.not_applied(merges);
    (!not_applied.is_empty()).then(|| {
        json!({
            "lora_keys_not_loaded": not_applied.len(),
            "lora_keys": lora.key_count(),
            "first_keys_not_loaded": &not_applied[..not_applied.len().min(LISTED_NOT_APPLIED)],
        })
    })
}

struct LoraLoader;

impl Node for LoraLoader {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoraLoader", "Load LoRA", "loaders")
            .description(
                "Merges an SD 1.x LoRA into the model and the text encoder (ComfyUI's node): kohya, \
                 LDM-named kohya, diffusers/PEFT and LoCon files. The name is looked up under <models>/loras/.",
            )
            .object("model", "MODEL", "The diffusion model the LoRA will be applied to.")
            .object("clip", "CLIP", "The CLIP model the LoRA will be applied to.")
            .string("lora_name", "", "The name of the LoRA.")
            .float(
                "strength_model",
                1.0,
                STRENGTH_RANGE,
                "How strongly to modify the diffusion model. This value can be negative.",
            )
            .float(
                "strength_clip",
                1.0,
                STRENGTH_RANGE,
                "How strongly to modify the CLIP model. This value can be negative.",
            )
            .output("MODEL", "MODEL")
            .output("CLIP", "CLIP")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_model(inputs, ctx, "lora_name", LORA_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let clip: Clip = inputs.object("clip")?;
        let strength_model = inputs.float("strength_model")?;
        let strength_clip = inputs.float("strength_clip")?;
        if strength_model == 0.0 && strength_clip == 0.0 {
            return Ok(Outputs {
                values: vec![model.into_value(), clip.into_value()],
                ui: None,
            });
        }
        let lora = open_lora(inputs, ctx)?;
        let (model, model_merge) = patch_model(&model, &lora, strength_model)?;
        let (clip, clip_merge) = patch_clip(&clip, &lora, strength_clip)?;
        Ok(Outputs {
            values: vec![model.into_value(), clip.into_value()],
            ui: not_applied_report(&lora, &[&model_merge, &clip_merge]),
        })
    }
}

struct LoraLoaderModelOnly;

impl Node for LoraLoaderModelOnly {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoraLoaderModelOnly", "LoraLoaderModelOnly", "loaders")
            .description(
                "Merges the UNet part of an SD 1.x LoRA into the model (ComfyUI's node). The name is \
                 looked up under <models>/loras/.",
            )
            .object("model", "MODEL", "The diffusion model the LoRA will be applied to.")
            .string("lora_name", "", "The name of the LoRA.")
            .float(
                "strength_model",
                1.0,
                STRENGTH_RANGE,
                "How strongly to modify the diffusion model. This value can be negative.",
            )
            .output("MODEL", "MODEL")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_model(inputs, ctx, "lora_name", LORA_FOLDERS)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let strength_model = inputs.float("strength_model")?;
        if strength_model == 0.0 {
            return Ok(Outputs::one(model.into_value()));
        }
        let lora = open_lora(inputs, ctx)?;
        let (model, merged) = patch_model(&model, &lora, strength_model)?;
        Ok(Outputs {
            values: vec![model.into_value()],
            ui: not_applied_report(&lora, &[&merged]),
        })
    }
}
