//! `LoadVideoFile` and `SaveVideoFile`: frames in and out as ComfyUI IMAGE batches.

use serde_json::json;

use crate::video::io::{load_video, save_video, LoadOptions, MediaError, VideoFormat};

use super::memory::Bytes;

use super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, save_failure, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(LoadVideoFile), Box::new(SaveVideoFile)]
}

/// The frames of the video, frame folder or image at `path` and their rate, within the host
/// memory budget (frames are decoded into host memory, whatever the compute device); errors
/// name `input`.
pub(super) fn load_frames(
    ctx: &Context,
    input: &str,
    path: &std::path::Path,
    options: LoadOptions,
) -> Result<(candle_core::Tensor, f64), NodeFailure> {
    let budget = ctx.memory_budget(&candle_core::Device::Cpu);
    let options = LoadOptions {
        max_bytes: budget.limit.0,
        ..options
    };
    load_video(path, &options).map_err(|e| match e {
        MediaError::TooLarge { .. } => {
            NodeFailure::input(input, format!("{e} (the memory budget: {})", budget.source))
        }
        other => NodeFailure::input(input, other),
    })
}

struct LoadVideoFile;

impl Node for LoadVideoFile {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadVideoFile", "Load Video File", "vdm/video")
            .description("Loads frames from a folder of PNG/JPEG images, a GIF, or (with ffmpeg on PATH) an MP4/WebM/MOV/MKV file.")
            .string("video", "", "Path of the video file or frame folder, absolute or relative to the input folder.")
            .optional()
            .int("frame_load_cap", 0, 0, 100_000, "Load at most this many frames (0: all).")
            .int("skip_first_frames", 0, 0, 100_000, "Frames to skip at the start.")
            .int("select_every_nth", 1, 1, 1000, "Keep one frame in n.")
            .output("IMAGE", "IMAGE")
            .output("INT", "frame_count")
            .output("FLOAT", "fps")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "video")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_input_path(ctx, inputs.string("video")?);
        let options = LoadOptions {
            frame_load_cap: inputs.usize_or("frame_load_cap", 0)?,
            skip_first_frames: inputs.usize_or("skip_first_frames", 0)?,
            select_every_nth: inputs.usize_or("select_every_nth", 1)?,
            ..LoadOptions::default()
        };
        let (frames, fps) = load_frames(ctx, "video", &path, options)?;
        let count = frames.dim(0)? as i64;
        Ok(Outputs {
            values: vec![
                Images { frames }.into_value(),
                vdm_ffi::Value::Int(count),
                vdm_ffi::Value::Float(fps),
            ],
            ui: None,
        })
    }
}

struct SaveVideoFile;

impl Node for SaveVideoFile {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("SaveVideoFile", "Save Video File", "vdm/video")
            .description("Writes frames as an animated GIF, an animated PNG, or (with ffmpeg on PATH) an H.264 MP4, atomically, into the output folder.")
            .object("images", "IMAGE", "Frames to save.")
            .string("filename_prefix", "vdm", "File name prefix; may contain subfolders of the output folder.")
            .combo("format", &["gif", "png", "mp4"], "gif: animated GIF; png: animated PNG; mp4: H.264 (needs ffmpeg).")
            .float("fps", 8.0, (0.1, 240.0, 0.1), "Frames per second.")
            .optional()
            .int("loop_count", 0, 0, 100, "Times to play (0: forever).")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("images")?;
        let prefix = inputs.string("filename_prefix")?;
        let format: VideoFormat = inputs.string("format")?.parse().for_input("format")?;
        let fps = inputs.float("fps")?;
        let loop_count = inputs.usize_or("loop_count", 0)? as u32;
        // The frames as f32 values on the host, then as 8-bit ones, and the encoded file.
        let values = images.frames.elem_count() as u64;
        ctx.memory_budget(&candle_core::Device::Cpu).check(
            "images",
            &format!("saving {} frames", images.frames.dim(0)?),
            Bytes::of(values, 4 + 1 + 1),
        )?;
        let out_dir = ctx.output_dir();
        let path = save_video(&images.frames, &out_dir, prefix, format, fps, loop_count)
            .map_err(save_failure)?;
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "videos": [file_entry(&out_dir, &path)] })),
        })
    }
}
