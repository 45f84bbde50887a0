//! PyTorch zip checkpoints (`torch.save` since 1.6): `open_weights` / `open_torch_checkpoint`
//! on a stored zip holding `archive/data.pkl` and the tensor storages, then every tensor read.
//!
//! Seeds are written as torch writes them (protocol 2 pickles of `_rebuild_tensor_v2` calls,
//! wrapped in `_rebuild_parameter` or `_rebuild_from_type_v2`, at the top level or under a
//! Lightning `state_dict`). Mutations work on the pickle's opcodes (arguments set to edge
//! values, opcodes dropped, repeated, swapped or inserted), on the zip entries (storages cut
//! or renamed), and on the raw bytes of the pickle and of the archive.

use std::sync::OnceLock;

use fastrand::Rng;

use super::{donors, pick, read_every_tensor, Context};
use crate::mutate::{crc32, interesting, mutate_bytes, random_string};

/// One pickle opcode with its argument.
#[derive(Debug, Clone)]
enum Op {
    Proto(u8),
    Global(String, String),
    BinPut(u8),
    LongBinPut(u32),
    BinGet(u8),
    LongBinGet(u32),
    /// BINUNICODE; the declared length may differ from the bytes that follow.
    Unicode {
        text: Vec<u8>,
        declared: Option<u32>,
    },
    BinInt(i32),
    BinInt1(u8),
    BinInt2(u16),
    BinFloat(f64),
    /// LONG1; the declared byte count may differ from the bytes that follow.
    Long1 {
        bytes: Vec<u8>,
        declared: Option<u8>,
    },
    /// An opcode without argument.
    Code(u8),
    /// Bytes that are no opcode of this list.
    Raw(Vec<u8>),
}

/// Opcodes without argument: the ones candle's reader knows, and POP and LIST, which it does not.
const CODES: [u8; 23] = [
    b'(', b')', b't', b'R', b'Q', b'}', b'u', b's', b'd', b'b', b'.', b'N', 0x85, 0x86, 0x87, 0x88,
    0x89, 0x81, b']', b'a', b'e', b'0', b'l',
];

const GLOBALS: [(&str, &str); 14] = [
    ("torch._utils", "_rebuild_tensor_v2"),
    ("torch._utils", "_rebuild_parameter"),
    ("torch._tensor", "_rebuild_from_type_v2"),
    ("collections", "OrderedDict"),
    ("collections", "defaultdict"),
    ("torch", "FloatStorage"),
    ("torch", "HalfStorage"),
    ("torch", "BFloat16Storage"),
    ("torch", "DoubleStorage"),
    ("torch", "LongStorage"),
    ("torch", "ByteStorage"),
    ("torch", "IntStorage"),
    ("__torch__", "Module"),
    ("torch", "Tensor"),
];

impl Op {
    fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Op::Proto(v) => out.extend([0x80, *v]),
            Op::Global(module, name) => {
                out.push(b'c');
                for part in [module, name] {
                    out.extend_from_slice(part.as_bytes());
                    out.push(b'\n');
                }
            }
            Op::BinPut(n) => out.extend([b'q', *n]),
            Op::LongBinPut(n) => {
                out.push(b'r');
                out.extend(n.to_le_bytes());
            }
            Op::BinGet(n) => out.extend([b'h', *n]),
            Op::LongBinGet(n) => {
                out.push(b'j');
                out.extend(n.to_le_bytes());
            }
            Op::Unicode { text, declared } => {
                out.push(b'X');
                out.extend(declared.unwrap_or(text.len() as u32).to_le_bytes());
                out.extend_from_slice(text);
            }
            Op::BinInt(v) => {
                out.push(b'J');
                out.extend(v.to_le_bytes());
            }
            Op::BinInt1(v) => out.extend([b'K', *v]),
            Op::BinInt2(v) => {
                out.push(b'M');
                out.extend(v.to_le_bytes());
            }
            Op::BinFloat(v) => {
                out.push(b'G');
                out.extend(v.to_be_bytes());
            }
            Op::Long1 { bytes, declared } => {
                out.push(0x8a);
                out.push(declared.unwrap_or(bytes.len() as u8));
                out.extend_from_slice(bytes);
            }
            Op::Code(c) => out.push(*c),
            Op::Raw(bytes) => out.extend_from_slice(bytes),
        }
    }

    fn text(s: &str) -> Op {
        Op::Unicode {
            text: s.as_bytes().to_vec(),
            declared: None,
        }
    }

    fn int(v: i64) -> Op {
        match v {
            0..=0xff => Op::BinInt1(v as u8),
            0x100..=0xffff => Op::BinInt2(v as u16),
            _ => match i32::try_from(v) {
                Ok(v) => Op::BinInt(v),
                Err(_) => Op::Long1 {
                    bytes: v.to_le_bytes().to_vec(),
                    declared: None,
                },
            },
        }
    }

    fn global(module: &str, name: &str) -> Op {
        Op::Global(module.into(), name.into())
    }
}

