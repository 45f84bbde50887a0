//! The checkpoint loaders on the layouts users have: the fixture weights are written out as an
//! LDM single-file checkpoint (safetensors and a PyTorch zip pickle), as original AnimateDiff
//! motion modules and as diffusers folders, read back, and compared bit for bit with the
//! originals. The diffusers → LDM / AnimateDiff renaming used to write them is a prefix table
//! written here, independently of the loaders' rules.

mod common;

use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use vdm_nodes::models::load::{
    open_vae, open_weights, AnimateDiffVersion, DiffusersPipeline, LoadError, MotionAdapterWeights,
    MotionModuleFormat, SingleFileCheckpoint, SingleFileLayout, WeightMap,
};
use vdm_nodes::models::motion::positions::{position_frequencies, sinusoidal_positions};
use vdm_nodes::models::motion::{MotionAdapterConfig, DEFAULT_MOTION_HEADS};
use vdm_nodes::models::unet::PerBlock;
use vdm_nodes::models::vae::{AutoencoderKL, AutoencoderKLConfig};

// ---------------------------------------------------------------------------------------------
// Fixtures

fn read_json(path: &Path) -> serde_json::Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn expect_file(folder: &Path, name: &str) -> PathBuf {
    let path = folder.join(name);
    assert!(
        path.is_file(),
        "{}: fixture layout not understood, no {name}",
        folder.display()
    );
    path
}

/// A UNet + motion adapter case folder: the two weight files and their configs.
struct UnetCase {
    dir: PathBuf,
    unet: HashMap<String, Tensor>,
    unet_config: serde_json::Value,
    adapter: HashMap<String, Tensor>,
    adapter_config: serde_json::Value,
}

fn unet_cases() -> Vec<UnetCase> {
    ["unet_motion_mid", "unet_motion_nomid"]
        .iter()
        .flat_map(|kind| common::cases(kind))
        .map(|dir| UnetCase {
            unet: common::load_tensors(&expect_file(&dir, "unet.safetensors")),
            unet_config: read_json(&expect_file(&dir, "unet_config.json")),
            adapter: common::load_tensors(&expect_file(&dir, "motion_adapter.safetensors")),
            adapter_config: read_json(&expect_file(&dir, "motion_adapter_config.json")),
            dir,
        })
        .collect()
}

struct VaeCase {
    dir: PathBuf,
    weights: HashMap<String, Tensor>,
    config: AutoencoderKLConfig,
    io: HashMap<String, Tensor>,
}

fn vae_cases() -> Vec<VaeCase> {
    common::cases("vae")
        .into_iter()
        .map(|dir| VaeCase {
            weights: common::load_tensors(&expect_file(&dir, "vae.safetensors")),
            config: serde_json::from_value(read_json(&expect_file(&dir, "vae_config.json")))
                .unwrap(),
            io: common::load_tensors(&expect_file(&dir, "io.safetensors")),
            dir,
        })
        .collect()
}

struct TextEncoderCase {
    weights: HashMap<String, Tensor>,
    config: serde_json::Value,
}

fn text_encoder_case() -> TextEncoderCase {
    let dir = common::cases("text_encoder").remove(0);
    TextEncoderCase {
        weights: common::load_tensors(&expect_file(&dir, "model.safetensors")),
        config: read_json(&expect_file(&dir, "config.json")),
    }
}

// ---------------------------------------------------------------------------------------------
// Bit-exact comparison

fn bits(t: &Tensor) -> Vec<u64> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .map(|&v| v as u64)
            .collect(),
        // f16 → f32 is exact, so equal f32 bits mean equal f16 bits.
        DType::F16 | DType::BF16 => flat
            .to_dtype(DType::F32)
            .unwrap()
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .map(|v| v.to_bits() as u64)
            .collect(),
        other => panic!("no comparison for {other:?}"),
    }
}

/// Every expected key is in `loaded` with exactly the expected tensor, and nothing else is.
fn assert_same_weights(what: &str, loaded: &WeightMap, expected: &HashMap<String, Tensor>) {
    let loaded_keys: BTreeSet<&str> = loaded.keys().collect();
    let expected_keys: BTreeSet<&str> = expected.keys().map(String::as_str).collect();
    let missing: Vec<_> = expected_keys.difference(&loaded_keys).take(5).collect();
    let extra: Vec<_> = loaded_keys.difference(&expected_keys).take(5).collect();
    assert!(
        missing.is_empty() && extra.is_empty(),
        "{what}: missing {missing:?}, extra {extra:?}"
    );
    for (key, want) in expected {
        let got = loaded.get(key).unwrap_or_else(|e| panic!("{what}: {e}"));
        assert_eq!(got.dtype(), want.dtype(), "{what}: dtype of {key}");
        assert_eq!(got.dims(), want.dims(), "{what}: shape of {key}");
        assert!(bits(&got) == bits(want), "{what}: {key} differs");
    }
    println!("{what}: {} tensors identical", expected.len());
}

// ---------------------------------------------------------------------------------------------
// diffusers → LDM, as prefix tables

/// (diffusers prefix, LDM prefix, whether the rest is a resnet parameter to rename).
type PrefixTable = Vec<(String, String, bool)>;

