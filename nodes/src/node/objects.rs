//! The objects that travel between nodes as handles, so tensors stay on their device.

use abi_stable::std_types::RString;
use candle_core::{DType, Device, Tensor};
use vdm_ffi::{HostTensor, PluginObject};

use std::sync::Arc;

use crate::models::checkpoint::MotionModuleFile;
use crate::models::clip::ClipTextTransformer;
use crate::models::lora::TextEncoderWeights;
use crate::models::patcher::PatchedUNet;
use crate::models::tokenizer::ClipTokenizer;
use crate::models::vae::AutoencoderKL;
use crate::sampling::comfy_noise::NoiseSettings;
use crate::sampling::k_diffusion::ModelSamplingDiscrete;
use crate::sampling::ContextOptions;
use crate::video::entropy::EntropyTable;
use crate::video::freeinit::{ComfyReinit, FreeInitConfig};
use crate::video::motion::MotionField;
use crate::video::reuse::ReuseMode;

use super::PluginType;

/// A `LATENT`: video latents (batch, channels, frames, height/8, width/8).
#[derive(Debug, Clone)]
pub struct Latent {
    pub samples: Tensor,
}

/// An `IMAGE`: frames × height × width × 3, f32 in [0, 1], ComfyUI's layout.
#[derive(Debug, Clone)]
pub struct Images {
    pub frames: Tensor,
}

fn describe_tensor(tag: &str, t: &Tensor) -> RString {
    format!(
        "{tag} {:?} {:?} {:?}",
        t.dims(),
        t.dtype(),
        t.device().location()
    )
    .into()
}

impl PluginObject for Latent {
    fn describe(&self) -> RString {
        describe_tensor("LATENT", &self.samples)
    }
}

impl PluginObject for Images {
    fn describe(&self) -> RString {
        describe_tensor("IMAGE", &self.frames)
    }
}

impl PluginType for Latent {
    const TYPE_TAG: &'static str = "LATENT";

    /// ComfyUI's 4-D latents (batch·frames, C, h, w) are taken as one video of that many frames.
    fn from_host_tensor(tensor: &HostTensor) -> Result<Self, String> {
        let samples = host_to_tensor(tensor)?;
        let samples = match samples.rank() {
            5 => samples,
            4 => samples
                .permute((1, 0, 2, 3))
                .and_then(|t| t.unsqueeze(0))
                .map_err(|e| e.to_string())?,
            r => {
                return Err(format!(
                    "a LATENT tensor has 4 or 5 dimensions, this one has {r}"
                ))
            }
        };
        Ok(Latent { samples })
    }
}

impl PluginType for Images {
    const TYPE_TAG: &'static str = "IMAGE";

    fn from_host_tensor(tensor: &HostTensor) -> Result<Self, String> {
        let frames = host_to_tensor(tensor)?;
        match frames.dims() {
            [_, _, _, 3] => Ok(Images { frames }),
            dims => Err(format!(
                "an IMAGE tensor is frames × height × width × 3, got {dims:?}"
            )),
        }
    }
}

/// A `MODEL`: a frozen UNet and its patches (motion module, attention processors), and how
/// ComfyUI's samplers run it.
#[derive(Debug, Clone)]
pub struct Model {
    pub unet: PatchedUNet,
    pub sampling: SamplingSettings,
}

impl Model {
    pub fn new(unet: PatchedUNet) -> Self {
        Self {
            unet,
            sampling: SamplingSettings::default(),
        }
    }

    /// This model with `unet` in place of its UNet, keeping its sampling settings.
    pub fn with_unet(&self, unet: PatchedUNet) -> Self {
        Self {
            unet,
            sampling: self.sampling.clone(),
        }
    }
}

/// What ComfyUI and AnimateDiff-Evolved nodes set on a `MODEL` for ComfyUI's samplers
/// (`KSampler`) besides patches.
#[derive(Debug, Clone, Default)]
pub struct SamplingSettings {
    /// The training noise schedule the samplers' σ come from; `None` is the checkpoint's (SD:
    /// ComfyUI's `linear`).
    pub model_sampling: Option<Arc<ModelSamplingDiscrete>>,
    /// Context windows for clips longer than the motion module sees at once.
    pub context: Option<ContextOptions>,
    /// How the initial noise is drawn (AnimateDiff-Evolved's sample settings).
    pub noise: NoiseSettings,
    /// FreeInit passes (AnimateDiff-Evolved's iteration options).
    pub iterations: Option<IterationOptions>,
}

