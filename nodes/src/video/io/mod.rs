//! Frames in and out.
//!
//! Frames travel in ComfyUI's IMAGE layout: a (frames, height, width, 3) f32 tensor on the CPU
//! with values in [0, 1]. [`load_video`] reads a folder of PNG/JPEG frames, a GIF, an (animated)
//! PNG, a single JPEG, or MP4/WebM/MOV/MKV/AVI through `ffmpeg`; [`save_video`] writes GIF,
//! animated PNG or H.264 MP4.
//!
//! Output files are named as ComfyUI names them, `{prefix}_{counter:05}_.{ext}`, with the counter
//! one past the highest already in the folder; the prefix may name subfolders of the output
//! folder but never leave it. Every output is written to a hidden temporary file next to its
//! final name and moved there only once complete ([`save_atomically`], shared with the latent
//! files), so a failed save leaves nothing behind.
//!
//! - `load`: decoding frame folders, GIF, (animated) PNG and still images.
//! - `save`: encoding GIF and APNG, and the atomic write every output goes through.
//! - `ffmpeg`: finding and running `ffmpeg`/`ffprobe` for the other video containers.
//! - `naming`: output file names from `filename_prefix` and the counter.
//! - `conform`: VideoHelperSuite's frame-rate resampling and output sizes for loaded frames.

mod conform;
mod ffmpeg;
mod load;
mod naming;
mod save;

use std::fmt;
use std::fs;
use std::path::{Path, PathBuf};
use std::str::FromStr;

use candle_core::Tensor;

pub use conform::{custom_size, force_rate_indices, resize_frames, select_frames};

pub use ffmpeg::{AudioSamples, Ffmpeg, H264Settings, WebpSettings};
pub use load::{frame_folder_files, load_alpha, natural_cmp};
pub use naming::{next_counter, resolve_prefix};
pub use save::{save_atomically, save_companion};

use load::{count_gif, count_png, load_frame_folder, load_gif, load_png, load_still};
use save::{write_apng, write_gif, Rgb8Frames};

/// Frame rate reported for inputs that carry none (frame folders, still images).
pub const DEFAULT_FPS: f64 = 8.0;

/// File extensions read as a video through `ffmpeg`.
pub const FFMPEG_VIDEO_EXTENSIONS: [&str; 6] = ["mp4", "webm", "mov", "mkv", "avi", "m4v"];

