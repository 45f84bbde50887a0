//! The gradient path: autograd against central finite differences in f64 for every parameter
//! of a resnet, a spatial transformer and a motion module, and a trainable weight of the tiny
//! UNet + motion modules receiving a gradient through a whole forward.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{DType, Device, Result, Tensor, Var};
use candle_nn::{VarBuilder, VarMap};
use vdm_nodes::models::attention::AttentionHook;
use vdm_nodes::models::call::ForwardPass;
use vdm_nodes::models::motion::{TemporalTransformer, TemporalTransformerConfig};
use vdm_nodes::models::patcher::{PatchedUNet, UNetInputs};
use vdm_nodes::models::unet::resnet::{ResnetBlock2D, ResnetConfig};
use vdm_nodes::models::unet::transformer::{SpatialTransformer, SpatialTransformerConfig};

/// A deterministic generator of test values (no dependence on candle's global RNG state).
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> f64 {
        self.0 = self
            .0
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        // Uniform in [-1, 1).
        (self.0 >> 11) as f64 / (1u64 << 52) as f64 - 1.0
    }

    fn tensor(&mut self, dims: &[usize], scale: f64) -> Result<Tensor> {
        let n = dims.iter().product();
        let values: Vec<f64> = (0..n).map(|_| self.next() * scale).collect();
        Tensor::from_vec(values, dims, &Device::Cpu)
    }
}

/// Gives every variable random values: norms' weights near 1, everything else around 0.
fn randomize(varmap: &VarMap, rng: &mut Lcg) -> Result<()> {
    let vars = varmap.data().lock().unwrap();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    for name in names {
        let var = &vars[name];
        let noise = rng.tensor(var.dims(), 0.5)?;
        let is_norm_weight = name.contains("norm") && name.ends_with("weight");
        let value = if is_norm_weight {
            ((noise * 0.2)? + 1.0)?
        } else {
            noise
        };
        var.set(&value)?;
    }
    Ok(())
}

/// For every variable of `varmap`: autograd's gradient of `loss` is non-zero, and matches the
/// central difference (L(θ+h) − L(θ−h)) / 2h at a few elements.
fn check_gradients(
    varmap: &VarMap,
    loss: impl Fn() -> Result<Tensor>,
    rng: &mut Lcg,
) -> Result<()> {
    let grads = loss()?.backward()?;
    let vars = varmap.data().lock().unwrap().clone();
    let mut names: Vec<&String> = vars.keys().collect();
    names.sort();
    let h = 1e-5;
    let mut worst = 0f64;
    for name in names {
        let var = &vars[name];
        let grad = grads
            .get(var.as_tensor())
            .unwrap_or_else(|| panic!("`{name}` got no gradient"));
        let grad: Vec<f64> = grad.flatten_all()?.to_vec1()?;
        assert!(
            grad.iter().any(|g| *g != 0.0),
            "`{name}` got an all-zero gradient"
        );
        let original = var.as_tensor().copy()?;
        let values: Vec<f64> = original.flatten_all()?.to_vec1()?;
        for _ in 0..3 {
            let i = ((rng.next() + 1.0) / 2.0 * values.len() as f64) as usize % values.len();
            let at = |delta: f64| -> Result<f64> {
                let mut shifted = values.clone();
                shifted[i] += delta;
                var.set(&Tensor::from_vec(shifted, var.dims(), &Device::Cpu)?)?;
                loss()?.to_scalar::<f64>()
            };
            let numeric = (at(h)? - at(-h)?) / (2.0 * h);
            var.set(&original)?;
            let error = (numeric - grad[i]).abs() / numeric.abs().max(grad[i].abs()).max(1e-3);
            worst = worst.max(error);
            assert!(
                error < 1e-5,
                "`{name}`[{i}]: autograd {} vs finite difference {numeric}",
                grad[i]
            );
        }
    }
    println!("worst relative gradient error {worst:.2e}");
    Ok(())
}

#[test]
fn resnet_gradients_match_finite_differences() -> Result<()> {
    let mut rng = Lcg(1);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = ResnetConfig {
        groups: 2,
        eps: 1e-5,
        temb_channels: 6,
        output_scale_factor: 1.0,
    };
    // A channel change, so the shortcut convolution is on the path too.
    let resnet = ResnetBlock2D::new(vb, 4, 6, &cfg)?;
    randomize(&varmap, &mut rng)?;
    let xs = rng.tensor(&[2, 4, 5, 3], 1.0)?;
    let temb = rng.tensor(&[2, 6], 1.0)?;
    let weights = rng.tensor(&[2, 6, 5, 3], 1.0)?;
    check_gradients(
        &varmap,
        || (resnet.forward(&xs, &temb)? * &weights)?.sum_all(),
        &mut rng,
    )
}

