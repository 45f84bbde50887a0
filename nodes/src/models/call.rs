//! What one model call knows of the run around it: the sampling step, how the batch is laid out
//! for guidance, which frames are evaluated, and the state the run keeps.
//!
//! A loaded model is cached and shared between runs and branches of a workflow, so nothing a
//! run records (entropies, attention maps kept for injection, evaluation counts) may live in the
//! model or its patches: it lives in the [`RunObserver`] that the run owns and passes down
//! with every call.

use std::any::{Any, TypeId};
use std::collections::HashMap;
use std::sync::Mutex;

use candle_core::{Result, Tensor};

use super::attention::AttentionHook;

/// The sampling step a model call belongs to.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SamplingStep {
    /// 0-based index of the step in the run (FreeInit passes count on).
    pub index: usize,
    /// Steps of the run in all.
    pub count: usize,
    /// The timestep the model is conditioned on at this step.
    pub timestep: f64,
}

impl SamplingStep {
    /// The position of this step in the run, in [0, 1): ComfyUI's `start_percent` /
    /// `end_percent` are compared with it.
    pub fn fraction(&self) -> f64 {
        self.index as f64 / self.count.max(1) as f64
    }
}

/// How the videos of a batch relate under classifier-free guidance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum GuidanceLayout {
    /// Every video is conditioned on its own prompt; no guidance pairs.
    #[default]
    Conditional,
    /// The first half of the batch is unconditional (negative prompt), the second half the
    /// conditional copies of the same latents, as diffusers' pipelines batch them.
    UncondThenCond,
}

impl GuidanceLayout {
    /// Whether video `b` of a batch of `batch` videos is an unconditional (negative) branch.
    pub fn is_unconditional(&self, b: usize, batch: usize) -> bool {
        matches!(self, Self::UncondThenCond) && b < batch / 2
    }

    /// Model evaluations per video of the run: 2 with guidance, else 1.
    pub fn branches(&self) -> usize {
        match self {
            Self::Conditional => 1,
            Self::UncondThenCond => 2,
        }
    }
}

/// State that one run keeps for the processors and patches that act in it, each value found
/// by its type and a key (usually the path of the layer that wrote it). Processors are shared
/// by every run of a cached model; what they record goes here.
#[derive(Default)]
pub struct RunObserver {
    slots: Mutex<HashMap<(TypeId, String), Box<dyn Any + Send>>>,
}

impl std::fmt::Debug for RunObserver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let len = self.slots.lock().map(|s| s.len()).unwrap_or(0);
        f.debug_struct("RunObserver").field("slots", &len).finish()
    }
}

impl RunObserver {
    pub fn new() -> Self {
        Self::default()
    }

    /// Runs `f` on the value of type `T` under `key`, made with `T::default()` on first use.
    pub fn with<T: Default + Send + 'static, R>(
        &self,
        key: &str,
        f: impl FnOnce(&mut T) -> R,
    ) -> R {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let slot = slots
            .entry((TypeId::of::<T>(), key.to_string()))
            .or_insert_with(|| Box::new(T::default()));
        match slot.downcast_mut::<T>() {
            Some(value) => f(value),
            // The key includes the TypeId, so the box always holds a T.
            None => unreachable!("run observer slot of the wrong type"),
        }
    }

    /// A copy of the value of type `T` under `key`, if one was written.
    pub fn get<T: Clone + 'static>(&self, key: &str) -> Option<T> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        slots
            .get(&(TypeId::of::<T>(), key.to_string()))
            .and_then(|b| b.downcast_ref::<T>())
            .cloned()
    }

    /// Removes and returns the value of type `T` under `key`.
    pub fn take<T: 'static>(&self, key: &str) -> Option<T> {
        let mut slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let boxed = slots.remove(&(TypeId::of::<T>(), key.to_string()))?;
        boxed.downcast::<T>().ok().map(|b| *b)
    }

    /// Every key under which a value of type `T` was written, sorted.
    pub fn keys<T: 'static>(&self) -> Vec<String> {
        let slots = self.slots.lock().unwrap_or_else(|e| e.into_inner());
        let mut keys: Vec<String> = slots
            .keys()
            .filter(|(ty, _)| *ty == TypeId::of::<T>())
            .map(|(_, k)| k.clone())
            .collect();
        keys.sort();
        keys
    }
}

/// Values computed earlier in the same forward pass for later layers to read, such as a
/// motion amplitude estimated from the lowest-resolution features and read by the up blocks'
/// temporal attention. Made empty for every forward.
#[derive(Debug, Default)]
pub struct ForwardValues {
    values: Mutex<HashMap<String, f64>>,
    output_scales: Mutex<HashMap<String, f64>>,
}

impl ForwardValues {
    /// Asks attention layer `layer` to multiply its projected output (after `to_out`, before
    /// any residual) by `scale`: a processor's result is taken before the output projection,
    /// whose bias a scale there would miss (Enhance-A-Video scales after it).
    pub fn scale_output(&self, layer: &str, scale: f64) {
        let mut scales = self.output_scales.lock().unwrap_or_else(|e| e.into_inner());
        scales.insert(layer.to_string(), scale);
    }

