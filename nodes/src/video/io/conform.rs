//! Conforming loaded frames to a requested rate and size, with the rules of
//! ComfyUI-VideoHelperSuite's Load Video: `force_rate` resamples by repeating or dropping
//! source frames on a fixed clock, and `custom_width`/`custom_height` pick the output size
//! (0 keeps the aspect ratio) rounded to a multiple of a downscale ratio.

use candle_core::{Result, Tensor};

use super::{FrameChoice, LoadOptions};
use crate::video::resize::{crop_to_aspect, resize, ResizeMode};

/// The source frame shown at each output frame when `source_count` frames at `source_fps` are
/// played at `force_rate` frames per second (0: the source rate, every frame once).
///
/// The clock matches VideoHelperSuite's: the first source frame is always shown; every later
/// source frame advances the time by 1/`source_fps`, and each time a whole 1/`force_rate` has
/// accumulated the current source frame is emitted (so a slower rate drops frames and a faster
/// one repeats them).
pub fn force_rate_indices(source_count: usize, source_fps: f64, force_rate: f64) -> Vec<usize> {
    if force_rate <= 0.0 || !(source_fps.is_finite() && source_fps > 0.0) {
        return (0..source_count).collect();
    }
    let (source_step, target_step) = (1.0 / source_fps, 1.0 / force_rate);
    let mut indices = Vec::new();
    let mut elapsed = target_step;
    for source in 0..source_count {
        if source > 0 {
            elapsed += source_step;
        }
        while elapsed >= target_step {
            elapsed -= target_step;
            indices.push(source);
        }
    }
    indices
}

/// Applies `skip_first_frames`, `select_every_nth` and `frame_load_cap` of `options` to a
/// sequence of frames, returning the entries kept.
pub fn select_frames(sequence: &[usize], options: &LoadOptions) -> Vec<usize> {
    let mut kept = Vec::new();
    for (position, &frame) in sequence.iter().enumerate() {
        match options.choose(position) {
            FrameChoice::Skip => {}
            FrameChoice::Take => kept.push(frame),
            FrameChoice::Done => break,
        }
    }
    kept
}

/// The (width, height) VideoHelperSuite's loaders produce from a `width` × `height` source:
/// both custom sizes 0 keep the source size; one of them 0 scales the other side to keep the
/// aspect ratio; both given set the size. Each side is then rounded to the nearest multiple of
/// `downscale_ratio` (halves up).
pub fn custom_size(
    (width, height): (usize, usize),
    custom_width: usize,
    custom_height: usize,
    downscale_ratio: usize,
) -> (usize, usize) {
    let (mut w, mut h) = (width as f64, height as f64);
    match (custom_width, custom_height) {
        (0, 0) => {}
        (cw, 0) => {
            h *= cw as f64 / w;
            w = cw as f64;
        }
        (0, ch) => {
            w *= ch as f64 / h;
            h = ch as f64;
        }
        (cw, ch) => {
            (w, h) = (cw as f64, ch as f64);
        }
    }
    let ratio = downscale_ratio.max(1) as f64;
    let round = |side: f64| ((side / ratio + 0.5).floor() * ratio) as usize;
    (round(w), round(h))
}

/// Frames (frames, height, width, 3) cut to the aspect ratio of `width` × `height` around the
/// centre and resized to it (bicubic), as ComfyUI's `common_upscale` with `crop="center"` does.
pub fn resize_frames(frames: &Tensor, width: usize, height: usize) -> Result<Tensor> {
    let (_, source_height, source_width, _) = frames.dims4()?;
    if (source_width, source_height) == (width, height) {
        return Ok(frames.clone());
    }
    let channels_first = frames.permute((0, 3, 1, 2))?;
    let cropped = crop_to_aspect(&channels_first, height, width)?;
    resize(&cropped, height, width, ResizeMode::Bicubic)?
        .clamp(0f32, 1f32)?
        .permute((0, 2, 3, 1))?
        .contiguous()
}

#[cfg(test)]
mod tests {
    use super::*;

    use candle_core::Device;

    #[test]
    fn force_rate_drops_and_repeats_on_the_source_clock() {
        // Unchanged rate, or none asked: every frame once.
        assert_eq!(force_rate_indices(4, 10.0, 10.0), vec![0, 1, 2, 3]);
        assert_eq!(force_rate_indices(4, 10.0, 0.0), vec![0, 1, 2, 3]);
        // Half the rate keeps every other frame, starting with the first.
        assert_eq!(force_rate_indices(6, 10.0, 5.0), vec![0, 2, 4]);
        // Double the rate shows the first frame once, then each later frame twice: a frame is
        // emitted only once its time has been reached.
        assert_eq!(force_rate_indices(3, 5.0, 10.0), vec![0, 1, 1, 2, 2]);
        // 3 fps from 10 fps: the frames at or just past each 1/3 s.
        assert_eq!(force_rate_indices(10, 10.0, 3.0), vec![0, 4, 7]);
    }

    #[test]
    fn selection_applies_skip_nth_and_cap_after_resampling() {
        let sequence = force_rate_indices(10, 10.0, 5.0); // 0 2 4 6 8
        let options = LoadOptions {
            skip_first_frames: 1,
            select_every_nth: 2,
            frame_load_cap: 0,
            ..LoadOptions::default()
        };
        assert_eq!(select_frames(&sequence, &options), vec![2, 6]);
        let capped = LoadOptions {
            frame_load_cap: 1,
            ..options
        };
        assert_eq!(select_frames(&sequence, &capped), vec![2]);
    }

    #[test]
    fn custom_sizes_follow_videohelpersuite() {
        assert_eq!(custom_size((100, 60), 0, 0, 1), (100, 60));
        // The AnimateDiff load format rounds to multiples of 8, halves up.
        assert_eq!(custom_size((100, 60), 0, 0, 8), (104, 64));
        assert_eq!(custom_size((100, 60), 50, 0, 1), (50, 30));
        assert_eq!(custom_size((100, 60), 0, 30, 1), (50, 30));
        assert_eq!(custom_size((100, 60), 64, 16, 8), (64, 16));
        assert_eq!(custom_size((640, 360), 512, 0, 8), (512, 288));
    }

    #[test]
    fn resizing_crops_to_the_centre_and_keeps_constants() {
        let frames = Tensor::full(0.25f32, (2, 6, 8, 3), &Device::Cpu).unwrap();
        let resized = resize_frames(&frames, 4, 4).unwrap();
        assert_eq!(resized.dims(), &[2, 4, 4, 3]);
        let values = resized.flatten_all().unwrap().to_vec1::<f32>().unwrap();
        assert!(values.iter().all(|v| (v - 0.25).abs() < 1e-5));
        // Dark left half, bright right half, 16 columns wider than the target's aspect: the
        // centre crop removes 8 columns on each side and keeps both halves.
        let (height, full_width) = (8, 24);
        let data: Vec<f32> = (0..height * full_width * 3)
            .map(|i| {
                if (i / 3) % full_width < full_width / 2 {
                    0.0
                } else {
                    1.0
                }
            })
            .collect();
        let split = Tensor::from_vec(data, (1, height, full_width, 3), &Device::Cpu).unwrap();
        let resized = resize_frames(&split, 4, 4).unwrap();
        let row = resized
            .get(0)
            .unwrap()
            .get(0)
            .unwrap()
            .to_vec2::<f32>()
            .unwrap();
        assert!(row[0][0] < 0.5 && row[3][0] > 0.5, "{row:?}");
    }
}
