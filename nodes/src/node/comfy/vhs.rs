//! Video Helper Suite's loaders and saver (`VHS_LoadVideo`, `VHS_LoadImages`,
//! `VHS_VideoCombine`), with the class names, inputs, defaults, ranges and outputs of
//! ComfyUI-VideoHelperSuite at commit 4ee72c065db22c9d96c2427954dc69e7b908444b, so that
//! AnimateDiff workflows made with it run unchanged.
//!
//! Where vdm differs from the reference:
//! - `video` and `directory` are paths (absolute, or relative to the input folder) rather than
//!   a list of the input folder's entries; API-format workflows carry the same strings.
//! - Frames are loaded by vdm's decoders. The source's frames are counted first (a video's
//!   packets by ffprobe; a GIF's frames decoded one at a time), its frames resampled by
//!   `force_rate` and selected by `skip_first_frames`, `select_every_nth` and
//!   `frame_load_cap` in the reference's order, and only the stretch of frames wanted is then
//!   decoded. Resizing cuts the centre to the new aspect ratio and resamples bicubically (the
//!   reference uses Lanczos).
//! - A folder of images holds PNG/JPEG frames in natural name order (`frame_2` before
//!   `frame_10`), all of one size.
//! - Sound: Load Video reads the audio stream of video containers through ffmpeg when it is
//!   installed (eagerly; the reference reads it when first used). Its `AUDIO` output has no
//!   waveform for GIF/PNG sources, files without sound, or without ffmpeg. Video Combine adds
//!   a waveform to MP4 output as the reference does (`{name}-audio.mp4` beside the silent
//!   file, AAC) and ignores audio for the image formats.
//! - Video Combine writes no first-frame PNG beside the video (the reference's
//!   `VHS_MetadataImage` off); files are named `{prefix}_{counter:05}_.{ext}` and written
//!   atomically, like every vdm output. The batch manager (`meta_batch`) and the latent paths
//!   (`vae`) are refused with an error naming the input.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use serde_json::json;

use crate::node::memory::Bytes;
use crate::node::objects::{Audio, Filenames, Mask, VideoInfo};
use crate::node::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Node, NodeFailure, Outputs, PluginType,
};
use crate::video::io::{
    count_frames, custom_size, force_rate_indices, frame_folder_files, load_alpha, load_video,
    resize_frames, save_h264, save_video, save_webp, save_with_audio, select_frames, AudioSamples,
    Ffmpeg, H264Settings, LoadOptions, MediaError, VideoFormat, WebpSettings,
    FFMPEG_VIDEO_EXTENSIONS,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(LoadVideo),
        Box::new(LoadImages),
        Box::new(VideoCombine),
    ]
}

const CATEGORY: &str = "Video Helper Suite 🎥🅥🅗🅢";

/// The reference's `BIGMAX`: the largest integer a JavaScript number holds exactly.
const BIG_MAX: i64 = (1 << 53) - 1;

/// The reference's `DIMMAX`: the largest custom width or height.
const DIM_MAX: i64 = 8192;

/// A load format of the reference's Load Video: the multiple that sizes are rounded to and,
/// for some video models, the frame counts they take (`count % step == remainder`; longer
/// loads are cut to the nearest such count below).
struct LoadFormat {
    name: &'static str,
    size_multiple: usize,
    frame_rule: Option<(usize, usize)>,
}

const LOAD_FORMATS: [LoadFormat; 7] = [
    LoadFormat {
        name: "None",
        size_multiple: 1,
        frame_rule: None,
    },
    LoadFormat {
        name: "AnimateDiff",
        size_multiple: 8,
        frame_rule: None,
    },
    LoadFormat {
        name: "Mochi",
        size_multiple: 16,
        frame_rule: Some((6, 1)),
    },
    LoadFormat {
        name: "LTXV",
        size_multiple: 32,
        frame_rule: Some((8, 1)),
    },
    LoadFormat {
        name: "Hunyuan",
        size_multiple: 16,
        frame_rule: Some((4, 1)),
    },
    LoadFormat {
        name: "Cosmos",
        size_multiple: 16,
        frame_rule: Some((8, 1)),
    },
    LoadFormat {
        name: "Wan",
        size_multiple: 8,
        frame_rule: Some((4, 1)),
    },
];

