//! `.latent` files, as ComfyUI's SaveLatent and LoadLatent write and read them.
//!
//! A `.latent` file is safetensors with the latent under `latent_tensor` and an empty f32
//! tensor under `latent_format_version_0`. Files without that marker predate it and hold
//! latents scaled by the SD VAE factor 0.18215, so loading multiplies them by 1/0.18215, as
//! ComfyUI does.
//!
//! Video latents are (B, C, F, h, w) here, while ComfyUI keeps the frames of an AnimateDiff
//! video in the batch dimension. To stay readable by ComfyUI, a video latent is stored as
//! (B·F, C, h, w), batch-major (all frames of the first video, then the next), and the frame
//! count goes into the header metadata under [`FRAMES_METADATA_KEY`]. Loading always gives a
//! 5-D latent: files with that key are folded back to (B, C, F, h, w); 4-D files without it
//! (ComfyUI's own) are one video whose frames are the batch, (1, C, N, h, w); 5-D files are
//! taken as they are.

use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use safetensors::tensor::TensorView;
use safetensors::{Dtype, SafeTensors};

use super::io::{save_atomically, MediaError};

/// Key of the latent tensor.
pub const LATENT_KEY: &str = "latent_tensor";
/// Key whose presence marks latents stored without the VAE scaling.
pub const VERSION_MARKER_KEY: &str = "latent_format_version_0";
/// Header metadata key holding the frame count of a video latent stored as (B·F, C, h, w).
pub const FRAMES_METADATA_KEY: &str = "vdm_frames";
/// Extension of latent files.
pub const LATENT_EXTENSION: &str = "latent";
/// The SD 1.x VAE scaling factor that unmarked files still carry.
pub const LEGACY_SCALE_FACTOR: f64 = 0.18215;

/// Writes `samples` (a video latent (B, C, F, h, w) or a frame batch (N, C, h, w), any float
/// dtype, any device; stored as f32) to `{output_dir}/{filename_prefix}_{counter:05}_.latent`
/// and returns its path. `metadata` entries (ComfyUI writes the workflow as `prompt`) go into
/// the safetensors header.
pub fn save_latent(
    samples: &Tensor,
    output_dir: &Path,
    filename_prefix: &str,
    metadata: Option<&HashMap<String, String>>,
) -> Result<PathBuf, MediaError> {
    let bytes = latent_to_bytes(samples, metadata)?;
    save_atomically(output_dir, filename_prefix, LATENT_EXTENSION, |temp| {
        fs::write(temp, &bytes).map_err(|source| MediaError::Io {
            path: temp.to_path_buf(),
            source,
        })
    })
}

/// Reads a `.latent` file as a 5-D (B, C, F, h, w) f32 latent on `device` (see the module
/// documentation for how 4-D files are read).
pub fn load_latent(path: &Path, device: &Device) -> Result<Tensor, MediaError> {
    let bytes = fs::read(path).map_err(|source| MediaError::Io {
        path: path.to_path_buf(),
        source,
    })?;
    let latent = latent_from_bytes(&bytes).map_err(|message| MediaError::LatentFile {
        path: path.to_path_buf(),
        message,
    })?;
    Ok(latent.to_device(device)?)
}

fn latent_to_bytes(
    samples: &Tensor,
    metadata: Option<&HashMap<String, String>>,
) -> Result<Vec<u8>, MediaError> {
    let mut header = metadata.cloned().unwrap_or_default();
    let stored = match samples.rank() {
        5 => {
            let (b, c, f, h, w) = samples.dims5()?;
            header.insert(FRAMES_METADATA_KEY.to_string(), f.to_string());
            samples
                .permute((0, 2, 1, 3, 4))?
                .reshape((b * f, c, h, w))?
        }
        4 => {
            header.remove(FRAMES_METADATA_KEY);
            samples.clone()
        }
        _ => {
            return Err(MediaError::Invalid(format!(
                "a latent must be (B, C, F, h, w) or (N, C, h, w), got shape {:?}",
                samples.dims()
            )))
        }
    };
    let shape = stored.dims().to_vec();
    let values = stored
        .to_device(&Device::Cpu)?
        .to_dtype(DType::F32)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let data: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
    let invalid = |e: safetensors::SafeTensorError| MediaError::Invalid(e.to_string());
    let latent = TensorView::new(Dtype::F32, shape, &data).map_err(invalid)?;
    let marker = TensorView::new(Dtype::F32, vec![0], &[]).map_err(invalid)?;
    let tensors = [(LATENT_KEY, latent), (VERSION_MARKER_KEY, marker)];
    let header = (!header.is_empty()).then_some(header);
    safetensors::serialize(tensors, header).map_err(invalid)
}

