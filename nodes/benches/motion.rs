//! CPU benchmark of `MotionEstimator`'s domain code: dense pyramidal Lucas–Kanade flow of 16
//! frames of 512×512 (15 frame pairs) with the default settings, plus the flow preview. The
//! target is under 2 s. Prints the time of each run (one warm-up, then `VDM_BENCH_RUNS` runs,
//! default 3) and the clip amplitude.
//!
//! Run with `cargo bench -p vdm-nodes --bench motion`.

use std::time::Instant;

use candle_core::{Device, Tensor};
use vdm_nodes::video::motion::{estimate_motion, flow_preview, FlowMethod, LucasKanadeConfig};

const FRAMES: usize = 16;
const SIZE: usize = 512;

/// A smooth texture drifting 1.5 px right and 0.75 px down per frame.
fn moving_texture() -> candle_core::Result<Tensor> {
    const WAVES: [(f32, f32, f32); 5] = [
        (0.21, 0.05, 0.3),
        (-0.07, 0.17, 1.9),
        (0.12, -0.14, 4.0),
        (0.03, 0.10, 2.6),
        (0.15, 0.12, 5.1),
    ];
    let mut data = Vec::with_capacity(FRAMES * SIZE * SIZE * 3);
    for f in 0..FRAMES {
        let (dx, dy) = (1.5 * f as f32, 0.75 * f as f32);
        for y in 0..SIZE {
            for x in 0..SIZE {
                let (sx, sy) = (x as f32 - dx, y as f32 - dy);
                let sum: f32 = WAVES
                    .iter()
                    .map(|(kx, ky, phase)| (kx * sx + ky * sy + phase).sin())
                    .sum();
                let grey = 0.5 + 0.5 * sum / WAVES.len() as f32;
                data.extend([grey, grey, grey]);
            }
        }
    }
    Tensor::from_vec(data, (FRAMES, SIZE, SIZE, 3), &Device::Cpu)
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let runs: usize = std::env::var("VDM_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let frames = moving_texture()?;
    let config = LucasKanadeConfig::default();
    println!(
        "motion: {FRAMES} frames of {SIZE}×{SIZE}, {config:?}, {} threads",
        rayon::current_num_threads()
    );
    for run in 0..=runs {
        let start = Instant::now();
        let field = estimate_motion(&frames, FlowMethod::LucasKanade, &config)?;
        let estimated = start.elapsed();
        let preview = flow_preview(&field)?;
        let total = start.elapsed();
        let label = if run == 0 {
            "warm-up".to_string()
        } else {
            format!("run {run}")
        };
        println!(
            "{label}: flow {:.3} s, with preview {:.3} s (target < 2 s), amplitude {:.4}, preview {:?}",
            estimated.as_secs_f64(),
            total.as_secs_f64(),
            field.amplitude,
            preview.dims()
        );
    }
    Ok(())
}
