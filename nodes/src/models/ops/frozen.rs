//! The fused CPU kernels on the training path, for layers whose weights are frozen.
//!
//! candle's backward computes the gradient of both operands of every matmul and convolution,
//! so each frozen weight behind a trained parameter gets a full-size gradient that nothing
//! reads: at SD 1.5 size that is the UNet's size again in memory, and half the backward's
//! work. These ops run the fused forward kernels and give a gradient to the input (and a
//! residual) only; they apply where the input carries a gradient and the weights do not. A
//! trainable weight takes candle's ops, which give it its gradient.

use candle_core::{CpuStorage, CustomOp2, CustomOp3, Layout, Result, Shape, Tensor};
use std::sync::Arc;

use super::conv::Im2ColConv;
use super::linear::FusedLinear;
use super::{fast_paths_enabled, DType};

/// Whether the frozen-weight kernels apply: fast paths on, everything f32 on the CPU, a
/// gradient flowing through `input` and none through `weights`.
pub(crate) fn applies(input: &Tensor, weights: &[&Tensor]) -> bool {
    let cpu_f32 = |t: &Tensor| t.device().is_cpu() && t.dtype() == DType::F32;
    fast_paths_enabled()
        && input.track_op()
        && cpu_f32(input)
        && weights.iter().all(|w| cpu_f32(w) && !w.track_op())
}

/// `xs · weightᵀ + bias` over the last dimension, the weight (out, in) frozen.
pub(crate) struct FrozenLinear {
    pub(crate) bias: Option<Arc<[f32]>>,
}

impl FrozenLinear {
    fn kernel(&self) -> FusedLinear<'_> {
        FusedLinear {
            bias: self.bias.as_deref(),
        }
    }
}

/// ∂L/∂xs = ∂L/∂out · weight, over the last dimension.
fn linear_input_grad(grad: &Tensor, weight: &Tensor) -> Result<Tensor> {
    let dims = grad.dims();
    let out = dims[dims.len() - 1];
    let rows = grad.elem_count() / out.max(1);
    let mut input_dims = dims.to_vec();
    *input_dims.last_mut().expect("rank ≥ 1") = weight.dim(1)?;
    grad.contiguous()?
        .reshape((rows, out))?
        .matmul(weight)?
        .reshape(input_dims)
}

impl CustomOp2 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        CustomOp2::cpu_fwd(&self.kernel(), xs, xs_layout, weight, weight_layout)
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        weight: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>)> {
        Ok((Some(linear_input_grad(grad, weight)?), None))
    }
}

impl CustomOp3 for FrozenLinear {
    fn name(&self) -> &'static str {
        "frozen-linear-residual"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        residual: &CpuStorage,
        residual_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        CustomOp3::cpu_fwd(
            &self.kernel(),
            xs,
            xs_layout,
            weight,
            weight_layout,
            residual,
            residual_layout,
        )
    }

    fn bwd(
        &self,
        _xs: &Tensor,
        weight: &Tensor,
        _residual: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        Ok((
            Some(linear_input_grad(grad, weight)?),
            None,
            Some(grad.clone()),
        ))
    }
}

/// A 2-D convolution with bias, kernel and bias frozen.
pub(crate) struct FrozenConv(pub(crate) Im2ColConv);

impl CustomOp3 for FrozenConv {
    fn name(&self) -> &'static str {
        "frozen-conv2d"
    }

    fn cpu_fwd(
        &self,
        xs: &CpuStorage,
        xs_layout: &Layout,
        weight: &CpuStorage,
        weight_layout: &Layout,
        bias: &CpuStorage,
        bias_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        self.0
            .cpu_fwd(xs, xs_layout, weight, weight_layout, bias, bias_layout)
    }

    /// The input's gradient is the transposed convolution of the output's. At stride 1 that is
    /// a plain convolution with the kernel flipped and its channels swapped, which runs on the
    /// fused kernel (candle's CPU transposed convolution is a direct loop, many times slower);
    /// at other strides candle's op runs, with the output padding that restores a size striding
    /// rounded down, as candle's own backward computes it.
    fn bwd(
        &self,
        xs: &Tensor,
        weight: &Tensor,
        _bias: &Tensor,
        _out: &Tensor,
        grad: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let Im2ColConv {
            kernel,
            stride,
            padding,
        } = self.0;
        let input_grad = if stride == 1 && padding < kernel {
            let reversed: Vec<u32> = (0..kernel as u32).rev().collect();
            let reversed = Tensor::new(reversed.as_slice(), weight.device())?;
            // (C_out, C_in, k, k) → (C_in, C_out, k, k), each k×k window turned by 180°.
            let flipped = weight
                .transpose(0, 1)?
                .contiguous()?
                .index_select(&reversed, 2)?
                .index_select(&reversed, 3)?;
            let zero_bias = Tensor::zeros(flipped.dim(0)?, DType::F32, weight.device())?;
            let op = Im2ColConv {
                kernel,
                stride: 1,
                padding: kernel - 1 - padding,
            };
            grad.contiguous()?
                .apply_op3_no_bwd(&flipped, &zero_bias, &op)?
        } else {
            let covered = (grad.dim(2)? - 1) * stride + kernel - 2 * padding;
            let output_padding = xs.dim(2)? - covered;
            grad.contiguous()?.conv_transpose2d(
                &weight.contiguous()?,
                padding,
                output_padding,
                stride,
                1,
            )?
        };
        Ok((Some(input_grad), None, None))
    }
}

