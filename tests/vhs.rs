//! Video Helper Suite's nodes in API-format workflows: loading a clip or a folder of images,
//! writing GIF, WebP and MP4 with the reference's `gifs` report, and errors that name the
//! input at fault. The descriptors are checked against the reference's `INPUT_TYPES`
//! (ComfyUI-VideoHelperSuite 4ee72c065db22c9d96c2427954dc69e7b908444b).

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use image::AnimationDecoder;
use serde_json::{json, Value as Json};
use vdm::{Executor, PluginSet, RunError, RunSummary, Workflow};

fn plugins() -> PluginSet {
    let set = PluginSet::load(&[], &[common::plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    set
}

fn ffmpeg_available() -> bool {
    ["ffmpeg", "ffprobe"].iter().all(|program| {
        Command::new(program)
            .arg("-version")
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    })
}

/// A GIF of `frames` frames of 40×24 at 10 fps whose red channel tells the frame: 20 × index.
fn write_numbered_gif(dir: &Path, frames: u32) -> PathBuf {
    let path = dir.join("numbered.gif");
    let file = std::fs::File::create(&path).unwrap();
    let mut encoder = image::codecs::gif::GifEncoder::new(file);
    for f in 0..frames {
        let img = image::RgbaImage::from_pixel(40, 24, image::Rgba([(f * 20) as u8, 64, 128, 255]));
        let delay = image::Delay::from_numer_denom_ms(100, 1);
        encoder
            .encode_frame(image::Frame::from_parts(img, 0, 0, delay))
            .unwrap();
    }
    path
}

/// The frames of a GIF as (width, height, red value of the first pixel) per frame.
fn gif_frames(path: &Path) -> Vec<(u32, u32, u8)> {
    let file = std::io::BufReader::new(std::fs::File::open(path).unwrap());
    let decoder = image::codecs::gif::GifDecoder::new(file).unwrap();
    decoder
        .into_frames()
        .map(|frame| {
            let buffer = frame.unwrap().into_buffer();
            (buffer.width(), buffer.height(), buffer.get_pixel(0, 0).0[0])
        })
        .collect()
}

/// The canvas size and frame count of an animated WebP, from its chunks.
fn webp_animation(path: &Path) -> (u32, u32, usize) {
    let bytes = std::fs::read(path).unwrap();
    assert_eq!(&bytes[8..12], b"WEBP");
    let (mut size, mut frames, mut at) = ((0, 0), 0, 12);
    let u24 = |b: &[u8]| u32::from(b[0]) | u32::from(b[1]) << 8 | u32::from(b[2]) << 16;
    while at + 8 <= bytes.len() {
        let len = u32::from_le_bytes(bytes[at + 4..at + 8].try_into().unwrap()) as usize;
        let body = &bytes[at + 8..at + 8 + len];
        match &bytes[at..at + 4] {
            b"VP8X" => size = (u24(&body[4..7]) + 1, u24(&body[7..10]) + 1),
            b"ANMF" => frames += 1,
            _ => {}
        }
        at += 8 + len + len % 2;
    }
    (size.0, size.1, frames)
}

struct Folders {
    _root: tempfile::TempDir,
    input: PathBuf,
    output: PathBuf,
    temp: PathBuf,
}

fn folders() -> Folders {
    let root = tempfile::tempdir().unwrap();
    let [input, output, temp] = ["input", "output", "temp"].map(|name| root.path().join(name));
    for folder in [&input, &output, &temp] {
        std::fs::create_dir_all(folder).unwrap();
    }
    Folders {
        _root: root,
        input,
        output,
        temp,
    }
}

fn executor<'a>(set: &'a PluginSet, folders: &Folders) -> Executor<'a> {
    Executor::new(set, &vdm::events::Silent)
        .with_setting("input_dir", folders.input.to_string_lossy())
        .with_setting("output_dir", folders.output.to_string_lossy())
        .with_setting("temp_dir", folders.temp.to_string_lossy())
        .with_setting("device", "cpu")
}

/// Validates `workflow` (no errors and no ignored inputs) and runs it.
fn run(set: &PluginSet, folders: &Folders, workflow: Json) -> RunSummary {
    let workflow = Workflow::from_json(workflow).unwrap();
    let executor = executor(set, folders);
    let report = executor.validate(&workflow);
    assert!(report.is_ok(), "{}", report.to_text());
    assert!(report.warnings.is_empty(), "{:?}", report.warnings);
    executor.run(&workflow).unwrap_or_else(|e| panic!("{e}"))
}