/// Refuses a linked input that vdm does not support, naming it.
fn refuse_if_given(inputs: &Inputs, input: &str, reason: &str) -> Result<(), NodeFailure> {
    match inputs.get(input) {
        Some(_) => Err(NodeFailure::input(input, reason)),
        None => Ok(()),
    }
}

const NO_BATCH_MANAGER: &str =
    "the batch manager (VHS_BatchManager) is not supported; load the clip in one piece";

/// A load failure of `input`, with the memory budget named when that is what refused it.
fn load_failure(input: &str, error: MediaError, ctx: &Context) -> NodeFailure {
    match error {
        MediaError::TooLarge { .. } => {
            let budget = ctx.memory_budget(&Device::Cpu);
            NodeFailure::input(
                input,
                format!("{error} (the memory budget: {})", budget.source),
            )
        }
        other => NodeFailure::input(input, other),
    }
}

/// `VHS_LoadVideo`: frames of a video or animated image, resampled, selected and resized as
/// the reference does, with the frame count, its sound and the video info.
struct LoadVideo;

impl Node for LoadVideo {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let formats: Vec<&str> = LOAD_FORMATS.iter().map(|f| f.name).collect();
        DescriptorBuilder::new("VHS_LoadVideo", "Load Video (Upload) 🎥🅥🅗🅢", CATEGORY)
            .description("Loads the frames of a video (GIF, animated PNG, or with ffmpeg MP4/WebM/MOV/MKV), optionally at another frame rate and size.")
            .string("video", "", "Path of the video, absolute or relative to the input folder.")
            .float("force_rate", 0.0, (0.0, 60.0, 1.0), "Resample to this many frames per second by dropping or repeating frames (0: the source rate).")
            .int("custom_width", 0, 0, DIM_MAX, "Output width (0: from custom_height keeping the aspect ratio, or the source width).")
            .int("custom_height", 0, 0, DIM_MAX, "Output height (0: from custom_width keeping the aspect ratio, or the source height).")
            .int("frame_load_cap", 0, 0, BIG_MAX, "Load at most this many frames (0: all).")
            .int("skip_first_frames", 0, 0, BIG_MAX, "Frames to skip at the start (after resampling).")
            .int("select_every_nth", 1, 1, BIG_MAX, "Keep one frame in n.")
            .optional()
            .object("meta_batch", "VHS_BatchManager", "Not supported by vdm.")
            .object("vae", "VAE", "Not supported by vdm: encode the frames with VAEEncode.")
            .combo_with_default("format", &formats, "AnimateDiff", "Round sizes to this model's multiple (AnimateDiff: 8) and cut frame counts to the ones it takes.")
            .output("IMAGE", "IMAGE")
            .output("INT", "frame_count")
            .output("AUDIO", "audio")
            .output("VHS_VIDEOINFO", "video_info")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "video")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        refuse_if_given(inputs, "meta_batch", NO_BATCH_MANAGER)?;
        refuse_if_given(
            inputs,
            "vae",
            "loading straight to latents is not supported; encode the IMAGE output with VAEEncode",
        )?;
        let path = resolve_input_path(ctx, inputs.string("video")?);
        let force_rate = inputs.float("force_rate")?;
        if !(force_rate.is_finite() && force_rate >= 0.0) {
            return Err(NodeFailure::input(
                "force_rate",
                format!("must be 0 or a positive rate, got {force_rate}"),
            ));
        }
        let custom_width = inputs.usize("custom_width")?;
        let custom_height = inputs.usize("custom_height")?;
        let selection = LoadOptions {
            frame_load_cap: inputs.usize("frame_load_cap")?,
            skip_first_frames: inputs.usize("skip_first_frames")?,
            select_every_nth: inputs.usize("select_every_nth")?,
            max_bytes: u64::MAX,
        };
        if selection.select_every_nth == 0 {
            return Err(NodeFailure::input("select_every_nth", "must be at least 1"));
        }
        // The reference's default when the input is absent is "None"; its editor's is
        // "AnimateDiff".
        let format_name = match inputs.get("format") {
            Some(_) => inputs.string("format")?,
            None => "None",
        };
        let format = LOAD_FORMATS
            .iter()
            .find(|f| f.name == format_name)
            .ok_or_else(|| {
                let names: Vec<&str> = LOAD_FORMATS.iter().map(|f| f.name).collect();
                NodeFailure::input(
                    "format",
                    format!("unknown load format {format_name:?}; expected one of {names:?}"),
                )
            })?;

        // The source is counted first, so that only the stretch of frames wanted is decoded.
        let budget = ctx.memory_budget(&Device::Cpu);
        let limits = LoadOptions {
            max_bytes: budget.limit.0,
            ..LoadOptions::default()
        };
        let (source_count, source_fps) =
            count_frames(&path, &limits).map_err(|e| load_failure("video", e, ctx))?;
        let sequence = force_rate_indices(source_count, source_fps, force_rate);
        let mut chosen = select_frames(&sequence, &selection);
        if let Some((step, remainder)) = format.frame_rule {
            if chosen.len() < remainder {
                chosen.clear();
            } else {
                let usable = (chosen.len() - remainder) / step * step + remainder;
                chosen.truncate(usable);
            }
        }
        let (Some(&first), Some(&last)) = (chosen.first(), chosen.last()) else {
            return Err(NodeFailure::input(
                "video",
                format!(
                    "no frames left: {source_count} source frames, {} after force_rate, none \
                     kept by skip_first_frames / select_every_nth / frame_load_cap{}",
                    sequence.len(),
                    if format.frame_rule.is_some() {
                        format!(" and the frame counts of format {}", format.name)
                    } else {
                        String::new()
                    }
                ),
            ));
        };
        // Without resampling the selection is the decoders' own; with it, the stretch from
        // the first frame shown to the last is decoded and frames are picked (or repeated)
        // from it.
        let (stretch, offset) = if force_rate > 0.0 {
            let stretch = LoadOptions {
                skip_first_frames: first,
                frame_load_cap: last - first + 1,
                ..limits
            };
            (stretch, first)
        } else {
            let exact = LoadOptions {
                frame_load_cap: chosen.len(),
                max_bytes: limits.max_bytes,
                ..selection
            };
            (exact, 0)
        };
        let (loaded, _) = load_video(&path, &stretch).map_err(|e| load_failure("video", e, ctx))?;
        let (loaded_frames, source_height, source_width, _) = loaded.dims4()?;
        let frames = if force_rate > 0.0 {
            // A count that overestimated the decodable frames leaves fewer to pick from.
            let picks: Vec<u32> = chosen
                .iter()
                .map(|&source| source - offset)
                .take_while(|&position| position < loaded_frames)
                .map(|position| position as u32)
                .collect();
            chosen.truncate(picks.len());
            let count = picks.len();
            loaded.index_select(&Tensor::from_vec(picks, count, &Device::Cpu)?, 0)?
        } else {
            chosen.truncate(loaded_frames);
            loaded
        };
        if chosen.is_empty() {
            return Err(NodeFailure::input(
                "video",
                format!("counted {source_count} frames but none of those wanted could be decoded"),
            ));
        }

        let (width, height) = custom_size(
            (source_width, source_height),
            custom_width,
            custom_height,
            format.size_multiple,
        );
        if width == 0 || height == 0 {
            let input = match (custom_width, custom_height) {
                (0, 0) => "format",
                (0, _) => "custom_height",
                _ => "custom_width",
            };
            return Err(NodeFailure::input(
                input,
                format!(
                    "gives a {width}×{height} frame from the {source_width}×{source_height} source"
                ),
            ));
        }
        let frames = resize_frames(&frames, width, height)?;

        let loaded_count = chosen.len();
        let info = video_info(
            (source_count, source_fps, source_width, source_height),
            force_rate,
            selection.select_every_nth,
            (loaded_count, width, height),
        );
        // The sound of the loaded stretch, as the reference cuts it: from the skipped frames'
        // time, for frame_load_cap frames (0: to the end).
        let rate = if force_rate > 0.0 {
            force_rate
        } else {
            source_fps
        };
        let audio = load_audio(
            &path,
            selection.skip_first_frames as f64 / rate,
            selection
                .frame_load_cap
                .saturating_mul(selection.select_every_nth) as f64
                / rate,
        )?;
        Ok(Outputs {
            values: vec![
                Images { frames }.into_value(),
                vdm_ffi::Value::Int(loaded_count as i64),
                audio.into_value(),
                info.into_value(),
            ],
            ui: None,
        })
    }
}

