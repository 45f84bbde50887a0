//! The memory budget. A node whose allocations grow with its inputs (noise, latents, decoded
//! frames, the VAE, the sampler) estimates its peak before allocating and refuses, with the
//! estimate and the budget in the message, what would not fit: an error naming the node and
//! the input, instead of an abort on a failed allocation or the kernel killing the process.
//!
//! The budget is what one node may allocate for its work: the host's `max_memory` setting
//! (`--max-memory`) when given, else 90% of the memory available when the node starts, and
//! never more than that available memory. On a GPU the same holds with `max_gpu_memory` and
//! the device's free memory. Estimates are upper bounds of the large buffers only; small
//! allocations are not counted.

use std::fmt;

use candle_core::{DType, Device};

use crate::models::patcher::PatchedUNet;
use crate::models::vae::AutoencoderKL;

use super::{Context, NodeFailure};

/// The share of the available memory a node may use when no budget is given.
const DEFAULT_SHARE: f64 = 0.9;

/// A number of bytes, printed in binary units.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Bytes(pub u64);

impl Bytes {
    /// `count` values of `bytes_each`, saturating (sizes from user input can overflow).
    pub fn of(count: u64, bytes_each: u64) -> Self {
        Self(count.saturating_mul(bytes_each))
    }

    /// The product of `dims`, saturating, times 4 bytes (f32).
    pub fn f32s(dims: &[usize]) -> Self {
        let count = dims
            .iter()
            .fold(1u64, |acc, &d| acc.saturating_mul(d as u64));
        Self::of(count, 4)
    }

    pub fn times(self, factor: u64) -> Self {
        Self(self.0.saturating_mul(factor))
    }

    pub fn plus(self, other: Bytes) -> Self {
        Self(self.0.saturating_add(other.0))
    }

    pub fn min(self, other: Bytes) -> Self {
        Self(self.0.min(other.0))
    }
}

impl fmt::Display for Bytes {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        const UNITS: [&str; 6] = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
        let mut value = self.0 as f64;
        let mut unit = 0;
        while value >= 1024.0 && unit + 1 < UNITS.len() {
            value /= 1024.0;
            unit += 1;
        }
        if unit == 0 {
            write!(f, "{} B", self.0)
        } else {
            write!(f, "{value:.1} {}", UNITS[unit])
        }
    }
}

/// How much one node may allocate, and where that figure comes from (for messages).
#[derive(Debug, Clone, PartialEq)]
pub struct MemoryBudget {
    pub limit: Bytes,
    pub source: String,
}

impl MemoryBudget {
    /// The budget on `device` under the host's settings.
    pub fn for_device(ctx: &Context, device: &Device) -> Self {
        let (setting, flag) = if device.is_cuda() {
            ("max_gpu_memory", "--max-gpu-memory")
        } else {
            ("max_memory", "--max-memory")
        };
        let given = ctx.setting(setting).and_then(|v| v.parse::<u64>().ok());
        Self::from_parts(given, flag, available_memory(device))
    }

    fn from_parts(given: Option<u64>, flag: &str, available: Option<u64>) -> Self {
        match (given, available) {
            (Some(given), Some(available)) if available < given => Self {
                limit: Bytes(available),
                source: format!(
                    "{flag} {} exceeds the {} now available",
                    Bytes(given),
                    Bytes(available)
                ),
            },
            (Some(given), _) => Self {
                limit: Bytes(given),
                source: format!("{flag} {}", Bytes(given)),
            },
            (None, Some(available)) => Self {
                limit: Bytes((available as f64 * DEFAULT_SHARE) as u64),
                source: format!(
                    "{:.0}% of the {} available; {flag} sets it",
                    DEFAULT_SHARE * 100.0,
                    Bytes(available)
                ),
            },
            (None, None) => Self {
                limit: Bytes(u64::MAX),
                source: format!("the available memory is unknown here; {flag} sets a budget"),
            },
        }
    }

    /// Refuses `estimate` for `what` when it exceeds the budget; the error is `input`'s.
    pub fn check(&self, input: &str, what: &str, estimate: Bytes) -> Result<(), NodeFailure> {
        if estimate <= self.limit {
            return Ok(());
        }
        Err(NodeFailure::input(
            input,
            format!(
                "{what} needs about {estimate}, over the memory budget of {} ({})",
                self.limit, self.source
            ),
        ))
    }
}

/// Copies of the whole latents a sampling run holds at once: the latents, the noise, the
/// guided model input and output (two videos each), the denoised estimate and spares for
/// FreeInit and reuse.
const SAMPLER_LATENT_COPIES: u64 = 10;

/// Activations of one UNet call per latent pixel of each frame in the call, in f32 values per
/// channel of the first block: the skip connections kept for the up path (about 5.5 × the
/// first block's channels) and a transformer block's working set at full resolution (Q, K,
/// V, the GEGLU feed-forward of 8 × the channels, norms), measured on SD 1.5 at about 20.
const UNET_ACTIVATIONS_PER_CHANNEL: u64 = 22;

