//! CPU benchmark of denoising reuse (`video::reuse`, Step Selector): the whole sampling loop of
//! the full-size SD 1.5 UNet + AnimateDiff v3 motion modules with random weights, f32, one
//! video of 16 frames at 32×32 latents, guidance 7.5, DDIM, `VDM_BENCH_STEPS` steps (default
//! 4), run plainly and with reuse (key stride 4, reuse until 0.5, copy propagation) at equal
//! steps. Prints each step's time and a table of frame evaluations, wall and CPU time and their
//! ratios; the target is at least 1.6× fewer frame evaluations and 1.45× less wall time.
//!
//! One UNet forward on the whole clip runs first as a warm-up (the allocator's first large
//! tensors are page-faulted in); `VDM_BENCH_WARMUP=0` skips it.
//!
//! Run with `cargo bench -p vdm-nodes --bench reuse`.

mod common;

use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use vdm_nodes::models::patcher::PatchedUNet;
use vdm_nodes::sampling::{
    FrameStrategy, NoisePredictor, PredictRequest, SampleInputs, SampleSettings, Sampler,
    StepReport, TextConditioning,
};
use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
use vdm_nodes::video::reuse::{DenoisingReuse, Propagation, ReuseConfig, ReuseMode};

use common::{cpu_seconds, env_usize, median, peak_rss_gib, RandomModels};

const FRAMES: usize = 16;
const LATENT: usize = 32;
const GUIDANCE: f64 = 7.5;
const KEY_STRIDE: usize = 4;
const REUSE_UNTIL: f64 = 0.5;

/// What one sampling run took.
struct Timing {
    frame_evaluations: usize,
    wall_seconds: f64,
    cpu_seconds: Option<f64>,
}

/// Samples with `strategy` (or plainly) and times it, printing each step.
fn time_run(
    label: &str,
    model: &PatchedUNet,
    settings: &SampleSettings,
    inputs: &SampleInputs<'_>,
    strategy: Option<&mut dyn FrameStrategy>,
) -> Result<Timing> {
    let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
    let mut step_times = Vec::new();
    let mut last = Instant::now();
    let mut on_step = |report: &StepReport<'_>| {
        let seconds = last.elapsed().as_secs_f64();
        let frames = report.evaluated_frames.map_or(FRAMES, <[usize]>::len);
        println!(
            "{label}: step {}/{}: {frames} frames, {seconds:.1} s",
            report.step.index + 1,
            report.step.count
        );
        step_times.push(seconds);
        last = Instant::now();
        Ok(())
    };
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    let mut sampler = Sampler::new(model, &scheduler).on_step(&mut on_step);
    if let Some(strategy) = strategy {
        sampler = sampler.with_strategy(strategy);
    }
    let output = sampler.sample(settings, inputs)?;
    let wall_seconds = start.elapsed().as_secs_f64();
    drop(sampler);
    let cpu_seconds = cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a);
    println!(
        "{label}: {wall_seconds:.1} s, median step {:.1} s, {} frame evaluations",
        median(&step_times),
        output.frame_evaluations
    );
    Ok(Timing {
        frame_evaluations: output.frame_evaluations,
        wall_seconds,
        cpu_seconds,
    })
}

fn main() -> Result<()> {
    let steps = env_usize("VDM_BENCH_STEPS", 4);
    let warm_up = env_usize("VDM_BENCH_WARMUP", 1) > 0;
    // As `vdm run` does by default.
    vdm_nodes::allocator::retain_freed_memory();
    let device = Device::Cpu;
    println!(
        "denoising reuse: SD 1.5 UNet + AnimateDiff v3 motion modules (random weights), f32, CPU, \
         {} threads; 1 video, {FRAMES} frames, {LATENT}x{LATENT} latents, guidance {GUIDANCE}, \
         DDIM, {steps} steps; reuse: key stride {KEY_STRIDE}, reuse until {REUSE_UNTIL}, copy",
        candle_core::utils::get_num_threads()
    );
    let start = Instant::now();
    let models = RandomModels::new(&device)?;
    let model = PatchedUNet::new(models.unet.clone())
        .with_motion(std::sync::Arc::new(models.adapter), 1.0)
        .map_err(candle_core::Error::Msg)?;
    println!("build: {:.1} s", start.elapsed().as_secs_f64());

    let noise = Tensor::randn(0f32, 1.0, (1, 4, FRAMES, LATENT, LATENT), &device)?;
    let positive = Tensor::randn(0f32, 1.0, (1, 77, 768), &device)?;
    let negative = Tensor::randn(0f32, 1.0, (1, 77, 768), &device)?;
    let settings = SampleSettings {
        steps,
        guidance_scale: GUIDANCE,
        strength: 1.0,
    };
    let inputs = SampleInputs {
        noise: &noise,
        init_latents: None,
        text: TextConditioning {
            positive: &positive,
            negative: &negative,
        },
    };

    if warm_up {
        let start = Instant::now();
        let batch = Tensor::cat(&[&noise, &noise], 0)?;
        let text = Tensor::cat(&[&negative, &positive], 0)?;
        model.predict(&PredictRequest {
            latents: &batch,
            timestep: 501.0,
            text: &text,
            step: None,
            guidance: settings.guidance(),
            frame_positions: None,
            run: None,
        })?;
        println!("warm-up forward: {:.1} s", start.elapsed().as_secs_f64());
    }

    let plain = time_run("plain", &model, &settings, &inputs, None)?;
    let config = ReuseConfig {
        key_stride: KEY_STRIDE,
        reuse_until: REUSE_UNTIL,
        mode: ReuseMode::Fixed,
        propagation: Propagation::Copy,
    };
    let mut reuse = DenoisingReuse::new(config, &noise)?;
    let reused = time_run("reuse", &model, &settings, &inputs, Some(&mut reuse))?;

    let cpu = |t: &Timing| {
        t.cpu_seconds
            .map_or("n/a".to_owned(), |s| format!("{s:.1} s"))
    };
    let cpu_ratio = match (plain.cpu_seconds, reused.cpu_seconds) {
        (Some(p), Some(r)) => format!("{:.2}×", p / r),
        _ => "n/a".to_owned(),
    };
    let evaluation_ratio = plain.frame_evaluations as f64 / reused.frame_evaluations as f64;
    let wall_ratio = plain.wall_seconds / reused.wall_seconds;
    println!();
    println!("| {steps} steps | plain | reuse | plain / reuse |");
    println!("|---|---|---|---|");
    println!(
        "| UNet frame evaluations | {} | {} | {evaluation_ratio:.2}× |",
        plain.frame_evaluations, reused.frame_evaluations
    );
    println!(
        "| wall time | {:.1} s | {:.1} s | {wall_ratio:.2}× |",
        plain.wall_seconds, reused.wall_seconds
    );
    println!(
        "| CPU time | {} | {} | {cpu_ratio} |",
        cpu(&plain),
        cpu(&reused)
    );
    let verdict = |met: bool| if met { "met" } else { "NOT met" };
    println!();
    println!(
        "target ≥ 1.6× fewer frame evaluations: {}; ≥ 1.45× less wall time: {}",
        verdict(evaluation_ratio >= 1.6),
        verdict(wall_ratio >= 1.45)
    );
    if let Some(gib) = peak_rss_gib() {
        println!("peak RSS: {gib:.2} GiB");
    }
    Ok(())
}