/// A checkpoint before encoding: the pickle's opcodes and the other archive entries.
#[derive(Debug, Clone)]
struct Checkpoint {
    ops: Vec<Op>,
    files: Vec<(String, Vec<u8>)>,
}

/// How a tensor is wrapped in the pickle.
#[derive(Clone, Copy)]
enum Wrap {
    Plain,
    Parameter,
    FromType,
}

struct TensorSpec<'a> {
    name: &'a str,
    storage: &'a str,
    key: &'a str,
    numel: i64,
    offset: i64,
    size: &'a [i64],
    stride: &'a [i64],
    wrap: Wrap,
}

fn int_tuple(ops: &mut Vec<Op>, values: &[i64]) {
    if values.is_empty() {
        ops.push(Op::Code(b')'));
        return;
    }
    ops.push(Op::Code(b'('));
    ops.extend(values.iter().map(|&v| Op::int(v)));
    ops.push(Op::Code(b't'));
}

/// The `_rebuild_tensor_v2(storage, offset, size, stride, requires_grad, hooks)` call.
fn rebuild_tensor(ops: &mut Vec<Op>, t: &TensorSpec<'_>) {
    ops.push(Op::global("torch._utils", "_rebuild_tensor_v2"));
    ops.push(Op::Code(b'('));
    ops.push(Op::Code(b'('));
    ops.push(Op::text("storage"));
    ops.push(Op::global("torch", t.storage));
    ops.push(Op::text(t.key));
    ops.push(Op::text("cpu"));
    ops.push(Op::int(t.numel));
    ops.push(Op::Code(b't'));
    ops.push(Op::Code(b'Q'));
    ops.push(Op::int(t.offset));
    int_tuple(ops, t.size);
    int_tuple(ops, t.stride);
    ops.push(Op::Code(0x89));
    ops.push(Op::global("collections", "OrderedDict"));
    ops.push(Op::Code(b')'));
    ops.push(Op::Code(b'R'));
    ops.push(Op::Code(b't'));
    ops.push(Op::Code(b'R'));
}

fn tensor_entry(ops: &mut Vec<Op>, t: &TensorSpec<'_>) {
    ops.push(Op::text(t.name));
    match t.wrap {
        Wrap::Plain => rebuild_tensor(ops, t),
        Wrap::Parameter => {
            ops.push(Op::global("torch._utils", "_rebuild_parameter"));
            ops.push(Op::Code(b'('));
            rebuild_tensor(ops, t);
            ops.push(Op::Code(0x89));
            ops.push(Op::global("collections", "OrderedDict"));
            ops.push(Op::Code(b')'));
            ops.push(Op::Code(b'R'));
            ops.push(Op::Code(b't'));
            ops.push(Op::Code(b'R'));
        }
        Wrap::FromType => {
            ops.push(Op::global("torch._tensor", "_rebuild_from_type_v2"));
            ops.push(Op::Code(b'('));
            ops.push(Op::global("torch._utils", "_rebuild_tensor_v2"));
            ops.push(Op::global("torch", "Tensor"));
            // The arguments of the inner call, as a tuple.
            ops.push(Op::Code(b'('));
            ops.push(Op::Code(b'('));
            ops.push(Op::text("storage"));
            ops.push(Op::global("torch", t.storage));
            ops.push(Op::text(t.key));
            ops.push(Op::text("cpu"));
            ops.push(Op::int(t.numel));
            ops.push(Op::Code(b't'));
            ops.push(Op::Code(b'Q'));
            ops.push(Op::int(t.offset));
            int_tuple(ops, t.size);
            int_tuple(ops, t.stride);
            ops.push(Op::Code(0x89));
            ops.push(Op::global("collections", "OrderedDict"));
            ops.push(Op::Code(b')'));
            ops.push(Op::Code(b'R'));
            ops.push(Op::Code(b't'));
            ops.push(Op::Code(b'}'));
            ops.push(Op::Code(b't'));
            ops.push(Op::Code(b'R'));
        }
    }
}

