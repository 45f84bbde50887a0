//! The workflows behind `vdm train`: each training command builds a workflow of the vdm-nodes
//! plugin's classes from its arguments, and runs it as `vdm run` would, so a command and the
//! equivalent workflow file do exactly the same (`--print-workflow` shows it).

use serde_json::{json, Value as Json};

/// What `vdm train vmc` customises, on what, and how long.
#[derive(Debug, Clone, PartialEq)]
pub struct VmcJob {
    /// SD 1.x checkpoint: a file or diffusers folder, or a name under `<models>/checkpoints/`.
    pub checkpoint: String,
    /// AnimateDiff motion module, or a name under `<models>/animatediff_models/`.
    pub motion_module: String,
    /// The clip: a video file or a folder of frames.
    pub clip: String,
    /// At most this many frames of the clip (0: all).
    pub frames: u32,
    pub prompt: String,
    pub steps: u32,
    pub learning_rate: f64,
    pub loss: String,
    pub seed: u64,
    pub filename_prefix: String,
    pub checkpoint_every: u32,
}

/// Node id of `MotionCustomize` in [`vmc_workflow`]: its `ui` output holds the patch and losses.
pub const VMC_NODE: &str = "6";

/// Load the checkpoint and motion module, encode the clip, customise the motion.
pub fn vmc_workflow(job: &VmcJob) -> Json {
    json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": job.checkpoint}},
        "2": {"class_type": "MotionModuleLoader", "inputs": {"model_name": job.motion_module}},
        "3": {"class_type": "ApplyMotionModule",
              "inputs": {"model": ["1", 0], "motion_module": ["2", 0], "motion_scale": 1.0}},
        "4": {"class_type": "LoadVideoFile", "inputs": {"video": job.clip, "frame_load_cap": job.frames,
              "skip_first_frames": 0, "select_every_nth": 1}},
        "5": {"class_type": "VAEEncode", "inputs": {"pixels": ["4", 0], "vae": ["1", 2]}},
        VMC_NODE: {"class_type": "MotionCustomize", "inputs": {
            "model": ["3", 0], "clip": ["1", 1], "latent": ["5", 0], "prompt": job.prompt,
            "steps": job.steps, "learning_rate": job.learning_rate, "loss": job.loss,
            "seed": job.seed, "filename_prefix": job.filename_prefix,
            "checkpoint_every": job.checkpoint_every
        }}
    })
}

/// What `vdm train temporal` trains on, and how long.
#[derive(Debug, Clone, PartialEq)]
pub struct TemporalJob {
    /// SD 1.x checkpoint: its UNet stays frozen.
    pub checkpoint: String,
    /// A folder of clips (frame folders, GIFs, videos).
    pub clips: String,
    pub steps: u32,
    pub learning_rate: f64,
    pub frames: u32,
    pub seed: u64,
    pub width: u32,
    pub height: u32,
    /// The prompt of clips without a caption (empty: unconditional).
    pub prompt: String,
    /// independent, mixed or progressive.
    pub noise: String,
    pub correlation: f64,
    pub lr_schedule: String,
    pub warmup_steps: u32,
    pub checkpoint_every: u32,
    pub filename_prefix: String,
}

/// Node id of `TrainTemporalAdapter` in [`temporal_workflow`].
pub const TEMPORAL_NODE: &str = "2";

/// Load the checkpoint, train the adapter on the clips.
pub fn temporal_workflow(job: &TemporalJob) -> Json {
    json!({
        "1": {"class_type": "CheckpointLoader", "inputs": {"ckpt_name": job.checkpoint}},
        TEMPORAL_NODE: {"class_type": "TrainTemporalAdapter", "inputs": {
            "model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "clips": job.clips,
            "steps": job.steps, "learning_rate": job.learning_rate, "frames": job.frames,
            "seed": job.seed, "filename_prefix": job.filename_prefix, "prompt": job.prompt,
            "width": job.width, "height": job.height, "noise": job.noise,
            "correlation": job.correlation, "lr_schedule": job.lr_schedule,
            "warmup_steps": job.warmup_steps, "checkpoint_every": job.checkpoint_every
        }}
    })
}
