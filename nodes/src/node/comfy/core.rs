//! ComfyUI's core nodes of an AnimateDiff graph, on vdm's objects: a `LATENT` is one video
//! whose frames are ComfyUI's batch, an `IMAGE` its frames.

use candle_core::{DType, Tensor};
use serde_json::json;

use crate::models::weighted_prompt::{empty_chunk, encode_weighted, tokenize_weighted};
use crate::video::io::{load_alpha, save_video, LoadOptions, VideoFormat};
use crate::video::resize::{crop_to_aspect, resize, ResizeMode};

use super::super::memory::Bytes;
use super::super::models::CheckpointLoader;
use super::super::objects::{Clip, Conditioning, Mask};
use super::super::video_io::load_frames;
use super::super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, save_failure, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

/// ComfyUI's largest image side (`MAX_RESOLUTION`).
const MAX_RESOLUTION: i64 = 16384;

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(CheckpointLoaderSimple),
        Box::new(ClipSetLastLayer),
        Box::new(ClipTextEncode),
        Box::new(EmptyLatentImage),
        Box::new(LatentUpscale),
        Box::new(LatentUpscaleBy),
        Box::new(SaveImage),
        Box::new(PreviewImage),
        Box::new(LoadImage),
    ]
}

struct CheckpointLoaderSimple;

impl Node for CheckpointLoaderSimple {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("CheckpointLoaderSimple", "Load Checkpoint", "loaders")
            .description("Loads an SD 1.x checkpoint (ComfyUI's node): the name is looked up under <models>/checkpoints/, either slash.")
            .string("ckpt_name", "", "The checkpoint file.")
            .output("MODEL", "MODEL")
            .output("CLIP", "CLIP")
            .output("VAE", "VAE")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        CheckpointLoader.check(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        CheckpointLoader.execute(inputs, ctx)
    }
}

struct ClipSetLastLayer;

impl Node for ClipSetLastLayer {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("CLIPSetLastLayer", "CLIP Set Last Layer", "conditioning")
            .object("clip", "CLIP", "The text encoder.")
            .int(
                "stop_at_clip_layer",
                -1,
                -24,
                -1,
                "-1: the last layer; -2: the penultimate (\"CLIP skip 2\").",
            )
            .output("CLIP", "CLIP")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let mut clip: Clip = inputs.object("clip")?;
        let skip = inputs.int("stop_at_clip_layer")?.unsigned_abs() as usize;
        let layers = clip.encoder.num_hidden_layers();
        if skip > layers {
            return Err(NodeFailure::input(
                "stop_at_clip_layer",
                format!("the text encoder has {layers} layers"),
            ));
        }
        clip.clip_skip = skip;
        Ok(Outputs::one(clip.into_value()))
    }
}

struct ClipTextEncode;

impl Node for ClipTextEncode {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("CLIPTextEncode", "CLIP Text Encode (Prompt)", "conditioning")
            .description(
                "Encodes a prompt as ComfyUI does: (text:1.2) and (text) weight words up, [text] down; \
                 prompts past 75 tokens are encoded in chunks of 77 and joined.",
            )
            .text("text", "", "The prompt.")
            .object("clip", "CLIP", "The text encoder.")
            .output("CONDITIONING", "CONDITIONING")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let clip: Clip = inputs.object("clip")?;
        let (embeddings, dropped) = encode_prompt(&clip, inputs.string("text")?, "text")?;
        let ui = (!dropped.is_empty()).then(|| json!({"dropped_embeddings": dropped}));
        Ok(Outputs {
            values: vec![Conditioning::per_video(embeddings).into_value()],
            ui,
        })
    }
}

/// `text` encoded as ComfyUI's CLIPTextEncode does: (1, 77·chunks, D), and the names of the
/// textual-inversion embeddings it dropped. Errors name `input`.
pub(super) fn encode_prompt(
    clip: &Clip,
    text: &str,
    input: &str,
) -> Result<(Tensor, Vec<String>), NodeFailure> {
    let tokenizer = clip
        .tokenizer()
        .map_err(|m| NodeFailure::input("clip", m))?;
    let tokens = tokenize_weighted(tokenizer, text).for_input(input)?;
    let device = clip.encoder.device().clone();
    let embeddings = encode_weighted(
        &clip.encoder,
        &tokens,
        &empty_chunk(tokenizer),
        clip.clip_skip,
        &device,
    )?;
    Ok((embeddings, tokens.dropped_embeddings))
}

