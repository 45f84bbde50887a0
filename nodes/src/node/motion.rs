//! Motion of a clip: `MotionEstimator` (dense optical flow), `MOTION` files with `SaveMotion`
//! and `LoadMotion`, and `TemporalAttentionInjector`, which adapts a model's temporal attention
//! to the motion.

use serde_json::json;

use crate::video::motion::{
    estimate_motion, flow_preview, load_motion, save_motion, FlowMethod, LucasKanadeConfig,
    AMPLITUDE_KAPPA,
};

use crate::video::motion_adaptive::{
    apply_motion_adaptive, Amplitude, ClipReference, MotionAdaptiveConfig, ReceptiveField,
};

use super::objects::{Model, Motion};
use super::{
    check_filename_prefix, check_input_file, file_entry, resolve_input_path, Context,
    DescriptorBuilder, ForInput, Images, Inputs, Node, NodeFailure, Outputs, PluginType,
};

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
             g(m) = 2·sigmoid(gate_strength·m). At m = 0 the model is unchanged.",
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
        .output("MODEL", "MODEL")
        .build()
    }

    fn execute(&self, inputs: &Inputs, _ctx: &Context) -> Result<Outputs, NodeFailure> {
        let model: Model = inputs.object("model")?;
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
        let unet = apply_motion_adaptive(&model.unet, config, amplitude)
            .map_err(NodeFailure::execution)?;
        Ok(Outputs::one(model.with_unet(unet).into_value()))
    }
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
