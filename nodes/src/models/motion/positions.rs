//! The sinusoidal frame positions of the motion modules (diffusers
//! `SinusoidalPositionalEmbedding`): `pe[p, 2i] = sin(p·ω_i)`, `pe[p, 2i+1] = cos(p·ω_i)` with
//! `ω_i = exp(−2i·ln(10000)/dim)`.

use candle_core::{Device, Result, Tensor};

/// The (max_len, dim) position table, computed in f32 step by step as diffusers does.
pub fn sinusoidal_positions(max_len: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let scale = (-(10000f64.ln()) / dim as f64) as f32;
    let frequencies: Vec<f32> = (0..dim)
        .step_by(2)
        .map(|i| (i as f32 * scale).exp())
        .collect();
    let mut table = vec![0f32; max_len * dim];
    for (position, row) in table.chunks_mut(dim).enumerate() {
        for (i, frequency) in frequencies.iter().enumerate() {
            let angle = position as f32 * frequency;
            row[2 * i] = angle.sin();
            if 2 * i + 1 < dim {
                row[2 * i + 1] = angle.cos();
            }
        }
    }
    Tensor::from_vec(table, (max_len, dim), device)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn first_rows_are_sin_cos_of_position() -> Result<()> {
        let table = sinusoidal_positions(4, 6, &Device::Cpu)?.to_vec2::<f32>()?;
        assert_eq!(table[0], vec![0.0, 1.0, 0.0, 1.0, 0.0, 1.0]);
        assert!((table[1][0] - 1f32.sin()).abs() < 1e-7);
        assert!((table[1][1] - 1f32.cos()).abs() < 1e-7);
        let w1 = (-(10000f32.ln()) * 2.0 / 6.0).exp();
        assert!((table[3][2] - (3.0 * w1).sin()).abs() < 1e-6);
        Ok(())
    }
}
