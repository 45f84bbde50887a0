//! [`WeightMap`]: named tensors from one or more files, read lazily, renamed without copying.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::error::{LoadError, LoadResult};

/// Where the bytes of a tensor live.
pub(crate) enum Store {
    /// A memory-mapped safetensors file: tensors are copied out only when asked for.
    Safetensors {
        path: PathBuf,
        file: candle_core::safetensors::MmapedSafetensors,
    },
    /// A PyTorch zip checkpoint: each tensor is read from its `archive/data/N` entry on demand.
    Checkpoint {
        path: PathBuf,
        file: candle_core::pickle::PthTensors,
    },
    /// A tensor already in memory (made by a converter or handed in by the caller).
    Tensor { origin: String, tensor: Tensor },
}

impl Store {
    fn origin(&self) -> String {
        match self {
            Store::Safetensors { path, .. } | Store::Checkpoint { path, .. } => {
                path.display().to_string()
            }
            Store::Tensor { origin, .. } => origin.clone(),
        }
    }

    fn read(&self, key: &str) -> candle_core::Result<Tensor> {
        match self {
            Store::Safetensors { file, .. } => file.load(key, &Device::Cpu),
            Store::Checkpoint { file, .. } => file
                .get(key)?
                .ok_or_else(|| candle_core::Error::Msg(format!("no tensor named `{key}`"))),
            Store::Tensor { tensor, .. } => Ok(tensor.clone()),
        }
    }
}

/// One named weight: where it is stored, under which name, and the shape it is seen with.
#[derive(Clone)]
struct Entry {
    store: Arc<Store>,
    stored_key: String,
    stored_shape: Vec<usize>,
    dtype: Option<DType>,
    /// Set when the weight is seen with another shape of the same element count, e.g. a 1×1
    /// convolution kernel (out, in, 1, 1) seen as the linear weight (out, in) it equals.
    view_shape: Option<Vec<usize>>,
}

impl Entry {
    fn shape(&self) -> &[usize] {
        self.view_shape.as_deref().unwrap_or(&self.stored_shape)
    }
}

/// Named tensors from safetensors files, PyTorch checkpoints or memory, under the names a model
/// asks for. Renaming and reshaping only change the index: bytes are read (and converted to the
/// dtype and device asked for) when a tensor is requested, so a multi-gigabyte checkpoint costs
/// nothing until the layers that need it are built.
#[derive(Clone, Default)]
pub struct WeightMap {
    origin: String,
    entries: BTreeMap<String, Entry>,
}

impl std::fmt::Debug for WeightMap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WeightMap")
            .field("origin", &self.origin)
            .field("tensors", &self.entries.len())
            .finish()
    }
}

impl WeightMap {
    /// An empty map whose errors will name `origin`.
    pub fn empty(origin: impl Into<String>) -> Self {
        Self {
            origin: origin.into(),
            entries: BTreeMap::new(),
        }
    }

    /// Tensors already in memory, kept as they are.
    pub fn from_tensors(origin: impl Into<String>, tensors: HashMap<String, Tensor>) -> Self {
        let mut map = Self::empty(origin);
        for (key, tensor) in tensors {
            map.insert(key, tensor);
        }
        map
    }

    pub(crate) fn from_store(
        store: Store,
        listing: impl IntoIterator<Item = (String, Vec<usize>, Option<DType>)>,
    ) -> Self {
        let store = Arc::new(store);
        let entries = listing
            .into_iter()
            .map(|(key, shape, dtype)| {
                let entry = Entry {
                    store: store.clone(),
                    stored_key: key.clone(),
                    stored_shape: shape,
                    dtype,
                    view_shape: None,
                };
                (key, entry)
            })
            .collect();
        Self {
            origin: store.origin(),
            entries,
        }
    }

    /// The file(s) these weights come from, for messages.
    pub fn origin(&self) -> &str {
        &self.origin
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Every weight name, sorted.
    pub fn keys(&self) -> impl Iterator<Item = &str> + '_ {
        self.entries.keys().map(String::as_str)
    }

