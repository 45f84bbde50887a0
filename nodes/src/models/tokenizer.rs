//! The CLIP BPE tokenizer, read from the `vocab.json` + `merges.txt` pair that diffusers ships in
//! a pipeline's `tokenizer/` folder.
//!
//! The pipeline is the one of transformers' `CLIPTokenizerFast`: NFC, runs of whitespace
//! collapsed to one space, lower-casing; CLIP's pre-tokenisation regex (contractions, letter
//! runs, single digits, runs of other non-space characters); byte-level mapping of each piece;
//! BPE with a `</w>` end-of-word marker. Characters whose byte symbols are missing from the
//! vocabulary become the unknown token (`<|endoftext|>` for CLIP). `<|startoftext|>` and
//! `<|endoftext|>` typed in a prompt are recognised as the special tokens.
//!
//! [`ClipTokenizer::encode`] returns what SD pipelines feed the text encoder:
//! `[BOS] prompt [EOS] [PAD]…`, exactly `max_length` (77) ids, the prompt truncated so that EOS
//! always ends the content.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use tokenizers::models::bpe::{Merges, Vocab, BPE};
use tokenizers::normalizers::{Lowercase, Replace, Sequence as NormalizerSequence, NFC};
use tokenizers::pre_tokenizers::byte_level::ByteLevel;
use tokenizers::pre_tokenizers::sequence::Sequence as PreTokenizerSequence;
use tokenizers::pre_tokenizers::split::{Split, SplitPattern};
use tokenizers::{AddedToken, SplitDelimiterBehavior, Tokenizer};

/// CLIP's pre-tokenisation pattern (`CLIPTokenizer.pat`).
const CLIP_PATTERN: &str =
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+";

/// The context length of every CLIP text encoder used by Stable Diffusion.
pub const CLIP_MAX_LENGTH: usize = 77;

#[derive(Debug, thiserror::Error)]
pub enum TokenizerError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: not valid JSON for a {what}: {source}")]
    Json {
        path: PathBuf,
        what: &'static str,
        source: serde_json::Error,
    },
    #[error("{path}:{line}: expected a merge `left right`, found {text:?}")]
    Merge {
        path: PathBuf,
        line: usize,
        text: String,
    },
    #[error("{path}: the special token {token:?} is not in the vocabulary")]
    MissingToken { path: PathBuf, token: String },
    #[error("{vocab} + {merges}: {message}")]
    Build {
        vocab: PathBuf,
        merges: PathBuf,
        message: String,
    },
    #[error("{path}: {message}")]
    Config { path: PathBuf, message: String },
    #[error("tokenizing {text:?}: {message}")]
    Encode { text: String, message: String },
}

/// The special tokens and length limit, as a `tokenizer_config.json` /
/// `special_tokens_map.json` may override them.
#[derive(Debug, Clone)]
struct SpecialTokens {
    bos: String,
    eos: String,
    unk: String,
    pad: String,
    max_length: usize,
}

impl Default for SpecialTokens {
    fn default() -> Self {
        Self {
            bos: "<|startoftext|>".into(),
            eos: "<|endoftext|>".into(),
            unk: "<|endoftext|>".into(),
            pad: "<|endoftext|>".into(),
            max_length: CLIP_MAX_LENGTH,
        }
    }
}

impl SpecialTokens {
    /// Applies the token fields of one transformers tokenizer JSON file, where each token is a
    /// string or an `{"content": ...}` object.
    fn apply(&mut self, path: &Path) -> Result<(), TokenizerError> {
        let json = read_json(path, "tokenizer configuration")?;
        let token = |key: &str| -> Option<String> {
            match json.get(key)? {
                serde_json::Value::String(s) => Some(s.clone()),
                serde_json::Value::Object(o) => o.get("content")?.as_str().map(str::to_owned),
                _ => None,
            }
        };
        for (key, slot) in [
            ("bos_token", &mut self.bos),
            ("eos_token", &mut self.eos),
            ("unk_token", &mut self.unk),
            ("pad_token", &mut self.pad),
        ] {
            if let Some(value) = token(key) {
                *slot = value;
            }
        }
        // transformers writes a huge sentinel when no limit is known; only a real CLIP-sized
        // context is taken.
        if let Some(length) = json.get("model_max_length").and_then(|v| v.as_f64()) {
            if length < 2.0 {
                return Err(TokenizerError::Config {
                    path: path.to_owned(),
                    message: format!("model_max_length {length} leaves no room for BOS and EOS"),
                });
            }
            if length <= 4096.0 {
                self.max_length = length as usize;
            }
        }
        Ok(())
    }
}

/// CLIP's BPE tokenizer with SD's fixed-length framing.
#[derive(Clone)]
pub struct ClipTokenizer {
    tokenizer: Tokenizer,
    bos_id: u32,
    eos_id: u32,
    pad_id: u32,
    max_length: usize,
}

