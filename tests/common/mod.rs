//! Helpers shared by the integration tests: the reference fixtures and error measures.
#![allow(dead_code)]

use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};

/// The folder of diffusers reference fixtures: `$VDM_REFERENCE_DIR`, else
/// `../shared/reference/fixtures` beside the workspace.
pub fn reference_dir() -> PathBuf {
    match std::env::var_os("VDM_REFERENCE_DIR") {
        Some(dir) => PathBuf::from(dir),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared/reference/fixtures"),
    }
}

/// Every case folder whose README.json names `case` (case names may repeat with suffixes in
/// other fixture sets, so match on the README rather than on the folder name). Panics when the
/// fixture folder is missing: parity is never skipped silently.
pub fn cases(case: &str) -> Vec<PathBuf> {
    let root = reference_dir();
    let entries = std::fs::read_dir(&root)
        .unwrap_or_else(|e| panic!("reference fixtures not found at {}: {e}", root.display()));
    let mut found: Vec<PathBuf> = entries
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            let readme = p.join("README.json");
            let Ok(text) = std::fs::read_to_string(&readme) else {
                return false;
            };
            let json: serde_json::Value = serde_json::from_str(&text)
                .unwrap_or_else(|e| panic!("{}: not valid JSON: {e}", readme.display()));
            json["case"].as_str() == Some(case)
        })
        .collect();
    found.sort();
    assert!(
        !found.is_empty(),
        "no fixture case `{case}` under {}",
        root.display()
    );
    found
}

/// The UNet and the motion adapter of a `unet_motion_*` fixture folder (`unet_config.json`,
/// `unet.safetensors`, `motion_adapter_config.json`, `motion_adapter.safetensors`), f32 on the
/// CPU.
pub fn unet_and_motion_adapter(
    dir: &std::path::Path,
) -> (
    vdm_nodes::models::unet::UNet2DConditionModel,
    vdm_nodes::models::motion::MotionAdapter,
) {
    use vdm_nodes::models::motion::{MotionAdapter, MotionAdapterConfig};
    use vdm_nodes::models::unet::{UNet2DConditionConfig, UNet2DConditionModel};
    let dev = Device::Cpu;
    let unet_cfg = UNet2DConditionConfig::from_json_file(&dir.join("unet_config.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let adapter_cfg = MotionAdapterConfig::from_json_file(&dir.join("motion_adapter_config.json"))
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()));
    let unet = UNet2DConditionModel::from_safetensors(
        &[dir.join("unet.safetensors")],
        &unet_cfg,
        DType::F32,
        &dev,
    )
    .unwrap_or_else(|e| panic!("{}: building the UNet: {e}", dir.display()));
    let adapter = MotionAdapter::from_safetensors(
        &[dir.join("motion_adapter.safetensors")],
        &adapter_cfg,
        unet_cfg.norm_num_groups,
        DType::F32,
        &dev,
    )
    .unwrap_or_else(|e| panic!("{}: building the motion adapter: {e}", dir.display()));
    (unet, adapter)
}

/// The tiny UNet with its motion modules applied (the `unet_motion_mid` fixture: v2-style, with a
/// mid-block module), and the fixture's inputs.
pub struct MotionFixture {
    pub model: vdm_nodes::models::patcher::PatchedUNet,
    pub adapter: std::sync::Arc<vdm_nodes::models::motion::MotionAdapter>,
    pub io: std::collections::HashMap<String, Tensor>,
}

pub fn motion_fixture() -> MotionFixture {
    use std::sync::Arc;
    let dir = &cases("unet_motion_mid")[0];
    let (unet, adapter) = unet_and_motion_adapter(dir);
    let adapter = Arc::new(adapter);
    let model = vdm_nodes::models::patcher::PatchedUNet::new(Arc::new(unet))
        .with_motion(adapter.clone(), 1.0)
        .unwrap();
    let io = load_tensors(&dir.join("io.safetensors"));
    MotionFixture { model, adapter, io }
}

impl MotionFixture {
    /// The fixture's call: its sample, timestep and per-frame text.
    pub fn inputs(&self) -> vdm_nodes::models::patcher::UNetInputs<'_> {
        vdm_nodes::models::patcher::UNetInputs::new(
            &self.io["sample"],
            &self.io["timestep"],
            &self.io["encoder_hidden_states"],
        )
    }

    /// The first video of the fixture's sample, as noise to sample from.
    pub fn noise(&self) -> Tensor {
        self.io["sample"].narrow(0, 0, 1).unwrap()
    }

    /// The prompt of the first video (its first frame's text), (1, S, D).
    pub fn text(&self) -> Tensor {
        self.io["encoder_hidden_states"].narrow(0, 0, 1).unwrap()
    }

    /// `steps` DDIM steps of `predictor` from `noise` (one video) with the fixture's prompt,
    /// guidance 7.5 against half the prompt as the negative.
    pub fn sample(
        &self,
        predictor: &dyn vdm_nodes::sampling::NoisePredictor,
        noise: &Tensor,
        steps: usize,
    ) -> candle_core::Result<Tensor> {
        use vdm_nodes::sampling::{SampleInputs, SampleSettings, Sampler, TextConditioning};
        use vdm_nodes::schedulers::{DdimScheduler, DdimSchedulerConfig};
        let scheduler = DdimScheduler::new(DdimSchedulerConfig::sd15())?;
        let text = self.text();
        let negative = (&text * 0.5)?;
        let inputs = SampleInputs {
            noise,
            init_latents: None,
            text: TextConditioning {
                positive: &text,
                negative: &negative,
            },
        };
        let settings = SampleSettings {
            steps,
            guidance_scale: 7.5,
            strength: 1.0,
        };
        Ok(Sampler::new(predictor, &scheduler)
            .sample(&settings, &inputs)?
            .latents)
    }
}

