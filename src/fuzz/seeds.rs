//! Each format's small valid seed inputs and its structure-aware edits: bank headers with the
//! checksum recomputed, safetensors and npy headers rebuilt with consistent lengths, GGUF counts,
//! lengths and type codes.

use super::mutate::{interesting, mutate_json, put_int, Rng};
use crate::method::heads::{encode_safetensors, random_tensors, HeadsConfig, WeightDtype};
use crate::store::bank::{encode_bank, BankRows, Modality};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};

/// A small valid heads config (image prompt, img + text heads).
pub fn small_config() -> Value {
    json!({"format": "illmrec-heads", "version": 1, "llm_dim": 8, "proj_dim": 4, "hidden_dim": 6,
           "prompt": "image", "image_dim": 5, "adaptor_dim": 4, "item_dims": {"img": 5, "text": 3},
           "adaptor_ln_eps": 1e-8, "head_ln_eps": 1e-5, "trained": false, "provenance": "fuzz"})
}

pub(super) fn safetensors_seeds() -> Vec<Vec<u8>> {
    let cfg: HeadsConfig = serde_json::from_value(small_config()).unwrap();
    let tensors = random_tensors(&cfg, 3).unwrap();
    [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16]
        .into_iter()
        .map(|d| encode_safetensors(&tensors, d).unwrap())
        .collect()
}

pub(super) fn mutate_safetensors(rng: &mut Rng, data: &mut Vec<u8>) {
    if data.len() < 8 {
        return;
    }
    let n = u64::from_le_bytes(data[..8].try_into().unwrap()) as usize;
    let Some(header) = data.get(8..8 + n.min(data.len())) else {
        return;
    };
    let Ok(mut v) = serde_json::from_slice::<Value>(header) else {
        return;
    };
    let body = data[8 + n..].to_vec();
    match rng.below(3) {
        0 => mutate_json(rng, &mut v),
        _ => {
            // Shapes, offsets and dtypes of one tensor.
            if let Some(map) = v.as_object_mut() {
                let keys: Vec<String> = map.keys().cloned().collect();
                let key = &keys[rng.below(keys.len())];
                if let Some(t) = map.get_mut(key).and_then(|t| t.as_object_mut()) {
                    match rng.below(3) {
                        0 => {
                            t.insert(
                                "dtype".into(),
                                json!(
                                    ["F32", "F16", "BF16", "F64", "I64", "U8", "BOOL", "F8_E4M3"]
                                        [rng.below(8)]
                                ),
                            );
                        }
                        1 => {
                            t.insert(
                                "shape".into(),
                                json!([interesting(rng) % 70_000, rng.below(9)]),
                            );
                        }
                        _ => {
                            t.insert(
                                "data_offsets".into(),
                                json!([interesting(rng), interesting(rng)]),
                            );
                        }
                    }
                }
            }
        }
    }
    let header = serde_json::to_vec(&v).unwrap();
    let mut out = (header.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&header);
    out.extend_from_slice(&body);
    *data = out;
}

pub(super) fn bank_seeds() -> Vec<Vec<u8>> {
    let ids = [3u64, 9, 10, 400, 1 << 40];
    let f32s: Vec<f32> = (0..ids.len() * 3).map(|i| i as f32 * 0.25 - 1.0).collect();
    let f16s: Vec<half::f16> = f32s.iter().map(|&v| half::f16::from_f32(v)).collect();
    vec![
        encode_bank(Modality::Img, 3, &ids, BankRows::F32(&f32s))
            .unwrap()
            .1,
        encode_bank(Modality::Text, 3, &ids, BankRows::F16(&f16s))
            .unwrap()
            .1,
        encode_bank(Modality::Cf, 1, &[7], BankRows::F32(&[0.5]))
            .unwrap()
            .1,
    ]
}