fn ldm_unet_table(config: &serde_json::Value) -> PrefixTable {
    let layers = config["layers_per_block"].as_u64().unwrap() as usize;
    let is_cross =
        |kind: &str, i: usize| config[kind][i].as_str().unwrap().starts_with("CrossAttn");
    let levels = config["block_out_channels"].as_array().unwrap().len();
    let mut table: PrefixTable = vec![
        (
            "time_embedding.linear_1.".into(),
            "time_embed.0.".into(),
            false,
        ),
        (
            "time_embedding.linear_2.".into(),
            "time_embed.2.".into(),
            false,
        ),
        ("conv_in.".into(), "input_blocks.0.0.".into(), false),
        ("conv_norm_out.".into(), "out.0.".into(), false),
        ("conv_out.".into(), "out.2.".into(), false),
        (
            "mid_block.resnets.0.".into(),
            "middle_block.0.".into(),
            true,
        ),
        (
            "mid_block.attentions.0.".into(),
            "middle_block.1.".into(),
            false,
        ),
        (
            "mid_block.resnets.1.".into(),
            "middle_block.2.".into(),
            true,
        ),
    ];
    let mut input = 1;
    for level in 0..levels {
        for layer in 0..layers {
            let d = format!("down_blocks.{level}");
            table.push((
                format!("{d}.resnets.{layer}."),
                format!("input_blocks.{input}.0."),
                true,
            ));
            if is_cross("down_block_types", level) {
                table.push((
                    format!("{d}.attentions.{layer}."),
                    format!("input_blocks.{input}.1."),
                    false,
                ));
            }
            input += 1;
        }
        if level + 1 < levels {
            table.push((
                format!("down_blocks.{level}.downsamplers.0.conv."),
                format!("input_blocks.{input}.0.op."),
                false,
            ));
            input += 1;
        }
    }
    let mut output = 0;
    for level in 0..levels {
        let cross = is_cross("up_block_types", level);
        for layer in 0..=layers {
            let u = format!("up_blocks.{level}");
            table.push((
                format!("{u}.resnets.{layer}."),
                format!("output_blocks.{output}.0."),
                true,
            ));
            if cross {
                table.push((
                    format!("{u}.attentions.{layer}."),
                    format!("output_blocks.{output}.1."),
                    false,
                ));
            }
            if layer == layers && level + 1 < levels {
                let slot = if cross { 2 } else { 1 };
                table.push((
                    format!("{u}.upsamplers.0.conv."),
                    format!("output_blocks.{output}.{slot}.conv."),
                    false,
                ));
            }
            output += 1;
        }
    }
    table
}

const LDM_UNET_RESNET: [(&str, &str); 6] = [
    ("norm1.", "in_layers.0."),
    ("conv1.", "in_layers.2."),
    ("norm2.", "out_layers.0."),
    ("conv2.", "out_layers.3."),
    ("time_emb_proj.", "emb_layers.1."),
    ("conv_shortcut.", "skip_connection."),
];

const LDM_VAE_RESNET: [(&str, &str); 5] = [
    ("norm1.", "norm1."),
    ("conv1.", "conv1."),
    ("norm2.", "norm2."),
    ("conv2.", "conv2."),
    ("conv_shortcut.", "nin_shortcut."),
];

fn ldm_vae_table(config: &AutoencoderKLConfig) -> PrefixTable {
    let levels = config.block_out_channels.len();
    let mut table: PrefixTable = vec![
        ("quant_conv.".into(), "quant_conv.".into(), false),
        ("post_quant_conv.".into(), "post_quant_conv.".into(), false),
    ];
    for side in ["encoder", "decoder"] {
        for (d, l) in [
            ("conv_in.", "conv_in."),
            ("conv_out.", "conv_out."),
            ("conv_norm_out.", "norm_out."),
            ("mid_block.attentions.0.group_norm.", "mid.attn_1.norm."),
            ("mid_block.attentions.0.to_q.", "mid.attn_1.q."),
            ("mid_block.attentions.0.to_k.", "mid.attn_1.k."),
            ("mid_block.attentions.0.to_v.", "mid.attn_1.v."),
            ("mid_block.attentions.0.to_out.0.", "mid.attn_1.proj_out."),
        ] {
            table.push((format!("{side}.{d}"), format!("{side}.{l}"), false));
        }
        table.push((
            format!("{side}.mid_block.resnets.0."),
            format!("{side}.mid.block_1."),
            true,
        ));
        table.push((
            format!("{side}.mid_block.resnets.1."),
            format!("{side}.mid.block_2."),
            true,
        ));
    }
    for level in 0..levels {
        for layer in 0..config.layers_per_block {
            table.push((
                format!("encoder.down_blocks.{level}.resnets.{layer}."),
                format!("encoder.down.{level}.block.{layer}."),
                true,
            ));
        }
        table.push((
            format!("encoder.down_blocks.{level}.downsamplers.0.conv."),
            format!("encoder.down.{level}.downsample.conv."),
            false,
        ));
        let ldm_level = levels - 1 - level;
        for layer in 0..=config.layers_per_block {
            table.push((
                format!("decoder.up_blocks.{level}.resnets.{layer}."),
                format!("decoder.up.{ldm_level}.block.{layer}."),
                true,
            ));
        }
        table.push((
            format!("decoder.up_blocks.{level}.upsamplers.0.conv."),
            format!("decoder.up.{ldm_level}.upsample.conv."),
            false,
        ));
    }
    table
}

fn translate(key: &str, table: &PrefixTable, resnet: &[(&str, &str)]) -> String {
    let (from, to, is_resnet) = table
        .iter()
        .filter(|(from, _, _)| key.starts_with(from.as_str()))
        .max_by_key(|(from, _, _)| from.len())
        .unwrap_or_else(|| panic!("no table entry for {key}"));
    let rest = &key[from.len()..];
    if !is_resnet {
        return format!("{to}{rest}");
    }
    let (d, l) = resnet
        .iter()
        .find(|(d, _)| rest.starts_with(d))
        .unwrap_or_else(|| panic!("no resnet entry for {key}"));
    format!("{to}{l}{}", &rest[d.len()..])
}

/// The whole SD 1.x single-file layout of a UNet, a VAE and a CLIP text encoder, plus the
/// non-model entries real checkpoints carry.
fn ldm_checkpoint(
    unet: &UnetCase,
    vae: &VaeCase,
    clip: &TextEncoderCase,
) -> HashMap<String, Tensor> {
    let mut out = HashMap::new();
    let unet_table = ldm_unet_table(&unet.unet_config);
    for (key, tensor) in &unet.unet {
        let ldm = translate(key, &unet_table, &LDM_UNET_RESNET);
        out.insert(format!("model.diffusion_model.{ldm}"), tensor.clone());
    }
    let vae_table = ldm_vae_table(&vae.config);
    for (key, tensor) in &vae.weights {
        let ldm = translate(key, &vae_table, &LDM_VAE_RESNET);
        let is_projection = key.contains("mid_block.attentions.0.to_") && key.ends_with("weight");
        // LDM's attention projections are 1×1 convolutions.
        let tensor = if is_projection {
            tensor.unsqueeze(2).unwrap().unsqueeze(3).unwrap()
        } else {
            tensor.clone()
        };
        out.insert(format!("first_stage_model.{ldm}"), tensor);
    }
    for (key, tensor) in &clip.weights {
        out.insert(
            format!("cond_stage_model.transformer.{key}"),
            tensor.clone(),
        );
    }
    let dev = Device::Cpu;
    let positions = Tensor::arange(0i64, 77, &dev)
        .unwrap()
        .unsqueeze(0)
        .unwrap();
    out.insert(
        "cond_stage_model.transformer.text_model.embeddings.position_ids".into(),
        positions,
    );
    out.insert(
        "alphas_cumprod".into(),
        Tensor::ones(1000, DType::F32, &dev).unwrap(),
    );
    out
}

