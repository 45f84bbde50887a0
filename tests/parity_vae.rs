//! AutoencoderKL against diffusers on the `vae` fixture cases, and the video decoding of the
//! pipeline cases.

mod common;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use common::max_abs_diff;
use vdm_nodes::models::load::{open_vae, WeightMap};
use vdm_nodes::models::vae::{AutoencoderKL, AutoencoderKLConfig};

const TOLERANCE: f64 = 1e-4;

fn read_config(path: &Path) -> AutoencoderKLConfig {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| {
        panic!(
            "{}: VAE case folder without its config: {e}",
            path.display()
        )
    });
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn build(weights: &WeightMap, config: &AutoencoderKLConfig) -> AutoencoderKL {
    AutoencoderKL::new(weights.var_builder(DType::F32, &Device::Cpu), config)
        .unwrap_or_else(|e| panic!("building the VAE from {}: {e}", weights.origin()))
}

/// The VAE of a `vae` case folder: `vae_config.json`, `vae.safetensors` and `io.safetensors`.
fn vae_case(case: &Path) -> (AutoencoderKL, HashMap<String, Tensor>) {
    let config = read_config(&case.join("vae_config.json"));
    let weights = open_vae(
        case.join("vae.safetensors"),
        Some(config.block_out_channels.len()),
    )
    .unwrap_or_else(|e| panic!("{e}"));
    (
        build(&weights, &config),
        common::load_tensors(&case.join("io.safetensors")),
    )
}

fn io<'a>(tensors: &'a HashMap<String, Tensor>, case: &Path, name: &str) -> &'a Tensor {
    tensors
        .get(name)
        .unwrap_or_else(|| panic!("{}: io.safetensors has no `{name}`", case.display()))
}

#[test]
fn parity_vae_encode_decode() {
    parity_vae_encode_decode_check();
}

/// The composed candle ops (the differentiable path) give diffusers' result too.
#[test]
fn parity_vae_encode_decode_on_the_composed_path() {
    vdm_nodes::models::ops::with_composed_ops(parity_vae_encode_decode_check);
}

fn parity_vae_encode_decode_check() {
    for case in common::cases("vae") {
        println!("case {}", case.display());
        let (vae, io_tensors) = vae_case(&case);
        let tensor = |name| io(&io_tensors, &case, name);
        let posterior = vae.encode(tensor("image")).unwrap();
        common::assert_close(
            "latent_mean",
            &posterior.mean,
            tensor("latent_mean"),
            TOLERANCE,
        );
        common::assert_close(
            "latent_logvar",
            &posterior.logvar,
            tensor("latent_logvar"),
            TOLERANCE,
        );
        common::assert_close(
            "latent_std",
            &posterior.std,
            tensor("latent_std"),
            TOLERANCE,
        );
        let decoded = vae.decode(tensor("decode_input")).unwrap();
        common::assert_close("decoded", &decoded, tensor("decoded"), TOLERANCE);
    }
}

/// Older hub VAEs name the mid-block attention `query/key/value/proj_attn`, some with 1×1
/// convolution kernels; the loader renames them and the results do not change.
#[test]
fn parity_vae_deprecated_attention_names() {
    for case in common::cases("vae") {
        println!("case {}", case.display());
        let config = read_config(&case.join("vae_config.json"));
        let original = common::load_tensors(&case.join("vae.safetensors"));
        let mut renamed = HashMap::new();
        for (key, tensor) in original {
            let (key, tensor) = match key.split_once(".mid_block.attentions.0.") {
                Some((side, leaf)) => {
                    let leaf = leaf
                        .replace("to_q.", "query.")
                        .replace("to_k.", "key.")
                        .replace("to_v.", "value.")
                        .replace("to_out.0.", "proj_attn.");
                    let tensor = if leaf.ends_with("weight") && tensor.rank() == 2 {
                        tensor.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
                    } else {
                        tensor
                    };
                    (format!("{side}.mid_block.attentions.0.{leaf}"), tensor)
                }
                None => (key, tensor),
            };
            renamed.insert(key, tensor);
        }
        assert!(renamed.keys().any(|k| k.ends_with("proj_attn.weight")));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("old_vae.safetensors");
        candle_core::safetensors::save(&renamed, &path).unwrap();
        let weights = open_vae(&path, None).unwrap();
        let vae = build(&weights, &config);
        let io_tensors = common::load_tensors(&case.join("io.safetensors"));
        let tensor = |name| io(&io_tensors, &case, name);
        let posterior = vae.encode(tensor("image")).unwrap();
        common::assert_close(
            "latent_mean",
            &posterior.mean,
            tensor("latent_mean"),
            TOLERANCE,
        );
        let decoded = vae.decode(tensor("decode_input")).unwrap();
        common::assert_close("decoded", &decoded, tensor("decoded"), TOLERANCE);
    }
}

