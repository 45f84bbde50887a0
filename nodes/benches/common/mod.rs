//! What the CPU benchmarks share: the full-size SD 1.5 UNet and AnimateDiff motion modules
//! with random weights (the weight list comes from the model code itself), and the process's
//! CPU time and peak memory.
#![allow(dead_code)]

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};
use vdm_nodes::models::motion::{MotionAdapter, MotionAdapterConfig};
use vdm_nodes::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

/// A weight source that records the name and shape of every weight a model asks for, answering
/// with a zero-cost broadcast zero, so that the weight list comes from the model code itself.
#[derive(Default)]
struct ShapeRecorder {
    shapes: Mutex<Vec<(String, Shape)>>,
}

impl SimpleBackend for ShapeRecorder {
    fn get(&self, s: Shape, name: &str, _: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        if let Ok(mut shapes) = self.shapes.lock() {
            shapes.push((name.to_string(), s.clone()));
        }
        Tensor::zeros((), dtype, dev)?.broadcast_as(s)
    }

    fn get_unchecked(&self, name: &str, _: DType, _: &Device) -> Result<Tensor> {
        candle_core::bail!("{name}: shape needed")
    }

    fn contains_tensor(&self, _name: &str) -> bool {
        false
    }
}

/// Random weights for every recorded shape, scaled like PyTorch's default initialisation
/// (uniform ±1/√fan_in; norm weights 1 and biases small) so that activations stay in range.
fn random_weights(shapes: Vec<(String, Shape)>) -> Result<HashMap<String, Tensor>> {
    let mut weights = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let dims = shape.dims();
        let tensor = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in as f64).sqrt();
            Tensor::rand(-bound as f32, bound as f32, shape, &Device::Cpu)?
        } else if name.ends_with("weight") {
            Tensor::ones(shape, DType::F32, &Device::Cpu)?
        } else {
            Tensor::rand(-0.02f32, 0.02, shape, &Device::Cpu)?
        };
        weights.insert(name, tensor);
    }
    Ok(weights)
}

/// Random weights for everything `build` asks of its `VarBuilder`.
pub fn weights_for(
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let recorder = Arc::new(ShapeRecorder::default());
    struct Shared(Arc<ShapeRecorder>);
    impl SimpleBackend for Shared {
        fn get(&self, s: Shape, n: &str, h: Init, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get(s, n, h, d, dev)
        }
        fn get_unchecked(&self, n: &str, d: DType, dev: &Device) -> Result<Tensor> {
            self.0.get_unchecked(n, d, dev)
        }
        fn contains_tensor(&self, n: &str) -> bool {
            self.0.contains_tensor(n)
        }
    }
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let shapes = std::mem::take(&mut *recorder.shapes.lock().expect("recorder lock"));
    random_weights(shapes)
}

pub fn parameter_count(weights: &HashMap<String, Tensor>) -> usize {
    weights.values().map(Tensor::elem_count).sum()
}

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
