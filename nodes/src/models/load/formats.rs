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
    // safetensors accepts any shape of zero elements, such as [0, 3, 2^63]; candle computes
    // the strides of such a shape with unchecked multiplications when the tensor is read.
    if let Some((name, shape, _)) = listing
        .iter()
        .find(|(_, shape, _)| nonzero_product(shape, 1).is_none())
    {
        return Err(LoadError::CorruptSafetensors {
            path: path.to_path_buf(),
            reason: format!("tensor `{name}` has shape {shape:?}, whose size overflows"),
        });
    }
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
    let corrupt = |reason: String| LoadError::CorruptCheckpoint {
        path: path.to_path_buf(),
        reason,
    };
    let candle_error = |e: candle_core::Error| {
        let mut reason = e.to_string();
        // The zip index sits at the end of the file: a cut download loses it first.
        if reason.contains("EOCD") {
            reason.push_str(" (the end of the archive is missing: truncated file?)");
        }
        corrupt(reason)
    };
    check_pickle_strings(path).map_err(corrupt)?;
    let read = |key: Option<&str>| {
        // candle's reader indexes the arguments of `_rebuild_tensor_v2` calls without checking
        // their count, and multiplies sizes and offsets unchecked: a malformed pickle panics
        // there. That must be an error naming the file, not a crash of whoever loads it.
        std::panic::catch_unwind(|| candle_core::pickle::PthTensors::new(path, key)).unwrap_or_else(
            |panic| {
                let message = panic
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| panic.downcast_ref::<String>().cloned())
                    .unwrap_or_default();
                Err(candle_core::Error::Msg(format!(
                    "malformed pickle (the reader failed: {message})"
                )))
            },
        )
    };
    let mut file = read(None).map_err(candle_error)?;
    if file.tensor_infos().is_empty() {
        // The nested reading fails when there is no `state_dict` either; the flat one's empty
        // result is then the message to give.
        if let Ok(nested) = read(Some("state_dict")) {
            file = nested;
        }
    }
    let file_len = std::fs::metadata(path)
        .map_err(|e| LoadError::io(path, e))?
        .len();
    for info in file.tensor_infos().values() {
        check_tensor_extent(info, file_len).map_err(corrupt)?;
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

/// Refuses pickles with a string longer than the pickle itself.
///
/// candle's reader allocates the length a BINUNICODE opcode declares before reading the
/// string, so four corrupt bytes ask for up to 4 GiB (which aborts the process where memory is
/// capped). Walking the opcodes the reader knows, with the sizes of their arguments, finds such
/// a string before candle sees it; the walk stops at the first opcode the reader does not know
/// (the reader reports that itself) and at STOP.
fn check_pickle_strings(path: &Path) -> Result<(), String> {
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let file_len = file.metadata().map_err(|e| e.to_string())?.len();
    let Ok(mut archive) = zip::ZipArchive::new(std::io::BufReader::new(file)) else {
        // Not a readable zip: candle's reader gives the message.
        return Ok(());
    };
    for index in 0..archive.len() {
        let Ok(entry) = archive.by_index(index) else {
            continue;
        };
        let Ok(name) = entry.name().map(|n| n.into_owned()) else {
            continue;
        };
        if !name.ends_with("data.pkl") {
            continue;
        }
        let mut pickle = Vec::new();
        // The declared size may lie; a stored entry cannot hold more than the file. A read error
        // (a checksum that does not match, found at the end) leaves the bytes read so far, and
        // candle's reader would have parsed those before failing: they are checked too.
        let _ = entry.take(file_len).read_to_end(&mut pickle);
        if let Some(problem) = oversized_string(&pickle) {
            return Err(format!("{name}: {problem}"));
        }
    }
    Ok(())
}

/// The first BINUNICODE in `pickle` whose declared length runs past its end, described.
fn oversized_string(pickle: &[u8]) -> Option<String> {
    let mut at = 0usize;
    while let Some(&op) = pickle.get(at) {
        let argument = at + 1;
        let size = match op {
            // PROTO, BININT1, BINPUT, BINGET, LONG1's byte count (then the bytes)
            0x80 | b'K' | b'q' | b'h' => 1,
            0x8a => 1 + usize::from(*pickle.get(argument)?),
            b'M' => 2,
            b'J' | b'r' | b'j' => 4,
            b'G' => 8,
            b'X' => {
                let len = u32::from_le_bytes(pickle.get(argument..argument + 4)?.try_into().ok()?);
                let available = pickle.len() - (argument + 4).min(pickle.len());
                if len as usize > available {
                    return Some(format!(
                        "a string at byte {at} declares {len} bytes but only {available} follow"
                    ));
                }
                4 + len as usize
            }
            // GLOBAL: module and name, each ending in a newline.
            b'c' => {
                let first = pickle[argument..].iter().position(|&b| b == b'\n')?;
                let second = pickle[argument + first + 1..]
                    .iter()
                    .position(|&b| b == b'\n')?;
                first + second + 2
            }
            b'(' | b')' | b't' | b'R' | b'Q' | b'}' | b'u' | b's' | b'd' | b'b' | b'N' | b']'
            | b'a' | b'e' | 0x81 | 0x85 | 0x86 | 0x87 | 0x88 | 0x89 => 0,
            // STOP, or an opcode the reader does not know and will report.
            _ => return None,
        };
        at = argument.checked_add(size)?;
    }
    None
}

/// Refuses a tensor whose data cannot be in the file: candle allocates the element count the
/// pickle declares before reading, and computes sizes and strides from it unchecked.
fn check_tensor_extent(
    info: &candle_core::pickle::TensorInfo,
    file_len: u64,
) -> Result<(), String> {
    let dims = info.layout.dims();
    // Products of the non-zero sizes must fit, or candle's stride arithmetic overflows even for
    // an empty tensor.
    let extent = nonzero_product(dims, info.dtype.size_in_bytes()).and_then(|bytes| {
        let bytes = if dims.contains(&0) { 0 } else { bytes };
        bytes.checked_add(info.layout.start_offset())
    });
    match extent {
        Some(end) if end as u64 <= file_len => Ok(()),
        _ => Err(format!(
            "tensor `{}` of shape {dims:?} ({:?}) at byte {} of its storage needs more data than \
             the {file_len}-byte file holds",
            info.name,
            info.dtype,
            info.layout.start_offset()
        )),
    }
}

/// `unit` times the product of the non-zero sizes in `dims`, if it fits in `usize`: the largest
/// stride candle computes for a tensor of that shape.
fn nonzero_product(dims: &[usize], unit: usize) -> Option<usize> {
    dims.iter()
        .filter(|&&d| d != 0)
        .try_fold(unit, |acc, &d| acc.checked_mul(d))
}

/// The first file of `candidates` that exists in `folder`.
pub(crate) fn first_existing(folder: &Path, candidates: &[&str]) -> Option<PathBuf> {
    candidates
        .iter()
        .map(|name| folder.join(name))
        .find(|p| p.is_file())
}

#[cfg(test)]
mod tests {
    use std::io::Write;

    use super::*;

    /// A stored zip with `archive/data.pkl` = `pickle` and the given storages.
    fn checkpoint(dir: &Path, pickle: &[u8], storages: &[(&str, &[u8])]) -> PathBuf {
        let path = dir.join("model.ckpt");
        let mut zip = zip::ZipWriter::new(std::fs::File::create(&path).unwrap());
        let options = zip::write::SimpleFileOptions::default()
            .compression_method(zip::CompressionMethod::Stored);
        zip.start_file("archive/data.pkl", options).unwrap();
        zip.write_all(pickle).unwrap();
        for (name, data) in storages {
            zip.start_file(format!("archive/data/{name}"), options)
                .unwrap();
            zip.write_all(data).unwrap();
        }
        zip.finish().unwrap();
        path
    }

    /// `{"w": _rebuild_tensor_v2(<storage "0" of `numel` floats>, 0, size, stride, False,
    /// OrderedDict())}` as protocol 2 opcodes.
    fn one_tensor_pickle(numel: u32, size: &[u32], stride: &[u32]) -> Vec<u8> {
        let mut p = vec![0x80, 2, b'}', b'('];
        let text = |p: &mut Vec<u8>, s: &str| {
            p.push(b'X');
            p.extend((s.len() as u32).to_le_bytes());
            p.extend(s.as_bytes());
        };
        let int = |p: &mut Vec<u8>, v: u32| {
            p.push(b'J');
            p.extend(v.to_le_bytes());
        };
        text(&mut p, "w");
        p.extend(b"ctorch._utils\n_rebuild_tensor_v2\n((");
        text(&mut p, "storage");
        p.extend(b"ctorch\nFloatStorage\n");
        text(&mut p, "0");
        text(&mut p, "cpu");
        int(&mut p, numel);
        p.extend(b"tQ");
        int(&mut p, 0);
        for values in [size, stride] {
            p.push(b'(');
            values.iter().for_each(|&v| int(&mut p, v));
            p.push(b't');
        }
        p.push(0x89);
        p.extend(b"ccollections\nOrderedDict\n)Rt");
        p.extend(b"Ru.");
        p
    }

    #[test]
    fn a_valid_checkpoint_still_loads() {
        let dir = tempfile::tempdir().unwrap();
        let data: Vec<u8> = (0..6).flat_map(|v| (v as f32).to_le_bytes()).collect();
        let path = checkpoint(
            dir.path(),
            &one_tensor_pickle(6, &[2, 3], &[3, 1]),
            &[("0", &data)],
        );
        let weights = open_torch_checkpoint(&path).unwrap();
        let w = weights.get("w").unwrap();
        assert_eq!(w.dims(), &[2, 3]);
        assert_eq!(w.flatten_all().unwrap().to_vec1::<f32>().unwrap()[5], 5.0);
    }

    /// Found by fuzzing: a BINUNICODE length of 0xffff_ffff made candle allocate 4 GiB before
    /// noticing that the bytes were not there.
    #[test]
    fn a_string_longer_than_the_pickle_is_refused_before_reading() {
        let dir = tempfile::tempdir().unwrap();
        let pickle = [0x80, 2, b'X', 0xff, 0xff, 0xff, 0xff, b'a', b'b', b'.'];
        let path = checkpoint(dir.path(), &pickle, &[]);
        let err = open_torch_checkpoint(&path).unwrap_err();
        assert!(matches!(err, LoadError::CorruptCheckpoint { .. }), "{err}");
        assert!(
            err.to_string().contains("declares 4294967295 bytes"),
            "{err}"
        );
    }

    /// Found by fuzzing: `_rebuild_tensor_v2` called with too few arguments made candle index
    /// out of bounds (a panic).
    #[test]
    fn a_rebuild_call_with_too_few_arguments_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let mut pickle = vec![0x80, 2, b'}', b'(', b'X', 1, 0, 0, 0, b'w'];
        pickle.extend(b"ctorch._utils\n_rebuild_tensor_v2\n(K\x00tRu.");
        let path = checkpoint(dir.path(), &pickle, &[]);
        let err = open_torch_checkpoint(&path).unwrap_err();
        assert!(matches!(err, LoadError::CorruptCheckpoint { .. }), "{err}");
        assert!(err.to_string().contains("malformed pickle"), "{err}");
    }

    /// Found by fuzzing: a declared size or offset far beyond the storage made candle allocate
    /// it (or overflow computing it) when the tensor was read.
    #[test]
    fn a_tensor_larger_than_the_file_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let data = [0u8; 24];
        let huge = 1 << 20;
        let pickle = one_tensor_pickle(6, &[huge, huge, 4], &[huge * 4, 4, 1]);
        let path = checkpoint(dir.path(), &pickle, &[("0", &data)]);
        let err = open_torch_checkpoint(&path).unwrap_err();
        assert!(err.to_string().contains("needs more data than"), "{err}");
    }

    /// Found by fuzzing: an empty tensor of shape [0, 3, 2^63] passed safetensors' checks and
    /// overflowed candle's stride computation when read.
    #[test]
    fn an_empty_safetensors_tensor_with_an_overflowing_shape_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let header =
            br#"{"empty":{"dtype":"F32","shape":[0,3,9223372036854775808],"data_offsets":[0,0]}}"#;
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header);
        let path = dir.path().join("empty.safetensors");
        std::fs::write(&path, bytes).unwrap();
        let err = open_safetensors(&path).unwrap_err();
        assert!(matches!(err, LoadError::CorruptSafetensors { .. }), "{err}");
        assert!(err.to_string().contains("overflows"), "{err}");
    }
}