fn latent_from_bytes(bytes: &[u8]) -> Result<Tensor, String> {
    let not_safetensors = |e: safetensors::SafeTensorError| format!("not a safetensors file ({e})");
    let (_, header) = SafeTensors::read_metadata(bytes).map_err(not_safetensors)?;
    let tensors = SafeTensors::deserialize(bytes).map_err(not_safetensors)?;
    let view = tensors.tensor(LATENT_KEY).map_err(|_| {
        format!(
            "no `{LATENT_KEY}` tensor (found {:?}); not a latent file",
            tensors.names()
        )
    })?;
    let dtype = match view.dtype() {
        Dtype::F32 => DType::F32,
        Dtype::F16 => DType::F16,
        Dtype::BF16 => DType::BF16,
        Dtype::F64 => DType::F64,
        other => return Err(format!("`{LATENT_KEY}` has unsupported dtype {other:?}")),
    };
    let shape = view.shape().to_vec();
    // safetensors accepts any shape of zero elements, such as [0, 4, 2^63, 2]; candle computes
    // the strides of such a shape with unchecked multiplications.
    let fits = shape
        .iter()
        .filter(|&&d| d != 0)
        .try_fold(1usize, |acc, &d| acc.checked_mul(d))
        .is_some();
    if !fits {
        return Err(format!(
            "`{LATENT_KEY}` has shape {shape:?}, whose size overflows"
        ));
    }
    let mut latent = Tensor::from_raw_buffer(view.data(), dtype, &shape, &Device::Cpu)
        .and_then(|t| t.to_dtype(DType::F32))
        .map_err(|e| e.to_string())?;
    if tensors.tensor(VERSION_MARKER_KEY).is_err() {
        latent = latent
            .affine(1.0 / LEGACY_SCALE_FACTOR, 0.0)
            .map_err(|e| e.to_string())?;
    }
    let frames = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(FRAMES_METADATA_KEY));
    let as_video = match (shape.as_slice(), frames) {
        (&[n, c, h, w], Some(frames)) => {
            let frames: usize = frames
                .parse()
                .ok()
                .filter(|&f| f > 0 && n % f == 0)
                .ok_or_else(|| {
                    format!("metadata {FRAMES_METADATA_KEY}={frames:?} does not divide the batch of {n}")
                })?;
            latent
                .reshape((n / frames, frames, c, h, w))
                .and_then(|t| t.permute((0, 2, 1, 3, 4)))
                .and_then(|t| t.contiguous())
        }
        (&[n, c, h, w], None) => latent
            .reshape((1, n, c, h, w))
            .and_then(|t| t.permute((0, 2, 1, 3, 4)))
            .and_then(|t| t.contiguous()),
        ([_, _, _, _, _], _) => Ok(latent),
        (other, _) => {
            return Err(format!(
                "`{LATENT_KEY}` has shape {other:?}; expected 4 or 5 dimensions"
            ))
        }
    };
    as_video.map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    use crate::video::TempDir;

    fn values(t: &Tensor) -> Vec<f32> {
        t.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    /// Writes a safetensors file the way ComfyUI does, optionally without the marker.
    fn comfy_file(path: &Path, latent: &Tensor, with_marker: bool) {
        let shape = latent.dims().to_vec();
        let data: Vec<u8> = values(latent)
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect();
        let mut tensors = vec![(
            LATENT_KEY,
            TensorView::new(Dtype::F32, shape, &data).unwrap(),
        )];
        if with_marker {
            tensors.push((
                VERSION_MARKER_KEY,
                TensorView::new(Dtype::F32, vec![0], &[]).unwrap(),
            ));
        }
        fs::write(path, safetensors::serialize(tensors, None).unwrap()).unwrap();
    }

    #[test]
    fn video_latent_round_trip_is_bit_exact() {
        let dir = TempDir::new("roundtrip");
        let latent = Tensor::randn(0f32, 1.0, (2, 4, 3, 5, 6), &Device::Cpu).unwrap();
        let mut metadata = HashMap::new();
        metadata.insert("prompt".to_string(), "{}".to_string());
        let path = save_latent(&latent, &dir.0, "latents/clip", Some(&metadata)).unwrap();
        assert_eq!(path, dir.0.join("latents").join("clip_00001_.latent"));
        let loaded = load_latent(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.dims(), latent.dims());
        let (a, b) = (values(&latent), values(&loaded));
        assert!(a.iter().zip(&b).all(|(x, y)| x.to_bits() == y.to_bits()));
        let second = save_latent(&latent, &dir.0, "latents/clip", None).unwrap();
        assert_eq!(second.file_name().unwrap(), "clip_00002_.latent");
    }

    #[test]
    fn stored_layout_is_comfyui_frames_in_batch() {
        let dir = TempDir::new("layout");
        let latent = Tensor::arange(0f32, 2.0 * 4.0 * 3.0 * 2.0 * 2.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 4, 3, 2, 2))
            .unwrap();
        let path = save_latent(&latent, &dir.0, "clip", None).unwrap();
        let bytes = fs::read(&path).unwrap();
        let file = SafeTensors::deserialize(&bytes).unwrap();
        let stored = file.tensor(LATENT_KEY).unwrap();
        assert_eq!(stored.shape(), &[6, 4, 2, 2]);
        assert_eq!(file.tensor(VERSION_MARKER_KEY).unwrap().shape(), &[0]);
        // Batch entry 4 is video 1, frame 1.
        let stored =
            Tensor::from_raw_buffer(stored.data(), DType::F32, &[6, 4, 2, 2], &Device::Cpu)
                .unwrap();
        let expected = latent
            .get(1)
            .unwrap()
            .narrow(1, 1, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_eq!(values(&stored.get(4).unwrap()), values(&expected));
    }

    #[test]
    fn comfyui_files_load_as_one_video() {
        let dir = TempDir::new("comfy");
        let batch = Tensor::randn(0f32, 1.0, (5, 4, 3, 3), &Device::Cpu).unwrap();
        let path = dir.0.join("comfy.latent");
        comfy_file(&path, &batch, true);
        let loaded = load_latent(&path, &Device::Cpu).unwrap();
        assert_eq!(loaded.dims(), &[1, 4, 5, 3, 3]);
        let frame_3 = loaded
            .get(0)
            .unwrap()
            .narrow(1, 3, 1)
            .unwrap()
            .squeeze(1)
            .unwrap();
        assert_eq!(values(&frame_3), values(&batch.get(3).unwrap()));
    }

    #[test]
    fn legacy_files_are_rescaled() {
        let dir = TempDir::new("legacy");
        let batch = Tensor::randn(0f32, 1.0, (2, 4, 3, 3), &Device::Cpu).unwrap();
        let path = dir.0.join("legacy.latent");
        comfy_file(&path, &batch, false);
        let loaded = load_latent(&path, &Device::Cpu).unwrap();
        let expected = batch
            .affine(1.0 / LEGACY_SCALE_FACTOR, 0.0)
            .unwrap()
            .permute((1, 0, 2, 3))
            .unwrap()
            .unsqueeze(0)
            .unwrap();
        assert_eq!(loaded.dims(), &[1, 4, 2, 3, 3]);
        let (a, b) = (values(&loaded), values(&expected.contiguous().unwrap()));
        assert!(a
            .iter()
            .zip(&b)
            .all(|(x, y)| (x - y).abs() <= 1e-6 * y.abs().max(1.0)));
    }

    #[test]
    fn corrupt_files_give_clear_errors() {
        let dir = TempDir::new("corrupt");
        let garbage = dir.0.join("garbage.latent");
        fs::write(&garbage, b"definitely not safetensors").unwrap();
        let err = load_latent(&garbage, &Device::Cpu).unwrap_err().to_string();
        assert!(
            err.contains("garbage.latent") && err.contains("safetensors"),
            "{err}"
        );

        let truncated = dir.0.join("truncated.latent");
        let latent = Tensor::zeros((1, 4, 2, 2, 2), DType::F32, &Device::Cpu).unwrap();
        let saved = save_latent(&latent, &dir.0, "whole", None).unwrap();
        let bytes = fs::read(saved).unwrap();
        fs::write(&truncated, &bytes[..bytes.len() - 7]).unwrap();
        let err = load_latent(&truncated, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(err.contains("truncated.latent"), "{err}");

        let wrong_key = dir.0.join("wrong_key.latent");
        let view = TensorView::new(Dtype::F32, vec![1], &[0, 0, 0, 0]).unwrap();
        fs::write(
            &wrong_key,
            safetensors::serialize([("weights", view)], None).unwrap(),
        )
        .unwrap();
        let err = load_latent(&wrong_key, &Device::Cpu)
            .unwrap_err()
            .to_string();
        assert!(
            err.contains("wrong_key.latent") && err.contains(LATENT_KEY),
            "{err}"
        );

        let missing = dir.0.join("missing.latent");
        let err = load_latent(&missing, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("missing.latent"), "{err}");
    }

    /// An empty latent of shape [0, 4, 2^63, 2] passed safetensors' checks and overflowed
    /// candle's stride computation.
    #[test]
    fn an_overflowing_empty_shape_is_an_error() {
        let dir = TempDir::new("overflow");
        let header = br#"{"latent_tensor":{"dtype":"F32","shape":[0,4,9223372036854775808,2],"data_offsets":[0,0]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let path = dir.0.join("overflow.latent");
        fs::write(&path, bytes).unwrap();
        let err = load_latent(&path, &Device::Cpu).unwrap_err().to_string();
        assert!(err.contains("overflows"), "{err}");
    }

    #[test]
    fn refuses_latents_of_other_ranks() {
        let dir = TempDir::new("rank");
        let flat = Tensor::zeros((4, 4, 4), DType::F32, &Device::Cpu).unwrap();
        assert!(save_latent(&flat, &dir.0, "flat", None).is_err());
        assert!(fs::read_dir(&dir.0).unwrap().next().is_none());
    }
}