fn element_size(storage: &str) -> usize {
    match storage {
        "HalfStorage" | "BFloat16Storage" => 2,
        "DoubleStorage" | "LongStorage" => 8,
        "ByteStorage" => 1,
        _ => 4,
    }
}

fn checkpoint(tensors: &[TensorSpec<'_>], nested: bool) -> Checkpoint {
    let mut ops = vec![Op::Proto(2), Op::Code(b'}')];
    if nested {
        ops.extend([
            Op::Code(b'('),
            Op::text("epoch"),
            Op::int(3),
            Op::text("state_dict"),
            Op::Code(b'}'),
        ]);
    }
    ops.push(Op::Code(b'('));
    for (i, t) in tensors.iter().enumerate() {
        tensor_entry(&mut ops, t);
        // torch memoises every object; a few puts and gets keep those paths in the corpus.
        ops.push(Op::BinPut(i as u8));
    }
    ops.push(Op::Code(b'u'));
    if nested {
        ops.push(Op::Code(b'u'));
    }
    ops.push(Op::Code(b'.'));
    let mut files = vec![("archive/version".to_string(), b"3\n".to_vec())];
    for t in tensors {
        let bytes = t.numel as usize * element_size(t.storage);
        files.push((
            format!("archive/data/{}", t.key),
            (0..bytes).map(|i| (i * 13 % 256) as u8).collect(),
        ));
    }
    Checkpoint { ops, files }
}

fn seed_checkpoints() -> &'static [Checkpoint] {
    static SEEDS: OnceLock<Vec<Checkpoint>> = OnceLock::new();
    SEEDS.get_or_init(|| {
        let weight = TensorSpec {
            name: "conv.weight",
            storage: "FloatStorage",
            key: "0",
            numel: 6,
            offset: 0,
            size: &[2, 3],
            stride: &[3, 1],
            wrap: Wrap::Plain,
        };
        let bias = TensorSpec {
            name: "conv.bias",
            storage: "HalfStorage",
            key: "1",
            numel: 5,
            offset: 1,
            size: &[4],
            stride: &[1],
            wrap: Wrap::Parameter,
        };
        let step = TensorSpec {
            name: "step",
            storage: "LongStorage",
            key: "2",
            numel: 1,
            offset: 0,
            size: &[],
            stride: &[],
            wrap: Wrap::Plain,
        };
        let transposed = TensorSpec {
            name: "proj.weight",
            storage: "BFloat16Storage",
            key: "3",
            numel: 6,
            offset: 0,
            size: &[2, 3],
            stride: &[1, 2],
            wrap: Wrap::FromType,
        };
        let bytes = TensorSpec {
            name: "mask",
            storage: "ByteStorage",
            key: "4",
            numel: 3,
            offset: 0,
            size: &[3],
            stride: &[1],
            wrap: Wrap::Plain,
        };
        let double = TensorSpec {
            name: "scale",
            storage: "DoubleStorage",
            key: "5",
            numel: 2,
            offset: 0,
            size: &[1, 2],
            stride: &[2, 1],
            wrap: Wrap::Parameter,
        };
        vec![
            checkpoint(&[weight, bias, step], false),
            checkpoint(&[transposed, bytes], true),
            checkpoint(&[double], false),
        ]
    })
}