/// The sound of a video container from `start` seconds for `duration` seconds (0: to the end).
/// Files that cannot hold sound (GIF, PNG, frame folders), files without an audio stream or
/// with none in that stretch, and any file when ffmpeg is not installed give an audio without
/// a waveform.
pub(super) fn load_audio(path: &Path, start: f64, duration: f64) -> Result<Audio, NodeFailure> {
    let silent = Audio {
        waveform: None,
        sample_rate: 0,
    };
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    if path.is_dir() || !FFMPEG_VIDEO_EXTENSIONS.contains(&extension.as_str()) {
        return Ok(silent);
    }
    let samples = match Ffmpeg::default().decode_audio(path, start, duration) {
        Ok(Some(samples)) if !samples.samples.is_empty() => samples,
        Ok(_) | Err(MediaError::FfmpegMissing { .. }) => return Ok(silent),
        Err(other) => return Err(NodeFailure::input("video", other)),
    };
    let count = samples.samples.len() / samples.channels;
    let waveform = Tensor::from_vec(samples.samples, (count, samples.channels), &Device::Cpu)?
        .t()?
        .unsqueeze(0)?
        .contiguous()?;
    Ok(Audio {
        waveform: Some(waveform),
        sample_rate: samples.sample_rate,
    })
}

/// An `AUDIO` waveform (batch, channels, samples) as the interleaved samples of its first
/// batch entry.
pub(super) fn interleaved(audio: &Audio) -> Result<Option<AudioSamples>, NodeFailure> {
    let Some(waveform) = &audio.waveform else {
        return Ok(None);
    };
    let (_, channels, _) = waveform.dims3().for_input("audio")?;
    if channels == 0 || audio.sample_rate == 0 {
        return Ok(None);
    }
    let samples = waveform
        .get(0)?
        .t()?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    Ok(Some(AudioSamples {
        samples,
        channels,
        sample_rate: audio.sample_rate,
    }))
}