struct EmptyLatentImage;

impl Node for EmptyLatentImage {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("EmptyLatentImage", "Empty Latent Image", "latent")
            .description("Zero latents; for video, batch_size is the number of frames (as in ComfyUI's AnimateDiff graphs).")
            .int_step("width", 512, (16, MAX_RESOLUTION, 8), "Width in pixels.")
            .int_step("height", 512, (16, MAX_RESOLUTION, 8), "Height in pixels.")
            .int("batch_size", 1, 1, 4096, "Frames (images of the batch).")
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let width = inputs.usize("width")? / 8;
        let height = inputs.usize("height")? / 8;
        let frames = inputs.usize("batch_size")?;
        let device = ctx.device()?;
        ctx.memory_budget(&device).check(
            "batch_size",
            &format!("latents of {frames} frames of {width}×{height}"),
            Bytes::f32s(&[4, frames, height, width]),
        )?;
        let samples = Tensor::zeros((1, 4, frames, height, width), DType::F32, &device)?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}

/// ComfyUI's `common_upscale` on video latents (…, h, w): optionally cropped to the target's
/// aspect ratio, then resized.
fn upscale(
    latent: &Latent,
    method: &str,
    height: usize,
    width: usize,
    crop: bool,
) -> Result<Latent, NodeFailure> {
    let mode: ResizeMode = method.parse().for_input("upscale_method")?;
    let samples = if crop {
        crop_to_aspect(&latent.samples, height, width)?
    } else {
        latent.samples.clone()
    };
    Ok(Latent {
        samples: resize(&samples, height, width, mode)?,
    })
}

struct LatentUpscale;

impl Node for LatentUpscale {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LatentUpscale", "Upscale Latent", "latent")
            .description("Resizes latents to a size in pixels; 0 for one side keeps the aspect ratio, 0 for both leaves them as they are.")
            .object("samples", "LATENT", "The latents.")
            .combo("upscale_method", &ResizeMode::NAMES, "How samples are interpolated.")
            .int_step("width", 512, (0, MAX_RESOLUTION, 8), "Width in pixels.")
            .int_step("height", 512, (0, MAX_RESOLUTION, 8), "Height in pixels.")
            .combo("crop", &["disabled", "center"], "center: cut to the new aspect ratio first.")
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let latent: Latent = inputs.object("samples")?;
        let (width, height) = (inputs.usize("width")?, inputs.usize("height")?);
        if width == 0 && height == 0 {
            return Ok(Outputs::one(latent.into_value()));
        }
        let (_, _, _, latent_h, latent_w) = latent.samples.dims5().for_input("samples")?;
        // Sizes in pixels, at least 64, as ComfyUI: a zero side follows the aspect ratio.
        let keep_aspect = |side: usize, other: usize, along: usize| {
            ((along * side) as f64 / other as f64).round_ties_even() as usize
        };
        let (width, height) = match (width, height) {
            (0, h) => (
                keep_aspect(h.max(64), latent_h, latent_w).max(64),
                h.max(64),
            ),
            (w, 0) => (
                w.max(64),
                keep_aspect(w.max(64), latent_w, latent_h).max(64),
            ),
            (w, h) => (w.max(64), h.max(64)),
        };
        let crop = inputs.string("crop")? == "center";
        let method = inputs.string("upscale_method")?;
        let resized = upscale(&latent, method, height / 8, width / 8, crop)?;
        Ok(Outputs::one(resized.into_value()))
    }
}

struct LatentUpscaleBy;

