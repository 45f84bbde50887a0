//! VMC, video motion customization (METHODS.md §2): the Q, K and V projections of a motion
//! module's temporal attention are fine-tuned on one clip so that the frame-to-frame
//! residuals of the predicted noise follow those of the true noise; everything else stays
//! frozen. The tuned projections are a small weight patch on the motion module.

use std::path::Path;

use candle_core::{DType, Result, Tensor, Var};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::models::patcher::{PatchedUNet, UNetInputs};
use crate::models::weights::NamedWeights;
use crate::schedulers::Scheduler;
use crate::train::{self, AdamWConfig, Checkpointing, StepReport, TrainPlan};
use crate::video::noise::{video_noise, NoiseMode};

/// The motion loss between the frame residuals of the true and the predicted noise.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MotionLoss {
    /// The paper's: the mean over frame pairs n of 1 − cos(δε^n, δε_θ^n), each cosine over the
    /// flattened C·H·W residual.
    Paper,
    /// The official code's: absolute residuals |δε|, |δε_θ|, the cosine along the frame axis at
    /// each (c, h, w), 1 − its mean.
    Official,
    /// ((1 − ᾱ_t)/ᾱ_t)·mean ‖δε^n − δε_θ^n‖²: the ℓ2 form, a mean over elements (our choice,
    /// so the loss does not grow with the latent size).
    L2,
}

impl MotionLoss {
    pub const NAMES: [&'static str; 3] = ["paper", "official", "l2"];
}

impl std::str::FromStr for MotionLoss {
    type Err = String;
    fn from_str(name: &str) -> std::result::Result<Self, String> {
        match name {
            "paper" => Ok(Self::Paper),
            "official" => Ok(Self::Official),
            "l2" => Ok(Self::L2),
            other => Err(format!(
                "unknown loss `{other}` (one of {})",
                Self::NAMES.join(", ")
            )),
        }
    }
}

/// The guard of a cosine's denominator, as torch's `cosine_similarity`.
const COSINE_EPS: f64 = 1e-8;

/// δ along the frames: x[:, :, 1:] − x[:, :, :−1] of (B, C, F, H, W).
fn frame_residuals(xs: &Tensor) -> Result<Tensor> {
    let frames = xs.dim(2)?;
    xs.narrow(2, 1, frames - 1)? - xs.narrow(2, 0, frames - 1)?
}

/// Cosine similarity of `a` and `b` along `dim`.
fn cosine(a: &Tensor, b: &Tensor, dim: usize) -> Result<Tensor> {
    let dot = (a * b)?.sum(dim)?;
    let norms = (a.sqr()?.sum(dim)?.sqrt()? * b.sqr()?.sum(dim)?.sqrt()?)?;
    dot / norms.clamp(COSINE_EPS, f64::INFINITY)?
}

/// The scalar `loss` between `predicted` and true `noise`, both (B, C, F, H, W) with F ≥ 2, at
/// a timestep whose ᾱ is `alpha_bar`.
pub fn motion_loss(
    loss: MotionLoss,
    predicted: &Tensor,
    noise: &Tensor,
    alpha_bar: f64,
) -> Result<Tensor> {
    let (batch, channels, frames, height, width) = predicted.dims5()?;
    if frames < 2 {
        candle_core::bail!("the motion loss needs 2 frames or more, got {frames}")
    }
    let predicted_residual = frame_residuals(predicted)?;
    let true_residual = frame_residuals(noise)?;
    match loss {
        MotionLoss::Paper => {
            // (B, F−1, C·H·W): one flattened residual per frame pair.
            let flatten = |r: &Tensor| {
                r.permute((0, 2, 1, 3, 4))?
                    .reshape((batch, frames - 1, channels * height * width))
            };
            let similarity = cosine(&flatten(&true_residual)?, &flatten(&predicted_residual)?, 2)?;
            similarity.affine(-1.0, 1.0)?.mean_all()
        }
        MotionLoss::Official => {
            let similarity = cosine(&predicted_residual.abs()?, &true_residual.abs()?, 2)?;
            similarity.mean_all()?.affine(-1.0, 1.0)
        }
        MotionLoss::L2 => {
            let weight = (1.0 - alpha_bar) / alpha_bar;
            (true_residual - predicted_residual)?
                .sqr()?
                .mean_all()?
                .affine(weight, 0.0)
        }
    }
}

/// Whether `key` (a motion-module weight) is a Q, K or V projection of temporal attention: the
/// only weights VMC trains.
pub fn is_temporal_qkv(key: &str) -> bool {
    key.contains(".motion_modules.")
        && [".to_q.weight", ".to_k.weight", ".to_v.weight"]
            .iter()
            .any(|suffix| key.ends_with(suffix))
}

/// Settings of one customisation; the defaults are the paper's recipe.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VmcSettings {
    pub steps: u64,
    pub learning_rate: f64,
    pub loss: MotionLoss,
    pub seed: u64,
    pub optimizer: AdamWConfig,
    pub schedule: train::LrSchedule,
    pub checkpoint_every: u64,
}