fn load_video(video: &str, extra: Json) -> Json {
    let mut inputs = json!({
        "video": video,
        "force_rate": 0,
        "custom_width": 0,
        "custom_height": 0,
        "frame_load_cap": 0,
        "skip_first_frames": 0,
        "select_every_nth": 1,
    });
    for (key, value) in extra.as_object().unwrap() {
        inputs[key] = value.clone();
    }
    json!({"class_type": "VHS_LoadVideo", "inputs": inputs})
}

fn combine(images: Json, format: &str, extra: Json) -> Json {
    let mut inputs = json!({
        "images": images,
        "frame_rate": 8,
        "loop_count": 0,
        "filename_prefix": "vhs/clip",
        "format": format,
        "pingpong": false,
        "save_output": true,
    });
    for (key, value) in extra.as_object().unwrap() {
        inputs[key] = value.clone();
    }
    json!({"class_type": "VHS_VideoCombine", "inputs": inputs})
}

/// The single `gifs` entry of a Video Combine's report, checked for the reference's keys.
fn gifs_entry(summary: &RunSummary, node: &str) -> Json {
    let gifs = summary.ui[node]["gifs"].as_array().unwrap();
    assert_eq!(gifs.len(), 1, "{gifs:?}");
    let entry = gifs[0].clone();
    let mut keys: Vec<&str> = entry
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort();
    assert_eq!(
        keys,
        [
            "filename",
            "format",
            "frame_rate",
            "fullpath",
            "subfolder",
            "type"
        ]
    );
    entry
}

#[test]
fn load_video_resamples_selects_and_resizes_as_videohelpersuite() {
    let folders = folders();
    write_numbered_gif(&folders.input, 12);
    let set = plugins();
    // 10 fps → 5 fps keeps source frames 0 2 4 6 8 10; skipping one and keeping every other
    // leaves 2 6 10; the cap keeps 2 and 6. Width 20 keeps the 5:3 aspect: 20×12.
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({
                "force_rate": 5, "custom_width": 20, "frame_load_cap": 2,
                "skip_first_frames": 1, "select_every_nth": 2, "format": "None"
            })),
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    let entry = gifs_entry(&summary, "2");
    assert_eq!(entry["filename"], "clip_00001_.gif");
    assert_eq!(entry["subfolder"], "vhs");
    assert_eq!(entry["type"], "output");
    assert_eq!(entry["format"], "image/gif");
    assert_eq!(entry["frame_rate"], 8);
    let path = PathBuf::from(entry["fullpath"].as_str().unwrap());
    assert!(path.starts_with(&folders.output), "{}", path.display());
    let frames = gif_frames(&path);
    assert_eq!(frames.len(), 2, "{frames:?}");
    for ((width, height, red), source) in frames.into_iter().zip([2u8, 6]) {
        assert_eq!((width, height), (20, 12));
        assert!(
            red.abs_diff(source * 20) <= 3,
            "red {red} for source frame {source}"
        );
    }

    // 10 fps → 20 fps repeats every frame after the first.
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({"force_rate": 20, "frame_load_cap": 5})),
            "2": combine(json!(["1", 0]), "image/gif", json!({"filename_prefix": "up"})),
        }),
    );
    let path = PathBuf::from(gifs_entry(&summary, "2")["fullpath"].as_str().unwrap());
    let reds: Vec<u8> = gif_frames(&path).into_iter().map(|f| f.2).collect();
    let expected = [0u8, 1, 1, 2, 2].map(|f| f * 20);
    assert_eq!(reds.len(), expected.len(), "{reds:?}");
    for (red, want) in reds.iter().zip(expected) {
        assert!(red.abs_diff(want) <= 3, "{reds:?}");
    }

    // The editor's default load format, AnimateDiff, rounds sizes to multiples of 8.
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({"custom_width": 20, "format": "AnimateDiff"})),
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    let path = PathBuf::from(gifs_entry(&summary, "2")["fullpath"].as_str().unwrap());
    assert!(path.ends_with("vhs/clip_00002_.gif"), "{}", path.display());
    let frames = gif_frames(&path);
    assert_eq!(frames.len(), 12);
    assert_eq!((frames[0].0, frames[0].1), (24, 16));
}

