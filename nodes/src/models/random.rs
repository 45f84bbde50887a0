//! Random weights for a model, with the weight list taken from the model code itself: a weight
//! source records the name and shape of every weight a model's `new(vb, cfg)` asks for, then
//! each gets values scaled like PyTorch's default initialisation (uniform ±1/√fan_in for
//! matrices and kernels, norm weights 1, biases small), so activations stay in range. The names
//! are the checkpoint keys, so the weights can be saved as a checkpoint the loaders read.
//! Benchmarks at real size and models for trying workflows without downloads are built so.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Records every weight asked for, answering with a zero-cost broadcast zero.
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

/// A handle on a shared recorder, so the shapes can be read back after `build` consumed the
/// `VarBuilder`.
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

/// Random f32 CPU weights for everything `build` asks of its `VarBuilder`, by name.
pub fn random_weights_for(
    build: impl FnOnce(VarBuilder) -> Result<()>,
) -> Result<HashMap<String, Tensor>> {
    let recorder = Arc::new(ShapeRecorder::default());
    let vb = VarBuilder::from_backend(Box::new(Shared(recorder.clone())), DType::F32, Device::Cpu);
    build(vb)?;
    let shapes = match recorder.shapes.lock() {
        Ok(mut shapes) => std::mem::take(&mut *shapes),
        Err(poisoned) => std::mem::take(&mut *poisoned.into_inner()),
    };
    let mut weights = HashMap::with_capacity(shapes.len());
    for (name, shape) in shapes {
        let dims = shape.dims();
        let tensor = if dims.len() >= 2 {
            let fan_in: usize = dims[1..].iter().product();
            let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
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

/// The number of values in `weights`.
pub fn parameter_count(weights: &HashMap<String, Tensor>) -> usize {
    weights.values().map(Tensor::elem_count).sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_weights_are_those_the_model_asks_for_with_their_shapes() -> Result<()> {
        let weights = random_weights_for(|vb| {
            candle_nn::linear(8, 4, vb.pp("proj"))?;
            candle_nn::layer_norm(4, 1e-5, vb.pp("norm"))?;
            Ok(())
        })?;
        let mut names: Vec<&str> = weights.keys().map(String::as_str).collect();
        names.sort_unstable();
        assert_eq!(
            names,
            ["norm.bias", "norm.weight", "proj.bias", "proj.weight"]
        );
        assert_eq!(weights["proj.weight"].dims(), &[4, 8]);
        let bound = 1.0 / 8f32.sqrt();
        let max = weights["proj.weight"]
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?;
        assert!(max <= bound, "{max} > {bound}");
        assert_eq!(weights["norm.weight"].to_vec1::<f32>()?, [1.0; 4]);
        assert_eq!(parameter_count(&weights), 32 + 4 + 4 + 4);
        Ok(())
    }
}
