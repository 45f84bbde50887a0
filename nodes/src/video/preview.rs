//! Cheap previews of SD 1.x latents: a fixed linear map from the 4 latent channels to RGB, as
//! ComfyUI's `Latent2RGBPreviewer` does with `latent_formats.SD15.latent_rgb_factors` (SD 1.5
//! has no bias term), followed by the same [-1, 1] → [0, 1] mapping and clamping as its
//! `preview_to_image`.

use candle_core::{bail, DType, Result, Tensor};
use image::ImageEncoder;

/// Latent channel → (R, G, B) contribution, one row per latent channel (ComfyUI's SD15 values).
pub const SD15_LATENT_RGB_FACTORS: [[f32; 3]; 4] = [
    [0.3512, 0.2297, 0.3227],
    [0.3250, 0.4974, 0.2350],
    [-0.2829, 0.1762, 0.2721],
    [-0.2120, -0.2616, -0.7177],
];

/// Latent pixels per image pixel along each side for SD 1.x (the VAE's downsampling factor).
pub const SD15_VAE_SCALE: usize = 8;

/// How [`latent_to_rgb`] enlarges the preview.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum UpscaleFilter {
    /// Each latent pixel becomes an `upscale`×`upscale` block: blocky but shows latent pixels.
    #[default]
    Nearest,
    /// Bilinear interpolation (half-pixel centres, as PyTorch's `align_corners=False`).
    Bilinear,
}

/// RGB preview frames of an SD 1.x latent.
///
/// `latent` is a video latent (B, 4, F, h, w) or a batch of frames (N, 4, h, w), any float
/// dtype. The result is (N, h·upscale, w·upscale, 3) f32 in [0, 1] (ComfyUI's IMAGE layout) on
/// the latent's device, with N = B·F ordered batch-major for video latents. `upscale` = 1 keeps
/// the latent size; [`SD15_VAE_SCALE`] gives previews of the decoded image's size.
pub fn latent_to_rgb(latent: &Tensor, upscale: usize, filter: UpscaleFilter) -> Result<Tensor> {
    let frames = match latent.rank() {
        5 => {
            let (b, c, f, h, w) = latent.dims5()?;
            latent.permute((0, 2, 1, 3, 4))?.reshape((b * f, c, h, w))?
        }
        4 => latent.clone(),
        _ => bail!(
            "latent preview expects a (B, 4, F, h, w) or (N, 4, h, w) latent, got shape {:?}",
            latent.dims()
        ),
    };
    let (n, c, h, w) = frames.dims4()?;
    if c != SD15_LATENT_RGB_FACTORS.len() {
        bail!(
            "latent preview expects 4 latent channels (SD 1.x), got {c} in shape {:?}",
            latent.dims()
        )
    }
    if upscale == 0 {
        bail!("latent preview upscale must be at least 1")
    }
    let factors: Vec<f32> = SD15_LATENT_RGB_FACTORS.iter().flatten().copied().collect();
    let factors = Tensor::from_vec(factors, (c, 3), latent.device())?;
    let rgb = frames
        .to_dtype(DType::F32)?
        .permute((0, 2, 3, 1))?
        .reshape((n * h * w, c))?
        .matmul(&factors)?
        .affine(0.5, 0.5)?
        .clamp(0f32, 1f32)?
        .reshape((n, h, w, 3))?;
    if upscale == 1 {
        return Ok(rgb);
    }
    let channels_first = rgb.permute((0, 3, 1, 2))?;
    let (target_h, target_w) = (h * upscale, w * upscale);
    let enlarged = match filter {
        UpscaleFilter::Nearest => channels_first.upsample_nearest2d(target_h, target_w)?,
        UpscaleFilter::Bilinear => channels_first
            .contiguous()?
            .upsample_bilinear2d(target_h, target_w, false)?,
    };
    enlarged.permute((0, 2, 3, 1))?.contiguous()
}

