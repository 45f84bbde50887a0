//! DDIM inversion: clean latents walked up the schedule to the noise level where sampling
//! starts, so that sampling back with the same model and prompt returns close to them
//! (diffusers' `DDIMInverseScheduler` with the inversion loop of its editing pipelines).

use candle_core::{Result, Tensor};

use crate::models::call::{GuidanceLayout, RunObserver};
use crate::schedulers::Scheduler;

use super::{NoisePredictor, PredictRequest};

/// Inverts `latents` (B, C, F, h, w), clean, through the `steps`-step schedule of `scheduler`,
/// conditioned on `text` (B, S, D) without guidance, and returns the latents at the noise
/// level of the schedule's first timestep: a sampler started there (as its initial noise)
/// walks back down.
///
/// Each step evaluates the model at the noisier timestep on the latents of the less noisy one,
/// as diffusers does; the error this approximation leaves is what the round-trip tests
/// measure. `on_step(done, total)` is called after each step; an error from it stops the
/// inversion.
pub fn invert(
    predictor: &dyn NoisePredictor,
    scheduler: &dyn Scheduler,
    latents: &Tensor,
    text: &Tensor,
    steps: usize,
    run: Option<&RunObserver>,
    on_step: &mut dyn FnMut(usize, usize) -> Result<()>,
) -> Result<Tensor> {
    let schedule = scheduler.timesteps(steps)?;
    let mut x = latents.clone();
    for (done, step) in schedule.steps().iter().rev().enumerate() {
        let input = scheduler.scale_model_input(&x, step.timestep)?;
        let eps = predictor.predict(&PredictRequest {
            latents: &input,
            timestep: step.timestep,
            text,
            step: None,
            guidance: GuidanceLayout::Conditional,
            frame_positions: None,
            run,
        })?;
        x = scheduler
            .invert_step(&eps, step.prev_timestep, step.timestep, &x)?
            .prev_sample;
        on_step(done + 1, schedule.len())?;
    }
    Ok(x)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sampling::{SampleInputs, SampleSettings, Sampler, TextConditioning};
    use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
    use candle_core::Device;

    /// ε independent of the latents: inversion and sampling are then exact inverses, so the
    /// round trip shows the bookkeeping (order of steps, noise levels, the final level).
    struct Constant(Tensor);
    impl NoisePredictor for Constant {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            self.0.broadcast_as(request.latents.shape())?.contiguous()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn with_a_constant_prediction_sampling_undoes_inversion() -> Result<()> {
        let dev = Device::Cpu;
        let clean = Tensor::randn(0f32, 1.0, (1, 4, 3, 2, 2), &dev)?;
        let eps = Tensor::randn(0f32, 1.0, (1, 4, 3, 2, 2), &dev)?;
        let text = Tensor::zeros((1, 2, 3), candle_core::DType::F32, &dev)?;
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let predictor = Constant(eps);
        let inverted = invert(
            &predictor,
            &scheduler,
            &clean,
            &text,
            10,
            None,
            &mut |_, _| Ok(()),
        )?;
        let back = Sampler::new(&predictor, &scheduler)
            .sample(
                &SampleSettings {
                    steps: 10,
                    guidance_scale: 1.0,
                    strength: 1.0,
                },
                &SampleInputs {
                    noise: &inverted,
                    init_latents: None,
                    text: TextConditioning {
                        positive: &text,
                        negative: &text,
                    },
                },
            )?
            .latents;
        let error = crate::test_util::max_abs_diff(&back, &clean);
        assert!(error < 1e-4, "{error}");
        Ok(())
    }
}
