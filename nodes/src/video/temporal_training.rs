//! Training the lightweight motion-adaptive temporal modules of Hong & Quan (METHODS.md §1,
//! `models::temporal_adapter`) on a frozen image UNet, from a set of clips.
//!
//! Every step picks one clip and a window of `frames` consecutive frames of it, a timestep t
//! uniform in [0, 1000) and noise ε (independent, or temporally correlated as `video_noise`
//! draws it), noises the window's clean latents to x_t = √ᾱ_t·x_0 + √(1 − ᾱ_t)·ε, and takes the
//! plain ε-prediction MSE between the UNet's prediction and ε. Only the adapter's weights are
//! `Var`s; the UNet (and whatever the MODEL carries: motion modules, LoRAs) stays frozen. A
//! MODEL with AnimateDiff motion modules is accepted: the adapter is trained on top of them, as
//! it will be sampled. A temporal adapter already on the MODEL is replaced by the one trained
//! (training starts from the initialisation, not from it).
//!
//! Every draw of a step comes from (seed, step) alone, so a run resumed from a saved state takes
//! the same steps as an unbroken one, bit for bit. The adapter starts from
//! [`TemporalAdapter::init_weights`] with the same seed: its zero output projections make the
//! untrained adapter leave the image model exactly as it was.
//!
//! m, the motion amplitude the up blocks' bias and every module's gate read, is estimated in
//! each forward from the lowest-resolution features by an `AmplitudeTap`, as the
//! `TemporalAttentionInjector` does at inference when it is given no motion: the adapter learns
//! with the m it will see. The estimate comes after the down blocks, so their modules see m = 0
//! and their gate slopes a get no gradient (their gates are sigmoid(b), as at inference).

use std::sync::Arc;

use candle_core::{DType, Result, Tensor};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::models::patcher::{Patch, PatchedUNet, UNetInputs};
use crate::models::temporal_adapter::{TemporalAdapter, TemporalAdapterConfig};
use crate::models::weights::NamedWeights;
use crate::schedulers::Scheduler;
use crate::train::{self, AdamWConfig, Checkpointing, LrSchedule, StepReport, TrainPlan};
use crate::video::motion_adaptive::{Amplitude, AmplitudeTap, MotionAdaptiveConfig};
use crate::video::noise::{video_noise, NoiseMode};

/// Settings of one training run.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TemporalTrainingSettings {
    pub steps: u64,
    pub learning_rate: f64,
    /// Frames of every training window (2 or more).
    pub frames: usize,
    /// Seed of the adapter's initialisation and of every step's draws.
    pub seed: u64,
    /// How the noise of a window is correlated along its frames.
    pub noise: NoiseMode,
    /// ρ of a correlated `noise` (ignored for independent noise).
    pub correlation: f64,
    pub optimizer: AdamWConfig,
    pub schedule: LrSchedule,
    pub checkpoint_every: u64,
}

impl Default for TemporalTrainingSettings {
    fn default() -> Self {
        Self {
            steps: 2000,
            learning_rate: 1e-4,
            frames: 16,
            seed: 0,
            noise: NoiseMode::Independent,
            correlation: 0.0,
            optimizer: AdamWConfig {
                weight_decay: 0.01,
                max_grad_norm: Some(1.0),
                ..AdamWConfig::default()
            },
            schedule: LrSchedule::Constant { warmup_steps: 0 },
            checkpoint_every: 100,
        }
    }
}

impl TemporalTrainingSettings {
    /// A description of the run for its checkpoints, without the step count: a saved state
    /// resumes a run with the same settings, which may go on for more steps (the data is
    /// described by the caller).
    pub fn describe_without_steps(&self) -> String {
        format!("temporal adapter {:?}", Self { steps: 0, ..*self })
    }
}

/// One training clip, encoded.
pub struct TrainingClip {
    /// (1, C, F, H, W) clean latents, scaled for the model; every clip of a run has the same
    /// C, H and W.
    pub latents: Tensor,
    /// (1, S, D) embeddings of the clip's prompt.
    pub text: Tensor,
}

/// The clips and the noise schedule a run trains on.
pub struct TemporalTrainingData<'a> {
    pub clips: &'a [TrainingClip],
    /// The training noise schedule: where the windows are noised to.
    pub noise_schedule: &'a dyn Scheduler,
}