impl std::fmt::Debug for ClipTokenizer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ClipTokenizer")
            .field("bos_id", &self.bos_id)
            .field("eos_id", &self.eos_id)
            .field("pad_id", &self.pad_id)
            .field("max_length", &self.max_length)
            .finish_non_exhaustive()
    }
}

impl ClipTokenizer {
    /// Reads `vocab.json` and `merges.txt`. A `tokenizer_config.json` and then a
    /// `special_tokens_map.json` beside `vocab.json`, when present, override the special tokens
    /// (SD 2.x pads with `!`, SD 1.x with `<|endoftext|>`) and the length.
    pub fn from_files(
        vocab_json: impl AsRef<Path>,
        merges_txt: impl AsRef<Path>,
    ) -> Result<Self, TokenizerError> {
        let vocab_path = vocab_json.as_ref();
        let mut special = SpecialTokens::default();
        if let Some(dir) = vocab_path.parent() {
            for name in ["tokenizer_config.json", "special_tokens_map.json"] {
                let path = dir.join(name);
                if path.is_file() {
                    special.apply(&path)?;
                }
            }
        }
        Self::from_files_with(vocab_path, merges_txt.as_ref(), special)
    }

    /// Reads a diffusers `tokenizer/` folder (`vocab.json`, `merges.txt` and the optional
    /// configuration files).
    pub fn from_dir(dir: impl AsRef<Path>) -> Result<Self, TokenizerError> {
        let dir = dir.as_ref();
        Self::from_files(dir.join("vocab.json"), dir.join("merges.txt"))
    }

    fn from_files_with(
        vocab_path: &Path,
        merges_path: &Path,
        special: SpecialTokens,
    ) -> Result<Self, TokenizerError> {
        let vocab: HashMap<String, u32> =
            serde_json::from_value(read_json(vocab_path, "vocabulary")?).map_err(|source| {
                TokenizerError::Json {
                    path: vocab_path.to_owned(),
                    what: "vocabulary (token → id)",
                    source,
                }
            })?;
        let id_of = |token: &str| {
            vocab
                .get(token)
                .copied()
                .ok_or_else(|| TokenizerError::MissingToken {
                    path: vocab_path.to_owned(),
                    token: token.to_owned(),
                })
        };
        let bos_id = id_of(&special.bos)?;
        let eos_id = id_of(&special.eos)?;
        let pad_id = id_of(&special.pad)?;
        id_of(&special.unk)?;
        let merges = read_merges(merges_path)?;

        let build_error = |message: String| TokenizerError::Build {
            vocab: vocab_path.to_owned(),
            merges: merges_path.to_owned(),
            message,
        };
        let bpe_vocab: Vocab = vocab.iter().map(|(k, &v)| (k.clone(), v)).collect();
        let bpe = BPE::builder()
            .vocab_and_merges(bpe_vocab, merges)
            .unk_token(special.unk.clone())
            .end_of_word_suffix("</w>".into())
            .fuse_unk(false)
            .build()
            .map_err(|e| build_error(e.to_string()))?;

        let normalizer = NormalizerSequence::new(vec![
            NFC.into(),
            Replace::new(
                tokenizers::normalizers::replace::ReplacePattern::Regex(r"\s+".into()),
                " ",
            )
            .map_err(|e| build_error(e.to_string()))?
            .into(),
            Lowercase.into(),
        ]);
        let split = Split::new(
            SplitPattern::Regex(CLIP_PATTERN.into()),
            SplitDelimiterBehavior::Removed,
            true,
        )
        .map_err(|e| build_error(e.to_string()))?;
        let pre_tokenizer = PreTokenizerSequence::new(vec![
            split.into(),
            ByteLevel::new(false, true, false).into(),
        ]);

        let mut tokenizer = Tokenizer::new(bpe);
        tokenizer
            .with_normalizer(Some(normalizer))
            .map_err(|e| build_error(e.to_string()))?;
        tokenizer.with_pre_tokenizer(Some(pre_tokenizer));
        let mut specials = vec![special.bos.clone(), special.eos.clone()];
        for token in [&special.unk, &special.pad] {
            if !specials.contains(token) {
                specials.push(token.clone());
            }
        }
        let added: Vec<AddedToken> = specials
            .into_iter()
            .map(|t| AddedToken::from(t, true))
            .collect();
        tokenizer
            .add_special_tokens(added)
            .map_err(|e| build_error(e.to_string()))?;

        Ok(Self {
            tokenizer,
            bos_id,
            eos_id,
            pad_id,
            max_length: special.max_length,
        })
    }

    pub fn bos_id(&self) -> u32 {
        self.bos_id
    }

