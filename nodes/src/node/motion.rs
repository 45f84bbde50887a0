//! Motion of a clip: `MotionEstimator` (dense optical flow), `MOTION` files with `SaveMotion`
//! and `LoadMotion`, and `TemporalAttentionInjector`, which adapts a model's temporal attention
//! to the motion (and applies a trained temporal adapter).

use std::path::Path;
use std::sync::Arc;

use serde_json::json;

use crate::models::patcher::PatchedUNet;
use crate::models::temporal_adapter::TemporalAdapter;

use crate::video::motion::{
    estimate_motion, flow_preview, load_motion, save_motion, FlowMethod, LucasKanadeConfig,
    AMPLITUDE_KAPPA,
};

use crate::video::motion_adaptive::{
    apply_motion_adaptive, Amplitude, ClipReference, MotionAdaptiveConfig, ReceptiveField,
};

use super::models::{check_model, resolve_model};
use super::objects::{Model, Motion};
use super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Node, NodeFailure, Outputs, PluginType,
};

/// The folders of the models folder where trained temporal adapters are looked for.
const TEMPORAL_ADAPTER_FOLDERS: &[&str] = &["temporal_adapters"];

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(MotionEstimator),
        Box::new(SaveMotion),
        Box::new(LoadMotion),
        Box::new(TemporalAttentionInjector),
    ]
}

struct MotionEstimator;

impl Node for MotionEstimator {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let defaults = LucasKanadeConfig::default();
        let description = format!(
            "Dense optical flow between consecutive frames (pyramidal, iterative Lucas–Kanade on \
             luminance). MOTION holds the forward flow (frames−1, 2, H, W) in pixels (x right, y \
             down; a point at p in frame f is at p + flow in frame f+1), its magnitude and the \
             clip amplitude. IMAGE previews the flow: hue is the direction, brightness the \
             magnitude over the clip's 99th percentile. amplitude m = clamp(mean |flow| / (κ · \
             min(width, height)), 0, 1) with κ = {AMPLITUDE_KAPPA}: 0 for a still clip, 1 once \
             things move 5% of the short side per frame."
        );
        DescriptorBuilder::new("MotionEstimator", "Motion Estimator", "vdm/motion")
            .description(&description)
            .object("images", "IMAGE", "The clip, at least 2 frames.")
            .optional()
            .combo(
                "method",
                &FlowMethod::NAMES,
                "lucas-kanade: pyramidal iterative Lucas–Kanade with a Gaussian window.",
            )
            .int(
                "levels",
                defaults.levels as i64,
                1,
                8,
                "Pyramid levels; each doubles the largest motion followed. Fewer are used when the coarsest level would be under 16 pixels.",
            )
            .int(
                "window",
                defaults.window as i64,
                3,
                63,
                "Window in pixels (rounded up to odd): larger is steadier on noise and flat areas, smaller keeps motion boundaries sharper.",
            )
            .int(
                "iterations",
                defaults.iterations as i64,
                1,
                50,
                "Warp-and-solve iterations per pyramid level (stops early once converged).",
            )
            .output("MOTION", "MOTION")
            .output("IMAGE", "flow_preview")
            .output("FLOAT", "amplitude")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let images: Images = inputs.object("images")?;
        let method: FlowMethod = match inputs.get("method") {
            Some(_) => inputs.string("method")?.parse().for_input("method")?,
            None => FlowMethod::LucasKanade,
        };
        let defaults = LucasKanadeConfig::default();
        let config = LucasKanadeConfig {
            levels: inputs.usize_or("levels", defaults.levels)?,
            window: inputs.usize_or("window", defaults.window)?,
            iterations: inputs.usize_or("iterations", defaults.iterations)?,
        };
        ctx.check_cancelled()?;
        let field = estimate_motion(&images.frames, method, &config).for_input("images")?;
        let preview = flow_preview(&field).map_err(NodeFailure::execution)?;
        let amplitude = f64::from(field.amplitude);
        Ok(Outputs {
            values: vec![
                Motion { field }.into_value(),
                Images { frames: preview }.into_value(),
                vdm_ffi::Value::Float(amplitude),
            ],
            ui: None,
        })
    }
}

struct SaveMotion;

