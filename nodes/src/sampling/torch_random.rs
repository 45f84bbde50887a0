//! PyTorch's CPU random generator and its `torch.randn`, bit for bit, so that a seed gives the
//! noise ComfyUI gives for it.
//!
//! ComfyUI draws a sampler's initial noise on the CPU, `torch.randn(shape,
//! generator=torch.manual_seed(seed))`, and its ancestral samplers draw fresh noise from one
//! `torch.Generator` seeded once, one `torch.randn(x.size())` per step
//! (`default_noise_sampler`). [`TorchGenerator`] is that generator (ATen's `CPUGeneratorImpl`:
//! an mt19937 engine and a cached normal sample) and [`TorchGenerator::randn`] is ATen's CPU
//! normal kernel, with all three of its paths:
//!
//! - fewer than 16 values: one Box–Muller pair in double precision per two values, the second
//!   value of a pair kept in the generator for the next draw, even across calls;
//! - 16 values or more: every uniform first, then Box–Muller on blocks of 16 (the cosines of
//!   pairs `(j, j + 8)` into the first half, the sines into the second);
//! - a count not a multiple of 16: the last 16 values drawn again from fresh uniforms and
//!   transformed as one more block.
//!
//! The block transform is the one place where the CPU matters: torch compiles it once per CPU
//! capability and picks one at start-up ([`NormalKernel`]). The AVX2 build evaluates log, sin
//! and cos with avx_mathfun.h's polynomials, reproduced here operation for operation in f32,
//! with the multiply-adds that the PyPI wheel's compiler fused into FMA instructions fused
//! (as libtorch_cpu.so's `NormalFill16<float>` of the AVX2 build disassembles); the portable
//! build calls the C library's `logf`, `sinf` and `cosf`, as Rust's `f32` methods do, so its
//! bits hold where Rust and torch use the same C library (glibc on Linux).
//!
//! Checked bit for bit against torch 2.15 from PyPI (tests/fixtures/torch_random): both
//! kernels, float32, float64, float16 and bfloat16, seeds up to 2⁶⁴ − 1, every path.

use candle_core::{DType, Device, Result, Tensor};

use crate::sampling::k_diffusion::NoiseSampler;

/// Words of mt19937 state.
const STATE_WORDS: usize = 624;
/// Distance between the two state words that each twist combines.
const TWIST_OFFSET: usize = 397;
const TWIST_MATRIX: u32 = 0x9908_b0df;
const UPPER_BIT: u32 = 0x8000_0000;
const LOWER_BITS: u32 = 0x7fff_ffff;

/// The mt19937 engine as ATen/core/MT19937RNGEngine.h seeds and runs it: the standard
/// Mersenne Twister, seeded from the low 32 bits of the seed (`init_genrand`).
#[derive(Clone)]
struct Mt19937 {
    state: [u32; STATE_WORDS],
    /// The state word the next output tempers; `STATE_WORDS` when the state must be twisted
    /// first (as after seeding).
    position: usize,
}

impl Mt19937 {
    fn new(seed: u64) -> Self {
        let mut state = [0u32; STATE_WORDS];
        state[0] = seed as u32;
        for index in 1..STATE_WORDS {
            let previous = state[index - 1];
            state[index] = 1_812_433_253u32
                .wrapping_mul(previous ^ (previous >> 30))
                .wrapping_add(index as u32);
        }
        Self {
            state,
            position: STATE_WORDS,
        }
    }

    /// Regenerates all 624 words in place, each from words already regenerated where the
    /// recurrence wraps around.
    fn twist(&mut self) {
        for index in 0..STATE_WORDS {
            let next = self.state[(index + 1) % STATE_WORDS];
            let mixed = (self.state[index] & UPPER_BIT) | (next & LOWER_BITS);
            let matrix = if next & 1 == 1 { TWIST_MATRIX } else { 0 };
            self.state[index] =
                self.state[(index + TWIST_OFFSET) % STATE_WORDS] ^ (mixed >> 1) ^ matrix;
        }
        self.position = 0;
    }

    fn next_u32(&mut self) -> u32 {
        if self.position == STATE_WORDS {
            self.twist();
        }
        let mut y = self.state[self.position];
        self.position += 1;
        y ^= y >> 11;
        y ^= (y << 7) & 0x9d2c_5680;
        y ^= (y << 15) & 0xefc6_0000;
        y ^ (y >> 18)
    }
}