/// What one step trains on, drawn from (seed, step) alone.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StepDraw {
    /// The index of the clip.
    pub clip: usize,
    /// The first frame of the window.
    pub start: usize,
    pub timestep: usize,
    /// The seed of the window's noise.
    pub noise_seed: u64,
}

/// The clip, window, timestep and noise seed of step `step` (from 0), for clips of
/// `clip_frames` frames each (every one at least `frames`) and `train_timesteps` timesteps.
pub fn draw_step(
    seed: u64,
    step: u64,
    clip_frames: &[usize],
    frames: usize,
    train_timesteps: usize,
) -> StepDraw {
    // One ChaCha8 stream per step: a resumed run draws what an unbroken one would.
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    rng.set_stream(step);
    let clip = rng.random_range(0..clip_frames.len());
    let start = rng.random_range(0..=clip_frames[clip] - frames);
    let timestep = rng.random_range(0..train_timesteps);
    StepDraw {
        clip,
        start,
        timestep,
        noise_seed: rng.random(),
    }
}

/// What one run returns.
pub struct TrainedAdapter {
    pub config: TemporalAdapterConfig,
    /// The trained weights by key: exactly `config.trainable_keys()`, detached.
    pub weights: NamedWeights,
    /// The loss of every step, from the first (also those of a resumed run).
    pub losses: Vec<f64>,
    /// Steps taken before this call (from a saved state).
    pub resumed_at: u64,
}

impl TrainedAdapter {
    /// The adapter for sampling, in `dtype` (the UNet's).
    pub fn adapter(&self, dtype: DType) -> Result<TemporalAdapter> {
        let weights = self
            .weights
            .iter()
            .map(|(key, tensor)| Ok((key.clone(), tensor.to_dtype(dtype)?)))
            .collect::<Result<NamedWeights>>()?;
        TemporalAdapter::from_weights(&self.config, weights)
    }
}

/// Refuses data a run cannot train on, with the cause: no clips, windows under 2 frames or
/// beyond what the adapter (or the MODEL's motion modules) can see, clips shorter than the
/// window, clips of different latent shapes.
fn check_data(
    unet: &PatchedUNet,
    config: &TemporalAdapterConfig,
    data: &TemporalTrainingData,
    frames: usize,
) -> Result<()> {
    if data.clips.is_empty() {
        candle_core::bail!("no clips to train on")
    }
    if frames < 2 {
        candle_core::bail!("windows of {frames} frame(s) have no motion; train on 2 frames or more")
    }
    if frames > config.max_frames {
        candle_core::bail!(
            "windows of {frames} frames; the temporal adapter sees at most {} at once",
            config.max_frames
        )
    }
    if let Some(max) = unet.max_frames() {
        if frames > max {
            candle_core::bail!(
                "windows of {frames} frames; the model's motion modules see at most {max} at once"
            )
        }
    }
    let (_, channels, _, height, width) = data.clips[0].latents.dims5()?;
    for (index, clip) in data.clips.iter().enumerate() {
        let (batch, c, f, h, w) = clip.latents.dims5()?;
        if batch != 1 || (c, h, w) != (channels, height, width) {
            candle_core::bail!(
                "clip {index} has latents of shape {:?}; every clip must be (1, {channels}, F, \
                 {height}, {width}) like the first",
                clip.latents.dims()
            )
        }
        if f < frames {
            candle_core::bail!(
                "clip {index} has {f} frame(s), fewer than the {frames} of a training window"
            )
        }
    }
    if data.noise_schedule.alphas_cumprod().is_empty() {
        candle_core::bail!("the noise schedule has no timesteps")
    }
    Ok(())
}

