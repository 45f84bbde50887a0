//! Prompts as ComfyUI's `CLIPTextEncode` reads them: emphasis weights, prompts longer than
//! one CLIP window in chunks, and the weighting of the encoded tokens.
//!
//! - `(text)` multiplies the weight of `text` by 1.1, `(text:1.3)` sets it to 1.3 (nested
//!   groups multiply, a number replaces), `[text]` divides it by 1.1; `\(`, `\)`, `\[` and `\]`
//!   are literal brackets, and a bracket without its partner is literal too.
//! - The weighted pieces are tokenised one by one and packed into chunks of 75 tokens, each
//!   wrapped in start and end tokens and padded with the end token to 77. A piece of fewer
//!   than 8 tokens that does not fit in the current chunk starts the next one; a longer one is
//!   split where the chunk ends.
//! - Every chunk is encoded, and with any weight other than 1 so is an empty prompt; a token
//!   of weight w becomes `empty + w · (token − empty)`, position by position. The chunks'
//!   embeddings are concatenated along the token axis: (1, 77·chunks, hidden).
//! - `embedding:name` words name textual-inversion embeddings, which are not loaded here: as
//!   ComfyUI does with an embedding it cannot find, the word is dropped (and reported).

use candle_core::{Device, Result, Tensor};

use super::clip::ClipTextTransformer;
use super::tokenizer::ClipTokenizer;

/// Weight change of one level of `(…)`; `[…]` divides by it.
const EMPHASIS: f64 = 1.1;
/// Pieces shorter than this many tokens are kept whole within one chunk.
const MAX_WORD_LENGTH: usize = 8;
const EMBEDDING_PREFIX: &str = "embedding:";

/// Stand-ins for escaped brackets while the emphasis is parsed (Unicode private use).
const ESCAPES: [(&str, char, char); 4] = [
    ("\\(", '\u{E000}', '('),
    ("\\)", '\u{E001}', ')'),
    ("\\[", '\u{E002}', '['),
    ("\\]", '\u{E003}', ']'),
];

/// A piece of the prompt and its weight.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedText {
    pub text: String,
    pub weight: f64,
}

/// The prompt split into pieces of one weight each, in order.
pub fn parse_emphasis(prompt: &str) -> Vec<WeightedText> {
    let mut escaped = prompt.to_owned();
    for (sequence, stand_in, _) in ESCAPES {
        escaped = escaped.replace(sequence, &stand_in.to_string());
    }
    let mut pieces = Vec::new();
    weigh(&escaped, 1.0, &mut pieces);
    for piece in &mut pieces {
        piece.text = piece
            .text
            .chars()
            .map(|c| {
                ESCAPES
                    .iter()
                    .find(|(_, stand_in, _)| *stand_in == c)
                    .map_or(c, |(_, _, literal)| *literal)
            })
            .collect();
    }
    pieces
}

fn weigh(text: &str, weight: f64, pieces: &mut Vec<WeightedText>) {
    let chars: Vec<char> = text.chars().collect();
    let mut plain = String::new();
    let mut i = 0;
    while i < chars.len() {
        let close = match chars[i] {
            '(' => Some(')'),
            '[' => Some(']'),
            _ => None,
        };
        if let Some(end) = close.and_then(|close| matching(&chars, i, close)) {
            if !plain.is_empty() {
                pieces.push(WeightedText {
                    text: std::mem::take(&mut plain),
                    weight,
                });
            }
            let inner: String = chars[i + 1..end].iter().collect();
            if chars[i] == '(' {
                // `(text:1.3)`: the number after the last colon replaces the weight.
                match inner
                    .rfind(':')
                    .filter(|&colon| colon > 0)
                    .and_then(|colon| {
                        let number = inner[colon + 1..].trim().parse::<f64>().ok()?;
                        Some((colon, number))
                    }) {
                    Some((colon, number)) => weigh(&inner[..colon], number, pieces),
                    None => weigh(&inner, weight * EMPHASIS, pieces),
                }
            } else {
                weigh(&inner, weight / EMPHASIS, pieces);
            }
            i = end + 1;
        } else {
            plain.push(chars[i]);
            i += 1;
        }
    }
    if !plain.is_empty() {
        pieces.push(WeightedText {
            text: plain,
            weight,
        });
    }
}

/// The index of the bracket that closes the one at `open`, counting nested brackets of the
/// same kind.
fn matching(chars: &[char], open: usize, close: char) -> Option<usize> {
    let mut depth = 0usize;
    for (offset, &c) in chars[open..].iter().enumerate() {
        if c == chars[open] {
            depth += 1;
        } else if c == close {
            depth -= 1;
            if depth == 0 {
                return Some(open + offset);
            }
        }
    }
    None
}

/// A prompt as CLIP windows of (token id, weight), each of the tokenizer's full length.
#[derive(Debug, Clone, PartialEq)]
pub struct WeightedTokens {
    pub chunks: Vec<Vec<(u32, f64)>>,
    /// Textual-inversion embeddings the prompt named, which were dropped.
    pub dropped_embeddings: Vec<String>,
}

