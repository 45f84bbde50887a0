//! Reading weight files: memory-mapped safetensors (single or sharded) and PyTorch zip
//! checkpoints (`.ckpt`, `.pt`, `.pth`, `.bin`), told apart by their first bytes.

use std::collections::BTreeSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::DType;

use super::error::{LoadError, LoadResult};
use super::weights::{existing, Store, WeightMap};

/// safetensors refuses headers above 100 MB; a larger length means the file is something else.
const MAX_SAFETENSORS_HEADER: u64 = 100_000_000;

const ZIP_MAGIC: &[u8; 4] = b"PK\x03\x04";

/// What a weight file turned out to be.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightFileKind {
    Safetensors,
    /// A PyTorch ≥ 1.6 zip archive holding a pickled state dict.
    TorchZip,
}

/// Tells the format of `path` from its first bytes (extensions lie: `.ckpt` files are zips,
/// `.bin` files may be either). Errors name what was expected when the bytes fit neither.
pub fn detect_format(path: &Path) -> LoadResult<WeightFileKind> {
    let path = existing(path)?;
    if path.is_dir() {
        return Err(LoadError::UnrecognisedFormat {
            path: path.to_path_buf(),
            expected: "a weight file (.safetensors, .ckpt, .pt, .pth, .bin)".into(),
            found: "a folder".into(),
        });
    }
    let mut head = Vec::with_capacity(9);
    std::fs::File::open(path)
        .and_then(|f| f.take(9).read_to_end(&mut head))
        .map_err(|e| LoadError::io(path, e))?;
    if head.starts_with(ZIP_MAGIC) {
        return Ok(WeightFileKind::TorchZip);
    }
    let looks_like_safetensors = head.len() == 9 && head[8] == b'{';
    let extension = path
        .extension()
        .and_then(|e| e.to_str())
        .unwrap_or("")
        .to_ascii_lowercase();
    if looks_like_safetensors || extension == "safetensors" {
        return Ok(WeightFileKind::Safetensors);
    }
    let found = if head.first() == Some(&0x80) {
        "a legacy (pre-1.6, non-zip) PyTorch pickle; re-save it with a current torch.save or \
         convert it to safetensors"
            .to_string()
    } else {
        format!("leading bytes {head:02x?}")
    };
    Err(LoadError::UnrecognisedFormat {
        path: path.to_path_buf(),
        expected: "a safetensors file or a PyTorch zip checkpoint".into(),
        found,
    })
}

/// Opens any single weight file, whatever its format.
pub fn open_weights(path: impl AsRef<Path>) -> LoadResult<WeightMap> {
    let path = path.as_ref();
    match detect_format(path)? {
        WeightFileKind::Safetensors => open_safetensors(path),
        WeightFileKind::TorchZip => open_torch_checkpoint(path),
    }
}

/// Memory-maps a safetensors file after checking that its header is sound and that the file
/// holds all the data the header promises (a cut download is reported as truncated).
pub fn open_safetensors(path: impl AsRef<Path>) -> LoadResult<WeightMap> {
    let path = existing(path.as_ref())?;
    check_safetensors_header(path)?;
    // SAFETY: the map is read-only; as with every mmap, the file must not be truncated while in
    // use, which is the contract of all safetensors loaders.
    let file = unsafe { candle_core::safetensors::MmapedSafetensors::new(path) }.map_err(|e| {
        LoadError::CorruptSafetensors {
            path: path.to_path_buf(),
            reason: e.to_string(),
        }
    })?;
    let listing: Vec<_> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            let dtype = DType::try_from(view.dtype()).ok();
            (name, view.shape().to_vec(), dtype)
        })
        .collect();
    Ok(WeightMap::from_store(
        Store::Safetensors {
            path: path.to_path_buf(),
            file,
        },
        listing,
    ))
}

