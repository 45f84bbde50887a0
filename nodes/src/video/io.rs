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

use std::cmp::Ordering;
use std::fmt;
use std::fs;
use std::io::{BufReader, Read, Write};
use std::path::{Component, Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};
use std::thread::JoinHandle;
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use image::codecs::gif::{GifDecoder, GifEncoder, Repeat};
use image::codecs::png::PngDecoder;
use image::{
    AnimationDecoder, Delay, DynamicImage, Frame, ImageDecoder, ImageReader, Limits, RgbaImage,
};

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

fn decode_error(path: &Path) -> impl FnOnce(image::ImageError) -> MediaError + '_ {
    move |err| MediaError::Decode {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

/// Which frames of the source to load, as ComfyUI-VideoHelperSuite's Load Video/Load Images:
/// drop the first `skip_first_frames`, keep every `select_every_nth` of the rest, stop after
/// `frame_load_cap` kept frames (0 = no cap).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoadOptions {
    pub frame_load_cap: usize,
    pub skip_first_frames: usize,
    pub select_every_nth: usize,
}

impl Default for LoadOptions {
    fn default() -> Self {
        Self {
            frame_load_cap: 0,
            skip_first_frames: 0,
            select_every_nth: 1,
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

fn load_video_with(
    path: &Path,
    options: &LoadOptions,
    ffmpeg: &Ffmpeg,
) -> Result<(Tensor, f64), MediaError> {
    options.validate()?;
    let metadata = fs::metadata(path).map_err(io_error(path))?;
    let (stack, source_fps) = if metadata.is_dir() {
        (load_frame_folder(path, options)?, DEFAULT_FPS)
    } else {
        let extension = path
            .extension()
            .and_then(|e| e.to_str())
            .map(str::to_ascii_lowercase)
            .unwrap_or_default();
        match extension.as_str() {
            "gif" => load_gif(path, options)?,
            "png" | "apng" => load_png(path, options)?,
            "jpg" | "jpeg" => load_still(path, options)?,
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
    if !(fps.is_finite() && fps > 0.0) {
        return Err(MediaError::Invalid(format!(
            "fps must be a positive number, got {fps}"
        )));
    }
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

// ---------------------------------------------------------------------------------------------
// Loading

/// Decoded frames gathered into one (frames, height, width, 3) buffer.
struct FrameStack {
    size: Option<(u32, u32, PathBuf)>,
    data: Vec<f32>,
    count: usize,
}

impl FrameStack {
    fn new() -> Self {
        Self {
            size: None,
            data: Vec::new(),
            count: 0,
        }
    }

    fn check_size(&mut self, source: &Path, width: u32, height: u32) -> Result<(), MediaError> {
        match &self.size {
            None => {
                self.size = Some((width, height, source.to_path_buf()));
                Ok(())
            }
            Some((w, h, _)) if (*w, *h) == (width, height) => Ok(()),
            Some((w, h, first)) => Err(MediaError::FrameSize {
                path: source.to_path_buf(),
                first: first.clone(),
                width: *w,
                height: *h,
                found_width: width,
                found_height: height,
            }),
        }
    }

    /// Appends an 8-bit frame with `channels` (3 = RGB, 4 = RGBA) interleaved values per pixel.
    fn push_u8(
        &mut self,
        source: &Path,
        width: u32,
        height: u32,
        pixels: &[u8],
        channels: usize,
    ) -> Result<(), MediaError> {
        self.check_size(source, width, height)?;
        self.data.reserve(pixels.len() / channels * 3);
        for pixel in pixels.chunks_exact(channels) {
            self.data
                .extend(pixel[..3].iter().map(|&v| f32::from(v) / 255.0));
        }
        self.count += 1;
        Ok(())
    }

    fn push_image(&mut self, source: &Path, image: &DynamicImage) -> Result<(), MediaError> {
        self.check_size(source, image.width(), image.height())?;
        self.data.extend_from_slice(image.to_rgb32f().as_raw());
        self.count += 1;
        Ok(())
    }

    fn into_tensor(self, source: &Path) -> Result<Tensor, MediaError> {
        let Some((width, height, _)) = self.size.filter(|_| self.count > 0) else {
            return Err(MediaError::NoFrames {
                path: source.to_path_buf(),
                reason: "no frames left after skip_first_frames / select_every_nth".to_string(),
            });
        };
        let shape = (self.count, height as usize, width as usize, 3);
        Ok(Tensor::from_vec(self.data, shape, &Device::Cpu)?)
    }
}

fn is_frame_file(path: &Path) -> bool {
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .map(str::to_ascii_lowercase);
    matches!(extension.as_deref(), Some("png" | "jpg" | "jpeg")) && path.is_file()
}

fn load_frame_folder(folder: &Path, options: &LoadOptions) -> Result<FrameStack, MediaError> {
    let mut files = Vec::new();
    for entry in fs::read_dir(folder).map_err(io_error(folder))? {
        let path = entry.map_err(io_error(folder))?.path();
        if is_frame_file(&path) {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(MediaError::NoFrames {
            path: folder.to_path_buf(),
            reason: "the folder holds no .png, .jpg or .jpeg frames".to_string(),
        });
    }
    files.sort_by(|a, b| {
        let name = |p: &Path| p.file_name().map(|n| n.to_string_lossy().into_owned());
        natural_cmp(&name(a).unwrap_or_default(), &name(b).unwrap_or_default())
    });
    let mut stack = FrameStack::new();
    for (index, file) in files.iter().enumerate() {
        match options.choose(index) {
            FrameChoice::Skip => continue,
            FrameChoice::Done => break,
            FrameChoice::Take => {}
        }
        let image = ImageReader::open(file)
            .map_err(io_error(file))?
            .with_guessed_format()
            .map_err(io_error(file))?
            .decode()
            .map_err(decode_error(file))?;
        stack.push_image(file, &image)?;
    }
    Ok(stack)
}

/// Feeds the frames of an animation through `options`, returning them and the source frame rate
/// from the mean frame delay of the frames read (10 fps when the file gives no delays, as
/// browsers play such GIFs).
fn collect_animation<'a>(
    path: &Path,
    frames: image::Frames<'a>,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut stack = FrameStack::new();
    let (mut delay_ms, mut delays) = (0.0f64, 0usize);
    for (index, frame) in frames.enumerate() {
        let choice = options.choose(index);
        if choice == FrameChoice::Done {
            break;
        }
        let frame = frame.map_err(decode_error(path))?;
        let (numerator, denominator) = frame.delay().numer_denom_ms();
        if denominator > 0 {
            delay_ms += f64::from(numerator) / f64::from(denominator);
            delays += 1;
        }
        if choice == FrameChoice::Take {
            let buffer = frame.into_buffer();
            let (width, height) = buffer.dimensions();
            stack.push_u8(path, width, height, buffer.as_raw(), 4)?;
        }
    }
    let mean_delay_ms = if delays > 0 {
        delay_ms / delays as f64
    } else {
        0.0
    };
    let fps = if mean_delay_ms > 0.0 {
        1000.0 / mean_delay_ms
    } else {
        10.0
    };
    Ok((stack, fps))
}

fn open_buffered(path: &Path) -> Result<BufReader<fs::File>, MediaError> {
    Ok(BufReader::new(
        fs::File::open(path).map_err(io_error(path))?,
    ))
}

fn load_gif(path: &Path, options: &LoadOptions) -> Result<(FrameStack, f64), MediaError> {
    let mut decoder = GifDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    // The default allocation cap, so that a corrupt header cannot ask for gigabytes.
    decoder
        .set_limits(Limits::default())
        .map_err(decode_error(path))?;
    collect_animation(path, decoder.into_frames(), options)
}

fn load_png(path: &Path, options: &LoadOptions) -> Result<(FrameStack, f64), MediaError> {
    let mut decoder = PngDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    decoder
        .set_limits(Limits::default())
        .map_err(decode_error(path))?;
    if decoder.is_apng().map_err(decode_error(path))? {
        let animation = decoder.apng().map_err(decode_error(path))?;
        collect_animation(path, animation.into_frames(), options)
    } else {
        let image = DynamicImage::from_decoder(decoder).map_err(decode_error(path))?;
        single_frame(path, &image, options)
    }
}

fn load_still(path: &Path, options: &LoadOptions) -> Result<(FrameStack, f64), MediaError> {
    let image = ImageReader::open(path)
        .map_err(io_error(path))?
        .with_guessed_format()
        .map_err(io_error(path))?
        .decode()
        .map_err(decode_error(path))?;
    single_frame(path, &image, options)
}

fn single_frame(
    path: &Path,
    image: &DynamicImage,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut stack = FrameStack::new();
    if options.choose(0) == FrameChoice::Take {
        stack.push_image(path, image)?;
    }
    Ok((stack, DEFAULT_FPS))
}

/// Orders names as people count: digit runs compare by value (`frame_2` < `frame_10`), other
/// runs case-insensitively; ties fall back to the plain byte order.
pub fn natural_cmp(a: &str, b: &str) -> Ordering {
    let (mut left, mut right) = (a, b);
    loop {
        let (Some(l), Some(r)) = (left.chars().next(), right.chars().next()) else {
            return left.len().cmp(&right.len()).then_with(|| a.cmp(b));
        };
        if l.is_ascii_digit() && r.is_ascii_digit() {
            let (l_run, l_rest) = split_run(left, |c| c.is_ascii_digit());
            let (r_run, r_rest) = split_run(right, |c| c.is_ascii_digit());
            let (l_value, r_value) = (l_run.trim_start_matches('0'), r_run.trim_start_matches('0'));
            let by_value = l_value
                .len()
                .cmp(&r_value.len())
                .then_with(|| l_value.cmp(r_value));
            if by_value != Ordering::Equal {
                return by_value;
            }
            (left, right) = (l_rest, r_rest);
        } else {
            let (l_run, l_rest) = split_run(left, |c| !c.is_ascii_digit());
            let (r_run, r_rest) = split_run(right, |c| !c.is_ascii_digit());
            let by_text = l_run.to_lowercase().cmp(&r_run.to_lowercase());
            if by_text != Ordering::Equal {
                return by_text;
            }
            (left, right) = (l_rest, r_rest);
        }
    }
}

fn split_run(text: &str, in_run: impl Fn(char) -> bool) -> (&str, &str) {
    let end = text.find(|c: char| !in_run(c)).unwrap_or(text.len());
    text.split_at(end)
}

// ---------------------------------------------------------------------------------------------
// Saving

/// Frames as 8-bit RGB, ready for the encoders.
struct Rgb8Frames {
    data: Vec<u8>,
    frames: usize,
    width: u32,
    height: u32,
}

impl Rgb8Frames {
    fn from_tensor(frames: &Tensor) -> Result<Self, MediaError> {
        let dims = frames.dims();
        let &[count, height, width, 3] = dims else {
            return Err(MediaError::Invalid(format!(
                "frames must be (frames, height, width, 3), got shape {dims:?}"
            )));
        };
        if count == 0 || height == 0 || width == 0 {
            return Err(MediaError::Invalid(format!(
                "cannot save an empty video of shape {dims:?}"
            )));
        }
        let (Ok(width), Ok(height)) = (u32::try_from(width), u32::try_from(height)) else {
            return Err(MediaError::Invalid(format!(
                "frame size {width}x{height} is too large"
            )));
        };
        let values = frames
            .to_device(&Device::Cpu)?
            .to_dtype(DType::F32)?
            .flatten_all()?
            .to_vec1::<f32>()?;
        // Rounded rather than truncated, so that 8-bit inputs survive a load/save round trip.
        let data = values
            .iter()
            .map(|&v| (v.clamp(0.0, 1.0) * 255.0).round() as u8)
            .collect();
        Ok(Self {
            data,
            frames: count,
            width,
            height,
        })
    }

    fn frame_len(&self) -> usize {
        self.width as usize * self.height as usize * 3
    }

    fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks_exact(self.frame_len())
    }
}

fn encode_error(path: &Path) -> impl FnOnce(String) -> MediaError + '_ {
    move |message| MediaError::Encode {
        path: path.to_path_buf(),
        message,
    }
}

fn write_gif(path: &Path, rgb: &Rgb8Frames, fps: f64, loop_count: u32) -> Result<(), MediaError> {
    // Encoded in memory so that every write error surfaces (the GIF trailer is written when
    // the encoder drops, where errors would be lost).
    let mut bytes = Vec::new();
    {
        // Speed 10: the gif crate's default balance between palette quality and time.
        let mut encoder = GifEncoder::new_with_speed(&mut bytes, 10);
        let repeat = match loop_count {
            0 => Repeat::Infinite,
            n => Repeat::Finite(u16::try_from(n).unwrap_or(u16::MAX)),
        };
        encoder
            .set_repeat(repeat)
            .map_err(|e| encode_error(path)(e.to_string()))?;
        let delay = Delay::from_saturating_duration(Duration::from_secs_f64(1.0 / fps));
        for pixels in rgb.iter() {
            let mut rgba = Vec::with_capacity(pixels.len() / 3 * 4);
            for pixel in pixels.chunks_exact(3) {
                rgba.extend_from_slice(pixel);
                rgba.push(u8::MAX);
            }
            let image = RgbaImage::from_raw(rgb.width, rgb.height, rgba).ok_or_else(|| {
                encode_error(path)("frame buffer does not match its size".to_string())
            })?;
            encoder
                .encode_frame(Frame::from_parts(image, 0, 0, delay))
                .map_err(|e| encode_error(path)(e.to_string()))?;
        }
    }
    fs::write(path, bytes).map_err(io_error(path))
}

/// APNG frame delay as a fraction of a second, exact for frame rates given to 1/1000.
fn apng_delay(fps: f64) -> (u16, u16) {
    let per_thousand = (fps * 1000.0).round();
    if (1.0..=f64::from(u16::MAX)).contains(&per_thousand) {
        (1000, per_thousand as u16)
    } else if per_thousand > f64::from(u16::MAX) {
        (1, fps.round().min(f64::from(u16::MAX)) as u16)
    } else {
        (
            (1.0 / fps).round().clamp(1.0, f64::from(u16::MAX)) as u16,
            1,
        )
    }
}

fn write_apng(path: &Path, rgb: &Rgb8Frames, fps: f64, loop_count: u32) -> Result<(), MediaError> {
    let fail = |e: png::EncodingError| encode_error(path)(e.to_string());
    let frames = u32::try_from(rgb.frames)
        .map_err(|_| encode_error(path)("too many frames for APNG".to_string()))?;
    // APNG counts plays, not repeats; 0 plays means forever.
    let plays = if loop_count == 0 {
        0
    } else {
        loop_count.saturating_add(1)
    };
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, rgb.width, rgb.height);
        encoder.set_color(png::ColorType::Rgb);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_compression(png::Compression::Balanced);
        encoder.set_animated(frames, plays).map_err(fail)?;
        let (numerator, denominator) = apng_delay(fps);
        encoder
            .set_frame_delay(numerator, denominator)
            .map_err(fail)?;
        let mut writer = encoder.write_header().map_err(fail)?;
        for pixels in rgb.iter() {
            writer.write_image_data(pixels).map_err(fail)?;
        }
        writer.finish().map_err(fail)?;
    }
    fs::write(path, bytes).map_err(io_error(path))
}

// ---------------------------------------------------------------------------------------------
// ffmpeg

/// The `ffmpeg` and `ffprobe` programs used for MP4/WebM/MOV/MKV (found on PATH by default).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ffmpeg {
    pub ffmpeg: PathBuf,
    pub ffprobe: PathBuf,
}

impl Default for Ffmpeg {
    fn default() -> Self {
        Self {
            ffmpeg: PathBuf::from("ffmpeg"),
            ffprobe: PathBuf::from("ffprobe"),
        }
    }
}

/// What the decoder needs to know about a video stream.
#[derive(Debug, Clone, Copy, PartialEq)]
struct VideoStream {
    width: u32,
    height: u32,
    fps: f64,
}

impl Ffmpeg {
    /// Whether both programs can be started.
    pub fn is_available(&self) -> bool {
        [&self.ffmpeg, &self.ffprobe].iter().all(|program| {
            Command::new(program)
                .arg("-version")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .map(|status| status.success())
                .unwrap_or(false)
        })
    }

