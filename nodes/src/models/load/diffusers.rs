//! diffusers folders: a pipeline (`model_index.json` plus one subfolder per component) and the
//! component folders themselves (`config.json` plus weights).

use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;

use super::error::{LoadError, LoadResult};
use super::formats::{first_existing, open_safetensors_index, open_weights};
use super::ldm::{normalize_clip_keys, normalize_vae_keys};
use super::weights::{existing, WeightMap};

/// Weight file names of a component folder, most preferred first: full precision before the
/// `fp16` variant, safetensors before PyTorch pickles, diffusers' names before transformers'.
pub const WEIGHT_FILE_NAMES: [&str; 12] = [
    "diffusion_pytorch_model.safetensors",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors.index.json",
    "model.safetensors.index.json",
    "diffusion_pytorch_model.fp16.safetensors",
    "model.fp16.safetensors",
    "diffusion_pytorch_model.fp16.safetensors.index.json",
    "model.fp16.safetensors.index.json",
    "diffusion_pytorch_model.bin",
    "pytorch_model.bin",
    "diffusion_pytorch_model.fp16.bin",
    "pytorch_model.fp16.bin",
];

/// One model folder of a diffusers pipeline (`unet/`, `vae/`, `text_encoder/`, a
/// `MotionAdapter` folder, …).
#[derive(Debug, Clone)]
pub struct DiffusersComponent {
    pub dir: PathBuf,
    pub config_path: PathBuf,
    pub config: serde_json::Value,
    pub weight_file: PathBuf,
    /// The weights under the names the models ask for: a VAE's deprecated attention names and
    /// a CLIP text encoder saved without its `text_model.` prefix are normalised.
    pub weights: WeightMap,
}

impl DiffusersComponent {
    pub fn open(dir: impl AsRef<Path>) -> LoadResult<Self> {
        let dir = existing(dir.as_ref())?;
        let config_path = dir.join("config.json");
        let config = read_json(&config_path)?;
        let (weight_file, weights) = open_folder_weights(dir)?;
        let weights = if is_clip_text_config(&config) {
            normalize_clip_keys(weights)?
        } else if config["_class_name"] == "AutoencoderKL" {
            normalize_vae_keys(weights)?
        } else {
            weights
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            config_path,
            config,
            weight_file,
            weights,
        })
    }

    /// The config as a typed struct (`AutoencoderKLConfig`, a UNet config, …).
    pub fn parse_config<T: DeserializeOwned>(&self) -> LoadResult<T> {
        serde_json::from_value(self.config.clone()).map_err(|e| LoadError::InvalidConfig {
            path: self.config_path.clone(),
            reason: e.to_string(),
        })
    }

    /// diffusers' `_class_name`, or the first of transformers' `architectures`.
    pub fn class_name(&self) -> Option<&str> {
        self.config["_class_name"]
            .as_str()
            .or_else(|| self.config["architectures"][0].as_str())
    }
}

/// The weights of a model folder, from the most preferred of [`WEIGHT_FILE_NAMES`] present.
pub(crate) fn open_folder_weights(dir: &Path) -> LoadResult<(PathBuf, WeightMap)> {
    let weight_file =
        first_existing(dir, &WEIGHT_FILE_NAMES).ok_or_else(|| LoadError::UnrecognisedFormat {
            path: dir.to_path_buf(),
            expected: format!(
                "a weight file named one of {}",
                WEIGHT_FILE_NAMES.join(", ")
            ),
            found: list_folder(dir),
        })?;
    let weights = if weight_file.to_string_lossy().ends_with(".index.json") {
        open_safetensors_index(&weight_file)?
    } else {
        open_weights(&weight_file)?
    };
    Ok((weight_file, weights))
}

fn is_clip_text_config(config: &serde_json::Value) -> bool {
    config["model_type"] == "clip_text_model"
        || config["architectures"].as_array().is_some_and(|a| {
            a.iter()
                .any(|c| c.as_str().is_some_and(|c| c.starts_with("CLIPText")))
        })
}

/// The files of a CLIP BPE tokenizer folder.
#[derive(Debug, Clone)]
pub struct TokenizerFiles {
    pub dir: PathBuf,
    pub vocab: PathBuf,
    pub merges: PathBuf,
    /// `tokenizer.json`, when the folder has one.
    pub tokenizer_json: Option<PathBuf>,
    /// `tokenizer_config.json`, when the folder has one.
    pub config: Option<serde_json::Value>,
}

