//! 2-D convolution as the UNet uses it.
//!
//! On the CPU, for f32 inputs that no gradient flows through, each image is unfolded (im2col)
//! into a per-thread buffer in the kernel's own (C_in, k_h, k_w) order, and one gemm writes the
//! (C_out, H·W) result straight into the NCHW output on top of the bias. candle's CPU conv2d
//! re-lays out the whole kernel on every call, gathers its tiles element by element and adds the
//! bias in a separate pass. Elsewhere (CUDA, half precision, training) candle's conv2d runs.

use candle_core::{Result, Tensor};
use candle_nn::{Conv2dConfig, Module, VarBuilder};

use crate::models::ops::{
    self as fused,
    conv::Im2ColConv,
    frozen::{self, FrozenConv},
};

/// `nn.Conv2d(in, out, kernel, stride, padding)` with bias (dilation 1, one group).
#[derive(Debug, Clone)]
pub struct Conv2d {
    inner: candle_nn::Conv2d,
    weight: Tensor,
    bias: Tensor,
    kernel: usize,
    stride: usize,
    padding: usize,
}

impl Conv2d {
    pub fn new(
        vb: VarBuilder,
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<Self> {
        let cfg = Conv2dConfig {
            padding,
            stride,
            ..Default::default()
        };
        let inner = candle_nn::conv2d(in_channels, out_channels, kernel, cfg, vb.clone())?;
        let weight = inner.weight().clone();
        let bias = match inner.bias() {
            Some(bias) => bias.clone(),
            None => candle_core::bail!("{}: convolution without bias", vb.prefix()),
        };
        Ok(Self {
            inner,
            weight,
            bias,
            kernel,
            stride,
            padding,
        })
    }

    /// (C_out, C_in, k, k).
    pub fn weight(&self) -> &Tensor {
        &self.weight
    }

    /// (N, C_in, H, W) → (N, C_out, H_out, W_out).
    pub fn forward(&self, xs: &Tensor) -> Result<Tensor> {
        let op = Im2ColConv {
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        };
        if xs.rank() == 4 && fused::applies(&[xs, &self.weight, &self.bias]) {
            return xs
                .contiguous()?
                .apply_op3_no_bwd(&self.weight.contiguous()?, &self.bias, &op);
        }
        if xs.rank() == 4 && frozen::applies(xs, &[&self.weight, &self.bias]) {
            return xs.contiguous()?.apply_op3(
                &self.weight.contiguous()?,
                &self.bias,
                FrozenConv(op),
            );
        }
        self.inner.forward(xs)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;
    use candle_core::Device;
    use std::collections::HashMap;

    fn check(
        cin: usize,
        cout: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        hw: (usize, usize),
        batch: usize,
    ) -> Result<()> {
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 1.0, (cout, cin, kernel, kernel), &dev)?,
        );
        weights.insert("bias".to_string(), Tensor::randn(0f32, 1.0, cout, &dev)?);
        let vb = VarBuilder::from_tensors(weights, DType::F32, &dev);
        let conv = Conv2d::new(vb, cin, cout, kernel, stride, padding)?;
        let xs = Tensor::randn(0f32, 1.0, (batch, cin, hw.0, hw.1), &dev)?;
        let ours = conv.forward(&xs)?;
        let reference = conv.inner.forward(&xs)?;
        assert_eq!(ours.dims(), reference.dims());
        let diff = (ours - reference)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(
            diff < 1e-4,
            "{cin}->{cout} k{kernel} s{stride} p{padding} {hw:?}: {diff}"
        );
        Ok(())
    }

    #[test]
    fn im2col_conv_matches_candle_conv2d() -> Result<()> {
        check(5, 7, 3, 1, 1, (6, 9), 3)?;
        check(5, 7, 3, 1, 1, (6, 9), 1)?;
        check(4, 6, 3, 2, 1, (7, 8), 2)?;
        check(4, 6, 3, 2, 0, (8, 9), 2)?;
        check(6, 3, 1, 1, 0, (5, 4), 4)?;
        check(3, 4, 3, 1, 0, (3, 3), 2)?;
        // Large enough for one gemm per image; a strided convolution of grouped images.
        check(3, 5, 3, 1, 1, (24, 24), 3)?;
        check(3, 5, 3, 2, 1, (16, 16), 5)?;
        // Enough input channels for the Winograd path, odd sizes included.
        check(16, 7, 3, 1, 1, (6, 9), 3)?;
        check(20, 5, 3, 1, 1, (7, 5), 1)?;
        check(32, 40, 3, 1, 1, (1, 2), 2)?;
        // Non-contiguous input.
        let dev = Device::Cpu;
        let mut weights = HashMap::new();
        weights.insert(
            "weight".to_string(),
            Tensor::randn(0f32, 1.0, (4, 3, 3, 3), &dev)?,
        );
        weights.insert("bias".to_string(), Tensor::randn(0f32, 1.0, 4, &dev)?);
        let conv = Conv2d::new(
            VarBuilder::from_tensors(weights, DType::F32, &dev),
            3,
            4,
            3,
            1,
            1,
        )?;
        let xs = Tensor::randn(0f32, 1.0, (2, 3, 5, 6), &dev)?.transpose(2, 3)?;
        let diff = (conv.forward(&xs)? - conv.inner.forward(&xs)?)?
            .abs()?
            .flatten_all()?
            .max(0)?
            .to_scalar::<f32>()?;
        assert!(diff < 1e-4, "{diff}");
        Ok(())
    }
}
