//! Training checkpoints: the trained parameters, AdamW's moments, the step count and the loss
//! of every step so far, in one safetensors file, written atomically. Resuming from one
//! continues bit for bit: every step's randomness derives from the run's seed and the step
//! number, so no generator state needs saving.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Result, Tensor};
use safetensors::SafeTensors;

use super::optimizer::AdamW;
use crate::models::weights::NamedWeights;

const VALUE_PREFIX: &str = "param/";
const FIRST_MOMENT_PREFIX: &str = "adamw.exp_avg/";
const SECOND_MOMENT_PREFIX: &str = "adamw.exp_avg_sq/";
const LOSSES_KEY: &str = "losses";
/// Header keys.
const FORMAT_KEY: &str = "format";
const FORMAT: &str = "vdm-training-state";
const STEPS_KEY: &str = "steps_taken";
const RUN_KEY: &str = "run";

/// A saved training state.
pub struct TrainingState {
    pub steps_taken: u64,
    pub values: NamedWeights,
    pub first_moments: NamedWeights,
    pub second_moments: NamedWeights,
    /// The loss of every step taken, in order.
    pub losses: Vec<f64>,
    /// What the run was (settings, data): a state resumes only the same run.
    pub run: String,
}

impl TrainingState {
    /// The optimiser's state after its last step, with `losses` and the run's description.
    pub fn of(optimizer: &AdamW, losses: &[f64], run: &str) -> Self {
        let (first_moments, second_moments) = optimizer.moments();
        Self {
            steps_taken: optimizer.steps_taken(),
            values: optimizer.parameters(),
            first_moments,
            second_moments,
            losses: losses.to_vec(),
            run: run.to_string(),
        }
    }

    /// Writes the state to `path` through a temporary file in the same folder, so a crash
    /// leaves the previous state whole.
    pub fn save(&self, path: &Path) -> Result<()> {
        let mut tensors: Vec<(String, Tensor)> = Vec::new();
        for (prefix, table) in [
            (VALUE_PREFIX, &self.values),
            (FIRST_MOMENT_PREFIX, &self.first_moments),
            (SECOND_MOMENT_PREFIX, &self.second_moments),
        ] {
            for (name, tensor) in table {
                tensors.push((format!("{prefix}{name}"), tensor.to_device(&Device::Cpu)?));
            }
        }
        tensors.push((
            LOSSES_KEY.to_string(),
            Tensor::new(self.losses.as_slice(), &Device::Cpu)?,
        ));
        let header = HashMap::from([
            (FORMAT_KEY.to_string(), FORMAT.to_string()),
            (STEPS_KEY.to_string(), self.steps_taken.to_string()),
            (RUN_KEY.to_string(), self.run.clone()),
        ]);
        let bytes = safetensors::serialize(tensors, Some(header))
            .map_err(|e| candle_core::Error::Msg(format!("{}: {e}", path.display())))?;
        write_atomically(path, &bytes)
    }

    /// Reads a state written by [`TrainingState::save`], its tensors on `device`.
    pub fn load(path: &Path, device: &Device) -> Result<Self> {
        let context =
            |message: String| candle_core::Error::Msg(format!("{}: {message}", path.display()));
        let bytes = std::fs::read(path).map_err(|e| context(e.to_string()))?;
        let (_, header) = SafeTensors::read_metadata(&bytes)
            .map_err(|e| context(format!("not a safetensors file ({e})")))?;
        let metadata = header.metadata().clone().unwrap_or_default();
        if metadata.get(FORMAT_KEY).map(String::as_str) != Some(FORMAT) {
            return Err(context("not a vdm training state".into()));
        }
        let steps_taken = metadata
            .get(STEPS_KEY)
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| context(format!("no `{STEPS_KEY}` in the header")))?;
        let run = metadata.get(RUN_KEY).cloned().unwrap_or_default();
        let tensors = candle_core::safetensors::load_buffer(&bytes, device)?;
        let mut state = Self {
            steps_taken,
            values: NamedWeights::new(),
            first_moments: NamedWeights::new(),
            second_moments: NamedWeights::new(),
            losses: Vec::new(),
            run,
        };
        for (key, tensor) in tensors {
            if key == LOSSES_KEY {
                state.losses = tensor.to_vec1::<f64>()?;
            } else if let Some(name) = key.strip_prefix(VALUE_PREFIX) {
                state.values.insert(name.to_string(), tensor);
            } else if let Some(name) = key.strip_prefix(FIRST_MOMENT_PREFIX) {
                state.first_moments.insert(name.to_string(), tensor);
            } else if let Some(name) = key.strip_prefix(SECOND_MOMENT_PREFIX) {
                state.second_moments.insert(name.to_string(), tensor);
            }
        }
        if state.losses.len() as u64 != steps_taken {
            return Err(context(format!(
                "{} losses for {steps_taken} steps",
                state.losses.len()
            )));
        }
        Ok(state)
    }

    /// Puts the saved values and moments into `optimizer`.
    pub fn restore_into(&self, optimizer: &mut AdamW) -> Result<()> {
        optimizer.restore(
            &self.values,
            (&self.first_moments, &self.second_moments),
            self.steps_taken,
        )
    }
}

/// Writes `bytes` to `path` through a temporary file beside it, synced before the rename.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> Result<()> {
    let io = |what: &Path, e: std::io::Error| {
        candle_core::Error::Msg(format!("{}: {e}", what.display()))
    };
    let folder = path.parent().unwrap_or(Path::new("."));
    std::fs::create_dir_all(folder).map_err(|e| io(folder, e))?;
    let name = path
        .file_name()
        .map_or_else(String::new, |n| n.to_string_lossy().into_owned());
    let temp: PathBuf = folder.join(format!(".{name}.{}.tmp", std::process::id()));
    let written = std::fs::write(&temp, bytes)
        .and_then(|()| std::fs::File::open(&temp)?.sync_all())
        .and_then(|()| std::fs::rename(&temp, path));
    if let Err(e) = written {
        let _ = std::fs::remove_file(&temp);
        return Err(io(path, e));
    }
    Ok(())
}
