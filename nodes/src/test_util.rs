//! Measures shared by the plugin's unit tests.

use candle_core::{DType, Device, Tensor};

/// The largest |a − b| over all elements, computed in f64 on the CPU so that tensors of any
/// dtype and device compare alike. Panics, naming both shapes, when the shapes differ: a
/// broadcast difference would hide the mismatch.
pub(crate) fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(
        a.dims(),
        b.dims(),
        "max_abs_diff: shapes differ ({:?} vs {:?})",
        a.dims(),
        b.dims()
    );
    let as_f64 = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .unwrap_or_else(|err| panic!("max_abs_diff: cannot read a tensor as f64: {err}"))
    };
    (as_f64(a) - as_f64(b))
        .and_then(|diff| diff.abs())
        .and_then(|diff| diff.max_all())
        .and_then(|max| max.to_scalar::<f64>())
        .unwrap_or_else(|err| panic!("max_abs_diff: {err}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn max_abs_diff_across_dtypes_and_signs() {
        let a = Tensor::new(&[1.0f32, -2.0, 3.5], &Device::Cpu).unwrap();
        let b = Tensor::new(&[1.0f32, 2.0, 3.0], &Device::Cpu).unwrap();
        assert_eq!(max_abs_diff(&a, &b), 4.0);
        assert_eq!(max_abs_diff(&a, &a), 0.0);
        let half = a.to_dtype(DType::BF16).unwrap();
        assert_eq!(max_abs_diff(&half, &b), 4.0);
    }

    #[test]
    #[should_panic(expected = "shapes differ")]
    fn max_abs_diff_refuses_different_shapes() {
        let a = Tensor::zeros((2, 3), DType::F32, &Device::Cpu).unwrap();
        let b = Tensor::zeros((3, 2), DType::F32, &Device::Cpu).unwrap();
        max_abs_diff(&a, &b);
    }
}
