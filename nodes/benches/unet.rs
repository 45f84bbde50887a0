//! CPU benchmark of one full-size SD 1.5 UNet + AnimateDiff v3 motion-module forward, mirroring
//! `bench_full_unet.py` of the reference: random weights, f32, batch 2 (classifier-free
//! guidance), 8 frames, 32×32 latent, timestep 501. Prints the time of each forward (one warm-up,
//! then `VDM_BENCH_RUNS` runs, default 2), the parameter counts and the peak resident memory;
//! then the same for the plain image UNet on the 16 frames (skipped with `VDM_BENCH_SKIP_2D=1`);
//! then the time per sampling step of the whole loop (one video, guidance 7.5, DDIM: one UNet
//! call of batch 2 plus the scheduler) over `VDM_BENCH_STEPS` steps (default 2; 0 skips it).
//!
//! With `VDM_BENCH_REFERENCE` naming the JSON that `bench_full_unet.py --json` wrote on the same
//! machine, each result is followed by PyTorch's and the ratio of the two.
//!
//! Run with `cargo bench -p vdm-nodes --bench unet`.

mod common;

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use vdm_nodes::models::attention::AttentionHook;
use vdm_nodes::models::motion::{MotionAdapter, MotionPatch};
use vdm_nodes::models::unet::{UNet2DConditionModel, UNetInputs, UNetPatches};

use common::{cpu_seconds, env_usize, median, peak_rss_gib, RandomModels};

const BATCH: usize = 2;
const FRAMES: usize = 8;
const LATENT: usize = 32;

/// PyTorch's figures from `bench_full_unet.py --json`, to print beside ours.
struct Reference(serde_json::Value);

impl Reference {
    /// The file named by `VDM_BENCH_REFERENCE`, if set; an unreadable one is reported, not fatal.
    fn from_env() -> Option<Self> {
        let path = std::env::var("VDM_BENCH_REFERENCE").ok()?;
        let parsed = std::fs::read_to_string(&path)
            .map_err(|e| e.to_string())
            .and_then(|text| serde_json::from_str(&text).map_err(|e| e.to_string()));
        match parsed {
            Ok(value) => Some(Self(value)),
            Err(e) => {
                println!("VDM_BENCH_REFERENCE={path}: not read ({e})");
                None
            }
        }
    }

    /// Prints `value` (ours) against the reference number at `pointer` (a JSON pointer).
    fn compare(&self, what: &str, pointer: &str, ours: f64, unit: &str) {
        if let Some(theirs) = self.0.pointer(pointer).and_then(|v| v.as_f64()) {
            println!(
                "  PyTorch {what}: {theirs:.2} {unit}; vdm / PyTorch = {:.2}",
                ours / theirs
            );
        }
    }
}

/// Times one warm-up and `runs` calls of `forward`; returns the median in seconds.
fn time_forward(
    label: &str,
    runs: usize,
    mut forward: impl FnMut() -> Result<Tensor>,
) -> Result<f64> {
    let start = Instant::now();
    let out = forward()?;
    let warmup_ms = start.elapsed().as_secs_f64() * 1e3;
    println!(
        "{label}: warm-up {warmup_ms:.0} ms (output {:?})",
        out.dims()
    );
    drop(out);
    let mut times = Vec::with_capacity(runs);
    for run in 0..runs {
        let cpu_start = cpu_seconds();
        let start = Instant::now();
        let out = forward()?;
        let ms = start.elapsed().as_secs_f64() * 1e3;
        drop(out);
        match (cpu_start, cpu_seconds()) {
            (Some(a), Some(b)) => println!("{label}: run {run}: {ms:.0} ms ({:.1} s CPU)", b - a),
            _ => println!("{label}: run {run}: {ms:.0} ms"),
        }
        times.push(ms);
    }
    let median_ms = median(&times);
    println!("{label}: median {median_ms:.0} ms per forward over {runs} runs");
    Ok(median_ms / 1e3)
}