pub(super) fn mutate_bank(rng: &mut Rng, data: &mut Vec<u8>) {
    // Header fields: (offset, width).
    const FIELDS: [(usize, usize); 11] = [
        (8, 4),
        (12, 1),
        (13, 1),
        (14, 2),
        (16, 4),
        (20, 4),
        (24, 8),
        (32, 8),
        (40, 8),
        (48, 8),
        (56, 32),
    ];
    match rng.below(3) {
        0 => {
            let (at, width) = FIELDS[rng.below(FIELDS.len())];
            let value = interesting(rng);
            put_int(data, at, width.min(8), value);
        }
        1 if data.len() > 128 => {
            // Payload edits (ids out of order, NaN rows) behind a valid checksum.
            let at = 128 + rng.below(data.len() - 128);
            let value = [0x7fc0_0000u64, 0x7f80_0000, 0x7e00, u64::MAX, 0][rng.below(5)];
            put_int(data, at, [2, 4, 8][rng.below(3)], value);
        }
        _ => {
            // Count or dim changed with the file resized to match.
            let count = (rng.below(6)) as u64;
            put_int(data, 24, 8, count);
            let dim = u32::from_le_bytes(data[16..20].try_into().unwrap_or([1, 0, 0, 0])) as u64;
            let width = if data.get(13) == Some(&1) { 2 } else { 4 };
            let rows_at = (128 + 8 * count).div_ceil(64) * 64;
            let len = rows_at + count * dim.min(64) * width;
            put_int(data, 40, 8, rows_at);
            put_int(data, 48, 8, len);
            data.resize(len as usize, 0);
        }
    }
    if data.len() >= 128 && rng.below(2) == 0 {
        let digest: [u8; 32] = Sha256::digest(&data[128..]).into();
        data[56..88].copy_from_slice(&digest);
    }
}

pub(super) fn manifest_seed() -> Vec<u8> {
    let file = |p: &str, size: u64| json!({"path": p, "size": size, "sha256": "ab".repeat(32)});
    serde_json::to_vec_pretty(&json!({
        "format": "illmrec-bundle", "version": 1,
        "model": {"size": 253113024u64, "sha256": "cd".repeat(32), "n_embd": 640, "architecture": "gemma3"},
        "heads": "heads.safetensors", "heads_config": "heads.json", "items": "items.jsonl",
        "banks": {"img": "img.bank", "text": "text.bank"},
        "files": [file("heads.safetensors", 100), file("heads.json", 10), file("items.jsonl", 5),
                  file("img.bank", 300), file("text.bank", 200)]
    }))
    .unwrap()
}