/// An `ITERATION_OPTS` of AnimateDiff-Evolved: FreeInit passes of ComfyUI's samplers.
#[derive(Debug, Clone, Copy)]
pub struct IterationOptions {
    /// Passes, filter and stop frequencies.
    pub config: FreeInitConfig,
    pub reinit: ComfyReinit,
    /// The timestep whose σ the result is diffused to between passes.
    pub sigma_step: usize,
    /// Re-initialise before the first pass too (from the input latents).
    pub apply_to_first: bool,
    /// Added per pass to the batch offset and seed offset of the fresh noise.
    pub iter_batch_offset: usize,
    pub iter_seed_offset: i64,
}

/// A `MOTION_MODEL_ADE`: a motion module file as AnimateDiff-Evolved's loader returns it.
#[derive(Debug, Clone)]
pub struct AdeMotionModel {
    pub file: Arc<MotionModuleFile>,
}

/// One motion LoRA to merge into a motion model.
#[derive(Debug, Clone)]
pub struct MotionLora {
    pub path: std::path::PathBuf,
    pub strength: f64,
}

/// A `MOTION_LORA`: motion LoRAs in the order they are merged.
#[derive(Debug, Clone, Default)]
pub struct MotionLoraList {
    pub loras: Vec<MotionLora>,
}

/// One motion model to apply, with AnimateDiff-Evolved's settings.
#[derive(Debug, Clone)]
pub struct AppliedMotionModel {
    pub file: Arc<MotionModuleFile>,
    /// Merged into the module's weights, in order.
    pub loras: Vec<MotionLora>,
    /// Multiplier of the temporal attention's keys (`scale_multival`; 1 as trained).
    pub attention_scale: f64,
    /// Weight of the modules' output against their input (`effect_multival`; 1 as trained,
    /// 0 the image model).
    pub effect: f64,
    /// Where in the schedule the modules act, as ComfyUI's percentages.
    pub start_percent: f64,
    pub end_percent: f64,
}

/// An `M_MODELS`: motion models to apply, in the order they run.
#[derive(Debug, Clone, Default)]
pub struct MotionModelList {
    pub models: Vec<AppliedMotionModel>,
}

/// A `MULTIVAL`: one value for every frame (AnimateDiff-Evolved's multival, without a mask).
#[derive(Debug, Clone, Copy)]
pub struct Multival {
    pub value: f64,
}

/// A `SAMPLE_SETTINGS` of AnimateDiff-Evolved.
#[derive(Debug, Clone, Copy, Default)]
pub struct SampleSettings {
    pub noise: NoiseSettings,
    pub iterations: Option<IterationOptions>,
}

/// A `CLIP`: the text encoder, its tokenizer when one was found, and the layer to stop at.
#[derive(Clone)]
pub struct Clip {
    pub encoder: Arc<ClipTextTransformer>,
    /// The weights `encoder` was built from (frozen, plus those replaced by LoRAs), from which
    /// a patched copy is built.
    pub weights: TextEncoderWeights,
    pub tokenizer: Option<Arc<ClipTokenizer>>,
    /// 1 = the last layer (ComfyUI's `CLIPSetLastLayer` −1).
    pub clip_skip: usize,
    /// Where a tokenizer was looked for, for the error when there is none.
    pub tokenizer_search: String,
}

impl Clip {
    /// The tokenizer, or why there is none.
    pub fn tokenizer(&self) -> Result<&ClipTokenizer, String> {
        self.tokenizer.as_deref().ok_or_else(|| {
            format!(
                "this checkpoint has no CLIP tokenizer; put SD 1.x's tokenizer files (vocab.json, merges.txt) in one of: {}",
                self.tokenizer_search
            )
        })
    }
}

impl std::fmt::Debug for Clip {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Clip")
            .field("has_tokenizer", &self.tokenizer.is_some())
            .field("clip_skip", &self.clip_skip)
            .finish()
    }
}

/// A `VAE`.
#[derive(Clone)]
pub struct Vae {
    pub model: Arc<AutoencoderKL>,
}

impl std::fmt::Debug for Vae {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vae")
            .field("config", self.model.config())
            .finish()
    }
}

/// A `MOTION_MODULE`: read from disk, bound to a UNet when applied.
#[derive(Debug, Clone)]
pub struct MotionModule {
    pub file: Arc<MotionModuleFile>,
}

/// A `MASK`: (frames, height, width) in [0, 1], ComfyUI's layout.
#[derive(Debug, Clone)]
pub struct Mask {
    pub mask: Tensor,
}

/// A `CONDITIONING`: text embeddings, one per video (B, 77·chunks, D), or with `per_frame`
/// one per frame of a video (F, 77·chunks, D; prompt travel).
#[derive(Debug, Clone)]
pub struct Conditioning {
    pub embeddings: Tensor,
    pub per_frame: bool,
}

impl Conditioning {
    /// One prompt for every video.
    pub fn per_video(embeddings: Tensor) -> Self {
        Self {
            embeddings,
            per_frame: false,
        }
    }
}

/// `FREEINIT` settings for the sampler.
#[derive(Debug, Clone)]
pub struct FreeInit {
    pub config: FreeInitConfig,
}