impl Node for SaveMotion {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("SaveMotion", "Save Motion", "vdm/motion")
            .description("Writes MOTION to a safetensors file in the output folder, atomically: f32 tensors `flow` (frames−1, 2, H, W), `magnitude` (frames−1, H, W) and `amplitude` (1).")
            .object("motion", "MOTION", "From Motion Estimator or Load Motion.")
            .string("filename_prefix", "motion/vdm", "File name prefix; may contain subfolders of the output folder.")
            .output_node()
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_filename_prefix(inputs, ctx)
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let motion: Motion = inputs.object("motion")?;
        let prefix = inputs.string("filename_prefix")?;
        let out_dir = ctx.output_dir();
        let path = save_motion(&motion.field, &out_dir, prefix).for_input("filename_prefix")?;
        Ok(Outputs {
            values: vec![],
            ui: Some(json!({ "motion": [file_entry(&out_dir, &path)] })),
        })
    }
}

struct LoadMotion;

impl Node for LoadMotion {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("LoadMotion", "Load Motion", "vdm/motion")
            .description("Reads MOTION from a safetensors file written by Save Motion, checking its tensors and their shapes.")
            .string(
                "motion",
                "",
                "Path of the .safetensors file, absolute or relative to the input folder.",
            )
            .output("MOTION", "MOTION")
            .output("FLOAT", "amplitude")
            .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        check_input_file(inputs, ctx, "motion")
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let path = resolve_input_path(ctx, inputs.string("motion")?);
        let field = load_motion(&path).for_input("motion")?;
        let amplitude = f64::from(field.amplitude);
        Ok(Outputs {
            values: vec![
                Motion { field }.into_value(),
                vdm_ffi::Value::Float(amplitude),
            ],
            ui: None,
        })
    }
}

struct TemporalAttentionInjector;

