//! Scaled dot-product attention on the CPU in one pass per block of queries.
//!
//! The composed version writes the whole (batch, heads, queries, keys) score tensor, reads it
//! back for the softmax, writes the probabilities and reads them again for the product with V:
//! half a GiB per spatial layer of a 16-frame 32×32 video, four times over. Here each task takes
//! a block of queries of one sample, and for each head computes its scores into a per-thread
//! buffer that stays in cache, normalises them in place and multiplies them into the output.
//! Q, K and V are read through their strides, so the head split of the layers costs no copy, and
//! the output is written as (batch, queries, heads, head_dim), the layout the output projection
//! reads.

use std::cell::RefCell;
use std::sync::Arc;

use candle_core::{CpuStorage, CustomOp3, Layout, Result, Shape};
use rayon::prelude::*;

use super::vector_math::{dot, softmax_in_place};
use super::{matmul, Strided};

/// Score buffer per task: 64 Ki floats (256 KiB) stay in a core's L2 cache.
const SCORE_BLOCK: usize = 64 * 1024;
/// Below this many keys, scores are plain dot products; gemm's packing would cost more than the
/// products (temporal attention has one key per frame).
const DIRECT_KEYS: usize = 32;

pub(crate) struct FusedAttention {
    pub scale: f32,
    /// An additive term on the scaled logits, (queries, keys), the same for every sample and
    /// head (a distance bias or a mask of −∞ on temporal attention).
    pub logit_bias: Option<Arc<[f32]>>,
}

thread_local! {
    static SCORES: RefCell<Vec<f32>> = const { RefCell::new(Vec::new()) };
}

/// A (batch, heads, rows, head_dim) operand read through its strides.
#[derive(Clone, Copy)]
struct Operand<'a> {
    data: &'a [f32],
    start: usize,
    batch_stride: usize,
    head_stride: usize,
    row_stride: usize,
    head_dim: usize,
}

impl<'a> Operand<'a> {
    fn new(storage: &'a CpuStorage, layout: &Layout, what: &str) -> Result<Self> {
        let stride = layout.stride();
        if layout.dims().len() != 4 || stride[3] != 1 {
            candle_core::bail!(
                "attention: {what} must be (batch, heads, rows, head_dim) with contiguous head_dim"
            )
        }
        Ok(Self {
            data: storage.as_slice::<f32>()?,
            start: layout.start_offset(),
            batch_stride: stride[0],
            head_stride: stride[1],
            row_stride: stride[2],
            head_dim: layout.dims()[3],
        })
    }

    /// Offset of row `row` of head `head` of sample `batch`.
    fn offset(&self, batch: usize, head: usize, row: usize) -> usize {
        self.start + batch * self.batch_stride + head * self.head_stride + row * self.row_stride
    }

    fn row(&self, batch: usize, head: usize, row: usize) -> &'a [f32] {
        let at = self.offset(batch, head, row);
        &self.data[at..at + self.head_dim]
    }
}

impl CustomOp3 for FusedAttention {
    fn name(&self) -> &'static str {
        "fused-attention"
    }

    fn cpu_fwd(
        &self,
        q: &CpuStorage,
        q_layout: &Layout,
        k: &CpuStorage,
        k_layout: &Layout,
        v: &CpuStorage,
        v_layout: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (batch, heads, queries, head_dim) = q_layout.shape().dims4()?;
        let (k_batch, k_heads, keys, k_dim) = k_layout.shape().dims4()?;
        if (k_batch, k_heads, k_dim) != (batch, heads, head_dim)
            || k_layout.dims() != v_layout.dims()
        {
            candle_core::bail!(
                "attention: q {:?}, k {:?} and v {:?} do not fit together",
                q_layout.dims(),
                k_layout.dims(),
                v_layout.dims()
            )
        }
        let (q, k, v) = (
            Operand::new(q, q_layout, "q")?,
            Operand::new(k, k_layout, "k")?,
            Operand::new(v, v_layout, "v")?,
        );
        let out_shape = Shape::from((batch, queries, heads, head_dim));
        let sample_len = queries * heads * head_dim;
        let mut out = vec![0f32; batch * sample_len];
        if sample_len == 0 || keys == 0 {
            return Ok((CpuStorage::F32(out), out_shape));
        }
        if let Some(bias) = &self.logit_bias {
            if bias.len() != queries * keys {
                candle_core::bail!(
                    "attention: a logit bias of {} values for {queries} queries × {keys} keys",
                    bias.len()
                )
            }
        }
        let block = (SCORE_BLOCK / keys).clamp(1, queries);
        let block_len = block * heads * head_dim;
        out.par_chunks_mut(sample_len)
            .enumerate()
            .for_each(|(sample, out)| {
                out.par_chunks_mut(block_len)
                    .enumerate()
                    .for_each(|(index, out)| {
                        let first = index * block;
                        let rows = out.len() / (heads * head_dim);
                        SCORES.with(|scores| {
                            let mut scores = scores.borrow_mut();
                            scores.resize(rows * keys, 0.0);
                            for head in 0..heads {
                                let task = Task {
                                    sample,
                                    head,
                                    first,
                                    rows,
                                    keys,
                                    scale: self.scale,
                                    logit_bias: self.logit_bias.as_deref(),
                                };
                                task.run(&q, &k, &v, &mut scores, out, heads * head_dim);
                            }
                        })
                    })
            });
        Ok((CpuStorage::F32(out), out_shape))
    }
}