fn layout_of(unet: &UnetCase, vae: &VaeCase) -> SingleFileLayout {
    SingleFileLayout {
        unet_layers_per_block: unet.unet_config["layers_per_block"].as_u64().unwrap() as usize,
        vae_levels: vae.config.block_out_channels.len(),
    }
}

// ---------------------------------------------------------------------------------------------
// diffusers → original AnimateDiff

const ORIGINAL_MOTION_LEAVES: [(&str, &str); 6] = [
    ("attn1.", "attention_blocks.0."),
    ("attn2.", "attention_blocks.1."),
    ("norm1.", "norms.0."),
    ("norm2.", "norms.1."),
    ("norm3.", "ff_norm."),
    ("ff.", "ff."),
];

/// The original names of one `MotionAdapter` key: the one positional table per transformer
/// block is stored once per attention block there.
fn to_original_motion(key: &str) -> Vec<String> {
    let marker = ".motion_modules.";
    let at = key
        .find(marker)
        .unwrap_or_else(|| panic!("not a motion key: {key}"));
    let after = &key[at + marker.len()..];
    let (index, rest) = after.split_once('.').unwrap();
    let module = format!("{}{marker}{index}.temporal_transformer", &key[..at]);
    let Some(block_rest) = rest.strip_prefix("transformer_blocks.") else {
        return vec![format!("{module}.{rest}")];
    };
    let (block, leaf) = block_rest.split_once('.').unwrap();
    let block = format!("{module}.transformer_blocks.{block}");
    if leaf == "pos_embed.pe" {
        return (0..2)
            .map(|a| format!("{block}.attention_blocks.{a}.pos_encoder.pe"))
            .collect();
    }
    let (d, o) = ORIGINAL_MOTION_LEAVES
        .iter()
        .find(|(d, _)| leaf.starts_with(d))
        .unwrap_or_else(|| panic!("no table entry for {key}"));
    vec![format!("{block}.{o}{}", &leaf[d.len()..])]
}

fn original_motion_module(adapter: &HashMap<String, Tensor>) -> HashMap<String, Tensor> {
    adapter
        .iter()
        .flat_map(|(key, t)| {
            to_original_motion(key)
                .into_iter()
                .map(move |k| (k, t.clone()))
        })
        .collect()
}

// ---------------------------------------------------------------------------------------------
// A minimal PyTorch zip checkpoint writer (protocol 2 pickle, `torch._utils._rebuild_tensor_v2`,
// storages in `archive/data/N`, stored zip entries), as `torch.save` lays it out.

struct Pickle(Vec<u8>);

impl Pickle {
    fn new() -> Self {
        Pickle(vec![0x80, 2])
    }
    fn op(&mut self, op: u8) {
        self.0.push(op);
    }
    fn text(&mut self, s: &str) {
        self.op(b'X');
        self.0.extend((s.len() as u32).to_le_bytes());
        self.0.extend(s.as_bytes());
    }
    fn global(&mut self, module: &str, name: &str) {
        self.op(b'c');
        self.0.extend(format!("{module}\n{name}\n").as_bytes());
    }
    fn int(&mut self, v: usize) {
        if v < 256 {
            self.0.extend([b'K', v as u8]);
        } else if v < 65536 {
            self.op(b'M');
            self.0.extend((v as u16).to_le_bytes());
        } else {
            self.op(b'J');
            self.0.extend((v as i32).to_le_bytes());
        }
    }
    fn int_tuple(&mut self, values: &[usize]) {
        self.op(b'(');
        values.iter().for_each(|&v| self.int(v));
        self.op(b't');
    }
    fn ordered_dict(&mut self) {
        self.global("collections", "OrderedDict");
        self.op(b')');
        self.op(b'R');
    }
    fn tensor(&mut self, storage: &str, tensor: &Tensor) {
        let class = match tensor.dtype() {
            DType::F32 => "FloatStorage",
            DType::I64 => "LongStorage",
            other => panic!("no storage class for {other:?}"),
        };
        let dims = tensor.dims();
        let mut strides = vec![1; dims.len()];
        for i in (0..dims.len().saturating_sub(1)).rev() {
            strides[i] = strides[i + 1] * dims[i + 1];
        }
        self.global("torch._utils", "_rebuild_tensor_v2");
        self.op(b'(');
        self.op(b'(');
        self.text("storage");
        self.global("torch", class);
        self.text(storage);
        self.text("cpu");
        self.int(tensor.elem_count());
        self.op(b't');
        self.op(b'Q');
        self.int(0);
        self.int_tuple(dims);
        self.int_tuple(&strides);
        self.op(0x89);
        self.ordered_dict();
        self.op(b't');
        self.op(b'R');
    }
}

fn tensor_bytes(t: &Tensor) -> Vec<u8> {
    let flat = t.flatten_all().unwrap();
    match t.dtype() {
        DType::F32 => flat
            .to_vec1::<f32>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        DType::I64 => flat
            .to_vec1::<i64>()
            .unwrap()
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        other => panic!("no bytes for {other:?}"),
    }
}

/// Writes `tensors` as `torch.save` would, at the top level or under `state_dict` (Lightning).
fn write_torch_checkpoint(path: &Path, tensors: &HashMap<String, Tensor>, nested: bool) {
    let mut keys: Vec<&String> = tensors.keys().collect();
    keys.sort();
    let mut pickle = Pickle::new();
    if nested {
        pickle.op(b'}');
        pickle.text("state_dict");
    }
    pickle.ordered_dict();
    let mut entries = Vec::new();
    for (index, key) in keys.iter().enumerate() {
        pickle.text(key);
        pickle.tensor(&index.to_string(), &tensors[*key]);
        pickle.op(b's');
        entries.push((
            format!("archive/data/{index}"),
            tensor_bytes(&tensors[*key]),
        ));
    }
    if nested {
        pickle.op(b's');
        pickle.text("global_step");
        pickle.int(470000);
        pickle.op(b's');
    }
    pickle.op(b'.');
    entries.insert(0, ("archive/data.pkl".into(), pickle.0));
    entries.push(("archive/byteorder".into(), b"little".to_vec()));
    entries.push(("archive/version".into(), b"3\n".to_vec()));
    write_stored_zip(path, &entries);
}