/// The reference's video info: the source's numbers, and the loaded frames' rate (the forced
/// or source rate divided by `select_every_nth`) and duration (count × frame time).
fn video_info(
    (source_count, source_fps, source_width, source_height): (usize, f64, usize, usize),
    force_rate: f64,
    select_every_nth: usize,
    (loaded_count, loaded_width, loaded_height): (usize, usize, usize),
) -> VideoInfo {
    let rate = if force_rate > 0.0 {
        force_rate
    } else {
        source_fps
    };
    let frame_time = select_every_nth as f64 / rate;
    VideoInfo {
        source_fps,
        source_frame_count: source_count,
        source_duration: source_count as f64 / source_fps,
        source_width,
        source_height,
        loaded_fps: 1.0 / frame_time,
        loaded_frame_count: loaded_count,
        loaded_duration: loaded_count as f64 * frame_time,
        loaded_width,
        loaded_height,
    }
}

/// `VHS_LoadImages`: the frames of a folder of images, with ComfyUI's mask (1 where
/// transparent) and the frame count.
struct LoadImages;

impl LoadImages {
    fn folder(inputs: &Inputs, ctx: &Context) -> Result<PathBuf, NodeFailure> {
        let given = inputs.string("directory")?;
        let path = resolve_input_path(ctx, given);
        if !path.is_dir() {
            let what = if path.exists() {
                "is not a folder"
            } else {
                "not found"
            };
            return Err(NodeFailure::input(
                "directory",
                format!("`{given}` {what} (looked at {})", path.display()),
            ));
        }
        Ok(path)
    }