fn main() -> Result<()> {
    let runs = env_usize("VDM_BENCH_RUNS", 2);
    let skip_2d = std::env::var("VDM_BENCH_SKIP_2D").is_ok_and(|v| v == "1");
    // As `vdm run` does by default.
    vdm_nodes::allocator::retain_freed_memory();
    let device = Device::Cpu;
    println!(
        "SD 1.5 UNet + AnimateDiff v3 motion modules, f32, CPU, {} threads, batch {BATCH}, \
         {FRAMES} frames, {LATENT}x{LATENT} latent",
        candle_core::utils::get_num_threads()
    );

    let start = Instant::now();
    let RandomModels {
        unet,
        adapter,
        unet_parameters,
        motion_parameters,
    } = RandomModels::new(&device)?;
    println!("build: {:.1} s", start.elapsed().as_secs_f64());
    println!(
        "parameters: UNet {unet_parameters}, motion modules {motion_parameters}, total {}",
        unet_parameters + motion_parameters
    );

    let sample = Tensor::randn(0f32, 1.0, (BATCH, 4, FRAMES, LATENT, LATENT), &device)?;
    let text = Tensor::randn(0f32, 1.0, (BATCH, 1, 77, 768), &device)?;
    let context =
        text.broadcast_as((BATCH, FRAMES, 77, 768))?
            .reshape((BATCH * FRAMES, 77, 768))?;
    let hook = AttentionHook::new();
    let motion = [MotionPatch::new(&adapter)];
    let with_motion = UNetPatches {
        hook: &hook,
        motion: &motion,
        taps: &[],
    };
    let reference = Reference::from_env();
    let seconds = time_forward("UNet + motion modules forward", runs, || {
        unet.forward(&UNetInputs::new(&sample, 501.0, &context), &with_motion)
    })?;
    if let Some(reference) = &reference {
        let pointer = "/unet_motion_forward/median_s";
        reference.compare("median", pointer, seconds, "s");
    }
    if !skip_2d {
        // Each frame as a one-frame video: the image UNet on the 16 frames.
        let images =
            sample
                .permute((0, 2, 1, 3, 4))?
                .reshape((BATCH * FRAMES, 4, 1, LATENT, LATENT))?;
        let seconds = time_forward("UNet forward (16 frames as images)", runs, || {
            unet.forward(
                &UNetInputs::new(&images, 501.0, &context),
                &UNetPatches::attention(&hook),
            )
        })?;
        if let Some(reference) = &reference {
            let pointer = "/unet2d_forward_same_16_images/median_s";
            reference.compare("median", pointer, seconds, "s");
        }
    }
    let steps = env_usize("VDM_BENCH_STEPS", 2);
    if steps > 0 {
        time_sampling_steps(&unet, adapter, steps)?;
    }
    match peak_rss_gib() {
        Some(gib) => {
            println!("peak RSS: {gib:.2} GiB");
            if let Some(reference) = &reference {
                reference.compare("peak RSS", "/peak_rss_gib", gib, "GiB");
            }
        }
        None => println!("peak RSS: unavailable (/proc/self/status not readable)"),
    }
    Ok(())
}

/// The whole sampling loop on one video: guidance doubles the UNet batch, as in the forward
/// benchmark above, so the two differ by the loop's own cost (scheduler, guidance, copies).
fn time_sampling_steps(
    unet: &std::sync::Arc<UNet2DConditionModel>,
    adapter: MotionAdapter,
    steps: usize,
) -> Result<()> {
    use vdm_nodes::models::patcher::PatchedUNet;
    use vdm_nodes::sampling::{
        SampleInputs, SampleSettings, Sampler, StepReport, TextConditioning,
    };
    use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
    let device = Device::Cpu;
    let model = PatchedUNet::new(unet.clone())
        .with_motion(std::sync::Arc::new(adapter), 1.0)
        .map_err(candle_core::Error::Msg)?;
    let noise = Tensor::randn(0f32, 1.0, (1, 4, FRAMES, LATENT, LATENT), &device)?;
    let positive = Tensor::randn(0f32, 1.0, (1, 77, 768), &device)?;
    let negative = Tensor::randn(0f32, 1.0, (1, 77, 768), &device)?;
    let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
    let settings = SampleSettings {
        steps,
        guidance_scale: 7.5,
        strength: 1.0,
    };
    let mut times = Vec::with_capacity(steps);
    let mut last = Instant::now();
    let inputs = SampleInputs {
        noise: &noise,
        init_latents: None,
        text: TextConditioning {
            positive: &positive,
            negative: &negative,
        },
    };
    let mut on_step = |report: &StepReport<'_>| {
        let ms = last.elapsed().as_secs_f64() * 1e3;
        let (done, total) = (report.step.index + 1, report.step.count);
        println!("sampling step {done}/{total}: {ms:.0} ms");
        times.push(ms);
        last = Instant::now();
        Ok(())
    };
    Sampler::new(&model, &scheduler)
        .on_step(&mut on_step)
        .sample(&settings, &inputs)?;
    println!(
        "sampling: median {:.0} ms per step over {steps} steps (1 video, guidance 7.5, DDIM)",
        median(&times)
    );
    Ok(())
}