#[test]
fn load_images_pingpong_and_temporary_output() {
    let folders = folders();
    let frames_dir = folders.input.join("frames");
    std::fs::create_dir_all(&frames_dir).unwrap();
    for f in 0..5u8 {
        image::RgbImage::from_pixel(16, 8, image::Rgb([f * 40, 0, 0]))
            .save(frames_dir.join(format!("frame_{f}.png")))
            .unwrap();
    }
    let set = plugins();
    let summary = run(
        &set,
        &folders,
        json!({
            "1": {"class_type": "VHS_LoadImages", "inputs": {
                "directory": "frames", "image_load_cap": 4, "skip_first_images": 1,
                "select_every_nth": 1
            }},
            "2": combine(json!(["1", 0]), "image/gif", json!({
                "pingpong": true, "save_output": false, "frame_rate": 12.5
            })),
        }),
    );
    let entry = gifs_entry(&summary, "2");
    assert_eq!(entry["type"], "temp");
    assert_eq!(entry["frame_rate"], 12.5);
    let path = PathBuf::from(entry["fullpath"].as_str().unwrap());
    assert!(path.starts_with(&folders.temp), "{}", path.display());
    assert!(std::fs::read_dir(&folders.output).unwrap().next().is_none());
    // Frames 1 2 3 4 there and 3 2 back.
    let reds: Vec<u8> = gif_frames(&path).into_iter().map(|f| f.2).collect();
    let expected = [1u8, 2, 3, 4, 3, 2].map(|f| f * 40);
    assert_eq!(reds.len(), expected.len(), "{reds:?}");
    for (red, want) in reds.iter().zip(expected) {
        assert!(red.abs_diff(want) <= 3, "{reds:?}");
    }
}

#[test]
fn webp_and_h264_through_ffmpeg_with_format_widgets() {
    if !ffmpeg_available() {
        eprintln!(
            "skipping webp_and_h264_through_ffmpeg_with_format_widgets: ffmpeg/ffprobe not on PATH"
        );
        return;
    }
    let folders = folders();
    write_numbered_gif(&folders.input, 6);
    let set = plugins();
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({"format": "AnimateDiff"})),
            "2": combine(json!(["1", 0]), "image/webp", json!({"lossless": false, "loop_count": 2})),
            "3": combine(json!(["1", 0]), "video/h264-mp4", json!({
                "pix_fmt": "yuv420p", "crf": 23, "save_metadata": true, "trim_to_audio": false,
                "audio": ["1", 2], "pingpong": true
            })),
        }),
    );
    let webp = gifs_entry(&summary, "2");
    assert_eq!(webp["format"], "image/webp");
    assert!(webp["filename"].as_str().unwrap().ends_with(".webp"));
    let webp_path = PathBuf::from(webp["fullpath"].as_str().unwrap());
    assert_eq!(webp_animation(&webp_path), (40, 24, 6));

    let mp4 = gifs_entry(&summary, "3");
    assert_eq!(mp4["format"], "video/h264-mp4");
    let mp4_path = mp4["fullpath"].as_str().unwrap();
    assert!(mp4_path.ends_with(".mp4"), "{mp4_path}");
    // Read back through Load Video: 6 frames and 4 back.
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video(mp4_path, json!({})),
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    let path = PathBuf::from(gifs_entry(&summary, "2")["fullpath"].as_str().unwrap());
    let frames = gif_frames(&path);
    assert_eq!(frames.len(), 10);
    assert_eq!((frames[0].0, frames[0].1), (40, 24));
}

/// The node and input an error of `workflow` names, from validation or from the run.
fn error_of(set: &PluginSet, folders: &Folders, workflow: Json) -> (String, String, String) {
    let workflow = Workflow::from_json(workflow).unwrap();
    match executor(set, folders).run(&workflow) {
        Err(RunError::Invalid(report)) => {
            let (node, errors) = report.node_errors.iter().next().expect("a node error");
            let issue = &errors.errors[0];
            (
                node.clone(),
                issue.input_name().unwrap_or_default().to_owned(),
                format!("{}: {}", issue.message, issue.details),
            )
        }
        Err(RunError::Node(e)) => (
            e.node_id.to_string(),
            e.input
                .clone()
                .into_option()
                .map(|s| s.into_string())
                .unwrap_or_default(),
            e.message.to_string(),
        ),
        other => panic!("expected an error, got {other:?}"),
    }
}