/// The path of the VAE a pipeline case names in its README (`components.vae`, relative to the
/// case folder).
fn pipeline_vae_path(case: &Path) -> PathBuf {
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("README.json")).unwrap()).unwrap();
    let described = readme["components"]["vae"]
        .as_str()
        .unwrap_or_else(|| panic!("{}: README.json names no components.vae", case.display()));
    let relative = described.split_whitespace().next().unwrap();
    let path = case.join(relative);
    assert!(
        path.is_file(),
        "{}: VAE weights {} not found",
        case.display(),
        path.display()
    );
    path
}

/// `decode_video` on scaled latents (B, C, F, h, w) equals the pipeline's `decode_latents`,
/// which divides by scaling_factor and decodes the frames as one batch.
#[test]
fn parity_vae_decode_video_pipeline() {
    parity_vae_decode_video_pipeline_check();
}

/// The composed candle ops (the differentiable path) give diffusers' result too.
#[test]
fn parity_vae_decode_video_pipeline_on_the_composed_path() {
    vdm_nodes::models::ops::with_composed_ops(parity_vae_decode_video_pipeline_check);
}

fn parity_vae_decode_video_pipeline_check() {
    for kind in ["pipeline", "pipeline_freeinit"] {
        for case in common::cases(kind) {
            println!("case {}", case.display());
            let vae_path = pipeline_vae_path(&case);
            let config = read_config(&vae_path.with_file_name("vae_config.json"));
            let vae = build(&open_vae(&vae_path, None).unwrap(), &config);
            let io_tensors = common::load_tensors(&case.join("io.safetensors"));
            let latents = io(&io_tensors, &case, "final_latents");
            let expected = io(&io_tensors, &case, "decoded_video");
            let video = vae.decode_video(latents, 3).unwrap();
            common::assert_close("decoded_video", &video, expected, TOLERANCE);
        }
    }
}

/// Decoding and encoding a video a few frames at a time gives what one batch gives.
#[test]
fn chunked_video_coding_equals_unchunked() {
    let case = &common::cases("vae")[0];
    let (vae, _) = vae_case(case);
    let dev = Device::Cpu;
    let latents = Tensor::randn(0f32, 1.0, (2, 4, 5, 6, 4), &dev).unwrap();
    let whole = vae.decode_video(&latents, 10).unwrap();
    assert_eq!(whole.dims(), &[2, 3, 5, 12, 8]);
    for chunk in [1, 3, 4] {
        let chunked = vae.decode_video(&latents, chunk).unwrap();
        let diff = max_abs_diff(&whole, &chunked);
        println!("decode_video chunk {chunk}: max abs difference {diff:.3e}");
        assert!(diff <= 1e-5, "chunk {chunk}: {diff}");
    }
    // Frame f of video b is the b·F + f image of the flattened batch, decoded alone.
    let frame = latents
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(2, 3, 1)
        .unwrap()
        .squeeze(2)
        .unwrap();
    let alone = vae
        .decode(&(frame / vae.config().scaling_factor).unwrap())
        .unwrap();
    let from_video = whole
        .narrow(0, 1, 1)
        .unwrap()
        .narrow(2, 3, 1)
        .unwrap()
        .squeeze(2)
        .unwrap();
    assert!(max_abs_diff(&alone, &from_video) <= 1e-5);

    let video = Tensor::rand(-1f32, 1.0, (1, 3, 4, 12, 8), &dev).unwrap();
    let noise = Tensor::randn(0f32, 1.0, (1, 4, 4, 6, 4), &dev).unwrap();
    let whole = vae.encode_video(&video, 4, Some(&noise)).unwrap();
    assert_eq!(whole.dims(), &[1, 4, 4, 6, 4]);
    let chunked = vae.encode_video(&video, 3, Some(&noise)).unwrap();
    assert!(max_abs_diff(&whole, &chunked) <= 1e-5);
    // Scaled: the mean of frame 0, times scaling_factor.
    let mode = vae.encode_video(&video, 2, None).unwrap();
    let first = video.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    let mean = (vae.encode(&first).unwrap().mean * vae.config().scaling_factor).unwrap();
    let from_video = mode.narrow(2, 0, 1).unwrap().squeeze(2).unwrap();
    assert!(max_abs_diff(&mean, &from_video) <= 1e-5);

    assert!(vae.decode_video(&latents, 0).is_err());
}
