//! Latent utilities: a VAE-free preview, and LATENT files as ComfyUI's SaveLatent/LoadLatent.

use serde_json::json;

use crate::video::preview::UpscaleFilter;
use crate::video::{latent_file, preview};

use super::memory::Bytes;
use super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(LatentPreview),
        Box::new(SaveLatent),
        Box::new(LoadLatent),
    ]
}

struct LatentPreview;

impl Node for LatentPreview {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LatentPreview", "Latent Preview", "vdm/latent")
            .description("Latents to RGB frames with SD 1.5's linear latent-to-RGB approximation: a look at latents without a VAE.")
            .object("latent", "LATENT", "SD 1.x latents (4 channels).")
            .optional()
            .int("upscale", 8, 1, 8, "Nearest-neighbour upscale, 8 gives the pixel size the VAE would decode to.")
            .output("IMAGE", "IMAGE")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let latent: Latent = inputs.object("latent")?;
        let upscale = inputs.usize_or("upscale", 8)?;
        // RGB frames at the upscaled size, and the upscale's copy of them.
        let pixels_per_value = (upscale * upscale) as u64;
        let rgb_per_latent_value = pixels_per_value * 3 / 4 + 1;
        ctx.memory_budget(latent.samples.device()).check(
            "latent",
            &format!(
                "a preview of latents {:?} at {upscale}×",
                latent.samples.dims()
            ),
            Bytes::of(
                latent.samples.elem_count() as u64,
                4 * 2 * rgb_per_latent_value,
            ),
        )?;
        let frames = preview::latent_to_rgb(&latent.samples, upscale, UpscaleFilter::Nearest)
            .for_input("latent")?;
        Ok(Outputs::one(Images { frames }.into_value()))
    }
}

struct SaveLatent;

impl Node for SaveLatent {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("SaveLatent", "Save Latent", "vdm/latent")
            .description("Writes latents to a safetensors file in the output folder, as ComfyUI's SaveLatent does.")
            .object("samples", "LATENT", "Latents to save.")
            .string("filename_prefix", "latents/vdm", "File name prefix; may contain subfolders of the output folder.")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let latent: Latent = inputs.object("samples")?;
        let prefix = inputs.string("filename_prefix")?;
        let out_dir = ctx.output_dir();
        let path = latent_file::save_latent(&latent.samples, &out_dir, prefix, None)
            .for_input("filename_prefix")?;
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "latents": [file_entry(&out_dir, &path)] })),
        })
    }
}

struct LoadLatent;

impl Node for LoadLatent {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadLatent", "Load Latent", "vdm/latent")
            .description(
                "Reads latents from a safetensors file written by SaveLatent (vdm's or ComfyUI's).",
            )
            .string(
                "latent",
                "",
                "Path of the .latent/.safetensors file, absolute or relative to the input folder.",
            )
            .output("LATENT", "LATENT")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "latent")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_input_path(ctx, inputs.string("latent")?);
        let device = ctx.device()?;
        let samples = latent_file::load_latent(&path, &device).for_input("latent")?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}
