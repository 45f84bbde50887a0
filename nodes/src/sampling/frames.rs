//! Which frames the model evaluates at each step, and how the frames it skipped are completed.
//!
//! The sampling loop asks a [`FrameStrategy`] at every step. With [`FrameSelection::All`] the
//! whole clip goes through the model and the scheduler, as in a plain pipeline. With
//! [`FrameSelection::Frames`] the loop gathers those frames (`index_select` on the frame
//! axis), passes their positions in the clip to the model, steps only them, and hands the
//! result to [`FrameStrategy::complete`], which returns the latents of the whole clip. A
//! denoising-reuse method (key frames evaluated at every step, the others carried along from
//! their key frame until a switch step, then every frame jointly) is such a strategy: it
//! selects the key frames before the switch and completes the others from the key frames'
//! prediction, using the scheduler in [`FrameUpdate`].

use candle_core::{Result, Tensor};

use crate::models::call::SamplingStep;
use crate::schedulers::{Scheduler, Timestep};

/// The frames evaluated at one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FrameSelection {
    /// Every frame, in clip order, without gathering.
    All,
    /// These frames of the clip, in this order (distinct, each below the frame count).
    Frames(Vec<usize>),
}

impl FrameSelection {
    /// The selected frames, or `None` for all.
    pub fn frames(&self) -> Option<&[usize]> {
        match self {
            Self::All => None,
            Self::Frames(frames) => Some(frames),
        }
    }

    /// How many frames are evaluated in a clip of `total` frames.
    pub fn len(&self, total: usize) -> usize {
        self.frames().map_or(total, <[usize]>::len)
    }

    /// Checks that the frames are a non-empty set of distinct frames of a clip of `total`.
    pub fn validate(&self, total: usize) -> Result<()> {
        let Some(frames) = self.frames() else {
            return Ok(());
        };
        if frames.is_empty() {
            candle_core::bail!("the frame strategy selected no frames");
        }
        let mut seen = vec![false; total];
        for &frame in frames {
            match seen.get_mut(frame) {
                None => candle_core::bail!(
                    "the frame strategy selected frame {frame} of a {total}-frame clip"
                ),
                Some(true) => {
                    candle_core::bail!("the frame strategy selected frame {frame} twice")
                }
                Some(slot) => *slot = true,
            }
        }
        Ok(())
    }
}

/// What a strategy sees after the scheduler stepped the evaluated frames.
pub struct FrameUpdate<'a> {
    /// The step just taken (its index counts on across FreeInit passes).
    pub step: SamplingStep,
    /// Where the step went.
    pub prev_timestep: Timestep,
    /// The evaluated frames, or `None` for all of them.
    pub frames: Option<&'a [usize]>,
    /// Latents of the whole clip before the step (B, C, F, h, w).
    pub latents_before: &'a Tensor,
    /// The evaluated frames before the step (B, C, F_eval, h, w).
    pub evaluated_before: &'a Tensor,
    /// The evaluated frames after the step.
    pub evaluated_after: &'a Tensor,
    /// The scheduler's x₀ of the evaluated frames.
    pub denoised: &'a Tensor,
    /// The guided noise prediction of the evaluated frames.
    pub noise_pred: &'a Tensor,
    /// The run's scheduler, to step or re-noise the frames that were not evaluated.
    pub scheduler: &'a dyn Scheduler,
}

impl FrameUpdate<'_> {
    /// The whole clip with the evaluated frames stepped and the others as they were.
    pub fn keep_skipped_frames(&self) -> Result<Tensor> {
        match self.frames {
            None => Ok(self.evaluated_after.clone()),
            Some(frames) => write_back_frames(self.latents_before, frames, self.evaluated_after),
        }
    }
}

/// The steps of one denoising loop: a run has one loop, FreeInit one per pass, with step
/// indices counting on from pass to pass.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoopSteps {
    /// Index in the run of the loop's first step.
    pub first: usize,
    /// Steps of the loop.
    pub len: usize,
}

impl LoopSteps {
    /// Where `step` (an index in the run) lies in this loop, in [0, 1): 0 at the loop's first
    /// step.
    pub fn fraction(&self, step: usize) -> f64 {
        step.saturating_sub(self.first) as f64 / self.len.max(1) as f64
    }
}

