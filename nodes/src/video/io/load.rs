//! Decoding frames from a folder of images, a GIF, an (animated) PNG or a still image.

use std::cmp::Ordering;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use image::codecs::gif::GifDecoder;
use image::codecs::png::PngDecoder;
use image::{AnimationDecoder, DynamicImage, ImageDecoder, ImageReader, Limits};

use super::{io_error, FrameChoice, LoadOptions, MediaError, DEFAULT_FPS};

fn decode_error(path: &Path) -> impl FnOnce(image::ImageError) -> MediaError + '_ {
    move |err| MediaError::Decode {
        path: path.to_path_buf(),
        message: err.to_string(),
    }
}

/// Decoded frames gathered into one (frames, height, width, 3) buffer.
pub(super) struct FrameStack {
    size: Option<(u32, u32, PathBuf)>,
    data: Vec<f32>,
    count: usize,
    max_bytes: u64,
}

impl FrameStack {
    /// An empty stack that refuses frames past `max_bytes` of f32 values.
    pub(super) fn new(max_bytes: u64) -> Self {
        Self {
            size: None,
            data: Vec::new(),
            count: 0,
            max_bytes,
        }
    }

    /// Checks that one more frame of `width` × `height` is the size of the others and fits.
    fn check_size(&mut self, source: &Path, width: u32, height: u32) -> Result<(), MediaError> {
        let frames = self.count + 1;
        let needed = (frames as u64)
            .saturating_mul(u64::from(width) * u64::from(height))
            .saturating_mul(3 * std::mem::size_of::<f32>() as u64);
        if needed > self.max_bytes {
            return Err(MediaError::TooLarge {
                path: source.to_path_buf(),
                frames,
                width,
                height,
                needed,
                limit: self.max_bytes,
            });
        }
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
    pub(super) fn push_u8(
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

    pub(super) fn into_tensor(self, source: &Path) -> Result<Tensor, MediaError> {
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

/// The frames of a folder: its PNG/JPEG files (other files are ignored), in natural order of
/// their names ([`natural_cmp`]); an error when there are none.
pub fn frame_folder_files(folder: &Path) -> Result<Vec<PathBuf>, MediaError> {
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
    Ok(files)
}

pub(super) fn load_frame_folder(
    folder: &Path,
    options: &LoadOptions,
) -> Result<FrameStack, MediaError> {
    let files = frame_folder_files(folder)?;
    let mut stack = FrameStack::new(options.max_bytes);
    for (index, file) in files.iter().enumerate() {
        match options.choose(index) {
            FrameChoice::Skip => continue,
            FrameChoice::Done => break,
            FrameChoice::Take => {}
        }
        let image = decode_image(file, options)?;
        stack.push_image(file, &image)?;
    }
    Ok(stack)
}

/// The frame rate of an animation from the mean delay of the frames read (10 fps when the file
/// gives no delays, as browsers play such GIFs).
#[derive(Debug, Default)]
struct FrameTiming {
    delay_ms: f64,
    delays: usize,
}

impl FrameTiming {
    fn add(&mut self, frame: &image::Frame) {
        let (numerator, denominator) = frame.delay().numer_denom_ms();
        if denominator > 0 {
            self.delay_ms += f64::from(numerator) / f64::from(denominator);
            self.delays += 1;
        }
    }

    fn fps(&self) -> f64 {
        let mean_delay_ms = if self.delays > 0 {
            self.delay_ms / self.delays as f64
        } else {
            0.0
        };
        if mean_delay_ms > 0.0 {
            1000.0 / mean_delay_ms
        } else {
            10.0
        }
    }
}

/// Feeds the frames of an animation through `options`, returning them and the source frame rate
/// of the frames read ([`FrameTiming`]).
fn collect_animation<'a>(
    path: &Path,
    frames: image::Frames<'a>,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut stack = FrameStack::new(options.max_bytes);
    let mut timing = FrameTiming::default();
    for (index, frame) in frames.enumerate() {
        let choice = options.choose(index);
        if choice == FrameChoice::Done {
            break;
        }
        let frame = frame.map_err(decode_error(path))?;
        timing.add(&frame);
        if choice == FrameChoice::Take {
            let buffer = frame.into_buffer();
            let (width, height) = buffer.dimensions();
            stack.push_u8(path, width, height, buffer.as_raw(), 4)?;
        }
    }
    Ok((stack, timing.fps()))
}

/// The number of frames of an animation and their rate ([`FrameTiming`]), decoding each
/// without keeping it.
fn count_animation(path: &Path, frames: image::Frames<'_>) -> Result<(usize, f64), MediaError> {
    let mut timing = FrameTiming::default();
    let mut count = 0;
    for frame in frames {
        timing.add(&frame.map_err(decode_error(path))?);
        count += 1;
    }
    Ok((count, timing.fps()))
}

/// Runs a decoder, turning a panic on malformed input (the png crate indexes a short palette
/// chunk, for one) into a decoding error of `path`.
pub(super) fn without_panics<T>(
    path: &Path,
    decode: impl FnOnce() -> Result<T, MediaError>,
) -> Result<T, MediaError> {
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(decode)).unwrap_or_else(|payload| {
        let reason = payload
            .downcast_ref::<&str>()
            .map(|s| (*s).to_owned())
            .or_else(|| payload.downcast_ref::<String>().cloned())
            .unwrap_or_else(|| "unknown cause".to_owned());
        Err(MediaError::Decode {
            path: path.to_path_buf(),
            message: format!("the decoder failed on malformed data ({reason})"),
        })
    })
}

/// Refuses an image of `width` × `height` pixels taking `needed` bytes once decoded when that
/// is over the decoders' allocation cap, before anything is allocated: the image crate
/// allocates the size a header declares when it converts a decoded image.
fn check_canvas(
    path: &Path,
    (width, height): (u32, u32),
    needed: u64,
    options: &LoadOptions,
) -> Result<(), MediaError> {
    let limit = decoder_limits(options).max_alloc.unwrap_or(u64::MAX);
    if needed > limit {
        return Err(MediaError::TooLarge {
            path: path.to_path_buf(),
            frames: 1,
            width,
            height,
            needed,
            limit,
        });
    }
    Ok(())
}

/// The decoders' own cap on one allocation (a frame's canvas): the image crate's default of
/// 512 MiB, or the memory budget when lower, so that a header claiming a huge canvas fails
/// before anything is allocated.
fn decoder_limits(options: &LoadOptions) -> Limits {
    let mut limits = Limits::default();
    limits.max_alloc = Some(limits.max_alloc.unwrap_or(u64::MAX).min(options.max_bytes));
    limits
}

/// Reads one image file under [`decoder_limits`], its declared size checked first.
/// The alpha channel of a still PNG/JPEG in [0, 1] (height × width, row-major), or `None` when
/// the image has none. GIFs count as having none, as their palette transparency is not an
/// alpha channel.
pub fn load_alpha(path: &Path, options: &LoadOptions) -> Result<Option<Vec<f32>>, MediaError> {
    let is_gif = path
        .extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| e.eq_ignore_ascii_case("gif"));
    if is_gif {
        return Ok(None);
    }
    let image = decode_image(path, options)?;
    if !image.color().has_alpha() {
        return Ok(None);
    }
    Ok(Some(image.to_rgba32f().pixels().map(|p| p.0[3]).collect()))
}

fn decode_image(path: &Path, options: &LoadOptions) -> Result<DynamicImage, MediaError> {
    let mut reader = ImageReader::open(path)
        .map_err(io_error(path))?
        .with_guessed_format()
        .map_err(io_error(path))?;
    reader.limits(decoder_limits(options));
    let decoder = reader.into_decoder().map_err(decode_error(path))?;
    let (width, height) = decoder.dimensions();
    // RGBA at 16 bits per channel, the widest layout a PNG or JPEG decodes to.
    let widest = u64::from(width).saturating_mul(u64::from(height)) * 8;
    check_canvas(path, (width, height), widest, options)?;
    DynamicImage::from_decoder(decoder).map_err(decode_error(path))
}

fn open_buffered(path: &Path) -> Result<BufReader<fs::File>, MediaError> {
    Ok(BufReader::new(
        fs::File::open(path).map_err(io_error(path))?,
    ))
}

pub(super) fn load_gif(
    path: &Path,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut decoder = GifDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    decoder
        .set_limits(decoder_limits(options))
        .map_err(decode_error(path))?;
    collect_animation(path, decoder.into_frames(), options)
}

pub(super) fn load_png(
    path: &Path,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut decoder = PngDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    decoder
        .set_limits(decoder_limits(options))
        .map_err(decode_error(path))?;
    if decoder.is_apng().map_err(decode_error(path))? {
        // Frames are composited onto an RGBA canvas of the image's size.
        let (width, height) = decoder.dimensions();
        let canvas = u64::from(width).saturating_mul(u64::from(height)) * 4;
        check_canvas(path, (width, height), canvas, options)?;
        let animation = decoder.apng().map_err(decode_error(path))?;
        collect_animation(path, animation.into_frames(), options)
    } else {
        check_canvas(path, decoder.dimensions(), decoder.total_bytes(), options)?;
        let image = DynamicImage::from_decoder(decoder).map_err(decode_error(path))?;
        single_frame(path, &image, options)
    }
}

/// The frame count and rate of a GIF, as [`load_gif`] would find them loading every frame.
pub(super) fn count_gif(path: &Path, options: &LoadOptions) -> Result<(usize, f64), MediaError> {
    let mut decoder = GifDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    decoder
        .set_limits(decoder_limits(options))
        .map_err(decode_error(path))?;
    count_animation(path, decoder.into_frames())
}

/// The frame count and rate of a PNG: an animated one's frames, else one frame.
pub(super) fn count_png(path: &Path, options: &LoadOptions) -> Result<(usize, f64), MediaError> {
    let mut decoder = PngDecoder::new(open_buffered(path)?).map_err(decode_error(path))?;
    decoder
        .set_limits(decoder_limits(options))
        .map_err(decode_error(path))?;
    if decoder.is_apng().map_err(decode_error(path))? {
        let (width, height) = decoder.dimensions();
        let canvas = u64::from(width).saturating_mul(u64::from(height)) * 4;
        check_canvas(path, (width, height), canvas, options)?;
        let animation = decoder.apng().map_err(decode_error(path))?;
        count_animation(path, animation.into_frames())
    } else {
        Ok((1, DEFAULT_FPS))
    }
}

pub(super) fn load_still(
    path: &Path,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let image = decode_image(path, options)?;
    single_frame(path, &image, options)
}

fn single_frame(
    path: &Path,
    image: &DynamicImage,
    options: &LoadOptions,
) -> Result<(FrameStack, f64), MediaError> {
    let mut stack = FrameStack::new(options.max_bytes);
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

#[cfg(test)]
mod tests {
    use super::*;

    use crate::video::io::load_video;
    use crate::video::TempDir;

    fn solid_png(path: &Path, width: u32, height: u32, value: u8) {
        image::RgbImage::from_pixel(width, height, image::Rgb([value, value / 2, 255 - value]))
            .save(path)
            .unwrap();
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
}
