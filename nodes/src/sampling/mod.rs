//! The denoising loop of the video pipelines: classifier-free guidance, a stateless scheduler,
//! optional video-to-video strength, and a [`FrameStrategy`] choosing the frames the model
//! evaluates at each step, as diffusers' `AnimateDiffPipeline` /
//! `AnimateDiffVideoToVideoPipeline` run them. Methods that change what is sampled wrap or
//! steer this loop: context windows wrap the predictor ([`ContextWindows`]), FreeInit runs the
//! loop several times (`video::freeinit`), denoising reuse is a frame strategy.

pub mod comfy_noise;
pub mod context;
pub mod frames;
pub mod inversion;
pub mod k_diffusion;
pub mod torch_random;

use candle_core::{Result, Tensor};

use crate::models::call::{GuidanceLayout, RunObserver, SamplingStep};
use crate::models::patcher::{PatchedUNet, UNetInputs};
use crate::schedulers::{Schedule, Scheduler};

pub use context::{ContextFuse, ContextOptions, ContextSchedule, ContextWindows};
pub use frames::{
    gather_frames, write_back_frames, AllFrames, FrameSelection, FrameStrategy, FrameUpdate,
    LoopSteps,
};

/// One noise prediction: the latents and their conditioning, and what the call knows of the
/// run around it.
#[derive(Clone, Copy)]
pub struct PredictRequest<'a> {
    /// (B, C, F, h, w) latents, already scaled for the model.
    pub latents: &'a Tensor,
    pub timestep: f64,
    /// Text embeddings: one per video (B, S, D) or one per frame (B·F, S, D, frame-major
    /// within each video; prompt travel).
    pub text: &'a Tensor,
    pub step: Option<SamplingStep>,
    pub guidance: GuidanceLayout,
    /// The position in the clip of each of the F frames; `None` means 0, 1, …, F−1.
    pub frame_positions: Option<&'a [usize]>,
    /// The run's state, where processors record what they observe.
    pub run: Option<&'a RunObserver>,
}

/// Something that predicts the noise in video latents: a UNet with its patches, or a wrapper
/// around one.
pub trait NoisePredictor {
    /// ε for `request.latents`, of the same shape.
    fn predict(&self, request: &PredictRequest) -> Result<Tensor>;

    /// The most frames one call can see (the motion module's positional table), if bounded.
    fn max_frames(&self) -> Option<usize>;

    /// Frame evaluations that `predict(request)` makes: frames × videos of the batch, unless
    /// the predictor evaluates some frames more than once (overlapping context windows).
    fn frame_evaluations(&self, request: &PredictRequest) -> Result<usize> {
        let (batch, _, frames, _, _) = request.latents.dims5()?;
        Ok(batch * frames)
    }
}

impl NoisePredictor for PatchedUNet {
    fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
        self.forward(&UNetInputs {
            sample: request.latents,
            timestep: request.timestep.into(),
            text: request.text,
            frame_positions: request.frame_positions,
            step: request.step,
            guidance: request.guidance,
            run: request.run,
        })
    }

    fn max_frames(&self) -> Option<usize> {
        PatchedUNet::max_frames(self)
    }
}

/// What to sample.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleSettings {
    /// Inference steps of the full schedule.
    pub steps: usize,
    /// Classifier-free guidance scale; at 1 or below the negative prompt is not evaluated.
    pub guidance_scale: f64,
    /// Video-to-video strength in (0, 1]: the share of the schedule that is run (1 = from pure
    /// noise, as text-to-video).
    pub strength: f64,
}

impl SampleSettings {
    pub fn validate(&self) -> Result<()> {
        if self.steps == 0 {
            candle_core::bail!("steps must be at least 1");
        }
        if !(self.strength > 0.0 && self.strength <= 1.0) {
            candle_core::bail!("strength must be in (0, 1], got {}", self.strength);
        }
        if !self.guidance_scale.is_finite() {
            candle_core::bail!("guidance scale must be finite, got {}", self.guidance_scale);
        }
        Ok(())
    }