/// Everything that can go wrong reading or writing frames and output files.
#[derive(Debug, thiserror::Error)]
pub enum MediaError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot decode {}: {message}", path.display())]
    Decode { path: PathBuf, message: String },
    #[error("cannot encode {}: {message}", path.display())]
    Encode { path: PathBuf, message: String },
    #[error(
        "{} is {found_width}x{found_height} but the first frame {} is {width}x{height}; all frames must have the same size",
        path.display(), first.display()
    )]
    FrameSize {
        path: PathBuf,
        first: PathBuf,
        width: u32,
        height: u32,
        found_width: u32,
        found_height: u32,
    },
    #[error("{}: {reason}", path.display())]
    NoFrames { path: PathBuf, reason: String },
    #[error(
        "{}: {frames} frames of {width}×{height} would take {} MiB, over the {} MiB allowed; \
         load fewer (frame_load_cap, select_every_nth)",
        path.display(), needed >> 20, limit >> 20
    )]
    TooLarge {
        path: PathBuf,
        frames: usize,
        width: u32,
        height: u32,
        needed: u64,
        limit: u64,
    },
    #[error(
        "{}: unsupported file type; expected a folder of PNG/JPEG frames, .gif, .png, .jpg/.jpeg, or a video (.mp4, .webm, .mov, .mkv, .avi, .m4v)",
        path.display()
    )]
    Unsupported { path: PathBuf },
    #[error("`{program}` was not found on PATH; install ffmpeg (for example `apt-get install ffmpeg`) to {purpose}")]
    FfmpegMissing { program: String, purpose: String },
    #[error("{program} failed on {}: {message}", path.display())]
    Ffmpeg {
        program: String,
        path: PathBuf,
        message: String,
    },
    #[error("filename_prefix {prefix:?} {reason}")]
    Prefix { prefix: String, reason: String },
    #[error("latent file {}: {message}", path.display())]
    LatentFile { path: PathBuf, message: String },
    #[error("motion file {}: {message}", path.display())]
    MotionFile { path: PathBuf, message: String },
    #[error("{0}")]
    Invalid(String),
    #[error(transparent)]
    Candle(#[from] candle_core::Error),
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> MediaError + '_ {
    move |source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Which frames of the source to load, as ComfyUI-VideoHelperSuite's Load Video/Load Images:
/// drop the first `skip_first_frames`, keep every `select_every_nth` of the rest, stop after
/// `frame_load_cap` kept frames (0 = no cap). Decoding stops with [`MediaError::TooLarge`]
/// before the loaded frames would take more than `max_bytes`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub frame_load_cap: usize,
    pub skip_first_frames: usize,
    pub select_every_nth: usize,
    pub max_bytes: u64,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            frame_load_cap: 0,
            skip_first_frames: 0,
            select_every_nth: 1,
            max_bytes: u64::MAX,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum FrameChoice {
    Skip,
    Take,
    Done,
}

impl LoadOptions {
    fn validate(&self) -> Result<(), MediaError> {
        if self.select_every_nth == 0 {
            return Err(MediaError::Invalid(
                "select_every_nth must be at least 1".to_string(),
            ));
        }
        Ok(())
    }

    fn choose(&self, source_index: usize) -> FrameChoice {
        let Some(after_skip) = source_index.checked_sub(self.skip_first_frames) else {
            return FrameChoice::Skip;
        };
        if after_skip % self.select_every_nth != 0 {
            return FrameChoice::Skip;
        }
        let kept_before = after_skip / self.select_every_nth;
        if self.frame_load_cap > 0 && kept_before >= self.frame_load_cap {
            FrameChoice::Done
        } else {
            FrameChoice::Take
        }
    }
}

/// Output container for [`save_video`].
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum VideoFormat {
    /// Animated GIF (256 colours per frame).
    Gif,
    /// Animated PNG (lossless), as ComfyUI's SaveAnimatedPNG.
    Png,
    /// H.264 (yuv420p) in MP4, through `ffmpeg`.
    Mp4,
}

impl VideoFormat {
    /// The names accepted by [`FromStr`], in the order a node's combo input lists them.
    pub const NAMES: [&'static str; 3] = ["gif", "png", "mp4"];

    pub fn extension(self) -> &'static str {
        match self {
            VideoFormat::Gif => "gif",
            VideoFormat::Png => "png",
            VideoFormat::Mp4 => "mp4",
        }
    }
}

impl fmt::Display for VideoFormat {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.extension())
    }
}

impl FromStr for VideoFormat {
    type Err = MediaError;

    fn from_str(name: &str) -> Result<Self, Self::Err> {
        match name {
            "gif" | "image/gif" => Ok(VideoFormat::Gif),
            "png" | "apng" | "image/png" => Ok(VideoFormat::Png),
            "mp4" | "h264-mp4" | "video/h264-mp4" => Ok(VideoFormat::Mp4),
            other => Err(MediaError::Invalid(format!(
                "unknown video format {other:?}: expected one of gif, png, mp4"
            ))),
        }
    }
}

/// Loads frames as a (frames, height, width, 3) f32 CPU tensor in [0, 1] and the frame rate of
/// the loaded frames (the source rate divided by `select_every_nth`; [`DEFAULT_FPS`] for
/// sources without one).
///
/// `path` is a folder of PNG/JPEG frames (other files are ignored; sorted naturally by name, so
/// `frame_2` comes before `frame_10`; all the same size), a GIF or animated PNG (every frame,
/// composited), a still PNG/JPEG (one frame), or a video that `ffmpeg` reads. Transparency is
/// dropped, as PIL's `convert("RGB")` does.
pub fn load_video(path: &Path, options: &LoadOptions) -> Result<(Tensor, f64), MediaError> {
    load_video_with(path, options, &Ffmpeg::default())
}