fn crc32(data: &[u8]) -> u32 {
    let table: Vec<u32> = (0..256u32)
        .map(|n| {
            (0..8).fold(n, |c, _| {
                if c & 1 == 1 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                }
            })
        })
        .collect();
    !data.iter().fold(!0u32, |c, &b| {
        table[((c ^ b as u32) & 0xFF) as usize] ^ (c >> 8)
    })
}

/// A zip archive of uncompressed entries.
fn write_stored_zip(path: &Path, entries: &[(String, Vec<u8>)]) {
    let mut out = Vec::new();
    let mut central = Vec::new();
    let dos_date: u16 = (1 << 5) | 1; // 1980-01-01
    for (name, data) in entries {
        let offset = out.len() as u32;
        let crc = crc32(data);
        let header = |sig: u32, central: bool| {
            let mut h = Vec::new();
            h.extend(sig.to_le_bytes());
            if central {
                h.extend(20u16.to_le_bytes()); // version made by
            }
            h.extend(20u16.to_le_bytes()); // version needed
            h.extend(0u16.to_le_bytes()); // flags
            h.extend(0u16.to_le_bytes()); // stored
            h.extend(0u16.to_le_bytes()); // time
            h.extend(dos_date.to_le_bytes());
            h.extend(crc.to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((data.len() as u32).to_le_bytes());
            h.extend((name.len() as u16).to_le_bytes());
            h.extend(0u16.to_le_bytes()); // extra
            if central {
                h.extend([0u8; 6]); // comment length, disk, internal attributes
                h.extend(0u32.to_le_bytes()); // external attributes
                h.extend(offset.to_le_bytes());
            }
            h.extend(name.as_bytes());
            h
        };
        out.extend(header(0x0403_4b50, false));
        out.extend(data);
        central.extend(header(0x0201_4b50, true));
    }
    let central_offset = out.len() as u32;
    out.extend(&central);
    out.extend(0x0605_4b50u32.to_le_bytes());
    out.extend([0u8; 4]); // disk numbers
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((entries.len() as u16).to_le_bytes());
    out.extend((central.len() as u32).to_le_bytes());
    out.extend(central_offset.to_le_bytes());
    out.extend(0u16.to_le_bytes());
    std::fs::write(path, out).unwrap();
}

fn save_safetensors(path: &Path, tensors: &HashMap<String, Tensor>) {
    candle_core::safetensors::save(tensors, path).unwrap();
}

// ---------------------------------------------------------------------------------------------
// Single-file SD checkpoints

fn check_single_file(
    what: &str,
    loaded: &SingleFileCheckpoint,
    unet: &UnetCase,
    vae: &VaeCase,
    clip: &TextEncoderCase,
) {
    assert_same_weights(&format!("{what} unet"), &loaded.unet, &unet.unet);
    assert_same_weights(&format!("{what} vae"), &loaded.vae, &vae.weights);
    assert_same_weights(
        &format!("{what} text encoder"),
        &loaded.text_encoder,
        &clip.weights,
    );
}

#[test]
fn ldm_single_file_safetensors_round_trip() {
    let clip = text_encoder_case();
    let vaes = vae_cases();
    let dir = tempfile::tempdir().unwrap();
    for unet in unet_cases() {
        for vae in &vaes {
            let path = dir.path().join("sd15_single.safetensors");
            save_safetensors(&path, &ldm_checkpoint(&unet, vae, &clip));
            let layout = layout_of(&unet, vae);
            let what = format!("{} single-file safetensors", unet.dir.display());
            let loaded = SingleFileCheckpoint::open(&path, Some(layout)).unwrap();
            check_single_file(&what, &loaded, &unet, vae, &clip);
            assert_eq!(
                SingleFileLayout::infer(&open_weights(&path).unwrap()).unwrap(),
                layout
            );
            let inferred = SingleFileCheckpoint::open(&path, None).unwrap();
            check_single_file(
                &format!("{what} (inferred layout)"),
                &inferred,
                &unet,
                vae,
                &clip,
            );
            // Non-model entries (the schedule, the position_ids buffer) are not weights.
            assert!(
                inferred.unmapped.is_empty(),
                "unmapped: {:?}",
                inferred.unmapped
            );
        }
    }
}

#[test]
fn ldm_single_file_ckpt_round_trip() {
    let clip = text_encoder_case();
    let vaes = vae_cases();
    let dir = tempfile::tempdir().unwrap();
    for unet in unet_cases() {
        for vae in &vaes {
            for nested in [true, false] {
                let path = dir.path().join("sd15_single.ckpt");
                write_torch_checkpoint(&path, &ldm_checkpoint(&unet, vae, &clip), nested);
                let loaded =
                    SingleFileCheckpoint::open(&path, Some(layout_of(&unet, vae))).unwrap();
                let what = format!("{} .ckpt (state_dict nested: {nested})", unet.dir.display());
                check_single_file(&what, &loaded, &unet, vae, &clip);
            }
        }
    }
}

fn build_vae(weights: &WeightMap, config: &AutoencoderKLConfig) -> Result<AutoencoderKL, String> {
    AutoencoderKL::new(weights.var_builder(DType::F32, &Device::Cpu), config)
        .map_err(|e| e.to_string())
}

#[test]
fn parity_vae_from_single_file_checkpoint() {
    let clip = text_encoder_case();
    let unet = unet_cases().remove(0);
    let dir = tempfile::tempdir().unwrap();
    for vae in vae_cases() {
        println!("case {}", vae.dir.display());
        let checkpoint = ldm_checkpoint(&unet, &vae, &clip);
        let single = dir.path().join("single.ckpt");
        write_torch_checkpoint(&single, &checkpoint, true);
        let levels = vae.config.block_out_channels.len();
        let layout = SingleFileLayout {
            vae_levels: levels,
            ..layout_of(&unet, &vae)
        };
        let from_single = SingleFileCheckpoint::open(&single, Some(layout))
            .unwrap()
            .vae;
        // A standalone LDM VAE file (as `vae-ft-mse-840000-ema-pruned.safetensors`).
        let standalone = dir.path().join("vae_ldm.safetensors");
        let ldm_vae: HashMap<String, Tensor> = checkpoint
            .iter()
            .filter_map(|(k, t)| {
                Some((k.strip_prefix("first_stage_model.")?.to_string(), t.clone()))
            })
            .collect();
        save_safetensors(&standalone, &ldm_vae);
        for (what, weights) in [
            ("single-file .ckpt", from_single),
            (
                "standalone LDM VAE",
                open_vae(&standalone, Some(levels)).unwrap(),
            ),
            ("single-file via open_vae", open_vae(&single, None).unwrap()),
        ] {
            let model = build_vae(&weights, &vae.config).unwrap();
            let decoded = model.decode(&vae.io["decode_input"]).unwrap();
            common::assert_close(
                &format!("{what}: decoded"),
                &decoded,
                &vae.io["decoded"],
                1e-4,
            );
            let mean = model.encode(&vae.io["image"]).unwrap().mean;
            common::assert_close(
                &format!("{what}: latent_mean"),
                &mean,
                &vae.io["latent_mean"],
                1e-4,
            );
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Motion modules

/// The config derived from the weights lays out the same modules as the fixture's config.json
/// (the layout resolves uniform and per-block spellings alike); heads keep the default.
fn assert_derived_config(what: &str, loaded: &MotionAdapterWeights, expected: &serde_json::Value) {
    let expected: MotionAdapterConfig = serde_json::from_value(expected.clone()).unwrap();
    let derived = &loaded.config;
    assert_eq!(
        derived.block_out_channels, expected.block_out_channels,
        "{what}"
    );
    assert_eq!(
        derived.use_motion_mid_block, expected.use_motion_mid_block,
        "{what}"
    );
    assert_eq!(
        derived.motion_max_seq_length, expected.motion_max_seq_length,
        "{what}"
    );
    // Heads cannot be read off weights: compare channels and depths.
    let modules = |config: &MotionAdapterConfig| {
        let layout = config.layout().unwrap();
        let blocks = layout
            .down_blocks
            .iter()
            .chain(&layout.mid_block)
            .chain(&layout.up_blocks);
        blocks
            .map(|b| (b.channels, b.depths.clone()))
            .collect::<Vec<_>>()
    };
    assert_eq!(modules(derived), modules(&expected), "{what}: modules");
    assert_eq!(
        derived.motion_num_attention_heads,
        PerBlock::All(DEFAULT_MOTION_HEADS),
        "{what}: default heads"
    );
}

#[test]
fn animatediff_original_motion_module_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    for case in unet_cases() {
        let original = original_motion_module(&case.adapter);
        assert!(original
            .keys()
            .all(|k| k.contains(".temporal_transformer.")));
        let safetensors = dir.path().join("mm_sd_v15.safetensors");
        save_safetensors(&safetensors, &original);
        let ckpt = dir.path().join("mm_sd_v15.ckpt");
        write_torch_checkpoint(&ckpt, &original, false);
        for path in [&safetensors, &ckpt] {
            let what = format!("{} as {}", case.dir.display(), path.display());
            let loaded = MotionAdapterWeights::open(path).unwrap();
            assert_eq!(loaded.format, MotionModuleFormat::AnimateDiff);
            // Two-level tiny modules are not one of the SD 1.x releases.
            assert_eq!(loaded.version, Some(AnimateDiffVersion::Other));
            assert_same_weights(&what, &loaded.weights, &case.adapter);
            assert_derived_config(&what, &loaded, &case.adapter_config);
        }
    }
}

#[test]
fn diffusers_motion_adapter_file_and_folder() {
    let dir = tempfile::tempdir().unwrap();
    for case in unet_cases() {
        let file = case.dir.join("motion_adapter.safetensors");
        let loaded = MotionAdapterWeights::open(&file).unwrap();
        assert_eq!(loaded.format, MotionModuleFormat::Diffusers);
        assert_eq!(loaded.version, None);
        assert_same_weights(&file.display().to_string(), &loaded.weights, &case.adapter);
        assert_derived_config(&file.display().to_string(), &loaded, &case.adapter_config);

        // A MotionAdapter folder saved with the fp16 variant only: config.json wins, and the
        // half-precision weights load as f32.
        let folder = dir.path().join("motion_adapter");
        std::fs::create_dir_all(&folder).unwrap();
        std::fs::write(folder.join("config.json"), case.adapter_config.to_string()).unwrap();
        let half: HashMap<String, Tensor> = case
            .adapter
            .iter()
            .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
            .collect();
        save_safetensors(
            &folder.join("diffusion_pytorch_model.fp16.safetensors"),
            &half,
        );
        let loaded = MotionAdapterWeights::open(&folder).unwrap();
        let expected_config: MotionAdapterConfig =
            serde_json::from_value(case.adapter_config.clone()).unwrap();
        assert_eq!(loaded.config, expected_config);
        assert_same_weights("fp16 motion adapter folder", &loaded.weights, &half);
        let key = "down_blocks.0.motion_modules.0.proj_in.weight";
        let as_f32 = loaded.weights.load(key, DType::F32, &Device::Cpu).unwrap();
        assert_eq!(as_f32.dtype(), DType::F32);
        assert!(bits(&as_f32) == bits(&half[key].to_dtype(DType::F32).unwrap()));

        // A folder holding only the weights: the config is derived from them.
        let bare = dir.path().join("bare_adapter");
        std::fs::create_dir_all(&bare).unwrap();
        std::fs::copy(&file, bare.join("diffusion_pytorch_model.safetensors")).unwrap();
        let loaded = MotionAdapterWeights::open(&bare).unwrap();
        assert_same_weights("folder without config.json", &loaded.weights, &case.adapter);
        assert_derived_config("folder without config.json", &loaded, &case.adapter_config);
    }
}

/// A four-level (SD 1.x) original motion module with only the weights that tell the release
/// apart; `table` is the positional table length, `None` to leave the tables out.
fn synthetic_sd15_module(mid: bool, table: Option<usize>) -> HashMap<String, Tensor> {
    let dev = Device::Cpu;
    let channels = [8, 16, 16, 16];
    let mut out = HashMap::new();
    let mut module = |prefix: String, c: usize| {
        let tt = format!("{prefix}.temporal_transformer");
        out.insert(
            format!("{tt}.norm.weight"),
            Tensor::ones(c, DType::F32, &dev).unwrap(),
        );
        let block = format!("{tt}.transformer_blocks.0");
        out.insert(
            format!("{block}.norms.0.weight"),
            Tensor::ones(c, DType::F32, &dev).unwrap(),
        );
        if let Some(length) = table {
            for a in 0..2 {
                let pe = sinusoidal_positions(length, c, &dev)
                    .unwrap()
                    .unsqueeze(0)
                    .unwrap();
                out.insert(format!("{block}.attention_blocks.{a}.pos_encoder.pe"), pe);
            }
        }
    };
    for (level, &c) in channels.iter().enumerate() {
        for m in 0..2 {
            module(format!("down_blocks.{level}.motion_modules.{m}"), c);
        }
        for m in 0..3 {
            module(
                format!("up_blocks.{level}.motion_modules.{m}"),
                channels[3 - level],
            );
        }
    }
    if mid {
        module("mid_block.motion_modules.0".into(), 16);
    }
    out
}

#[test]
fn animatediff_release_told_apart_from_keys() {
    let dir = tempfile::tempdir().unwrap();
    for (mid, length, version) in [
        (false, 24, AnimateDiffVersion::V1),
        (true, 32, AnimateDiffVersion::V2),
        (false, 32, AnimateDiffVersion::V3),
    ] {
        let path = dir.path().join(format!("mm_{version:?}.safetensors"));
        save_safetensors(&path, &synthetic_sd15_module(mid, Some(length)));
        let loaded = MotionAdapterWeights::open(&path).unwrap();
        assert_eq!(loaded.version, Some(version), "mid {mid}, table {length}");
        assert_eq!(loaded.config.block_out_channels, vec![8, 16, 16, 16]);
        assert_eq!(loaded.config.motion_max_seq_length, length);
        assert_eq!(loaded.config.use_motion_mid_block, mid);
        assert_eq!(loaded.config.motion_layers_per_block, PerBlock::All(2));
    }
}

/// Files without positional tables get diffusers' table.
#[test]
fn missing_positional_tables_are_filled_in() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("mm_pruned.safetensors");
    save_safetensors(&path, &synthetic_sd15_module(false, None));
    let loaded = MotionAdapterWeights::open(&path).unwrap();
    let key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe";
    assert_eq!(loaded.weights.shape(key), Some(&[1, 32, 8][..]));
    let filled = loaded.weights.load(key, DType::F32, &Device::Cpu).unwrap();
    let computed = sinusoidal_positions(32, 8, &Device::Cpu).unwrap();
    assert!(bits(&filled.squeeze(0).unwrap()) == bits(&computed));
}

/// Distance in units in the last place between two finite f32 values.
fn ulps(a: f32, b: f32) -> u32 {
    // Maps the floats onto a line of integers ordered like the values (−0 and +0 adjacent).
    let ordered = |x: f32| {
        let bits = x.to_bits() as i32;
        if bits < 0 {
            i32::MIN - bits
        } else {
            bits
        }
    };
    (ordered(a) as i64 - ordered(b) as i64).unsigned_abs() as u32
}

/// f32 spacing at `x` (the distance to the next float away from zero).
fn ulp_of(x: f32) -> f32 {
    let x = x.abs();
    f32::from_bits(x.to_bits() + 1) - x
}

/// The frame-position table against every `pos_embed.pe` buffer diffusers stored in the
/// fixtures (its `SinusoidalPositionalEmbedding`, computed in f32 by torch).
///
/// Element by element the table is within 1 ulp of diffusers' wherever both round the
/// frequency `ω_i` alike. torch's `exp` does not round as libm's does at near ties (the
/// 64-channel table's `ω_3 = exp(−0.8634694)` is one ulp higher in torch), and a frequency
/// one ulp apart moves the angle at position `p` by `p·ulp(ω_i)`, and the product's rounding
/// then may fall the other way too; so the bound per element is
/// `ulp(value) + ulp(angle) + p·ulp(ω_i)`: the table is diffusers' up to one ulp in each
/// frequency, each angle and each value.
#[test]
fn sinusoidal_positions_match_diffusers_within_one_ulp() {
    let mut tables = 0;
    let (mut beyond_one_ulp, mut elements, mut max_abs) = (0, 0, 0f32);
    for case in unet_cases() {
        for (key, stored) in case
            .adapter
            .iter()
            .filter(|(k, _)| k.ends_with(".pos_embed.pe"))
        {
            let (_, length, channels) = stored.dims3().unwrap();
            let computed = sinusoidal_positions(length, channels, &Device::Cpu)
                .unwrap()
                .to_vec2::<f32>()
                .unwrap();
            let stored = stored.squeeze(0).unwrap().to_vec2::<f32>().unwrap();
            let frequencies = position_frequencies(channels);
            for (p, (row, stored_row)) in computed.iter().zip(&stored).enumerate() {
                for (c, (&value, &expected)) in row.iter().zip(stored_row).enumerate() {
                    let difference = (value - expected).abs();
                    let frequency = frequencies[c / 2];
                    let angle = p as f32 * frequency;
                    let bound = ulp_of(expected) + ulp_of(angle) + p as f32 * ulp_of(frequency);
                    assert!(
                        difference <= bound,
                        "{}: {key}[{p}, {c}] = {value:e}, diffusers {expected:e} ({} ulp)",
                        case.dir.display(),
                        ulps(value, expected)
                    );
                    beyond_one_ulp += usize::from(ulps(value, expected) > 1);
                    elements += 1;
                    max_abs = max_abs.max(difference);
                }
            }
            tables += 1;
        }
    }
    println!(
        "{tables} stored tables: {beyond_one_ulp} of {elements} values more than 1 ulp from \
         diffusers' (all from one frequency), max abs difference {max_abs:.3e}"
    );
    assert!(tables > 0, "the fixtures hold no pos_embed.pe tables");
}

/// Where torch and libm round every frequency alike (the 32-channel tables), the table is
/// within 1 ulp of diffusers' in every value.
#[test]
fn sinusoidal_positions_within_one_ulp_when_frequencies_agree() {
    let case = unet_cases().remove(0);
    let key = "down_blocks.0.motion_modules.0.transformer_blocks.0.pos_embed.pe";
    let stored = &case.adapter[key];
    let (_, length, channels) = stored.dims3().unwrap();
    assert_eq!(
        channels,
        32,
        "{}: {key} is not the 32-channel table",
        case.dir.display()
    );
    let computed = sinusoidal_positions(length, channels, &Device::Cpu).unwrap();
    let computed = computed.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let stored = stored.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    let worst = computed
        .iter()
        .zip(&stored)
        .map(|(&a, &b)| ulps(a, b))
        .max()
        .unwrap();
    let exact = computed
        .iter()
        .zip(&stored)
        .filter(|(a, b)| a.to_bits() == b.to_bits())
        .count();
    println!(
        "32-channel table: {exact} of {} values bit-identical, worst {worst} ulp",
        stored.len()
    );
    assert!(worst <= 1, "{key}: up to {worst} ulp from diffusers'");
}

// ---------------------------------------------------------------------------------------------
// diffusers pipeline folders

fn write_component(
    dir: &Path,
    config: &serde_json::Value,
    file: &str,
    weights: &HashMap<String, Tensor>,
) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join("config.json"), config.to_string()).unwrap();
    save_safetensors(&dir.join(file), weights);
}

