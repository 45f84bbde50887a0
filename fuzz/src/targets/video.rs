//! GIF, PNG and APNG files through `load_video`.
//!
//! GIF has no checksums, so byte mutations reach the decoder as they are. PNG protects every
//! chunk with a CRC; the PNG mutator works on chunks (fields of IHDR, acTL and fcTL set to edge
//! values, chunks dropped, repeated, swapped or borrowed from another seed) and repairs the CRCs
//! most of the time, so that the mutation reaches the decoder instead of its checksum test.

use std::path::Path;

use candle_core::{Device, Tensor};
use fastrand::Rng;
use image::codecs::gif::{GifEncoder, Repeat};
use image::{Delay, Frame, RgbaImage};
use vdm_nodes::video::{load_video, save_video, LoadOptions, VideoFormat};

use super::{donors, pick, Context, Target};
use crate::mutate::{crc32, hash, interesting, mutate_bytes, small_or_interesting};

const PNG_SIGNATURE: [u8; 8] = [0x89, b'P', b'N', b'G', 0x0d, 0x0a, 0x1a, 0x0a];

/// A small clip (frames, height, width, 3) in [0, 1].
fn clip(frames: usize, height: usize, width: usize) -> Tensor {
    let n = frames * height * width * 3;
    Tensor::arange(0u32, n as u32, &Device::Cpu)
        .and_then(|t| t.to_dtype(candle_core::DType::F32))
        .and_then(|t| t.affine(1.0 / n as f64, 0.0))
        .and_then(|t| t.reshape((frames, height, width, 3)))
        .expect("a valid clip")
}

/// Encodes a clip with vdm's own writer.
fn saved(scratch: &Path, format: VideoFormat, frames: &Tensor, fps: f64, loops: u32) -> Vec<u8> {
    let folder = scratch.join("video-seeds");
    let path = save_video(frames, &folder, "seed", format, fps, loops).expect("a valid seed");
    let bytes = std::fs::read(&path).expect("the seed was just written");
    let _ = std::fs::remove_dir_all(folder);
    bytes
}

pub(super) fn gif_seeds(scratch: &Path) -> Vec<Vec<u8>> {
    let mut seeds = vec![
        saved(scratch, VideoFormat::Gif, &clip(3, 4, 5), 8.0, 0),
        saved(scratch, VideoFormat::Gif, &clip(1, 2, 2), 25.0, 2),
    ];
    // Frames smaller than the screen, at offsets, with transparency and different delays.
    let mut bytes = Vec::new();
    {
        let mut encoder = GifEncoder::new(&mut bytes);
        encoder.set_repeat(Repeat::Infinite).expect("a valid seed");
        let frames = [(6, 4, 0, 0, 100), (3, 2, 2, 1, 40), (6, 4, 0, 0, 0)];
        let frames = frames.iter().enumerate().map(|(i, &(w, h, x, y, ms))| {
            let image = RgbaImage::from_fn(w, h, |px, py| {
                let alpha = if matches!((px + py + i as u32) % 3, 0) {
                    0
                } else {
                    255
                };
                image::Rgba([(px * 40) as u8, (py * 60) as u8, (i * 90) as u8, alpha])
            });
            Frame::from_parts(image, x, y, Delay::from_numer_denom_ms(ms, 1))
        });
        encoder.encode_frames(frames).expect("a valid seed");
    }
    seeds.push(bytes);
    seeds
}

fn png_still(width: u32, height: u32, color: png::ColorType, depth: png::BitDepth) -> Vec<u8> {
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, width, height);
        encoder.set_color(color);
        encoder.set_depth(depth);
        if color == png::ColorType::Indexed {
            encoder.set_palette(vec![0, 0, 0, 255, 0, 0, 0, 255, 0, 0, 0, 255]);
            encoder.set_trns(vec![255, 128]);
        }
        let samples = match color {
            png::ColorType::Grayscale | png::ColorType::Indexed => 1,
            png::ColorType::GrayscaleAlpha => 2,
            png::ColorType::Rgb => 3,
            png::ColorType::Rgba => 4,
        };
        let bits = samples * depth as usize;
        let row = (width as usize * bits).div_ceil(8);
        let data: Vec<u8> = (0..row * height as usize)
            .map(|i| match color {
                // Palette indices must stay within the palette.
                png::ColorType::Indexed => (i % 3) as u8,
                _ => (i * 29 % 256) as u8,
            })
            .collect();
        let mut writer = encoder.write_header().expect("a valid seed");
        writer.write_image_data(&data).expect("a valid seed");
        writer.finish().expect("a valid seed");
    }
    bytes
}

