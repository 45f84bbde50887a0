//! GEGLU's gate in one pass: `a · gelu(b)` with exact (erf) GELU, for the feed-forward layers.

use candle_core::{CpuStorage, CustomOp1, Layout, Result, Shape};
use rayon::prelude::*;

use super::contiguous_f32;
use super::vector_math::geglu;

/// `a · gelu(b)` for `[a, b]` the two halves of the last dimension, in one pass (CPU, f32).
pub(crate) struct Geglu;

impl CustomOp1 for Geglu {
    fn name(&self) -> &'static str {
        "geglu"
    }

    fn cpu_fwd(&self, storage: &CpuStorage, layout: &Layout) -> Result<(CpuStorage, Shape)> {
        let mut dims = layout.dims().to_vec();
        let width = dims.last().copied().unwrap_or(0);
        if width % 2 != 0 {
            candle_core::bail!("geglu: odd projection width {width}")
        }
        let inner = width / 2;
        let projected = contiguous_f32(storage, layout, "geglu input")?;
        let mut out = vec![0f32; projected.len() / 2];
        if inner > 0 {
            out.par_chunks_mut(inner)
                .zip(projected.par_chunks(width))
                .for_each(|(dst, row)| {
                    let (hidden, gate) = row.split_at(inner);
                    geglu(dst, hidden, gate);
                });
        }
        if let Some(last) = dims.last_mut() {
            *last = inner;
        }
        Ok((CpuStorage::F32(out), Shape::from(dims)))
    }
}
