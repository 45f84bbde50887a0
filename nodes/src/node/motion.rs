//! Motion of a clip: `MotionEstimator` (dense optical flow), and `MOTION` files with
//! `SaveMotion` and `LoadMotion`.

use serde_json::json;

use crate::video::motion::{
    estimate_motion, flow_preview, load_motion, save_motion, FlowMethod, LucasKanadeConfig,
    AMPLITUDE_KAPPA,
};

use super::objects::Motion;
use super::{
    file_entry, resolve_input_path, Context, DescriptorBuilder, ForInput, Images, Inputs, Node,
    NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![
        Box::new(MotionEstimator),
        Box::new(SaveMotion),
        Box::new(LoadMotion),
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
