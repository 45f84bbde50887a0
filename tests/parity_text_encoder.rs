//! The CLIP text encoder against transformers' `CLIPTextModel` on every `text_encoder` fixture
//! case, plus the loading conventions (key prefix, clip skip, bad input).

mod common;

use std::collections::HashMap;
use std::path::Path;

use candle_core::{DType, Device, IndexOp, Tensor};
use vdm_nodes::models::clip::{ClipTextConfig, ClipTextTransformer};

const TOLERANCE: f64 = 1e-4;

fn load_model(case: &Path) -> (ClipTextConfig, ClipTextTransformer) {
    let config = ClipTextConfig::from_file(case.join("config.json")).unwrap();
    let model = ClipTextTransformer::from_safetensors(
        case.join("model.safetensors"),
        &config,
        DType::F32,
        &Device::Cpu,
    )
    .unwrap();
    (config, model)
}

fn io(case: &Path) -> HashMap<String, Tensor> {
    let io = common::load_tensors(&case.join("io.safetensors"));
    for key in [
        "input_ids",
        "last_hidden_state",
        "hidden_states",
        "pooler_output",
        "negative_input_ids",
        "negative_last_hidden_state",
    ] {
        assert!(
            io.contains_key(key),
            "{}: io.safetensors lacks {key}",
            case.display()
        );
    }
    io
}

#[test]
fn parity_text_encoder_outputs() {
    parity_text_encoder_outputs_check();
}

/// The composed candle ops (the differentiable path) give diffusers' result too.
#[test]
fn parity_text_encoder_outputs_on_the_composed_path() {
    vdm_nodes::models::ops::with_composed_ops(parity_text_encoder_outputs_check);
}