    /// 1 − alpha of the chosen frame files, when any has an alpha channel.
    fn transparency(
        folder: &Path,
        options: &LoadOptions,
        (count, height, width): (usize, usize, usize),
    ) -> Result<Tensor, NodeFailure> {
        let files = frame_folder_files(folder).for_input("directory")?;
        let positions: Vec<usize> = (0..files.len()).collect();
        let chosen = select_frames(&positions, options);
        let mut alphas = Vec::with_capacity(chosen.len());
        for &index in &chosen {
            alphas.push(load_alpha(&files[index], options).for_input("directory")?);
        }
        let cpu = Device::Cpu;
        if alphas.iter().all(Option::is_none) || alphas.len() != count {
            return Ok(Tensor::zeros((count, 64, 64), DType::F32, &cpu)?);
        }
        let mut mask = Vec::with_capacity(count * height * width);
        for alpha in alphas {
            match alpha {
                Some(values) if values.len() == height * width => {
                    mask.extend(values.iter().map(|a| 1.0 - a))
                }
                _ => mask.extend(std::iter::repeat_n(0.0f32, height * width)),
            }
        }
        Ok(Tensor::from_vec(mask, (count, height, width), &cpu)?)
    }
}

impl Node for LoadImages {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VHS_LoadImages", "Load Images (Upload) 🎥🅥🅗🅢", CATEGORY)
            .description("Loads a folder of PNG/JPEG frames (natural name order, all one size) as an IMAGE batch with its transparency mask.")
            .string("directory", "", "Path of the folder, absolute or relative to the input folder.")
            .optional()
            .int("image_load_cap", 0, 0, BIG_MAX, "Load at most this many images (0: all).")
            .int("skip_first_images", 0, 0, BIG_MAX, "Images to skip at the start.")
            .int("select_every_nth", 1, 1, BIG_MAX, "Keep one image in n.")
            .object("meta_batch", "VHS_BatchManager", "Not supported by vdm.")
            .output("IMAGE", "IMAGE")
            .output("MASK", "MASK")
            .output("INT", "frame_count")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        let Some(vdm_ffi::Value::Str(_)) = inputs.get("directory") else {
            return Vec::new();
        };
        match Self::folder(inputs, ctx) {
            Ok(folder) => match frame_folder_files(&folder) {
                Ok(_) => Vec::new(),
                Err(e) => vec![NodeFailure::input("directory", e)],
            },
            Err(failure) => vec![failure],
        }
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        refuse_if_given(inputs, "meta_batch", NO_BATCH_MANAGER)?;
        let folder = Self::folder(inputs, ctx)?;
        let budget = ctx.memory_budget(&Device::Cpu);
        let options = LoadOptions {
            frame_load_cap: inputs.usize_or("image_load_cap", 0)?,
            skip_first_frames: inputs.usize_or("skip_first_images", 0)?,
            select_every_nth: inputs.usize_or("select_every_nth", 1)?,
            max_bytes: budget.limit.0,
        };
        if options.select_every_nth == 0 {
            return Err(NodeFailure::input("select_every_nth", "must be at least 1"));
        }
        let (frames, _) =
            load_video(&folder, &options).map_err(|e| load_failure("directory", e, ctx))?;
        let (count, height, width, _) = frames.dims4()?;
        let mask = Self::transparency(&folder, &options, (count, height, width))?;
        Ok(Outputs {
            values: vec![
                Images { frames }.into_value(),
                Mask { mask }.into_value(),
                vdm_ffi::Value::Int(count as i64),
            ],
            ui: None,
        })
    }
}

/// The output formats of Video Combine that vdm writes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum CombineFormat {
    Gif,
    Webp,
    H264Mp4,
}