/// Which build of torch's CPU normal kernel to reproduce. torch compiles the kernel once per
/// CPU capability and dispatches on the machine's (or on `ATEN_CPU_CAPABILITY`); the builds
/// differ only in the transform of blocks of 16 float values, so float32 noise of 16 values or
/// more depends on it, double-precision noise and fewer than 16 values do not.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum NormalKernel {
    /// The AVX2 build (avx_mathfun.h's `log256_ps` and `sincos256_ps`), which x86-64 CPUs with
    /// AVX2 run, and CPUs with AVX-512 too: torch registers no AVX-512 normal kernel and falls
    /// back to this one. What most ComfyUI users on x86-64 get.
    #[default]
    Avx2,
    /// The portable build (`ATEN_CPU_CAPABILITY=default`, or an x86-64 CPU without AVX2): the C
    /// library's `logf`, `sinf` and `cosf` per value.
    Portable,
}

/// torch's mean and standard deviation for `randn`, applied as its kernels apply them: an
/// exact no-op, except that a fused `n · 1 + 0` turns −0 into +0.
const MEAN: f32 = 0.0;
const STD: f32 = 1.0;

/// 2π as the kernels form it: in double, then rounded to f32 where the kernel works in f32.
const TWO_PI: f64 = 2.0 * std::f64::consts::PI;

/// PyTorch's CPU generator (`CPUGeneratorImpl`): what `torch.manual_seed(seed)` or
/// `torch.Generator().manual_seed(seed)` returns, with the CPU kernel whose `torch.randn` it
/// reproduces.
///
/// ```text
/// let mut generator = TorchGenerator::new(seed);
/// let noise = generator.randn_tensor(&[1, 4, 16, 64, 64], &Device::Cpu)?;
/// ```
#[derive(Clone)]
pub struct TorchGenerator {
    seed: u64,
    engine: Mt19937,
    /// The sine half of the last double-precision Box–Muller pair, returned by the next draw
    /// on the scalar path (torch's `next_double_normal_sample`). torch's generator also keeps
    /// a float one, which no `randn` path uses.
    next_double_normal: Option<f64>,
    kernel: NormalKernel,
}

impl TorchGenerator {
    /// A generator seeded as `torch.manual_seed(seed)` seeds one, with the AVX2 kernel. Any
    /// u64 is a valid seed; only its low 32 bits seed the engine, as in torch, so seeds 7 and
    /// 2³² + 7 give the same noise.
    pub fn new(seed: u64) -> Self {
        Self::with_kernel(seed, NormalKernel::default())
    }

    pub fn with_kernel(seed: u64, kernel: NormalKernel) -> Self {
        Self {
            seed,
            engine: Mt19937::new(seed),
            next_double_normal: None,
            kernel,
        }
    }

    /// The seed as given, all 64 bits (torch's `initial_seed()`).
    pub fn seed(&self) -> u64 {
        self.seed
    }

    pub fn kernel(&self) -> NormalKernel {
        self.kernel
    }

    /// One output of the engine (torch's `random()`).
    pub fn random(&mut self) -> u32 {
        self.engine.next_u32()
    }

    /// Two outputs of the engine, the first in the high half (torch's `random64()`).
    pub fn random64(&mut self) -> u64 {
        let high = self.random();
        let low = self.random();
        (u64::from(high) << 32) | u64::from(low)
    }

    /// Uniform in [0, 1) from the low 24 bits of one output.
    fn uniform_f32(&mut self) -> f32 {
        const MANTISSA_MASK: u32 = (1 << f32::MANTISSA_DIGITS) - 1;
        let scale = 1.0 / (1u64 << f32::MANTISSA_DIGITS) as f32;
        (self.random() & MANTISSA_MASK) as f32 * scale
    }

    /// Uniform in [0, 1) from the low 53 bits of two outputs.
    fn uniform_f64(&mut self) -> f64 {
        const MANTISSA_MASK: u64 = (1 << f64::MANTISSA_DIGITS) - 1;
        let scale = 1.0 / (1u64 << f64::MANTISSA_DIGITS) as f64;
        (self.random64() & MANTISSA_MASK) as f64 * scale
    }

