//! Byte-level mutations and the small helpers the structured mutators share.

use fastrand::Rng;

/// Byte values that sit on the edges of signed and unsigned ranges.
const INTERESTING_U8: [u8; 9] = [0, 1, 2, 0x10, 0x7f, 0x80, 0xfe, 0xff, b'0'];

/// Integers that break size arithmetic: zero, one, signed and unsigned limits and their
/// neighbours, powers of two that overflow when multiplied.
pub const INTERESTING_U64: [u64; 18] = [
    0,
    1,
    2,
    3,
    0x7f,
    0xff,
    0x100,
    0x7fff,
    0xffff,
    0x1_0000,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    0x1_0000_0000,
    0x7fff_ffff_ffff_ffff,
    0x8000_0000_0000_0000,
    0xffff_ffff_ffff_ffff,
    1 << 40,
];

/// One of [`INTERESTING_U64`], sometimes off by one.
pub fn interesting(rng: &mut Rng) -> u64 {
    let value = INTERESTING_U64[rng.usize(..INTERESTING_U64.len())];
    match rng.u8(..8) {
        0 => value.wrapping_add(1),
        1 => value.wrapping_sub(1),
        _ => value,
    }
}

/// A small number most of the time, an interesting one otherwise.
pub fn small_or_interesting(rng: &mut Rng) -> u64 {
    if rng.bool() {
        rng.u64(..8)
    } else {
        interesting(rng)
    }
}

/// Applies 1 to `max_rounds` random byte mutations to `data`, splicing from `donors` (other
/// valid inputs of the same kind) when there are any.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, donors: &[&[u8]], max_rounds: usize) {
    let rounds = 1 + rng.usize(..max_rounds.max(1));
    for _ in 0..rounds {
        mutate_once(rng, data, donors);
    }
}

fn mutate_once(rng: &mut Rng, data: &mut Vec<u8>, donors: &[&[u8]]) {
    if data.is_empty() {
        data.extend((0..1 + rng.usize(..16)).map(|_| rng.u8(..)));
        return;
    }
    let len = data.len();
    match rng.u8(..13) {
        // Flip one bit.
        0 | 1 => {
            let at = rng.usize(..len);
            data[at] ^= 1 << rng.u8(..8);
        }
        // Set a byte to a random or an interesting value.
        2 => {
            let at = rng.usize(..len);
            data[at] = rng.u8(..);
        }
        3 => {
            let at = rng.usize(..len);
            data[at] = INTERESTING_U8[rng.usize(..INTERESTING_U8.len())];
        }
        // Write an interesting 2-, 4- or 8-byte integer, either byte order.
        4 | 5 => {
            let width = [2usize, 4, 8][rng.usize(..3)];
            let value = interesting(rng);
            let bytes = if rng.bool() {
                value.to_le_bytes()
            } else {
                value.to_be_bytes()
            };
            let bytes = if rng.bool() {
                &bytes[..width]
            } else {
                &bytes[8 - width..]
            };
            let at = rng.usize(..len);
            let end = (at + width).min(len);
            data[at..end].copy_from_slice(&bytes[..end - at]);
        }
        // Truncate.
        6 => {
            let keep = rng.usize(..len);
            data.truncate(keep);
        }
        // Delete a range.
        7 => {
            let at = rng.usize(..len);
            let count = 1 + rng.usize(..(len - at).min(64));
            data.drain(at..at + count);
        }
        // Duplicate a range somewhere else.
        8 => {
            let at = rng.usize(..len);
            let count = 1 + rng.usize(..(len - at).min(256));
            let piece = data[at..at + count].to_vec();
            let to = rng.usize(..=len);
            data.splice(to..to, piece);
        }
        // Insert random bytes.
        9 => {
            let to = rng.usize(..=len);
            let count = 1 + rng.usize(..16);
            let piece: Vec<u8> = (0..count).map(|_| rng.u8(..)).collect();
            data.splice(to..to, piece);
        }
        // Overwrite a range with a copy of another range.
        10 => {
            let from = rng.usize(..len);
            let to = rng.usize(..len);
            let count = 1 + rng.usize(..(len - from.max(to)).min(64));
            let piece = data[from..from + count].to_vec();
            data[to..to + count].copy_from_slice(&piece);
        }
        // Splice with another valid input: a prefix of this one, a suffix of the other.
        11 if !donors.is_empty() => {
            let donor = donors[rng.usize(..donors.len())];
            if !donor.is_empty() {
                let cut = rng.usize(..=len);
                let from = rng.usize(..donor.len());
                data.truncate(cut);
                data.extend_from_slice(&donor[from..]);
            }
        }
        // Swap two bytes.
        _ => {
            let (a, b) = (rng.usize(..len), rng.usize(..len));
            data.swap(a, b);
        }
    }
}

/// CRC-32 (ISO-HDLC), as PNG chunks and zip entries use it.
pub fn crc32(parts: &[&[u8]]) -> u32 {
    static TABLE: std::sync::OnceLock<[u32; 256]> = std::sync::OnceLock::new();
    let table = TABLE.get_or_init(|| {
        let mut table = [0u32; 256];
        for (n, entry) in table.iter_mut().enumerate() {
            let mut c = n as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xedb8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
            *entry = c;
        }
        table
    });
    let mut crc = 0xffff_ffffu32;
    for part in parts {
        for &byte in *part {
            crc = table[((crc ^ u32::from(byte)) & 0xff) as usize] ^ (crc >> 8);
        }
    }
    crc ^ 0xffff_ffff
}

/// A 64-bit hash of `data` (FNV-1a), for choices that must follow from an input alone.
pub fn hash(data: &[u8]) -> u64 {
    data.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, &b| {
        (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3)
    })
}

/// A short random string: ASCII, digits, control characters, multi-byte UTF-8 or long.
pub fn random_string(rng: &mut Rng) -> String {
    match rng.u8(..8) {
        0 => String::new(),
        1 => "x".repeat(rng.usize(..5000)),
        2 => rng.u64(..).to_string(),
        3 => (0..rng.usize(..8))
            .map(|_| char::from_u32(rng.u32(..0x11_0000)).unwrap_or('\u{fffd}'))
            .collect(),
        4 => [
            "..",
            "../../etc/passwd",
            "/",
            "\u{0}",
            " ",
            "a\nb",
            "\"",
            "\\",
            "é",
            "*",
        ][rng.usize(..10)]
        .to_string(),
        _ => (0..1 + rng.usize(..12))
            .map(|_| rng.alphanumeric())
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn crc32_matches_the_standard_check_value() {
        assert_eq!(crc32(&[b"1234", b"56789"]), 0xcbf4_3926);
    }

    #[test]
    fn mutations_never_panic_on_tiny_inputs() {
        let mut rng = Rng::with_seed(7);
        for len in 0..4 {
            for _ in 0..2000 {
                let mut data = vec![0xaa; len];
                mutate_bytes(&mut rng, &mut data, &[b"donor"], 4);
            }
        }
    }
}