fn check_safetensors_header(path: &Path) -> LoadResult<()> {
    let corrupt = |reason: String| LoadError::CorruptSafetensors {
        path: path.to_path_buf(),
        reason,
    };
    let mut file = std::fs::File::open(path).map_err(|e| LoadError::io(path, e))?;
    let found_len = file.metadata().map_err(|e| LoadError::io(path, e))?.len();
    let truncated = |expected_len| LoadError::Truncated {
        path: path.to_path_buf(),
        expected_len,
        found_len,
    };
    if found_len < 8 {
        return Err(truncated(8));
    }
    let mut len_bytes = [0u8; 8];
    file.read_exact(&mut len_bytes)
        .map_err(|e| LoadError::io(path, e))?;
    let header_len = u64::from_le_bytes(len_bytes);
    if header_len > MAX_SAFETENSORS_HEADER {
        return Err(corrupt(format!(
            "the leading 8 bytes give a header of {header_len} bytes, which no safetensors file has"
        )));
    }
    if 8 + header_len > found_len {
        return Err(truncated(8 + header_len));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| LoadError::io(path, e))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| corrupt(format!("the header is not a JSON object: {e}")))?;
    let mut data_end = 0u64;
    for (name, info) in header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
    {
        let end = info["data_offsets"][1]
            .as_u64()
            .ok_or_else(|| corrupt(format!("tensor `{name}` has no data_offsets")))?;
        data_end = data_end.max(end);
    }
    let needed = (8 + header_len).saturating_add(data_end);
    if needed > found_len {
        return Err(truncated(needed));
    }
    Ok(())
}

/// Opens a sharded safetensors set through its `*.safetensors.index.json`.
pub fn open_safetensors_index(index_path: impl AsRef<Path>) -> LoadResult<WeightMap> {
    let index_path = existing(index_path.as_ref())?;
    let text = std::fs::read_to_string(index_path).map_err(|e| LoadError::io(index_path, e))?;
    let invalid = |reason: String| LoadError::InvalidConfig {
        path: index_path.to_path_buf(),
        reason,
    };
    let index: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| invalid(format!("not JSON: {e}")))?;
    let weight_map = index["weight_map"]
        .as_object()
        .ok_or_else(|| invalid("no `weight_map` object".into()))?;
    let folder = index_path.parent().unwrap_or(Path::new("."));
    let shards: BTreeSet<&str> = weight_map.values().filter_map(|v| v.as_str()).collect();
    if shards.is_empty() {
        return Err(invalid("`weight_map` names no files".into()));
    }
    let mut merged = WeightMap::empty(index_path.display().to_string());
    for shard in shards {
        merged = merged.merge(open_safetensors(folder.join(shard))?)?;
    }
    Ok(merged)
}

/// Opens a PyTorch zip checkpoint (`torch.save` since 1.6: `.ckpt`, `.pt`, `.pth`, `.bin`).
///
/// The state dict may be the pickled object itself or sit under a `state_dict` entry, as in
/// Lightning checkpoints (SD 1.x `.ckpt` files, some AnimateDiff motion modules). candle's
/// reader only descends into a key it is told about and otherwise returns nothing for a nested
/// dict, so the flat reading is tried first and `state_dict` second.
pub fn open_torch_checkpoint(path: impl AsRef<Path>) -> LoadResult<WeightMap> {
    let path = existing(path.as_ref())?;
    let corrupt = |e: candle_core::Error| {
        let mut reason = e.to_string();
        // The zip index sits at the end of the file: a cut download loses it first.
        if reason.contains("EOCD") {
            reason.push_str(" (the end of the archive is missing: truncated file?)");
        }
        LoadError::CorruptCheckpoint {
            path: path.to_path_buf(),
            reason,
        }
    };
    let mut file = candle_core::pickle::PthTensors::new(path, None).map_err(corrupt)?;
    if file.tensor_infos().is_empty() {
        // The nested reading fails when there is no `state_dict` either; the flat one's empty
        // result is then the message to give.
        if let Ok(nested) = candle_core::pickle::PthTensors::new(path, Some("state_dict")) {
            file = nested;
        }
    }
    if file.tensor_infos().is_empty() {
        return Err(LoadError::UnrecognisedFormat {
            path: path.to_path_buf(),
            expected: "a pickled dict of tensors, at the top level or under `state_dict`".into(),
            found: "no tensors".into(),
        });
    }
    let listing: Vec<_> = file
        .tensor_infos()
        .values()
        .map(|info| {
            (
                info.name.clone(),
                info.layout.dims().to_vec(),
                Some(info.dtype),
            )
        })
        .collect();
    Ok(WeightMap::from_store(
        Store::Checkpoint {
            path: path.to_path_buf(),
            file,
        },
        listing,
    ))
}

/// The first file of `candidates` that exists in `folder`.
pub(crate) fn first_existing(folder: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|name| folder.join(name))
        .find(|p| p.is_file())
}
