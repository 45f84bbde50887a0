//! The workflows behind `vdm train`: each training command builds a workflow of the vdm-nodes
//! plugin's classes from its arguments, and runs it as `vdm run` would, so a command and the
//! equivalent workflow file do exactly the same (`--print-workflow` shows it). The jobs are the
//! commands' arguments.

use serde_json::{json, Value as Json};

/// What `vdm train vmc` customises, on what, and how long.
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct VmcJob {
    /// SD 1.x checkpoint (a file or diffusers folder, or a name under <models>/checkpoints/).
    #[arg(long)]
    pub checkpoint: String,
    /// AnimateDiff motion module (or a name under <models>/animatediff_models/).
    #[arg(long)]
    pub motion_module: String,
    /// The clip whose motion is learnt: a video file or a folder of frames, at the size to
    /// train at (the frames are encoded as they are).
    #[arg(long)]
    pub clip: String,
    /// Use at most this many frames of the clip (0: all; the motion module sees at most its
    /// table's length at once, 32 for AnimateDiff v3).
    #[arg(long, default_value_t = 16)]
    pub frames: u32,
    /// An appearance-invariant prompt: what moves and how ("a bird is flying").
    #[arg(long)]
    pub prompt: String,
    #[arg(long, default_value_t = 400)]
    pub steps: u32,
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// paper, official or l2 (METHODS.md §2).
    #[arg(long, default_value = "paper")]
    pub loss: String,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Name of the patch in the output folder (may contain subfolders).
    #[arg(long = "prefix", default_value = "vmc/motion")]
    pub filename_prefix: String,
    /// Save the training state every this many steps.
    #[arg(long, default_value_t = 50)]
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
#[derive(Debug, Clone, PartialEq, clap::Args)]
pub struct TemporalJob {
    /// SD 1.x checkpoint (a file or diffusers folder, or a name under <models>/checkpoints/):
    /// its UNet stays frozen.
    #[arg(long)]
    pub checkpoint: String,
    /// A folder of clips: folders of PNG/JPEG frames, GIFs, or videos through ffmpeg; a
    /// `<clip>.txt` beside a clip is its caption.
    #[arg(long)]
    pub clips: String,
    #[arg(long, default_value_t = 2000)]
    pub steps: u32,
    #[arg(long, default_value_t = 1e-4)]
    pub learning_rate: f64,
    /// Frames of every training window.
    #[arg(long, default_value_t = 16)]
    pub frames: u32,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Frames are centre-cropped and resized to this size.
    #[arg(long, default_value_t = 256)]
    pub width: u32,
    #[arg(long, default_value_t = 256)]
    pub height: u32,
    /// The prompt of clips without a caption (empty: unconditional).
    #[arg(long, default_value = "")]
    pub prompt: String,
    /// Training noise: independent, mixed or progressive (correlated across frames).
    #[arg(long, default_value = "independent")]
    pub noise: String,
    /// ρ of mixed or progressive noise.
    #[arg(long, default_value_t = 0.0)]
    pub correlation: f64,
    /// constant or cosine (after the warm-up).
    #[arg(long, default_value = "constant")]
    pub lr_schedule: String,
    #[arg(long, default_value_t = 0)]
    pub warmup_steps: u32,
    /// Save the training state every this many steps.
    #[arg(long, default_value_t = 100)]
    pub checkpoint_every: u32,
    /// Name of the adapter in the output folder (may contain subfolders).
    #[arg(long = "prefix", default_value = "temporal_adapters/adapter")]
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
