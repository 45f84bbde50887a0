//! The sinusoidal frame positions of the motion modules (diffusers
//! `SinusoidalPositionalEmbedding`): `pe[p, 2i] = sin(p·ω_i)`, `pe[p, 2i+1] = cos(p·ω_i)` with
//! `ω_i = exp(−2i·ln(10000)/dim)`.

use candle_core::{Device, Result, Tensor};

/// The frequencies `ω_i` of channel pairs `(2i, 2i+1)`, rounded as diffusers computes them in
/// f32: `exp(f32(2i) · f32(−ln(10000)/dim))`.
pub fn position_frequencies(dim: usize) -> Vec<f32> {
    let scale = (-(10000f64.ln()) / dim as f64) as f32;
    (0..dim)
        .step_by(2)
        .map(|i| (i as f32 * scale).exp())
        .collect()
}

/// The (max_len, dim) position table, computed in f32 step by step as diffusers does
/// (frequency, then `f32(p) · ω_i`, then sin and cos of that f32 angle). Rounding each step in
/// f32 rather than computing in f64 is what reproduces diffusers' stored `pos_embed.pe`: the
/// angle's own f32 rounding shifts the sine by many ulps near its zeros.
pub fn sinusoidal_positions(max_len: usize, dim: usize, device: &Device) -> Result<Tensor> {
    let frequencies = position_frequencies(dim);
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