/// Decides which frames the model evaluates at each step of a run and completes the clip.
/// A strategy lives for one run, so it may keep state between steps.
pub trait FrameStrategy {
    /// Called once before the first step of each denoising loop: a strategy that follows the
    /// schedule (reuse until a share of it) starts over in every FreeInit pass.
    fn begin(&mut self, loop_steps: LoopSteps) {
        let _ = loop_steps;
    }

    /// The frames to evaluate at `step`, given the latents of the whole clip (B, C, F, h, w).
    fn frames_to_evaluate(
        &mut self,
        step: &SamplingStep,
        latents: &Tensor,
    ) -> Result<FrameSelection> {
        let _ = (step, latents);
        Ok(FrameSelection::All)
    }

    /// The latents of the whole clip after the step; by default the frames that were not
    /// evaluated keep their latents.
    fn complete(&mut self, update: &FrameUpdate<'_>) -> Result<Tensor> {
        update.keep_skipped_frames()
    }
}

/// Every frame at every step: the plain pipeline.
#[derive(Debug, Clone, Copy, Default)]
pub struct AllFrames;

impl FrameStrategy for AllFrames {}

/// The given frames of `latents` (B, C, F, h, w), in the given order.
pub fn gather_frames(latents: &Tensor, frames: &[usize]) -> Result<Tensor> {
    let index = Tensor::from_vec(
        frames.iter().map(|&f| f as u32).collect::<Vec<_>>(),
        frames.len(),
        latents.device(),
    )?;
    latents.index_select(&index, 2)
}

/// `full` with frame `frames[i]` replaced by frame `i` of `evaluated`. The frames are copied,
/// not added, so values come back bit for bit.
pub fn write_back_frames(full: &Tensor, frames: &[usize], evaluated: &Tensor) -> Result<Tensor> {
    let (batch, channels, total, height, width) = full.dims5()?;
    let expected = (batch, channels, frames.len(), height, width);
    if evaluated.dims5()? != expected {
        candle_core::bail!(
            "evaluated frames of shape {:?}, expected {expected:?}",
            evaluated.dims()
        );
    }
    let mut source = vec![None; total];
    for (i, &frame) in frames.iter().enumerate() {
        match source.get_mut(frame) {
            Some(slot) => *slot = Some(i),
            None => candle_core::bail!("frame {frame} is outside a {total}-frame clip"),
        }
    }
    let pieces = source
        .iter()
        .enumerate()
        .map(|(frame, from)| match from {
            Some(i) => evaluated.narrow(2, *i, 1),
            None => full.narrow(2, frame, 1),
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&pieces, 2)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    #[test]
    fn gathering_and_writing_back_every_frame_is_exact() -> Result<()> {
        let latents = Tensor::randn(0f32, 1.0, (2, 3, 5, 2, 4), &Device::Cpu)?;
        let frames: Vec<usize> = (0..5).collect();
        let round_trip = write_back_frames(&latents, &frames, &gather_frames(&latents, &frames)?)?;
        assert_eq!(crate::test_util::max_abs_diff(&round_trip, &latents), 0.0);
        Ok(())
    }

    #[test]
    fn written_back_frames_land_in_place() -> Result<()> {
        let latents = Tensor::zeros((1, 1, 4, 1, 1), candle_core::DType::F32, &Device::Cpu)?;
        let evaluated = Tensor::new(&[7f32, 9.0], &Device::Cpu)?.reshape((1, 1, 2, 1, 1))?;
        let out = write_back_frames(&latents, &[3, 1], &evaluated)?;
        assert_eq!(out.flatten_all()?.to_vec1::<f32>()?, [0.0, 9.0, 0.0, 7.0]);
        assert!(write_back_frames(&latents, &[4, 1], &evaluated).is_err());
        Ok(())
    }

    #[test]
    fn selections_are_validated() {
        assert!(FrameSelection::All.validate(3).is_ok());
        assert!(FrameSelection::Frames(vec![2, 0]).validate(3).is_ok());
        assert!(FrameSelection::Frames(vec![]).validate(3).is_err());
        assert!(FrameSelection::Frames(vec![3]).validate(3).is_err());
        assert!(FrameSelection::Frames(vec![1, 1]).validate(3).is_err());
    }
}