#[test]
fn spatial_transformer_gradients_match_finite_differences() -> Result<()> {
    let mut rng = Lcg(2);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = SpatialTransformerConfig {
        heads: 2,
        depth: 1,
        cross_attention_dim: 5,
        groups: 2,
        use_linear_projection: false,
    };
    let transformer = SpatialTransformer::new(vb, "", 8, &cfg)?;
    randomize(&varmap, &mut rng)?;
    let xs = rng.tensor(&[2, 8, 3, 2], 1.0)?;
    let text = rng.tensor(&[2, 4, 5], 1.0)?;
    let weights = rng.tensor(&[2, 8, 3, 2], 1.0)?;
    let hook = AttentionHook::new();
    check_gradients(
        &varmap,
        || {
            let pass = ForwardPass::new(&hook);
            (transformer.forward(&xs, &text, &pass, 1)? * &weights)?.sum_all()
        },
        &mut rng,
    )
}

#[test]
fn motion_module_gradients_match_finite_differences() -> Result<()> {
    let mut rng = Lcg(3);
    let varmap = VarMap::new();
    let vb = VarBuilder::from_varmap(&varmap, DType::F64, &Device::Cpu);
    let cfg = TemporalTransformerConfig {
        channels: 8,
        heads: 2,
        depth: 1,
        groups: 2,
        max_frames: 6,
    };
    let module = TemporalTransformer::new(vb, "", &cfg)?;
    randomize(&varmap, &mut rng)?;
    // Two videos of 4 frames of 3×2 pixels.
    let xs = rng.tensor(&[8, 8, 3, 2], 1.0)?;
    let weights = rng.tensor(&[8, 8, 3, 2], 1.0)?;
    let hook = AttentionHook::new();
    check_gradients(
        &varmap,
        || {
            let pass = ForwardPass::new(&hook);
            (module.forward(&xs, 4, 1.0, &pass)? * &weights)?.sum_all()
        },
        &mut rng,
    )
}

/// A trainable `Var` in place of one temporal attention projection gets a gradient through the
/// whole UNet + motion-module forward, and the forward with the Var's unchanged value equals the
/// frozen model's.
#[test]
fn a_trainable_temporal_projection_gets_a_gradient_through_the_unet() -> Result<()> {
    let dir = &common::cases("unet_motion_mid")[0];
    let (unet, adapter) = common::unet_and_motion_adapter(dir);
    let model = PatchedUNet::new(Arc::new(unet))
        .with_motion(Arc::new(adapter), 1.0)
        .map_err(candle_core::Error::Msg)?;
    let key = "up_blocks.1.motion_modules.2.transformer_blocks.0.attn1.to_q.weight";
    let frozen = model
        .motion()
        .and_then(|m| m.weights().get(key).cloned())
        .expect("the fixture's motion adapter has the projection");
    let trainable = Var::from_tensor(&frozen)?;
    let patched = model
        .with_weights(BTreeMap::from([(
            key.to_string(),
            trainable.as_tensor().clone(),
        )]))
        .map_err(candle_core::Error::Msg)?;

    let io = common::load_tensors(&dir.join("io.safetensors"));
    let sample = &io["sample"];
    let text = &io["encoder_hidden_states"];
    let out = patched.forward(&UNetInputs::new(sample, &io["timestep"], text))?;
    let plain = model.forward(&UNetInputs::new(sample, &io["timestep"], text))?;
    // The trainable path runs the composed ops from the Var on; the fused kernels elsewhere.
    common::assert_close("trainable path vs frozen forward", &out, &plain, 1e-5);

    let grads = out.sqr()?.sum_all()?.backward()?;
    let grad = grads
        .get(trainable.as_tensor())
        .expect("the trainable projection got no gradient");
    let norm = grad.sqr()?.sum_all()?.to_scalar::<f32>()?.sqrt();
    println!("gradient norm of {key}: {norm:.3e}");
    assert!(norm > 0.0, "zero gradient for {key}");
    // Nothing frozen is tracked: only the Var has a gradient among the weights.
    let base_weight = model.base().weights().values().next().unwrap();
    assert!(grads.get(base_weight).is_none());
    Ok(())
}
