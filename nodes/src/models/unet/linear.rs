//! `nn.Linear` as the transformers use it, over the last dimension of (…, in) activations.
//!
//! On the CPU, for f32 that no gradient flows through, the rows are one gemm that writes on top
//! of the bias, and of the residual when the layer ends a residual branch: candle's linear adds
//! the bias in a second pass and the residual add is a third. Elsewhere candle's linear runs.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use candle_nn::{Module, VarBuilder};

use crate::models::ops::{
    self as fused,
    frozen::{self, FrozenLinear},
    linear::{FusedLinear, ToImages},
};

#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
    /// The bias as f32 on the CPU, read by the fused kernel (absent without bias or elsewhere).
    cpu_bias: Option<Arc<[f32]>>,
}

impl Linear {
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Result<Self> {
        let cpu_bias = match &bias {
            Some(b) if b.device().is_cpu() && b.dtype() == DType::F32 => {
                Some(Arc::from(b.flatten_all()?.to_vec1::<f32>()?))
            }
            _ => None,
        };
        Ok(Self {
            inner: candle_nn::Linear::new(weight, bias),
            cpu_bias,
        })
    }

    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// (…, in) → (…, out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        if let Some(op) = self.fused(xs) {
            return xs.contiguous()?.apply_op2_no_bwd(self.weight(), &op);
        }
        if let Some(op) = self.frozen(xs) {
            return xs.contiguous()?.apply_op2(self.weight(), op);
        }
        self.inner.forward(xs)
    }

    /// `self(xs) + residual`, the residual of the output's shape.
    pub fn forward_add(&self, xs: &Tensor, residual: &Tensor) -> Result<Tensor> {
        match self.fused(xs) {
            Some(op) if fused::applies(&[residual]) => {
                xs.contiguous()?
                    .apply_op3_no_bwd(self.weight(), &residual.contiguous()?, &op)
            }
            _ => match self.frozen(xs) {
                Some(op) if residual.device().is_cpu() && residual.dtype() == DType::F32 => xs
                    .contiguous()?
                    .apply_op3(self.weight(), &residual.contiguous()?, op),
                _ => self.inner.forward(xs)? + residual,
            },
        }
    }

    /// `residual + scale · self(rows)` for rows (B, H·W, F, C_in) of tokens, written back as
    /// images: (B·F, C_out, H, W), the layout of `residual`. This is how a transformer's output
    /// projection rejoins the convolutional stream, without a transposing copy.
    pub fn forward_to_images_add(
        &self,
        rows: &Tensor,
        residual: &Tensor,
        scale: f64,
    ) -> Result<Tensor> {
        let (videos, pixels, frames, _) = rows.dims4()?;
        let (images, out_dim, height, width) = residual.dims4()?;
        if images != videos * frames || pixels != height * width {
            candle_core::bail!(
                "linear: token rows {:?} do not fit images {:?}",
                rows.dims(),
                residual.dims()
            )
        }
        match self.fused(rows) {
            Some(op) if fused::applies(&[residual]) => {
                let op = ToImages {
                    bias: op.bias,
                    scale: scale as f32,
                };
                rows.contiguous()?
                    .apply_op3_no_bwd(self.weight(), &residual.contiguous()?, &op)
            }
            _ => {
                let images_out = self
                    .inner
                    .forward(rows)?
                    .permute((0, 2, 3, 1))?
                    .reshape((images, out_dim, height, width))?;
                images_out.affine(scale, 0.0)? + residual
            }
        }
    }

    /// The fused kernel with an input-only backward, when a gradient flows through `xs` and
    /// none through the weights.
    fn frozen(&self, xs: &Tensor) -> Option<FrozenLinear> {
        let mut weights = vec![self.weight()];
        weights.extend(self.inner.bias());
        let bias_ready = self.inner.bias().is_none() || self.cpu_bias.is_some();
        (bias_ready && xs.rank() >= 1 && frozen::applies(xs, &weights)).then(|| FrozenLinear {
            bias: self.cpu_bias.clone(),
        })
    }

    /// The fused kernel, when it applies to `xs`.
    fn fused(&self, xs: &Tensor) -> Option<FusedLinear<'_>> {
        let applies = fused::applies(&[xs, self.weight()])
            && xs.rank() >= 1
            && self.inner.bias().is_none_or(|b| fused::applies(&[b]));
        applies.then_some(FusedLinear {
            bias: self.cpu_bias.as_deref(),
        })
    }
}

impl Module for Linear {
    fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        Linear::forward(self, xs)
    }
}

/// `nn.Linear(in, out)` with bias, weight `(out, in)` under `vb`.
pub fn linear(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    let weight = vb.get((out_dim, in_dim), "weight")?;
    let bias = vb.get(out_dim, "bias")?;
    Linear::new(weight, Some(bias))
}

/// `nn.Linear(in, out, bias=False)`.
pub fn linear_no_bias(in_dim: usize, out_dim: usize, vb: VarBuilder) -> Result<Linear> {
    Linear::new(vb.get((out_dim, in_dim), "weight")?, None)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    fn max_abs_diff(a: &Tensor, b: &Tensor) -> Result<f32> {
        (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()
    }

    #[test]
    fn fused_linear_matches_candle() -> Result<()> {
        let dev = Device::Cpu;
        let weight = Tensor::randn(0f32, 1.0, (7, 5), &dev)?;
        let bias = Tensor::randn(0f32, 1.0, 7, &dev)?;
        let xs = Tensor::randn(0f32, 1.0, (3, 4, 5), &dev)?;
        let residual = Tensor::randn(0f32, 1.0, (3, 4, 7), &dev)?;
        for bias in [Some(bias.clone()), None] {
            let ours = Linear::new(weight.clone(), bias.clone())?;
            let reference = candle_nn::Linear::new(weight.clone(), bias);
            let expected = reference.forward(&xs)?;
            assert!(max_abs_diff(&ours.forward(&xs)?, &expected)? < 1e-5);
            let with_residual = ours.forward_add(&xs, &residual)?;
            assert!(max_abs_diff(&with_residual, &(&expected + &residual)?)? < 1e-5);
            // Strided input and a transposed (column-major) weight.
            let strided = xs.transpose(0, 1)?;
            let expected = reference.forward(&strided.contiguous()?)?;
            assert!(max_abs_diff(&ours.forward(&strided)?, &expected)? < 1e-5);
        }
        // Token rows of two videos of three 2×2 frames back to images, scaled, on a residual.
        let ours = Linear::new(weight.clone(), Some(bias.clone()))?;
        let rows = Tensor::randn(0f32, 1.0, (2, 4, 3, 5), &dev)?;
        let images = Tensor::randn(0f32, 1.0, (6, 7, 2, 2), &dev)?;
        let expected = (candle_nn::Linear::new(weight.clone(), Some(bias))
            .forward(&rows)?
            .permute((0, 2, 3, 1))?
            .reshape((6, 7, 2, 2))?
            * 0.5)?
            .add(&images)?;
        let got = ours.forward_to_images_add(&rows, &images, 0.5)?;
        assert!(max_abs_diff(&got, &expected)? < 1e-5);
        let transposed = Linear::new(weight.t()?.contiguous()?.t()?, None)?;
        let expected = candle_nn::Linear::new(weight, None).forward(&xs)?;
        assert!(max_abs_diff(&transposed.forward(&xs)?, &expected)? < 1e-5);
        Ok(())
    }
}
