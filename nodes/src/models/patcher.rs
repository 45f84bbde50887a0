//! A frozen UNet plus an ordered list of patches, as ComfyUI's model patcher: applying a
//! motion module, an attention processor, a feature tap or a weight override returns a new
//! [`PatchedUNet`] that shares the base weights, so cached and branching workflows never see
//! each other's changes.

use std::collections::BTreeMap;
use std::sync::Arc;

use candle_core::{Result, Tensor};

use super::attention::{
    AttentionHook, AttentionKind, AttentionObserver, AttentionProcessor, ProcessorBinding,
};
use super::call::{FeatureTap, ForwardPass};
use super::motion::{ModuleGate, MotionAdapter, MotionPatch};
use super::temporal_adapter::TemporalAdapter;
use super::unet::{UNet2DConditionModel, UNetPatches};
use super::weights::{self, NamedWeights};

pub use super::unet::UNetInputs;

/// Motion modules applied at their slots, with a scale and an optional per-module gate.
#[derive(Clone)]
pub struct MotionModules {
    pub adapter: Arc<MotionAdapter>,
    /// Multiplies every module's residual (1 = diffusers, 0 = the image UNet).
    pub scale: f64,
    pub gate: Option<Arc<dyn ModuleGate>>,
}

/// One change to the frozen UNet.
#[derive(Clone)]
pub enum Patch {
    /// Motion modules, run in patch order at the slots they have.
    Motion(MotionModules),
    /// An attention processor on the layers it addresses; later bindings win.
    Attention(ProcessorBinding),
    /// A tap on the activations of every forward.
    Tap(Arc<dyn FeatureTap>),
    /// An observer of every attention call (probes), whichever processor runs it.
    Observer(Arc<dyn AttentionObserver>),
    /// A factor on the residual of every motion module applied, before or after, multiplied
    /// into each one's own gate (a motion-aware gate on the temporal branch).
    Gate(Arc<dyn ModuleGate>),
    /// Weights replaced by checkpoint key, in the UNet or in the motion modules applied before
    /// or after (LoRA deltas merged into a weight, tuned projections, trainable `Var`s).
    Weights(Arc<NamedWeights>),
    /// Lightweight temporal modules after every spatial transformer (Hong & Quan), run in patch
    /// order; weight overrides of their keys apply to them.
    TemporalAdapter(Arc<TemporalAdapter>),
}

impl Patch {
    fn describe(&self) -> String {
        match self {
            Patch::Motion(m) => format!("motion modules (scale {})", m.scale),
            Patch::Attention(b) => format!("attention processor on `{}`", b.prefix),
            Patch::Tap(_) => "feature tap".to_string(),
            Patch::Observer(_) => "attention observer".to_string(),
            Patch::Gate(_) => "motion-module gate".to_string(),
            Patch::Weights(w) => format!("{} weight overrides", w.len()),
            Patch::TemporalAdapter(a) => {
                format!("temporal adapter ({} modules)", a.modules().len())
            }
        }
    }
}

/// A UNet with its patches, and what they resolve to: the UNet and motion modules with the
/// weight overrides in place, the processors and the taps.
#[derive(Clone)]
pub struct PatchedUNet {
    base: Arc<UNet2DConditionModel>,
    patches: Vec<Patch>,
    unet: Arc<UNet2DConditionModel>,
    motion: Vec<MotionModules>,
    hook: AttentionHook,
    taps: Vec<Arc<dyn FeatureTap>>,
    gates: Vec<Arc<dyn ModuleGate>>,
    /// The temporal adapters applied, with the weight overrides in place.
    adapters: Vec<Arc<TemporalAdapter>>,
}

impl std::fmt::Debug for PatchedUNet {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let patches: Vec<String> = self.patches.iter().map(Patch::describe).collect();
        f.debug_struct("PatchedUNet")
            .field("patches", &patches)
            .finish()
    }
}

impl PatchedUNet {
    pub fn new(base: Arc<UNet2DConditionModel>) -> Self {
        Self {
            unet: base.clone(),
            base,
            patches: Vec::new(),
            motion: Vec::new(),
            hook: AttentionHook::new(),
            taps: Vec::new(),
            gates: Vec::new(),
            adapters: Vec::new(),
        }
    }

    /// The frozen UNet, without weight overrides.
    pub fn base(&self) -> &UNet2DConditionModel {
        &self.base
    }

    /// The patches, in the order they apply.
    pub fn patches(&self) -> &[Patch] {
        &self.patches
    }

    /// The first motion modules applied (the AnimateDiff module of the usual workflow), with the
    /// weight overrides in place.
    pub fn motion(&self) -> Option<&MotionAdapter> {
        self.motion.first().map(|m| m.adapter.as_ref())
    }

