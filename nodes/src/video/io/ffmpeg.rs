//! Finding and running `ffmpeg` and `ffprobe`: probing a video stream, decoding it to raw RGB
//! frames and encoding frames to H.264 MP4.

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::thread::JoinHandle;

use super::load::FrameStack;
use super::save::Rgb8Frames;
use super::{io_error, FrameChoice, LoadOptions, MediaError, DEFAULT_FPS};

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

    /// ffprobe's JSON description of the first stream of `path` that `selector` picks (`v:0`,
    /// `a:0`); `purpose` says what ffprobe is needed for, should it be missing.
    fn probe_stream(
        &self,
        path: &Path,
        selector: &str,
        purpose: &str,
    ) -> Result<serde_json::Value, MediaError> {
        let mut command = Command::new(&self.ffprobe);
        command
            .args(["-v", "error", "-select_streams", selector, "-show_streams"])
            .args(["-of", "json"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = Self::spawn(&self.ffprobe, &mut command, purpose)?;
        let output = child.wait_with_output().map_err(io_error(&self.ffprobe))?;
        let fail = |message: String| Self::failure(&self.ffprobe, path, message);
        if !output.status.success() {
            return Err(fail(
                String::from_utf8_lossy(&output.stderr).trim().to_string(),
            ));
        }
        serde_json::from_slice(&output.stdout)
            .map_err(|e| fail(format!("unreadable ffprobe output: {e}")))
    }

    fn probe(&self, path: &Path) -> Result<VideoStream, MediaError> {
        let json = self.probe_stream(path, "v:0", "read videos")?;
        let fail = |message: String| Self::failure(&self.ffprobe, path, message);
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

    /// The number of frames of a video's first video stream (its packets, counted without
    /// decoding) and their rate.
    pub(super) fn count_frames(&self, path: &Path) -> Result<(usize, f64), MediaError> {
        let stream = self.probe(path)?;
        let mut command = Command::new(&self.ffprobe);
        command
            .args(["-v", "error", "-select_streams", "v:0", "-count_packets"])
            .args(["-show_entries", "stream=nb_read_packets", "-of", "csv=p=0"])
            .arg(path)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = Self::spawn(&self.ffprobe, &mut command, "read videos")?;
        let output = child.wait_with_output().map_err(io_error(&self.ffprobe))?;
        let text = String::from_utf8_lossy(&output.stdout);
        let count = text
            .split(|c: char| !c.is_ascii_digit())
            .find(|part| !part.is_empty())
            .and_then(|digits| digits.parse::<usize>().ok());
        match count {
            Some(count) if output.status.success() => Ok((count, stream.fps)),
            _ => Err(Self::failure(
                &self.ffprobe,
                path,
                format!(
                    "cannot count the frames: {}",
                    String::from_utf8_lossy(&output.stderr).trim()
                ),
            )),
        }
    }

    pub(super) fn decode(
        &self,
        path: &Path,
        options: &LoadOptions,
    ) -> Result<(FrameStack, f64), MediaError> {
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
        let mut stack = FrameStack::new(options.max_bytes);
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

    pub(super) fn encode_h264(
        &self,
        path: &Path,
        rgb: &Rgb8Frames,
        fps: f64,
        loop_count: u32,
    ) -> Result<(), MediaError> {
        self.encode_h264_with(path, rgb, fps, loop_count, &H264Settings::default())
    }

    /// H.264 in MP4 with `settings`; odd sizes are padded by one black row/column. The clip
    /// is written `loop_count` + 1 times over, as an MP4 cannot loop.
    pub(super) fn encode_h264_with(
        &self,
        path: &Path,
        rgb: &Rgb8Frames,
        fps: f64,
        loop_count: u32,
        settings: &H264Settings,
    ) -> Result<(), MediaError> {
        let crf = settings.crf.to_string();
        let output = [
            "-vf",
            "pad=ceil(iw/2)*2:ceil(ih/2)*2",
            "-c:v",
            "libx264",
            "-pix_fmt",
            settings.pix_fmt.as_str(),
            "-crf",
            &crf,
            "-f",
            "mp4",
        ];
        self.encode(path, rgb, fps, loop_count + 1, &output, "write MP4 videos")
    }

    /// An animated WebP through ffmpeg's libwebp; `loop_count` 0 loops forever, n plays n
    /// times, as the format's loop field means.
    pub(super) fn encode_webp(
        &self,
        path: &Path,
        rgb: &Rgb8Frames,
        fps: f64,
        loop_count: u32,
        settings: &WebpSettings,
    ) -> Result<(), MediaError> {
        let quality = settings.quality.to_string();
        let loops = loop_count.to_string();
        let lossless = if settings.lossless { "1" } else { "0" };
        let output = [
            "-c:v",
            "libwebp_anim",
            "-lossless",
            lossless,
            "-quality",
            &quality,
            "-loop",
            &loops,
            "-f",
            "webp",
        ];
        self.encode(path, rgb, fps, 1, &output, "write animated WebP images")
    }

    /// Pipes `copies` passes over the frames into ffmpeg as raw RGB at `fps` and has it write
    /// `path` with `output_args`.
    fn encode(
        &self,
        path: &Path,
        rgb: &Rgb8Frames,
        fps: f64,
        copies: u32,
        output_args: &[&str],
        purpose: &str,
    ) -> Result<(), MediaError> {
        let mut command = Command::new(&self.ffmpeg);
        command
            .args([
                "-v", "error", "-nostdin", "-y", "-f", "rawvideo", "-pix_fmt", "rgb24",
            ])
            .args(["-s", &format!("{}x{}", rgb.width, rgb.height)])
            .args(["-framerate", &fps.to_string(), "-i", "-"])
            .args(output_args)
            .arg(path);
        self.run_fed(&mut command, path, purpose, |stdin| {
            for _ in 0..copies {
                for pixels in rgb.iter() {
                    stdin.write_all(pixels)?;
                }
            }
            Ok(())
        })
    }

    /// Runs ffmpeg's `command` writing `path`, with `feed` writing its standard input; fails
    /// with ffmpeg's messages when it does.
    fn run_fed(
        &self,
        command: &mut Command,
        path: &Path,
        purpose: &str,
        feed: impl FnOnce(&mut std::process::ChildStdin) -> std::io::Result<()>,
    ) -> Result<(), MediaError> {
        command
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        let mut child = Self::spawn(&self.ffmpeg, command, purpose)?;
        let stderr = drain(child.stderr.take());
        let write_error = child
            .stdin
            .take()
            .and_then(|mut stdin| feed(&mut stdin).err());
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

    /// The first audio stream of `path` from `start` seconds on, for `duration` seconds (0: to
    /// the end), as f32 samples; `None` when the file has no audio stream.
    pub fn decode_audio(
        &self,
        path: &Path,
        start: f64,
        duration: f64,
    ) -> Result<Option<AudioSamples>, MediaError> {
        let json = self.probe_stream(path, "a:0", "read sound")?;
        let fail = |program: &Path, message: String| Self::failure(program, path, message);
        let Some(stream) = json.get("streams").and_then(|s| s.get(0)) else {
            return Ok(None);
        };
        let sample_rate = stream
            .get("sample_rate")
            .and_then(|r| r.as_str())
            .and_then(|r| r.parse::<u32>().ok())
            .filter(|&r| r > 0)
            .ok_or_else(|| fail(&self.ffprobe, "ffprobe reported no sample rate".to_string()))?;
        let channels = stream
            .get("channels")
            .and_then(|c| c.as_u64())
            .and_then(|c| usize::try_from(c).ok())
            .filter(|&c| c > 0)
            .ok_or_else(|| fail(&self.ffprobe, "ffprobe reported no channels".to_string()))?;

        let mut command = Command::new(&self.ffmpeg);
        command.args(["-v", "error", "-nostdin", "-i"]).arg(path);
        if start > 0.0 {
            command.args(["-ss", &start.to_string()]);
        }
        if duration > 0.0 {
            command.args(["-t", &duration.to_string()]);
        }
        command
            .args(["-map", "0:a:0", "-f", "f32le", "-ac", &channels.to_string()])
            .args(["-ar", &sample_rate.to_string(), "-"])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        let child = Self::spawn(&self.ffmpeg, &mut command, "read sound")?;
        let output = child.wait_with_output().map_err(io_error(&self.ffmpeg))?;
        if !output.status.success() {
            let message = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return Err(fail(&self.ffmpeg, message));
        }
        let samples = output
            .stdout
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]]))
            .collect();
        Ok(Some(AudioSamples {
            samples,
            channels,
            sample_rate,
        }))
    }

    /// Writes `path`: the video stream of `video` copied, with `audio` encoded as AAC. The
    /// sound is cut to the video's length; with `pad_to` it is first padded with silence to
    /// that many seconds, so that a shorter sound does not cut the video.
    pub(super) fn mux_audio(
        &self,
        video: &Path,
        audio: &AudioSamples,
        pad_to: Option<f64>,
        path: &Path,
    ) -> Result<(), MediaError> {
        let mut command = Command::new(&self.ffmpeg);
        command
            .args(["-v", "error", "-nostdin", "-y", "-i"])
            .arg(video)
            .args(["-ar", &audio.sample_rate.to_string()])
            .args(["-ac", &audio.channels.to_string()])
            .args(["-f", "f32le", "-i", "-", "-map", "0:v:0", "-map", "1:a:0"])
            .args([
                "-c:v",
                "copy",
                "-c:a",
                "aac",
                "-movflags",
                "use_metadata_tags",
            ]);
        if let Some(seconds) = pad_to {
            command.args(["-af", &format!("apad=whole_dur={seconds}")]);
        }
        command.args(["-shortest", "-f", "mp4"]).arg(path);
        let bytes: Vec<u8> = audio.samples.iter().flat_map(|s| s.to_le_bytes()).collect();
        self.run_fed(&mut command, path, "add sound to videos", |stdin| {
            stdin.write_all(&bytes)
        })
    }
}