/// `CONTEXT_OPTIONS` for the sampler.
#[derive(Debug, Clone)]
pub struct Context {
    pub options: ContextOptions,
}

/// `REUSE_OPTIONS` for the sampler: Step Selector's denoising-reuse settings. The motion
/// stays at the frames' resolution until the sampler, which knows the latents' size, turns it
/// into latent flow.
#[derive(Debug, Clone)]
pub struct Reuse {
    pub key_stride: usize,
    pub reuse_until: f64,
    pub mode: ReuseMode,
    /// The clip's motion for flow propagation; `None` propagates by copy.
    pub motion: Option<MotionField>,
}

/// A `MOTION`: the dense forward flow of a clip, its magnitude and the clip amplitude.
#[derive(Debug, Clone)]
pub struct Motion {
    pub field: MotionField,
}

/// An `ENTROPY_PROBE`: the table that a probed model's runs fill.
#[derive(Debug, Clone)]
pub struct EntropyProbe {
    pub table: Arc<EntropyTable>,
}

/// A `VHS_VIDEOINFO`: what Video Helper Suite's loaders report about the source file and the
/// frames loaded from it (rates in frames per second, durations in seconds, sizes in pixels).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct VideoInfo {
    pub source_fps: f64,
    pub source_frame_count: usize,
    pub source_duration: f64,
    pub source_width: usize,
    pub source_height: usize,
    pub loaded_fps: f64,
    pub loaded_frame_count: usize,
    pub loaded_duration: f64,
    pub loaded_width: usize,
    pub loaded_height: usize,
}

/// `VHS_FILENAMES`: whether a Video Combine saved to the output folder (else the temporary
/// one) and the files it wrote, as Video Helper Suite's `(save_output, paths)`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filenames {
    pub save_output: bool,
    pub paths: Vec<std::path::PathBuf>,
}

/// An `AUDIO`: ComfyUI's waveform (batch, channels, samples) at `sample_rate`; `waveform` is
/// `None` for a source without sound (Video Helper Suite's loaders then give an empty audio).
#[derive(Debug, Clone)]
pub struct Audio {
    pub waveform: Option<Tensor>,
    pub sample_rate: u32,
}

/// A `VIDEO` of ComfyUI's core video nodes: frames (F, H, W, 3) in [0, 1], their rate, and
/// the sound.
#[derive(Debug, Clone)]
pub struct Video {
    pub frames: Tensor,
    pub fps: f64,
    pub audio: Audio,
}

macro_rules! plugin_type {
    ($t:ty, $tag:literal, |$s:ident| $describe:expr) => {
        impl PluginObject for $t {
            fn describe(&self) -> RString {
                let $s = self;
                RString::from(format!("{} {}", $tag, $describe))
            }
        }
        impl PluginType for $t {
            const TYPE_TAG: &'static str = $tag;
        }
    };
}

plugin_type!(Model, "MODEL", |m| format!("{:?}", m.unet));
plugin_type!(Clip, "CLIP", |c| format!("{c:?}"));
plugin_type!(Vae, "VAE", |v| format!("{v:?}"));
plugin_type!(MotionModule, "MOTION_MODULE", |m| m
    .file
    .description
    .clone());
plugin_type!(Conditioning, "CONDITIONING", |c| format!(
    "{:?}",
    c.embeddings.dims()
));
plugin_type!(Video, "VIDEO", |v| format!(
    "{:?} at {} fps",
    v.frames.dims(),
    v.fps
));
plugin_type!(Mask, "MASK", |m| format!("{:?}", m.mask.dims()));
plugin_type!(AdeMotionModel, "MOTION_MODEL_ADE", |m| m
    .file
    .description
    .clone());
plugin_type!(MotionModelList, "M_MODELS", |m| format!(
    "{} motion models",
    m.models.len()
));
plugin_type!(MotionLoraList, "MOTION_LORA", |m| format!(
    "{} motion LoRAs",
    m.loras.len()
));
plugin_type!(Multival, "MULTIVAL", |m| format!("{}", m.value));
plugin_type!(SampleSettings, "SAMPLE_SETTINGS", |s| format!(
    "{:?}",
    s.noise
));
plugin_type!(IterationOptions, "ITERATION_OPTS", |i| format!(
    "{:?}",
    i.config
));
plugin_type!(FreeInit, "FREEINIT", |f| format!("{:?}", f.config));
plugin_type!(Context, "CONTEXT_OPTIONS", |c| format!("{:?}", c.options));
plugin_type!(EntropyProbe, "ENTROPY_PROBE", |p| format!(
    "{} rows",
    p.table.rows().len()
));
plugin_type!(Reuse, "REUSE_OPTIONS", |r| format!(
    "key stride {}, reuse until {}, {:?}, {}",
    r.key_stride,
    r.reuse_until,
    r.mode,
    match &r.motion {
        Some(m) => format!("flow {:?}", m.flow.dims()),
        None => "copy".to_owned(),
    }
));
plugin_type!(Motion, "MOTION", |m| format!(
    "flow {:?}, amplitude {:.4}",
    m.field.flow.dims(),
    m.field.amplitude
));