    /// Whether motion modules for UNet channels `motion_channels` (per block) can fit this UNet:
    /// checked from a config before any weight is read.
    pub fn check_motion_channels(
        &self,
        motion_channels: &[usize],
    ) -> std::result::Result<(), String> {
        let unet_channels = &self.base.config().block_out_channels;
        if unet_channels.as_slice() != motion_channels {
            return Err(format!(
                "the motion module is for UNet channels {motion_channels:?}, this UNet has {unet_channels:?} \
                 (an SD 1.x motion module needs an SD 1.x checkpoint)"
            ));
        }
        Ok(())
    }

    /// The same UNet with one more patch. Processors, taps and gates change nothing already
    /// resolved, so only motion modules and weight overrides resolve the patches again.
    pub fn with_patch(&self, patch: Patch) -> std::result::Result<Self, String> {
        let mut patched = self.clone();
        match &patch {
            Patch::Attention(binding) => patched.hook.push(binding.clone()),
            Patch::Tap(tap) => patched.taps.push(tap.clone()),
            Patch::Observer(observer) => patched.hook.push_observer(observer.clone()),
            Patch::Gate(gate) => patched.gates.push(gate.clone()),
            Patch::Motion(_) | Patch::Weights(_) | Patch::TemporalAdapter(_) => {
                if let Patch::Motion(m) = &patch {
                    self.base.check_motion(&m.adapter)?;
                }
                if let Patch::TemporalAdapter(adapter) = &patch {
                    adapter.check_fits(self.base.weights())?;
                }
                let mut patches = self.patches.clone();
                patches.push(patch);
                return Self::resolve(self.base.clone(), patches).map_err(|e| e.to_string());
            }
        }
        patched.patches.push(patch);
        Ok(patched)
    }

    /// The same UNet with `adapter`'s motion modules in place of any motion modules applied
    /// before, their residuals scaled by `scale`. Fails when the adapter does not fit this UNet.
    pub fn with_motion(
        &self,
        adapter: Arc<MotionAdapter>,
        scale: f64,
    ) -> std::result::Result<Self, String> {
        self.base.check_motion(&adapter)?;
        let mut patches: Vec<Patch> = self
            .patches
            .iter()
            .filter(|p| !matches!(p, Patch::Motion(_)))
            .cloned()
            .collect();
        patches.push(Patch::Motion(MotionModules {
            adapter,
            scale,
            gate: None,
        }));
        Self::resolve(self.base.clone(), patches).map_err(|e| e.to_string())
    }

    /// The same UNet with `adapter`'s temporal modules in place of any temporal adapter applied
    /// before. Fails when the adapter does not fit this UNet.
    pub fn with_temporal_adapter(
        &self,
        adapter: Arc<TemporalAdapter>,
    ) -> std::result::Result<Self, String> {
        adapter.check_fits(self.base.weights())?;
        let mut patches: Vec<Patch> = self
            .patches
            .iter()
            .filter(|p| !matches!(p, Patch::TemporalAdapter(_)))
            .cloned()
            .collect();
        patches.push(Patch::TemporalAdapter(adapter));
        Self::resolve(self.base.clone(), patches).map_err(|e| e.to_string())
    }

    /// The first temporal adapter applied, with the weight overrides in place.
    pub fn temporal_adapter(&self) -> Option<&TemporalAdapter> {
        self.adapters.first().map(|a| a.as_ref())
    }

    /// The same UNet with `processor` on every attention layer whose path starts with `prefix`.
    pub fn with_processor(
        &self,
        prefix: &str,
        kind: Option<AttentionKind>,
        processor: Arc<dyn AttentionProcessor>,
    ) -> Self {
        let mut patched = self.clone();
        let binding = ProcessorBinding {
            prefix: prefix.to_string(),
            kind,
            processor,
        };
        patched.hook.push(binding.clone());
        patched.patches.push(Patch::Attention(binding));
        patched
    }

    /// The same UNet with the weights of `replaced` in place, by checkpoint key. Every key must
    /// name a weight of the UNet or of the motion modules applied.
    pub fn with_weights(&self, replaced: NamedWeights) -> std::result::Result<Self, String> {
        self.with_patch(Patch::Weights(Arc::new(replaced)))
    }

