//! The model as ComfyUI's samplers call it: an ε-predicting UNet (or a wrapper of one, such as
//! context windows) behind classifier-free guidance, seen as a [`Denoiser`] (ComfyUI's
//! `CFGGuider` over a `ModelSamplingDiscrete` model).
//!
//! At noise level σ the model sees x / √(σ² + 1) at the training timestep nearest to σ, and
//! returns ε; the denoised estimate is x − σ·ε. With a guidance scale other than 1 the
//! negative prompt is evaluated in the same batch (first half) and the estimates are mixed as
//! uncond + scale·(cond − uncond); at exactly 1 only the positive prompt runs, as ComfyUI
//! skips the negative branch there.

use std::cell::Cell;
use std::rc::Rc;

use candle_core::{Result, Tensor};

use super::model_sampling::ModelSamplingDiscrete;
use super::Denoiser;
use crate::models::call::{GuidanceLayout, RunObserver, SamplingStep};
use crate::models::unet::per_frame_text;
use crate::sampling::{NoisePredictor, PredictRequest};

/// The text embeddings of one prompt: one for every video, or one for every frame (prompt
/// travel).
#[derive(Debug, Clone)]
pub enum PromptEmbeddings {
    /// (1 or B, S, D).
    PerVideo(Tensor),
    /// (F or B·F, S, D), frame-major within each video.
    PerFrame(Tensor),
}

impl PromptEmbeddings {
    fn tensor(&self) -> &Tensor {
        match self {
            Self::PerVideo(t) | Self::PerFrame(t) => t,
        }
    }

    fn with_tensor(&self, tensor: Tensor) -> Self {
        match self {
            Self::PerVideo(_) => Self::PerVideo(tensor),
            Self::PerFrame(_) => Self::PerFrame(tensor),
        }
    }

    /// The rows for `batch` videos of `frames` frames: (B, S, D) per video, (B·F, S, D) per
    /// frame.
    fn rows(&self, batch: usize, frames: usize) -> Result<Tensor> {
        let tensor = self.tensor();
        let rows = tensor.dim(0)?;
        let (unit, name) = match self {
            Self::PerVideo(_) => (1, "videos"),
            Self::PerFrame(_) => (frames, "frames"),
        };
        if rows == batch * unit {
            Ok(tensor.clone())
        } else if rows == unit {
            tensor.repeat((batch, 1, 1))
        } else {
            candle_core::bail!("{rows} prompt embeddings for {batch} × {unit} {name}")
        }
    }
}

/// Classifier-free guidance over a noise predictor, for one sampling run.
pub struct GuidedDenoiser<'a> {
    predictor: &'a dyn NoisePredictor,
    model_sampling: &'a ModelSamplingDiscrete,
    /// Text embeddings of the positive and negative prompts, of one length.
    positive: PromptEmbeddings,
    negative: PromptEmbeddings,
    cfg: f64,
    run: Option<&'a RunObserver>,
    /// The step the next evaluation belongs to (moved on by whoever sees the steps end), and
    /// the steps of the run.
    step: Rc<Cell<usize>>,
    steps: usize,
}

impl<'a> GuidedDenoiser<'a> {
    /// Guidance of `scale` between `positive` and `negative` embeddings ((1 or B, S, D)
    /// each, B videos in the latents). Prompts of different lengths (chunked long prompts)
    /// are repeated to their least common multiple, which leaves cross-attention unchanged
    /// (every key and value appears equally often), so that both run in one batch.
    pub fn new(
        predictor: &'a dyn NoisePredictor,
        model_sampling: &'a ModelSamplingDiscrete,
        positive: &PromptEmbeddings,
        negative: &PromptEmbeddings,
        cfg: f64,
        steps: usize,
    ) -> Result<Self> {
        let (equal_positive, equal_negative) = same_length(positive.tensor(), negative.tensor())?;
        let (positive, negative) = (
            positive.with_tensor(equal_positive),
            negative.with_tensor(equal_negative),
        );
        Ok(Self {
            predictor,
            model_sampling,
            positive,
            negative,
            cfg,
            run: None,
            step: Rc::new(Cell::new(0)),
            steps,
        })
    }

    /// Records the run's state (processors' observations) in `run`.
    pub fn with_observer(mut self, run: &'a RunObserver) -> Self {
        self.run = Some(run);
        self
    }

    /// The index of the step the next evaluations belong to, for the sampler's step callback
    /// to move on after each step (a sampler may evaluate the model more than once per step).
    pub fn step_counter(&self) -> Rc<Cell<usize>> {
        self.step.clone()
    }

    /// Whether the negative prompt is evaluated (ComfyUI skips it at a scale of exactly 1).
    fn guided(&self) -> bool {
        (self.cfg - 1.0).abs() > 1e-9 * self.cfg.abs().max(1.0)
    }
}