#[test]
fn bad_inputs_are_errors_of_the_input() {
    let folders = folders();
    write_numbered_gif(&folders.input, 3);
    std::fs::create_dir_all(folders.input.join("empty")).unwrap();
    let set = plugins();

    let (node, input, message) = error_of(
        &set,
        &folders,
        json!({
            "1": load_video("missing.mp4", json!({})),
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    assert_eq!((node.as_str(), input.as_str()), ("1", "video"), "{message}");
    assert!(message.contains("missing.mp4"), "{message}");

    let (node, input, message) = error_of(
        &set,
        &folders,
        json!({
            "1": {"class_type": "VHS_LoadImages", "inputs": {"directory": "empty"}},
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    assert_eq!(
        (node.as_str(), input.as_str()),
        ("1", "directory"),
        "{message}"
    );
    assert!(message.contains("no .png"), "{message}");

    let (node, input, message) = error_of(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({})),
            "2": combine(json!(["1", 0]), "video/av1-webm", json!({})),
        }),
    );
    assert_eq!(
        (node.as_str(), input.as_str()),
        ("2", "format"),
        "{message}"
    );

    let (node, input, message) = error_of(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({"skip_first_frames": 5})),
            "2": combine(json!(["1", 0]), "image/gif", json!({})),
        }),
    );
    assert_eq!((node.as_str(), input.as_str()), ("1", "video"), "{message}");
    assert!(message.contains("no frames left"), "{message}");

    let (node, input, message) = error_of(
        &set,
        &folders,
        json!({
            "1": load_video("numbered.gif", json!({})),
            "2": combine(json!(["1", 0]), "image/gif", json!({"filename_prefix": "../out"})),
        }),
    );
    assert_eq!(
        (node.as_str(), input.as_str()),
        ("2", "filename_prefix"),
        "{message}"
    );
}

/// One input of `/object_info`: its type (or options) and its settings.
fn input<'a>(info: &'a Json, class: &str, group: &str, name: &str) -> &'a Json {
    let found = &info[class]["input"][group][name];
    assert!(found.is_array(), "{class}: no {group} input {name}");
    found
}

/// Type, default, min, max and step of an input, as the reference declares them.
fn assert_number(info: &Json, class: &str, group: &str, name: &str, expected: Json) {
    let spec = input(info, class, group, name);
    let settings = &spec[1];
    let mut found = json!({"type": spec[0], "default": settings["default"]});
    for key in ["min", "max", "step"] {
        if expected.get(key).is_some() {
            found[key] = settings[key].clone();
        }
    }
    assert_eq!(found, expected, "{class}.{name}");
}