/// Trains a temporal adapter for `unet`'s image UNet on `data`, the UNet frozen. The state is
/// saved (and resumed from) at `checkpointing` when given; `on_step` hears of every step (an
/// error from it stops the run).
pub fn train_temporal_adapter(
    unet: &PatchedUNet,
    data: &TemporalTrainingData,
    settings: &TemporalTrainingSettings,
    checkpointing: Option<&Checkpointing>,
    on_step: impl FnMut(&StepReport) -> Result<()>,
) -> Result<TrainedAdapter> {
    let base = unet.base();
    let config = TemporalAdapterConfig::for_unet(base.config())?;
    check_data(unet, &config, data, settings.frames)?;
    let device = base.device().clone();
    let dtype = base.dtype();

    // The parameters stay f32 whatever the UNet's dtype; each step casts them into the adapter
    // (a no-op for an f32 UNet), and the cast carries the gradient back.
    let init = TemporalAdapter::init_weights(&config, settings.seed, DType::F32, &device)?;
    let parameters = train::variables(init)?;
    let vars = parameters.clone();
    let (mut optimizer, mut losses) = train::start(parameters, settings.optimizer, checkpointing)?;
    let resumed_at = optimizer.steps_taken();

    let kappa = MotionAdaptiveConfig::default().kappa;
    let down_blocks = base.config().block_out_channels.len();
    let with_amplitude = unet
        .with_patch(Patch::Tap(Arc::new(AmplitudeTap::new(
            Amplitude::Estimated { kappa },
            down_blocks,
        ))))
        .map_err(candle_core::Error::Msg)?;
    let clip_frames = data
        .clips
        .iter()
        .map(|clip| clip.latents.dim(2))
        .collect::<Result<Vec<_>>>()?;
    let plan = TrainPlan {
        steps: settings.steps,
        learning_rate: settings.learning_rate,
        schedule: settings.schedule,
        checkpoint_every: settings.checkpoint_every,
    };
    let frames = settings.frames;
    let loss_at = |step: u64| -> Result<Tensor> {
        let draw = draw_step(
            settings.seed,
            step,
            &clip_frames,
            frames,
            data.noise_schedule.alphas_cumprod().len(),
        );
        let clip = &data.clips[draw.clip];
        let latents = clip
            .latents
            .narrow(2, draw.start, frames)?
            .to_dtype(DType::F32)?;
        let (batch, channels, _, height, width) = latents.dims5()?;
        let noise = video_noise(
            draw.noise_seed,
            batch,
            channels,
            frames,
            height,
            width,
            settings.noise,
            settings.correlation,
            latents.device(),
        )?;
        let noisy = data
            .noise_schedule
            .add_noise(&latents, &noise, draw.timestep as f64)?;
        let adapter = TemporalAdapter::from_weights(&config, train::as_weights(&vars, dtype)?)?;
        let model = with_amplitude
            .with_temporal_adapter(Arc::new(adapter))
            .map_err(candle_core::Error::Msg)?;
        // The model computes in its own dtype; the loss in f32.
        let (noisy, text) = (noisy.to_dtype(dtype)?, clip.text.to_dtype(dtype)?);
        let predicted = model
            .forward(&UNetInputs::new(&noisy, draw.timestep as f64, &text))?
            .to_dtype(DType::F32)?;
        (predicted - noise)?.sqr()?.mean_all()
    };
    train::train(
        &mut optimizer,
        &plan,
        &mut losses,
        checkpointing,
        loss_at,
        on_step,
    )?;
    Ok(TrainedAdapter {
        config,
        weights: optimizer.parameters(),
        losses,
        resumed_at,
    })
}

#[cfg(test)]
mod tests {
    use candle_core::Device;

    use super::*;
    use crate::test_util::max_abs_diff;

    use crate::video::test_models::{moving_square, tiny_motion_model};

    fn tiny_image_model() -> PatchedUNet {
        crate::video::test_models::tiny_image_model(DType::F32)
    }

    fn noise_schedule() -> crate::schedulers::DdimScheduler {
        crate::video::test_models::sd15_noise_schedule()
    }

    fn clips() -> Vec<TrainingClip> {
        let text = Tensor::randn(0f32, 1.0, (1, 5, 32), &Device::Cpu).unwrap();
        vec![
            TrainingClip {
                latents: moving_square(6, 1),
                text: text.clone(),
            },
            TrainingClip {
                latents: moving_square(5, 2),
                text,
            },
        ]
    }

    fn settings(steps: u64) -> TemporalTrainingSettings {
        TemporalTrainingSettings {
            steps,
            learning_rate: 3e-3,
            frames: 4,
            seed: 7,
            checkpoint_every: 2,
            ..TemporalTrainingSettings::default()
        }
    }