plugin_type!(VideoInfo, "VHS_VIDEOINFO", |v| format!(
    "{}×{} {} frames at {:.3} fps (source {}×{} {} frames at {:.3} fps)",
    v.loaded_width,
    v.loaded_height,
    v.loaded_frame_count,
    v.loaded_fps,
    v.source_width,
    v.source_height,
    v.source_frame_count,
    v.source_fps
));
plugin_type!(Filenames, "VHS_FILENAMES", |f| format!(
    "save_output {}, {:?}",
    f.save_output, f.paths
));
plugin_type!(Audio, "AUDIO", |a| match &a.waveform {
    Some(w) => format!("{:?} at {} Hz", w.dims(), a.sample_rate),
    None => "none".to_owned(),
});

/// A host tensor to a CPU candle tensor (f16/bf16 are widened to f32).
pub fn host_to_tensor(t: &HostTensor) -> Result<Tensor, String> {
    if !t.is_consistent() {
        return Err(format!(
            "tensor data holds {} bytes, but shape {:?} of {:?} needs {}",
            t.data.len(),
            t.shape.as_slice(),
            t.dtype,
            t.elem_count() * t.dtype.size_in_bytes()
        ));
    }
    let shape: Vec<usize> = t.shape.iter().map(|&d| d as usize).collect();
    let dtype = match t.dtype {
        vdm_ffi::DType::U8 => DType::U8,
        vdm_ffi::DType::U32 => DType::U32,
        vdm_ffi::DType::I64 => DType::I64,
        vdm_ffi::DType::F16 => DType::F16,
        vdm_ffi::DType::BF16 => DType::BF16,
        vdm_ffi::DType::F32 => DType::F32,
        vdm_ffi::DType::F64 => DType::F64,
    };
    let tensor = Tensor::from_raw_buffer(t.data.as_slice(), dtype, &shape, &Device::Cpu)
        .map_err(|e| e.to_string())?;
    match dtype {
        DType::F16 | DType::BF16 => tensor.to_dtype(DType::F32).map_err(|e| e.to_string()),
        _ => Ok(tensor),
    }
}

/// A candle tensor (any device) to a host tensor.
pub fn tensor_to_host(t: &Tensor) -> candle_core::Result<HostTensor> {
    let t = t.to_device(&Device::Cpu)?.contiguous()?;
    let (dtype, data): (vdm_ffi::DType, Vec<u8>) = match t.dtype() {
        DType::U8 => (vdm_ffi::DType::U8, t.flatten_all()?.to_vec1::<u8>()?),
        DType::U32 => (
            vdm_ffi::DType::U32,
            bytes(&t.flatten_all()?.to_vec1::<u32>()?),
        ),
        DType::I64 => (
            vdm_ffi::DType::I64,
            bytes(&t.flatten_all()?.to_vec1::<i64>()?),
        ),
        DType::F64 => (
            vdm_ffi::DType::F64,
            bytes(&t.flatten_all()?.to_vec1::<f64>()?),
        ),
        _ => (
            vdm_ffi::DType::F32,
            bytes(&t.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?),
        ),
    };
    Ok(HostTensor {
        dtype,
        shape: t.dims().iter().map(|&d| d as u64).collect(),
        data: data.into(),
    })
}

fn bytes<T: Copy + ToLeBytes>(values: &[T]) -> Vec<u8> {
    values.iter().flat_map(|v| v.to_le()).collect()
}

trait ToLeBytes {
    fn to_le(self) -> Vec<u8>;
}

macro_rules! le_bytes {
    ($($t:ty),*) => {$(impl ToLeBytes for $t { fn to_le(self) -> Vec<u8> { self.to_le_bytes().to_vec() } })*};
}
le_bytes!(u32, i64, f32, f64);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_tensor_round_trip() {
        let t = Tensor::arange(0f32, 24.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3, 4))
            .unwrap();
        let host = tensor_to_host(&t).unwrap();
        assert!(host.is_consistent());
        let back = host_to_tensor(&host).unwrap();
        assert_eq!(back.to_vec3::<f32>().unwrap(), t.to_vec3::<f32>().unwrap());
    }

    #[test]
    fn inconsistent_host_tensor_is_refused() {
        let mut host =
            tensor_to_host(&Tensor::zeros((2, 2), DType::F32, &Device::Cpu).unwrap()).unwrap();
        host.data.pop();
        assert!(host_to_tensor(&host).unwrap_err().contains("needs 16"));
    }
}