#[test]
fn diffusers_pipeline_folder() {
    let case = unet_cases().remove(0);
    let vae = vae_cases().remove(0);
    let clip = text_encoder_case();
    let root = tempfile::tempdir().unwrap();
    let root = root.path();
    let index = serde_json::json!({
        "_class_name": "StableDiffusionPipeline",
        "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"],
        "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"],
        "scheduler": ["diffusers", "DDIMScheduler"],
        "safety_checker": [null, null],
    });
    std::fs::write(root.join("model_index.json"), index.to_string()).unwrap();
    write_component(
        &root.join("unet"),
        &case.unet_config,
        "diffusion_pytorch_model.safetensors",
        &case.unet,
    );
    let vae_config = read_json(&vae.dir.join("vae_config.json"));
    let half: HashMap<String, Tensor> = vae
        .weights
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    write_component(
        &root.join("vae"),
        &vae_config,
        "diffusion_pytorch_model.fp16.safetensors",
        &half,
    );
    write_component(
        &root.join("text_encoder"),
        &clip.config,
        "model.safetensors",
        &clip.weights,
    );
    std::fs::create_dir_all(root.join("tokenizer")).unwrap();
    std::fs::write(root.join("tokenizer/vocab.json"), "{}").unwrap();
    std::fs::write(root.join("tokenizer/merges.txt"), "#version: 0.2\n").unwrap();
    std::fs::create_dir_all(root.join("scheduler")).unwrap();
    std::fs::write(
        root.join("scheduler/scheduler_config.json"),
        r#"{"_class_name": "DDIMScheduler"}"#,
    )
    .unwrap();

    let pipeline = DiffusersPipeline::open(root).unwrap();
    assert_eq!(pipeline.class_name(), Some("StableDiffusionPipeline"));
    assert!(!pipeline.has_component("safety_checker"));
    assert_same_weights(
        "pipeline unet",
        &pipeline.unet().unwrap().weights,
        &case.unet,
    );
    assert_same_weights(
        "pipeline text_encoder",
        &pipeline.text_encoder().unwrap().weights,
        &clip.weights,
    );
    let vae_component = pipeline.vae().unwrap();
    assert_same_weights("pipeline fp16 vae", &vae_component.weights, &half);
    assert_eq!(vae_component.class_name(), Some("AutoencoderKL"));
    let config: AutoencoderKLConfig = vae_component.parse_config().unwrap();
    assert_eq!(config, vae.config);
    // fp16 weights, f32 model: the decode differs from the fixture only by the weight rounding.
    let model = build_vae(&vae_component.weights, &config).unwrap();
    let decoded = model.decode(&vae.io["decode_input"]).unwrap();
    assert_eq!(decoded.dtype(), DType::F32);
    let (rel, _) = common::errors(&decoded, &vae.io["decoded"]);
    println!("fp16-stored VAE decode vs f32 fixture: relative error {rel:.3e}");
    assert!(rel < 1e-2);
    let tokenizer = pipeline.tokenizer().unwrap();
    assert!(tokenizer.vocab.ends_with("vocab.json") && tokenizer.merges.ends_with("merges.txt"));
    assert_eq!(
        pipeline.scheduler_config().unwrap()["_class_name"],
        "DDIMScheduler"
    );
    assert!(matches!(
        pipeline.component("motion_adapter"),
        Err(LoadError::UnrecognisedFormat { .. })
    ));
}

