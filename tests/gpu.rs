//! CUDA against the CPU: the same UNet + motion-module forward on both devices. Skipped, with
//! a message, where no CUDA device is present (CPU builds, machines without a GPU).

mod common;

use candle_core::{DType, Device};
use vdm_nodes::models::attention::AttentionHook;
use vdm_nodes::models::motion::{MotionAdapter, MotionAdapterConfig, MotionPatch};
use vdm_nodes::models::unet::{
    UNet2DConditionConfig, UNet2DConditionModel, UNetInputs, UNetPatches,
};

fn cuda() -> Option<Device> {
    match Device::new_cuda(0) {
        Ok(device) => Some(device),
        Err(e) => {
            eprintln!("skipped: no CUDA device ({e})");
            None
        }
    }
}

#[test]
fn unet_forward_on_cuda_matches_cpu() {
    let Some(gpu) = cuda() else { return };
    for case in common::cases("unet_motion_mid") {
        let cfg = UNet2DConditionConfig::from_json_file(&case.join("unet_config.json")).unwrap();
        let mcfg =
            MotionAdapterConfig::from_json_file(&case.join("motion_adapter_config.json")).unwrap();
        let io = common::load_tensors(&case.join("io.safetensors"));
        let run = |device: &Device| {
            let unet = UNet2DConditionModel::from_safetensors(
                &[case.join("unet.safetensors")],
                &cfg,
                DType::F32,
                device,
            )
            .unwrap();
            let adapter = MotionAdapter::from_safetensors(
                &[case.join("motion_adapter.safetensors")],
                &mcfg,
                cfg.norm_num_groups,
                DType::F32,
                device,
            )
            .unwrap();
            let sample = io["sample"].to_device(device).unwrap();
            let ehs = io["encoder_hidden_states"].to_device(device).unwrap();
            let hook = AttentionHook::new();
            let motion = [MotionPatch::new(&adapter)];
            let patches = UNetPatches {
                hook: &hook,
                motion: &motion,
                taps: &[],
            };
            unet.forward(&UNetInputs::new(&sample, 501.0, &ehs), &patches)
                .unwrap()
        };
        let on_cpu = run(&Device::Cpu);
        let on_gpu = run(&gpu);
        common::assert_close("unet forward, CUDA vs CPU", &on_gpu, &on_cpu, 1e-4);
        common::assert_close(
            "unet forward on CUDA vs diffusers",
            &on_gpu,
            &io["out"],
            1e-4,
        );
    }
}
