//! What the fused CPU kernels share: when they apply, and how they read their inputs.
//!
//! Each fused kernel (convolution, group norm, linear, GEGLU, attention) is a candle custom op
//! with a CPU forward only and no backward pass, so it runs for f32 tensors on the CPU that no
//! gradient flows through; elsewhere (CUDA, half precision, training) the layer runs candle's
//! ops.

use candle_core::{CpuStorage, DType, Layout, Result, Tensor};

/// Whether every one of `tensors` is f32 on the CPU with no gradient to track.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    tensors
        .iter()
        .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// The f32 values of `storage` that `layout` addresses, which must be contiguous.
pub(crate) fn contiguous_f32<'a>(
    storage: &'a CpuStorage,
    layout: &Layout,
    what: &str,
) -> Result<&'a [f32]> {
    match layout.contiguous_offsets() {
        Some((start, end)) => Ok(&storage.as_slice::<f32>()?[start..end]),
        None => candle_core::bail!("{what} is not contiguous"),
    }
}