#[test]
fn fp16_file_loads_as_f32() {
    let vae = vae_cases().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("vae.fp16.safetensors");
    let half: HashMap<String, Tensor> = vae
        .weights
        .iter()
        .map(|(k, t)| (k.clone(), t.to_dtype(DType::F16).unwrap()))
        .collect();
    save_safetensors(&path, &half);
    let weights = open_weights(&path).unwrap();
    let vb = weights.var_builder(DType::F32, &Device::Cpu);
    for (key, original) in &vae.weights {
        assert_eq!(weights.dtype(key), Some(DType::F16));
        let loaded = vb.get(original.dims(), key).unwrap();
        assert_eq!(loaded.dtype(), DType::F32);
        let expected = original
            .to_dtype(DType::F16)
            .unwrap()
            .to_dtype(DType::F32)
            .unwrap();
        assert!(bits(&loaded) == bits(&expected), "{key}");
    }
    // And half precision stays half precision when asked for.
    let key = "decoder.conv_in.weight";
    let kept = weights.load(key, DType::F16, &Device::Cpu).unwrap();
    assert_eq!(kept.dtype(), DType::F16);
}

// ---------------------------------------------------------------------------------------------
// Errors

fn expect_err<T>(what: &str, result: Result<T, LoadError>) -> LoadError {
    match result {
        Ok(_) => panic!("{what}: loaded without error"),
        Err(e) => {
            println!("{what}: {e}");
            e
        }
    }
}

