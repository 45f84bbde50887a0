//! safetensors files: `open_weights` (format detection, header checks, memory map) and reading
//! every tensor back, in its own dtype and as f32.

use fastrand::Rng;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use serde_json::{json, Map, Value};

use super::{donors, pick, read_every_tensor, Context};
use crate::mutate::{interesting, mutate_bytes, random_string, small_or_interesting};

/// dtype names of the format (the ones candle reads and the ones it does not) and nonsense.
const DTYPES: [&str; 25] = [
    "F32",
    "F16",
    "BF16",
    "F64",
    "I64",
    "I32",
    "I16",
    "I8",
    "U8",
    "U16",
    "U32",
    "U64",
    "BOOL",
    "F4",
    "F6_E2M3",
    "F6_E3M2",
    "F8_E5M2",
    "F8_E4M3",
    "F8_E8M0",
    "F8_E4M3FNUZ",
    "F8_E5M2FNUZ",
    "C64",
    "f32",
    "",
    "F32 ",
];

pub(super) fn serialize(
    tensors: &[(&str, Dtype, Vec<usize>)],
    metadata: Option<&[(&str, &str)]>,
) -> Vec<u8> {
    let data: Vec<Vec<u8>> = tensors
        .iter()
        .map(|(_, dtype, shape)| {
            let bytes = shape.iter().product::<usize>() * dtype.bitsize() / 8;
            (0..bytes).map(|i| (i * 37 % 251) as u8).collect()
        })
        .collect();
    let views: Vec<(&str, TensorView<'_>)> = tensors
        .iter()
        .zip(&data)
        .map(|((name, dtype, shape), data)| {
            (
                *name,
                TensorView::new(*dtype, shape.clone(), data).expect("a valid seed"),
            )
        })
        .collect();
    let metadata = metadata.map(|m| {
        m.iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    });
    safetensors::serialize(views, metadata).expect("a valid seed")
}

pub(super) fn seeds() -> Vec<Vec<u8>> {
    vec![
        serialize(
            &[
                ("conv.weight", Dtype::F32, vec![2, 3, 1, 1]),
                ("conv.bias", Dtype::F16, vec![2]),
                ("norm.weight", Dtype::BF16, vec![1, 2, 2]),
                ("steps", Dtype::I64, vec![2]),
                ("mask", Dtype::U8, vec![3]),
                ("scale", Dtype::F64, vec![]),
                ("empty", Dtype::F32, vec![0, 3]),
            ],
            Some(&[("format", "pt")]),
        ),
        serialize(&[("w", Dtype::F32, vec![4])], None),
        serialize(
            &[
                ("a.weight", Dtype::F16, vec![3, 2]),
                ("b.weight", Dtype::I32, vec![1]),
                ("c.weight", Dtype::U32, vec![2]),
            ],
            None,
        ),
    ]
}

/// Splits a safetensors file into its header object and the data behind it.
pub(super) fn split(bytes: &[u8]) -> Option<(Map<String, Value>, &[u8])> {
    let len = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(len).ok()?)?;
    let header = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    Some((header, &bytes[end..]))
}

/// Joins a header and data, with the right length prefix (or, now and then, a wrong one).
pub(super) fn join(rng: &mut Rng, header: &Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut text = serde_json::to_vec(header).expect("JSON values serialise");
    // The format pads headers with spaces to a multiple of 8.
    if rng.bool() {
        while text.len() & 7 != 0 {
            text.push(b' ');
        }
    }
    let mut len = text.len() as u64;
    if rng.u8(..16) == 0 {
        len = if rng.bool() {
            interesting(rng)
        } else {
            len.wrapping_add(rng.u64(..16)).wrapping_sub(8)
        };
    }
    let mut out = len.to_le_bytes().to_vec();
    out.extend_from_slice(&text);
    out.extend_from_slice(data);
    out
}

fn random_number(rng: &mut Rng) -> Value {
    match rng.u8(..6) {
        0 => json!(-(rng.i64(1..1000))),
        1 => json!(1.5),
        2 => json!(1e300),
        3 => json!(i64::MIN),
        _ => json!(small_or_interesting(rng)),
    }
}

/// Random JSON of bounded depth.
pub(super) fn random_json(rng: &mut Rng, depth: u32) -> Value {
    match rng.u8(..if depth == 0 { 5 } else { 7 }) {
        0 => Value::Null,
        1 => json!(rng.bool()),
        2 => random_number(rng),
        3 | 4 => json!(random_string(rng)),
        5 => Value::Array(
            (0..rng.usize(..4))
                .map(|_| random_json(rng, depth - 1))
                .collect(),
        ),
        _ => Value::Object(
            (0..rng.usize(..4))
                .map(|_| (random_string(rng), random_json(rng, depth - 1)))
                .collect(),
        ),
    }
}

