//! The one attention call every layer goes through, and the processor hook on it.
//!
//! Spatial self-attention, cross-attention and temporal (motion-module) attention all call
//! [`AttentionHook::attend`] with their layer path (the diffusers module path, e.g.
//! `down_blocks.0.attentions.0.transformer_blocks.0.attn1`), their kind and Q/K/V already split
//! into heads. Methods that change attention (motion-adaptive bias, entropy probes, I/U
//! perturbation, injection for editing, Enhance-A-Video) are processors installed on the hook
//! for the layers they address, as diffusers' attention processors are; the layers never change.

use std::sync::Arc;

use candle_core::{DType, Result, Tensor, D};

use super::call::{ForwardPass, SamplingStep};

/// What an attention layer attends over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum AttentionKind {
    /// Self-attention among the pixels of one frame (`attn1` of a spatial transformer).
    SpatialSelf,
    /// Cross-attention from pixels to text tokens (`attn2` of a spatial transformer).
    Cross,
    /// Self-attention among the frames at one pixel (motion modules).
    Temporal,
}

impl AttentionKind {
    /// The kinds by name, as nodes and tables write them.
    pub const NAMES: [&'static str; 3] = ["spatial", "cross", "temporal"];

    pub fn name(&self) -> &'static str {
        match self {
            Self::SpatialSelf => "spatial",
            Self::Cross => "cross",
            Self::Temporal => "temporal",
        }
    }
}

impl std::str::FromStr for AttentionKind {
    type Err = String;
    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s {
            "spatial" => Ok(Self::SpatialSelf),
            "cross" => Ok(Self::Cross),
            "temporal" => Ok(Self::Temporal),
            other => Err(format!(
                "unknown attention kind `{other}` (expected spatial, cross or temporal)"
            )),
        }
    }
}

/// How the rows of an attention call map onto the video: `videos` videos (guidance branches
/// included) of `frames` frames of `height`×`width` pixels at this layer's resolution.
///
/// Spatial and cross attention run one sequence of H·W pixel queries per frame (batch
/// videos·frames); temporal attention one sequence of F frame queries per pixel (batch
/// videos·H·W). The VAE's attention has one frame per image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TokenLayout {
    pub videos: usize,
    pub frames: usize,
    pub height: usize,
    pub width: usize,
}

/// Everything a processor may want to know about the call it handles.
#[derive(Clone, Copy)]
pub struct AttentionCall<'a> {
    /// Diffusers module path of the attention layer.
    pub layer: &'a str,
    pub kind: AttentionKind,
    /// Softmax scale, 1/√head_dim.
    pub scale: f64,
    pub layout: TokenLayout,
    /// The forward pass the call belongs to: sampling step, guidance layout, frame positions,
    /// the run's observer and the values computed earlier in the pass.
    pub pass: &'a ForwardPass<'a>,
}

impl AttentionCall<'_> {
    /// The sampling step of the call, when it happens inside a sampling loop.
    pub fn step(&self) -> Option<SamplingStep> {
        self.pass.step
    }
}

/// A swappable attention implementation.
///
/// `q` is (batch, heads, queries, head_dim), `k` and `v` are (batch, heads, keys, head_dim); the
/// result is (batch, heads, queries, head_dim). `default` is the plain computation, which a
/// processor may call to wrap rather than replace it.
pub trait AttentionProcessor: Send + Sync {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor>;

    /// The attention weights (batch, heads, rows, keys) this processor applies to the query
    /// rows `rows` of the call, whose queries `q` holds (batch, heads, rows, head_dim): what
    /// probes measure. By default softmax(q·kᵀ·scale); a processor that changes the weights
    /// says how, so that a probe sees the attention that was actually used.
    fn weights(
        &self,
        call: &AttentionCall,
        q: &Tensor,
        k: &Tensor,
        rows: &[usize],
    ) -> Result<Tensor> {
        let _ = rows;
        attention_probs(q, k, call.scale)
    }
}

/// One attention call as an observer sees it, after the processor ran.
pub struct ObservedAttention<'a> {
    /// (batch, heads, queries, head_dim).
    pub q: &'a Tensor,
    /// (batch, heads, keys, head_dim).
    pub k: &'a Tensor,
    pub v: &'a Tensor,
    /// The processor's result, (batch, heads, queries, head_dim).
    pub output: &'a Tensor,
    processor: &'a dyn AttentionProcessor,
}

impl ObservedAttention<'_> {
    /// The weights the processor applied to query rows `rows`, (batch, heads, rows, keys).
    pub fn weights(&self, call: &AttentionCall, rows: &[usize]) -> Result<Tensor> {
        let q = select_query_rows(self.q, rows)?;
        self.processor.weights(call, &q, self.k, rows)
    }
}