#[test]
fn missing_files_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let missing = dir.path().join("nothing_here.safetensors");
    let err = expect_err("open_weights", open_weights(&missing));
    assert!(matches!(&err, LoadError::NotFound { path } if path == &missing));
    assert!(err.to_string().contains("nothing_here.safetensors"));
    let err = expect_err("single file", SingleFileCheckpoint::open(&missing, None));
    assert!(matches!(err, LoadError::NotFound { .. }));
    let err = expect_err(
        "motion module",
        MotionAdapterWeights::open(dir.path().join("mm.ckpt")),
    );
    assert!(matches!(err, LoadError::NotFound { .. }));
    let err = expect_err("pipeline", DiffusersPipeline::open(dir.path().join("sd15")));
    assert!(matches!(err, LoadError::NotFound { .. }));
    let err = expect_err(
        "pipeline without model_index",
        DiffusersPipeline::open(dir.path()),
    );
    assert!(matches!(err, LoadError::UnrecognisedFormat { .. }));
}

#[test]
fn truncated_and_garbage_files_are_reported() {
    let vae = vae_cases().remove(0);
    let dir = tempfile::tempdir().unwrap();
    let bytes = std::fs::read(vae.dir.join("vae.safetensors")).unwrap();

    let cut = dir.path().join("cut.safetensors");
    std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
    let err = expect_err("truncated", open_weights(&cut));
    assert!(
        matches!(err, LoadError::Truncated { ref path, expected_len, found_len }
            if path == &cut && expected_len == bytes.len() as u64 && found_len == bytes.len() as u64 / 2),
        "{err:?}"
    );
    let header_cut = dir.path().join("header_cut.safetensors");
    std::fs::write(&header_cut, &bytes[..100]).unwrap();
    let err = expect_err("truncated header", open_weights(&header_cut));
    assert!(matches!(err, LoadError::Truncated { .. }), "{err:?}");

    let garbage: Vec<u8> = (0..4096u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let garbage_st = dir.path().join("garbage.safetensors");
    std::fs::write(&garbage_st, &garbage).unwrap();
    let err = expect_err("garbage safetensors", open_weights(&garbage_st));
    assert!(
        matches!(err, LoadError::CorruptSafetensors { ref path, .. } if path == &garbage_st),
        "{err:?}"
    );
    // A well-formed length followed by a header that is not JSON.
    let mut bad_header = 16u64.to_le_bytes().to_vec();
    bad_header.extend(b"{not json at all");
    let bad_header_path = dir.path().join("bad_header.safetensors");
    std::fs::write(&bad_header_path, &bad_header).unwrap();
    let err = expect_err("non-JSON header", open_weights(&bad_header_path));
    assert!(
        matches!(err, LoadError::CorruptSafetensors { .. }),
        "{err:?}"
    );

    let garbage_ckpt = dir.path().join("garbage.ckpt");
    std::fs::write(&garbage_ckpt, &garbage).unwrap();
    let err = expect_err("garbage ckpt", open_weights(&garbage_ckpt));
    assert!(
        matches!(err, LoadError::UnrecognisedFormat { .. }),
        "{err:?}"
    );
    let mut fake_zip = b"PK\x03\x04".to_vec();
    fake_zip.extend(&garbage);
    let fake_zip_path = dir.path().join("broken.ckpt");
    std::fs::write(&fake_zip_path, &fake_zip).unwrap();
    let err = expect_err("broken zip", open_weights(&fake_zip_path));
    assert!(
        matches!(err, LoadError::CorruptCheckpoint { .. }),
        "{err:?}"
    );
    // A zip checkpoint cut short.
    let mut small = HashMap::new();
    small.insert(
        "w".to_string(),
        Tensor::ones((4, 4), DType::F32, &Device::Cpu).unwrap(),
    );
    let whole = dir.path().join("whole.ckpt");
    write_torch_checkpoint(&whole, &small, false);
    let zip_bytes = std::fs::read(&whole).unwrap();
    let cut_zip = dir.path().join("cut.ckpt");
    std::fs::write(&cut_zip, &zip_bytes[..zip_bytes.len() - 30]).unwrap();
    let err = expect_err("cut zip", open_weights(&cut_zip));
    assert!(
        matches!(err, LoadError::CorruptCheckpoint { .. }),
        "{err:?}"
    );
}

#[test]
fn missing_keys_and_wrong_shapes_are_reported() {
    let vae = vae_cases().remove(0);
    let weights = open_weights(vae.dir.join("vae.safetensors")).unwrap();
    let mut expected: Vec<(String, Vec<usize>)> = vae
        .weights
        .iter()
        .map(|(k, t)| (k.clone(), t.dims().to_vec()))
        .collect();
    expected.sort();
    weights.check(&expected).unwrap();

    let mut with_missing = expected.clone();
    with_missing.push(("decoder.extra_block.weight".into(), vec![3]));
    let err = expect_err("missing key", weights.check(&with_missing));
    assert!(
        matches!(&err, LoadError::MissingKeys { count: 1, first, .. } if first == &["decoder.extra_block.weight"])
    );
    assert!(err.to_string().contains("vae.safetensors"));

    let mut wrong_shape = expected.clone();
    let key = "decoder.conv_in.weight";
    let slot = wrong_shape.iter_mut().find(|(k, _)| k == key).unwrap();
    slot.1 = vec![32, 8, 3, 3];
    let err = expect_err("wrong shape", weights.check(&wrong_shape));
    assert!(
        matches!(&err, LoadError::ShapeMismatch { key: k, expected, found, .. }
        if k == key && expected == &[32, 8, 3, 3] && found == &[32, 4, 3, 3])
    );

    // Building a model reports the same problems, naming the weight.
    let mut missing_map = weights.clone();
    missing_map.remove("decoder.mid_block.attentions.0.to_k.weight");
    let message = build_vae(&missing_map, &vae.config).unwrap_err();
    println!("building from incomplete weights: {message}");
    assert!(
        message.contains("decoder.mid_block.attentions.0.to_k.weight"),
        "{message}"
    );
    let wrong_config = AutoencoderKLConfig {
        latent_channels: 8,
        ..vae.config.clone()
    };
    let message = build_vae(&weights, &wrong_config).unwrap_err();
    println!("building with a mismatched config: {message}");
    assert!(
        message.contains("expected") && message.contains("shape"),
        "{message}"
    );
}

#[test]
fn unknown_layouts_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("lora.safetensors");
    let mut tensors = HashMap::new();
    tensors.insert(
        "lora_unet_down_blocks_0_attentions_0_proj_in.lora_down.weight".to_string(),
        Tensor::zeros((4, 32), DType::F32, &Device::Cpu).unwrap(),
    );
    save_safetensors(&path, &tensors);
    let err = expect_err("single file", SingleFileCheckpoint::open(&path, None));
    assert!(
        matches!(&err, LoadError::UnrecognisedFormat { expected, .. } if expected.contains("model.diffusion_model"))
    );
    let err = expect_err("motion module", MotionAdapterWeights::open(&path));
    assert!(
        matches!(&err, LoadError::UnrecognisedFormat { expected, .. } if expected.contains("motion_modules"))
    );
    let err = expect_err("vae", open_vae(&path, None));
    assert!(matches!(err, LoadError::UnrecognisedFormat { .. }));
    // A folder that is no diffusers component.
    let empty = dir.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let err = expect_err("empty folder", MotionAdapterWeights::open(&empty));
    assert!(matches!(err, LoadError::UnrecognisedFormat { .. }));
}