impl TokenizerFiles {
    pub fn open(dir: impl AsRef<Path>) -> LoadResult<Self> {
        let dir = existing(dir.as_ref())?;
        let required = |name: &str| {
            let path = dir.join(name);
            if path.is_file() {
                Ok(path)
            } else {
                Err(LoadError::UnrecognisedFormat {
                    path: dir.to_path_buf(),
                    expected: "a CLIP tokenizer folder with vocab.json and merges.txt".into(),
                    found: list_folder(dir),
                })
            }
        };
        let config_path = dir.join("tokenizer_config.json");
        let config = if config_path.is_file() {
            Some(read_json(&config_path)?)
        } else {
            None
        };
        Ok(Self {
            dir: dir.to_path_buf(),
            vocab: required("vocab.json")?,
            merges: required("merges.txt")?,
            tokenizer_json: Some(dir.join("tokenizer.json")).filter(|p| p.is_file()),
            config,
        })
    }
}

/// A diffusers pipeline folder (`StableDiffusionPipeline`, `AnimateDiffPipeline`, …).
#[derive(Debug, Clone)]
pub struct DiffusersPipeline {
    pub root: PathBuf,
    pub model_index: serde_json::Value,
}

impl DiffusersPipeline {
    pub fn open(root: impl AsRef<Path>) -> LoadResult<Self> {
        let root = existing(root.as_ref())?;
        let index_path = root.join("model_index.json");
        if !index_path.is_file() {
            return Err(LoadError::UnrecognisedFormat {
                path: root.to_path_buf(),
                expected: "a diffusers pipeline folder with model_index.json".into(),
                found: list_folder(root),
            });
        }
        Ok(Self {
            root: root.to_path_buf(),
            model_index: read_json(&index_path)?,
        })
    }

    /// The pipeline class named in `model_index.json`.
    pub fn class_name(&self) -> Option<&str> {
        self.model_index["_class_name"].as_str()
    }

    /// Whether `model_index.json` lists `name` as a present (non-null) component.
    pub fn has_component(&self, name: &str) -> bool {
        self.model_index[name]
            .as_array()
            .is_some_and(|entry| entry.iter().all(|v| !v.is_null()))
    }

    /// The component folder `name` (`unet`, `vae`, `text_encoder`, `motion_adapter`, …).
    pub fn component(&self, name: &str) -> LoadResult<DiffusersComponent> {
        let dir = self.root.join(name);
        if !self.has_component(name) && !dir.is_dir() {
            return Err(LoadError::UnrecognisedFormat {
                path: self.root.clone(),
                expected: format!("a `{name}` component"),
                found: format!(
                    "model_index.json lists {}",
                    self.component_names().join(", ")
                ),
            });
        }
        DiffusersComponent::open(dir)
    }

    pub fn unet(&self) -> LoadResult<DiffusersComponent> {
        self.component("unet")
    }

    pub fn vae(&self) -> LoadResult<DiffusersComponent> {
        self.component("vae")
    }

    pub fn text_encoder(&self) -> LoadResult<DiffusersComponent> {
        self.component("text_encoder")
    }

    pub fn tokenizer(&self) -> LoadResult<TokenizerFiles> {
        TokenizerFiles::open(self.root.join("tokenizer"))
    }

    /// `scheduler/scheduler_config.json`.
    pub fn scheduler_config(&self) -> LoadResult<serde_json::Value> {
        read_json(&self.root.join("scheduler").join("scheduler_config.json"))
    }

    fn component_names(&self) -> Vec<&str> {
        self.model_index
            .as_object()
            .map(|o| {
                o.keys()
                    .filter(|k| !k.starts_with('_'))
                    .map(String::as_str)
                    .collect()
            })
            .unwrap_or_default()
    }
}

/// The `model_index.json` of an SD 1.x pipeline folder with the components the loaders read.
pub fn sd_pipeline_index() -> serde_json::Value {
    serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"]
    })
}

pub(crate) fn read_json(path: &Path) -> LoadResult<serde_json::Value> {
    let text = std::fs::read_to_string(existing(path)?).map_err(|e| LoadError::io(path, e))?;
    serde_json::from_str(&text).map_err(|e| LoadError::InvalidConfig {
        path: path.to_path_buf(),
        reason: format!("not JSON: {e}"),
    })
}

fn list_folder(dir: &Path) -> String {
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .map(|entries| {
            entries
                .filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    names.sort();
    if names.is_empty() {
        "an empty folder".into()
    } else {
        format!("files {}", names.join(", "))
    }
}
