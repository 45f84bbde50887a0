//! Initial noise as ComfyUI and AnimateDiff-Evolved make it: torch's CPU generator seeded with
//! the seed, drawn in ComfyUI's latent layout (videos · frames, C, h, w) and returned in vdm's
//! (videos, C, frames, h, w).
//!
//! ComfyUI draws one `randn` of the whole batch. AnimateDiff-Evolved's sample settings vary
//! that: an offset added to the seed, a batch offset (the first draws are skipped), one
//! frame's noise for every frame (`constant`), no noise (`empty`), a seed per frame as A1111
//! does (`auto1111`), the first context window's noise repeated (`repeated_context`), or
//! FreeNoise's reuse of shuffled noise from one window in the next (`FreeNoise`).

use std::str::FromStr;

use candle_core::{DType, Device, Result, Tensor};

use super::torch_random::TorchGenerator;

/// The shape of video latents: (videos, channels, frames, height, width).
pub type LatentShape = (usize, usize, usize, usize, usize);

/// AnimateDiff-Evolved's `noise_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NoiseType {
    #[default]
    Default,
    Constant,
    Empty,
    RepeatedContext,
    FreeNoise,
}

impl NoiseType {
    pub const NAMES: [&'static str; 5] = [
        "default",
        "constant",
        "empty",
        "repeated_context",
        "FreeNoise",
    ];
}

