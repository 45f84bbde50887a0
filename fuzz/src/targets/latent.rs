//! `.latent` files (ComfyUI's SaveLatent format, with vdm's frame count): `load_latent`.

use std::collections::HashMap;
use std::path::Path;

use candle_core::{Device, Tensor};
use fastrand::Rng;
use safetensors::Dtype;
use vdm_nodes::video::latent_file::{
    load_latent, save_latent, FRAMES_METADATA_KEY, LATENT_KEY, VERSION_MARKER_KEY,
};

use super::safetensors::{mutate_file, serialize};
use super::Context;

pub(super) fn seeds(scratch: &Path) -> Vec<Vec<u8>> {
    let folder = scratch.join("latent-seeds");
    let saved = |latent: Tensor, metadata: Option<&HashMap<String, String>>| {
        let path = save_latent(&latent, &folder, "seed", metadata).expect("a valid seed");
        std::fs::read(path).expect("the seed was just written")
    };
    let video = Tensor::arange(0f32, 48.0, &Device::Cpu)
        .and_then(|t| t.reshape((1, 4, 2, 2, 3)))
        .expect("a valid seed");
    let two_videos = Tensor::arange(0f32, 96.0, &Device::Cpu)
        .and_then(|t| t.reshape((2, 4, 3, 2, 2)))
        .expect("a valid seed");
    let mut metadata = HashMap::new();
    metadata.insert("prompt".to_string(), "{\"1\": {}}".to_string());
    let seeds = vec![
        saved(video, None),
        saved(two_videos, Some(&metadata)),
        // ComfyUI's own: a frame batch with the marker and no frame count.
        serialize(
            &[
                (LATENT_KEY, Dtype::F32, vec![3, 4, 2, 2]),
                (VERSION_MARKER_KEY, Dtype::F32, vec![0]),
            ],
            None,
        ),
        // Before the marker: scaled latents.
        serialize(&[(LATENT_KEY, Dtype::F32, vec![2, 4, 1, 2])], None),
        serialize(
            &[
                (LATENT_KEY, Dtype::F16, vec![4, 4, 2, 1]),
                (VERSION_MARKER_KEY, Dtype::F32, vec![0]),
            ],
            Some(&[(FRAMES_METADATA_KEY, "2")]),
        ),
    ];
    let _ = std::fs::remove_dir_all(folder);
    seeds
}

pub(super) fn generate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    mutate_file(rng, seeds, &[FRAMES_METADATA_KEY, "prompt"])
}

pub(super) fn execute(ctx: &Context, input: &[u8]) -> Result<(), String> {
    let path = ctx.case_file("latent", input);
    let latent = load_latent(&path, &Device::Cpu).map_err(|e| e.to_string())?;
    // The loader promises a 5-D latent; anything else is a bug the fuzzer should see.
    assert_eq!(latent.rank(), 5, "load_latent returned {:?}", latent.dims());
    Ok(())
}