/// Rows `first..first + rows` of one head of one sample.
struct Task<'a> {
    sample: usize,
    head: usize,
    first: usize,
    rows: usize,
    keys: usize,
    scale: f32,
    logit_bias: Option<&'a [f32]>,
}

impl Task<'_> {
    /// Writes the attention output of the task's rows into `out`, whose rows are `out_stride`
    /// apart and hold this head at column `head · head_dim`.
    fn run(
        &self,
        q: &Operand,
        k: &Operand,
        v: &Operand,
        scores: &mut [f32],
        out: &mut [f32],
        out_stride: usize,
    ) {
        let &Task {
            sample,
            head,
            first,
            rows,
            keys,
            ..
        } = self;
        let head_dim = q.head_dim;
        let column = head * head_dim;
        if keys <= DIRECT_KEYS {
            for row in 0..rows {
                let query = q.row(sample, head, first + row);
                let scores = &mut scores[row * keys..(row + 1) * keys];
                for (key, score) in scores.iter_mut().enumerate() {
                    *score = dot(query, k.row(sample, head, key));
                }
                self.normalise(scores, first + row);
                let dst = &mut out[row * out_stride + column..][..head_dim];
                for (key, &p) in scores.iter().enumerate() {
                    for (d, &x) in dst.iter_mut().zip(v.row(sample, head, key)) {
                        *d += p * x;
                    }
                }
            }
            return;
        }
        // SAFETY: every pointer addresses the operand it names, and (rows, cols, strides) stay
        // inside it: q rows first..first+rows, all keys of k and v, `scores` of rows × keys and
        // `out` of rows × out_stride with this head's head_dim columns.
        unsafe {
            matmul(
                (rows, keys, head_dim),
                Strided::rows(scores.as_mut_ptr(), keys),
                Strided::rows(
                    q.data.as_ptr().add(q.offset(sample, head, first)),
                    q.row_stride,
                ),
                // kᵀ: element (d, key) of the (keys, head_dim) rows of k.
                Strided {
                    ptr: k.data.as_ptr().add(k.offset(sample, head, 0)),
                    row_stride: 1,
                    column_stride: k.row_stride,
                },
                false,
                1.0,
                gemm::Parallelism::None,
            );
        }
        for (row, scores) in scores.chunks_exact_mut(keys).enumerate() {
            self.normalise(scores, first + row);
        }
        // SAFETY: as above.
        unsafe {
            matmul(
                (rows, head_dim, keys),
                Strided::rows(out.as_mut_ptr().add(column), out_stride),
                Strided::rows(scores.as_ptr(), keys),
                Strided::rows(v.data.as_ptr().add(v.offset(sample, head, 0)), v.row_stride),
                false,
                1.0,
                gemm::Parallelism::None,
            );
        }
    }

    /// The softmax of query row `row`'s raw scores q·k, with the logit bias when there is one.
    fn normalise(&self, scores: &mut [f32], row: usize) {
        match self.logit_bias {
            None => softmax_in_place(scores, self.scale),
            Some(bias) => {
                let bias = &bias[row * self.keys..(row + 1) * self.keys];
                for (score, &b) in scores.iter_mut().zip(bias) {
                    *score = *score * self.scale + b;
                }
                softmax_in_place(scores, 1.0);
            }
        }
    }
}