/// A stored (uncompressed) zip archive, as torch writes it.
fn zip(files: &[(String, Vec<u8>)]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut central = Vec::new();
    for (name, data) in files {
        let offset = out.len() as u32;
        let crc = crc32(&[data]);
        let fields = |sig: u32, central_entry: bool| {
            let mut h = sig.to_le_bytes().to_vec();
            if central_entry {
                h.extend(20u16.to_le_bytes());
            }
            h.extend(20u16.to_le_bytes());
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u16.to_le_bytes()); // time
            h.extend(0x21u16.to_le_bytes()); // date
            h.extend(crc.to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            h
        };
        out.extend(fields(0x0403_4b50, false));
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(data);
        central.extend(fields(0x0201_4b50, true));
        central.extend(0u16.to_le_bytes()); // comment
        central.extend(0u16.to_le_bytes()); // disk
        central.extend(0u16.to_le_bytes()); // internal attributes
        central.extend(0u32.to_le_bytes()); // external attributes
        central.extend(offset.to_le_bytes());
        central.extend_from_slice(name.as_bytes());
    }
    let central_offset = out.len() as u32;
    out.extend_from_slice(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]); // disk numbers
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((files.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(central_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    out
}

fn encode(ckpt: &Checkpoint, pickle_bytes: Option<Vec<u8>>) -> Vec<u8> {
    let pickle = pickle_bytes.unwrap_or_else(|| {
        let mut out = Vec::new();
        for op in &ckpt.ops {
            op.encode(&mut out);
        }
        out
    });
    let mut files = vec![("archive/data.pkl".to_string(), pickle)];
    files.extend(ckpt.files.iter().cloned());
    zip(&files)
}

pub(super) fn seeds() -> Vec<Vec<u8>> {
    seed_checkpoints().iter().map(|c| encode(c, None)).collect()
}

fn random_op(rng: &mut Rng) -> Op {
    match rng.u8(..10) {
        0 => {
            let (m, n) = *pick(rng, &GLOBALS);
            Op::global(m, n)
        }
        1 => Op::Global(random_string(rng), random_string(rng)),
        2 => Op::text(&random_string(rng)),
        3 => Op::int(interesting(rng) as i64),
        4 => Op::BinGet(rng.u8(..8)),
        5 if rng.bool() => Op::LongBinGet(interesting(rng) as u32),
        5 => Op::LongBinPut(interesting(rng) as u32),
        6 => Op::BinFloat(f64::from_bits(rng.u64(..))),
        7 => Op::Raw((0..1 + rng.usize(..4)).map(|_| rng.u8(..)).collect()),
        _ => Op::Code(*pick(rng, &CODES)),
    }
}

/// Changes the argument of `op`, or the op itself when it has none.
fn mutate_op(rng: &mut Rng, op: &mut Op) {
    match op {
        Op::Proto(v) => *v = rng.u8(..),
        Op::Global(module, name) => {
            if rng.bool() {
                let (m, n) = *pick(rng, &GLOBALS);
                (*module, *name) = (m.into(), n.into());
            } else if rng.bool() {
                *name = random_string(rng);
            } else {
                // A name without its newline swallows the next one.
                name.push('\n');
            }
        }
        Op::BinPut(n) | Op::BinGet(n) | Op::BinInt1(n) => *n = rng.u8(..),
        Op::LongBinPut(n) | Op::LongBinGet(n) => *n = interesting(rng) as u32,
        Op::Unicode { text, declared } => match rng.u8(..4) {
            0 => *declared = Some(interesting(rng) as u32),
            1 => *text = random_string(rng).into_bytes(),
            2 => *text = (0..rng.usize(..8)).map(|_| rng.u8(..)).collect(),
            _ => {
                // Storage keys and class names that exist elsewhere in the seeds.
                let s = *pick(
                    rng,
                    &["0", "1", "5", "9", "storage", "cpu", "state_dict", ""],
                );
                *text = s.as_bytes().to_vec();
            }
        },
        Op::BinInt(v) => *v = interesting(rng) as i32,
        Op::BinInt2(v) => *v = interesting(rng) as u16,
        Op::BinFloat(v) => *v = f64::from_bits(interesting(rng)),
        Op::Long1 { bytes, declared } => match rng.u8(..3) {
            0 => *declared = Some(rng.u8(..)),
            1 => *bytes = (0..rng.usize(..12)).map(|_| rng.u8(..)).collect(),
            _ => *bytes = interesting(rng).to_le_bytes().to_vec(),
        },
        Op::Code(c) => *c = *pick(rng, &CODES),
        Op::Raw(bytes) => bytes.push(rng.u8(..)),
    }
}

fn mutate_checkpoint(rng: &mut Rng, ckpt: &mut Checkpoint) {
    let ops = &mut ckpt.ops;
    match rng.u8(..12) {
        0..=4 => {
            let at = rng.usize(..ops.len());
            mutate_op(rng, &mut ops[at]);
        }
        // Integers are sizes, strides, offsets and element counts: the heart of the format.
        5 | 6 => {
            let ints: Vec<usize> = (0..ops.len())
                .filter(|&i| {
                    matches!(
                        ops[i],
                        Op::BinInt1(_) | Op::BinInt2(_) | Op::BinInt(_) | Op::Long1 { .. }
                    )
                })
                .collect();
            if let Some(&at) = ints.get(rng.usize(..ints.len().max(1))) {
                ops[at] = Op::int(match rng.u8(..3) {
                    0 => interesting(rng) as i64,
                    1 => -(rng.i64(1..4)),
                    _ => rng.i64(0..16),
                });
            }
        }
        7 if ops.len() > 1 => {
            ops.remove(rng.usize(..ops.len()));
        }
        8 => {
            let at = rng.usize(..ops.len());
            let copy = ops[at].clone();
            ops.insert(rng.usize(..=ops.len()), copy);
        }
        9 => {
            let at = rng.usize(..=ops.len());
            ops.insert(at, random_op(rng));
        }
        10 if ops.len() > 1 => {
            let at = rng.usize(..ops.len() - 1);
            ops.swap(at, at + 1);
        }
        _ => {
            let files = &mut ckpt.files;
            if files.is_empty() {
                return;
            }
            let at = rng.usize(..files.len());
            match rng.u8(..5) {
                0 => {
                    let keep = rng.usize(..=files[at].1.len());
                    files[at].1.truncate(keep);
                }
                1 => files[at].1.extend((0..rng.usize(..32)).map(|_| rng.u8(..))),
                2 => {
                    files.remove(at);
                }
                3 => files[at].0 = format!("archive/data/{}", rng.u8(..10)),
                _ => {
                    let copy = files[at].clone();
                    files.push(copy);
                }
            }
        }
    }
}

pub(super) fn generate(seeds: &[Vec<u8>], rng: &mut Rng) -> Vec<u8> {
    let mut ckpt = pick(rng, seed_checkpoints()).clone();
    for _ in 0..1 + rng.usize(..4) {
        mutate_checkpoint(rng, &mut ckpt);
    }
    let pickle = (rng.u8(..5) == 0).then(|| {
        let mut out = Vec::new();
        for op in &ckpt.ops {
            op.encode(&mut out);
        }
        mutate_bytes(rng, &mut out, &[], 3);
        out
    });
    let mut archive = encode(&ckpt, pickle);
    if rng.u8(..8) == 0 {
        mutate_bytes(rng, &mut archive, &donors(seeds), 3);
    }
    archive
}

pub(super) fn execute(ctx: &Context, input: &[u8]) -> Result<(), String> {
    let extension = ["ckpt", "pt", "pth", "bin"][(crate::mutate::hash(input) % 4) as usize];
    read_every_tensor(ctx, extension, input)
}
