//! Memory and time of one VMC training step (forward with the temporal Q/K/V as `Var`s,
//! backward, AdamW) at full size: the SD 1.5 UNet and AnimateDiff v3 motion modules with random
//! weights, f32 on the CPU, latents of 32×32 (256×256 pixels). The gradient tape keeps every
//! activation after the first motion module, so the peak grows with the frame count: the step
//! runs at a few small counts (`VDM_TRAIN_FRAMES`, default `2,4`) and the peak is fitted as
//! weights + per-frame · frames, then extrapolated to 16 frames.
//!
//! Run with `cargo bench -p vdm-nodes --bench train`.

mod common;

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use vdm_nodes::models::patcher::PatchedUNet;
use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
use vdm_nodes::video::vmc::{customize_motion, VmcData, VmcSettings};

/// Resets the process's peak resident size (VmHWM) to its current size, so that each step's
/// peak is its own.
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

fn main() -> Result<()> {
    let frame_counts: Vec<usize> = std::env::var("VDM_TRAIN_FRAMES")
        .unwrap_or_else(|_| "2,4".into())
        .split(',')
        .filter_map(|s| s.trim().parse().ok())
        .collect();
    let latent_size: usize = std::env::var("VDM_TRAIN_LATENT")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(32);
    let device = Device::Cpu;
    let models = common::RandomModels::new(&device)?;
    let weights_gib = common::peak_rss_gib().unwrap_or(0.0);
    println!(
        "VMC step at SD 1.5 size: UNet {:.1}M + motion modules {:.1}M parameters (f32), latents \
         {latent_size}×{latent_size}, {} threads; resident after loading: {weights_gib:.2} GiB",
        models.unet_parameters as f64 / 1e6,
        models.motion_parameters as f64 / 1e6,
        rayon::current_num_threads()
    );
    let unet = PatchedUNet::new(models.unet.clone())
        .with_motion(std::sync::Arc::new(models.adapter.clone()), 1.0)
        .map_err(candle_core::Error::Msg)?;
    let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
    let text = Tensor::randn(0f32, 1.0, (1, 77, 768), &device)?;
    let settings = VmcSettings {
        steps: 1,
        ..VmcSettings::default()
    };
    println!("| frames | step (s) | peak resident (GiB) | of which the step (GiB) |");
    println!("|---|---|---|---|");
    let mut points = Vec::new();
    for &frames in &frame_counts {
        let latents = Tensor::randn(0f32, 1.0, (1, 4, frames, latent_size, latent_size), &device)?;
        let data = VmcData {
            latents: &latents,
            text: &text,
            noise_schedule: &scheduler,
        };
        let before = common::peak_rss_gib().unwrap_or(0.0);
        reset_peak_rss();
        let start = Instant::now();
        customize_motion(&unet, &data, &settings, None, |_| Ok(()))?;
        let seconds = start.elapsed().as_secs_f64();
        let peak = common::peak_rss_gib().unwrap_or(0.0);
        let step = peak - before.min(peak);
        println!(
            "| {frames} | {seconds:.1} | {peak:.2} | {:.2} |",
            (peak - weights_gib).max(step)
        );
        points.push((frames as f64, peak - weights_gib));
    }
    if let [(f0, m0), .., (f1, m1)] = points.as_slice() {
        let per_frame = (m1 - m0) / (f1 - f0);
        let fixed = m0 - per_frame * f0;
        println!(
            "fit: step memory ≈ {fixed:.2} GiB + {per_frame:.2} GiB × frames; at 16 frames: \
             {:.1} GiB for the step, {:.1} GiB with the weights",
            fixed + per_frame * 16.0,
            weights_gib + fixed + per_frame * 16.0
        );
    }
    Ok(())
}