    /// One standard normal value as `at::normal_distribution<double>` draws it: the cached sine
    /// half of the previous pair if there is one, else a new pair from two uniforms, whose
    /// cosine half is returned and sine half cached.
    fn normal_f64(&mut self) -> f64 {
        if let Some(cached) = self.next_double_normal.take() {
            return cached * f64::from(STD) + f64::from(MEAN);
        }
        let angle_uniform = self.uniform_f64();
        let radius_uniform = self.uniform_f64();
        let radius = (-2.0 * (-radius_uniform).ln_1p()).sqrt();
        let theta = TWO_PI * angle_uniform;
        self.next_double_normal = Some(radius * theta.sin());
        radius * theta.cos() * f64::from(STD) + f64::from(MEAN)
    }

    /// float32 standard normal noise of `shape`, in row-major order, exactly as
    /// `torch.randn(shape, dtype=torch.float32, generator=self)` on the CPU with this
    /// generator's kernel, by the path the module documentation describes for its size.
    pub fn randn(&mut self, shape: &[usize]) -> Vec<f32> {
        let len = shape.iter().product();
        if len < BLOCK {
            return (0..len).map(|_| self.normal_f64() as f32).collect();
        }
        let mut values: Vec<f32> = (0..len).map(|_| self.uniform_f32()).collect();
        for block in values.chunks_exact_mut(BLOCK) {
            self.normal_block_f32(block);
        }
        if len % BLOCK != 0 {
            let tail = &mut values[len - BLOCK..];
            for value in tail.iter_mut() {
                *value = self.uniform_f32();
            }
            self.normal_block_f32(tail);
        }
        values
    }

    /// float64 standard normal noise of `shape`, as `torch.randn(shape, dtype=torch.float64,
    /// generator=self)` on the CPU: the same three paths with double uniforms and the C
    /// library's `log`, `sin` and `cos` for every kernel.
    pub fn randn_f64(&mut self, shape: &[usize]) -> Vec<f64> {
        let len = shape.iter().product();
        if len < BLOCK {
            return (0..len).map(|_| self.normal_f64()).collect();
        }
        let mut values: Vec<f64> = (0..len).map(|_| self.uniform_f64()).collect();
        for block in values.chunks_exact_mut(BLOCK) {
            normal_block_f64(block);
        }
        if len % BLOCK != 0 {
            let tail = &mut values[len - BLOCK..];
            for value in tail.iter_mut() {
                *value = self.uniform_f64();
            }
            normal_block_f64(tail);
        }
        values
    }

    /// The float32 values that `torch.randn(shape, dtype=float16 or bfloat16, generator=self)`
    /// computes before rounding them to the half-precision type. Unlike the float32 path, torch
    /// draws the uniforms one block at a time here, so that a count not a multiple of 16 takes
    /// its last 16 uniforms right after the last full block.
    pub fn randn_for_half_precision(&mut self, shape: &[usize]) -> Vec<f32> {
        let len = shape.iter().product();
        if len < BLOCK {
            return (0..len).map(|_| self.normal_f64() as f32).collect();
        }
        let mut values = vec![0f32; len];
        let mut block = [0f32; BLOCK];
        let mut draw_block = |generator: &mut Self, out: &mut [f32]| {
            for value in block.iter_mut() {
                *value = generator.uniform_f32();
            }
            generator.normal_block_f32(&mut block);
            out.copy_from_slice(&block);
        };
        for out in values.chunks_exact_mut(BLOCK) {
            draw_block(self, out);
        }
        if len % BLOCK != 0 {
            draw_block(self, &mut values[len - BLOCK..]);
        }
        values
    }

    /// `torch.randperm(n, generator=…)` on the CPU: 0, 1, …, n − 1 shuffled by Fisher–Yates,
    /// position i swapped with i + `random() % (n − i)` (aten's `randperm_cpu`).
    pub fn randperm(&mut self, n: usize) -> Vec<usize> {
        let mut permutation: Vec<usize> = (0..n).collect();
        for i in 0..n.saturating_sub(1) {
            let offset = (u64::from(self.random()) % (n - i) as u64) as usize;
            permutation.swap(i, i + offset);
        }
        permutation
    }

    /// [`Self::randn`] as a float32 tensor of `shape` on `device`.
    pub fn randn_tensor(&mut self, shape: &[usize], device: &Device) -> Result<Tensor> {
        Tensor::from_vec(self.randn(shape), shape, device)
    }