/// The number of frames [`load_video`] reads from `path` with default options and their
/// rate, without keeping the frames: a folder's frame files; a GIF's or animated PNG's frames,
/// decoded one at a time (the rate from their delays); a video's packets, counted by `ffprobe`
/// without decoding. `options` gives the decoders' memory limits.
pub fn count_frames(path: &Path, options: &LoadOptions) -> Result<(usize, f64), MediaError> {
    count_frames_with(path, options, &Ffmpeg::default())
}

fn count_frames_with(
    path: &Path,
    options: &LoadOptions,
    ffmpeg: &Ffmpeg,
) -> Result<(usize, f64), MediaError> {
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    if metadata.is_dir() {
        return Ok((load::frame_folder_files(path)?.len(), DEFAULT_FPS));
    }
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase)
        .unwrap_or_default();
    match extension.as_str() {
        "gif" => load::without_panics(path, || count_gif(path, options)),
        "png" | "apng" => load::without_panics(path, || count_png(path, options)),
        "jpg" | "jpeg" => Ok((1, DEFAULT_FPS)),
        e if FFMPEG_VIDEO_EXTENSIONS.contains(&e) => ffmpeg.count_frames(path),
        _ => Err(MediaError::Unsupported {
            path: path.to_path_buf(),
        }),
    }
}

/// Writes `frames` ((frames, height, width, 3), values clamped to [0, 1], any device) to a new
/// file `{output_dir}/{filename_prefix}_{counter:05}_.{ext}` and returns its path.
///
/// `loop_count` follows VideoHelperSuite: for GIF and PNG, 0 loops forever and n plays the clip
/// n more times after the first; MP4 cannot loop, so n appends n more copies of the frames.
/// MP4 frames of odd width or height are padded by one black row/column (yuv420p needs even
/// sizes).
pub fn save_video(
    frames: &Tensor,
    output_dir: &Path,
    filename_prefix: &str,
    format: VideoFormat,
    fps: f64,
    loop_count: u32,
) -> Result<PathBuf, MediaError> {
    save_video_with(
        frames,
        output_dir,
        filename_prefix,
        format,
        fps,
        loop_count,
        &Ffmpeg::default(),
    )
}

/// Like [`save_video`] in MP4, with the H.264 encoder's `settings`.
pub fn save_h264(
    frames: &Tensor,
    output_dir: &Path,
    filename_prefix: &str,
    fps: f64,
    loop_count: u32,
    settings: &H264Settings,
    ffmpeg: &Ffmpeg,
) -> Result<PathBuf, MediaError> {
    check_fps(fps)?;
    let rgb = Rgb8Frames::from_tensor(frames)?;
    save_atomically(output_dir, filename_prefix, "mp4", |temp| {
        ffmpeg.encode_h264_with(temp, &rgb, fps, loop_count, settings)
    })
}

/// Writes `frames` as an animated WebP (through `ffmpeg`, whose libwebp encodes animations)
/// to a new file `{output_dir}/{filename_prefix}_{counter:05}_.webp`; `loop_count` 0 loops
/// forever.
pub fn save_webp(
    frames: &Tensor,
    output_dir: &Path,
    filename_prefix: &str,
    fps: f64,
    loop_count: u32,
    settings: &WebpSettings,
    ffmpeg: &Ffmpeg,
) -> Result<PathBuf, MediaError> {
    check_fps(fps)?;
    let rgb = Rgb8Frames::from_tensor(frames)?;
    save_atomically(output_dir, filename_prefix, "webp", |temp| {
        ffmpeg.encode_webp(temp, &rgb, fps, loop_count, settings)
    })
}

