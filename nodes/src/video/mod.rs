//! Video methods and the data that flows in and out of a video workflow.
//!
//! - [`noise`]: initial noise for video latents (independent, temporally correlated, FreeNoise).
//! - [`io`]: frames in ComfyUI's IMAGE layout, loaded from and saved to GIF, APNG, frame folders
//!   and (through `ffmpeg`) MP4/WebM/MOV/MKV; the output naming shared by every saving node.
//! - [`preview`]: cheap latent-to-RGB previews without the VAE.
//! - [`latent_file`]: ComfyUI-compatible `.latent` files.
//! - [`motion`]: dense optical flow between frames, the clip's motion amplitude, flow
//!   previews and motion files.
//! - [`motion_adaptive`]: motion-adaptive temporal attention, as patches on a model.
//! - [`entropy`]: attention entropy and energy per layer and step, measured by an observer, as
//!   a table, CSV and [`heatmap`].
//! - [`editing`]: entropy-aware video editing (inversion, then source and target sampled
//!   together with the source's low-entropy attention injected into the target).
//! - [`attention_edit`]: processors that perturb (identity, uniform), enhance (IE-Adapt,
//!   Enhance-A-Video) attention by layer and step range.
//! - [`freeinit`]: FreeInit's re-noising passes around the sampling loop.
//! - [`temporal_training`]: training the lightweight motion-adaptive temporal adapter on clips,
//!   the image UNet frozen.
//! - [`reuse`]: denoising reuse (Dr. Mo): key frames run the whole schedule, the others are
//!   propagated from them until a switch step, as a frame strategy of the sampling loop.

pub mod attention_edit;
pub mod editing;
pub mod entropy;
pub mod freeinit;
pub mod heatmap;
pub mod io;
pub mod latent_file;
pub mod motion;
pub mod motion_adaptive;
pub mod noise;
pub mod preview;
pub mod prompt_travel;
pub mod resize;
pub mod reuse;
pub mod temporal_training;
pub mod vmc;

#[cfg(test)]
pub(crate) mod test_models;

pub use io::{load_video, save_video, LoadOptions, MediaError, VideoFormat};
pub use latent_file::{load_latent, save_latent};
pub use noise::{free_noise, free_noise_schedule, video_noise, NoiseMode};
pub use preview::{latent_to_rgb, UpscaleFilter};

/// A fresh folder for a test, removed when dropped; `.0` is its path.
#[cfg(test)]
pub(crate) struct TempDir(
    pub std::path::PathBuf,
    #[allow(dead_code)] tempfile::TempDir,
);

#[cfg(test)]
impl TempDir {
    pub(crate) fn new(label: &str) -> Self {
        let dir = tempfile::Builder::new()
            .prefix(&format!("vdm-{label}-"))
            .tempdir()
            .expect("temp dir");
        Self(dir.path().to_path_buf(), dir)
    }
}