#[test]
fn descriptors_match_videohelpersuite_input_types() {
    let set = plugins();
    let info = vdm::object_info::object_info(set.descriptors(), "vdm_nodes");
    let order = |class: &str, group: &str| info[class]["input_order"][group].clone();
    let outputs = |class: &str| {
        (
            info[class]["output"].clone(),
            info[class]["output_name"].clone(),
        )
    };
    const BIG: i64 = (1 << 53) - 1;

    let class = "VHS_LoadVideo";
    assert_eq!(
        order(class, "required"),
        json!([
            "video",
            "force_rate",
            "custom_width",
            "custom_height",
            "frame_load_cap",
            "skip_first_frames",
            "select_every_nth"
        ])
    );
    assert_eq!(
        order(class, "optional"),
        json!(["meta_batch", "vae", "format"])
    );
    let req = "required";
    assert_number(
        &info,
        class,
        req,
        "force_rate",
        json!({"type": "FLOAT", "default": 0.0, "min": 0.0, "max": 60.0, "step": 1.0}),
    );
    for dim in ["custom_width", "custom_height"] {
        assert_number(
            &info,
            class,
            req,
            dim,
            json!({"type": "INT", "default": 0, "min": 0, "max": 8192}),
        );
    }
    assert_number(
        &info,
        class,
        req,
        "frame_load_cap",
        json!({"type": "INT", "default": 0, "min": 0, "max": BIG, "step": 1}),
    );
    assert_number(
        &info,
        class,
        req,
        "skip_first_frames",
        json!({"type": "INT", "default": 0, "min": 0, "max": BIG, "step": 1}),
    );
    assert_number(
        &info,
        class,
        req,
        "select_every_nth",
        json!({"type": "INT", "default": 1, "min": 1, "max": BIG, "step": 1}),
    );
    let format = input(&info, class, "optional", "format");
    assert_eq!(
        format[0],
        json!([
            "None",
            "AnimateDiff",
            "Mochi",
            "LTXV",
            "Hunyuan",
            "Cosmos",
            "Wan"
        ])
    );
    assert_eq!(format[1]["default"], "AnimateDiff");
    assert_eq!(
        input(&info, class, "optional", "meta_batch")[0],
        "VHS_BatchManager"
    );
    assert_eq!(input(&info, class, "optional", "vae")[0], "VAE");
    assert_eq!(
        outputs(class),
        (
            json!(["IMAGE", "INT", "AUDIO", "VHS_VIDEOINFO"]),
            json!(["IMAGE", "frame_count", "audio", "video_info"])
        )
    );

    let class = "VHS_LoadImages";
    assert_eq!(order(class, "required"), json!(["directory"]));
    assert_eq!(
        order(class, "optional"),
        json!([
            "image_load_cap",
            "skip_first_images",
            "select_every_nth",
            "meta_batch"
        ])
    );
    let opt = "optional";
    assert_number(
        &info,
        class,
        opt,
        "image_load_cap",
        json!({"type": "INT", "default": 0, "min": 0, "max": BIG, "step": 1}),
    );
    assert_number(
        &info,
        class,
        opt,
        "skip_first_images",
        json!({"type": "INT", "default": 0, "min": 0, "max": BIG, "step": 1}),
    );
    assert_number(
        &info,
        class,
        opt,
        "select_every_nth",
        json!({"type": "INT", "default": 1, "min": 1, "max": BIG, "step": 1}),
    );
    assert_eq!(
        outputs(class),
        (
            json!(["IMAGE", "MASK", "INT"]),
            json!(["IMAGE", "MASK", "frame_count"])
        )
    );

    let class = "VHS_VideoCombine";
    assert_eq!(
        order(class, "required"),
        json!([
            "images",
            "frame_rate",
            "loop_count",
            "filename_prefix",
            "format",
            "pingpong",
            "save_output"
        ])
    );
    // The reference's optional sockets, then the widgets its formats add (as optional inputs).
    assert_eq!(
        order(class, "optional"),
        json!([
            "audio",
            "meta_batch",
            "vae",
            "pix_fmt",
            "crf",
            "save_metadata",
            "trim_to_audio",
            "lossless"
        ])
    );
    assert_eq!(input(&info, class, req, "images")[0], "IMAGE");
    assert_number(
        &info,
        class,
        req,
        "frame_rate",
        json!({"type": "FLOAT", "default": 8.0, "min": 1.0, "step": 1.0}),
    );
    assert_number(
        &info,
        class,
        req,
        "loop_count",
        json!({"type": "INT", "default": 0, "min": 0, "max": 100, "step": 1}),
    );
    assert_eq!(
        input(&info, class, req, "filename_prefix")[1]["default"],
        "AnimateDiff"
    );
    let formats = input(&info, class, req, "format");
    assert_eq!(formats[0][0], "image/gif");
    assert_eq!(formats[0][1], "image/webp");
    assert!(formats[0]
        .as_array()
        .unwrap()
        .contains(&json!("video/h264-mp4")));
    assert_eq!(input(&info, class, req, "pingpong")[1]["default"], false);
    assert_eq!(input(&info, class, req, "save_output")[1]["default"], true);
    // The format widgets the reference adds for image/webp and video/h264-mp4.
    assert_eq!(input(&info, class, opt, "lossless")[1]["default"], true);
    let pix_fmt = input(&info, class, opt, "pix_fmt");
    assert_eq!(pix_fmt[0], json!(["yuv420p", "yuv420p10le"]));
    assert_number(
        &info,
        class,
        opt,
        "crf",
        json!({"type": "INT", "default": 19, "min": 0, "max": 100, "step": 1}),
    );
    assert_eq!(
        input(&info, class, opt, "save_metadata")[1]["default"],
        true
    );
    assert_eq!(
        input(&info, class, opt, "trim_to_audio")[1]["default"],
        false
    );
    assert_eq!(input(&info, class, opt, "audio")[0], "AUDIO");
    assert_eq!(
        outputs(class),
        (json!(["VHS_FILENAMES"]), json!(["Filenames"]))
    );
    assert_eq!(info[class]["output_node"], true);
}