/// Reads every tensor of a safetensors file onto the CPU.
pub fn load_tensors(path: &std::path::Path) -> std::collections::HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// ‖out − ref‖ / ‖ref‖ and max |out − ref|, in f64.
pub fn errors(out: &Tensor, reference: &Tensor) -> (f64, f64) {
    assert_eq!(out.dims(), reference.dims(), "shape mismatch");
    let out = out
        .to_dtype(DType::F64)
        .unwrap()
        .to_device(&Device::Cpu)
        .unwrap();
    let reference = reference.to_dtype(DType::F64).unwrap();
    let diff = (&out - &reference).unwrap();
    let norm = |t: &Tensor| {
        t.sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_scalar::<f64>()
            .unwrap()
            .sqrt()
    };
    let max = diff
        .abs()
        .unwrap()
        .max_all()
        .unwrap()
        .to_scalar::<f64>()
        .unwrap();
    (norm(&diff) / norm(&reference).max(1e-30), max)
}

/// The largest |a − b| over all elements, computed in f64 on the CPU so that tensors of any
/// dtype and device compare alike. Panics, naming both shapes, when the shapes differ: a
/// broadcast difference would hide the mismatch.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f64 {
    assert_eq!(
        a.dims(),
        b.dims(),
        "max_abs_diff: shapes differ ({:?} vs {:?})",
        a.dims(),
        b.dims()
    );
    let as_f64 = |t: &Tensor| {
        t.to_device(&Device::Cpu)
            .and_then(|t| t.to_dtype(DType::F64))
            .unwrap_or_else(|err| panic!("max_abs_diff: cannot read a tensor as f64: {err}"))
    };
    (as_f64(a) - as_f64(b))
        .and_then(|diff| diff.abs())
        .and_then(|diff| diff.max_all())
        .and_then(|max| max.to_scalar::<f64>())
        .unwrap_or_else(|err| panic!("max_abs_diff: {err}"))
}

/// Asserts parity within relative error `tol`, printing both measures.
pub fn assert_close(what: &str, out: &Tensor, reference: &Tensor, tol: f64) {
    let (rel, max) = errors(out, reference);
    println!("{what}: relative error {rel:.3e}, max abs error {max:.3e}");
    assert!(
        rel <= tol,
        "{what}: relative error {rel:.3e} > {tol:.0e} (max abs {max:.3e})"
    );
}

/// The shared library of a workspace plugin crate, built by cargo next to the test binaries
/// (plugins are dev-dependencies for that reason).
pub fn plugin_library(crate_name: &str) -> PathBuf {
    let deps = std::env::current_exe()
        .expect("test binary path")
        .parent()
        .expect("deps dir")
        .to_path_buf();
    let file = format!(
        "{}{}{}",
        std::env::consts::DLL_PREFIX,
        crate_name.replace('-', "_"),
        std::env::consts::DLL_SUFFIX
    );
    let path = deps.join(&file);
    assert!(
        path.exists(),
        "{} was not built; it is a dev-dependency of the tests",
        path.display()
    );
    path
}

/// Tiny SD 1.x models written as real files, from the reference fixtures' weights.
pub struct TinyModels {
    /// The models folder, with ComfyUI's layout.
    pub root: PathBuf,
    /// A diffusers checkpoint folder under `checkpoints/`.
    pub checkpoint: PathBuf,
    /// A diffusers MotionAdapter folder under `animatediff_models/`.
    pub motion_module: PathBuf,
}