/// Writes `{stem}-audio.mp4` beside the MP4 `video`: its video stream with `audio` added
/// (see [`Ffmpeg::mux_audio`] for `pad_to`), and returns its path.
pub fn save_with_audio(
    video: &Path,
    audio: &AudioSamples,
    pad_to: Option<f64>,
    ffmpeg: &Ffmpeg,
) -> Result<PathBuf, MediaError> {
    save_companion(video, "-audio", |temp| {
        ffmpeg.mux_audio(video, audio, pad_to, temp)
    })
}

fn check_fps(fps: f64) -> Result<(), MediaError> {
    if fps.is_finite() && fps > 0.0 {
        Ok(())
    } else {
        Err(MediaError::Invalid(format!(
            "fps must be a positive number, got {fps}"
        )))
    }
}

fn load_video_with(
    path: &Path,
    options: &LoadOptions,
    ffmpeg: &Ffmpeg,
) -> Result<(Tensor, f64), MediaError> {
    options.validate()?;
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let (stack, source_fps) = if metadata.is_dir() {
        let stack = load::without_panics(path, || load_frame_folder(path, options))?;
        (stack, DEFAULT_FPS)
    } else {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match extension.as_str() {
            "gif" => load::without_panics(path, || load_gif(path, options))?,
            "png" | "apng" => load::without_panics(path, || load_png(path, options))?,
            "jpg" | "jpeg" => load::without_panics(path, || load_still(path, options))?,
            e if FFMPEG_VIDEO_EXTENSIONS.contains(&e) => ffmpeg.decode(path, options)?,
            _ => {
                return Err(MediaError::Unsupported {
                    path: path.to_path_buf(),
                })
            }
        }
    };
    let frames = stack.into_tensor(path)?;
    Ok((frames, source_fps / options.select_every_nth as f64))
}

fn save_video_with(
    frames: &Tensor,
    output_dir: &Path,
    filename_prefix: &str,
    format: VideoFormat,
    fps: f64,
    loop_count: u32,
    ffmpeg: &Ffmpeg,
) -> Result<PathBuf, MediaError> {
    check_fps(fps)?;
    let rgb = Rgb8Frames::from_tensor(frames)?;
    save_atomically(
        output_dir,
        filename_prefix,
        format.extension(),
        |temp| match format {
            VideoFormat::Gif => write_gif(temp, &rgb, fps, loop_count),
            VideoFormat::Png => write_apng(temp, &rgb, fps, loop_count),
            VideoFormat::Mp4 => ffmpeg.encode_h264(temp, &rgb, fps, loop_count),
        },
    )
}

#[cfg(test)]
mod tests {
    //! Round trips through the public API, and the clips and helpers the tests of every
    //! submodule share.

    use super::*;

    use candle_core::Device;

    use crate::test_util::max_abs_diff;
    use crate::video::TempDir;

    /// A smooth moving gradient: (frames, height, width, 3) in [0, 1].
    pub(super) fn gradient_clip(frames: usize, height: usize, width: usize) -> Tensor {
        let mut data = Vec::with_capacity(frames * height * width * 3);
        for f in 0..frames {
            for y in 0..height {
                for x in 0..width {
                    let u = x as f32 / width as f32;
                    let v = y as f32 / height as f32;
                    let t = f as f32 / frames as f32;
                    data.extend([(u + t) % 1.0, v, 0.5 * (1.0 - u) + 0.25 * t]);
                }
            }
        }
        Tensor::from_vec(data, (frames, height, width, 3), &Device::Cpu).unwrap()
    }