/// `rows` as a u32 index tensor for `index_select`.
pub fn row_index(rows: &[usize], device: &candle_core::Device) -> Result<Tensor> {
    Tensor::from_vec(
        rows.iter().map(|&r| r as u32).collect::<Vec<_>>(),
        rows.len(),
        device,
    )
}

/// Rows `rows` of (batch, heads, queries, head_dim) queries. The layers pass Q as a head-split
/// view of (batch, queries, heads, head_dim), which is gathered as it lies, without copying
/// every row first.
pub fn select_query_rows(q: &Tensor, rows: &[usize]) -> Result<Tensor> {
    let queries = q.dim(2)?;
    if rows.len() == queries && rows.iter().enumerate().all(|(i, &r)| i == r) {
        return Ok(q.clone());
    }
    let index = row_index(rows, q.device())?;
    let tokens_first = q.transpose(1, 2)?;
    if tokens_first.is_contiguous() {
        return tokens_first.index_select(&index, 1)?.transpose(1, 2);
    }
    q.contiguous()?.index_select(&index, 2)
}

/// Something that watches attention calls without changing them (an entropy probe, a
/// recorder of maps): every observer of the hook sees every call, whichever processor ran.
pub trait AttentionObserver: Send + Sync {
    fn observe(&self, call: &AttentionCall, seen: &ObservedAttention) -> Result<()>;
}

/// Plain scaled dot-product attention: softmax(q·kᵀ·scale)·v.
#[derive(Debug, Default, Clone, Copy)]
pub struct ScaledDotProduct;

impl AttentionProcessor for ScaledDotProduct {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        scaled_dot_product(q, k, v, call.scale)
    }
}

/// Attention with the keys multiplied by `factor` (AnimateDiff-Evolved's motion scale on
/// temporal attention): the logits scale by it, so above 1 each frame attends more sharply to
/// the frames most like it, below 1 more evenly to all.
#[derive(Debug, Clone, Copy)]
pub struct KeyScale {
    pub factor: f64,
}

impl AttentionProcessor for KeyScale {
    fn attend(&self, call: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
        scaled_dot_product(q, k, v, call.scale * self.factor)
    }

    fn weights(
        &self,
        call: &AttentionCall,
        q: &Tensor,
        k: &Tensor,
        _rows: &[usize],
    ) -> Result<Tensor> {
        attention_probs(q, k, call.scale * self.factor)
    }
}

/// Largest attention-score block computed at once by the composed computation. The full score
/// tensor of SD's first spatial layer at 64×64 latents, 16 frames and guidance is 32·8·4096²
/// floats (17 GiB), so longer sequences are processed in slices of queries: rows of a softmax
/// are independent.
const MAX_SCORE_BYTES: usize = 256 << 20;

/// softmax(q·kᵀ·scale)·v over the last two dimensions.
///
/// f32 on the CPU, with no gradient to track, runs the fused kernel of [`cpu`], which never holds
/// more than a cache-sized block of scores; elsewhere the composed candle ops run, in slices of
/// queries when the score tensor would exceed [`MAX_SCORE_BYTES`].
pub fn scaled_dot_product(q: &Tensor, k: &Tensor, v: &Tensor, scale: f64) -> Result<Tensor> {
    attention_with_bias(q, k, v, scale, None)
}

/// softmax(q·kᵀ·scale + bias)·v, with `bias` a (queries, keys) term added to the logits of every
/// sample and head: a distance penalty, or −∞ where a key is masked out (each query must keep
/// at least one finite logit). Runs where [`scaled_dot_product`] runs.
pub fn scaled_dot_product_with_bias(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: &Tensor,
) -> Result<Tensor> {
    let (queries, keys) = (q.dim(2)?, k.dim(2)?);
    if bias.dims() != [queries, keys] {
        candle_core::bail!(
            "a logit bias of shape {:?} for {queries} queries × {keys} keys",
            bias.dims()
        )
    }
    attention_with_bias(q, k, v, scale, Some(bias))
}

fn attention_with_bias(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let fused = super::ops::applies(&[q, k, v])
        && [q, k, v]
            .iter()
            .all(|t| t.rank() == 4 && t.stride()[3] == 1);
    if fused {
        let logit_bias = match bias {
            Some(bias) => Some(
                bias.to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .into(),
            ),
            None => None,
        };
        let op = crate::models::ops::attention::FusedAttention {
            scale: scale as f32,
            logit_bias,
        };
        // The kernel writes (batch, queries, heads, head_dim); the view swaps heads back.
        return q.apply_op3_no_bwd(k, v, &op)?.transpose(1, 2);
    }
    composed_scaled_dot_product(q, k, v, scale, bias)
}