#[cfg(test)]
mod tests {
    use candle_core::{Device, Var};
    use candle_nn::VarBuilder;

    use crate::models::ops::with_composed_ops;
    use crate::models::unet::conv::Conv2d;
    use crate::models::unet::linear::Linear;

    use super::*;

    /// The gradient of Σ f(input)·direction reaching `input` (a variable), and whether
    /// `frozen`, a plain tensor `f` reads, got one. The direction is a fixed function of the
    /// output's size.
    fn gradients(
        input: &Var,
        frozen: &Tensor,
        f: impl Fn(&Tensor) -> Result<Tensor>,
    ) -> Result<(Tensor, bool)> {
        let shape = f(input.as_tensor())?.shape().clone();
        let direction = Tensor::arange(0f32, shape.elem_count() as f32, &Device::Cpu)?
            .affine(0.37, 0.0)?
            .sin()?
            .reshape(shape)?;
        let loss = (f(input.as_tensor())? * direction)?.sum_all()?;
        let grads = loss.backward()?;
        Ok((
            grads.get(input.as_tensor()).unwrap().clone(),
            grads.get(frozen).is_some(),
        ))
    }

    fn assert_close(a: &Tensor, b: &Tensor) -> Result<()> {
        let scale = b.abs()?.max_all()?.to_scalar::<f32>()?.max(1e-6);
        let error = (a - b)?.abs()?.max_all()?.to_scalar::<f32>()? / scale;
        assert!(error < 1e-5, "relative error {error}");
        Ok(())
    }

    #[test]
    fn frozen_linear_gives_the_inputs_gradient_and_none_to_its_weight() -> Result<()> {
        let weight = Tensor::randn(0f32, 0.3, (6, 5), &Device::Cpu)?;
        let bias = Tensor::randn(0f32, 0.3, 6, &Device::Cpu)?;
        let layer = Linear::new(weight.clone(), Some(bias))?;
        let input = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, 5), &Device::Cpu)?)?;
        let residual = Tensor::randn(0f32, 1.0, (2, 3, 6), &Device::Cpu)?;
        for add in [false, true] {
            let f = |xs: &Tensor| match add {
                false => layer.forward(xs),
                true => layer.forward_add(xs, &residual),
            };
            let (fast, weight_grad) = gradients(&input, &weight, f)?;
            assert!(!weight_grad, "the frozen weight got a gradient");
            let (composed, _) = with_composed_ops(|| gradients(&input, &weight, f))?;
            assert_close(&fast, &composed)?;
            let out = f(input.as_tensor())?;
            assert_close(&out, &with_composed_ops(|| f(input.as_tensor()))?)?;
        }
        Ok(())
    }

    #[test]
    fn frozen_convolutions_give_the_inputs_gradient_at_every_stride() -> Result<()> {
        for (kernel, stride, padding, size) in
            [(3, 1, 1, 7), (3, 2, 1, 8), (3, 2, 1, 7), (1, 1, 0, 5)]
        {
            let weights = std::collections::HashMap::from([
                (
                    "weight".to_string(),
                    Tensor::randn(0f32, 0.3, (4, 3, kernel, kernel), &Device::Cpu)?,
                ),
                (
                    "bias".to_string(),
                    Tensor::randn(0f32, 0.3, 4, &Device::Cpu)?,
                ),
            ]);
            let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
            let conv = Conv2d::new(vb, 3, 4, kernel, stride, padding)?;
            let input =
                Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, 3, size, size), &Device::Cpu)?)?;
            let f = |xs: &Tensor| conv.forward(xs);
            let (fast, weight_grad) = gradients(&input, conv.weight(), f)?;
            assert!(!weight_grad);
            let (composed, _) = with_composed_ops(|| gradients(&input, conv.weight(), f))?;
            assert_close(&fast, &composed)?;
        }
        Ok(())
    }
}