impl CombineFormat {
    const NAMES: [&'static str; 3] = ["image/gif", "image/webp", "video/h264-mp4"];

    fn parse(name: &str) -> Result<Self, NodeFailure> {
        match name {
            "image/gif" => Ok(Self::Gif),
            "image/webp" => Ok(Self::Webp),
            "video/h264-mp4" => Ok(Self::H264Mp4),
            other => Err(NodeFailure::input(
                "format",
                format!(
                    "{other:?} is not a format vdm writes; expected one of {:?}",
                    Self::NAMES
                ),
            )),
        }
    }
}

/// The frames played forwards then backwards, without repeating either end: the reference's
/// `pingpong` (n frames become 2n − 2).
fn pingpong_order(count: usize) -> Vec<u32> {
    let forward = 0..count as u32;
    let backward = (1..count.saturating_sub(1) as u32).rev();
    forward.chain(backward).collect()
}

/// `VHS_VideoCombine`: writes frames as an animated GIF or WebP or an H.264 MP4 into the
/// output folder (or the temporary folder), reporting the file as the reference's `gifs`.
struct VideoCombine;

impl VideoCombine {
    /// Where outputs go: the output folder, or with `save_output` off the host's `temp_dir`,
    /// else the system's temporary folder.
    fn folder(ctx: &Context, save_output: bool) -> PathBuf {
        if save_output {
            ctx.output_dir()
        } else {
            ctx.setting("temp_dir")
                .map(PathBuf::from)
                .unwrap_or_else(std::env::temp_dir)
        }
    }
}

impl Node for VideoCombine {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VHS_VideoCombine", "Video Combine 🎥🅥🅗🅢", CATEGORY)
            .description("Writes frames as an animated GIF or WebP, or an H.264 MP4 (WebP and MP4 need ffmpeg), atomically.")
            .object("images", "IMAGE", "Frames to write.")
            .float("frame_rate", 8.0, (1.0, f64::MAX, 1.0), "Frames per second.")
            .int("loop_count", 0, 0, 100, "GIF/WebP: times to repeat (0: forever); MP4: extra copies of the clip.")
            .string("filename_prefix", "AnimateDiff", "File name prefix; may contain subfolders of the output folder.")
            .combo("format", &CombineFormat::NAMES, "image/gif, image/webp (animated, through ffmpeg) or video/h264-mp4 (ffmpeg).")
            .boolean("pingpong", false, "Play the clip forwards then backwards.")
            .boolean("save_output", true, "Write to the output folder; off: to the temporary folder.")
            .optional()
            .object("audio", "AUDIO", "Sound for the video; vdm does not mux sound and accepts only an empty audio.")
            .object("meta_batch", "VHS_BatchManager", "Not supported by vdm.")
            .object("vae", "VAE", "Not supported by vdm: decode latents with VAEDecode.")
            .combo("pix_fmt", &["yuv420p", "yuv420p10le"], "video/h264-mp4: pixel format.")
            .int("crf", 19, 0, 100, "video/h264-mp4: constant rate factor (lower is better).")
            .boolean("save_metadata", true, "video/h264-mp4: accepted for compatibility; vdm writes no workflow metadata.")
            .boolean("trim_to_audio", false, "video/h264-mp4: accepted for compatibility (no sound is muxed).")
            .boolean("lossless", true, "image/webp: lossless, else lossy at quality 80.")
            .output("VHS_FILENAMES", "Filenames")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        refuse_if_given(inputs, "meta_batch", NO_BATCH_MANAGER)?;
        refuse_if_given(
            inputs,
            "vae",
            "saving from latents is not supported; decode them with VAEDecode first",
        )?;
        let images: Images = inputs.object("images")?;
        let frame_rate = inputs.float("frame_rate")?;
        if !(frame_rate.is_finite() && frame_rate > 0.0) {
            return Err(NodeFailure::input(
                "frame_rate",
                format!("must be a positive rate, got {frame_rate}"),
            ));
        }
        let loop_count = u32::try_from(inputs.usize("loop_count")?)
            .map_err(|_| NodeFailure::input("loop_count", "is too large"))?;
        let prefix = inputs.string("filename_prefix")?;
        let format_name = inputs.string("format")?;
        let format = CombineFormat::parse(format_name)?;
        let pingpong = inputs.bool("pingpong")?;
        let save_output = inputs.bool("save_output")?;
        // Image formats carry no sound, so the reference ignores the audio for them.
        let sound = match inputs.optional_object::<Audio>("audio")? {
            Some(audio) if format == CombineFormat::H264Mp4 => interleaved(&audio)?,
            _ => None,
        };