    #[test]
    fn every_step_draws_a_window_inside_its_clip_from_the_seed_and_step_alone() {
        let lengths = [6, 4, 9];
        let mut clips_seen = [false; 3];
        for step in 0..200 {
            let draw = draw_step(5, step, &lengths, 4, 1000);
            assert_eq!(draw, draw_step(5, step, &lengths, 4, 1000));
            assert!(draw.start + 4 <= lengths[draw.clip], "{draw:?}");
            assert!(draw.timestep < 1000);
            clips_seen[draw.clip] = true;
        }
        assert_eq!(clips_seen, [true; 3]);
        assert_ne!(
            draw_step(5, 0, &lengths, 4, 1000),
            draw_step(6, 0, &lengths, 4, 1000)
        );
    }

    #[test]
    fn training_lowers_the_loss_and_trains_only_the_adapter() -> Result<()> {
        let unet = tiny_image_model();
        let clips = clips();
        let schedule = noise_schedule();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let mut reported = Vec::new();
        let started = std::time::Instant::now();
        let trained = train_temporal_adapter(&unet, &data, &settings(32), None, |report| {
            reported.push(report.loss);
            Ok(())
        })?;
        eprintln!(
            "{:.1} ms per step",
            started.elapsed().as_secs_f64() * 1000.0 / 32.0
        );
        assert_eq!(trained.losses, reported);
        crate::video::test_models::assert_loss_falls(&trained.losses);

        // The parameters are the adapter's keys, all of them, and nothing of the UNet.
        let expected = trained.config.trainable_keys();
        assert_eq!(trained.weights.len(), expected.len());
        for key in &expected {
            assert!(trained.weights.contains_key(key), "{key}");
            assert!(unet.base().weights().get(key).is_none(), "{key}");
        }
        // The zero-initialised output projections moved: the adapter learnt something.
        let init = TemporalAdapter::init_weights(&trained.config, 7, DType::F32, &Device::Cpu)?;
        let out_key = expected
            .iter()
            .find(|k| k.ends_with(".to_out.weight"))
            .unwrap();
        assert!(max_abs_diff(&trained.weights[out_key], &init[out_key]) > 0.0);

        // Applied for sampling, the trained adapter changes the prediction.
        let latents = moving_square(4, 1);
        let inputs = UNetInputs::new(&latents, 500.0, &clips[0].text);
        let with_adapter = unet
            .with_temporal_adapter(Arc::new(trained.adapter(DType::F32)?))
            .map_err(candle_core::Error::Msg)?;
        assert!(max_abs_diff(&with_adapter.forward(&inputs)?, &unet.forward(&inputs)?) > 0.0);
        Ok(())
    }

    #[test]
    fn the_untrained_adapter_leaves_the_image_model_unchanged() -> Result<()> {
        let unet = tiny_image_model();
        let clips = clips();
        let schedule = noise_schedule();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let untrained = train_temporal_adapter(&unet, &data, &settings(0), None, |_| Ok(()))?;
        assert!(untrained.losses.is_empty());
        let latents = moving_square(4, 1);
        let inputs = UNetInputs::new(&latents, 500.0, &clips[0].text);
        let with_adapter = unet
            .with_temporal_adapter(Arc::new(untrained.adapter(DType::F32)?))
            .map_err(candle_core::Error::Msg)?;
        assert_eq!(
            max_abs_diff(&with_adapter.forward(&inputs)?, &unet.forward(&inputs)?),
            0.0
        );
        Ok(())
    }

    #[test]
    fn a_resumed_run_ends_where_an_unbroken_one_does() -> Result<()> {
        let unet = tiny_image_model();
        let clips = clips();
        let schedule = noise_schedule();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let correlated = |steps| TemporalTrainingSettings {
            noise: NoiseMode::Progressive,
            correlation: 0.5,
            ..settings(steps)
        };
        let dir = tempfile::tempdir().unwrap();
        let checkpointing = |name: &str| Checkpointing {
            path: dir.path().join(name),
            run: correlated(0).describe_without_steps(),
        };
        let run = |steps, name: &str| {
            train_temporal_adapter(
                &unet,
                &data,
                &correlated(steps),
                Some(&checkpointing(name)),
                |_| Ok(()),
            )
        };
        let unbroken = run(6, "a.safetensors")?;
        let half = run(3, "b.safetensors")?;
        assert_eq!(half.losses[..], unbroken.losses[..3]);
        let resumed = run(6, "b.safetensors")?;
        assert_eq!(resumed.resumed_at, 3);
        assert_eq!(resumed.losses, unbroken.losses);
        for (key, tensor) in &unbroken.weights {
            assert_eq!(max_abs_diff(tensor, &resumed.weights[key]), 0.0, "{key}");
        }
        Ok(())
    }

