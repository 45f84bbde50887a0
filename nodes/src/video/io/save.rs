//! Encoding GIF and APNG, and the atomic write that every output file goes through.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use candle_core::{DType, Device, Tensor};
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};

use super::naming::{next_counter, remove_stale_temporaries, resolve_prefix, temporary_name};
use super::{io_error, MediaError};

/// Frames as 8-bit RGB, ready for the encoders.
pub(super) struct Rgb8Frames {
    data: Vec<u8>,
    frames: usize,
    pub(super) width: u32,
    pub(super) height: u32,
}

impl Rgb8Frames {
    pub(super) fn from_tensor(frames: &Tensor) -> Result<Self, MediaError> {
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

    pub(super) fn iter(&self) -> impl Iterator<Item = &[u8]> {
        self.data.chunks_exact(self.frame_len())
    }
}

fn encode_error(path: &Path) -> impl FnOnce(String) -> MediaError + '_ {
    move |message| MediaError::Encode {
        path: path.to_path_buf(),
        message,
    }
}

pub(super) fn write_gif(
    path: &Path,
    rgb: &Rgb8Frames,
    fps: f64,
    loop_count: u32,
) -> Result<(), MediaError> {
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
        for (index, pixels) in rgb.iter().enumerate() {
            let mut rgba = Vec::with_capacity(pixels.len() / 3 * 4);
            for pixel in pixels.chunks_exact(3) {
                rgba.extend_from_slice(pixel);
                rgba.push(u8::MAX);
            }
            let image = RgbaImage::from_raw(rgb.width, rgb.height, rgba).ok_or_else(|| {
                encode_error(path)("frame buffer does not match its size".to_string())
            })?;
            encoder
                .encode_frame(Frame::from_parts(image, 0, 0, gif_delay(fps, index)))
                .map_err(|e| encode_error(path)(e.to_string()))?;
        }
    }
    fs::write(path, bytes).map_err(io_error(path))
}

/// The delay of frame `index` at `fps`. GIF counts delays in hundredths of a second, so a rate
/// such as 8 fps (12.5) alternates 13 and 12 to keep the clip's length exact: frame i shows from
/// round(100·i / fps) to round(100·(i + 1) / fps).
fn gif_delay(fps: f64, index: usize) -> Delay {
    let at = |i: usize| (i as f64 * 100.0 / fps).round();
    let hundredths = (at(index + 1) - at(index)).clamp(1.0, f64::from(u16::MAX));
    Delay::from_saturating_duration(Duration::from_millis(hundredths as u64 * 10))
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

pub(super) fn write_apng(
    path: &Path,
    rgb: &Rgb8Frames,
    fps: f64,
    loop_count: u32,
) -> Result<(), MediaError> {
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
        // One frame is a still image: a plain PNG that every viewer shows.
        if frames > 1 {
            encoder.set_animated(frames, plays).map_err(fail)?;
            let (numerator, denominator) = apng_delay(fps);
            encoder
                .set_frame_delay(numerator, denominator)
                .map_err(fail)?;
        }
        let mut writer = encoder.write_header().map_err(fail)?;
        for pixels in rgb.iter() {
            writer.write_image_data(pixels).map_err(fail)?;
        }
        writer.finish().map_err(fail)?;
    }
    fs::write(path, bytes).map_err(io_error(path))
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
    remove_stale_temporaries(&folder);
    let temp = folder.join(temporary_name(
        &name,
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed),
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

/// Writes a companion of the output file `output`: `{stem}{suffix}.{extension}` in its folder
/// (`clip_00001_.mp4` → `clip_00001_-audio.mp4`), through a temporary file like
/// [`save_atomically`], and never over an existing file.
pub fn save_companion(
    output: &Path,
    suffix: &str,
    write: impl FnOnce(&Path) -> Result<(), MediaError>,
) -> Result<PathBuf, MediaError> {
    static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);
    let (Some(folder), Some(stem)) = (output.parent(), output.file_stem()) else {
        return Err(MediaError::Invalid(format!(
            "{} names no file in a folder",
            output.display()
        )));
    };
    let stem = stem.to_string_lossy();
    let mut name = format!("{stem}{suffix}");
    if let Some(extension) = output.extension() {
        name = format!("{name}.{}", extension.to_string_lossy());
    }
    let target = folder.join(&name);
    let temp = folder.join(temporary_name(
        &format!("{stem}{suffix}"),
        TEMP_COUNTER.fetch_add(1, Ordering::Relaxed),
    ));
    let result = write(&temp)
        .and_then(|()| {
            fs::File::open(&temp)
                .and_then(|file| file.sync_all())
                .map_err(io_error(&temp))
        })
        .and_then(|()| {
            // A hard link fails instead of replacing an existing file, which a rename would do.
            fs::hard_link(&temp, &target)
                .or_else(|err| {
                    if err.kind() != std::io::ErrorKind::AlreadyExists && !target.exists() {
                        fs::rename(&temp, &target)
                    } else {
                        Err(err)
                    }
                })
                .map_err(io_error(&target))
        });
    let _ = fs::remove_file(&temp);
    result.map(|()| target)
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

    use crate::video::io::tests::{gradient_clip, names_in};
    use crate::video::io::{save_video, VideoFormat};
    use crate::video::TempDir;

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
    fn gif_delays_keep_the_clip_length_exact() {
        let hundredths = |fps: f64, frames: usize| -> Vec<u32> {
            (0..frames)
                .map(|i| {
                    let (numerator, denominator) = gif_delay(fps, i).numer_denom_ms();
                    numerator / denominator / 10
                })
                .collect()
        };
        assert_eq!(hundredths(8.0, 4), [13, 12, 13, 12]);
        assert_eq!(hundredths(8.0, 16).iter().sum::<u32>(), 200);
        assert_eq!(hundredths(10.0, 3), [10, 10, 10]);
        assert_eq!(hundredths(24.0, 24).iter().sum::<u32>(), 100);
    }

    #[test]
    fn apng_delays_are_exact_fractions() {
        assert_eq!(apng_delay(8.0), (1000, 8000));
        assert_eq!(apng_delay(29.97), (1000, 29970));
        assert_eq!(apng_delay(120.0), (1, 120));
        assert_eq!(apng_delay(0.0001), (10000, 1));
    }
}