    pub fn eos_id(&self) -> u32 {
        self.eos_id
    }

    pub fn pad_id(&self) -> u32 {
        self.pad_id
    }

    /// The fixed length of [`ClipTokenizer::encode`]'s output (77 for CLIP).
    pub fn max_length(&self) -> usize {
        self.max_length
    }

    /// The ids of `text` alone: no BOS/EOS, no truncation, no padding.
    pub fn tokenize(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let encoding = self
            .tokenizer
            .encode(text, false)
            .map_err(|e| TokenizerError::Encode {
                text: text.to_owned(),
                message: e.to_string(),
            })?;
        Ok(encoding.get_ids().to_vec())
    }

    /// `[BOS] ids [EOS] [PAD]…`, exactly `max_length` ids; a longer prompt loses its tail so
    /// that EOS stays the last content token (transformers' `padding="max_length",
    /// truncation=True`).
    pub fn encode(&self, text: &str) -> Result<Vec<u32>, TokenizerError> {
        let content = self.tokenize(text)?;
        let keep = content.len().min(self.max_length - 2);
        let mut ids = Vec::with_capacity(self.max_length);
        ids.push(self.bos_id);
        ids.extend_from_slice(&content[..keep]);
        ids.push(self.eos_id);
        ids.resize(self.max_length, self.pad_id);
        Ok(ids)
    }

    /// [`ClipTokenizer::encode`] for each prompt, as a (prompts, max_length) u32 tensor ready
    /// for [`crate::models::clip::ClipTextTransformer::forward`].
    pub fn encode_to_tensor(
        &self,
        texts: &[&str],
        device: &Device,
    ) -> Result<Tensor, TokenizerError> {
        let mut ids = Vec::with_capacity(texts.len() * self.max_length);
        for text in texts {
            ids.extend(self.encode(text)?);
        }
        Tensor::from_vec(ids, (texts.len(), self.max_length), device).map_err(|e| {
            TokenizerError::Encode {
                text: texts.join(" | "),
                message: e.to_string(),
            }
        })
    }
}

fn read_json(path: &Path, what: &'static str) -> Result<serde_json::Value, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    serde_json::from_str(&text).map_err(|source| TokenizerError::Json {
        path: path.to_owned(),
        what,
        source,
    })
}

/// `merges.txt`: an optional `#version` header, then one `left right` pair per line, in rank
/// order.
fn read_merges(path: &Path) -> Result<Merges, TokenizerError> {
    let text = std::fs::read_to_string(path).map_err(|source| TokenizerError::Io {
        path: path.to_owned(),
        source,
    })?;
    let mut merges = Vec::new();
    for (index, line) in text.lines().enumerate() {
        if (index == 0 && line.starts_with("#version")) || line.trim().is_empty() {
            continue;
        }
        let mut parts = line.split(' ');
        match (parts.next(), parts.next(), parts.next()) {
            (Some(left), Some(right), None) if !left.is_empty() && !right.is_empty() => {
                merges.push((left.to_owned(), right.to_owned()))
            }
            _ => {
                return Err(TokenizerError::Merge {
                    path: path.to_owned(),
                    line: index + 1,
                    text: line.to_owned(),
                })
            }
        }
    }
    Ok(merges)
}
/// Writes a small CLIP BPE vocabulary in the files diffusers ships (`vocab.json`,
/// `merges.txt`) into `dir`: lower-case letters, digits and common punctuation, each alone and
/// with `</w>`, a few merges, then BOS and EOS last. Prompts tokenise letter by letter; other
/// characters become the unknown token. Returns the vocabulary size. For tiny models made
/// without a download: the real vocabulary has 49,408 tokens.
pub fn write_letter_vocabulary(dir: &Path) -> std::io::Result<usize> {
    let merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>")];
    let mut tokens: Vec<String> = Vec::new();
    for c in ('a'..='z').chain('0'..='9').chain("!',.-".chars()) {
        tokens.push(c.to_string());
        tokens.push(format!("{c}</w>"));
    }
    tokens.extend(merges.iter().map(|(l, r)| format!("{l}{r}")));
    tokens.push("<|startoftext|>".into());
    tokens.push("<|endoftext|>".into());
    let size = tokens.len();
    let vocab: serde_json::Map<String, serde_json::Value> = tokens
        .into_iter()
        .enumerate()
        .map(|(i, t)| (t, serde_json::json!(i)))
        .collect();
    std::fs::write(
        dir.join("vocab.json"),
        serde_json::Value::Object(vocab).to_string(),
    )?;
    let mut text = String::from("#version: 0.2\n");
    for (l, r) in merges {
        text.push_str(&format!("{l} {r}\n"));
    }
    std::fs::write(dir.join("merges.txt"), text)?;
    Ok(size)
}
