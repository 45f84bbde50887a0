//! `VideoNoise`: initial latents with temporally correlated noise (METHODS.md §1).

use crate::video::noise::{video_noise, NoiseMode};

use super::memory::Bytes;
use super::{
    Context, DescriptorBuilder, ForInput, Inputs, Latent, Node, NodeFailure, Outputs, PluginType,
};

pub fn nodes() -> Vec<Box<dyn Node>> {
    vec![Box::new(VideoNoise)]
}

/// Pixels per latent cell of SD 1.x's VAE.
pub const LATENT_SCALE: usize = 8;

struct VideoNoise;

impl Node for VideoNoise {
    fn descriptor(&self) -> vdm_ffi::NodeDescriptor {
        DescriptorBuilder::new("VideoNoise", "Video Noise", "vdm/noise")
            .description(
                "Initial video latents of Gaussian noise, independent or correlated across frames. \
                 Higher correlation gives steadier video with less motion. The noise of frame k depends \
                 only on the seed and k, so lengthening a clip keeps its first frames.",
            )
            .seed("seed", "Random seed.")
            .int("frames", 16, 1, 4096, "Number of frames.")
            .int_step("width", 512, (8, 16384, 8), "Width in pixels; the latent is 1/8 of it.")
            .int_step("height", 512, (8, 16384, 8), "Height in pixels; the latent is 1/8 of it.")
            .int("channels", 4, 1, 64, "Latent channels (4 for SD 1.x).")
            .combo("mode", &["mixed", "progressive", "independent"], "mixed: every pair of frames has correlation ρ; progressive: ρ^|f−g| (AR(1)); independent: none.")
            .float("correlation", 0.2, (0.0, 1.0, 0.01), "ρ, the correlation between frames.")
            .optional()
            .int("batch_size", 1, 1, 64, "Number of videos.")
            .output("LATENT", "LATENT")
            .build()
    }

    fn execute(&self, inputs: &Inputs, ctx: &Context) -> Result<Outputs, NodeFailure> {
        let seed = inputs.seed("seed")?;
        let frames = inputs.usize("frames")?;
        let width = inputs.usize("width")? / LATENT_SCALE;
        let height = inputs.usize("height")? / LATENT_SCALE;
        let channels = inputs.usize("channels")?;
        let mode: NoiseMode = inputs.string("mode")?.parse().for_input("mode")?;
        let rho = inputs.float("correlation")?;
        let batch = inputs.usize_or("batch_size", 1)?;
        let device = ctx.device()?;
        // The frames are drawn one by one, then assembled: three copies at the peak.
        ctx.memory_budget(&device).check(
            "frames",
            &format!("noise of {batch} × {channels} × {frames} × {height} × {width}"),
            Bytes::f32s(&[batch, channels, frames, height, width]).times(3),
        )?;
        let samples = video_noise(
            seed, batch, channels, frames, height, width, mode, rho, &device,
        )
        .for_input("correlation")?;
        Ok(Outputs::one(Latent { samples }.into_value()))
    }
}
