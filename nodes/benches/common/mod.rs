//! What the CPU benchmarks share: the full-size SD 1.5 UNet and AnimateDiff motion modules
//! with random weights (the weight list comes from the model code itself), and the process's
//! CPU time and peak memory.
#![allow(dead_code)]

use std::sync::Arc;

use candle_core::{DType, Device, Result};
use candle_nn::VarBuilder;
use vdm_nodes::models::motion::{MotionAdapter, MotionAdapterConfig};
use vdm_nodes::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

pub use vdm_nodes::models::random::{parameter_count, random_weights_for as weights_for};

/// The full-size SD 1.5 UNet and AnimateDiff v3 motion modules with random weights, f32.
pub struct RandomModels {
    pub unet: Arc<UNet2DConditionModel>,
    pub adapter: MotionAdapter,
    pub unet_parameters: usize,
    pub motion_parameters: usize,
}

impl RandomModels {
    pub fn new(device: &Device) -> Result<Self> {
        let unet_cfg = UNet2DConditionConfig::default();
        let adapter_cfg = MotionAdapterConfig::default();
        let unet_weights = weights_for(|vb| UNet2DConditionModel::new(vb, &unet_cfg).map(|_| ()))?;
        let groups = unet_cfg.norm_num_groups;
        let adapter_weights =
            weights_for(|vb| MotionAdapter::new(vb, &adapter_cfg, groups).map(|_| ()))?;
        let unet_parameters = parameter_count(&unet_weights);
        let motion_parameters = parameter_count(&adapter_weights);
        let unet = Arc::new(UNet2DConditionModel::new(
            VarBuilder::from_tensors(unet_weights, DType::F32, device),
            &unet_cfg,
        )?);
        let adapter = MotionAdapter::new(
            VarBuilder::from_tensors(adapter_weights, DType::F32, device),
            &adapter_cfg,
            groups,
        )?;
        Ok(Self {
            unet,
            adapter,
            unet_parameters,
            motion_parameters,
        })
    }
}

pub fn peak_rss_gib() -> Option<f64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: f64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / (1024.0 * 1024.0))
}

/// User + system CPU seconds of this process so far: on a machine shared with other jobs, the
/// CPU time of a forward is steadier than its wall time.
pub fn cpu_seconds() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the parenthesised command name; utime and stime are fields 14 and 15.
    let rest = &stat[stat.rfind(')')? + 2..];
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields.get(11)?.parse::<f64>().ok()? + fields.get(12)?.parse::<f64>().ok()?;
    Some(ticks / 100.0)
}

pub fn median(times: &[f64]) -> f64 {
    let mut sorted = times.to_vec();
    sorted.sort_by(f64::total_cmp);
    let n = sorted.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        sorted[n / 2]
    } else {
        (sorted[n / 2 - 1] + sorted[n / 2]) / 2.0
    }
}

/// A `usize` from the environment variable `name`, else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}