    pub fn contains(&self, key: &str) -> bool {
        self.entries.contains_key(key)
    }

    /// The shape `key` is seen with.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.entries.get(key).map(Entry::shape)
    }

    /// The dtype `key` is stored in, when it is one candle knows.
    pub fn dtype(&self, key: &str) -> Option<DType> {
        self.entries.get(key).and_then(|e| e.dtype)
    }

    /// Reads `key` onto the CPU in its stored dtype.
    pub fn get(&self, key: &str) -> LoadResult<Tensor> {
        let entry = self
            .entries
            .get(key)
            .ok_or_else(|| LoadError::missing_keys(self.origin.clone(), &[key.to_string()]))?;
        let wrap = |source| LoadError::Tensor {
            origin: entry.store.origin(),
            key: entry.stored_key.clone(),
            source: Box::new(source),
        };
        let tensor = entry.store.read(&entry.stored_key).map_err(wrap)?;
        match &entry.view_shape {
            Some(shape) => tensor.reshape(shape.as_slice()).map_err(wrap),
            None => Ok(tensor),
        }
    }

    /// Reads `key` onto `device` as `dtype` (an fp16 or bf16 file read as f32, say).
    pub fn load(&self, key: &str, dtype: DType, device: &Device) -> LoadResult<Tensor> {
        let tensor = self.get(key)?;
        let convert = || tensor.to_device(device)?.to_dtype(dtype);
        convert().map_err(|source| LoadError::Tensor {
            origin: self.origin.clone(),
            key: key.to_string(),
            source: Box::new(source),
        })
    }

    /// Reads every weight onto `device` as `dtype`.
    pub fn load_all(&self, dtype: DType, device: &Device) -> LoadResult<HashMap<String, Tensor>> {
        self.keys()
            .map(|key| Ok((key.to_string(), self.load(key, dtype, device)?)))
            .collect()
    }

    /// Adds (or replaces) an in-memory tensor.
    pub fn insert(&mut self, key: impl Into<String>, tensor: Tensor) {
        let key = key.into();
        let entry = Entry {
            stored_shape: tensor.dims().to_vec(),
            dtype: Some(tensor.dtype()),
            store: Arc::new(Store::Tensor {
                origin: self.origin.clone(),
                tensor,
            }),
            stored_key: key.clone(),
            view_shape: None,
        };
        self.entries.insert(key, entry);
    }

    /// Removes `key`, returning whether it was there.
    pub fn remove(&mut self, key: &str) -> bool {
        self.entries.remove(key).is_some()
    }

    /// Renames every weight through `rename`; weights it maps to `None` are dropped. Two weights
    /// mapped to the same name are an error.
    pub fn rename(self, mut rename: impl FnMut(&str) -> Option<String>) -> LoadResult<WeightMap> {
        self.remap(|key, _| rename(key).map(|new| (new, None)))
    }

    /// Renames and optionally reshapes (same element count) every weight; `None` drops it.
    pub(crate) fn remap(
        self,
        mut remap: impl FnMut(&str, &[usize]) -> Option<(String, Option<Vec<usize>>)>,
    ) -> LoadResult<WeightMap> {
        let mut entries = BTreeMap::new();
        for (key, mut entry) in self.entries {
            let Some((new_key, view_shape)) = remap(&key, entry.shape()) else {
                continue;
            };
            if let Some(shape) = view_shape {
                let count = |dims: &[usize]| dims.iter().product::<usize>();
                if count(&shape) != count(&entry.stored_shape) {
                    return Err(LoadError::ShapeMismatch {
                        origin: self.origin,
                        key,
                        expected: shape,
                        found: entry.stored_shape,
                    });
                }
                entry.view_shape = Some(shape);
            }
            if entries.insert(new_key.clone(), entry).is_some() {
                return Err(LoadError::DuplicateKey {
                    origin: self.origin,
                    key: new_key,
                });
            }
        }
        Ok(WeightMap {
            origin: self.origin,
            entries,
        })
    }

    /// The weights whose names start with `prefix`, with the prefix removed.
    pub fn strip_prefix(&self, prefix: &str) -> WeightMap {
        let entries = self
            .entries
            .iter()
            .filter_map(|(k, e)| {
                k.strip_prefix(prefix)
                    .map(|rest| (rest.to_string(), e.clone()))
            })
            .collect();
        WeightMap {
            origin: self.origin.clone(),
            entries,
        }
    }

    /// Every weight with `prefix` put in front of its name.
    pub fn with_prefix(self, prefix: &str) -> WeightMap {
        let entries = self
            .entries
            .into_iter()
            .map(|(k, e)| (format!("{prefix}{k}"), e))
            .collect();
        WeightMap {
            origin: self.origin,
            entries,
        }
    }

    /// The union of two maps (a UNet and its motion adapter, say); a name in both is an error.
    pub fn merge(mut self, other: WeightMap) -> LoadResult<WeightMap> {
        for (key, entry) in other.entries {
            if self.entries.contains_key(&key) {
                return Err(LoadError::DuplicateKey {
                    origin: format!("{} + {}", self.origin, other.origin),
                    key,
                });
            }
            self.entries.insert(key, entry);
        }
        if self.origin != other.origin && !other.origin.is_empty() {
            self.origin = if self.origin.is_empty() {
                other.origin
            } else {
                format!("{} + {}", self.origin, other.origin)
            };
        }
        Ok(self)
    }

    /// Checks that every `(name, shape)` in `expected` is present with that shape.
    pub fn check<K: AsRef<str>>(&self, expected: &[(K, Vec<usize>)]) -> LoadResult<()> {
        let missing: Vec<String> = expected
            .iter()
            .map(|(k, _)| k.as_ref())
            .filter(|k| !self.contains(k))
            .map(str::to_string)
            .collect();
        if !missing.is_empty() {
            return Err(LoadError::missing_keys(self.origin.clone(), &missing));
        }
        for (key, shape) in expected {
            let found = self.shape(key.as_ref()).unwrap_or_default();
            if found != shape.as_slice() {
                return Err(LoadError::ShapeMismatch {
                    origin: self.origin.clone(),
                    key: key.as_ref().to_string(),
                    expected: shape.clone(),
                    found: found.to_vec(),
                });
            }
        }
        Ok(())
    }

    /// A `VarBuilder` that serves these weights on `device` as `dtype`, checking each shape
    /// before reading any data.
    pub fn var_builder(&self, dtype: DType, device: &Device) -> VarBuilder<'static> {
        VarBuilder::from_backend(Box::new(Backend(self.clone())), dtype, device.clone())
    }
}

struct Backend(WeightMap);

impl SimpleBackend for Backend {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        dev: &Device,
    ) -> candle_core::Result<Tensor> {
        let map = &self.0;
        let found = map
            .shape(name)
            .ok_or_else(|| LoadError::missing_keys(map.origin.clone(), &[name.to_string()]))?;
        if found != shape.dims() {
            return Err(LoadError::ShapeMismatch {
                origin: map.origin.clone(),
                key: name.to_string(),
                expected: shape.dims().to_vec(),
                found: found.to_vec(),
            }
            .into());
        }
        Ok(map.load(name, dtype, dev)?)
    }

    fn get_unchecked(&self, name: &str, dtype: DType, dev: &Device) -> candle_core::Result<Tensor> {
        Ok(self.0.load(name, dtype, dev)?)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.0.contains(name)
    }
}

/// `path` with the error for a missing file already decided.
pub(crate) fn existing(path: &Path) -> LoadResult<&Path> {
    match path.try_exists() {
        Ok(true) => Ok(path),
        Ok(false) => Err(LoadError::NotFound {
            path: path.to_path_buf(),
        }),
        Err(source) => Err(LoadError::io(path, source)),
    }
}