/// One structured change to a safetensors header: a tensor's dtype, shape or offsets, a key
/// removed or duplicated, the metadata changed. `metadata_keys` are keys a reader looks for.
pub(super) fn mutate_header(
    rng: &mut Rng,
    header: &mut Map<String, Value>,
    metadata_keys: &[&str],
) {
    let names: Vec<String> = header
        .keys()
        .filter(|k| k.as_str() != "__metadata__")
        .cloned()
        .collect();
    let choice = rng.u8(..12);
    if names.is_empty() || choice >= 9 {
        match choice % 3 {
            // Metadata: a key readers use, with a strange value; or not a string map at all.
            0 => {
                let value = match rng.u8(..4) {
                    0 => json!(small_or_interesting(rng).to_string()),
                    1 => json!(format!("-{}", rng.u8(..))),
                    2 => json!(random_string(rng)),
                    _ => random_json(rng, 2),
                };
                let key = if !metadata_keys.is_empty() && rng.bool() {
                    pick(rng, metadata_keys).to_string()
                } else {
                    random_string(rng)
                };
                let meta = header.entry("__metadata__").or_insert_with(|| json!({}));
                match meta {
                    Value::Object(m) => {
                        m.insert(key, value);
                    }
                    other => *other = json!({ key: value }),
                }
            }
            1 => {
                header.insert("__metadata__".into(), random_json(rng, 2));
            }
            _ => {
                let entry = json!({
                    "dtype": *pick(rng, &DTYPES),
                    "shape": (0..rng.usize(..4)).map(|_| random_number(rng)).collect::<Vec<_>>(),
                    "data_offsets": [random_number(rng), random_number(rng)],
                });
                header.insert(random_string(rng), entry);
            }
        }
        return;
    }
    let name = pick(rng, &names).clone();
    match choice {
        0 => {
            header.remove(&name);
            return;
        }
        1 => {
            let copy = header[&name].clone();
            header.insert(format!("{name}.copy"), copy);
            return;
        }
        8 => {
            header.insert(name, random_json(rng, 2));
            return;
        }
        _ => {}
    }
    let Some(entry) = header.get_mut(&name).and_then(Value::as_object_mut) else {
        header.insert(name, random_json(rng, 2));
        return;
    };
    match choice {
        2 => {
            entry.insert("dtype".into(), json!(*pick(rng, &DTYPES)));
        }
        3 | 4 => {
            let Some(shape) = entry.get_mut("shape").and_then(Value::as_array_mut) else {
                entry.insert("shape".into(), random_json(rng, 1));
                return;
            };
            match rng.u8(..4) {
                0 => shape.push(random_number(rng)),
                1 => {
                    shape.pop();
                }
                _ if !shape.is_empty() => {
                    let at = rng.usize(..shape.len());
                    shape[at] = random_number(rng);
                }
                _ => shape.push(json!(0)),
            }
        }
        5 | 6 => {
            let Some(offsets) = entry.get_mut("data_offsets").and_then(Value::as_array_mut) else {
                entry.insert("data_offsets".into(), random_json(rng, 1));
                return;
            };
            match rng.u8(..4) {
                0 => offsets.reverse(),
                1 => offsets.push(random_number(rng)),
                _ if !offsets.is_empty() => {
                    let at = rng.usize(..offsets.len());
                    offsets[at] = if rng.bool() {
                        let old = offsets[at].as_u64().unwrap_or(0);
                        json!(old.wrapping_add(rng.u64(..9)).wrapping_sub(4))
                    } else {
                        random_number(rng)
                    };
                }
                _ => offsets.push(json!(0)),
            }
        }
        _ => {
            let field = *pick(rng, &["dtype", "shape", "data_offsets"]);
            if rng.bool() {
                entry.remove(field);
            } else {
                entry.insert(field.to_string(), random_json(rng, 1));
            }
        }
    }
}

/// A mutation of one of `seeds`: header edits (re-serialised), data resized, bytes changed.
pub(super) fn mutate_file(rng: &mut Rng, seeds: &[Vec<u8>], metadata_keys: &[&str]) -> Vec<u8> {
    let seed = pick(rng, seeds).clone();
    let mut out = seed;
    if rng.u8(..4) != 0 {
        if let Some((mut header, data)) = split(&out) {
            for _ in 0..1 + rng.usize(..3) {
                mutate_header(rng, &mut header, metadata_keys);
            }
            let mut data = data.to_vec();
            match rng.u8(..6) {
                0 => data.truncate(rng.usize(..=data.len())),
                1 => data.extend((0..rng.usize(..64)).map(|_| rng.u8(..))),
                _ => {}
            }
            out = join(rng, &header, &data);
        }
    }
    if rng.u8(..3) == 0 {
        mutate_bytes(rng, &mut out, &donors(seeds), 4);
    }
    out
}

pub(super) fn generate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    mutate_file(rng, seeds, &["format"])
}

pub(super) fn execute(ctx: &Context, input: &[u8]) -> Result<(), String> {
    // `.bin` files are told apart by their bytes, `.safetensors` ones are trusted by name.
    let extension = if crate::mutate::hash(input) & 3 == 0 {
        "bin"
    } else {
        "safetensors"
    };
    read_every_tensor(ctx, extension, input)
}