    /// `torch.randn(shape, dtype=dtype, generator=self)` on the CPU, as a tensor on `device`:
    /// float32, float64, float16 or bfloat16.
    pub fn randn_tensor_of_dtype(
        &mut self,
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        match dtype {
            DType::F32 => self.randn_tensor(shape, device),
            DType::F64 => Tensor::from_vec(self.randn_f64(shape), shape, device),
            DType::F16 | DType::BF16 => {
                Tensor::from_vec(self.randn_for_half_precision(shape), shape, device)?
                    .to_dtype(dtype)
            }
            other => candle_core::bail!("torch.randn draws floating-point noise, not {other:?}"),
        }
    }

    /// Box–Muller on one block of 16 uniforms with this generator's kernel.
    fn normal_block_f32(&self, block: &mut [f32]) {
        match self.kernel {
            NormalKernel::Avx2 => avx2::normal_block(block),
            NormalKernel::Portable => normal_block_portable(block),
        }
    }
}

/// Values that torch's CPU normal kernel transforms together.
const BLOCK: usize = 16;
const HALF_BLOCK: usize = BLOCK / 2;

/// The portable kernel's block transform (ATen/native/cpu/DistributionTemplates.h,
/// `NormalFill16`): for each pair, u₁ = 1 − block[j] (in (0, 1], for the log) and
/// u₂ = block[j + 8], the angle rounded to f32 from double.
fn normal_block_portable(block: &mut [f32]) {
    for j in 0..HALF_BLOCK {
        let radius_uniform = 1.0 - block[j];
        let angle_uniform = block[j + HALF_BLOCK];
        let radius = (-2.0 * radius_uniform.ln()).sqrt();
        let theta = (TWO_PI * f64::from(angle_uniform)) as f32;
        block[j] = (radius * theta.cos()).mul_add(STD, MEAN);
        block[j + HALF_BLOCK] = (radius * theta.sin()).mul_add(STD, MEAN);
    }
}

/// The double-precision block transform, the same for every kernel.
fn normal_block_f64(block: &mut [f64]) {
    for j in 0..HALF_BLOCK {
        let radius_uniform = 1.0 - block[j];
        let angle_uniform = block[j + HALF_BLOCK];
        let radius = (-2.0 * radius_uniform.ln()).sqrt();
        let theta = TWO_PI * angle_uniform;
        let (std, mean) = (f64::from(STD), f64::from(MEAN));
        block[j] = (radius * theta.cos()).mul_add(std, mean);
        block[j + HALF_BLOCK] = (radius * theta.sin()).mul_add(std, mean);
    }
}

/// torch's AVX2 block transform, one lane at a time: every lane of the vector code is
/// independent, and each vector multiply, add, subtract, fused multiply-add and square root
/// rounds as the f32 operation does, so evaluating the lanes in turn gives the same bits.
///
/// avx_mathfun.h writes separate multiplies and adds; GCC, building the wheel with FMA enabled
/// for this capability, fuses some of them (not all: a product that feeds two operations, or
/// whose sum is formed later, stays rounded). Each `mul_add` below stands for one of those
/// fused instructions and each plain `*` and `+` for an unfused one.
mod avx2 {
    use super::{HALF_BLOCK, MEAN, STD, TWO_PI};

    /// `NormalFill16<float>` of the AVX2 build (ATen/native/cpu/DistributionTemplates.h):
    /// u₁ = 1 − block[j], u₂ = block[j + 8], the angle in f32 from 2π rounded to f32, and a
    /// fused multiply-add for the mean and standard deviation.
    pub(super) fn normal_block(block: &mut [f32]) {
        let two_pi = TWO_PI as f32;
        for j in 0..HALF_BLOCK {
            let radius_uniform = 1.0 - block[j];
            let radius = (-2.0 * log(radius_uniform)).sqrt();
            let (sin, cos) = sin_cos(two_pi * block[j + HALF_BLOCK]);
            block[j] = (radius * cos).mul_add(STD, MEAN);
            block[j + HALF_BLOCK] = (radius * sin).mul_add(STD, MEAN);
        }
    }