    /// Steps actually run: `steps · strength`, at least one (diffusers' `get_timesteps`).
    pub fn steps_run(&self) -> usize {
        ((self.steps as f64 * self.strength) as usize).clamp(1, self.steps.max(1))
    }

    /// How each model call batches the videos: negative and positive halves with guidance,
    /// the positive prompt alone without.
    pub fn guidance(&self) -> GuidanceLayout {
        if self.guidance_scale > 1.0 {
            GuidanceLayout::UncondThenCond
        } else {
            GuidanceLayout::Conditional
        }
    }
}

/// Per-video text embeddings (B, S, D) of the prompt and the negative prompt.
#[derive(Clone, Copy)]
pub struct TextConditioning<'a> {
    pub positive: &'a Tensor,
    pub negative: &'a Tensor,
}

/// Inputs of one sampling run.
#[derive(Clone, Copy)]
pub struct SampleInputs<'a> {
    /// Unit Gaussian noise (B, C, F, h, w).
    pub noise: &'a Tensor,
    /// Clean latents to start from (video-to-video), or none (text-to-video).
    pub init_latents: Option<&'a Tensor>,
    pub text: TextConditioning<'a>,
}

/// Where the steps of one loop sit in the whole run: several FreeInit passes count their steps
/// on, so that progress and step-range processors see one run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepRange {
    /// Index of the loop's first step in the run.
    pub first: usize,
    /// Steps of the run in all.
    pub total: usize,
}

/// What the step callback sees after each step.
pub struct StepReport<'a> {
    /// The step just taken: its index in the run, the run's step count, its timestep.
    pub step: SamplingStep,
    /// Latents of the whole clip after the step (B, C, F, h, w).
    pub latents: &'a Tensor,
    /// The scheduler's x₀ of the evaluated frames.
    pub denoised: &'a Tensor,
    /// The frames evaluated at this step, or `None` for all of them.
    pub evaluated_frames: Option<&'a [usize]>,
}

/// Called after each step; an error stops sampling (cancellation) and is returned.
pub type StepCallback<'a> = dyn FnMut(&StepReport<'_>) -> Result<()> + 'a;

/// What a sampling run returns.
#[derive(Debug, Clone)]
pub struct SampleOutput {
    /// The final latents (B, C, F, h, w).
    pub latents: Tensor,
    /// Frames the model evaluated, counting every video of the batch and both guidance
    /// branches: Σ over calls of frames × batch × branches.
    pub frame_evaluations: usize,
    /// Steps taken.
    pub steps: usize,
}

/// The run's observer: one the caller keeps, or one the sampler owns.
enum Observer<'a> {
    Owned(RunObserver),
    Borrowed(&'a RunObserver),
}

/// A sampling run: a predictor and a scheduler, with an optional frame strategy, run observer
/// and step callback.
///
/// ```text
/// let output = Sampler::new(&unet, &scheduler)
///     .with_strategy(&mut strategy)
///     .on_step(&mut callback)
///     .sample(&settings, &inputs)?;
/// ```
pub struct Sampler<'a> {
    predictor: &'a dyn NoisePredictor,
    scheduler: &'a dyn Scheduler,
    strategy: Option<&'a mut dyn FrameStrategy>,
    observer: Observer<'a>,
    on_step: Option<&'a mut StepCallback<'a>>,
}

impl<'a> Sampler<'a> {
    /// Evaluates every frame at every step, with a run observer of its own and no callback.
    pub fn new(predictor: &'a dyn NoisePredictor, scheduler: &'a dyn Scheduler) -> Self {
        Self {
            predictor,
            scheduler,
            strategy: None,
            observer: Observer::Owned(RunObserver::new()),
            on_step: None,
        }
    }

    pub fn with_strategy(mut self, strategy: &'a mut dyn FrameStrategy) -> Self {
        self.strategy = Some(strategy);
        self
    }

    /// Records the run's state in `observer`, which outlives the run.
    pub fn with_observer(mut self, observer: &'a RunObserver) -> Self {
        self.observer = Observer::Borrowed(observer);
        self
    }

    pub fn on_step(mut self, callback: &'a mut StepCallback<'a>) -> Self {
        self.on_step = Some(callback);
        self
    }

