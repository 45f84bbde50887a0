//! FreeInit's frequency filter and mixing against diffusers' `enable_free_init`.

mod common;

use candle_core::Device;
use vdm_nodes::video::freeinit::{
    low_pass_filter_tensor, mix_frequencies, FilterKind, FreeInitConfig,
};

fn config_of(case: &std::path::Path) -> FreeInitConfig {
    let readme: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(case.join("README.json")).unwrap()).unwrap();
    let p = &readme["parameters"]["freeinit"];
    assert!(
        p.is_object(),
        "{}: README.json has no parameters.freeinit",
        case.display()
    );
    FreeInitConfig {
        iterations: p["num_iters"].as_u64().unwrap() as usize,
        filter: p["method"].as_str().unwrap().parse::<FilterKind>().unwrap(),
        order: p["order"].as_u64().unwrap() as u32,
        spatial_stop_frequency: p["spatial_stop_frequency"].as_f64().unwrap(),
        temporal_stop_frequency: p["temporal_stop_frequency"].as_f64().unwrap(),
        fast_sampling: p["use_fast_sampling"].as_bool().unwrap(),
    }
}

#[test]
fn freeinit_filter_and_mixing_parity() {
    for case in common::cases("pipeline_freeinit") {
        let cfg = config_of(&case);
        let t = common::load_tensors(&case.join("io.safetensors"));
        let reference_mask = &t["freeinit.low_pass_filter"];
        let (_, c, f, h, w) = reference_mask.dims5().unwrap();
        let mask = low_pass_filter_tensor(&cfg, f, h, w, &Device::Cpu)
            .unwrap()
            .repeat((1, c, 1, 1, 1))
            .unwrap();
        common::assert_close("freeinit.low_pass_filter", &mask, reference_mask, 1e-6);
        let mixed = mix_frequencies(&t["freeinit.z_t"], &t["freeinit.z_rand"], &cfg).unwrap();
        common::assert_close(
            "freeinit.mixed_latents",
            &mixed,
            &t["freeinit.mixed_latents"],
            1e-4,
        );
    }
}