    // The constants of avx_mathfun.h (Cephes' logf, sinf and cosf): double literals there,
    // rounded to f32 when they fill the vectors.
    const SQRT_HALF: f32 = std::f64::consts::FRAC_1_SQRT_2 as f32;
    const LOG_POLYNOMIAL: [f32; 9] = [
        7.037_683_629_2E-2_f64 as f32,
        -1.151_461_031_0E-1_f64 as f32,
        1.167_699_874_0E-1_f64 as f32,
        -1.242_014_084_6E-1_f64 as f32,
        1.424_932_278_7E-1_f64 as f32,
        -1.666_805_766_5E-1_f64 as f32,
        2.000_071_476_5E-1_f64 as f32,
        -2.499_999_399_3E-1_f64 as f32,
        3.333_333_117_4E-1_f64 as f32,
    ];
    /// ln 2 split in a short high part and a low correction.
    const LN2_LOW: f32 = -2.121_944_40e-4_f64 as f32;
    const LN2_HIGH: f32 = 0.693_359_375_f64 as f32;
    /// The smallest normal f32, the bits of the exponent field and the exponent bias.
    const MIN_NORMAL_BITS: u32 = 0x0080_0000;
    const EXPONENT_BITS: u32 = 0x7f80_0000;
    const EXPONENT_BIAS: i32 = 0x7f;
    const SIGN_BIT: u32 = 0x8000_0000;

    /// 4/π, and −π/4 in three parts of decreasing size for the argument reduction.
    const FOUR_OVER_PI: f32 = 1.273_239_544_735_16_f64 as f32;
    const MINUS_PI_OVER_4: [f32; 3] = [
        -0.785_156_25_f64 as f32,
        -2.418_756_484_985_351_6e-4_f64 as f32,
        -3.774_894_977_445_941e-8_f64 as f32,
    ];
    const SIN_POLYNOMIAL: [f32; 3] = [
        -1.951_529_589_1E-4_f64 as f32,
        8.332_160_873_6E-3_f64 as f32,
        -1.666_665_461_1E-1_f64 as f32,
    ];
    const COS_POLYNOMIAL: [f32; 3] = [
        2.443_315_711_809_948E-5_f64 as f32,
        -1.388_731_625_493_765E-3_f64 as f32,
        4.166_664_568_298_827E-2_f64 as f32,
    ];

    /// `log256_ps` for one lane: the mantissa m in [0.5, 1) and exponent e of x, shifted to
    /// m ∈ [√½, √2) − 1, then ln x = m + m³·P(m) − m²/2 + e·ln 2, with ln 2 in two parts
    /// (Horner steps, the m³·P(m) + e·ln2_low, the − m²/2 and the + e·ln2_high fused).
    /// NaN for x ≤ 0.
    fn log(x: f32) -> f32 {
        let invalid = x <= 0.0;
        let x = x.max(f32::from_bits(MIN_NORMAL_BITS));
        let exponent = (x.to_bits() >> 23) as i32 - EXPONENT_BIAS;
        let mut m = f32::from_bits((x.to_bits() & !EXPONENT_BITS) | 0.5f32.to_bits());
        let mut e = exponent as f32 + 1.0;
        let below_sqrt_half = m < SQRT_HALF;
        let doubling = if below_sqrt_half { m } else { 0.0 };
        m -= 1.0;
        e -= if below_sqrt_half { 1.0 } else { 0.0 };
        m += doubling;
        let m_squared = m * m;
        let mut y = LOG_POLYNOMIAL[0];
        for &coefficient in &LOG_POLYNOMIAL[1..] {
            y = y.mul_add(m, coefficient);
        }
        y *= m;
        y = y.mul_add(m_squared, e * LN2_LOW);
        y = (-m_squared).mul_add(0.5, y);
        if invalid {
            // The vector code ORs an all-ones mask in: a NaN.
            f32::from_bits(u32::MAX)
        } else {
            e.mul_add(LN2_HIGH, m + y)
        }
    }