fn parity_text_encoder_outputs_check() {
    for case in common::cases("text_encoder") {
        let (config, model) = load_model(&case);
        let io = io(&case);
        let name = case.file_name().unwrap().to_string_lossy().into_owned();

        let output = model.forward_full(&io["input_ids"]).unwrap();
        common::assert_close(
            &format!("{name}/last_hidden_state"),
            &output.last_hidden_state,
            &io["last_hidden_state"],
            TOLERANCE,
        );
        let reference_hidden = &io["hidden_states"];
        assert_eq!(
            output.hidden_states.len(),
            reference_hidden.dim(0).unwrap(),
            "{name}: number of hidden states"
        );
        assert_eq!(output.hidden_states.len(), config.num_hidden_layers + 1);
        for (i, hidden) in output.hidden_states.iter().enumerate() {
            common::assert_close(
                &format!("{name}/hidden_states[{i}]"),
                hidden,
                &reference_hidden.i(i).unwrap(),
                TOLERANCE,
            );
        }
        common::assert_close(
            &format!("{name}/pooler_output"),
            &output.pooler_output,
            &io["pooler_output"],
            TOLERANCE,
        );

        let negative = model.forward(&io["negative_input_ids"]).unwrap();
        common::assert_close(
            &format!("{name}/negative_last_hidden_state"),
            &negative,
            &io["negative_last_hidden_state"],
            TOLERANCE,
        );

        // Legacy configs say eos_token_id 2 and pool at the largest id, which is EOS in CLIP
        // vocabularies (and in this fixture).
        let legacy = ClipTextConfig {
            eos_token_id: 2,
            ..config.clone()
        };
        let legacy_model = ClipTextTransformer::from_safetensors(
            case.join("model.safetensors"),
            &legacy,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap();
        common::assert_close(
            &format!("{name}/pooler_output (argmax pooling)"),
            &legacy_model
                .forward_full(&io["input_ids"])
                .unwrap()
                .pooler_output,
            &io["pooler_output"],
            TOLERANCE,
        );

        // u32 ids (what the tokenizer produces) give the same result as i64 ids.
        let ids_u32 = io["input_ids"].to_dtype(DType::U32).unwrap();
        common::assert_close(
            &format!("{name}/last_hidden_state (u32 ids)"),
            &model.forward(&ids_u32).unwrap(),
            &io["last_hidden_state"],
            TOLERANCE,
        );
    }
}

/// clip_skip n = the n-th layer from the end, through final_layer_norm; transformers'
/// hidden_states give the reference for every n.
#[test]
fn parity_text_encoder_clip_skip() {
    for case in common::cases("text_encoder") {
        let (config, model) = load_model(&case);
        let io = io(&case);
        let final_norm = |x: &Tensor| -> Tensor {
            let weights = common::load_tensors(&case.join("model.safetensors"));
            let key = |k: &str| {
                weights
                    .get(&format!("text_model.final_layer_norm.{k}"))
                    .or_else(|| weights.get(&format!("final_layer_norm.{k}")))
                    .unwrap()
                    .clone()
            };
            let mean = x.mean_keepdim(2).unwrap();
            let centred = x.broadcast_sub(&mean).unwrap();
            let variance = centred.sqr().unwrap().mean_keepdim(2).unwrap();
            centred
                .broadcast_div(&(variance + config.layer_norm_eps).unwrap().sqrt().unwrap())
                .unwrap()
                .broadcast_mul(&key("weight"))
                .unwrap()
                .broadcast_add(&key("bias"))
                .unwrap()
        };
        let layers = config.num_hidden_layers;
        for clip_skip in 1..=layers {
            let out = model
                .forward_with_clip_skip(&io["input_ids"], clip_skip)
                .unwrap();
            let reference = final_norm(&io["hidden_states"].i(layers + 1 - clip_skip).unwrap());
            common::assert_close(
                &format!("clip_skip {clip_skip}"),
                &out,
                &reference,
                TOLERANCE,
            );
        }
        assert!(model.forward_with_clip_skip(&io["input_ids"], 0).is_err());
        assert!(model
            .forward_with_clip_skip(&io["input_ids"], layers + 1)
            .is_err());
    }
}

/// Files without the `text_model.` prefix load to the same model.
#[test]
fn text_encoder_accepts_unprefixed_keys() {
    for case in common::cases("text_encoder") {
        let (config, model) = load_model(&case);
        let io = io(&case);
        let unprefixed: HashMap<String, Tensor> =
            common::load_tensors(&case.join("model.safetensors"))
                .into_iter()
                .map(|(k, v)| (k.strip_prefix("text_model.").unwrap_or(&k).to_owned(), v))
                .collect();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("model.safetensors");
        candle_core::safetensors::save(&unprefixed, &path).unwrap();
        let bare = ClipTextTransformer::from_safetensors(&path, &config, DType::F32, &Device::Cpu)
            .unwrap();
        let (rel, _) = common::errors(
            &bare.forward(&io["input_ids"]).unwrap(),
            &model.forward(&io["input_ids"]).unwrap(),
        );
        assert_eq!(rel, 0.0);
    }
}

#[test]
fn text_encoder_rejects_bad_input() {
    for case in common::cases("text_encoder") {
        let (config, model) = load_model(&case);
        let too_long = Tensor::zeros(
            (1, config.max_position_embeddings + 1),
            DType::U32,
            &Device::Cpu,
        )
        .unwrap();
        let error = model.forward(&too_long).unwrap_err().to_string();
        assert!(error.contains("max_position_embeddings"), "{error}");

        let mut wrong = config.clone();
        wrong.hidden_size *= 2;
        let error = ClipTextTransformer::from_safetensors(
            case.join("model.safetensors"),
            &wrong,
            DType::F32,
            &Device::Cpu,
        )
        .unwrap_err()
        .to_string();
        assert!(error.contains("model.safetensors"), "{error}");
    }
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("config.json");
    std::fs::write(&path, r#"{"hidden_act": "swish"}"#).unwrap();
    let error = ClipTextConfig::from_file(&path).unwrap_err().to_string();
    assert!(error.contains("config.json"), "{error}");
    std::fs::write(&path, "{}").unwrap();
    assert_eq!(
        ClipTextConfig::from_file(&path).unwrap(),
        ClipTextConfig::sd15()
    );
}

// ----------------------------------------------------------------------------------------------
// Tokenizer: no real CLIP vocabulary is available offline, so these build a tiny one in CLIP's
// format (byte-level symbols, `</w>` word ends, `#version` header, special tokens last).

mod tokenizer {
    use std::collections::BTreeMap;
    use std::path::{Path, PathBuf};

    use candle_core::{DType, Device};
    use vdm_nodes::models::clip::ClipTextTransformer;
    use vdm_nodes::models::tokenizer::ClipTokenizer;

    const MERGES: &[(&str, &str)] = &[
        ("p", "h"),
        ("ph", "o"),
        ("pho", "t"),
        ("phot", "o</w>"),
        ("h", "i</w>"),
        ("i", "t</w>"),
        ("'", "s</w>"),
        ("c", "a"),
        ("ca", "t</w>"),
    ];

    /// Every lower-case letter, digit and `!`/`'`/`,` with and without `</w>`, the merge results,
    /// then BOS and EOS.
    fn vocab() -> BTreeMap<String, u32> {
        let mut tokens: Vec<String> = Vec::new();
        for c in ('a'..='z').chain('0'..='9').chain("!',".chars()) {
            tokens.push(c.to_string());
            tokens.push(format!("{c}</w>"));
        }
        tokens.extend(MERGES.iter().map(|(l, r)| format!("{l}{r}")));
        tokens.push("<|startoftext|>".into());
        tokens.push("<|endoftext|>".into());
        tokens
            .into_iter()
            .enumerate()
            .map(|(i, t)| (t, i as u32))
            .collect()
    }

    fn write_files(dir: &Path) -> (PathBuf, PathBuf) {
        let vocab_path = dir.join("vocab.json");
        let merges_path = dir.join("merges.txt");
        std::fs::write(&vocab_path, serde_json::to_string(&vocab()).unwrap()).unwrap();
        let mut merges = String::from("#version: 0.2\n");
        for (l, r) in MERGES {
            merges.push_str(&format!("{l} {r}\n"));
        }
        std::fs::write(&merges_path, merges).unwrap();
        (vocab_path, merges_path)
    }

    fn id(token: &str) -> u32 {
        vocab()[token]
    }

    fn fixture() -> (tempfile::TempDir, ClipTokenizer) {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, merges) = write_files(dir.path());
        let tokenizer = ClipTokenizer::from_files(vocab, merges).unwrap();
        (dir, tokenizer)
    }

    #[test]
    fn tokenizer_frames_pads_and_merges() {
        let (_dir, tokenizer) = fixture();
        let (bos, eos) = (id("<|startoftext|>"), id("<|endoftext|>"));
        assert_eq!(
            (tokenizer.bos_id(), tokenizer.eos_id(), tokenizer.pad_id()),
            (bos, eos, eos)
        );
        let ids = tokenizer.encode("a photo").unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(&ids[..4], &[bos, id("a</w>"), id("photo</w>"), eos]);
        assert!(ids[4..].iter().all(|&i| i == eos), "SD 1.x pads with EOS");

        // Case and whitespace do not matter.
        assert_eq!(tokenizer.encode("  A\tPHOTO \n").unwrap(), ids);
        // A merge that needs the word end does not apply inside a longer word.
        assert_eq!(
            tokenizer.tokenize("photos").unwrap(),
            vec![id("phot"), id("o"), id("s</w>")]
        );
        // Punctuation runs, single digits and contractions are separate words.
        assert_eq!(
            tokenizer.tokenize("hi!! 42, it's").unwrap(),
            vec![
                id("hi</w>"),
                id("!"),
                id("!</w>"),
                id("4</w>"),
                id("2</w>"),
                id(",</w>"),
                id("it</w>"),
                id("'s</w>"),
            ]
        );
        // Special tokens typed in the prompt are recognised.
        assert_eq!(
            tokenizer.tokenize("cat<|endoftext|>a").unwrap(),
            vec![id("cat</w>"), eos, id("a</w>")]
        );
    }

    #[test]
    fn tokenizer_unknown_characters_become_unk() {
        let (_dir, tokenizer) = fixture();
        let unk = id("<|endoftext|>");
        // é is two UTF-8 bytes, each a byte-level symbol missing from this vocabulary.
        assert_eq!(tokenizer.tokenize("é").unwrap(), vec![unk, unk]);
        assert_eq!(
            tokenizer.tokenize("cat ☺ a").unwrap(),
            vec![id("cat</w>"), unk, unk, unk, id("a</w>")]
        );
    }

    #[test]
    fn tokenizer_truncates_keeping_eos() {
        let (_dir, tokenizer) = fixture();
        let eos = tokenizer.eos_id();
        let long = vec!["a"; 100].join(" ");
        let ids = tokenizer.encode(&long).unwrap();
        assert_eq!(ids.len(), 77);
        assert_eq!(ids[0], tokenizer.bos_id());
        assert!(ids[1..76].iter().all(|&i| i == id("a</w>")));
        assert_eq!(ids[76], eos);
        // Exactly 75 words fit without padding.
        let ids = tokenizer.encode(&vec!["a"; 75].join(" ")).unwrap();
        assert_eq!((ids[75], ids[76]), (id("a</w>"), eos));
        let ids = tokenizer.encode("").unwrap();
        assert_eq!(&ids[..2], &[tokenizer.bos_id(), eos]);
    }

    #[test]
    fn tokenizer_reads_pad_token_from_config() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, merges) = write_files(dir.path());
        std::fs::write(
            dir.path().join("tokenizer_config.json"),
            r#"{"pad_token": "!", "model_max_length": 77}"#,
        )
        .unwrap();
        let tokenizer = ClipTokenizer::from_files(&vocab, &merges).unwrap();
        assert_eq!(tokenizer.pad_id(), id("!"));
        let ids = tokenizer.encode("cat").unwrap();
        assert_eq!(
            &ids[..4],
            &[
                id("<|startoftext|>"),
                id("cat</w>"),
                id("<|endoftext|>"),
                id("!")
            ]
        );
        assert!(ids[3..].iter().all(|&i| i == id("!")));
        // special_tokens_map.json wins over tokenizer_config.json, objects as well as strings.
        std::fs::write(
            dir.path().join("special_tokens_map.json"),
            r#"{"pad_token": {"content": ",", "lstrip": false}}"#,
        )
        .unwrap();
        assert_eq!(
            ClipTokenizer::from_dir(dir.path()).unwrap().pad_id(),
            id(",")
        );
    }

    #[test]
    fn tokenizer_errors_name_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let (vocab, merges) = write_files(dir.path());
        let missing = dir.path().join("nope.json");
        let error = ClipTokenizer::from_files(&missing, &merges)
            .unwrap_err()
            .to_string();
        assert!(error.contains("nope.json"), "{error}");

        std::fs::write(&vocab, "{\"a\": 0,").unwrap();
        let error = ClipTokenizer::from_files(&vocab, &merges)
            .unwrap_err()
            .to_string();
        assert!(error.contains("vocab.json"), "{error}");

        let without_eos: BTreeMap<String, u32> = vocab_without("<|endoftext|>");
        std::fs::write(&vocab, serde_json::to_string(&without_eos).unwrap()).unwrap();
        let error = ClipTokenizer::from_files(&vocab, &merges)
            .unwrap_err()
            .to_string();
        assert!(
            error.contains("vocab.json") && error.contains("<|endoftext|>"),
            "{error}"
        );

        write_files(dir.path());
        std::fs::write(&merges, "#version: 0.2\np h\nbroken\n").unwrap();
        let error = ClipTokenizer::from_files(&vocab, &merges)
            .unwrap_err()
            .to_string();
        assert!(error.contains("merges.txt:3"), "{error}");

        std::fs::write(&merges, "#version: 0.2\nq z\n").unwrap();
        let error = ClipTokenizer::from_files(&vocab, &merges)
            .unwrap_err()
            .to_string();
        assert!(error.contains("merges.txt"), "{error}");
    }

    fn vocab_without(token: &str) -> BTreeMap<String, u32> {
        let mut vocab = vocab();
        vocab.remove(token);
        vocab
    }

    /// Tokenizer output feeds the encoder directly.
    #[test]
    fn tokenizer_ids_run_through_the_text_encoder() {
        let (_dir, tokenizer) = fixture();
        let ids = tokenizer
            .encode_to_tensor(&["a photo of a cat", ""], &Device::Cpu)
            .unwrap();
        assert_eq!(ids.dims(), &[2, 77]);
        for case in super::common::cases("text_encoder") {
            let (config, _) = super::load_model(&case);
            // The tiny vocabulary fits inside the fixture's: remap EOS onto the model's EOS.
            let model = ClipTextTransformer::from_safetensors(
                case.join("model.safetensors"),
                &vdm_nodes::models::clip::ClipTextConfig {
                    eos_token_id: tokenizer.eos_id(),
                    ..config.clone()
                },
                DType::F32,
                &Device::Cpu,
            )
            .unwrap();
            let output = model.forward_full(&ids).unwrap();
            assert_eq!(
                output.last_hidden_state.dims(),
                &[2, 77, config.hidden_size]
            );
            assert_eq!(output.pooler_output.dims(), &[2, config.hidden_size]);
        }
    }
}