/// Writes the fixture UNet, VAE and text encoder as a diffusers folder (with a tiny CLIP
/// tokenizer, since no real vocabulary is available offline) and the fixture motion adapter as
/// a diffusers MotionAdapter folder, under `dir`.
pub fn write_tiny_models(dir: &std::path::Path) -> TinyModels {
    let unet_case = cases("unet_motion_mid").remove(0);
    let vae_case = cases("vae").remove(0);
    let text_case = cases("text_encoder").remove(0);
    let checkpoint = dir.join("checkpoints").join("tiny-sd");
    let copy = |from: PathBuf, to: PathBuf| {
        std::fs::create_dir_all(to.parent().unwrap()).unwrap();
        std::fs::copy(&from, &to).unwrap_or_else(|e| panic!("{}: {e}", from.display()));
    };
    copy(
        unet_case.join("unet_config.json"),
        checkpoint.join("unet/config.json"),
    );
    copy(
        unet_case.join("unet.safetensors"),
        checkpoint.join("unet/diffusion_pytorch_model.safetensors"),
    );
    copy(
        vae_case.join("vae_config.json"),
        checkpoint.join("vae/config.json"),
    );
    copy(
        vae_case.join("vae.safetensors"),
        checkpoint.join("vae/diffusion_pytorch_model.safetensors"),
    );
    copy(
        text_case.join("config.json"),
        checkpoint.join("text_encoder/config.json"),
    );
    copy(
        text_case.join("model.safetensors"),
        checkpoint.join("text_encoder/model.safetensors"),
    );
    write_tiny_tokenizer(&checkpoint.join("tokenizer"));
    std::fs::write(
        checkpoint.join("model_index.json"),
        vdm_nodes::models::load::sd_pipeline_index().to_string(),
    )
    .unwrap();
    let motion_module = dir.join("animatediff_models").join("tiny-motion");
    copy(
        unet_case.join("motion_adapter_config.json"),
        motion_module.join("config.json"),
    );
    copy(
        unet_case.join("motion_adapter.safetensors"),
        motion_module.join("diffusion_pytorch_model.safetensors"),
    );
    TinyModels {
        root: dir.to_path_buf(),
        checkpoint,
        motion_module,
    }
}

/// A CLIP BPE tokenizer in the files diffusers ships (vocab.json, merges.txt): letters, digits
/// and punctuation with and without `</w>`, a few merges, then BOS and EOS.
pub fn write_tiny_tokenizer(dir: &std::path::Path) {
    std::fs::create_dir_all(dir).unwrap();
    vdm_nodes::models::tokenizer::write_letter_vocabulary(dir).unwrap();
}

/// Writes a grey GIF of `frames` frames of a smooth texture (a sum of sinusoids of wavelengths
/// 12–26 px) that moves by `step` whole pixels per frame, so the true flow is `step` everywhere
/// the content stays in view.
pub fn write_moving_texture_gif(
    path: &std::path::Path,
    frames: u32,
    (width, height): (u32, u32),
    step: (i32, i32),
) {
    const WAVES: [(f32, f32, f32); 5] = [
        (0.52, 0.11, 0.3),
        (-0.17, 0.41, 1.9),
        (0.29, -0.33, 4.0),
        (0.08, 0.24, 2.6),
        (0.36, 0.30, 5.1),
    ];
    let file = std::fs::File::create(path).unwrap();
    let mut encoder = image::codecs::gif::GifEncoder::new(file);
    for f in 0..frames as i32 {
        let (dx, dy) = ((step.0 * f) as f32, (step.1 * f) as f32);
        let img = image::RgbaImage::from_fn(width, height, |x, y| {
            let (sx, sy) = (x as f32 - dx, y as f32 - dy);
            let sum: f32 = WAVES
                .iter()
                .map(|(kx, ky, phase)| (kx * sx + ky * sy + phase).sin())
                .sum();
            let grey = (127.5 + 127.5 * sum / WAVES.len() as f32).round() as u8;
            image::Rgba([grey, grey, grey, 255])
        });
        encoder.encode_frame(image::Frame::new(img)).unwrap();
    }
}

/// Runs `workflow` with the vdm-nodes plugin on the CPU, its models under `models`, writing
/// into `out`.
pub fn run_on_tiny_models(
    workflow: &serde_json::Value,
    models: &TinyModels,
    out: &std::path::Path,
) -> Result<vdm::RunSummary, vdm::RunError> {
    let set = vdm::PluginSet::load(&[], &[plugin_library("vdm-nodes")]);
    assert!(set.refused.is_empty(), "{:?}", set.refused);
    vdm::Executor::new(&set, &vdm::events::Silent)
        .with_setting("output_dir", out.to_string_lossy())
        .with_setting("models_dir", models.root.to_string_lossy())
        .with_setting("device", "cpu")
        .run(&vdm::Workflow::from_json(workflow.clone()).unwrap())
}

/// The node id, input and message of the error a run failed with, whether found at validation
/// or while running; panics when the run did not fail on a node.
pub fn node_error(
    result: Result<vdm::RunSummary, vdm::RunError>,
) -> (String, Option<String>, String) {
    match result {
        Err(vdm::RunError::Node(e)) => (
            e.node_id.to_string(),
            e.input.clone().into_option().map(|s| s.into_string()),
            e.to_string(),
        ),
        Err(vdm::RunError::Invalid(report)) => {
            let (node, errors) = report.node_errors.iter().next().expect("a node error");
            let issue = &errors.errors[0];
            let input = issue.extra_info["input_name"].as_str().map(str::to_string);
            (node.clone(), input, issue.details.clone())
        }
        other => panic!("expected a node error, got {:?}", other.map(|s| s.executed)),
    }
}