pub(super) fn png_seeds() -> Vec<Vec<u8>> {
    use png::{BitDepth, ColorType};
    vec![
        png_still(4, 3, ColorType::Rgb, BitDepth::Eight),
        png_still(3, 2, ColorType::Rgba, BitDepth::Sixteen),
        png_still(9, 2, ColorType::Grayscale, BitDepth::One),
        png_still(3, 3, ColorType::Indexed, BitDepth::Eight),
        png_still(2, 5, ColorType::GrayscaleAlpha, BitDepth::Eight),
    ]
}

pub(super) fn apng_seeds(scratch: &Path) -> Vec<Vec<u8>> {
    let mut seeds = vec![
        saved(scratch, VideoFormat::Png, &clip(3, 4, 5), 8.0, 0),
        saved(scratch, VideoFormat::Png, &clip(2, 1, 3), 30.0, 1),
    ];
    // Sub-frames at offsets, with dispose and blend operations, and a hidden default image.
    let mut bytes = Vec::new();
    {
        let mut encoder = png::Encoder::new(&mut bytes, 6, 4);
        encoder.set_color(png::ColorType::Rgba);
        encoder.set_depth(png::BitDepth::Eight);
        encoder.set_animated(3, 0).expect("a valid seed");
        encoder.set_sep_def_img(true).expect("a valid seed");
        let mut writer = encoder.write_header().expect("a valid seed");
        writer
            .write_image_data(&[200; 6 * 4 * 4])
            .expect("a valid seed");
        writer
            .write_image_data(&[10; 6 * 4 * 4])
            .expect("a valid seed");
        writer.set_frame_dimension(3, 2).expect("a valid seed");
        writer.set_frame_position(2, 1).expect("a valid seed");
        writer
            .set_dispose_op(png::DisposeOp::Previous)
            .expect("a valid seed");
        writer
            .set_blend_op(png::BlendOp::Over)
            .expect("a valid seed");
        writer.set_frame_delay(1, 0).expect("a valid seed");
        writer
            .write_image_data(&[99; 3 * 2 * 4])
            .expect("a valid seed");
        writer.set_frame_position(0, 0).expect("a valid seed");
        writer.set_frame_dimension(6, 4).expect("a valid seed");
        writer
            .set_dispose_op(png::DisposeOp::Background)
            .expect("a valid seed");
        writer
            .write_image_data(&[50; 6 * 4 * 4])
            .expect("a valid seed");
        writer.finish().expect("a valid seed");
    }
    seeds.push(bytes);
    seeds
}

/// A GIF: byte mutations, and the sizes of the screen and of frames set to edge values.
pub(super) fn generate_gif(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut out = pick(rng, seeds).clone();
    if rng.u8(..3) == 0 && out.len() > 10 {
        // Logical screen width or height.
        let at = 6 + 2 * rng.usize(..2);
        out[at..at + 2].copy_from_slice(&(small_or_interesting(rng) as u16).to_le_bytes());
    }
    if rng.u8(..3) == 0 {
        // A field of an image descriptor (left, top, width, height after the 0x2c).
        let descriptors: Vec<usize> = (0..out.len().saturating_sub(9))
            .filter(|&i| out[i] == 0x2c)
            .collect();
        if !descriptors.is_empty() {
            let at = *pick(rng, &descriptors) + 1 + 2 * rng.usize(..4);
            out[at..at + 2].copy_from_slice(&(small_or_interesting(rng) as u16).to_le_bytes());
        }
    }
    if rng.u8(..4) != 0 {
        mutate_bytes(rng, &mut out, &donors(seeds), 6);
    }
    out
}

/// The chunks of a PNG (type, data), or `None` when the bytes do not split into chunks.
fn chunks(bytes: &[u8]) -> Option<Vec<([u8; 4], Vec<u8>)>> {
    let mut rest = bytes.strip_prefix(&PNG_SIGNATURE)?;
    let mut out = Vec::new();
    while rest.len() >= 12 {
        let len = u32::from_be_bytes(rest[..4].try_into().ok()?) as usize;
        let kind: [u8; 4] = rest[4..8].try_into().ok()?;
        let data = rest.get(8..8 + len)?.to_vec();
        out.push((kind, data));
        rest = rest.get(12 + len..)?;
    }
    Some(out)
}

/// Sets a big-endian field of `width` bytes at `at` in `data`, if it fits.
fn set_field(rng: &mut Rng, data: &mut [u8], at: usize, width: usize) {
    if at + width <= data.len() {
        let value = small_or_interesting(rng).to_be_bytes();
        data[at..at + width].copy_from_slice(&value[8 - width..]);
    }
}