/// Sound as interleaved f32 samples: `channels` values per instant, `sample_rate` instants
/// per second.
#[derive(Debug, Clone, PartialEq)]
pub struct AudioSamples {
    pub samples: Vec<f32>,
    pub channels: usize,
    pub sample_rate: u32,
}

/// Encoder settings of an H.264 MP4: the constant rate factor (0 lossless … 51 worst; higher
/// values are taken as 51 by x264) and the pixel format.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct H264Settings {
    pub crf: u32,
    pub pix_fmt: String,
}

impl Default for H264Settings {
    fn default() -> Self {
        Self {
            crf: 19,
            pix_fmt: "yuv420p".to_string(),
        }
    }
}

/// Encoder settings of an animated WebP: lossless, or lossy at `quality` (0–100).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct WebpSettings {
    pub lossless: bool,
    pub quality: u32,
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

#[cfg(test)]
mod tests {
    use super::*;

    use std::fs;

    use crate::video::io::tests::{gradient_clip, mean_abs_diff, names_in};
    use crate::video::io::{
        load_video, load_video_with, save_h264, save_video, save_video_with, save_webp,
        save_with_audio, VideoFormat,
    };
    use crate::video::TempDir;

    #[test]
    fn frame_rates_from_ffprobe_output() {
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
            ..LoadOptions::default()
        };
        let (some, fps) = load_video(&path, &options).unwrap();
        assert_eq!(some.dims(), &[2, 32, 48, 3]);
        assert!((fps - 6.0).abs() < 1e-6);
        let odd = gradient_clip(2, 7, 9);
        let odd_path = save_video(&odd, &dir.0, "odd", VideoFormat::Mp4, 8.0, 1).unwrap();
        let (odd_loaded, _) = load_video(&odd_path, &LoadOptions::default()).unwrap();
        assert_eq!(odd_loaded.dims(), &[4, 8, 10, 3]);
    }

    /// The canvas size, loop count and number of frames of an animated WebP, from its chunks.
    fn webp_animation(bytes: &[u8]) -> (u32, u32, u16, usize) {
        assert_eq!(&bytes[..4], b"RIFF");
        assert_eq!(&bytes[8..12], b"WEBP");
        let (mut size, mut loops, mut frames) = ((0, 0), 0, 0);
        let mut at = 12;
        while at + 8 <= bytes.len() {
            let tag = &bytes[at..at + 4];
            let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
            let body = &bytes[at + 8..at + 8 + len];
            let u24 = |b: &[u8]| u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16;
            match tag {
                b"VP8X" => size = (u24(&body[4..7]) + 1, u24(&body[7..10]) + 1),
                b"ANIM" => loops = u16::from_le_bytes([body[4], body[5]]),
                b"ANMF" => frames += 1,
                _ => {}
            }
            at += 8 + len + len % 2;
        }
        (size.0, size.1, loops, frames)
    }

    #[test]
    fn animated_webp_and_h264_settings_through_ffmpeg() {
        let ffmpeg = Ffmpeg::default();
        if !ffmpeg.is_available() {
            eprintln!("skipping animated_webp_and_h264_settings_through_ffmpeg: ffmpeg/ffprobe not on PATH");
            return;
        }
        let dir = TempDir::new("webp");
        let clip = gradient_clip(5, 12, 20);
        for (lossless, loops) in [(true, 0u32), (false, 3)] {
            let settings = WebpSettings {
                lossless,
                quality: 80,
            };
            let path = save_webp(&clip, &dir.0, "anim", 8.0, loops, &settings, &ffmpeg).unwrap();
            assert_eq!(path.extension().unwrap(), "webp");
            let bytes = fs::read(&path).unwrap();
            assert_eq!(webp_animation(&bytes), (20, 12, loops as u16, 5));
        }
        let settings = H264Settings {
            crf: 30,
            pix_fmt: "yuv420p10le".to_string(),
        };
        let path = save_h264(&clip, &dir.0, "clip", 8.0, 1, &settings, &ffmpeg).unwrap();
        let (loaded, _) = load_video(&path, &LoadOptions::default()).unwrap();
        assert_eq!(loaded.dims(), &[10, 12, 20, 3]);
        let absent = Ffmpeg {
            ffmpeg: PathBuf::from("vdm-no-such-ffmpeg"),
            ffprobe: PathBuf::from("vdm-no-such-ffprobe"),
        };
        let settings = WebpSettings {
            lossless: true,
            quality: 80,
        };
        let err = save_webp(&clip, &dir.0, "none", 8.0, 0, &settings, &absent).unwrap_err();
        assert!(matches!(err, MediaError::FfmpegMissing { .. }), "{err}");
    }

    /// Writes a one-second clip of 8 frames with a 440 Hz mono tone at 8 kHz.
    fn clip_with_tone(dir: &Path) -> PathBuf {
        let path = dir.join("tone.mp4");
        let status = Command::new("ffmpeg")
            .args(["-v", "error", "-nostdin", "-y", "-f", "lavfi"])
            .args(["-i", "testsrc=size=32x24:rate=8:duration=1"])
            .args([
                "-f",
                "lavfi",
                "-i",
                "sine=frequency=440:sample_rate=8000:duration=1",
            ])
            .args([
                "-c:v",
                "libx264",
                "-pix_fmt",
                "yuv420p",
                "-c:a",
                "aac",
                "-shortest",
            ])
            .arg(&path)
            .status()
            .unwrap();
        assert!(status.success());
        path
    }

    #[test]
    fn sound_is_read_cut_and_added_through_ffmpeg() {
        let ffmpeg = Ffmpeg::default();
        if !ffmpeg.is_available() {
            eprintln!(
                "skipping sound_is_read_cut_and_added_through_ffmpeg: ffmpeg/ffprobe not on PATH"
            );
            return;
        }
        let dir = TempDir::new("sound");
        let with_tone = clip_with_tone(&dir.0);
        let all = ffmpeg.decode_audio(&with_tone, 0.0, 0.0).unwrap().unwrap();
        assert_eq!((all.channels, all.sample_rate), (1, 8000));
        // AAC adds priming and padding: about a second, give or take a frame of 1024.
        assert!(
            all.samples.len().abs_diff(8000) < 1100,
            "{}",
            all.samples.len()
        );
        let peak = all.samples.iter().fold(0f32, |m, s| m.max(s.abs()));
        assert!(peak > 0.1, "peak {peak}");
        let part = ffmpeg.decode_audio(&with_tone, 0.5, 0.25).unwrap().unwrap();
        assert!(
            part.samples.len().abs_diff(2000) < 50,
            "{}",
            part.samples.len()
        );

        let silent = save_video(
            &gradient_clip(4, 16, 16),
            &dir.0,
            "clip",
            VideoFormat::Mp4,
            8.0,
            0,
        )
        .unwrap();
        assert_eq!(ffmpeg.decode_audio(&silent, 0.0, 0.0).unwrap(), None);
        let muxed = save_with_audio(&silent, &part, Some(1.5), &ffmpeg).unwrap();
        assert_eq!(muxed.file_name().unwrap(), "clip_00001_-audio.mp4");
        let added = ffmpeg.decode_audio(&muxed, 0.0, 0.0).unwrap().unwrap();
        assert_eq!((added.channels, added.sample_rate), (1, 8000));
        // Never over an existing file.
        assert!(save_with_audio(&silent, &part, None, &ffmpeg).is_err());
        assert_eq!(
            names_in(&dir.0),
            ["clip_00001_-audio.mp4", "clip_00001_.mp4", "tone.mp4"]
        );
    }
}