    fn spawn(program: &Path, command: &mut Command, purpose: &str) -> Result<Child, MediaError> {
        command.spawn().map_err(|err| {
            if err.kind() == std::io::ErrorKind::NotFound {
                MediaError::FfmpegMissing {
                    program: program.display().to_string(),
                    purpose: purpose.to_string(),
                }
            } else {
                MediaError::Io {
                    path: program.to_path_buf(),
                    source: err,
                }
            }
        })
    }

    fn failure(program: &Path, path: &Path, message: String) -> MediaError {
        MediaError::Ffmpeg {
            program: program.display().to_string(),
            path: path.to_path_buf(),
            message,
        }
    }

    fn probe(&self, path: &Path) -> Result<VideoStream, MediaError> {
        let mut command = Command::new(&self.ffprobe);
        command
            .args(["-v", "error", "-select_streams", "v:0", "-show_streams"])
            .args(["-of", "json"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = Self::spawn(&self.ffprobe, &mut command, "read videos")?;
        let output = child.wait_with_output().map_err(io_error(&self.ffprobe))?;
        let fail = |message: String| Self::failure(&self.ffprobe, path, message);
        if !output.status.success() {
            return Err(fail(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ));
        }
        let json: serde_json::Value = serde_json::from_slice(&output.stdout)
            .map_err(|e| fail(format!("unreadable ffprobe output: {e}")))?;
        let stream = json
            .get("streams")
            .and_then(|s| s.get(0))
            .ok_or_else(|| fail("the file has no video stream".to_string()))?;
        let dimension = |key: &str| {
            stream
                .get(key)
                .and_then(|v| v.as_u64())
                .and_then(|v| u32::try_from(v).ok())
                .filter(|&v| v > 0)
                .ok_or_else(|| fail(format!("ffprobe reported no {key}")))
        };
        let (mut width, mut height) = (dimension("width")?, dimension("height")?);
        // ffmpeg applies the rotation stored in the file when decoding, so a quarter turn swaps
        // the sizes that ffprobe reports for the coded picture.
        if quarter_turns(stream) % 2 == 1 {
            std::mem::swap(&mut width, &mut height);
        }
        let fps = ["avg_frame_rate", "r_frame_rate"]
            .iter()
            .filter_map(|key| stream.get(*key).and_then(|v| v.as_str()))
            .filter_map(parse_rate)
            .next()
            .unwrap_or(DEFAULT_FPS);
        Ok(VideoStream { width, height, fps })
    }

    fn decode(&self, path: &Path, options: &LoadOptions) -> Result<(FrameStack, f64), MediaError> {
        let stream = self.probe(path)?;
        let mut command = Command::new(&self.ffmpeg);
        command
            .args(["-v", "error", "-nostdin", "-i"])
            .arg(path)
            .args(["-map", "0:v:0", "-f", "rawvideo", "-pix_fmt", "rgb24"])
            // Pins the output to the probed size, so a stream whose decoded size differs from
            // what ffprobe reports is scaled instead of being cut into misaligned frames.
            .args(["-s", &format!("{}x{}", stream.width, stream.height), "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let mut child = Self::spawn(&self.ffmpeg, &mut command, "read videos")?;
        let stderr = drain(child.stderr.take());
        let mut stdout = child
            .stdout
            .take()
            .ok_or_else(|| Self::failure(&self.ffmpeg, path, "no output pipe".to_string()))?;
        let frame_len = stream.width as usize * stream.height as usize * 3;
        let mut buffer = vec![0u8; frame_len];
        let mut stack = FrameStack::new();
        let mut stopped_early = false;
        let mut read_error = None;
        for index in 0.. {
            match read_frame(&mut stdout, &mut buffer) {
                Ok(true) => {}
                Ok(false) => break,
                Err(err) => {
                    read_error = Some(err);
                    break;
                }
            }
            match options.choose(index) {
                FrameChoice::Skip => {}
                FrameChoice::Take => {
                    if let Err(err) = stack.push_u8(path, stream.width, stream.height, &buffer, 3) {
                        let _ = child.kill();
                        let _ = child.wait();
                        return Err(err);
                    }
                }
                FrameChoice::Done => {
                    stopped_early = true;
                    break;
                }
            }
        }
        if stopped_early {
            // Everything wanted is read; no need to decode the rest of a long video.
            let _ = child.kill();
        }
        drop(stdout);
        let status = child.wait().map_err(io_error(&self.ffmpeg))?;
        let messages = stderr.join().unwrap_or_default();
        if !stopped_early && !status.success() {
            return Err(Self::failure(
                &self.ffmpeg,
                path,
                messages.trim().to_string(),
            ));
        }
        if let Some(err) = read_error {
            return Err(Self::failure(&self.ffmpeg, path, err));
        }
        Ok((stack, stream.fps))
    }

    fn encode_h264(
        &self,
        path: &Path,
        rgb: &Rgb8Frames,
        fps: f64,
        loop_count: u32,
    ) -> Result<(), MediaError> {
        let mut command = Command::new(&self.ffmpeg);
        command
            .args([
                "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            ])
            .args(["-s", &format!("{}x{}", rgb.width, rgb.height)])
            .args(["-framerate", &fps.to_string(), "-i", "-"])
            .args(["-vf", "pad=ceil(iw/2)*2:ceil(ih/2)*2"])
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-crf", "19"])
            .args(["-f", "mp4"])
            .arg(path)
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = Self::spawn(&self.ffmpeg, &mut command, "write MP4 videos")?;
        let stderr = drain(child.stderr.take());
        let mut write_error = None;
        if let Some(mut stdin) = child.stdin.take() {
            'copies: for _ in 0..=loop_count {
                for pixels in rgb.iter() {
                    if let Err(err) = stdin.write_all(pixels) {
                        write_error = Some(err);
                        break 'copies;
                    }
                }
            }
        }
        let status = child.wait().map_err(io_error(&self.ffmpeg))?;
        let messages = stderr.join().unwrap_or_default();
        if !status.success() {
            return Err(Self::failure(
                &self.ffmpeg,
                path,
                messages.trim().to_string(),
            ));
        }
        if let Some(err) = write_error {
            return Err(Self::failure(&self.ffmpeg, path, err.to_string()));
        }
        Ok(())
    }
}

/// Collects a child's stderr on a thread, so that a chatty child never blocks on a full pipe.
fn drain(pipe: Option<std::process::ChildStderr>) -> JoinHandle<String> {
    std::thread::spawn(move || {
        let mut text = String::new();
        if let Some(mut pipe) = pipe {
            let _ = pipe.read_to_string(&mut text);
        }
        text
    })
}

/// Fills `buffer` with the next frame: Ok(false) at a clean end of stream.
fn read_frame(reader: &mut impl Read, buffer: &mut [u8]) -> Result<bool, String> {
    let mut filled = 0;
    while filled < buffer.len() {
        match reader.read(&mut buffer[filled..]) {
            Ok(0) if filled == 0 => return Ok(false),
            Ok(0) => {
                return Err(format!(
                    "the decoded stream ended inside a frame ({filled} of {} bytes)",
                    buffer.len()
                ))
            }
            Ok(n) => filled += n,
            Err(err) if err.kind() == std::io::ErrorKind::Interrupted => {}
            Err(err) => return Err(err.to_string()),
        }
    }
    Ok(true)
}

/// "30000/1001" or "25" as frames per second; None for "0/0" and other non-rates.
fn parse_rate(rate: &str) -> Option<f64> {
    let value = match rate.split_once('/') {
        Some((numerator, denominator)) => {
            numerator.trim().parse::<f64>().ok()? / denominator.trim().parse::<f64>().ok()?
        }
        None => rate.trim().parse::<f64>().ok()?,
    };
    (value.is_finite() && value > 0.0).then_some(value)
}

/// Quarter turns of the display rotation ffprobe reports (side data or the older `rotate` tag).
fn quarter_turns(stream: &serde_json::Value) -> i64 {
    let from_side_data = stream
        .get("side_data_list")
        .and_then(|list| list.as_array())
        .and_then(|list| {
            list.iter()
                .find_map(|entry| entry.get("rotation").and_then(|r| r.as_f64()))
        });
    let from_tag = stream
        .get("tags")
        .and_then(|tags| tags.get("rotate"))
        .and_then(|r| r.as_str())
        .and_then(|r| r.parse::<f64>().ok());
    let degrees = from_side_data.or(from_tag).unwrap_or(0.0);
    ((degrees / 90.0).round() as i64).rem_euclid(4)
}

// ---------------------------------------------------------------------------------------------
// Output names

/// Splits `filename_prefix` into the folder under `output_dir` it names and the file name
/// prefix, refusing prefixes that are absolute, empty, end in a separator, or climb out of
/// `output_dir` with `..`.
pub fn resolve_prefix(
    output_dir: &Path,
    filename_prefix: &str,
) -> Result<(PathBuf, String), MediaError> {
    let refuse = |reason: &str| MediaError::Prefix {
        prefix: filename_prefix.to_string(),
        reason: reason.to_string(),
    };
    if filename_prefix.is_empty() {
        return Err(refuse("is empty"));
    }
    if filename_prefix.ends_with(['/', std::path::MAIN_SEPARATOR]) {
        return Err(refuse("must end with a file name, not a folder separator"));
    }
    let mut parts: Vec<&str> = Vec::new();
    for component in Path::new(filename_prefix).components() {
        match component {
            Component::Normal(part) => {
                parts.push(part.to_str().ok_or_else(|| refuse("is not valid UTF-8"))?)
            }
            Component::CurDir => {}
            Component::ParentDir => {
                if parts.pop().is_none() {
                    return Err(refuse("leaves the output folder"));
                }
            }
            Component::RootDir | Component::Prefix(_) => {
                return Err(refuse("must be relative to the output folder"))
            }
        }
    }
    let Some(name) = parts.pop() else {
        return Err(refuse("names no file"));
    };
    let folder = parts
        .iter()
        .fold(output_dir.to_path_buf(), |dir, part| dir.join(part));
    Ok((folder, name.to_string()))
}

/// One past the highest counter among the files `{name}_{counter}…` in `folder` (1 when there
/// are none), as ComfyUI's `get_save_image_path` counts, across all extensions.
pub fn next_counter(folder: &Path, name: &str) -> Result<u64, MediaError> {
    let entries = match fs::read_dir(folder) {
        Ok(entries) => entries,
        Err(err) if err.kind() == std::io::ErrorKind::NotFound => return Ok(1),
        Err(err) => return Err(io_error(folder)(err)),
    };
    let lead = format!("{name}_");
    let mut highest = 0;
    for entry in entries {
        let file_name = entry.map_err(io_error(folder))?.file_name();
        let Some(rest) = file_name.to_str().and_then(|n| n.strip_prefix(&lead)) else {
            continue;
        };
        let digits = rest.split('_').next().unwrap_or_default();
        if let Ok(counter) = digits.parse::<u64>() {
            highest = highest.max(counter);
        }
    }
    Ok(highest + 1)
}

/// Writes a new output file `{output_dir}/{filename_prefix}_{counter:05}_.{extension}`.
///
/// `write` fills a hidden temporary file in the destination folder; only when it succeeds is
/// the file moved to its numbered name (never over an existing file: if another writer took
/// the counter meanwhile, the next one is used). On failure the temporary file is removed and
/// nothing else changes (except the folders of the prefix, which are created first).
pub fn save_atomically(
    output_dir: &Path,
    filename_prefix: &str,
    extension: &str,
    write: impl FnOnce(&Path) -> Result<(), MediaError>,
) -> Result<PathBuf, MediaError> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let (folder, name) = resolve_prefix(output_dir, filename_prefix)?;
    fs::create_dir_all(&folder).map_err(io_error(&folder))?;
    let temp = folder.join(format!(
        ".{name}.{}.{}.tmp",
        std::process::id(),
        TEMP_COUNTER.fetch_add(1, AtomicOrdering::Relaxed)
    ));
    let result = write(&temp)
        .and_then(|()| {
            fs::File::open(&temp)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&temp))
        })
        .and_then(|()| publish(&temp, &folder, &name, extension));
    if result.is_err() {
        let _ = fs::remove_file(&temp);
    }
    result
}

fn publish(temp: &Path, folder: &Path, name: &str, extension: &str) -> Result<PathBuf, MediaError> {
    const ATTEMPTS: usize = 1000;
    let mut counter = next_counter(folder, name)?;
    for _ in 0..ATTEMPTS {
        let target = folder.join(format!("{name}_{counter:05}_.{extension}"));
        // A hard link fails instead of replacing an existing file, which a rename would do.
        match fs::hard_link(temp, &target) {
            Ok(()) => {
                let _ = fs::remove_file(temp);
                return Ok(target);
            }
            Err(err) if err.kind() == std::io::ErrorKind::AlreadyExists => counter += 1,
            // Filesystems without hard links: rename, after checking the name is free.
            Err(_) if !target.exists() => {
                fs::rename(temp, &target).map_err(io_error(&target))?;
                return Ok(target);
            }
            Err(_) => counter += 1,
        }
    }
    Err(MediaError::Invalid(format!(
        "no free file name for {name} in {} after {ATTEMPTS} attempts",
        folder.display()
    )))
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::video::TempDir;

    /// A smooth moving gradient: (frames, height, width, 3) in [0, 1].
    fn gradient_clip(frames: usize, height: usize, width: usize) -> Tensor {
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

    fn mean_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
        (a - b)
            .unwrap()
            .abs()
            .unwrap()
            .mean_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap()
    }

    fn solid_png(path: &Path, width: u32, height: u32, value: u8) {
        image::RgbImage::from_pixel(width, height, image::Rgb([value, value / 2, 255 - value]))
            .save(path)
            .unwrap();
    }

    fn names_in(dir: &Path) -> Vec<String> {
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
        let error = (&loaded - &clip)
            .unwrap()
            .abs()
            .unwrap()
            .max_all()
            .unwrap()
            .to_scalar::<f32>()
            .unwrap();
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
    fn frame_folder_loads_in_natural_order() {
        let dir = TempDir::new("folder");
        for (name, value) in [
            ("frame_10.png", 30u8),
            ("frame_2.png", 20),
            ("frame_1.png", 10),
        ] {
            solid_png(&dir.0.join(name), 6, 4, value);
        }
        image::RgbImage::from_pixel(6, 4, image::Rgb([40, 20, 215]))
            .save(dir.0.join("frame_11.jpg"))
            .unwrap();
        fs::write(dir.0.join("notes.txt"), "not a frame").unwrap();
        let (frames, fps) = load_video(&dir.0, &LoadOptions::default()).unwrap();
        assert_eq!(frames.dims(), &[4, 4, 6, 3]);
        assert_eq!(fps, DEFAULT_FPS);
        let red: Vec<f32> = (0..4)
            .map(|k| {
                frames
                    .get(k)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .get(0)
                    .unwrap()
                    .to_scalar::<f32>()
                    .unwrap()
                    * 255.0
            })
            .collect();
        assert_eq!(red[..3], [10.0, 20.0, 30.0]);
        assert!((red[3] - 40.0).abs() < 4.0, "JPEG frame red {}", red[3]);
    }

    #[test]
    fn frame_folder_with_mismatched_sizes_names_the_file() {
        let dir = TempDir::new("mismatch");
        solid_png(&dir.0.join("a1.png"), 8, 8, 1);
        solid_png(&dir.0.join("a2.png"), 8, 6, 2);
        let err = load_video(&dir.0, &LoadOptions::default()).unwrap_err();
        let message = err.to_string();
        assert!(matches!(err, MediaError::FrameSize { .. }), "{message}");
        assert!(
            message.contains("a2.png") && message.contains("8x6"),
            "{message}"
        );
    }

    #[test]
    fn empty_folder_and_unknown_files_are_refused() {
        let dir = TempDir::new("empty");
        let err = load_video(&dir.0, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, MediaError::NoFrames { .. }), "{err}");
        let text = dir.0.join("clip.txt");
        fs::write(&text, "x").unwrap();
        let err = load_video(&text, &LoadOptions::default()).unwrap_err();
        assert!(matches!(err, MediaError::Unsupported { .. }), "{err}");
        let missing = dir.0.join("missing.gif");
        let err = load_video(&missing, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("missing.gif"), "{err}");
        let corrupt = dir.0.join("corrupt.gif");
        fs::write(&corrupt, b"GIF89a-not-really").unwrap();
        let err = load_video(&corrupt, &LoadOptions::default()).unwrap_err();
        assert!(err.to_string().contains("corrupt.gif"), "{err}");
    }

    #[test]
    fn natural_order() {
        let mut names = vec!["f10.png", "f2.png", "F1.png", "f02.png", "f1b.png", "g.png"];
        names.sort_by(|a, b| natural_cmp(a, b));
        assert_eq!(
            names,
            ["F1.png", "f1b.png", "f02.png", "f2.png", "f10.png", "g.png"]
        );
    }

    #[test]
    fn counter_increments_past_the_highest_existing_file() {
        let dir = TempDir::new("counter");
        let clip = gradient_clip(1, 4, 4);
        let first = save_video(&clip, &dir.0, "out/clip", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(first, dir.0.join("out").join("clip_00001_.png"));
        let second = save_video(&clip, &dir.0, "out/clip", VideoFormat::Gif, 8.0, 0).unwrap();
        assert_eq!(second.file_name().unwrap(), "clip_00002_.gif");
        fs::write(dir.0.join("out").join("clip_00041_.latent"), b"").unwrap();
        fs::write(dir.0.join("out").join("clipper_00099_.png"), b"").unwrap();
        let third = save_video(&clip, &dir.0, "out/clip", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(third.file_name().unwrap(), "clip_00042_.png");
        // No temporary files are left behind.
        assert!(names_in(&dir.0.join("out"))
            .iter()
            .all(|n| !n.starts_with('.')));
        let other = save_video(&clip, &dir.0, "./a/../other", VideoFormat::Png, 8.0, 0).unwrap();
        assert_eq!(other, dir.0.join("other_00001_.png"));
    }

    #[test]
    fn prefixes_outside_the_output_folder_are_refused() {
        let dir = TempDir::new("escape");
        let clip = gradient_clip(1, 4, 4);
        for prefix in ["../x", "a/../../x", "/tmp/x", "", "sub/"] {
            let err = save_video(&clip, &dir.0, prefix, VideoFormat::Png, 8.0, 0).unwrap_err();
            assert!(
                matches!(err, MediaError::Prefix { .. }),
                "{prefix:?}: {err}"
            );
        }
        assert!(names_in(&dir.0).is_empty());
        assert!(!dir.0.parent().unwrap().join("x_00001_.png").exists());
    }

    #[test]
    fn failed_writes_leave_nothing_behind() {
        let dir = TempDir::new("atomic");
        let err = save_atomically(&dir.0, "sub/clip", "bin", |temp| {
            fs::write(temp, b"partial").unwrap();
            Err(MediaError::Invalid("encoder failed".to_string()))
        })
        .unwrap_err();
        assert!(err.to_string().contains("encoder failed"));
        assert!(names_in(&dir.0.join("sub")).is_empty());
        let bad_frames = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(save_video(&bad_frames, &dir.0, "clip", VideoFormat::Gif, 8.0, 0).is_err());
        let clip = gradient_clip(1, 4, 4);
        assert!(save_video(&clip, &dir.0, "clip", VideoFormat::Gif, 0.0, 0).is_err());
        assert_eq!(names_in(&dir.0), ["sub"]);
    }

    #[test]
    fn apng_delays_are_exact_fractions() {
        assert_eq!(apng_delay(8.0), (1000, 8000));
        assert_eq!(apng_delay(29.97), (1000, 29970));
        assert_eq!(apng_delay(120.0), (1, 120));
        assert_eq!(apng_delay(0.0001), (10000, 1));
        assert_eq!(
            parse_rate("30000/1001").map(|r| (r * 1000.0).round()),
            Some(29970.0)
        );
        assert_eq!(parse_rate("0/0"), None);
    }

    #[test]
    fn rotation_from_ffprobe_output() {
        let side_data: serde_json::Value = serde_json::json!({"side_data_list": [{"side_data_type": "Display Matrix", "rotation": -90}]});
        assert_eq!(quarter_turns(&side_data), 3);
        let tag = serde_json::json!({"tags": {"rotate": "180"}});
        assert_eq!(quarter_turns(&tag), 2);
        assert_eq!(quarter_turns(&serde_json::json!({})), 0);
    }

    #[test]
    fn missing_ffmpeg_is_reported_clearly() {
        let dir = TempDir::new("noffmpeg");
        let absent = Ffmpeg {
            ffmpeg: PathBuf::from("vdm-no-such-ffmpeg"),
            ffprobe: PathBuf::from("vdm-no-such-ffprobe"),
        };
        let clip = gradient_clip(2, 4, 4);
        let err =
            save_video_with(&clip, &dir.0, "clip", VideoFormat::Mp4, 8.0, 0, &absent).unwrap_err();
        assert!(matches!(err, MediaError::FfmpegMissing { .. }), "{err}");
        assert!(err.to_string().contains("install ffmpeg"), "{err}");
        assert!(names_in(&dir.0).is_empty());
        let video = dir.0.join("clip.mp4");
        fs::write(&video, b"").unwrap();
        let err = load_video_with(&video, &LoadOptions::default(), &absent).unwrap_err();
        assert!(matches!(err, MediaError::FfmpegMissing { .. }), "{err}");
    }

    #[test]
    fn mp4_round_trip_through_ffmpeg() {
        let ffmpeg = Ffmpeg::default();
        if !ffmpeg.is_available() {
            eprintln!("skipping mp4_round_trip_through_ffmpeg: ffmpeg/ffprobe not on PATH");
            return;
        }
        let dir = TempDir::new("mp4");
        let clip = gradient_clip(6, 32, 48);
        let path = save_video(&clip, &dir.0, "clip", VideoFormat::Mp4, 12.0, 0).unwrap();
        assert_eq!(path.file_name().unwrap(), "clip_00001_.mp4");
        let (loaded, fps) = load_video(&path, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.dims(), &[6, 32, 48, 3]);
        assert!((fps - 12.0).abs() < 1e-6, "fps {fps}");
        let error = mean_abs_diff(&loaded, &clip);
        assert!(error < 0.03, "H.264 mean abs error {error}");
        // Options cut decoding short; odd sizes are padded to even ones.
        let options = LoadOptions {
            frame_load_cap: 2,
            skip_first_frames: 1,
            select_every_nth: 2,
        };
        let (some, fps) = load_video(&path, &options).unwrap();
        assert_eq!(some.dims(), &[2, 32, 48, 3]);
        assert!((fps - 6.0).abs() < 1e-6);
        let odd = gradient_clip(2, 7, 9);
        let odd_path = save_video(&odd, &dir.0, "odd", VideoFormat::Mp4, 8.0, 1).unwrap();
        let (odd_loaded, _) = load_video(&odd_path, &LoadOptions::default()).unwrap();
        assert_eq!(odd_loaded.dims(), &[4, 8, 10, 3]);
    }
}