impl Denoiser for GuidedDenoiser<'_> {
    fn denoise(&mut self, x: &Tensor, sigma: f64) -> Result<Tensor> {
        let (batch, _, frames, _, _) = x.dims5()?;
        let timestep = self.model_sampling.timestep(sigma) as f64;
        let input = self.model_sampling.calculate_input(sigma, x)?;
        let positive = self.positive.rows(batch, frames)?;
        let (latents, text, guidance) = if self.guided() {
            let negative = self.negative.rows(batch, frames)?;
            // A per-video prompt beside a per-frame one is repeated for each frame.
            let mixed = matches!(
                (&self.positive, &self.negative),
                (PromptEmbeddings::PerFrame(_), PromptEmbeddings::PerVideo(_))
                    | (PromptEmbeddings::PerVideo(_), PromptEmbeddings::PerFrame(_))
            );
            let (negative, positive) = if mixed {
                (
                    per_frame_text(&negative, batch, frames)?,
                    per_frame_text(&positive, batch, frames)?,
                )
            } else {
                (negative, positive.clone())
            };
            (
                Tensor::cat(&[&input, &input], 0)?,
                Tensor::cat(&[&negative, &positive], 0)?,
                GuidanceLayout::UncondThenCond,
            )
        } else {
            (input, positive, GuidanceLayout::Conditional)
        };
        let eps = self.predictor.predict(&PredictRequest {
            latents: &latents,
            timestep,
            text: &text,
            step: Some(SamplingStep {
                index: self.step.get().min(self.steps.saturating_sub(1)),
                count: self.steps,
                timestep,
            }),
            guidance,
            frame_positions: None,
            run: self.run,
        })?;
        if eps.dims() != latents.dims() {
            candle_core::bail!(
                "the noise prediction has shape {:?} for latents of shape {:?}",
                eps.dims(),
                latents.dims()
            );
        }
        let eps = match guidance {
            GuidanceLayout::Conditional => eps,
            GuidanceLayout::UncondThenCond => {
                let (uncond, cond) = (eps.narrow(0, 0, batch)?, eps.narrow(0, batch, batch)?);
                (&uncond + ((cond - &uncond)? * self.cfg)?)?
            }
        };
        self.model_sampling.calculate_denoised(sigma, &eps, x)
    }
}

/// Both embeddings repeated along the token axis to the least common multiple of their
/// lengths.
fn same_length(positive: &Tensor, negative: &Tensor) -> Result<(Tensor, Tensor)> {
    let (_, positive_len, positive_dim) = positive.dims3()?;
    let (_, negative_len, negative_dim) = negative.dims3()?;
    if positive_dim != negative_dim {
        candle_core::bail!(
            "the prompts' embeddings differ in width: {positive_dim} and {negative_dim}"
        );
    }
    let lcm = positive_len / gcd(positive_len, negative_len) * negative_len;
    let repeat = |t: &Tensor, len: usize| -> Result<Tensor> {
        if len == lcm {
            Ok(t.clone())
        } else {
            t.repeat((1, lcm / len, 1))
        }
    };
    Ok((
        repeat(positive, positive_len)?,
        repeat(negative, negative_len)?,
    ))
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a.max(1)
    } else {
        gcd(b, a % b)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{DType, Device};

    /// A predictor whose ε is the mean of the text embeddings, per video: guidance mixes it.
    struct TextMean;

    impl NoisePredictor for TextMean {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            let mean = request.text.mean_keepdim(1)?.mean_keepdim(2)?; // (B, 1, 1)
            request
                .latents
                .zeros_like()?
                .broadcast_add(&mean.unsqueeze(3)?.unsqueeze(4)?)
        }

        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn guidance_mixes_the_branches_and_scale_one_skips_the_negative() {
        let model = ModelSamplingDiscrete::sd().unwrap();
        let device = Device::Cpu;
        let x = Tensor::ones((1, 4, 2, 2, 2), DType::F32, &device).unwrap();
        let positive = Tensor::full(3f32, (1, 77, 8), &device).unwrap();
        // A chunked negative prompt of twice the length.
        let negative = Tensor::full(1f32, (1, 154, 8), &device).unwrap();
        let sigma = 2.0;
        let value = |cfg: f64| -> f32 {
            let (positive, negative) = (
                PromptEmbeddings::PerVideo(positive.clone()),
                PromptEmbeddings::PerVideo(negative.clone()),
            );
            let mut denoiser =
                GuidedDenoiser::new(&TextMean, &model, &positive, &negative, cfg, 1).unwrap();
            let out = denoiser.denoise(&x, sigma).unwrap();
            out.flatten_all().unwrap().to_vec1::<f32>().unwrap()[0]
        };
        // ε = 1 + cfg·(3 − 1); denoised = 1 − σ·ε.
        assert!((value(7.5) - (1.0 - 2.0 * 16.0)).abs() < 1e-5);
        assert!((value(1.0) - (1.0 - 2.0 * 3.0)).abs() < 1e-5);
    }
}