impl Node for LatentUpscaleBy {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LatentUpscaleBy", "Upscale Latent By", "latent")
            .object("samples", "LATENT", "The latents.")
            .combo(
                "upscale_method",
                &ResizeMode::NAMES,
                "How samples are interpolated.",
            )
            .float(
                "scale_by",
                1.5,
                (0.01, 8.0, 0.01),
                "Scale factor of both sides.",
            )
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let latent: Latent = inputs.object("samples")?;
        let scale = inputs.float("scale_by")?;
        let (_, _, _, h, w) = latent.samples.dims5().for_input("samples")?;
        let scaled = |side: usize| ((side as f64 * scale).round_ties_even() as usize).max(1);
        let method = inputs.string("upscale_method")?;
        let resized = upscale(&latent, method, scaled(h), scaled(w), false)?;
        Ok(Outputs::one(resized.into_value()))
    }
}

/// Writes each image of `images` as its own PNG (`{prefix}_{counter:05}_.png`) and returns
/// ComfyUI's `images` entries.
fn save_images(
    images: &Images,
    out_dir: &std::path::Path,
    prefix: &str,
    kind: &str,
    ctx: &Context,
) -> Result<Vec<serde_json::Value>, NodeFailure> {
    let count = images.frames.dim(0)?;
    ctx.memory_budget(&candle_core::Device::Cpu).check(
        "images",
        &format!("saving {count} images"),
        Bytes::of(
            images.frames.elem_count() as u64 / count.max(1) as u64,
            4 + 1 + 1,
        ),
    )?;
    let mut entries = Vec::with_capacity(count);
    for index in 0..count {
        ctx.check_cancelled()?;
        let frame = images.frames.narrow(0, index, 1)?;
        let path =
            save_video(&frame, out_dir, prefix, VideoFormat::Png, 1.0, 0).map_err(save_failure)?;
        let mut entry = file_entry(out_dir, &path);
        entry["type"] = json!(kind);
        entries.push(entry);
    }
    Ok(entries)
}

struct SaveImage;

impl Node for SaveImage {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("SaveImage", "Save Image", "image")
            .description("Saves each image (each frame of a video) as a PNG in the output folder.")
            .object("images", "IMAGE", "The images.")
            .string(
                "filename_prefix",
                "ComfyUI",
                "File name prefix; may contain subfolders of the output folder.",
            )
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("images")?;
        let prefix = inputs.string("filename_prefix")?;
        let entries = save_images(&images, &ctx.output_dir(), prefix, "output", ctx)?;
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "images": entries })),
        })
    }
}

struct PreviewImage;

impl Node for PreviewImage {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("PreviewImage", "Preview Image", "image")
            .description("Saves the images as PNGs in the temporary folder (the host's temp_dir setting, else the system's), for viewing.")
            .object("images", "IMAGE", "The images.")
            .output_node()
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("images")?;
        let temp = ctx
            .setting("temp_dir")
            .map(std::path::PathBuf::from)
            .unwrap_or_else(|| std::env::temp_dir().join("vdm-preview"));
        let prefix = format!("vdm_temp_{}", std::process::id());
        let entries = save_images(&images, &temp, &prefix, "temp", ctx)?;
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "images": entries })),
        })
    }
}

struct LoadImage;

impl Node for LoadImage {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadImage", "Load Image", "image")
            .description("Loads a PNG/JPEG image (every frame of a GIF) from the input folder, and the mask of its transparent pixels.")
            .string("image", "", "The image file, relative to the input folder.")
            .output("IMAGE", "IMAGE")
            .output("MASK", "MASK")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "image")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_input_path(ctx, inputs.string("image")?);
        // Every frame of an animated image, as ComfyUI's LoadImage.
        let options = LoadOptions::default();
        let (frames, _) = load_frames(ctx, "image", &path, options)?;
        let (count, height, width, _) = frames.dims4()?;
        let cpu = candle_core::Device::Cpu;
        // ComfyUI's mask: 1 where a still image is transparent; without an alpha channel, a
        // 64×64 block of zeros per frame.
        let mask = match load_alpha(&path, &options).for_input("image")? {
            Some(alpha) if count == 1 && alpha.len() == height * width => {
                (1.0 - Tensor::from_vec(alpha, (1, height, width), &cpu)?)?
            }
            _ => Tensor::zeros((count, 64, 64), DType::F32, &cpu)?,
        };
        Ok(Outputs {
            values: vec![Images { frames }.into_value(), Mask { mask }.into_value()],
            ui: None,
        })
    }
}