    /// The scale a processor asked of `layer` during this call, removed.
    pub fn take_output_scale(&self, layer: &str) -> Option<f64> {
        let mut scales = self.output_scales.lock().unwrap_or_else(|e| e.into_inner());
        if scales.is_empty() {
            return None;
        }
        scales.remove(layer)
    }

    pub fn set(&self, name: &str, value: f64) {
        let mut values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.insert(name.to_string(), value);
    }

    pub fn get(&self, name: &str) -> Option<f64> {
        let values = self.values.lock().unwrap_or_else(|e| e.into_inner());
        values.get(name).copied()
    }
}

/// Something that looks at the activations of a forward pass at its named points (diffusers
/// module paths: `time_embedding`, `conv_in`, `down_blocks.0.resnets.0`,
/// `down_blocks.0.attentions.0`, `down_blocks.0.motion_modules.0`, `down_blocks.N`,
/// `mid_block`, `up_blocks.N`), e.g. to record them or to estimate a value for later layers
/// ([`ForwardPass::values`]). Taps observe; they never change the activations.
pub trait FeatureTap: Send + Sync {
    /// `xs` is (batch·frames, C, H, W), except `time_embedding` (batch, T).
    fn observe(&self, point: &str, xs: &Tensor, pass: &ForwardPass) -> Result<()>;
}

/// Everything one forward pass of a model carries to its layers besides the activations: the
/// attention processors, what the call knows of the run, and the values and taps of this pass.
pub struct ForwardPass<'a> {
    pub hook: &'a AttentionHook,
    pub step: Option<SamplingStep>,
    pub guidance: GuidanceLayout,
    /// Frames per video in the call: activations are (videos·frames, …), each video's frames
    /// together.
    pub frames: usize,
    /// The position in the clip of each frame of the call, when not 0, 1, …, F−1.
    pub frame_positions: Option<&'a [usize]>,
    pub run: Option<&'a RunObserver>,
    pub values: ForwardValues,
    pub taps: Vec<&'a dyn FeatureTap>,
}

impl<'a> ForwardPass<'a> {
    /// The position in the clip of each of the call's frames: `frame_positions`, or 0, 1, …,
    /// F−1 when not given.
    pub fn positions(&self) -> Vec<usize> {
        match self.frame_positions {
            Some(positions) => positions.to_vec(),
            None => (0..self.frames).collect(),
        }
    }

    /// A pass of single frames outside any sampling run, with the processors of `hook`.
    pub fn new(hook: &'a AttentionHook) -> Self {
        Self {
            hook,
            step: None,
            guidance: GuidanceLayout::default(),
            frames: 1,
            frame_positions: None,
            run: None,
            values: ForwardValues::default(),
            taps: Vec::new(),
        }
    }

    /// Shows the activation at `point` to every tap; the name is only built when a tap listens.
    pub fn observe(&self, point: impl FnOnce() -> String, xs: &Tensor) -> Result<()> {
        if self.taps.is_empty() {
            return Ok(());
        }
        let point = point();
        self.taps
            .iter()
            .try_for_each(|tap| tap.observe(&point, xs, self))
    }
}

/// Named activations captured during a forward pass, keyed by diffusers module path (the points
/// of [`FeatureTap`]).
#[derive(Debug, Default)]
pub struct ActivationRecorder {
    activations: Mutex<HashMap<String, Tensor>>,
}

impl ActivationRecorder {
    pub fn new() -> Self {
        Self::default()
    }

    /// The recorded activation of module `name`, if the forward pass went through it.
    pub fn get(&self, name: &str) -> Option<Tensor> {
        let activations = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        activations.get(name).cloned()
    }

    /// Every recorded module path, sorted.
    pub fn names(&self) -> Vec<String> {
        let activations = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        let mut names: Vec<String> = activations.keys().cloned().collect();
        names.sort();
        names
    }
}

impl FeatureTap for ActivationRecorder {
    fn observe(&self, point: &str, xs: &Tensor, _pass: &ForwardPass) -> Result<()> {
        let mut activations = self.activations.lock().unwrap_or_else(|e| e.into_inner());
        activations.insert(point.to_string(), xs.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn values_are_kept_by_type_and_key() {
        let run = RunObserver::new();
        run.with::<Vec<f64>, _>("a", |v| v.push(1.0));
        run.with::<Vec<f64>, _>("a", |v| v.push(2.0));
        run.with::<usize, _>("a", |n| *n += 3);
        assert_eq!(run.get::<Vec<f64>>("a"), Some(vec![1.0, 2.0]));
        assert_eq!(run.get::<usize>("a"), Some(3));
        assert_eq!(run.keys::<usize>(), vec!["a".to_string()]);
        assert_eq!(run.take::<usize>("a"), Some(3));
        assert_eq!(run.get::<usize>("a"), None);
    }
}