        let mut frames = images.frames;
        if pingpong {
            let order = pingpong_order(frames.dim(0)?);
            let count = order.len();
            frames = frames.index_select(&Tensor::from_vec(order, count, frames.device())?, 0)?;
        }
        // The frames as f32 values on the host, then as 8-bit ones, and the encoded file.
        ctx.memory_budget(&Device::Cpu).check(
            "images",
            &format!("saving {} frames", frames.dim(0)?),
            Bytes::of(frames.elem_count() as u64, 4 + 1 + 1),
        )?;

        let folder = Self::folder(ctx, save_output);
        let ffmpeg = Ffmpeg::default();
        let saved = match format {
            CombineFormat::Gif => save_video(
                &frames,
                &folder,
                prefix,
                VideoFormat::Gif,
                frame_rate,
                loop_count,
            ),
            CombineFormat::Webp => {
                let settings = WebpSettings {
                    lossless: inputs.bool_or("lossless", true)?,
                    quality: 80,
                };
                save_webp(
                    &frames, &folder, prefix, frame_rate, loop_count, &settings, &ffmpeg,
                )
            }
            CombineFormat::H264Mp4 => {
                let settings = H264Settings {
                    crf: u32::try_from(inputs.usize_or("crf", 19)?)
                        .map_err(|_| NodeFailure::input("crf", "is too large"))?,
                    pix_fmt: match inputs.get("pix_fmt") {
                        Some(_) => inputs.string("pix_fmt")?.to_owned(),
                        None => "yuv420p".to_owned(),
                    },
                };
                save_h264(
                    &frames, &folder, prefix, frame_rate, loop_count, &settings, &ffmpeg,
                )
            }
        };
        let failure = |e: MediaError| match e {
            MediaError::Prefix { .. } => NodeFailure::input("filename_prefix", e),
            MediaError::FfmpegMissing { .. } => {
                NodeFailure::input("format", format!("{format_name} needs ffmpeg: {e}"))
            }
            other => NodeFailure::execution(other),
        };
        let mut paths = vec![saved.map_err(failure)?];
        if let Some(sound) = sound {
            // Unless trimmed to the sound, a shorter sound is padded with silence to a second
            // past the frames, so the video keeps its length.
            let pad_to = if inputs.bool_or("trim_to_audio", false)? {
                None
            } else {
                Some(frames.dim(0)? as f64 / frame_rate + 1.0)
            };
            let with_sound = save_with_audio(&paths[0], &sound, pad_to, &ffmpeg);
            paths.push(with_sound.map_err(failure)?);
        }
        // The report names the last file written: the one with sound when there is one.
        let path = paths[paths.len() - 1].clone();
        let mut entry = file_entry(&folder, &path);
        entry["type"] = json!(if save_output { "output" } else { "temp" });
        entry["format"] = json!(format_name);
        // The reference reports the rate as the workflow gave it, an integer for a whole rate
        // (the host hands this input over as a float).
        entry["frame_rate"] = if frame_rate.fract() == 0.0 && frame_rate <= i64::MAX as f64 {
            json!(frame_rate as i64)
        } else {
            json!(frame_rate)
        };
        let filenames = Filenames { save_output, paths };
        Ok(Outputs {
            values: vec![filenames.into_value()],
            ui: Some(json!({ "gifs": [entry] })),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn pingpong_skips_both_ends_on_the_way_back() {
        assert_eq!(pingpong_order(4), vec![0, 1, 2, 3, 2, 1]);
        assert_eq!(pingpong_order(2), vec![0, 1]);
        assert_eq!(pingpong_order(1), vec![0]);
    }

    #[test]
    fn video_info_reports_source_and_loaded_numbers() {
        let info = video_info((12, 10.0, 40, 24), 5.0, 2, (2, 20, 12));
        assert_eq!(info.source_frame_count, 12);
        assert!((info.source_duration - 1.2).abs() < 1e-12);
        assert!((info.loaded_fps - 2.5).abs() < 1e-12);
        assert!((info.loaded_duration - 0.8).abs() < 1e-12);
        assert_eq!((info.loaded_width, info.loaded_height), (20, 12));
        let unforced = video_info((12, 10.0, 40, 24), 0.0, 1, (12, 40, 24));
        assert!((unforced.loaded_fps - 10.0).abs() < 1e-12);
        assert!((unforced.loaded_duration - 1.2).abs() < 1e-12);
    }
}