    pub(super) fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    pub(super) fn names_in(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn gif_round_trip() {
        let dir = TempDir::new("gif");
        let clip = gradient_clip(5, 96, 128);
        let path = save_video(&clip, &dir.0, "clip", VideoFormat::Gif, 10.0, 0).unwrap();
        assert_eq!(path.file_name().unwrap(), "clip_00001_.gif");
        let (loaded, fps) = load_video(&path, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.dims(), &[5, 96, 128, 3]);
        assert!((fps - 10.0).abs() < 1e-9, "fps {fps}");
        // 256 colours per frame for a gradient of ~12k colours: small but visible error.
        let error = mean_abs_diff(&loaded, &clip);
        eprintln!("GIF round trip: mean abs error {error}");
        assert!(error < 0.03, "GIF mean abs error {error}");
    }

    #[test]
    fn apng_round_trip_is_lossless_for_8_bit_frames() {
        let dir = TempDir::new("apng");
        let clip = gradient_clip(4, 16, 20);
        let path = save_video(&clip, &dir.0, "clip", VideoFormat::Png, 12.0, 0).unwrap();
        assert_eq!(path.file_name().unwrap(), "clip_00001_.png");
        let (loaded, fps) = load_video(&path, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.dims(), &[4, 16, 20, 3]);
        assert!((fps - 12.0).abs() < 1e-9, "fps {fps}");
        let error = max_abs_diff(&loaded, &clip);
        assert!(error <= 0.5 / 255.0 + 1e-6, "APNG max abs error {error}");
        // Saving what was loaded reproduces the file's pixels exactly.
        let again = save_video(&loaded, &dir.0, "clip", VideoFormat::Png, 12.0, 0).unwrap();
        let (reloaded, _) = load_video(&again, &LoadOptions::default()).unwrap();
        assert_eq!(mean_abs_diff(&reloaded, &loaded), 0.0);
    }

    #[test]
    fn load_options_select_frames() {
        let dir = TempDir::new("options");
        let clip = gradient_clip(10, 8, 8);
        let path = save_video(&clip, &dir.0, "clip", VideoFormat::Png, 10.0, 0).unwrap();
        let options = LoadOptions {
            frame_load_cap: 3,
            skip_first_frames: 1,
            select_every_nth: 2,
            ..LoadOptions::default()
        };
        let (loaded, fps) = load_video(&path, &options).unwrap();
        assert_eq!(loaded.dims()[0], 3);
        assert!((fps - 5.0).abs() < 1e-9);
        for (k, source) in [1usize, 3, 5].into_iter().enumerate() {
            let diff = mean_abs_diff(&loaded.get(k).unwrap(), &clip.get(source).unwrap());
            assert!(
                diff < 1.0 / 255.0,
                "loaded frame {k} is not source frame {source}"
            );
        }
        let none_left = LoadOptions {
            skip_first_frames: 10,
            ..LoadOptions::default()
        };
        let err = load_video(&path, &none_left).unwrap_err();
        assert!(matches!(err, MediaError::NoFrames { .. }), "{err}");
        let zero_nth = LoadOptions {
            select_every_nth: 0,
            ..LoadOptions::default()
        };
        assert!(load_video(&path, &zero_nth).is_err());
    }

    #[test]
    fn frames_are_counted_without_loading_them() {
        let dir = TempDir::new("count");
        let clip = gradient_clip(5, 8, 12);
        let limits = LoadOptions::default();
        for format in [VideoFormat::Gif, VideoFormat::Png] {
            let path = save_video(&clip, &dir.0, "clip", format, 10.0, 0).unwrap();
            let (count, fps) = count_frames(&path, &limits).unwrap();
            assert_eq!(count, 5, "{format}");
            assert!((fps - 10.0).abs() < 1e-9, "{format}: {fps}");
        }
        let frames = dir.0.join("frames");
        fs::create_dir_all(&frames).unwrap();
        for name in ["a_1.png", "a_2.png", "a_3.jpg"] {
            image::RgbImage::new(4, 4).save(frames.join(name)).unwrap();
        }
        assert_eq!(count_frames(&frames, &limits).unwrap(), (3, DEFAULT_FPS));
        if Ffmpeg::default().is_available() {
            let path = save_video(&clip, &dir.0, "clip", VideoFormat::Mp4, 12.0, 1).unwrap();
            let (count, fps) = count_frames(&path, &limits).unwrap();
            assert_eq!(count, 10);
            assert!((fps - 12.0).abs() < 1e-6, "{fps}");
        }
    }
}