impl Node for TemporalAttentionInjector {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        let defaults = MotionAdaptiveConfig::default();
        let description = format!(
            "Motion-adaptive temporal attention on the model's motion modules (Hong & Quan): down and \
             mid blocks keep global temporal attention; the up blocks' temporal attention gets the \
             logit bias −λ(m)·|i − j| with λ(m) = lambda_max·m (bias), or attends only to frames \
             within w(m) = round(window_min + (1 − m)(F − 1 − window_min)) (window). m ∈ [0, 1] is \
             motion_override when it is ≥ 0, else the amplitude of `motion`, else estimated in each \
             model call from the lowest-resolution features: m = clamp(mean ‖x_(f+1) − x_f‖₁ / \
             mean ‖x_f‖₁ / κ, 0, 1), κ = {}. The up blocks' motion modules are scaled by the gate \
             g(m) = 2·sigmoid(gate_strength·m). At m = 0 the model is unchanged. `adapter` adds \
             a trained temporal adapter (Hong & Quan's lightweight temporal modules after every \
             spatial transformer, global in the down and mid blocks, biased by −λ_max·m·|i − j| in \
             the up blocks with the λ_max it was trained with, gated by sigmoid(a·m + b)); the \
             same m drives it.",
            defaults.kappa
        );
        DescriptorBuilder::new(
            "TemporalAttentionInjector",
            "Temporal Attention Injector",
            "vdm/motion",
        )
        .description(&description)
        .object("model", "MODEL", "The model with its motion module (AnimateDiff v1/v2/v3).")
        .optional()
        .object(
            "motion",
            "MOTION",
            "A measured clip (Motion Estimator) with the frames and frame size being generated (or the same shape at another scale): its amplitude is m.",
        )
        .float(
            "motion_override",
            -1.0,
            (-1.0, 1.0, 0.01),
            "m forced to this value; −1 (any negative value) uses the motion input or the estimate.",
        )
        .combo(
            "mode",
            &ReceptiveField::NAMES,
            "bias: a soft preference for near frames; window: frames beyond w(m) are not attended to.",
        )
        .float(
            "lambda_max",
            defaults.lambda_max,
            (0.0, 10.0, 0.05),
            "λ at m = 1 (bias mode): 1 keeps about ±2 frames.",
        )
        .int(
            "window_min",
            defaults.window_min as i64,
            1,
            64,
            "The window at m = 1 (window mode), in frames on each side.",
        )
        .float(
            "gate_strength",
            defaults.gate_weight,
            (-10.0, 10.0, 0.1),
            "a of the motion-aware gate 2·sigmoid(a·m) on the up blocks' temporal branch: > 0 strengthens it for fast clips, < 0 weakens it, 0 leaves it.",
        )
        .string(
            "adapter",
            "",
            "A trained temporal adapter (.safetensors) for this model's UNet, looked up as a path, then under <models>/temporal_adapters/; empty for none.",
        )
        .output("MODEL", "MODEL")
        .build()
    }

    fn check(&self, inputs: &Inputs, ctx: &Context) -> Vec<NodeFailure> {
        match inputs.get("adapter") {
            Some(vdm_ffi::Value::Str(name)) if !name.trim().is_empty() => {
                check_model(inputs, ctx, "adapter", TEMPORAL_ADAPTER_FOLDERS)
            }
            _ => Vec::new(),
        }
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
        let adapter = match inputs.get("adapter") {
            Some(_) => match inputs.string("adapter")?.trim() {
                "" => None,
                name => Some(resolve_model(
                    ctx,
                    "adapter",
                    TEMPORAL_ADAPTER_FOLDERS,
                    name,
                )?),
            },
            None => None,
        };
        let defaults = MotionAdaptiveConfig::default();
        let field = match inputs.get("mode") {
            Some(_) => inputs.string("mode")?.parse().for_input("mode")?,
            None => defaults.field,
        };
        let config = MotionAdaptiveConfig {
            field,
            lambda_max: inputs.float_or("lambda_max", defaults.lambda_max)?,
            window_min: inputs.usize_or("window_min", defaults.window_min)?,
            gate_weight: inputs.float_or("gate_strength", defaults.gate_weight)?,
            ..defaults
        };
        config.validate().map_err(NodeFailure::execution)?;
        let motion_override = inputs.float_or("motion_override", -1.0)?;
        if !(-1.0..=1.0).contains(&motion_override) {
            return Err(NodeFailure::input(
                "motion_override",
                format!("{motion_override} is outside [−1, 1]"),
            ));
        }
        let motion = inputs.optional_object::<Motion>("motion")?;
        let amplitude = match (motion_override >= 0.0, motion) {
            (true, _) => Amplitude::Fixed {
                m: motion_override,
                reference: None,
            },
            (false, Some(motion)) => Amplitude::Fixed {
                m: f64::from(motion.field.amplitude),
                reference: Some(reference_of(&motion)?),
            },
            (false, None) => Amplitude::Estimated {
                kappa: defaults.kappa,
            },
        };
        let unet = inject(&model.unet, adapter.as_deref(), config, amplitude)?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
}

/// `unet` with the temporal adapter of the file at `adapter` (when given) and the
/// motion-adaptive patches, whose m the adapter's bias and gates read too.
fn inject(
    unet: &PatchedUNet,
    adapter: Option<&Path>,
    config: MotionAdaptiveConfig,
    amplitude: Amplitude,
) -> Result<PatchedUNet, NodeFailure> {
    let unet = match adapter {
        Some(path) => {
            let base = unet.base();
            let adapter = TemporalAdapter::load(path, base.config(), base.dtype(), base.device())
                .for_input("adapter")?;
            unet.with_temporal_adapter(Arc::new(adapter))
                .map_err(|e| NodeFailure::input("adapter", e))?
        }
        None => unet.clone(),
    };
    apply_motion_adaptive(&unet, config, amplitude).map_err(NodeFailure::execution)
}