    /// `sincos256_ps` for one lane: |x| reduced by the multiple j of π/4 (j rounded up to
    /// even, the three reduction steps fused), both polynomials evaluated on the remainder,
    /// and each result taking the one that suits its octant and the sign that j and the sign
    /// of x give it.
    fn sin_cos(x: f32) -> (f32, f32) {
        let sin_sign = x.to_bits() & SIGN_BIT;
        let x = f32::from_bits(x.to_bits() & !SIGN_BIT);
        let octant = (((x * FOUR_OVER_PI) as i32).wrapping_add(1)) & !1;
        let octant_float = octant as f32;
        let sin_swap = ((octant & 4) as u32) << 29;
        let use_sin_polynomial = octant & 2 == 0;
        let reduced = octant_float.mul_add(MINUS_PI_OVER_4[0], x);
        let reduced = octant_float.mul_add(MINUS_PI_OVER_4[1], reduced);
        let reduced = octant_float.mul_add(MINUS_PI_OVER_4[2], reduced);
        let cos_sign = ((!(octant.wrapping_sub(2)) & 4) as u32) << 29;
        let sin_sign = sin_sign ^ sin_swap;

        let z = reduced * reduced;
        let mut cos_part = COS_POLYNOMIAL[0].mul_add(z, COS_POLYNOMIAL[1]);
        cos_part = cos_part.mul_add(z, COS_POLYNOMIAL[2]);
        cos_part *= z;
        cos_part = cos_part.mul_add(z, -(z * 0.5));
        cos_part += 1.0;

        let mut sin_part = SIN_POLYNOMIAL[0].mul_add(z, SIN_POLYNOMIAL[1]);
        sin_part = sin_part.mul_add(z, SIN_POLYNOMIAL[2]);
        sin_part *= z;
        sin_part = sin_part.mul_add(reduced, reduced);

        // The vector code selects with bit masks and takes the other polynomial by
        // subtracting the selected one, which can change the sign of a zero: kept as is.
        let sin_from_sin = if use_sin_polynomial { sin_part } else { 0.0 };
        let sin_from_cos = if use_sin_polynomial { 0.0 } else { cos_part };
        let cos_from_sin = sin_part - sin_from_sin;
        let cos_from_cos = cos_part - sin_from_cos;
        let sin = sin_from_cos + sin_from_sin;
        let cos = cos_from_cos + cos_from_sin;
        (
            f32::from_bits(sin.to_bits() ^ sin_sign),
            f32::from_bits(cos.to_bits() ^ cos_sign),
        )
    }
}

/// Fresh noise as ComfyUI's `default_noise_sampler` draws it on the CPU, the noise of its
/// ancestral samplers: one generator seeded with the sampler's seed, one `torch.randn` of the
/// shape and dtype of the sample per call. (ComfyUI draws this noise on the sample's device,
/// so a run on a GPU uses that device's generator, which this does not reproduce; its SDE
/// samplers default to a Brownian-tree noise sampler instead.)
#[derive(Clone)]
pub struct TorchNoise {
    generator: TorchGenerator,
}

impl TorchNoise {
    /// Noise from `TorchGenerator::new(seed)`: torch's AVX2 kernel.
    pub fn new(seed: u64) -> Self {
        Self::from_generator(TorchGenerator::new(seed))
    }

    /// Noise that continues `generator`'s sequence.
    pub fn from_generator(generator: TorchGenerator) -> Self {
        Self { generator }
    }

    pub fn generator(&self) -> &TorchGenerator {
        &self.generator
    }
}

impl NoiseSampler for TorchNoise {
    fn sample(&mut self, _sigma: f64, _sigma_next: f64, like: &Tensor) -> Result<Tensor> {
        self.generator
            .randn_tensor_of_dtype(like.dims(), like.dtype(), like.device())
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn randperm_matches_torch() {
        // torch.randperm(n, generator=torch.Generator().manual_seed(seed)), torch 2.15.
        let cases: [(u64, &[usize]); 6] = [
            (0, &[0, 1, 3, 2]),
            (0, &[4, 0, 5, 3, 2, 6, 1]),
            (0, &[8, 0, 5, 9, 7, 4, 2, 10, 3, 1, 11, 6]),
            (1, &[1, 3, 2, 0]),
            (1, &[1, 4, 6, 8, 11, 0, 5, 3, 2, 9, 10, 7]),
            (42, &[6, 8, 1, 7, 0, 2, 10, 11, 4, 3, 5, 9]),
        ];
        for (seed, expected) in cases {
            let permutation = super::TorchGenerator::new(seed).randperm(expected.len());
            assert_eq!(permutation, expected, "seed {seed}");
        }
    }

    use std::collections::HashMap;

    use super::*;

    const FIXTURE: &str = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../tests/fixtures/torch_random/randn.safetensors"
    );
    const SEEDS: [u64; 7] = [
        0,
        1,
        42,
        123_456_789,
        (1 << 32) + 7,
        (1 << 63) + 11,
        u64::MAX,
    ];
    const SHAPES: [&[usize]; 7] = [&[1], &[5], &[15], &[16], &[17], &[33], &[4, 8, 8, 2]];
    const LATENT_SHAPE: &[usize] = &[2, 4, 16, 8, 8];
    const LATENT_SEEDS: [u64; 2] = [42, u64::MAX];
    /// The successive calls of the fixture's `sequence_<i>`: a seed and the shapes drawn.
    const SEQUENCES: [(u64, &[&[usize]]); 4] = [
        (42, &[&[5], &[5]]),
        (42, &[&[17], &[33]]),
        (7, &[&[3], &[16], &[3]]),
        (u64::MAX, &[&[2, 4, 4, 4], &[2, 4, 4, 4]]),
    ];
    const KERNELS: [(NormalKernel, &str); 2] = [
        (NormalKernel::Avx2, "avx2"),
        (NormalKernel::Portable, "default"),
    ];

