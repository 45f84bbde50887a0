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

/// An operand of [`matmul`]: element (row, column) at `ptr + row·row_stride + column·column_stride`.
#[derive(Clone, Copy)]
pub(crate) struct Strided<P> {
    pub ptr: P,
    pub row_stride: usize,
    pub column_stride: usize,
}

impl<P> Strided<P> {
    /// A row-major matrix whose rows start `row_stride` elements apart.
    pub fn rows(ptr: P, row_stride: usize) -> Self {
        Self {
            ptr,
            row_stride,
            column_stride: 1,
        }
    }
}

/// `dst (m × n) = scale · lhs (m × k) · rhs (k × n)`, added to what `dst` holds when
/// `accumulate` (otherwise `dst` is only written), through gemm with `parallelism`.
///
/// # Safety
/// For these sizes, every element the strides address lies inside its operand's allocation,
/// and no element of `dst` is also an element of `lhs` or `rhs`.
pub(crate) unsafe fn matmul(
    (m, n, k): (usize, usize, usize),
    dst: Strided<*mut f32>,
    lhs: Strided<*const f32>,
    rhs: Strided<*const f32>,
    accumulate: bool,
    scale: f32,
    parallelism: gemm::Parallelism,
) {
    // SAFETY: the caller's contract; gemm takes column strides before row strides.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            dst.ptr,
            dst.column_stride as isize,
            dst.row_stride as isize,
            accumulate,
            lhs.ptr,
            lhs.column_stride as isize,
            lhs.row_stride as isize,
            rhs.ptr,
            rhs.column_stride as isize,
            rhs.row_stride as isize,
            if accumulate { 1.0 } else { 0.0 },
            scale,
            false,
            false,
            false,
            parallelism,
        )
    }
}
