//! ComfyUI's core video nodes (`LoadVideo`, `CreateVideo`, `GetVideoComponents`,
//! `SaveVideo`) on a `VIDEO` of frames, frame rate and sound.

use candle_core::Tensor;
use serde_json::json;

use crate::video::io::{save_h264, save_with_audio, Ffmpeg, H264Settings, LoadOptions};

use super::super::memory::Bytes;
use super::super::objects::{Audio, Video};
use super::super::video_io::load_frames;
use super::super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, save_failure, Context,
    DescriptorBuilder, Images, Inputs, Node, NodeFailure, Outputs, PluginType,
};
use super::vhs::{interleaved, load_audio};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(LoadVideo),
        Box::new(CreateVideo),
        Box::new(GetVideoComponents),
        Box::new(SaveVideo),
    ]
}

const CATEGORY: &str = "image/video";

struct LoadVideo;

impl Node for LoadVideo {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadVideo", "Load Video", CATEGORY)
            .description("A video file of the input folder (MP4/WebM/MOV/MKV through ffmpeg, GIF, or a folder of frames), with its sound.")
            .string("file", "", "The video file, relative to the input folder.")
            .output("VIDEO", "VIDEO")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "file")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_input_path(ctx, inputs.string("file")?);
        let (frames, fps) = load_frames(ctx, "file", &path, LoadOptions::default())?;
        let duration = frames.dim(0)? as f64 / fps;
        let audio =
            load_audio(&path, 0.0, duration).map_err(|e| NodeFailure::input("file", e.message))?;
        Ok(Outputs::one(Video { frames, fps, audio }.into_value()))
    }
}

struct CreateVideo;

impl Node for CreateVideo {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("CreateVideo", "Create Video", CATEGORY)
            .description("Create a video from images.")
            .object("images", "IMAGE", "The images to create a video from.")
            .float("fps", 30.0, (1.0, 120.0, 1.0), "Frames per second.")
            .optional()
            .object("audio", "AUDIO", "The audio to add to the video.")
            .output("VIDEO", "VIDEO")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("images")?;
        let audio = inputs.optional_object::<Audio>("audio")?.unwrap_or(Audio {
            waveform: None,
            sample_rate: 0,
        });
        let video = Video {
            frames: images.frames,
            fps: inputs.float("fps")?,
            audio,
        };
        Ok(Outputs::one(video.into_value()))
    }
}

struct GetVideoComponents;

impl Node for GetVideoComponents {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("GetVideoComponents", "Extract frame", CATEGORY)
            .description("Extracts all components from a video: frames, audio, and framerate.")
            .object("video", "VIDEO", "The video to extract components from.")
            .output("IMAGE", "images")
            .output("AUDIO", "audio")
            .output("FLOAT", "fps")
            .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let video: Video = inputs.object("video")?;
        Ok(Outputs {
            values: vec![
                Images {
                    frames: video.frames,
                }
                .into_value(),
                video.audio.into_value(),
                vdm_ffi::Value::Float(video.fps),
            ],
            ui: None,
        })
    }
}

struct SaveVideo;

impl Node for SaveVideo {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("SaveVideo", "Save Video", CATEGORY)
            .description("Saves the video as an H.264 MP4 (through ffmpeg) in the output folder; with sound, the file with sound is the one reported.")
            .object("video", "VIDEO", "The video to save.")
            .string("filename_prefix", "video/ComfyUI", "The prefix for the file to save; may contain subfolders of the output folder.")
            .combo("format", &["auto", "mp4"], "The format to save the video as.")
            .combo("codec", &["auto", "h264"], "The codec to use for the video.")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let video: Video = inputs.object("video")?;
        let prefix = inputs.string("filename_prefix")?;
        let ffmpeg = Ffmpeg::default();
        if !ffmpeg.is_available() {
            return Err(NodeFailure::input(
                "format",
                "MP4 needs ffmpeg on PATH (Debian: apt install ffmpeg)",
            ));
        }
        let frames: &Tensor = &video.frames;
        ctx.memory_budget(&candle_core::Device::Cpu).check(
            "video",
            &format!("saving {} frames", frames.dim(0)?),
            Bytes::of(frames.elem_count() as u64, 4 + 1 + 1),
        )?;
        let out_dir = ctx.output_dir();
        let silent = save_h264(
            frames,
            &out_dir,
            prefix,
            video.fps,
            0,
            &H264Settings::default(),
            &ffmpeg,
        )
        .map_err(save_failure)?;
        let path = match interleaved(&video.audio)? {
            Some(sound) => save_with_audio(&silent, &sound, None, &ffmpeg).map_err(save_failure)?,
            None => silent,
        };
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "images": [file_entry(&out_dir, &path)], "animated": [true] })),
        })
    }
}
