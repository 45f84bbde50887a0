//! The CPU kernels the layers dispatch to, and when they apply.
//!
//! Each fused kernel (convolution, group norm, linear, GEGLU, attention) is a candle custom op
//! with a CPU forward only and no backward pass, so it runs for f32 tensors on the CPU that no
//! gradient flows through; elsewhere (CUDA, half precision, training) the layer runs candle's
//! ops. The same rule picks between candle's backward-less fast softmax and layer norm and
//! their differentiable compositions ([`softmax_last_dim`], [`layer_norm`]).

pub(crate) mod attention;
pub(crate) mod conv;
pub(crate) mod frozen;
pub(crate) mod geglu;
pub(crate) mod group_norm;
pub(crate) mod linear;
pub mod vector_math;
mod winograd;

use std::cell::Cell;
use std::sync::OnceLock;

use candle_core::{CpuStorage, DType, Layout, Result, Tensor, D};

/// Whether the fused kernels are switched on for this process: `VDM_FUSED=0` (or `false`,
/// `off`) switches them off, read once. With them off every layer runs the composed candle
/// ops, the path that training takes, so the parity tests can prove it equal on the CPU.
fn enabled_by_environment() -> bool {
    static ENABLED: OnceLock<bool> = OnceLock::new();
    *ENABLED.get_or_init(|| {
        !matches!(
            std::env::var("VDM_FUSED").as_deref(),
            Ok("0") | Ok("false") | Ok("off")
        )
    })
}

thread_local! {
    static COMPOSED_ONLY: Cell<bool> = const { Cell::new(false) };
}

/// Runs `f` with the fused kernels (and candle's backward-less fast paths) switched off on this
/// thread: every layer called from `f` takes the composed, differentiable path.
pub fn with_composed_ops<R>(f: impl FnOnce() -> R) -> R {
    struct Restore(bool);
    impl Drop for Restore {
        fn drop(&mut self) {
            COMPOSED_ONLY.with(|c| c.set(self.0));
        }
    }
    let _restore = Restore(COMPOSED_ONLY.with(|c| c.replace(true)));
    f()
}

/// Whether fast paths without a backward may run at all here (the switch above and
/// `VDM_FUSED`).
pub(crate) fn fast_paths_enabled() -> bool {
    enabled_by_environment() && !COMPOSED_ONLY.with(Cell::get)
}

/// Whether every one of `tensors` is f32 on the CPU with no gradient to track, and the fused
/// kernels are switched on.
pub(crate) fn applies(tensors: &[&Tensor]) -> bool {
    fast_paths_enabled()
        && tensors
            .iter()
            .all(|t| t.device().is_cpu() && t.dtype() == DType::F32 && !t.track_op())
}

/// Whether candle's fast kernels that have no backward (`softmax_last_dim`, `layer_norm`) may
/// run on `tensors`: on any device, when no gradient is tracked.
fn no_gradient(tensors: &[&Tensor]) -> bool {
    fast_paths_enabled() && tensors.iter().all(|t| !t.track_op())
}

/// Softmax over the last dimension: candle's one-pass kernel for inference, the composed
/// (differentiable) softmax when a gradient flows through `xs`.
pub fn softmax_last_dim(xs: &Tensor) -> Result<Tensor> {
    if no_gradient(&[xs]) {
        candle_nn::ops::softmax_last_dim(xs)
    } else {
        candle_nn::ops::softmax(xs, D::Minus1)
    }
}

/// Layer normalisation over the last dimension with affine `weight` and `bias`: candle's fused
/// kernel for contiguous inputs without gradients, else the composition of ops (which has a
/// backward; candle's kernel has none, nor an f64 form).
pub fn layer_norm(xs: &Tensor, weight: &Tensor, bias: &Tensor, eps: f64) -> Result<Tensor> {
    if xs.is_contiguous() && xs.dtype() != DType::F64 && no_gradient(&[xs, weight, bias]) {
        candle_nn::ops::layer_norm(xs, weight, bias, eps as f32)
    } else {
        candle_nn::ops::layer_norm_slow(xs, weight, bias, eps as f32)
    }
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