    /// A UNet in half precision trains f32 parameters through the cast into its dtype.
    #[test]
    fn a_half_precision_unet_trains_f32_parameters() -> Result<()> {
        let unet = crate::video::test_models::tiny_image_model(DType::F16);
        let clips = clips();
        let schedule = noise_schedule();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let trained = train_temporal_adapter(&unet, &data, &settings(2), None, |_| Ok(()))?;
        assert!(
            trained.losses.iter().all(|l| l.is_finite()),
            "{:?}",
            trained.losses
        );
        let init = TemporalAdapter::init_weights(&trained.config, 7, DType::F32, &Device::Cpu)?;
        // Every weight learns but the down blocks' gate slopes a: m is estimated after the
        // down blocks, so there g = sigmoid(a·0 + b), at inference as in training.
        let still: Vec<&String> = trained
            .weights
            .iter()
            .filter(|(key, tensor)| max_abs_diff(tensor, &init[*key]) == 0.0)
            .map(|(key, _)| key)
            .collect();
        assert!(!still.is_empty());
        for key in still {
            assert!(
                key.starts_with("down_blocks.") && key.ends_with(".gate.a"),
                "{key} did not move"
            );
        }
        for (key, tensor) in &trained.weights {
            assert_eq!(tensor.dtype(), DType::F32, "{key}");
        }
        assert_eq!(
            trained
                .adapter(DType::F16)?
                .weights()
                .values()
                .next()
                .unwrap()
                .dtype(),
            DType::F16
        );
        Ok(())
    }

    #[test]
    fn the_adapter_trains_on_top_of_frozen_motion_modules_within_their_frames() -> Result<()> {
        let unet = tiny_motion_model(DType::F32);
        let clips = clips();
        let schedule = noise_schedule();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let trained = train_temporal_adapter(&unet, &data, &settings(2), None, |_| Ok(()))?;
        assert_eq!(trained.losses.len(), 2);
        assert!(trained.losses.iter().all(|l| l.is_finite()));
        assert_eq!(trained.weights.len(), trained.config.trainable_keys().len());

        let long = vec![TrainingClip {
            latents: moving_square(10, 1),
            text: clips[0].text.clone(),
        }];
        let data = TemporalTrainingData {
            clips: &long,
            noise_schedule: &schedule,
        };
        let too_many = TemporalTrainingSettings {
            frames: 9,
            ..settings(1)
        };
        let error = train_temporal_adapter(&unet, &data, &too_many, None, |_| Ok(()))
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("motion modules see at most 8"),
            "{error}"
        );
        Ok(())
    }

    #[test]
    fn clips_shorter_than_the_window_and_windows_without_motion_are_refused() {
        let unet = tiny_image_model();
        let schedule = noise_schedule();
        let clips = clips();
        let data = TemporalTrainingData {
            clips: &clips,
            noise_schedule: &schedule,
        };
        let too_long = TemporalTrainingSettings {
            frames: 6,
            ..settings(1)
        };
        let error = train_temporal_adapter(&unet, &data, &too_long, None, |_| Ok(()))
            .err()
            .unwrap();
        assert!(
            error.to_string().contains("clip 1 has 5 frame(s)"),
            "{error}"
        );
        let single = TemporalTrainingSettings {
            frames: 1,
            ..settings(1)
        };
        let error = train_temporal_adapter(&unet, &data, &single, None, |_| Ok(()))
            .err()
            .unwrap();
        assert!(error.to_string().contains("no motion"), "{error}");
        let none = TemporalTrainingData {
            clips: &[],
            noise_schedule: &schedule,
        };
        let error = train_temporal_adapter(&unet, &none, &settings(1), None, |_| Ok(()))
            .err()
            .unwrap();
        assert!(error.to_string().contains("no clips"), "{error}");
    }
}