/// The first frame of `latent` (a video latent or a batch of frames, as [`latent_to_rgb`]
/// takes) as an RGB PNG: ComfyUI's latent preview while sampling. The frame is enlarged
/// (bilinear) toward the decoded image's size, at most `max_side` pixels on its longer side.
pub fn preview_png(latent: &Tensor, max_side: usize) -> Result<Vec<u8>> {
    let first = match latent.rank() {
        5 => latent.narrow(0, 0, 1)?.narrow(2, 0, 1)?,
        4 => latent.narrow(0, 0, 1)?,
        _ => bail!(
            "latent preview expects a 4- or 5-dimensional latent, got {:?}",
            latent.dims()
        ),
    };
    let longer = first
        .dim(first.rank() - 1)?
        .max(first.dim(first.rank() - 2)?);
    let upscale = (max_side / longer.max(1)).clamp(1, SD15_VAE_SCALE);
    let rgb = latent_to_rgb(&first, upscale, UpscaleFilter::Bilinear)?.squeeze(0)?;
    let (height, width, _) = rgb.dims3()?;
    let bytes: Vec<u8> = rgb
        .to_device(&candle_core::Device::Cpu)?
        .flatten_all()?
        .to_vec1::<f32>()?
        .iter()
        .map(|v| (v * 255.0).round().clamp(0.0, 255.0) as u8)
        .collect();
    let mut png = Vec::new();
    image::codecs::png::PngEncoder::new(&mut png)
        .write_image(
            &bytes,
            width as u32,
            height as u32,
            image::ExtendedColorType::Rgb8,
        )
        .map_err(|e| candle_core::Error::Msg(format!("preview PNG: {e}")))?;
    Ok(png)
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::Device;

    use crate::test_util::max_abs_diff;

    fn pixel(image: &Tensor, n: usize, y: usize, x: usize) -> Vec<f32> {
        image
            .get(n)
            .unwrap()
            .get(y)
            .unwrap()
            .get(x)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
    }

    fn assert_color(got: &[f32], expected: [f32; 3]) {
        for (g, e) in got.iter().zip(expected) {
            assert!((g - e).abs() < 1e-6, "got {got:?}, expected {expected:?}");
        }
    }

    #[test]
    fn video_latent_gives_frames_in_unit_range() {
        let latent = Tensor::randn(0f32, 3.0, (2, 4, 3, 5, 6), &Device::Cpu).unwrap();
        let rgb = latent_to_rgb(&latent, 1, UpscaleFilter::Nearest).unwrap();
        assert_eq!(rgb.dims(), &[6, 5, 6, 3]);
        let min = rgb.min_all().unwrap().to_scalar::<f32>().unwrap();
        let max = rgb.max_all().unwrap().to_scalar::<f32>().unwrap();
        assert!((0.0..=1.0).contains(&min) && (0.0..=1.0).contains(&max));
        // Frames are ordered batch-major: output 4 is batch 1, frame 1.
        let frame = latent
            .get(1)
            .unwrap()
            .narrow(1, 1, 1)
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        let frame = frame.squeeze(2).unwrap();
        let single = latent_to_rgb(&frame, 1, UpscaleFilter::Nearest).unwrap();
        let diff = max_abs_diff(&rgb.get(4).unwrap(), &single.get(0).unwrap());
        assert_eq!(diff, 0.0);
    }

    #[test]
    fn known_latents_map_to_expected_colors() {
        // Pixel (0, 0): zero latent → mid grey. Pixel (0, 1): unit first channel →
        // (factors[0] + 1) / 2. Pixel (0, 2): fourth channel −5 gives (1.06, 1.308, 3.589) before
        // the mapping, so every channel clamps to 1.
        let mut values = vec![0f32; 4 * 3];
        values[1] = 1.0; // channel 0, x = 1
        values[3 * 3 + 2] = -5.0; // channel 3, x = 2
        let latent = Tensor::from_vec(values, (1, 4, 1, 3), &Device::Cpu).unwrap();
        let rgb = latent_to_rgb(&latent, 1, UpscaleFilter::Nearest).unwrap();
        assert_eq!(rgb.dims(), &[1, 1, 3, 3]);
        assert_color(&pixel(&rgb, 0, 0, 0), [0.5, 0.5, 0.5]);
        assert_color(&pixel(&rgb, 0, 0, 1), [0.6756, 0.61485, 0.66135]);
        assert_color(&pixel(&rgb, 0, 0, 2), [1.0, 1.0, 1.0]);
    }

    #[test]
    fn upscale_gives_pixel_sized_previews() {
        let latent = Tensor::randn(0f32, 1.0, (1, 4, 2, 3, 4), &Device::Cpu).unwrap();
        let small = latent_to_rgb(&latent, 1, UpscaleFilter::Nearest).unwrap();
        let nearest = latent_to_rgb(&latent, SD15_VAE_SCALE, UpscaleFilter::Nearest).unwrap();
        let bilinear = latent_to_rgb(&latent, SD15_VAE_SCALE, UpscaleFilter::Bilinear).unwrap();
        assert_eq!(nearest.dims(), &[2, 24, 32, 3]);
        assert_eq!(bilinear.dims(), &[2, 24, 32, 3]);
        assert_eq!(pixel(&nearest, 1, 15, 31), pixel(&small, 1, 1, 3));
        let max = bilinear.max_all().unwrap().to_scalar::<f32>().unwrap();
        let min = bilinear.min_all().unwrap().to_scalar::<f32>().unwrap();
        assert!(min >= 0.0 && max <= 1.0);
    }

    #[test]
    fn rejects_wrong_shapes() {
        let wrong_channels = Tensor::zeros((1, 3, 4, 4), DType::F32, &Device::Cpu).unwrap();
        let err = latent_to_rgb(&wrong_channels, 1, UpscaleFilter::Nearest).unwrap_err();
        assert!(err.to_string().contains("4 latent channels"), "{err}");
        let wrong_rank = Tensor::zeros((4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(latent_to_rgb(&wrong_rank, 1, UpscaleFilter::Nearest).is_err());
        let ok = Tensor::zeros((1, 4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(latent_to_rgb(&ok, 0, UpscaleFilter::Nearest).is_err());
    }

    #[test]
    fn the_preview_png_is_the_first_frame_enlarged_toward_the_image_size() {
        let latent = Tensor::randn(0f32, 1.0, (2, 4, 3, 6, 10), &candle_core::Device::Cpu).unwrap();
        let png = preview_png(&latent, 64).unwrap();
        let image = image::load_from_memory(&png).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (60, 36),
            "6× of 10×6 fits in 64"
        );
        let full = preview_png(&latent, 512).unwrap();
        let image = image::load_from_memory(&full).unwrap();
        assert_eq!(
            (image.width(), image.height()),
            (80, 48),
            "at most the VAE's 8×"
        );
    }
}