    pub fn scheduler(&self) -> &'a dyn Scheduler {
        self.scheduler
    }

    pub fn observer(&self) -> &RunObserver {
        match &self.observer {
            Observer::Owned(observer) => observer,
            Observer::Borrowed(observer) => observer,
        }
    }

    /// The steps that `settings` runs: the tail of the full schedule at video-to-video
    /// strength.
    pub fn schedule(&self, settings: &SampleSettings) -> Result<Schedule> {
        settings.validate()?;
        Ok(self
            .scheduler
            .timesteps(settings.steps)?
            .tail(settings.steps_run()))
    }

    /// The latents the loop starts from: `init_latents` noised to the first timestep that is
    /// run (diffusers' img2img), or the noise scaled to the schedule's start.
    pub fn start_latents(
        &self,
        settings: &SampleSettings,
        noise: &Tensor,
        init_latents: Option<&Tensor>,
    ) -> Result<Tensor> {
        settings.validate()?;
        match init_latents {
            Some(init) if settings.strength < 1.0 => {
                if init.dims() != noise.dims() {
                    candle_core::bail!(
                        "init latents of shape {:?} for noise of shape {:?}",
                        init.dims(),
                        noise.dims()
                    );
                }
                let first = self.schedule(settings)?.first_timestep();
                self.scheduler.add_noise(init, noise, first)
            }
            _ => {
                let full = self.scheduler.timesteps(settings.steps)?;
                noise * self.scheduler.init_noise_sigma(full.first_timestep())?
            }
        }
    }

    /// Samples from noise (or noised init latents) to the final latents.
    pub fn sample(
        &mut self,
        settings: &SampleSettings,
        inputs: &SampleInputs<'_>,
    ) -> Result<SampleOutput> {
        let latents = self.start_latents(settings, inputs.noise, inputs.init_latents)?;
        let steps = StepRange {
            first: 0,
            total: settings.steps_run(),
        };
        self.denoise(settings, inputs.text, latents, steps)
    }

    /// Runs the steps of `settings` on `latents`, already at the noise level of the first
    /// step, numbering them from `steps.first` in a run of `steps.total`.
    pub fn denoise(
        &mut self,
        settings: &SampleSettings,
        text: TextConditioning<'_>,
        latents: Tensor,
        steps: StepRange,
    ) -> Result<SampleOutput> {
        let schedule = self.schedule(settings)?;
        if steps.first + schedule.len() > steps.total {
            candle_core::bail!(
                "steps {}..{} do not fit in a run of {} steps",
                steps.first,
                steps.first + schedule.len(),
                steps.total
            );
        }
        let (batch, _, _, _, _) = latents.dims5()?;
        let guidance = settings.guidance();
        let text = guided_text(text, batch, guidance)?;
        let mut all_frames = AllFrames;
        let strategy: &mut dyn FrameStrategy = match &mut self.strategy {
            Some(strategy) => &mut **strategy,
            None => &mut all_frames,
        };
        let observer = match &self.observer {
            Observer::Owned(observer) => observer,
            Observer::Borrowed(observer) => *observer,
        };
        let model = GuidedModel {
            predictor: self.predictor,
            scheduler: self.scheduler,
            text: &text,
            guidance,
            guidance_scale: settings.guidance_scale,
            run: observer,
        };

        strategy.begin(LoopSteps {
            first: steps.first,
            len: schedule.len(),
        });
        let mut latents = latents;
        let mut frame_evaluations = 0;
        for (i, scheduled) in schedule.steps().iter().enumerate() {
            let step = SamplingStep {
                index: steps.first + i,
                count: steps.total,
                timestep: scheduled.timestep,
            };
            let selection = strategy.frames_to_evaluate(&step, &latents)?;
            let total_frames = latents.dim(2)?;
            selection.validate(total_frames)?;
            let evaluated = match selection.frames() {
                None => latents.clone(),
                Some(frames) => gather_frames(&latents, frames)?,
            };
            let (noise_pred, evaluations) = model.predict(&evaluated, selection.frames(), step)?;
            frame_evaluations += evaluations;
            let output = self.scheduler.step(
                &noise_pred,
                scheduled.timestep,
                scheduled.prev_timestep,
                &evaluated,
            )?;
            let completed = strategy.complete(&FrameUpdate {
                step,
                prev_timestep: scheduled.prev_timestep,
                frames: selection.frames(),
                latents_before: &latents,
                evaluated_before: &evaluated,
                evaluated_after: &output.prev_sample,
                denoised: &output.pred_original_sample,
                noise_pred: &noise_pred,
                scheduler: self.scheduler,
            })?;
            if completed.dims() != latents.dims() {
                candle_core::bail!(
                    "the frame strategy returned latents of shape {:?} for a clip of shape {:?}",
                    completed.dims(),
                    latents.dims()
                );
            }
            latents = completed;
            if let Some(on_step) = self.on_step.as_mut() {
                on_step(&StepReport {
                    step,
                    latents: &latents,
                    denoised: &output.pred_original_sample,
                    evaluated_frames: selection.frames(),
                })?;
            }
        }
        Ok(SampleOutput {
            latents,
            frame_evaluations,
            steps: schedule.len(),
        })
    }
}