/// The candle composition: scores, bias, softmax, product with V, in slices of queries.
fn composed_scaled_dot_product(
    q: &Tensor,
    k: &Tensor,
    v: &Tensor,
    scale: f64,
    bias: Option<&Tensor>,
) -> Result<Tensor> {
    let (batch, heads, queries, _) = q.dims4()?;
    let keys = k.dim(2)?;
    let row_bytes = batch * heads * keys * q.dtype().size_in_bytes();
    let rows_per_slice = (MAX_SCORE_BYTES / row_bytes.max(1)).max(1);
    let v = v.contiguous()?;
    let kt = k.t()?.contiguous()?;
    let bias = bias.map(|b| b.to_dtype(q.dtype())).transpose()?;
    let mut slices = Vec::with_capacity(queries.div_ceil(rows_per_slice));
    for start in (0..queries).step_by(rows_per_slice) {
        let len = rows_per_slice.min(queries - start);
        let scores = (q.narrow(2, start, len)?.contiguous()?.matmul(&kt)? * scale)?;
        let scores = match &bias {
            Some(bias) => scores.broadcast_add(&bias.narrow(0, start, len)?)?,
            None => scores,
        };
        slices.push(crate::models::ops::softmax_last_dim(&scores)?.matmul(&v)?);
    }
    if slices.len() == 1 {
        return Ok(slices.remove(0));
    }
    Tensor::cat(&slices, 2)
}

/// The attention map softmax(q·kᵀ·scale), (batch, heads, queries, keys); rows sum to 1.
pub fn attention_probs(q: &Tensor, k: &Tensor, scale: f64) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    crate::models::ops::softmax_last_dim(&scores)
}

/// softmax(q·kᵀ·scale + bias), with `bias` (queries, keys) as in
/// [`scaled_dot_product_with_bias`].
pub fn attention_probs_with_bias(
    q: &Tensor,
    k: &Tensor,
    scale: f64,
    bias: &Tensor,
) -> Result<Tensor> {
    let scores = (q.contiguous()?.matmul(&k.t()?.contiguous()?)? * scale)?;
    crate::models::ops::softmax_last_dim(&scores.broadcast_add(&bias.to_dtype(scores.dtype())?)?)
}

/// Which attention layer is called, and on what tokens.
#[derive(Debug, Clone, Copy)]
pub struct AttentionSite<'a> {
    pub layer: &'a str,
    pub kind: AttentionKind,
    pub layout: TokenLayout,
}

/// A processor addressed by layer path: installed for every layer whose path starts with
/// `prefix` (an empty prefix addresses every layer) and, optionally, only for one kind.
#[derive(Clone)]
pub struct ProcessorBinding {
    pub prefix: String,
    pub kind: Option<AttentionKind>,
    pub processor: Arc<dyn AttentionProcessor>,
}

/// The processors installed on a model, addressed by layer path, and the observers of every
/// call.
///
/// The last matching binding wins, so later patches override earlier ones, as in ComfyUI's
/// model patcher.
#[derive(Clone, Default)]
pub struct AttentionHook {
    bindings: Vec<ProcessorBinding>,
    observers: Vec<Arc<dyn AttentionObserver>>,
}

impl AttentionHook {
    pub fn new() -> Self {
        Self::default()
    }

    /// Installs `processor` on every layer whose path starts with `prefix` (of `kind`, if given).
    pub fn with_processor(
        mut self,
        prefix: impl Into<String>,
        kind: Option<AttentionKind>,
        processor: Arc<dyn AttentionProcessor>,
    ) -> Self {
        self.push(ProcessorBinding {
            prefix: prefix.into(),
            kind,
            processor,
        });
        self
    }

    /// Adds `binding` after the others, so it wins over them where both match.
    pub fn push(&mut self, binding: ProcessorBinding) {
        self.bindings.push(binding);
    }

    pub fn bindings(&self) -> &[ProcessorBinding] {
        &self.bindings
    }

    /// Adds an observer of every call.
    pub fn push_observer(&mut self, observer: Arc<dyn AttentionObserver>) {
        self.observers.push(observer);
    }

