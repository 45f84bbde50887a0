//! Training on candle's autograd: AdamW, learning-rate schedules, resumable checkpoints and
//! the step loop. Only the trained parameters are `Var`s; the frozen model stays plain
//! tensors, and the layers take their differentiable path wherever a gradient flows (see
//! `models::ops`).

pub mod optimizer;
pub mod state;

use std::path::{Path, PathBuf};
use std::time::Instant;

use candle_core::{DType, Result, Tensor, Var};

use crate::models::weights::NamedWeights;

pub use optimizer::{AdamW, AdamWConfig, LrSchedule, StepStats};
pub use state::{write_atomically, TrainingState};

/// Steps over which the progress report's running mean of the loss is taken.
pub const RUNNING_MEAN_STEPS: usize = 20;

/// How many steps, at what rate, and how often the state is saved.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct TrainPlan {
    pub steps: u64,
    pub learning_rate: f64,
    pub schedule: LrSchedule,
    /// Save the state every this many steps (and after the last); 0 saves only after the last.
    pub checkpoint_every: u64,
}

/// Where the state is saved and what run it belongs to.
#[derive(Debug, Clone)]
pub struct Checkpointing {
    pub path: PathBuf,
    /// A description of the run (settings and data); a saved state of another run is not
    /// resumed.
    pub run: String,
}

/// One finished step, for progress.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct StepReport {
    /// Steps done, 1 after the first.
    pub step: u64,
    pub steps: u64,
    pub loss: f64,
    /// The mean loss of the last [`RUNNING_MEAN_STEPS`] steps.
    pub running_mean: f64,
    pub learning_rate: f64,
    pub grad_norm: f64,
    /// Steps per second since this call started.
    pub steps_per_second: f64,
}

/// Hears of every finished step; an error from it stops the run (cancellation).
pub type OnStep<'a> = dyn FnMut(&StepReport) -> Result<()> + 'a;

impl StepReport {
    /// `loss 0.1234 (mean 0.1300) · 1.52 steps/s`, the text of a progress bar.
    pub fn summary(&self) -> String {
        format!(
            "loss {:.4} (mean {:.4}) · {:.2} steps/s",
            self.loss, self.running_mean, self.steps_per_second
        )
    }
}

/// Trainable f32 copies of `initial`, by name: the parameters and the optimiser's moments are
/// f32 whatever the model's dtype.
pub fn variables(
    initial: impl IntoIterator<Item = (String, Tensor)>,
) -> Result<Vec<(String, Var)>> {
    initial
        .into_iter()
        .map(|(name, tensor)| Ok((name, Var::from_tensor(&tensor.to_dtype(DType::F32)?)?)))
        .collect()
}

/// `variables` as the weights of a model of `dtype`, by name. For f32 they are the variables'
/// own tensors, which every optimiser step updates in place; another dtype gets a cast, which
/// carries the gradient back and must be taken again after each step.
pub fn as_weights(variables: &[(String, Var)], dtype: DType) -> Result<NamedWeights> {
    variables
        .iter()
        .map(|(name, var)| Ok((name.clone(), var.as_tensor().to_dtype(dtype)?)))
        .collect()
}

/// AdamW over `variables`, resumed from the state at `checkpointing` when there is one of this
/// run, and the losses of the steps already taken.
pub fn start(
    variables: Vec<(String, Var)>,
    config: AdamWConfig,
    checkpointing: Option<&Checkpointing>,
) -> Result<(AdamW, Vec<f64>)> {
    let mut optimizer = AdamW::new(variables, config)?;
    let losses = match checkpointing {
        Some(checkpointing) => resume(&mut optimizer, checkpointing)?,
        None => Vec::new(),
    };
    Ok((optimizer, losses))
}

/// Loads the state at `checkpointing.path` into `optimizer` when it is a state of the same run,
/// and returns its losses; a missing file, or one of another run, starts from step 0.
pub fn resume(optimizer: &mut AdamW, checkpointing: &Checkpointing) -> Result<Vec<f64>> {
    if !checkpointing.path.exists() {
        return Ok(Vec::new());
    }
    let device = optimizer
        .vars()
        .next()
        .map(|(_, var)| var.device().clone())
        .unwrap_or(candle_core::Device::Cpu);
    let state = TrainingState::load(&checkpointing.path, &device)?;
    if state.run != checkpointing.run {
        return Ok(Vec::new());
    }
    state.restore_into(optimizer)?;
    Ok(state.losses)
}

/// Runs the steps from `optimizer.steps_taken()` to `plan.steps`: each takes the loss that
/// `loss_at(step)` builds (step counted from 0), back-propagates it, and updates the
/// parameters. `losses` holds the loss of every step taken and grows by one per step;
/// `on_step` hears of each (an error from it stops the run, as cancelling does). The state is
/// saved as `plan.checkpoint_every` says, so a crash loses at most the steps since.
pub fn train(
    optimizer: &mut AdamW,
    plan: &TrainPlan,
    losses: &mut Vec<f64>,
    checkpointing: Option<&Checkpointing>,
    mut loss_at: impl FnMut(u64) -> Result<Tensor>,
    mut on_step: impl FnMut(&StepReport) -> Result<()>,
) -> Result<()> {
    let started = Instant::now();
    let first = optimizer.steps_taken();
    for step in first..plan.steps {
        let loss = loss_at(step)?;
        let value = loss.to_dtype(DType::F64)?.to_scalar::<f64>()?;
        if !value.is_finite() {
            candle_core::bail!(
                "the loss is {value} at step {} (a learning rate of {} may be too high)",
                step + 1,
                plan.learning_rate
            )
        }
        let grads = loss.backward()?;
        let learning_rate = plan.learning_rate * plan.schedule.factor(step);
        let stats = optimizer.step(&grads, learning_rate)?;
        drop(grads);
        losses.push(value);
        let done = step + 1;
        if let Some(checkpointing) = checkpointing {
            let due = plan.checkpoint_every > 0 && done % plan.checkpoint_every == 0;
            if due || done == plan.steps {
                TrainingState::of(optimizer, losses, &checkpointing.run)
                    .save(&checkpointing.path)?;
            }
        }
        let recent = &losses[losses.len().saturating_sub(RUNNING_MEAN_STEPS)..];
        let elapsed = started.elapsed().as_secs_f64().max(1e-9);
        on_step(&StepReport {
            step: done,
            steps: plan.steps,
            loss: value,
            running_mean: recent.iter().sum::<f64>() / recent.len() as f64,
            learning_rate,
            grad_norm: stats.grad_norm,
            steps_per_second: (done - first) as f64 / elapsed,
        })?;
    }
    Ok(())
}

/// Writes `step,loss` lines (steps from 1) to `path`, atomically.
pub fn write_loss_csv(path: &Path, losses: &[f64]) -> Result<()> {
    let mut text = String::from("step,loss\n");
    for (i, loss) in losses.iter().enumerate() {
        text.push_str(&format!("{},{loss}\n", i + 1));
    }
    write_atomically(path, text.as_bytes())
}