/// The embeddings of one model call: `[negative, positive]` with guidance (diffusers' batch
/// order), the positive ones alone without.
fn guided_text(
    text: TextConditioning<'_>,
    batch: usize,
    guidance: GuidanceLayout,
) -> Result<Tensor> {
    let (text_batch, _, _) = text.positive.dims3()?;
    if text_batch != batch {
        candle_core::bail!("{text_batch} prompt embeddings for {batch} videos");
    }
    match guidance {
        GuidanceLayout::Conditional => Ok(text.positive.clone()),
        GuidanceLayout::UncondThenCond => {
            if text.negative.dims() != text.positive.dims() {
                candle_core::bail!(
                    "negative prompt embeddings of shape {:?}, the positive ones are {:?}",
                    text.negative.dims(),
                    text.positive.dims()
                );
            }
            Tensor::cat(&[text.negative, text.positive], 0)
        }
    }
}

/// The predictor with classifier-free guidance applied, for one run.
struct GuidedModel<'a> {
    predictor: &'a dyn NoisePredictor,
    scheduler: &'a dyn Scheduler,
    text: &'a Tensor,
    guidance: GuidanceLayout,
    guidance_scale: f64,
    run: &'a RunObserver,
}

impl GuidedModel<'_> {
    /// The guided ε of `latents` (frames at `positions` of the clip) and the frame
    /// evaluations it took: the negative and positive halves go in one batch, and
    /// ε = ε_u + g·(ε_c − ε_u).
    fn predict(
        &self,
        latents: &Tensor,
        positions: Option<&[usize]>,
        step: SamplingStep,
    ) -> Result<(Tensor, usize)> {
        let batched = match self.guidance {
            GuidanceLayout::Conditional => latents.clone(),
            GuidanceLayout::UncondThenCond => Tensor::cat(&[latents, latents], 0)?,
        };
        let input = self.scheduler.scale_model_input(&batched, step.timestep)?;
        let request = PredictRequest {
            latents: &input,
            timestep: step.timestep,
            text: self.text,
            step: Some(step),
            guidance: self.guidance,
            frame_positions: positions,
            run: Some(self.run),
        };
        let evaluations = self.predictor.frame_evaluations(&request)?;
        let eps = self.predictor.predict(&request)?;
        if eps.dims() != input.dims() {
            candle_core::bail!(
                "the noise prediction has shape {:?} for latents of shape {:?}",
                eps.dims(),
                input.dims()
            );
        }
        let eps = match self.guidance {
            GuidanceLayout::Conditional => eps,
            GuidanceLayout::UncondThenCond => {
                let batch = latents.dim(0)?;
                let (uncond, cond) = (eps.narrow(0, 0, batch)?, eps.narrow(0, batch, batch)?);
                (&uncond + ((cond - &uncond)? * self.guidance_scale)?)?
            }
        };
        Ok((eps, evaluations))
    }
}

#[cfg(test)]
mod tests {
    use std::cell::RefCell;