impl Default for VmcSettings {
    fn default() -> Self {
        Self {
            steps: 400,
            learning_rate: 1e-4,
            loss: MotionLoss::Paper,
            seed: 0,
            optimizer: AdamWConfig {
                weight_decay: 0.01,
                max_grad_norm: Some(1.0),
                ..AdamWConfig::default()
            },
            schedule: train::LrSchedule::Constant { warmup_steps: 0 },
            checkpoint_every: 50,
        }
    }
}

impl VmcSettings {
    /// A description of the run for its checkpoints, without the step count: a saved state
    /// resumes a run with the same settings, which may go on for more steps (the data is
    /// described by the caller).
    pub fn describe_without_steps(&self) -> String {
        format!("{:?}", Self { steps: 0, ..*self })
    }
}

/// What one customisation returns.
pub struct Customized {
    /// The tuned projections by motion-module key.
    pub patch: NamedWeights,
    /// The loss of every step, from the first (also those of a resumed run).
    pub losses: Vec<f64>,
    /// Steps taken before this call (from a saved state).
    pub resumed_at: u64,
}

/// The clip to learn the motion of, and the prompt.
pub struct VmcData<'a> {
    /// (1, C, F, H, W) clean latents, scaled for the model.
    pub latents: &'a Tensor,
    /// (1, S, D) embeddings of the appearance-invariant prompt.
    pub text: &'a Tensor,
    /// The training noise schedule: where the clip is noised to, and its ᾱ.
    pub noise_schedule: &'a dyn Scheduler,
}