pub(super) fn items_seed() -> Vec<u8> {
    [
        json!({"id": 1, "title": "Toy Story (1995)", "genres": ["Animation", "Comedy"]}),
        json!({"id": 2, "title": "Jumanji (1995)", "description": "A board game."}),
        json!({"id": 5, "title": null}),
        json!({"id": 18446744073709551615u64, "title": "Last"}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect::<Vec<_>>()
    .join("\n")
    .into_bytes()
}

pub(super) fn lines_seed() -> Vec<u8> {
    [
        json!({"user": "u1", "history": [1, 2, 3]}),
        json!({"user": 2, "history": [5], "candidates": [1, 2], "top_k": 3}),
        json!({"history": [7, 8], "target": 9}),
    ]
    .iter()
    .map(|v| v.to_string())
    .collect::<Vec<_>>()
    .join("\n")
    .into_bytes()
}

pub(super) fn npy_seeds() -> Vec<Vec<u8>> {
    vec![
        crate::store::npy::encode_f32(2, 3, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        crate::store::npy::encode_i64(&[4, 5, 6]),
    ]
}

pub(super) fn mutate_npy(rng: &mut Rng, data: &mut Vec<u8>) {
    let descr = [
        "<f4", "<f2", "<i8", "<u8", "<i4", ">f4", "|b1", "<f8", "O", "",
    ][rng.below(10)];
    let dims = |rng: &mut Rng| match rng.below(3) {
        0 => interesting(rng).to_string(),
        _ => rng.below(5).to_string(),
    };
    let shape = match rng.below(5) {
        0 => "()".to_string(),
        1 => format!("({},)", dims(rng)),
        2 => format!("({}, {}, {})", dims(rng), dims(rng), dims(rng)),
        3 => format!("({}, -{})", dims(rng), dims(rng)),
        _ => format!("({}, {})", dims(rng), dims(rng)),
    };
    let fortran = ["False", "True", "0"][rng.below(3)];
    let header =
        format!("{{'descr': '{descr}', 'fortran_order': {fortran}, 'shape': {shape}, }}\n");
    let mut out = b"\x93NUMPY".to_vec();
    match rng.below(3) {
        0 => {
            out.extend_from_slice(&[2, 0]);
            out.extend_from_slice(&(header.len() as u32).to_le_bytes());
        }
        _ => {
            out.extend_from_slice(&[1, 0]);
            out.extend_from_slice(&(header.len() as u16).to_le_bytes());
        }
    }
    out.extend_from_slice(header.as_bytes());
    let payload = 8 * rng.below(12) + rng.below(3);
    out.extend((0..payload).map(|_| rng.next_u64() as u8));
    *data = out;
}

/// A small GGUF (v3: the keys `GgufInfo` reads, a string array, two tensor infos and their data)
/// and the (offset, width) of every count, length and type code in it.
pub fn gguf_seed() -> (Vec<u8>, Vec<(usize, usize)>) {
    let mut out = Vec::new();
    let mut fields = Vec::new();
    let mut field = |out: &mut Vec<u8>, bytes: &[u8]| {
        fields.push((out.len(), bytes.len()));
        out.extend_from_slice(bytes);
    };
    fn string(out: &mut Vec<u8>, s: &str, field: &mut dyn FnMut(&mut Vec<u8>, &[u8])) {
        field(out, &(s.len() as u64).to_le_bytes());
        out.extend_from_slice(s.as_bytes());
    }
    out.extend_from_slice(b"GGUF");
    field(&mut out, &3u32.to_le_bytes());
    field(&mut out, &2u64.to_le_bytes()); // tensors
    field(&mut out, &6u64.to_le_bytes()); // key-value pairs
    let kv_str = |out: &mut Vec<u8>, k: &str, v: &str, f: &mut dyn FnMut(&mut Vec<u8>, &[u8])| {
        string(out, k, f);
        f(out, &8u32.to_le_bytes());
        string(out, v, f);
    };
    let kv_u32 = |out: &mut Vec<u8>, k: &str, v: u32, f: &mut dyn FnMut(&mut Vec<u8>, &[u8])| {
        string(out, k, f);
        f(out, &4u32.to_le_bytes());
        f(out, &v.to_le_bytes());
    };
    kv_str(&mut out, "general.architecture", "gemma3", &mut field);
    kv_str(&mut out, "general.name", "fuzz", &mut field);
    kv_u32(&mut out, "gemma3.embedding_length", 8, &mut field);
    kv_u32(&mut out, "gemma3.context_length", 32768, &mut field);
    kv_u32(&mut out, "general.alignment", 32, &mut field);
    string(&mut out, "tokenizer.ggml.tokens", &mut field);
    field(&mut out, &9u32.to_le_bytes()); // array
    field(&mut out, &8u32.to_le_bytes()); // of strings
    field(&mut out, &3u64.to_le_bytes());
    for t in ["<pad>", "a", "bc"] {
        string(&mut out, t, &mut field);
    }
    // Tensor infos: token_embd.weight [8, 3] f32 at 0; output_norm.weight [8] f32 at 96.
    for (name, dims, offset) in [
        ("token_embd.weight", &[8u64, 3][..], 0u64),
        ("output_norm.weight", &[8u64][..], 96),
    ] {
        string(&mut out, name, &mut field);
        field(&mut out, &(dims.len() as u32).to_le_bytes());
        for d in dims {
            field(&mut out, &d.to_le_bytes());
        }
        field(&mut out, &0u32.to_le_bytes()); // GGML_TYPE_F32
        field(&mut out, &offset.to_le_bytes());
    }
    out.resize(out.len().div_ceil(32) * 32, 0);
    out.extend((0..32u32).flat_map(|i| (i as f32 / 8.0).to_le_bytes()));
    (out, fields)
}

pub(super) fn mutate_gguf(rng: &mut Rng, data: &mut [u8]) {
    let (seed, fields) = gguf_seed();
    if data.len() != seed.len() {
        return;
    }
    for _ in 0..1 + rng.below(2) {
        let (at, width) = fields[rng.below(fields.len())];
        let value = match rng.below(3) {
            0 => interesting(rng),
            1 => rng.below(14) as u64, // a type code
            _ => {
                let mut old = [0u8; 8];
                old[..width].copy_from_slice(&data[at..at + width]);
                u64::from_le_bytes(old).wrapping_add([1, u64::MAX, 2][rng.below(3)])
            }
        };
        put_int(data, at, width, value);
    }
}