/// The clip a `MOTION` measured, checked against the clip being sampled at each model call.
fn reference_of(motion: &Motion) -> Result<ClipReference, NodeFailure> {
    motion.field.validate().for_input("motion")?;
    let (pairs, _, height, width) = motion.field.flow.dims4()?;
    Ok(ClipReference {
        frames: pairs + 1,
        height,
        width,
        source: "TemporalAttentionInjector input `motion`".to_string(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::patcher::UNetInputs;
    use crate::models::random::random_weights_for;
    use crate::models::temporal_adapter::{self, TemporalAdapterConfig};
    use crate::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    use crate::models::weights::NamedWeights;
    use crate::test_util::max_abs_diff;
    use crate::video::motion_adaptive::AMPLITUDE_VALUE;
    use candle_core::{DType, Device, Tensor};
    use candle_nn::VarBuilder;

    #[test]
    fn the_adapter_reads_the_amplitude_the_injector_writes() {
        assert_eq!(temporal_adapter::AMPLITUDE_VALUE, AMPLITUDE_VALUE);
    }

    /// SD 1.x's UNet layout at 32/64 channels, two levels.
    fn tiny_unet(channels: [usize; 2]) -> PatchedUNet {
        let config: UNet2DConditionConfig = serde_json::from_value(json!({
            "block_out_channels": channels,
            "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
            "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            "layers_per_block": 2, "norm_num_groups": 8,
            "cross_attention_dim": 32, "attention_head_dim": 8
        }))
        .unwrap();
        let weights =
            random_weights_for(|vb| UNet2DConditionModel::new(vb, &config).map(|_| ())).unwrap();
        let vb = VarBuilder::from_tensors(weights, DType::F32, &Device::Cpu);
        PatchedUNet::new(Arc::new(UNet2DConditionModel::new(vb, &config).unwrap()))
    }

    /// The noise prediction of `unet` for a fixed 3-frame clip, with m = 0.7 from the injector.
    fn injected_prediction(unet: &PatchedUNet, adapter: Option<&Path>) -> Tensor {
        let amplitude = Amplitude::Fixed {
            m: 0.7,
            reference: None,
        };
        let injected = inject(unet, adapter, MotionAdaptiveConfig::default(), amplitude).unwrap();
        let dev = Device::Cpu;
        let sample = Tensor::arange(0f32, 4.0 * 3.0 * 64.0, &dev)
            .and_then(|t| t.reshape((1, 4, 3, 8, 8)))
            .and_then(|t| t.affine(0.01, -1.0))
            .and_then(|t| t.sin())
            .unwrap();
        let text = Tensor::arange(0f32, 5.0 * 32.0, &dev)
            .and_then(|t| t.reshape((1, 5, 32)))
            .and_then(|t| t.affine(0.05, 0.0))
            .and_then(|t| t.cos())
            .unwrap();
        injected
            .forward(&UNetInputs::new(&sample, 500.0, &text))
            .unwrap()
    }

    #[test]
    fn an_injected_zero_adapter_leaves_the_model_and_a_trained_one_changes_it() {
        let dir = std::env::temp_dir().join(format!("vdm-injector-adapter-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let unet = tiny_unet([32, 64]);
        let cfg = TemporalAdapterConfig::for_unet(unet.base().config()).unwrap();
        let zero = dir.join("zero.safetensors");
        TemporalAdapter::init(&cfg, 11, DType::F32, &Device::Cpu)
            .and_then(|adapter| adapter.save(&zero))
            .unwrap();
        let mut trained: NamedWeights =
            TemporalAdapter::init_weights(&cfg, 11, DType::F32, &Device::Cpu).unwrap();
        for (key, tensor) in trained.iter_mut() {
            if key.ends_with(".to_out.weight") {
                *tensor = Tensor::randn(0f32, 0.3, tensor.shape(), &Device::Cpu).unwrap();
            }
        }
        let trained_path = dir.join("trained.safetensors");
        temporal_adapter::save_weights(&cfg, &trained, &trained_path).unwrap();

        let without = injected_prediction(&unet, None);
        assert_eq!(
            max_abs_diff(&injected_prediction(&unet, Some(&zero)), &without),
            0.0
        );
        assert!(max_abs_diff(&injected_prediction(&unet, Some(&trained_path)), &without) > 1e-4);

        // An adapter trained for another UNet is refused, naming the input.
        let amplitude = Amplitude::Estimated { kappa: 0.3 };
        let other = tiny_unet([64, 128]);
        let failure = inject(
            &other,
            Some(&zero),
            MotionAdaptiveConfig::default(),
            amplitude,
        )
        .unwrap_err();
        assert_eq!(failure.input.as_deref(), Some("adapter"));
        assert!(
            failure
                .message
                .contains("not a temporal adapter for this UNet"),
            "{}",
            failure.message
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