    use super::*;
    use crate::schedulers::{DdimScheduler, DdimSchedulerConfig};
    use crate::test_util::max_abs_diff;
    use candle_core::{DType, Device};

    /// ε = 0 everywhere: DDIM then only rescales, so the loop's bookkeeping is visible.
    struct Zero;
    impl NoisePredictor for Zero {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            request.latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    /// What one predictor call saw.
    #[derive(Debug, Clone, PartialEq)]
    struct Call {
        shape: Vec<usize>,
        positions: Option<Vec<usize>>,
        step: Option<SamplingStep>,
        guidance: GuidanceLayout,
        has_run: bool,
    }

    /// A predictor whose output depends on every frame and on the frame positions, so that
    /// gathering, positions and write-back all show in the result; it records its calls.
    #[derive(Default)]
    struct Recording {
        calls: RefCell<Vec<Call>>,
    }

    impl NoisePredictor for Recording {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            let latents = request.latents;
            let (_, _, frames, _, _) = latents.dims5()?;
            self.calls.borrow_mut().push(Call {
                shape: latents.dims().to_vec(),
                positions: request.frame_positions.map(<[usize]>::to_vec),
                step: request.step,
                guidance: request.guidance,
                has_run: request.run.is_some(),
            });
            let positions: Vec<f32> = match request.frame_positions {
                Some(p) => p.iter().map(|&p| p as f32).collect(),
                None => (0..frames).map(|p| p as f32).collect(),
            };
            let positions = Tensor::from_vec(positions, (1, 1, frames, 1, 1), latents.device())?;
            let per_frame = latents.sin()?.broadcast_mul(&((positions * 0.1)? + 1.0)?)?;
            let across_frames = latents.mean_keepdim(2)?;
            let text = request.text.mean_all()?;
            per_frame
                .broadcast_add(&(across_frames * 0.3)?)?
                .broadcast_add(&text)
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    /// Evaluates `frames` (all of them through the gather path when it lists every frame)
    /// and keeps the other frames as they were.
    struct Subset {
        frames: Vec<usize>,
    }
    impl FrameStrategy for Subset {
        fn frames_to_evaluate(&mut self, _: &SamplingStep, _: &Tensor) -> Result<FrameSelection> {
            Ok(FrameSelection::Frames(self.frames.clone()))
        }
    }

    struct Case {
        noise: Tensor,
        positive: Tensor,
        negative: Tensor,
        scheduler: DdimScheduler,
    }

    fn case(shape: (usize, usize, usize, usize, usize)) -> Result<Case> {
        let dev = Device::Cpu;
        Ok(Case {
            noise: Tensor::randn(0f32, 1.0, shape, &dev)?,
            positive: Tensor::randn(0f32, 1.0, (shape.0, 2, 3), &dev)?,
            negative: Tensor::randn(0f32, 1.0, (shape.0, 2, 3), &dev)?,
            scheduler: DdimScheduler::new(DdimSchedulerConfig::sd15())?,
        })
    }

    impl Case {
        fn inputs(&self) -> SampleInputs<'_> {
            SampleInputs {
                noise: &self.noise,
                init_latents: None,
                text: TextConditioning {
                    positive: &self.positive,
                    negative: &self.negative,
                },
            }
        }
    }

    fn settings(steps: usize, guidance_scale: f64) -> SampleSettings {
        SampleSettings {
            steps,
            guidance_scale,
            strength: 1.0,
        }
    }

    #[test]
    fn strength_runs_a_share_of_the_schedule_and_reports_every_step() -> Result<()> {
        let case = case((1, 4, 3, 2, 2))?;
        let clean = Tensor::ones((1, 4, 3, 2, 2), DType::F32, &Device::Cpu)?;
        let settings = SampleSettings {
            strength: 0.6,
            ..settings(10, 7.5)
        };
        let inputs = SampleInputs {
            init_latents: Some(&clean),
            ..case.inputs()
        };
        let mut seen = Vec::new();
        let mut on_step = |r: &StepReport<'_>| {
            seen.push((r.step.index, r.step.count));
            Ok(())
        };
        let output = Sampler::new(&Zero, &case.scheduler)
            .on_step(&mut on_step)
            .sample(&settings, &inputs)?;
        assert_eq!(seen, (0..6).map(|s| (s, 6)).collect::<Vec<_>>());
        assert_eq!(output.steps, 6);
        // 6 steps × 3 frames × 1 video × 2 guidance branches.
        assert_eq!(output.frame_evaluations, 36);
        Ok(())
    }

