//! CPU benchmark of the entropy probe (`video::entropy`, EntropyProbe): the cost it adds to one
//! sampling step of the full-size SD 1.5 UNet + AnimateDiff v3 motion modules with random
//! weights, f32, one video of 16 frames at 32×32 latents with classifier-free guidance (a batch
//! of two, as every guided step runs). Plain and probed forwards alternate, `VDM_BENCH_REPEATS`
//! times each (default 3), so that drift of the machine falls on both alike; the probe measures
//! every attention layer (spatial, cross and temporal) at its default of 64 query rows per call.
//! The target is less than 30% extra time per step.
//!
//! One plain forward runs first as a warm-up (the allocator's first large tensors are
//! page-faulted in); `VDM_BENCH_WARMUP=0` skips it.
//!
//! Run with `cargo bench -p vdm-nodes --bench entropy`.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Result, Tensor};
use vdm_nodes::models::call::{GuidanceLayout, SamplingStep};
use vdm_nodes::models::patcher::{Patch, PatchedUNet};
use vdm_nodes::sampling::{NoisePredictor, PredictRequest};
use vdm_nodes::video::entropy::{EntropyProbe, EntropyTable, PROBE_QUERY_ROWS};

use common::{cpu_seconds, env_usize, median, peak_rss_gib, RandomModels};

const FRAMES: usize = 16;
const LATENT: usize = 32;

/// Wall and CPU seconds of one guided forward of `model`, as step `index` of `count`.
fn timed_step(
    model: &PatchedUNet,
    latents: &Tensor,
    text: &Tensor,
    index: usize,
    count: usize,
) -> Result<(f64, Option<f64>)> {
    let timestep = 999.0 * (1.0 - index as f64 / count as f64);
    let cpu_start = cpu_seconds();
    let start = Instant::now();
    model.predict(&PredictRequest {
        latents,
        timestep,
        text,
        step: Some(SamplingStep {
            index,
            count,
            timestep,
        }),
        guidance: GuidanceLayout::UncondThenCond,
        frame_positions: None,
        run: None,
    })?;
    let wall = start.elapsed().as_secs_f64();
    Ok((wall, cpu_start.zip(cpu_seconds()).map(|(a, b)| b - a)))
}

fn main() -> Result<()> {
    let repeats = env_usize("VDM_BENCH_REPEATS", 3).max(1);
    let warm_up = env_usize("VDM_BENCH_WARMUP", 1) > 0;
    // As `vdm run` does by default.
    vdm_nodes::allocator::retain_freed_memory();
    let device = Device::Cpu;
    println!(
        "entropy probe: SD 1.5 UNet + AnimateDiff v3 motion modules (random weights), f32, CPU, \
         {} threads; 1 video, {FRAMES} frames, {LATENT}x{LATENT} latents, guided (batch 2); \
         probe on every attention layer, {PROBE_QUERY_ROWS} query rows per call; {repeats} \
         forwards each, alternating",
        candle_core::utils::get_num_threads()
    );
    let start = Instant::now();
    let models = RandomModels::new(&device)?;
    let plain = PatchedUNet::new(models.unet.clone())
        .with_motion(Arc::new(models.adapter), 1.0)
        .map_err(candle_core::Error::Msg)?;
    let table = Arc::new(EntropyTable::new());
    let probed = plain
        .with_patch(Patch::Observer(Arc::new(EntropyProbe::new(table.clone()))))
        .map_err(candle_core::Error::Msg)?;
    println!("build: {:.1} s", start.elapsed().as_secs_f64());

    let video = Tensor::randn(0f32, 1.0, (1, 4, FRAMES, LATENT, LATENT), &device)?;
    let latents = Tensor::cat(&[&video, &video], 0)?;
    let text = Tensor::randn(0f32, 1.0, (2, 77, 768), &device)?;

    if warm_up {
        let (wall, _) = timed_step(&plain, &latents, &text, 0, repeats)?;
        println!("warm-up forward: {wall:.1} s");
    }

    let (mut plain_wall, mut plain_cpu) = (Vec::new(), Vec::new());
    let (mut probe_wall, mut probe_cpu) = (Vec::new(), Vec::new());
    for index in 0..repeats {
        for (label, model, wall_times, cpu_times) in [
            ("plain", &plain, &mut plain_wall, &mut plain_cpu),
            ("probe", &probed, &mut probe_wall, &mut probe_cpu),
        ] {
            let (wall, cpu) = timed_step(model, &latents, &text, index, repeats)?;
            let cpu_text = cpu.map_or("n/a".to_owned(), |s| format!("{s:.1} s"));
            println!(
                "{label}: step {}/{repeats}: {wall:.1} s wall, {cpu_text} CPU",
                index + 1
            );
            wall_times.push(wall);
            cpu_times.extend(cpu);
        }
    }

    let layers = table.ranking(None).len();
    let rows = table.rows().len();
    println!("probe recorded {rows} rows ({layers} layers × {repeats} steps)");
    let overhead = |probe: f64, plain: f64| 100.0 * (probe / plain - 1.0);
    let wall = (median(&plain_wall), median(&probe_wall));
    println!();
    println!("| median per step | plain | probe | extra |");
    println!("|---|---|---|---|");
    println!(
        "| wall time | {:.2} s | {:.2} s | {:+.1}% |",
        wall.0,
        wall.1,
        overhead(wall.1, wall.0)
    );
    if plain_cpu.len() == repeats && probe_cpu.len() == repeats {
        let cpu = (median(&plain_cpu), median(&probe_cpu));
        println!(
            "| CPU time | {:.2} s | {:.2} s | {:+.1}% |",
            cpu.0,
            cpu.1,
            overhead(cpu.1, cpu.0)
        );
    }
    println!();
    let met = overhead(wall.1, wall.0) < 30.0;
    println!(
        "target < 30% extra wall time per step: {}",
        if met { "met" } else { "NOT met" }
    );
    if let Some(gib) = peak_rss_gib() {
        println!("peak RSS: {gib:.2} GiB");
    }
    Ok(())
}