/// Fine-tunes the temporal Q/K/V of `unet`'s motion module on `data`. The state is saved (and
/// resumed from) at `checkpointing` when given; `on_step` hears of every step.
pub fn customize_motion(
    unet: &PatchedUNet,
    data: &VmcData,
    settings: &VmcSettings,
    checkpointing: Option<&Checkpointing>,
    on_step: impl FnMut(&StepReport) -> Result<()>,
) -> Result<Customized> {
    let Some(adapter) = unet.motion() else {
        candle_core::bail!("the model has no motion module to customise (apply one first)")
    };
    let (_, _, frames, _, _) = data.latents.dims5()?;
    if frames < 2 {
        candle_core::bail!("a clip of {frames} frame(s) has no motion; give 2 frames or more")
    }
    let parameters = train::variables(
        adapter
            .weights()
            .iter()
            .filter(|(key, _)| is_temporal_qkv(key))
            .map(|(key, tensor)| (key.clone(), tensor.clone())),
    )?;
    if parameters.is_empty() {
        candle_core::bail!("the motion module has no temporal attention projections to train")
    }
    // An f32 model reads the variables' storage, so it is built once and sees every optimiser
    // step; another dtype takes a cast of them, rebuilt at every step.
    let dtype = unet.base().dtype();
    let with_parameters = |parameters: &[(String, Var)]| -> Result<PatchedUNet> {
        unet.with_weights(train::as_weights(parameters, dtype)?)
            .map_err(candle_core::Error::Msg)
    };
    let built_once = match dtype {
        DType::F32 => Some(with_parameters(&parameters)?),
        _ => None,
    };
    let vars = parameters.clone();
    let (mut optimizer, mut losses) = train::start(parameters, settings.optimizer, checkpointing)?;
    let resumed_at = optimizer.steps_taken();
    let plan = TrainPlan {
        steps: settings.steps,
        learning_rate: settings.learning_rate,
        schedule: settings.schedule,
        checkpoint_every: settings.checkpoint_every,
    };
    let latents = data.latents.to_dtype(DType::F32)?;
    let (batch, channels, frames, height, width) = latents.dims5()?;
    let device = latents.device().clone();
    let train_timesteps = data.noise_schedule.alphas_cumprod().len();
    let loss_at = |step: u64| -> Result<Tensor> {
        // Each step's draws depend only on the seed and the step: a resumed run draws the same.
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        rng.set_stream(step);
        let timestep = rng.random_range(0..train_timesteps);
        let noise = video_noise(
            rng.random(),
            batch,
            channels,
            frames,
            height,
            width,
            NoiseMode::Independent,
            0.0,
            &device,
        )?;
        let alpha_bar = f64::from(data.noise_schedule.alphas_cumprod()[timestep]);
        let noisy = data
            .noise_schedule
            .add_noise(&latents, &noise, timestep as f64)?;
        let rebuilt;
        let trained = match &built_once {
            Some(model) => model,
            None => {
                rebuilt = with_parameters(&vars)?;
                &rebuilt
            }
        };
        let (noisy, text) = (noisy.to_dtype(dtype)?, data.text.to_dtype(dtype)?);
        let predicted = trained
            .forward(&UNetInputs::new(&noisy, timestep as f64, &text))?
            .to_dtype(DType::F32)?;
        motion_loss(settings.loss, &predicted, &noise, alpha_bar)
    };
    train::train(
        &mut optimizer,
        &plan,
        &mut losses,
        checkpointing,
        loss_at,
        on_step,
    )?;
    Ok(Customized {
        patch: optimizer.parameters(),
        losses,
        resumed_at,
    })
}

