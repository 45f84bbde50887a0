//! Weights by checkpoint key, for rebuilding a model with some of them replaced.
//!
//! A model built through [`recording`] keeps every tensor it read, under its checkpoint key
//! (diffusers naming, relative to the model root). [`overlay`] serves those tensors again with
//! some replaced, so the same `new(vb, cfg)` builds a patched copy that shares every other
//! weight with the frozen base: LoRA deltas merged into a weight, tuned Q/K/V projections, or
//! trainable `Var`s (whose tensors then carry gradients through the rebuilt layers).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use candle_core::{DType, Device, Result, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::{Init, VarBuilder};

/// Tensors by checkpoint key.
pub type NamedWeights = BTreeMap<String, Tensor>;

/// What the recording backend has read so far.
#[derive(Clone, Default)]
pub struct Recorded(Arc<Mutex<NamedWeights>>);

impl Recorded {
    /// The tensors read, by key.
    pub fn take(&self) -> NamedWeights {
        let mut weights = self.0.lock().unwrap_or_else(|e| e.into_inner());
        std::mem::take(&mut *weights)
    }
}

struct Recording<'a> {
    inner: VarBuilder<'a>,
    seen: Recorded,
}

impl SimpleBackend for Recording<'_> {
    fn get(&self, s: Shape, name: &str, h: Init, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let tensor = self.inner.get_with_hints_dtype(s, name, h, dtype)?;
        let mut seen = self.seen.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, _dev: &Device) -> Result<Tensor> {
        let tensor = self.inner.get_unchecked_dtype(name, dtype)?;
        let mut seen = self.seen.0.lock().unwrap_or_else(|e| e.into_inner());
        seen.insert(name.to_string(), tensor.clone());
        Ok(tensor)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.inner.contains_tensor(name)
    }
}

/// A builder that reads through `vb` (from its prefix on) and records every tensor read, under
/// its key relative to that prefix.
pub fn recording(vb: VarBuilder<'_>) -> (VarBuilder<'_>, Recorded) {
    let seen = Recorded::default();
    let (dtype, device) = (vb.dtype(), vb.device().clone());
    let backend = Recording {
        inner: vb,
        seen: seen.clone(),
    };
    (
        VarBuilder::from_backend(Box::new(backend), dtype, device),
        seen,
    )
}

struct Overlay {
    base: Arc<NamedWeights>,
    replaced: Arc<NamedWeights>,
}

impl Overlay {
    fn lookup(&self, name: &str) -> Result<&Tensor> {
        self.replaced
            .get(name)
            .or_else(|| self.base.get(name))
            .ok_or_else(|| candle_core::Error::Msg(format!("no weight named `{name}`")))
    }
}

impl SimpleBackend for Overlay {
    fn get(&self, s: Shape, name: &str, _h: Init, dtype: DType, dev: &Device) -> Result<Tensor> {
        let tensor = self.lookup(name)?;
        if tensor.shape() != &s {
            candle_core::bail!(
                "weight `{name}` has shape {:?}, the layer expects {:?}",
                tensor.dims(),
                s.dims()
            )
        }
        tensor.to_device(dev)?.to_dtype(dtype)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> Result<Tensor> {
        self.lookup(name)?.to_device(dev)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.replaced.contains_key(name) || self.base.contains_key(name)
    }
}

/// A builder serving `base` with the tensors of `replaced` in place of those of the same key.
pub fn overlay(
    base: &Arc<NamedWeights>,
    replaced: &Arc<NamedWeights>,
    dtype: DType,
    device: &Device,
) -> VarBuilder<'static> {
    let backend = Overlay {
        base: base.clone(),
        replaced: replaced.clone(),
    };
    VarBuilder::from_backend(Box::new(backend), dtype, device.clone())
}

/// The subset of `replaced` whose keys `weights` has, checking each shape.
pub fn matching(weights: &NamedWeights, replaced: &NamedWeights) -> Result<NamedWeights> {
    let mut found = NamedWeights::new();
    for (key, tensor) in replaced {
        if let Some(base) = weights.get(key) {
            if base.dims() != tensor.dims() {
                candle_core::bail!(
                    "weight override `{key}` has shape {:?}, the model's weight has {:?}",
                    tensor.dims(),
                    base.dims()
                )
            }
            found.insert(key.clone(), tensor.clone());
        }
    }
    Ok(found)
}