impl FromStr for NoiseType {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "default" => Ok(Self::Default),
            "constant" => Ok(Self::Constant),
            "empty" => Ok(Self::Empty),
            "repeated_context" => Ok(Self::RepeatedContext),
            "FreeNoise" => Ok(Self::FreeNoise),
            other => Err(format!(
                "unknown noise type `{other}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// How seeds become noise (AnimateDiff-Evolved's `seed_gen`): ComfyUI's one draw for the whole
/// batch, or A1111's seed + i for frame i. The `[gpu]` variants draw on the GPU in
/// AnimateDiff-Evolved; here every draw is torch's CPU generator, so they give other numbers
/// of the same distribution.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum SeedGeneration {
    #[default]
    Comfy,
    Auto1111,
}

impl SeedGeneration {
    pub const NAMES: [&'static str; 4] = ["comfy", "comfy [gpu]", "auto1111", "auto1111 [gpu]"];
}

impl FromStr for SeedGeneration {
    type Err = String;

    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "comfy" | "comfy [gpu]" => Ok(Self::Comfy),
            "auto1111" | "auto1111 [gpu]" => Ok(Self::Auto1111),
            other => Err(format!(
                "unknown seed generation `{other}` (expected one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// AnimateDiff-Evolved's sample settings for the initial noise; the default is ComfyUI's.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct NoiseSettings {
    pub noise_type: NoiseType,
    pub seed_generation: SeedGeneration,
    /// Added to the sampler's seed (two's complement, as Python's integers wrap in torch).
    pub seed_offset: i64,
    /// Draws skipped at the start of the batch.
    pub batch_offset: usize,
    /// A seed used instead of the sampler's.
    pub seed_override: Option<u64>,
}

/// The context windows the derived noise types follow: (length, overlap).
pub type ContextSpan = Option<(usize, usize)>;

/// The initial noise of `shape` for `seed` under `settings`, on `device`.
pub fn initial_noise(
    settings: &NoiseSettings,
    seed: u64,
    shape: LatentShape,
    context: ContextSpan,
    device: &Device,
) -> Result<Tensor> {
    let (videos, channels, frames, height, width) = shape;
    let count = videos * frames;
    let seed = settings
        .seed_override
        .unwrap_or(seed)
        .wrapping_add_signed(settings.seed_offset);
    let draw =
        |generator: &mut TorchGenerator, n: usize| generator.randn(&[n, channels, height, width]);
    let per_draw = channels * height * width;
    let offset = settings.batch_offset;
    let mut noise: Vec<f32> = match (settings.noise_type, settings.seed_generation) {
        (NoiseType::Empty, _) => vec![0.0; count * per_draw],
        (NoiseType::Constant, SeedGeneration::Comfy) => {
            let single = draw(&mut TorchGenerator::new(seed), 1 + offset);
            single[offset * per_draw..].repeat(count)
        }
        (NoiseType::Constant, SeedGeneration::Auto1111) => {
            let single = draw(
                &mut TorchGenerator::new(seed.wrapping_add(offset as u64)),
                1,
            );
            single.repeat(count)
        }
        (_, SeedGeneration::Comfy) => {
            draw(&mut TorchGenerator::new(seed), count + offset)[offset * per_draw..].to_vec()
        }
        (_, SeedGeneration::Auto1111) => (0..count)
            .flat_map(|i| {
                let frame_seed = seed.wrapping_add((i + offset) as u64);
                draw(&mut TorchGenerator::new(frame_seed), 1)
            })
            .collect(),
    };
    if let Some((length, overlap)) = context {
        match settings.noise_type {
            NoiseType::RepeatedContext => repeat_first_window(&mut noise, per_draw, length),
            NoiseType::FreeNoise => free_noise(&mut noise, per_draw, length, overlap, seed),
            _ => {}
        }
    }
    video_layout(noise, shape, device)
}

/// `torch.randn` of ComfyUI's latent shape (videos · frames, C, h, w) from `generator`, as
/// vdm's (videos, C, frames, h, w): what ComfyUI's default noise sampler draws each step.
pub fn comfy_layout_randn(
    generator: &mut TorchGenerator,
    shape: LatentShape,
    device: &Device,
) -> Result<Tensor> {
    let (videos, channels, frames, height, width) = shape;
    video_layout(
        generator.randn(&[videos * frames, channels, height, width]),
        shape,
        device,
    )
}

/// Values in ComfyUI's (videos · frames, C, h, w) order as a (videos, C, frames, h, w) tensor.
fn video_layout(values: Vec<f32>, shape: LatentShape, device: &Device) -> Result<Tensor> {
    let (videos, channels, frames, height, width) = shape;
    Tensor::from_vec(values, (videos, frames, channels, height, width), device)?
        .permute((0, 2, 1, 3, 4))?
        .contiguous()?
        .to_dtype(DType::F32)
}

/// Every draw after the first `length` repeats them in order.
fn repeat_first_window(noise: &mut [f32], per_draw: usize, length: usize) {
    let count = noise.len() / per_draw;
    for i in length.min(count)..count {
        let source = (i % length) * per_draw;
        noise.copy_within(source..source + per_draw, i * per_draw);
    }
}

/// FreeNoise (Qiu et al. 2023) as AnimateDiff-Evolved places it: after each context window,
/// the next `length − overlap` draws are the window's first ones in an order shuffled by
/// torch's `randperm` (a generator seeded with `seed`), so that every window sees noise of the
/// same frames.
fn free_noise(noise: &mut [f32], per_draw: usize, length: usize, overlap: usize, seed: u64) {
    let count = noise.len() / per_draw;
    let delta = length.saturating_sub(overlap);
    if delta == 0 {
        return;
    }
    let mut generator = TorchGenerator::new(seed);
    let mut start = 0;
    while start + length < count {
        let place = start + length;
        let span = delta.min(count - place);
        let order = generator.randperm(span);
        let sources: Vec<usize> = order.iter().map(|&k| start + k).collect();
        // Read every source before writing: the sources precede the places.
        let copied: Vec<f32> = sources
            .iter()
            .flat_map(|&s| noise[s * per_draw..(s + 1) * per_draw].to_vec())
            .collect();
        noise[place * per_draw..(place + span) * per_draw].copy_from_slice(&copied);
        if span < delta {
            break;
        }
        start += delta;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(
        settings: &NoiseSettings,
        seed: u64,
        frames: usize,
        context: ContextSpan,
    ) -> Vec<f32> {
        initial_noise(settings, seed, (1, 1, frames, 1, 2), context, &Device::Cpu)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap()
    }

    #[test]
    fn default_noise_is_one_draw_of_comfyuis_layout() {
        let noise = initial_noise(
            &NoiseSettings::default(),
            7,
            (1, 2, 3, 1, 2),
            None,
            &Device::Cpu,
        )
        .unwrap();
        let expected = TorchGenerator::new(7).randn(&[3, 2, 1, 2]);
        // vdm's (1, C, F, h, w) is ComfyUI's (F, C, h, w) with the first two axes swapped.
        let back: Vec<f32> = noise
            .squeeze(0)
            .unwrap()
            .permute((1, 0, 2, 3))
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1()
            .unwrap();
        assert_eq!(back, expected);
    }

    #[test]
    fn offsets_constant_and_empty() {
        let plain = values(&NoiseSettings::default(), 5, 4, None);
        let offset = NoiseSettings {
            batch_offset: 1,
            ..Default::default()
        };
        let shifted = values(&offset, 5, 3, None);
        assert_eq!(shifted, plain[2..8]);
        let constant = NoiseSettings {
            noise_type: NoiseType::Constant,
            ..Default::default()
        };
        let same = values(&constant, 5, 3, None);
        assert_eq!(same[0..2], same[2..4]);
        assert_eq!(same[0..2], plain[0..2]);
        let empty = NoiseSettings {
            noise_type: NoiseType::Empty,
            ..Default::default()
        };
        assert!(values(&empty, 5, 3, None).iter().all(|&v| v == 0.0));
        let a1111 = NoiseSettings {
            seed_generation: SeedGeneration::Auto1111,
            ..Default::default()
        };
        let per_frame = values(&a1111, 5, 2, None);
        assert_eq!(
            per_frame[2..4],
            values(&NoiseSettings::default(), 6, 1, None)[..]
        );
        let seeded = NoiseSettings {
            seed_offset: -1,
            ..Default::default()
        };
        assert_eq!(
            values(&seeded, 6, 2, None),
            values(&NoiseSettings::default(), 5, 2, None)
        );
    }

    #[test]
    fn free_noise_reuses_each_windows_draws_shuffled() {
        let settings = NoiseSettings {
            noise_type: NoiseType::FreeNoise,
            ..Default::default()
        };
        let (length, overlap, frames) = (4, 2, 9);
        let plain = values(&NoiseSettings::default(), 11, frames, None);
        let free = values(&settings, 11, frames, Some((length, overlap)));
        assert_eq!(free[..8], plain[..8], "the first window keeps its noise");
        let frame = |v: &[f32], i: usize| v[2 * i..2 * i + 2].to_vec();
        // Frames 4 and 5 are frames 0 and 1 in randperm(2) order; 6, 7 from 2, 3; 8 from 4.
        let mut generator = TorchGenerator::new(11);
        let order = generator.randperm(2);
        for (k, &o) in order.iter().enumerate() {
            assert_eq!(frame(&free, 4 + k), frame(&free, o));
        }
        let order = generator.randperm(2);
        for (k, &o) in order.iter().enumerate() {
            assert_eq!(frame(&free, 6 + k), frame(&free, 2 + o));
        }
        assert_eq!(frame(&free, 8), frame(&free, 4));
        let repeated = NoiseSettings {
            noise_type: NoiseType::RepeatedContext,
            ..Default::default()
        };
        let again = values(&repeated, 11, frames, Some((length, overlap)));
        assert_eq!(frame(&again, 5), frame(&again, 1));
    }
}