/// Tokenises `prompt` with its weights into chunks (see the module documentation).
pub fn tokenize_weighted(
    tokenizer: &ClipTokenizer,
    prompt: &str,
) -> std::result::Result<WeightedTokens, super::tokenizer::TokenizerError> {
    let (start, end) = (tokenizer.bos_id(), tokenizer.eos_id());
    let length = tokenizer.max_length();
    let mut groups: Vec<Vec<(u32, f64)>> = Vec::new();
    let mut dropped_embeddings = Vec::new();
    for piece in parse_emphasis(prompt) {
        for word in split_embeddings(&piece.text) {
            let word = match word.strip_prefix(EMBEDDING_PREFIX) {
                Some(name) => {
                    // Trailing commas are not part of the name and stay in the prompt.
                    let trimmed = name.trim_end_matches(',');
                    dropped_embeddings.push(trimmed.trim().to_owned());
                    &name[trimmed.len()..]
                }
                None => word,
            };
            if word.is_empty() {
                continue;
            }
            let ids = tokenizer.tokenize(word)?;
            groups.push(ids.into_iter().map(|id| (id, piece.weight)).collect());
        }
    }

    let content = length - 2;
    let mut chunks = Vec::new();
    let mut chunk = vec![(start, 1.0)];
    let close = |chunk: &mut Vec<(u32, f64)>| {
        chunk.push((end, 1.0));
        chunk.resize(length, (end, 1.0));
    };
    for mut group in groups {
        let whole_word = group.len() < MAX_WORD_LENGTH;
        while !group.is_empty() {
            let room = content + 1 - chunk.len();
            if group.len() <= room {
                chunk.append(&mut group);
                break;
            }
            if !whole_word {
                chunk.extend(group.drain(..room));
            }
            close(&mut chunk);
            chunks.push(std::mem::replace(&mut chunk, vec![(start, 1.0)]));
        }
    }
    close(&mut chunk);
    chunks.push(chunk);
    Ok(WeightedTokens {
        chunks,
        dropped_embeddings,
    })
}

/// Splits before every ` embedding:` / `\nembedding:`, as ComfyUI finds embedding names.
fn split_embeddings(text: &str) -> Vec<&str> {
    let mut words = Vec::new();
    let mut rest = text;
    loop {
        let next = [" ", "\n"]
            .iter()
            .filter_map(|sep| rest.find(&format!("{sep}{EMBEDDING_PREFIX}")))
            .min();
        match next {
            Some(at) => {
                words.push(&rest[..at]);
                rest = &rest[at + 1..];
            }
            None => {
                words.push(rest);
                return words;
            }
        }
    }
}

/// The embeddings of weighted, chunked tokens: (1, 77·chunks, hidden), with CLIP skip
/// `clip_skip` (1 = the last layer).
pub fn encode_weighted(
    encoder: &ClipTextTransformer,
    tokens: &WeightedTokens,
    empty_chunk: &[u32],
    clip_skip: usize,
    device: &Device,
) -> Result<Tensor> {
    let length = empty_chunk.len();
    let weighted = tokens
        .chunks
        .iter()
        .flatten()
        .any(|&(_, weight)| weight != 1.0);
    let mut ids: Vec<u32> = tokens.chunks.iter().flatten().map(|&(id, _)| id).collect();
    if weighted {
        ids.extend_from_slice(empty_chunk);
    }
    let rows = ids.len() / length;
    let ids = Tensor::from_vec(ids, (rows, length), device)?;
    let encoded = encoder.forward_with_clip_skip(&ids, clip_skip)?;
    let count = tokens.chunks.len();
    let chunks = if weighted {
        let empty = encoded.narrow(0, count, 1)?;
        let weights: Vec<f32> = tokens
            .chunks
            .iter()
            .flatten()
            .map(|&(_, weight)| weight as f32)
            .collect();
        let weights =
            Tensor::from_vec(weights, (count, length, 1), device)?.to_dtype(encoded.dtype())?;
        let content = encoded.narrow(0, 0, count)?;
        (content.broadcast_sub(&empty)?.broadcast_mul(&weights)?).broadcast_add(&empty)?
    } else {
        encoded
    };
    // (chunks, 77, hidden) → (1, 77·chunks, hidden)
    let (_, _, hidden) = chunks.dims3()?;
    chunks.reshape((1, count * length, hidden))
}

/// `[start, end, end, …]`: the empty prompt's tokens, against which weights are applied.
pub fn empty_chunk(tokenizer: &ClipTokenizer) -> Vec<u32> {
    let mut ids = vec![tokenizer.bos_id()];
    ids.resize(tokenizer.max_length(), tokenizer.eos_id());
    ids
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pieces(prompt: &str) -> Vec<(String, f64)> {
        parse_emphasis(prompt)
            .into_iter()
            .map(|p| (p.text, (p.weight * 1e6).round() / 1e6))
            .collect()
    }

    #[test]
    fn emphasis_multiplies_and_numbers_replace() {
        assert_eq!(pieces("a cat"), [("a cat".into(), 1.0)]);
        assert_eq!(
            pieces("a (red:1.5) cat, ((sharp)) [blurry]"),
            [
                ("a ".into(), 1.0),
                ("red".into(), 1.5),
                (" cat, ".into(), 1.0),
                ("sharp".into(), 1.21),
                (" ".into(), 1.0),
                ("blurry".into(), (1e6 / 1.1_f64).round() / 1e6),
            ]
        );
        // A number replaces the weight of the group it closes, nested or not.
        assert_eq!(pieces("((a:0.5))"), [("a".into(), 0.5)]);
        assert_eq!(
            pieces("(a (b:2) c)"),
            [("a ".into(), 1.1), ("b".into(), 2.0), (" c".into(), 1.1)]
        );
        // Escaped and unmatched brackets are text; a colon without a number is text too.
        assert_eq!(pieces(r"\(x\) (y"), [("(x) (y".into(), 1.0)]);
        assert_eq!(pieces("(time: noon)"), [("time: noon".into(), 1.1)]);
        assert_eq!(pieces(""), Vec::<(String, f64)>::new());
    }

    #[test]
    fn embedding_words_split_out() {
        assert_eq!(
            split_embeddings("bad hands embedding:easy, x\nembedding:y"),
            ["bad hands", "embedding:easy, x", "embedding:y"]
        );
    }
}
