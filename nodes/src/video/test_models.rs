//! Tiny models and clips shared by the unit tests of the training methods.

use std::collections::HashMap;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use crate::models::motion::{MotionAdapter, MotionAdapterConfig};
use crate::models::patcher::PatchedUNet;
use crate::models::random::random_weights_for;
use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};

/// SD 1.x's layout at 32/64 channels, random weights in `dtype`: transformers in the first
/// down block, the mid block and the last up block.
pub(crate) fn tiny_image_model(dtype: DType) -> PatchedUNet {
    let config: UNet2DConditionConfig = serde_json::from_value(serde_json::json!({
        "in_channels": 4, "out_channels": 4, "sample_size": 8,
        "block_out_channels": [32, 64],
        "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
        "layers_per_block": 1, "norm_num_groups": 8,
        "cross_attention_dim": 32, "attention_head_dim": 8
    }))
    .unwrap();
    let weights =
        random_weights_for(|vb| UNet2DConditionModel::new(vb, &config).map(|_| ())).unwrap();
    let vb = VarBuilder::from_tensors(weights, dtype, &Device::Cpu);
    PatchedUNet::new(Arc::new(UNet2DConditionModel::new(vb, &config).unwrap()))
}

/// A motion module of two levels for [`tiny_image_model`], without a mid block, at most 8
/// frames at once.
pub(crate) fn tiny_motion_config() -> MotionAdapterConfig {
    serde_json::from_value(serde_json::json!({
        "block_out_channels": [32, 64],
        "motion_layers_per_block": 1,
        "motion_max_seq_length": 8,
        "use_motion_mid_block": false
    }))
    .unwrap()
}

/// Random f32 weights of [`tiny_motion_config`]'s motion module.
pub(crate) fn tiny_motion_weights() -> HashMap<String, Tensor> {
    random_weights_for(|vb| MotionAdapter::new(vb, &tiny_motion_config(), 8).map(|_| ())).unwrap()
}

/// [`tiny_image_model`] with a random motion module applied.
pub(crate) fn tiny_motion_model(dtype: DType) -> PatchedUNet {
    let vb = VarBuilder::from_tensors(tiny_motion_weights(), dtype, &Device::Cpu);
    let adapter = MotionAdapter::new(vb, &tiny_motion_config(), 8).unwrap();
    tiny_image_model(dtype)
        .with_motion(Arc::new(adapter), 1.0)
        .unwrap()
}

/// A bright square moving `speed` latent pixels right per frame: (1, 4, F, 8, 8).
pub(crate) fn moving_square(frames: usize, speed: usize) -> Tensor {
    let mut values = vec![-0.5f32; 4 * frames * 64];
    for c in 0..4 {
        for f in 0..frames {
            for y in 2..5 {
                for x in f * speed..f * speed + 3 {
                    values[((c * frames + f) * 8 + y) * 8 + (x % 8)] = 1.0;
                }
            }
        }
    }
    Tensor::from_vec(values, (1, 4, frames, 8, 8), &Device::Cpu).unwrap()
}

/// SD 1.x's training noise schedule.
pub(crate) fn sd15_noise_schedule() -> crate::schedulers::DdimScheduler {
    use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
    DdimScheduler::new(DdimSchedulerConfig::sd15()).unwrap()
}

/// That training learnt: the mean loss of the last quarter of the steps is below the first
/// quarter's.
pub(crate) fn assert_loss_falls(losses: &[f64]) {
    let quarter = losses.len() / 4;
    let mean = |xs: &[f64]| xs.iter().sum::<f64>() / xs.len() as f64;
    let (first, last) = (
        mean(&losses[..quarter]),
        mean(&losses[losses.len() - quarter..]),
    );
    assert!(
        last < first,
        "mean loss of the last quarter {last} ≥ the first's {first}: {losses:?}"
    );
}