    /// Runs the attention of `layer` through the processor installed for it.
    pub fn attend(
        &self,
        site: AttentionSite<'_>,
        pass: &ForwardPass,
        q: &Tensor,
        k: &Tensor,
        v: &Tensor,
    ) -> Result<Tensor> {
        let AttentionSite {
            layer,
            kind,
            layout,
        } = site;
        let head_dim = q.dim(D::Minus1)?;
        let call = AttentionCall {
            layer,
            kind,
            scale: 1.0 / (head_dim as f64).sqrt(),
            layout,
            pass,
        };
        let binding = self.bindings.iter().rev().find(|b| {
            layer.starts_with(b.prefix.as_str()) && b.kind.is_none_or(|want| want == kind)
        });
        let processor: &dyn AttentionProcessor = match binding {
            Some(b) => b.processor.as_ref(),
            None => &ScaledDotProduct,
        };
        let output = processor.attend(&call, q, k, v)?;
        if !self.observers.is_empty() {
            let seen = ObservedAttention {
                q,
                k,
                v,
                output: &output,
                processor,
            };
            for observer in &self.observers {
                observer.observe(&call, &seen)?;
            }
        }
        Ok(output)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    /// A processor that only forwards to the default keeps results bit-for-bit.
    struct PassThrough;
    impl AttentionProcessor for PassThrough {
        fn attend(&self, c: &AttentionCall, q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
            ScaledDotProduct.attend(c, q, k, v)
        }
    }

    #[test]
    fn pass_through_processor_is_bit_exact() -> Result<()> {
        let dev = Device::Cpu;
        let q = Tensor::randn(0f32, 1.0, (2, 3, 5, 8), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (2, 3, 7, 8), &dev)?;
        let site = AttentionSite {
            layer: "a.attn1",
            kind: AttentionKind::SpatialSelf,
            layout: TokenLayout {
                videos: 2,
                frames: 1,
                height: 1,
                width: 5,
            },
        };
        let plain_hook = AttentionHook::new();
        let plain = plain_hook.attend(site, &ForwardPass::new(&plain_hook), &q, &k, &v)?;
        let hook = AttentionHook::new().with_processor("", None, Arc::new(PassThrough));
        let hooked = hook.attend(site, &ForwardPass::new(&hook), &q, &k, &v)?;
        let diff = crate::test_util::max_abs_diff(&plain, &hooked);
        assert_eq!(diff, 0.0);
        Ok(())
    }

    #[test]
    fn long_sequences_are_computed_in_slices_with_the_same_result() -> Result<()> {
        let dev = Device::Cpu;
        // 70000 keys × 4 bytes = 280 KB per query row: slices of about 958 rows.
        let q = Tensor::randn(0f32, 1.0, (1, 1, 2000, 4), &dev)?;
        let k = Tensor::randn(0f32, 1.0, (1, 1, 70000, 4), &dev)?;
        let v = Tensor::randn(0f32, 1.0, (1, 1, 70000, 4), &dev)?;
        let sliced = composed_scaled_dot_product(&q, &k, &v, 0.5, None)?;
        let whole = attention_probs(&q, &k, 0.5)?.matmul(&v.contiguous()?)?;
        let diff = crate::test_util::max_abs_diff(&sliced, &whole);
        assert!(diff < 1e-6, "{diff}");
        Ok(())
    }

    /// The fused CPU kernel against the composition, on (batch, tokens, heads, head_dim) views
    /// as the layers pass them: temporal-sized (direct products), cross-attention-sized and
    /// long enough to be split into several blocks of queries.
    #[test]
    fn fused_kernel_matches_the_composition() -> Result<()> {
        let dev = Device::Cpu;
        for (batch, queries, keys, heads, head_dim) in [
            (5, 8, 8, 3, 12),
            (2, 33, 77, 2, 40),
            (1, 300, 1024, 2, 9),
            (2, 7, 40, 1, 3),
        ] {
            let split = |rows: usize| -> Result<Tensor> {
                Tensor::randn(0f32, 1.0, (batch, rows, heads, head_dim), &dev)?.transpose(1, 2)
            };
            let (q, k, v) = (split(queries)?, split(keys)?, split(keys)?);
            let fused = scaled_dot_product(&q, &k, &v, 0.3)?;
            let composed = composed_scaled_dot_product(&q, &k, &v, 0.3, None)?;
            assert_eq!(fused.dims(), &[batch, heads, queries, head_dim]);
            let diff = crate::test_util::max_abs_diff(&fused, &composed);
            let size = composed.abs()?.max_all()?.to_scalar::<f32>()?;
            assert!(
                diff <= 2e-6 * f64::from(size.max(1.0)),
                "{queries}×{keys}: {diff}"
            );
        }
        Ok(())
    }
}