/// Reads a motion patch (tuned temporal Q/K/V by motion-module key) and checks it against the
/// motion module of `unet`: every key must be a temporal projection the module has, of its
/// shape.
pub fn load_motion_patch(path: &Path, unet: &PatchedUNet) -> Result<NamedWeights> {
    let Some(adapter) = unet.motion() else {
        candle_core::bail!("the model has no motion module for the patch to apply to")
    };
    let first = adapter.weights().values().next();
    let (dtype, device) = first.map_or((DType::F32, candle_core::Device::Cpu), |t| {
        (t.dtype(), t.device().clone())
    });
    let tensors = candle_core::safetensors::load(path, &device)
        .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
    if tensors.is_empty() {
        candle_core::bail!("{} holds no tensors", path.display())
    }
    let mut patch = NamedWeights::new();
    for (key, tensor) in tensors {
        if !is_temporal_qkv(&key) {
            candle_core::bail!(
                "`{key}` is not a temporal attention projection: {} is not a motion patch",
                path.display()
            )
        }
        let Some(own) = adapter.weights().get(&key) else {
            candle_core::bail!(
                "the motion module has no `{key}`: the patch is for another motion module"
            )
        };
        if own.dims() != tensor.dims() {
            candle_core::bail!(
                "`{key}` is {:?} in the patch and {:?} in the motion module: the patch is for \
                 another motion module",
                tensor.dims(),
                own.dims()
            )
        }
        patch.insert(key, tensor.to_dtype(dtype)?);
    }
    Ok(patch)
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;
    use std::sync::Arc;

    use candle_core::{Device, IndexOp};

    use super::*;
    use crate::models::attention::{AttentionHook, AttentionKind, ProcessorBinding};
    use crate::models::call::ForwardPass;
    use crate::models::motion::{MotionAdapter, MotionAdapterConfig};
    use crate::video::motion_adaptive::{
        MotionAdaptiveAttention, MotionAdaptiveConfig, AMPLITUDE_VALUE,
    };

    fn motion_config() -> MotionAdapterConfig {
        crate::video::test_models::tiny_motion_config()
    }

    fn motion_weights() -> HashMap<String, Tensor> {
        crate::video::test_models::tiny_motion_weights()
    }

    fn tiny_model() -> PatchedUNet {
        crate::video::test_models::tiny_motion_model(DType::F32)
    }

    fn moving_square(frames: usize) -> Tensor {
        crate::video::test_models::moving_square(frames, 1)
    }

    fn noise_schedule() -> crate::schedulers::DdimScheduler {
        crate::video::test_models::sd15_noise_schedule()
    }

    fn text() -> Tensor {
        Tensor::randn(0f32, 1.0, (1, 5, 32), &Device::Cpu).unwrap()
    }

    fn forward(unet: &PatchedUNet, latents: &Tensor, text: &Tensor) -> Tensor {
        unet.forward(&UNetInputs::new(latents, 500.0, text))
            .unwrap()
    }

    fn settings(steps: u64) -> VmcSettings {
        VmcSettings {
            steps,
            learning_rate: 2e-3,
            seed: 3,
            checkpoint_every: 2,
            ..VmcSettings::default()
        }
    }

    #[test]
    fn the_losses_are_zero_for_a_perfect_prediction_and_the_paper_loss_two_for_its_opposite(
    ) -> Result<()> {
        let noise = Tensor::randn(0f32, 1.0, (1, 4, 5, 3, 3), &Device::Cpu)?;
        for loss in [MotionLoss::Paper, MotionLoss::Official, MotionLoss::L2] {
            let value = motion_loss(loss, &noise, &noise, 0.5)?.to_scalar::<f32>()?;
            assert!(value.abs() < 1e-6, "{loss:?}: {value}");
        }
        let opposite =
            motion_loss(MotionLoss::Paper, &noise.neg()?, &noise, 0.5)?.to_scalar::<f32>()?;
        assert!((opposite - 2.0).abs() < 1e-6);
        // A prediction off by the same value on every frame has the true residuals.
        let shifted = (&noise + 0.7)?;
        let value = motion_loss(MotionLoss::L2, &shifted, &noise, 0.5)?.to_scalar::<f32>()?;
        assert!(value.abs() < 1e-10);
        // ℓ2 weights by (1 − ᾱ)/ᾱ.
        let other = Tensor::randn(0f32, 1.0, (1, 4, 5, 3, 3), &Device::Cpu)?;
        let at = |alpha_bar| {
            motion_loss(MotionLoss::L2, &other, &noise, alpha_bar)
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
        };
        assert!((at(0.2) / at(0.5) - 4.0).abs() < 1e-5);
        assert!(motion_loss(
            MotionLoss::Paper,
            &noise.i((.., .., 0..1))?,
            &noise.i((.., .., 0..1))?,
            0.5
        )
        .is_err());
        Ok(())
    }

    #[test]
    fn customizing_lowers_the_loss_and_changes_only_temporal_qkv() -> Result<()> {
        let unet = tiny_model();
        let latents = moving_square(6);
        let text = text();
        let schedule = noise_schedule();
        let data = VmcData {
            latents: &latents,
            text: &text,
            noise_schedule: &schedule,
        };
        let mut reported = Vec::new();
        let tuned = customize_motion(&unet, &data, &settings(24), None, |report| {
            reported.push(report.loss);
            Ok(())
        })?;
        assert_eq!(tuned.losses, reported);
        crate::video::test_models::assert_loss_falls(&tuned.losses);

        // Only Q, K, V of temporal attention, every one of them, and all changed.
        let adapter = unet.motion().unwrap();
        let expected: Vec<&String> = adapter
            .weights()
            .keys()
            .filter(|k| is_temporal_qkv(k))
            .collect();
        assert_eq!(tuned.patch.keys().collect::<Vec<_>>(), expected);
        assert!(expected.iter().any(|k| k.contains(".attn1.to_q")));
        for (key, tensor) in &tuned.patch {
            let before = &adapter.weights()[key];
            assert!(
                crate::test_util::max_abs_diff(tensor, before) > 0.0,
                "{key} did not move"
            );
        }

        // Putting the original projections back gives the frozen model's output bit for bit:
        // nothing else was touched.
        let tuned_model = unet.with_weights(tuned.patch.clone()).unwrap();
        let restored: NamedWeights = expected
            .iter()
            .map(|k| ((*k).clone(), adapter.weights()[*k].clone()))
            .collect();
        let restored_model = tuned_model.with_weights(restored).unwrap();
        let base_out = forward(&unet, &latents, &text);
        assert_eq!(
            crate::test_util::max_abs_diff(&forward(&restored_model, &latents, &text), &base_out),
            0.0
        );
        assert!(
            crate::test_util::max_abs_diff(&forward(&tuned_model, &latents, &text), &base_out)
                > 0.0
        );
        for (key, tensor) in unet.base().weights() {
            assert_eq!(
                crate::test_util::max_abs_diff(tensor, &tuned_model.base().weights()[key]),
                0.0,
                "{key}"
            );
        }
        Ok(())
    }

    #[test]
    fn a_resumed_run_ends_where_an_unbroken_one_does_and_the_patch_reloads() -> Result<()> {
        let unet = tiny_model();
        let latents = moving_square(4);
        let text = text();
        let schedule = noise_schedule();
        let data = VmcData {
            latents: &latents,
            text: &text,
            noise_schedule: &schedule,
        };
        let dir = tempfile::tempdir().unwrap();
        let checkpointing = |name: &str| Checkpointing {
            path: dir.path().join(name),
            run: settings(0).describe_without_steps(),
        };
        let unbroken = customize_motion(
            &unet,
            &data,
            &settings(6),
            Some(&checkpointing("a.safetensors")),
            |_| Ok(()),
        )?;
        let half = customize_motion(
            &unet,
            &data,
            &settings(3),
            Some(&checkpointing("b.safetensors")),
            |_| Ok(()),
        )?;
        assert_eq!(half.losses[..], unbroken.losses[..3]);
        let resumed = customize_motion(
            &unet,
            &data,
            &settings(6),
            Some(&checkpointing("b.safetensors")),
            |_| Ok(()),
        )?;
        assert_eq!(resumed.resumed_at, 3);
        assert_eq!(resumed.losses, unbroken.losses);
        for (key, tensor) in &unbroken.patch {
            assert_eq!(
                crate::test_util::max_abs_diff(tensor, &resumed.patch[key]),
                0.0,
                "{key}"
            );
        }
        // A state of other settings is not resumed.
        let other = Checkpointing {
            path: dir.path().join("b.safetensors"),
            run: "another run".into(),
        };
        let fresh = customize_motion(&unet, &data, &settings(2), Some(&other), |_| Ok(()))?;
        assert_eq!(fresh.resumed_at, 0);

        let path = dir.path().join("patch.safetensors");
        candle_core::safetensors::save(
            &unbroken
                .patch
                .clone()
                .into_iter()
                .collect::<HashMap<_, _>>(),
            &path,
        )?;
        let reloaded = load_motion_patch(&path, &unet)?;
        let tuned = unet.with_weights(unbroken.patch.clone()).unwrap();
        let again = unet.with_weights(reloaded).unwrap();
        assert_eq!(
            crate::test_util::max_abs_diff(
                &forward(&tuned, &latents, &text),
                &forward(&again, &latents, &text)
            ),
            0.0
        );
        Ok(())
    }

    #[test]
    fn a_patch_for_another_motion_module_or_of_other_weights_is_refused() -> Result<()> {
        let unet = tiny_model();
        let dir = tempfile::tempdir().unwrap();
        let key = unet
            .motion()
            .unwrap()
            .weights()
            .keys()
            .find(|k| is_temporal_qkv(k) && k.ends_with(".to_q.weight"))
            .unwrap()
            .clone();
        let write = |name: &str, key: &str, shape: (usize, usize)| {
            let path = dir.path().join(name);
            let tensors = HashMap::from([(
                key.to_string(),
                Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap(),
            )]);
            candle_core::safetensors::save(&tensors, &path).unwrap();
            path
        };
        let wrong_shape =
            load_motion_patch(&write("shape.safetensors", &key, (3, 3)), &unet).unwrap_err();
        assert!(
            wrong_shape.to_string().contains("another motion module"),
            "{wrong_shape}"
        );
        let not_qkv = key.replace("to_q.weight", "to_out.0.weight");
        let error =
            load_motion_patch(&write("out.safetensors", &not_qkv, (32, 32)), &unet).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("not a temporal attention projection"),
            "{error}"
        );
        let unknown = key.replace("down_blocks.0", "down_blocks.7");
        let error = load_motion_patch(&write("unknown.safetensors", &unknown, (32, 32)), &unet)
            .unwrap_err();
        assert!(
            error.to_string().contains("another motion module"),
            "{error}"
        );
        Ok(())
    }

    /// The differentiable path the training takes (projections that are `Var`s) and the fused
    /// inference path agree on the forward.
    #[test]
    fn the_training_path_computes_the_inference_forward() -> Result<()> {
        let unet = tiny_model();
        let latents = moving_square(4);
        let text = text();
        let variables: NamedWeights = unet
            .motion()
            .unwrap()
            .weights()
            .iter()
            .filter(|(key, _)| is_temporal_qkv(key))
            .map(|(key, tensor)| {
                (
                    key.clone(),
                    Var::from_tensor(tensor).unwrap().as_tensor().clone(),
                )
            })
            .collect();
        let training = unet.with_weights(variables).unwrap();
        let trained_out = forward(&training, &latents, &text);
        let inference_out = forward(&unet, &latents, &text);
        let scale = inference_out.abs()?.max_all()?.to_scalar::<f32>()? as f64;
        let difference = crate::test_util::max_abs_diff(&trained_out, &inference_out);
        assert!(difference <= 1e-5 * scale.max(1.0), "{difference}");
        Ok(())
    }

    /// The frozen layers' fused kernels on the training path give the trained projections the
    /// gradients candle's own ops give them.
    #[test]
    fn the_fused_training_path_gives_the_composed_paths_gradients() -> Result<()> {
        let unet = tiny_model();
        let latents = moving_square(4);
        let text = text();
        let gradients = || -> Result<Vec<Tensor>> {
            let vars: Vec<(String, Var)> = unet
                .motion()
                .unwrap()
                .weights()
                .iter()
                .filter(|(key, _)| is_temporal_qkv(key))
                .map(|(key, tensor)| (key.clone(), Var::from_tensor(tensor).unwrap()))
                .collect();
            let model = unet
                .with_weights(
                    vars.iter()
                        .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                        .collect(),
                )
                .unwrap();
            let noise = (&latents * 0.5)?.sin()?;
            let predicted = forward(&model, &latents, &text);
            let grads = motion_loss(MotionLoss::Paper, &predicted, &noise, 0.5)?.backward()?;
            Ok(vars
                .iter()
                .map(|(_, v)| grads.get(v.as_tensor()).unwrap().clone())
                .collect())
        };
        let fused = gradients()?;
        let composed = crate::models::ops::with_composed_ops(gradients)?;
        for (a, b) in fused.iter().zip(&composed) {
            let scale = b.abs()?.max_all()?.to_scalar::<f32>()? as f64;
            let error = crate::test_util::max_abs_diff(a, b) / scale.max(1e-12);
            assert!(error < 1e-4, "relative error {error}");
        }
        Ok(())
    }

    /// A half-precision model trains f32 parameters, cast into its dtype at every step.
    #[test]
    fn a_half_precision_model_trains_f32_parameters() -> Result<()> {
        let unet = crate::video::test_models::tiny_motion_model(DType::F16);
        let latents = moving_square(4);
        let text = text();
        let schedule = noise_schedule();
        let data = VmcData {
            latents: &latents,
            text: &text,
            noise_schedule: &schedule,
        };
        let tuned = customize_motion(&unet, &data, &settings(3), None, |_| Ok(()))?;
        assert!(
            tuned.losses.iter().all(|l| l.is_finite()),
            "{:?}",
            tuned.losses
        );
        for (key, tensor) in &tuned.patch {
            assert_eq!(tensor.dtype(), DType::F32, "{key}");
            let before = unet.motion().unwrap().weights()[key].to_dtype(DType::F32)?;
            assert!(
                crate::test_util::max_abs_diff(tensor, &before) > 0.0,
                "{key} did not move"
            );
        }
        Ok(())
    }

    /// Autograd against central finite differences, in f64, on one motion module whose Q, K and
    /// V are the variables: with plain temporal attention, and with the motion-adaptive bias of
    /// amplitude 0.6 on its logits.
    #[test]
    fn temporal_attention_gradients_match_finite_differences() -> Result<()> {
        let weights: HashMap<String, Tensor> = motion_weights()
            .into_iter()
            .map(|(k, t)| (k, t.to_dtype(DType::F64).unwrap()))
            .collect();
        let slot = "up_blocks.1.motion_modules.0";
        let xs = Tensor::randn(0f64, 1.0, (4, 32, 2, 2), &Device::Cpu)?;
        let direction = Tensor::randn(0f64, 1.0, (4, 32, 2, 2), &Device::Cpu)?;
        for adaptive in [false, true] {
            let mut hook = AttentionHook::new();
            if adaptive {
                hook.push(ProcessorBinding {
                    prefix: "up_blocks.".into(),
                    kind: Some(AttentionKind::Temporal),
                    processor: Arc::new(MotionAdaptiveAttention::new(
                        MotionAdaptiveConfig::default(),
                    )),
                });
            }
            let vars: Vec<(String, Var)> = weights
                .iter()
                .filter(|(k, _)| k.starts_with(slot) && is_temporal_qkv(k))
                .map(|(k, t)| (k.clone(), Var::from_tensor(t).unwrap()))
                .collect();
            assert_eq!(vars.len(), 6, "two attentions × Q, K, V");
            let loss_with = |replaced: &NamedWeights| -> Result<Tensor> {
                let base = Arc::new(weights.clone().into_iter().collect::<NamedWeights>());
                let vb = crate::models::weights::overlay(
                    &base,
                    &Arc::new(replaced.clone()),
                    DType::F64,
                    &Device::Cpu,
                );
                let adapter = MotionAdapter::new(vb, &motion_config(), 8)?;
                let mut pass = ForwardPass::new(&hook);
                pass.frames = 4;
                pass.values.set(AMPLITUDE_VALUE, 0.6);
                let out = adapter.module(slot).unwrap().forward(&xs, 4, 1.0, &pass)?;
                (out * &direction)?.sum_all()
            };
            let as_tensors: NamedWeights = vars
                .iter()
                .map(|(k, v)| (k.clone(), v.as_tensor().clone()))
                .collect();
            let grads = loss_with(&as_tensors)?.backward()?;
            for (key, var) in &vars {
                let grad = grads
                    .get(var.as_tensor())
                    .expect("a gradient for every projection");
                let grad = grad.flatten_all()?.to_vec1::<f64>()?;
                let value = var.as_tensor().flatten_all()?.to_vec1::<f64>()?;
                for index in [0, 7, value.len() - 1] {
                    let eps = 1e-5;
                    let at = |delta: f64| -> f64 {
                        let mut moved = value.clone();
                        moved[index] += delta;
                        let mut replaced = as_tensors.clone();
                        replaced.insert(
                            key.clone(),
                            Tensor::from_vec(moved, var.dims(), &Device::Cpu).unwrap(),
                        );
                        loss_with(&replaced).unwrap().to_scalar::<f64>().unwrap()
                    };
                    let numeric = (at(eps) - at(-eps)) / (2.0 * eps);
                    let error = (grad[index] - numeric).abs() / numeric.abs().max(1e-3);
                    assert!(
                        error < 1e-4,
                        "{key}[{index}] (adaptive {adaptive}): autograd {} vs {numeric}",
                        grad[index]
                    );
                }
            }
        }
        Ok(())
    }
}