fn mutate_chunk_fields(rng: &mut Rng, kind: &[u8; 4], data: &mut [u8]) {
    match kind {
        // width, height, bit depth, colour type, compression, filter, interlace
        b"IHDR" => match rng.usize(..7) {
            f @ 0..=1 => set_field(rng, data, 4 * f, 4),
            f => {
                if let Some(b) = data.get_mut(6 + f) {
                    *b = [0, 1, 2, 3, 4, 6, 8, 16, 0xff][rng.usize(..9)];
                }
            }
        },
        // number of frames, number of plays
        b"acTL" => {
            let field = rng.usize(..2);
            set_field(rng, data, 4 * field, 4)
        }
        // sequence, width, height, x, y (4 bytes each), delay num, den (2), dispose, blend (1)
        b"fcTL" => match rng.usize(..9) {
            f @ 0..=4 => set_field(rng, data, 4 * f, 4),
            f @ 5..=6 => set_field(rng, data, 20 + 2 * (f - 5), 2),
            f => {
                if let Some(b) = data.get_mut(24 + f - 7) {
                    *b = rng.u8(..4);
                }
            }
        },
        // sequence number
        b"fdAT" => set_field(rng, data, 0, 4),
        _ if !data.is_empty() => {
            let mut bytes = data.to_vec();
            mutate_bytes(rng, &mut bytes, &[], 2);
            let n = bytes.len().min(data.len());
            data[..n].copy_from_slice(&bytes[..n]);
        }
        _ => {}
    }
}

fn assemble(rng: &mut Rng, chunks: &[([u8; 4], Vec<u8>)]) -> Vec<u8> {
    let mut out = PNG_SIGNATURE.to_vec();
    for (kind, data) in chunks {
        out.extend((data.len() as u32).to_be_bytes());
        out.extend_from_slice(kind);
        out.extend_from_slice(data);
        let crc = if rng.u8(..32) == 0 {
            interesting(rng) as u32
        } else {
            crc32(&[kind, data])
        };
        out.extend(crc.to_be_bytes());
    }
    out
}

/// A PNG or APNG: chunk-level mutations with repaired checksums, bytes on top now and then.
pub(super) fn generate_png(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let seed = pick(rng, seeds);
    let mut out = match chunks(seed) {
        Some(mut list) if rng.u8(..5) != 0 => {
            for _ in 0..1 + rng.usize(..3) {
                let at = rng.usize(..list.len());
                match rng.u8(..10) {
                    0..=3 => {
                        let (kind, data) = &mut list[at];
                        mutate_chunk_fields(rng, kind, data);
                    }
                    4 => {
                        list.remove(at);
                        if list.is_empty() {
                            break;
                        }
                    }
                    5 => {
                        let copy = list[at].clone();
                        list.insert(rng.usize(..=list.len()), copy);
                    }
                    6 if list.len() > 1 => {
                        let other = rng.usize(..list.len());
                        list.swap(at, other);
                    }
                    7 => {
                        // A chunk from another seed: a foreign palette, frame or header.
                        if let Some(other) = chunks(pick(rng, seeds).as_slice()) {
                            let chunk = pick(rng, &other).clone();
                            list.insert(rng.usize(..=list.len()), chunk);
                        }
                    }
                    8 => {
                        let data = &mut list[at].1;
                        let keep = rng.usize(..=data.len());
                        data.truncate(keep);
                    }
                    _ => {
                        // Change a letter of the type: critical vs ancillary, unknown chunks.
                        let kind = &mut list[at].0;
                        kind[rng.usize(..4)] ^= 0x20;
                    }
                }
            }
            assemble(rng, &list)
        }
        _ => seed.clone(),
    };
    if rng.u8(..5) == 0 {
        mutate_bytes(rng, &mut out, &donors(seeds), 4);
    }
    out
}

/// The frame selection, from the input alone so that a saved input replays the same way.
fn options(input: &[u8]) -> LoadOptions {
    let h = hash(input);
    LoadOptions {
        skip_first_frames: [0, 0, 0, 1, 2, 1000][(h % 6) as usize],
        select_every_nth: [1, 1, 1, 2, 3][((h >> 8) % 5) as usize],
        frame_load_cap: [0, 0, 0, 1, 2][((h >> 16) % 5) as usize],
        // As `LoadVideo` under a 128 MiB memory budget: decoding must stop there.
        max_bytes: 128 << 20,
    }
}

pub(super) fn execute(ctx: &Context, target: Target, input: &[u8]) -> Result<(), String> {
    let path = ctx.case_file(target.extension(), input);
    let (frames, fps) = load_video(&path, &options(input)).map_err(|e| e.to_string())?;
    let dims = frames.dims();
    assert!(
        dims.len() == 4 && dims[3] == 3,
        "load_video returned frames of shape {dims:?}"
    );
    assert!(
        fps.is_finite() && fps > 0.0,
        "load_video returned fps {fps}"
    );
    Ok(())
}