/// The peak of a sampling run of the UNet of `model`: `videos` videos of `frames` frames of
/// `height` × `width` latents with `channels` channels, `frames_per_call` frames in each model
/// call (all of them, or a context window), guided (two branches per call) or not.
pub fn sampling_estimate(
    model: &PatchedUNet,
    videos: usize,
    channels: usize,
    frames: usize,
    (height, width): (usize, usize),
    frames_per_call: usize,
    guided: bool,
) -> Bytes {
    let base = model.base();
    let config = base.config();
    let latents = Bytes::f32s(&[videos, channels, frames, height, width]);
    let calls_batch = videos * if guided { 2 } else { 1 };
    let first_channels = config.block_out_channels.first().copied().unwrap_or(320);
    let activations = Bytes::f32s(&[calls_batch, frames_per_call, height, width, first_channels])
        .times(UNET_ACTIVATIONS_PER_CHANNEL);
    // Off the fused CPU kernel, attention scores are formed in slices of at most 256 MiB (and
    // softmax's copies), whatever the size.
    let fused = base.device().is_cpu() && base.dtype() == DType::F32;
    let scores = if fused {
        Bytes(0)
    } else {
        let pixels = height * width;
        Bytes::f32s(&[calls_batch, frames_per_call, 8, pixels, pixels])
            .min(Bytes(256 << 20))
            .times(3)
    };
    latents
        .times(SAMPLER_LATENT_COPIES)
        .plus(activations)
        .plus(scores)
}

/// Activations of the VAE per pixel of each frame in a chunk, in f32 values per channel of its
/// first block (the full-resolution blocks hold the block input, its norm and convolution
/// outputs and the residual).
const VAE_ACTIVATIONS_PER_CHANNEL: u64 = 6;

/// The peak of VAE decoding or encoding `frames` frames of `height` × `width` pixels (`videos`
/// videos), `chunk` frames at a time: the frames in f32 with the copies the conversion
/// makes, and one chunk's activations.
pub fn vae_estimate(
    vae: &AutoencoderKL,
    videos: usize,
    frames: usize,
    (height, width): (usize, usize),
    chunk: usize,
) -> Bytes {
    let first_channels = vae
        .config()
        .block_out_channels
        .first()
        .copied()
        .unwrap_or(128);
    let pixels = Bytes::f32s(&[videos, frames, height, width, 3]).times(4);
    let activations = Bytes::f32s(&[chunk.min(frames), height, width, first_channels])
        .times(VAE_ACTIVATIONS_PER_CHANNEL);
    pixels.plus(activations)
}

/// Memory that can be allocated now on `device`, where it can be told: Linux's
/// `MemAvailable` for the CPU, the device's free memory for CUDA.
fn available_memory(device: &Device) -> Option<u64> {
    match device {
        Device::Cpu => available_host_memory(),
        #[cfg(feature = "cuda")]
        Device::Cuda(cuda) => cuda
            .cuda_stream()
            .context()
            .mem_get_info()
            .ok()
            .map(|(free, _total)| free as u64),
        _ => None,
    }
}

fn available_host_memory() -> Option<u64> {
    let info = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = info.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib.saturating_mul(1024))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_budget_is_the_setting_capped_by_what_is_available() {
        let gib = 1u64 << 30;
        let given = MemoryBudget::from_parts(Some(2 * gib), "--max-memory", Some(10 * gib));
        assert_eq!(given.limit, Bytes(2 * gib));
        let capped = MemoryBudget::from_parts(Some(20 * gib), "--max-memory", Some(10 * gib));
        assert_eq!(capped.limit, Bytes(10 * gib));
        let default = MemoryBudget::from_parts(None, "--max-memory", Some(10 * gib));
        assert_eq!(default.limit, Bytes(9 * gib));
        let unknown = MemoryBudget::from_parts(None, "--max-memory", None);
        assert_eq!(unknown.limit, Bytes(u64::MAX));
    }

    #[test]
    fn estimates_over_the_budget_are_refused_with_both_figures() {
        let budget = MemoryBudget::from_parts(Some(1 << 30), "--max-memory", None);
        assert!(budget.check("frames", "noise", Bytes(1 << 29)).is_ok());
        let failure = budget
            .check(
                "frames",
                "noise of 4096 frames",
                Bytes::f32s(&[4096, 4, 1024, 1024]),
            )
            .unwrap_err();
        assert_eq!(failure.input.as_deref(), Some("frames"));
        assert_eq!(
            failure.message,
            "noise of 4096 frames needs about 64.0 GiB, over the memory budget of 1.0 GiB \
             (--max-memory 1.0 GiB)"
        );
        assert_eq!(Bytes::f32s(&[usize::MAX, 4]), Bytes(u64::MAX));
    }
}