    /// Resolves `patches` on `base`: weight overrides (later ones win) go into rebuilt copies of
    /// the UNet and of the motion modules that have those keys.
    fn resolve(base: Arc<UNet2DConditionModel>, patches: Vec<Patch>) -> Result<Self> {
        let mut replaced = NamedWeights::new();
        let mut motion = Vec::new();
        let mut hook = AttentionHook::new();
        let mut taps = Vec::new();
        let mut gates = Vec::new();
        let mut adapters = Vec::new();
        for patch in &patches {
            match patch {
                Patch::Motion(m) => motion.push(m.clone()),
                Patch::Attention(binding) => hook.push(binding.clone()),
                Patch::Tap(tap) => taps.push(tap.clone()),
                Patch::Observer(observer) => hook.push_observer(observer.clone()),
                Patch::Gate(gate) => gates.push(gate.clone()),
                Patch::Weights(w) => replaced.extend(w.iter().map(|(k, t)| (k.clone(), t.clone()))),
                Patch::TemporalAdapter(a) => adapters.push(a.clone()),
            }
        }
        let mut unet = base.clone();
        if !replaced.is_empty() {
            let mut unclaimed: BTreeMap<&str, ()> =
                replaced.keys().map(|k| (k.as_str(), ())).collect();
            let for_unet = weights::matching(base.weights(), &replaced)?;
            if !for_unet.is_empty() {
                for key in for_unet.keys() {
                    unclaimed.remove(key.as_str());
                }
                unet = Arc::new(base.with_weights(&Arc::new(for_unet))?);
            }
            for modules in &mut motion {
                let for_motion = weights::matching(modules.adapter.weights(), &replaced)?;
                if !for_motion.is_empty() {
                    for key in for_motion.keys() {
                        unclaimed.remove(key.as_str());
                    }
                    let adapter = modules.adapter.with_weights(&Arc::new(for_motion))?;
                    modules.adapter = Arc::new(adapter);
                }
            }
            for adapter in &mut adapters {
                let for_adapter = weights::matching(adapter.weights(), &replaced)?;
                if !for_adapter.is_empty() {
                    for key in for_adapter.keys() {
                        unclaimed.remove(key.as_str());
                    }
                    *adapter = Arc::new(adapter.with_weights(&Arc::new(for_adapter))?);
                }
            }
            if let Some((key, _)) = unclaimed.first_key_value() {
                candle_core::bail!(
                    "weight override `{key}` names no weight of the UNet, of its motion modules \
                     or of its temporal adapter"
                )
            }
        }
        Ok(Self {
            base,
            patches,
            unet,
            motion,
            hook,
            taps,
            gates,
            adapters,
        })
    }

    /// Predicts the noise of `inputs.sample`, (B, C_out, F, H, W).
    pub fn forward(&self, inputs: &UNetInputs) -> Result<Tensor> {
        let chains: Vec<GateChain> = self
            .motion
            .iter()
            .map(|m| GateChain {
                own: m.gate.as_deref(),
                shared: &self.gates,
            })
            .collect();
        let motion: Vec<MotionPatch> = self
            .motion
            .iter()
            .zip(&chains)
            .map(|(m, chain)| MotionPatch {
                adapter: &m.adapter,
                scale: m.scale,
                gate: chain.as_gate(),
            })
            .collect();
        let taps: Vec<&dyn FeatureTap> = self.taps.iter().map(|t| t.as_ref()).collect();
        let patches = UNetPatches {
            hook: &self.hook,
            motion: &motion,
            taps: &taps,
        };
        let adapters: Vec<&TemporalAdapter> = self.adapters.iter().map(|a| a.as_ref()).collect();
        self.unet.forward_with_adapters(inputs, &patches, &adapters)
    }

    /// Every attention layer of the UNet and of the motion modules applied, by diffusers path
    /// (`down_blocks.0.attentions.0.transformer_blocks.0.attn1`), with its kind, in key order.
    /// Read from the checkpoint keys: a layer is where a `to_q` projection is.
    pub fn attention_layers(&self) -> Vec<(String, AttentionKind)> {
        let keys = self
            .unet
            .weights()
            .keys()
            .chain(self.motion.iter().flat_map(|m| m.adapter.weights().keys()));
        let mut layers: Vec<(String, AttentionKind)> = keys
            .filter_map(|key| key.strip_suffix(".to_q.weight"))
            .map(|layer| {
                let kind = if layer.contains(".motion_modules.") {
                    AttentionKind::Temporal
                } else if layer.ends_with("attn2") {
                    AttentionKind::Cross
                } else {
                    AttentionKind::SpatialSelf
                };
                (layer.to_string(), kind)
            })
            .collect();
        layers.sort();
        layers.dedup();
        layers
    }

    /// The most frames one call can see (the shortest positional table of the motion modules
    /// and temporal adapters applied), if bounded.
    pub fn max_frames(&self) -> Option<usize> {
        self.motion
            .iter()
            .map(|m| m.adapter.config().motion_max_seq_length)
            .chain(self.adapters.iter().map(|a| a.config().max_frames))
            .min()
    }
}

/// A motion patch's own gate followed by the gates of [`Patch::Gate`], multiplied.
struct GateChain<'a> {
    own: Option<&'a dyn ModuleGate>,
    shared: &'a [Arc<dyn ModuleGate>],
}

impl<'a> GateChain<'a> {
    /// The chain as one gate, or none when there is nothing to multiply (so an ungated patch
    /// stays exactly as it was).
    fn as_gate(&'a self) -> Option<&'a dyn ModuleGate> {
        match (self.own, self.shared.is_empty()) {
            (own, true) => own,
            _ => Some(self),
        }
    }
}

impl ModuleGate for GateChain<'_> {
    fn gate(&self, slot: &str, pass: &ForwardPass) -> Result<f64> {
        let mut factor = match self.own {
            Some(gate) => gate.gate(slot, pass)?,
            None => 1.0,
        };
        for gate in self.shared {
            factor *= gate.gate(slot, pass)?;
        }
        Ok(factor)
    }
}