    fn fixture() -> HashMap<String, Tensor> {
        candle_core::safetensors::load(FIXTURE, &Device::Cpu).expect("the torch_random fixture")
    }

    fn shape_name(shape: &[usize]) -> String {
        let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
        format!("shape_{}", dims.join("x"))
    }

    fn fixture_tensor<'a>(fixture: &'a HashMap<String, Tensor>, key: &str) -> &'a Tensor {
        fixture
            .get(key)
            .unwrap_or_else(|| panic!("{key} is not in the fixture"))
    }

    /// Asserts that `actual` has the bits of the fixture tensor `key` (converted to f32, which
    /// is exact for every stored dtype), naming the first value that differs.
    fn assert_bits_eq(fixture: &HashMap<String, Tensor>, key: &str, actual: &Tensor) {
        let expected = fixture_tensor(fixture, key);
        assert_eq!(actual.dims(), expected.dims(), "{key}: shape");
        assert_eq!(actual.dtype(), expected.dtype(), "{key}: dtype");
        let as_f32 = |t: &Tensor| -> Vec<f32> {
            t.flatten_all()
                .and_then(|t| t.to_dtype(DType::F32))
                .and_then(|t| t.to_vec1())
                .expect("f32 values")
        };
        let (actual, expected) = if actual.dtype() == DType::F64 {
            let bits = |t: &Tensor| -> Vec<u64> {
                let values: Vec<f64> = t.flatten_all().and_then(|t| t.to_vec1()).expect("f64");
                values.iter().map(|v| v.to_bits()).collect()
            };
            (bits(actual), bits(expected))
        } else {
            let bits = |t: &Tensor| -> Vec<u64> {
                as_f32(t).iter().map(|v| u64::from(v.to_bits())).collect()
            };
            (bits(actual), bits(expected))
        };
        if let Some(index) = (0..actual.len()).find(|&i| actual[i] != expected[i]) {
            panic!(
                "{key}: first mismatch at index {index} of {}: bits {:#x}, torch {:#x}",
                actual.len(),
                actual[index],
                expected[index]
            );
        }
    }

    fn assert_randn_eq(
        fixture: &HashMap<String, Tensor>,
        key: &str,
        shape: &[usize],
        values: Vec<f32>,
    ) {
        let actual = Tensor::from_vec(values, shape, &Device::Cpu).expect("tensor");
        assert_bits_eq(fixture, key, &actual);
    }

    #[test]
    fn the_engine_is_the_reference_mt19937() {
        // The C++ standard's check: the 10000th output of mt19937 with the default seed 5489.
        let mut generator = TorchGenerator::new(5489);
        let mut output = 0;
        for _ in 0..10_000 {
            output = generator.random();
        }
        assert_eq!(output, 4_123_659_995);
    }

    #[test]
    fn random64_puts_the_first_output_in_the_high_half() {
        let mut words = TorchGenerator::new(42);
        let mut wide = words.clone();
        let (high, low) = (words.random(), words.random());
        assert_eq!(wide.random64(), (u64::from(high) << 32) | u64::from(low));
    }

    #[test]
    fn only_the_low_32_bits_of_the_seed_seed_the_engine() {
        let mut low = TorchGenerator::new(7);
        let mut high = TorchGenerator::new((1 << 32) + 7);
        assert_eq!(high.seed(), (1 << 32) + 7);
        assert_eq!(low.randn(&[40]), high.randn(&[40]));
    }

    #[test]
    fn float32_randn_matches_torch_for_every_seed_shape_and_kernel() {
        let fixture = fixture();
        for (kernel, capability) in KERNELS {
            for seed in SEEDS {
                let latent = LATENT_SEEDS.contains(&seed).then_some(LATENT_SHAPE);
                for shape in SHAPES.into_iter().chain(latent) {
                    let mut generator = TorchGenerator::with_kernel(seed, kernel);
                    let key = format!("{capability}/seed_{seed}/{}", shape_name(shape));
                    assert_randn_eq(&fixture, &key, shape, generator.randn(shape));
                }
            }
        }
    }

    #[test]
    fn successive_calls_continue_the_generator_and_its_cached_normal() {
        let fixture = fixture();
        for (kernel, capability) in KERNELS {
            for (index, (seed, shapes)) in SEQUENCES.into_iter().enumerate() {
                let mut generator = TorchGenerator::with_kernel(seed, kernel);
                for (call, shape) in shapes.iter().enumerate() {
                    let key = format!("{capability}/sequence_{index}/call_{call}");
                    assert_randn_eq(&fixture, &key, shape, generator.randn(shape));
                }
            }
        }
    }

    #[test]
    fn float64_float16_and_bfloat16_match_torch() -> Result<()> {
        let fixture = fixture();
        for (kernel, capability) in KERNELS {
            for (dtype, name) in [
                (DType::F64, "float64"),
                (DType::F16, "float16"),
                (DType::BF16, "bfloat16"),
            ] {
                for shape in [&[5][..], &[16], &[17], &[33]] {
                    let mut generator = TorchGenerator::with_kernel(42, kernel);
                    let actual = generator.randn_tensor_of_dtype(shape, dtype, &Device::Cpu)?;
                    let key = format!("{capability}/dtype_{name}/{}", shape_name(shape));
                    assert_bits_eq(&fixture, &key, &actual);
                }
            }
        }
        Ok(())
    }

    #[test]
    fn the_kernels_differ_only_in_float32_blocks() {
        let mut avx2 = TorchGenerator::with_kernel(42, NormalKernel::Avx2);
        let mut portable = TorchGenerator::with_kernel(42, NormalKernel::Portable);
        assert_eq!(avx2.randn(&[15]), portable.randn(&[15]));
        assert_ne!(avx2.randn(&[64]), portable.randn(&[64]));
        assert_eq!(avx2.random(), portable.random());
    }

    #[test]
    fn torch_noise_draws_one_randn_per_call_like_the_sample() -> Result<()> {
        let fixture = fixture();
        let mut noise = TorchNoise::new(42);
        for (call, shape) in [&[17][..], &[33]].into_iter().enumerate() {
            let like = Tensor::zeros(shape, DType::F32, &Device::Cpu)?;
            let drawn = noise.sample(14.6, 7.0, &like)?;
            assert_bits_eq(&fixture, &format!("avx2/sequence_1/call_{call}"), &drawn);
        }
        assert_eq!(noise.generator().seed(), 42);

        let mut noise = TorchNoise::new(42);
        let like = Tensor::zeros(&[33][..], DType::F16, &Device::Cpu)?;
        assert_bits_eq(
            &fixture,
            "avx2/dtype_float16/shape_33",
            &noise.sample(1.0, 0.5, &like)?,
        );
        let integers = Tensor::zeros(&[4][..], DType::U32, &Device::Cpu)?;
        assert!(noise.sample(1.0, 0.5, &integers).is_err());
        Ok(())
    }

    #[test]
    fn randn_tensor_is_randn_in_the_given_shape() -> Result<()> {
        let tensor = TorchGenerator::new(3).randn_tensor(&[2, 3, 5], &Device::Cpu)?;
        assert_eq!(tensor.dims(), [2, 3, 5]);
        assert_eq!(tensor.dtype(), DType::F32);
        let values: Vec<f32> = tensor.flatten_all()?.to_vec1()?;
        assert_eq!(values, TorchGenerator::new(3).randn(&[2, 3, 5]));
        Ok(())
    }
}