    #[test]
    fn an_error_from_the_callback_stops_sampling() -> Result<()> {
        let case = case((1, 4, 2, 2, 2))?;
        let recording = Recording::default();
        let mut calls = 0;
        let mut on_step = |r: &StepReport<'_>| {
            calls += 1;
            if r.step.index == 1 {
                candle_core::bail!("cancelled")
            }
            Ok(())
        };
        let result = Sampler::new(&recording, &case.scheduler)
            .on_step(&mut on_step)
            .sample(&settings(5, 1.0), &case.inputs());
        assert!(result.unwrap_err().to_string().contains("cancelled"));
        assert_eq!(calls, 2);
        assert_eq!(recording.calls.borrow().len(), 2);
        Ok(())
    }

    #[test]
    fn the_callback_sees_the_latents_and_the_denoised_prediction() -> Result<()> {
        let case = case((1, 4, 3, 2, 2))?;
        let mut reports = Vec::new();
        let mut on_step = |r: &StepReport<'_>| {
            reports.push((r.step, r.latents.clone(), r.denoised.clone()));
            Ok(())
        };
        let output = Sampler::new(&Zero, &case.scheduler)
            .on_step(&mut on_step)
            .sample(&settings(4, 1.0), &case.inputs())?;
        assert_eq!(reports.len(), 4);
        let schedule = case.scheduler.timesteps(4)?;
        let mut before = case.noise.clone();
        for ((step, latents, denoised), scheduled) in reports.iter().zip(schedule.steps()) {
            assert_eq!(step.timestep, scheduled.timestep);
            // With ε = 0, x₀ = x / √ᾱ_t.
            let alpha = case.scheduler.alphas_cumprod()[scheduled.timestep as usize];
            let expected = (&before / f64::from(alpha.sqrt()))?;
            assert!(max_abs_diff(denoised, &expected) < 1e-5);
            before = latents.clone();
        }
        assert_eq!(max_abs_diff(&reports[3].1, &output.latents), 0.0);
        Ok(())
    }

    #[test]
    fn evaluating_every_frame_through_the_subset_path_is_bit_identical() -> Result<()> {
        let case = case((2, 4, 5, 3, 2))?;
        for guidance_scale in [1.0, 7.5] {
            let settings = settings(6, guidance_scale);
            let plain = Sampler::new(&Recording::default(), &case.scheduler)
                .sample(&settings, &case.inputs())?;
            let recording = Recording::default();
            let mut every_frame = Subset {
                frames: (0..5).collect(),
            };
            let subset = Sampler::new(&recording, &case.scheduler)
                .with_strategy(&mut every_frame)
                .sample(&settings, &case.inputs())?;
            assert_eq!(max_abs_diff(&plain.latents, &subset.latents), 0.0);
            assert_eq!(plain.frame_evaluations, subset.frame_evaluations);
            let calls = recording.calls.borrow();
            assert!(calls
                .iter()
                .all(|c| c.positions.as_deref() == Some(&[0, 1, 2, 3, 4][..])));
        }
        Ok(())
    }

    #[test]
    fn a_subset_strategy_evaluates_only_its_frames() -> Result<()> {
        let case = case((2, 4, 6, 2, 2))?;
        let steps = 4;
        for (guidance_scale, branches, layout) in [
            (1.0, 1, GuidanceLayout::Conditional),
            (7.5, 2, GuidanceLayout::UncondThenCond),
        ] {
            let recording = Recording::default();
            let mut key_frames = Subset {
                frames: vec![4, 0, 2],
            };
            let output = Sampler::new(&recording, &case.scheduler)
                .with_strategy(&mut key_frames)
                .sample(&settings(steps, guidance_scale), &case.inputs())?;
            let calls = recording.calls.borrow();
            assert_eq!(calls.len(), steps);
            for (i, call) in calls.iter().enumerate() {
                assert_eq!(call.shape, [2 * branches, 4, 3, 2, 2]);
                assert_eq!(call.positions.as_deref(), Some(&[4, 0, 2][..]));
                assert_eq!(call.guidance, layout);
                assert!(call.has_run, "every call carries the run observer");
                let step = call.step.expect("every call carries its step");
                assert_eq!((step.index, step.count), (i, steps));
            }
            assert_eq!(output.frame_evaluations, steps * 3 * 2 * branches);
            // The frames that were never evaluated kept their starting noise.
            for frame in [1, 3, 5] {
                let kept = output.latents.narrow(2, frame, 1)?;
                assert_eq!(max_abs_diff(&kept, &case.noise.narrow(2, frame, 1)?), 0.0);
            }
        }
        Ok(())
    }

    /// Records the loops it is told about.
    #[derive(Default)]
    struct Loops {
        begun: Vec<LoopSteps>,
    }
    impl FrameStrategy for Loops {
        fn begin(&mut self, loop_steps: LoopSteps) {
            self.begun.push(loop_steps);
        }
    }

    #[test]
    fn the_strategy_is_told_where_each_loop_begins() -> Result<()> {
        let case = case((1, 4, 2, 2, 2))?;
        let mut loops = Loops::default();
        let mut sampler = Sampler::new(&Zero, &case.scheduler).with_strategy(&mut loops);
        let text = case.inputs().text;
        let settings = settings(3, 1.0);
        for first in [0, 3] {
            let range = StepRange { first, total: 6 };
            sampler.denoise(&settings, text, case.noise.clone(), range)?;
        }
        drop(sampler);
        assert_eq!(
            loops.begun,
            [
                LoopSteps { first: 0, len: 3 },
                LoopSteps { first: 3, len: 3 }
            ]
        );
        assert_eq!(loops.begun[1].fraction(4), 1.0 / 3.0);
        Ok(())
    }

    /// Counts its calls in the run observer.
    struct CountsInRun;
    impl NoisePredictor for CountsInRun {
        fn predict(&self, request: &PredictRequest) -> Result<Tensor> {
            let run = request
                .run
                .ok_or_else(|| candle_core::Error::Msg("no run observer".into()))?;
            run.with::<usize, _>("calls", |calls| *calls += 1);
            request.latents.zeros_like()
        }
        fn max_frames(&self) -> Option<usize> {
            None
        }
    }

    #[test]
    fn predictions_record_in_the_observer_the_caller_passes() -> Result<()> {
        let case = case((1, 4, 2, 2, 2))?;
        let observer = RunObserver::new();
        Sampler::new(&CountsInRun, &case.scheduler)
            .with_observer(&observer)
            .sample(&settings(3, 7.5), &case.inputs())?;
        assert_eq!(observer.get::<usize>("calls"), Some(3));
        Ok(())
    }

    #[test]
    fn bad_selections_and_inputs_are_errors() -> Result<()> {
        let case = case((1, 4, 3, 2, 2))?;
        let mut out_of_range = Subset { frames: vec![3] };
        let error = Sampler::new(&Zero, &case.scheduler)
            .with_strategy(&mut out_of_range)
            .sample(&settings(2, 1.0), &case.inputs())
            .unwrap_err();
        assert!(error.to_string().contains("frame 3"), "{error}");
        let mismatched = Tensor::zeros((2, 2, 3), DType::F32, &Device::Cpu)?;
        let inputs = SampleInputs {
            text: TextConditioning {
                positive: &mismatched,
                negative: &mismatched,
            },
            ..case.inputs()
        };
        assert!(Sampler::new(&Zero, &case.scheduler)
            .sample(&settings(2, 7.5), &inputs)
            .is_err());
        let zero_strength = SampleSettings {
            strength: 0.0,
            ..settings(2, 7.5)
        };
        assert!(Sampler::new(&Zero, &case.scheduler)
            .sample(&zero_strength, &case.inputs())
            .is_err());
        Ok(())
    }
}