#[test]
fn sound_of_a_loaded_video_goes_into_the_mp4() {
    if !ffmpeg_available() {
        eprintln!("skipping sound_of_a_loaded_video_goes_into_the_mp4: ffmpeg/ffprobe not on PATH");
        return;
    }
    let folders = folders();
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
        .arg(folders.input.join("tone.mp4"))
        .status()
        .unwrap();
    assert!(status.success());
    let set = plugins();
    let summary = run(
        &set,
        &folders,
        json!({
            "1": load_video("tone.mp4", json!({"frame_load_cap": 4, "format": "AnimateDiff"})),
            "2": combine(json!(["1", 0]), "video/h264-mp4", json!({"audio": ["1", 2]})),
            "3": combine(json!(["1", 0]), "image/gif", json!({"audio": ["1", 2]})),
        }),
    );
    let mp4 = gifs_entry(&summary, "2");
    assert_eq!(mp4["filename"], "clip_00001_-audio.mp4");
    let with_sound = PathBuf::from(mp4["fullpath"].as_str().unwrap());
    assert!(with_sound.is_file());
    assert!(with_sound.with_file_name("clip_00001_.mp4").is_file());
    let probe = Command::new("ffprobe")
        .args([
            "-v",
            "error",
            "-show_entries",
            "stream=codec_type",
            "-of",
            "csv=p=0",
        ])
        .arg(&with_sound)
        .output()
        .unwrap();
    let streams = String::from_utf8_lossy(&probe.stdout);
    assert!(
        streams.contains("video") && streams.contains("audio"),
        "{streams}"
    );
    // The image formats carry no sound.
    let gif = gifs_entry(&summary, "3");
    assert!(gif["filename"].as_str().unwrap().ends_with(".gif"));
    assert_eq!(
        gif_frames(Path::new(gif["fullpath"].as_str().unwrap())).len(),
        4
    );
}

#[test]
fn ui_workflows_with_widgets_stored_by_name_run() {
    // Video Helper Suite's editor stores widget values as an object keyed by widget name,
    // with its preview state and the upload button among them.
    let folders = folders();
    write_numbered_gif(&folders.input, 6);
    let set = plugins();
    let ui = json!({
        "last_node_id": 2,
        "last_link_id": 2,
        "nodes": [
            {
                "id": 1, "type": "VHS_LoadVideo", "mode": 0,
                "inputs": [
                    {"name": "meta_batch", "type": "VHS_BatchManager", "link": null},
                    {"name": "vae", "type": "VAE", "link": null}
                ],
                "outputs": [
                    {"name": "IMAGE", "type": "IMAGE", "links": [1]},
                    {"name": "frame_count", "type": "INT", "links": null},
                    {"name": "audio", "type": "AUDIO", "links": [2]},
                    {"name": "video_info", "type": "VHS_VIDEOINFO", "links": null}
                ],
                "widgets_values": {
                    "video": "numbered.gif", "force_rate": 0, "custom_width": 0,
                    "custom_height": 0, "frame_load_cap": 3, "skip_first_frames": 0,
                    "select_every_nth": 1, "format": "AnimateDiff",
                    "choose video to upload": "image",
                    "videopreview": {"hidden": false, "paused": false, "params": {
                        "filename": "numbered.gif", "type": "input", "format": "video/gif"
                    }}
                }
            },
            {
                "id": 2, "type": "VHS_VideoCombine", "mode": 0,
                "inputs": [
                    {"name": "images", "type": "IMAGE", "link": 1},
                    {"name": "audio", "type": "AUDIO", "link": 2},
                    {"name": "meta_batch", "type": "VHS_BatchManager", "link": null},
                    {"name": "vae", "type": "VAE", "link": null}
                ],
                "outputs": [{"name": "Filenames", "type": "VHS_FILENAMES", "links": null}],
                "widgets_values": {
                    "frame_rate": 8, "loop_count": 0, "filename_prefix": "AnimateDiff",
                    "format": "image/gif", "pingpong": false, "save_output": true,
                    "videopreview": {"hidden": false, "paused": false, "params": {}}
                }
            }
        ],
        "links": [[1, 1, 0, 2, 0, "IMAGE"], [2, 1, 2, 2, 1, "AUDIO"]],
        "version": 0.4
    });
    let (workflow, warnings) = vdm::ui_workflow::parse_workflow(&ui.to_string(), &set).unwrap();
    assert!(warnings.is_empty(), "{warnings:?}");
    let executor = executor(&set, &folders);
    let report = executor.validate(&workflow);
    assert!(
        report.is_ok() && report.warnings.is_empty(),
        "{}",
        report.to_text()
    );
    let summary = executor.run(&workflow).unwrap_or_else(|e| panic!("{e}"));
    let entry = gifs_entry(&summary, "2");
    assert_eq!(entry["filename"], "AnimateDiff_00001_.gif");
    let frames = gif_frames(Path::new(entry["fullpath"].as_str().unwrap()));
    assert_eq!(frames.len(), 3);
    assert_eq!((frames[0].0, frames[0].1), (40, 24));
}
