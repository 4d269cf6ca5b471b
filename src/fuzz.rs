//! Seeded mutation fuzzing of every parser of outside bytes, on stable Rust: feature banks
//! (header and rows), `heads.json`, heads safetensors (through the `safetensors` crate and the
//! heads loader), bundle manifests, `items.jsonl`, `score`/`embed` lines (the JSON-lines reader
//! and serde), `.npy` files and GGUF headers (llama.cpp's gguf reader).
//!
//! Input `i` of a run is a pure function of (target, seed, i): a small valid seed input of the
//! format is mutated by 1–4 byte-level edits (bit flips, interesting integers, insertions,
//! deletions, duplications, truncation, splicing) or, where the format has structure, by
//! structure-aware edits (JSON trees, bank header fields with the checksum recomputed so the
//! checks behind it run, safetensors and npy headers rebuilt with consistent lengths, GGUF
//! counts, lengths and type codes). So any finding can be replayed from its index alone.
//!
//! [`run`] catches panics and flags slow inputs; `examples/fuzz.rs` runs the long campaigns in
//! child processes, so that an abort inside llama.cpp or a hang is caught too. The test suite
//! runs a short seeded slice of every target.

use crate::bank::{encode_bank, BankRows, Modality};
use crate::heads::{encode_safetensors, random_tensors, Heads, HeadsConfig, WeightDtype};
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::time::{Duration, Instant};

/// One parser under test.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Target {
    Bank,
    HeadsJson,
    Safetensors,
    Manifest,
    Items,
    Lines,
    Npy,
    Gguf,
}

impl Target {
    pub const ALL: [Target; 8] = [
        Target::Bank,
        Target::HeadsJson,
        Target::Safetensors,
        Target::Manifest,
        Target::Items,
        Target::Lines,
        Target::Npy,
        Target::Gguf,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Target::Bank => "bank",
            Target::HeadsJson => "heads-json",
            Target::Safetensors => "safetensors",
            Target::Manifest => "manifest",
            Target::Items => "items",
            Target::Lines => "lines",
            Target::Npy => "npy",
            Target::Gguf => "gguf",
        }
    }

    pub fn parse(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|t| t.name() == name)
    }

    /// Valid inputs the mutations start from.
    pub fn seeds(self) -> Vec<Vec<u8>> {
        match self {
            Target::Bank => bank_seeds(),
            Target::HeadsJson => vec![serde_json::to_vec(&small_config()).unwrap()],
            Target::Safetensors => safetensors_seeds(),
            Target::Manifest => vec![manifest_seed()],
            Target::Items => vec![items_seed()],
            Target::Lines => vec![lines_seed()],
            Target::Npy => npy_seeds(),
            Target::Gguf => vec![gguf_seed().0],
        }
    }

    /// Input `index` of the run seeded with `seed`.
    pub fn input(self, seeds: &[Vec<u8>], seed: u64, index: u64) -> Vec<u8> {
        let mut rng = Rng::new(seed ^ (self as u64) << 56, index);
        let mut data = seeds[rng.below(seeds.len())].clone();
        match rng.below(4) {
            0 => mutate_bytes(&mut rng, &mut data, seeds),
            _ => {
                self.mutate_structure(&mut rng, &mut data);
                if rng.below(3) == 0 {
                    mutate_bytes(&mut rng, &mut data, seeds);
                }
            }
        }
        data
    }

    fn mutate_structure(self, rng: &mut Rng, data: &mut Vec<u8>) {
        match self {
            Target::Bank => mutate_bank(rng, data),
            Target::HeadsJson | Target::Manifest => mutate_json_bytes(rng, data),
            Target::Items | Target::Lines => mutate_json_lines(rng, data),
            Target::Safetensors => mutate_safetensors(rng, data),
            Target::Npy => mutate_npy(rng, data),
            Target::Gguf => mutate_gguf(rng, data),
        }
    }

    /// Runs the parser on `data` and uses what it returns; true when it accepted the input.
    /// Errors are the expected outcome of most inputs; only a panic, an abort or a hang is a
    /// finding.
    pub fn exercise(self, data: &[u8]) -> bool {
        let name = Path::new("fuzz-input");
        let mut accepted = false;
        match self {
            Target::Bank => {
                if let Ok(bank) = crate::bank::Bank::from_bytes(name, data) {
                    let verified = bank.verify().is_ok();
                    accepted = verified;
                    let _ = bank.check_contents();
                    let ids = bank.ids().to_vec();
                    for &id in ids.iter().take(64) {
                        if let Some(row) = bank.get(id) {
                            let v = row.to_f32();
                            assert_eq!(v.len(), bank.dim());
                            assert!(!verified || v.iter().all(|x| x.is_finite()));
                        }
                    }
                    let _ = bank.get(u64::MAX);
                    let _ = bank.file_sha256();
                }
            }
            Target::HeadsJson => {
                if let Ok(cfg) = HeadsConfig::parse(data) {
                    accepted = true;
                    assert!(cfg.head_ln_eps > 0.0 && cfg.adaptor_ln_eps > 0.0);
                    if cfg.parameter_count() <= 20_000 {
                        let tensors = random_tensors(&cfg, 1).expect("a valid config makes heads");
                        let bytes = encode_safetensors(&tensors, WeightDtype::F16).unwrap();
                        Heads::from_bytes(&bytes, name, data, name)
                            .expect("heads made for a config load with it");
                    }
                }
            }
            Target::Safetensors => {
                let config = serde_json::to_vec(&small_config()).unwrap();
                if let Ok(heads) = Heads::from_bytes(data, name, &config, name) {
                    accepted = true;
                    let h = vec![0.5f32; heads.config.llm_dim];
                    for head in heads.user.values() {
                        assert!(head.forward(&h).iter().all(|v| v.is_finite()));
                    }
                    if let Some(a) = &heads.adaptor {
                        a.forward(&vec![0.25; a.proj.n_in]);
                    }
                }
            }
            Target::Manifest => {
                if let Ok(m) = crate::bundle::Manifest::parse(data) {
                    accepted = true;
                    for f in &m.files {
                        assert!(Path::new(&f.path)
                            .components()
                            .all(|c| matches!(c, std::path::Component::Normal(_))));
                        assert_eq!(m.files.iter().filter(|g| g.path == f.path).count(), 1);
                    }
                    let _ = m
                        .entry(&m.heads)
                        .expect("parse checks the heads are listed");
                }
            }
            Target::Items => {
                if let Ok(c) = crate::catalog::Catalog::parse(data, name) {
                    accepted = true;
                    for item in c.items() {
                        assert_eq!(c.get(item.id).map(|i| i.id), Some(item.id));
                        let _ = item.title();
                    }
                }
            }
            Target::Lines => {
                for line in crate::jsonl::Lines::new(std::io::Cursor::new(data)) {
                    let line = line.expect("reading memory cannot fail");
                    accepted |= line.parse::<crate::jsonl::ScoreLine>().is_ok();
                    let _ = line.parse::<crate::jsonl::HistoryLine>();
                }
            }
            Target::Npy => {
                if let Ok(a) = crate::npy::NpyArray::parse(data) {
                    accepted = true;
                    let n = match &a.data {
                        crate::npy::NpyData::F32(v) => v.len(),
                        crate::npy::NpyData::F16(v) => v.len(),
                        crate::npy::NpyData::I64(v) => v.len(),
                    };
                    assert_eq!(n, a.shape.iter().product::<usize>());
                }
            }
            Target::Gguf => {
                if let Ok(info) = crate::llm::GgufInfo::parse(data, name) {
                    accepted = true;
                    let _ = info.input_scale();
                }
            }
        }
        accepted
    }
}

/// What a run found.
#[derive(Debug, Default)]
pub struct Report {
    pub inputs: u64,
    /// Inputs the parser accepted (the rest were refused with an error, as they should be).
    pub accepted: u64,
    /// (input index, panic message)
    pub panics: Vec<(u64, String)>,
    /// (input index, time) for inputs slower than the limit given to [`run`].
    pub slow: Vec<(u64, Duration)>,
    pub slowest: Duration,
    pub elapsed: Duration,
}

/// Runs inputs `from..to` of `target` with `seed`, catching panics (the panic message is not
/// printed) and noting inputs slower than `slow`.
pub fn run(target: Target, seed: u64, from: u64, to: u64, slow: Duration) -> Report {
    let seeds = target.seeds();
    let mut report = Report::default();
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let started = Instant::now();
    for i in from..to {
        let data = target.input(&seeds, seed, i);
        let t = Instant::now();
        let result = std::panic::catch_unwind(AssertUnwindSafe(|| target.exercise(&data)));
        let took = t.elapsed();
        report.accepted += matches!(result, Ok(true)) as u64;
        report.slowest = report.slowest.max(took);
        if took > slow {
            report.slow.push((i, took));
        }
        if let Err(e) = result {
            let msg = e
                .downcast_ref::<String>()
                .cloned()
                .or_else(|| e.downcast_ref::<&str>().map(|s| s.to_string()))
                .unwrap_or_default();
            report.panics.push((i, msg));
        }
        report.inputs += 1;
    }
    report.elapsed = started.elapsed();
    std::panic::set_hook(hook);
    report
}

/// SplitMix64, seeded per input.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64, index: u64) -> Self {
        let mut r = Rng(seed ^ index.wrapping_mul(0x9E37_79B9_7F4A_7C15));
        r.next_u64();
        r
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in 0..n (0 when n is 0).
    pub fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next_u64() % n as u64) as usize
        }
    }
}

const INTERESTING: [u64; 26] = [
    0,
    1,
    2,
    3,
    7,
    8,
    16,
    31,
    32,
    63,
    64,
    127,
    128,
    255,
    256,
    0x7fff,
    0xffff,
    0x7fff_ffff,
    0x8000_0000,
    0xffff_ffff,
    1 << 32,
    1 << 40,
    i64::MAX as u64,
    1 << 63,
    u64::MAX - 1,
    u64::MAX,
];

fn interesting(rng: &mut Rng) -> u64 {
    match rng.below(4) {
        0 => rng.next_u64(),
        _ => INTERESTING[rng.below(INTERESTING.len())],
    }
}

/// Overwrites `width` bytes at `at` (little-endian), clipped to the data.
fn put_int(data: &mut [u8], at: usize, width: usize, value: u64) {
    for (k, b) in value.to_le_bytes()[..width].iter().enumerate() {
        if let Some(d) = data.get_mut(at + k) {
            *d = *b;
        }
    }
}

/// 1–4 byte-level edits.
pub fn mutate_bytes(rng: &mut Rng, data: &mut Vec<u8>, pool: &[Vec<u8>]) {
    const TOKENS: [&[u8]; 14] = [
        b"\"", b"\\", b"{", b"}", b"[", b"]", b"\n", b"\xff", b"-", b"1e999", b"NaN", b",", b":",
        b"\\u0000",
    ];
    for _ in 0..1 + rng.below(4) {
        let len = data.len();
        match rng.below(10) {
            0 if len > 0 => {
                let i = rng.below(len);
                data[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                data[i] = [0u8, 1, 0x7f, 0x80, 0xff, rng.next_u64() as u8][rng.below(6)];
            }
            2 if len > 0 => {
                let width = [1, 2, 4, 8][rng.below(4)];
                let at = rng.below(len);
                let value = interesting(rng);
                put_int(data, at, width, value);
            }
            3 => {
                let at = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next_u64() as u8).collect();
                data.splice(at..at, bytes);
            }
            4 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                data.drain(at..at + n);
            }
            5 if len > 0 => {
                let at = rng.below(len);
                let n = 1 + rng.below((len - at).min(64));
                let chunk = data[at..at + n].to_vec();
                let to = rng.below(len + 1);
                data.splice(to..to, chunk);
            }
            6 if len > 0 => data.truncate(rng.below(len)),
            7 if !pool.is_empty() => {
                let other = &pool[rng.below(pool.len())];
                let cut = rng.below(len + 1);
                let from = rng.below(other.len() + 1);
                data.truncate(cut);
                data.extend_from_slice(&other[from..]);
            }
            8 => {
                let at = rng.below(len + 1);
                data.splice(at..at, TOKENS[rng.below(TOKENS.len())].iter().copied());
            }
            _ if len > 0 => {
                // A run of one byte (long lengths, deep nesting).
                let at = rng.below(len + 1);
                let b = data.get(rng.below(len)).copied().unwrap_or(b'[');
                let n = [16, 200, 5000][rng.below(3)];
                data.splice(at..at, std::iter::repeat_n(b, n));
            }
            _ => data.push(rng.next_u64() as u8),
        }
    }
}

fn interesting_json(rng: &mut Rng) -> Value {
    match rng.below(22) {
        0 => Value::Null,
        1 => json!(true),
        2 => json!(-1),
        3 => json!(0),
        4 => json!(1),
        5 => json!(u64::MAX),
        6 => json!(i64::MIN),
        7 => json!(1e300),
        8 => json!(-1e300),
        9 => json!(1e-300),
        10 => json!(0.5),
        11 => json!(""),
        12 => json!("x".repeat(1 << rng.below(14))),
        13 => json!("../../etc/passwd"),
        14 => json!("/dev/zero"),
        15 => json!([]),
        16 => json!({}),
        17 => json!("\u{0}\u{ffff}é"),
        18 => json!(65537),
        19 => json!(rng.next_u64()),
        20 => json!([1, 2, 3]),
        _ => json!((rng.next_u64() % 100_000) as f64 / 7.0),
    }
}

/// Edits one random node of a JSON tree.
pub fn mutate_json(rng: &mut Rng, v: &mut Value) {
    let descend = rng.below(3) != 0;
    match v {
        Value::Object(map) if descend && !map.is_empty() => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            mutate_json(rng, map.get_mut(&key).unwrap());
        }
        Value::Array(a) if descend && !a.is_empty() => {
            let i = rng.below(a.len());
            mutate_json(rng, &mut a[i]);
        }
        Value::Object(map) if !map.is_empty() && rng.below(2) == 0 => {
            let key = map.keys().nth(rng.below(map.len())).unwrap().clone();
            match rng.below(3) {
                0 => {
                    map.remove(&key);
                }
                1 => {
                    map.insert(format!("unknown{}", rng.below(3)), interesting_json(rng));
                }
                _ => {
                    map.insert(key, interesting_json(rng));
                }
            }
        }
        Value::Array(a) if !a.is_empty() && rng.below(2) == 0 => match rng.below(3) {
            0 => {
                a.remove(rng.below(a.len()));
            }
            1 => {
                let x = a[rng.below(a.len())].clone();
                a.push(x);
            }
            _ => a.push(interesting_json(rng)),
        },
        Value::Number(n) if rng.below(2) == 0 => {
            let x = n.as_f64().unwrap_or(0.0);
            *v = match rng.below(4) {
                0 => json!(x + 1.0),
                1 => json!(-x),
                2 => json!((x as i64).wrapping_mul(1 << 20)),
                _ => json!(x * 1e10),
            };
        }
        _ => *v = interesting_json(rng),
    }
}

fn mutate_json_bytes(rng: &mut Rng, data: &mut Vec<u8>) {
    if let Ok(mut v) = serde_json::from_slice::<Value>(data) {
        for _ in 0..1 + rng.below(3) {
            mutate_json(rng, &mut v);
        }
        *data = serde_json::to_vec(&v).unwrap();
    }
}

fn mutate_json_lines(rng: &mut Rng, data: &mut Vec<u8>) {
    let mut lines: Vec<Vec<u8>> = data.split(|&b| b == b'\n').map(|l| l.to_vec()).collect();
    let i = rng.below(lines.len());
    match rng.below(4) {
        0 => {
            let x = lines[rng.below(lines.len())].clone();
            lines.insert(i, x);
        }
        1 if lines.len() > 1 => {
            lines.remove(i);
        }
        _ => mutate_json_bytes(rng, &mut lines[i]),
    }
    *data = lines.join(&b'\n');
}

// ---------------------------------------------------------------- seeds and format mutators

/// A small valid heads config (image prompt, img + text heads).
pub fn small_config() -> Value {
    json!({"format": "illmrec-heads", "version": 1, "llm_dim": 8, "proj_dim": 4, "hidden_dim": 6,
           "prompt": "image", "image_dim": 5, "adaptor_dim": 4, "item_dims": {"img": 5, "text": 3},
           "adaptor_ln_eps": 1e-8, "head_ln_eps": 1e-5, "trained": false, "provenance": "fuzz"})
}

fn safetensors_seeds() -> Vec<Vec<u8>> {
    let cfg: HeadsConfig = serde_json::from_value(small_config()).unwrap();
    let tensors = random_tensors(&cfg, 3).unwrap();
    [WeightDtype::F32, WeightDtype::F16, WeightDtype::Bf16]
        .into_iter()
        .map(|d| encode_safetensors(&tensors, d).unwrap())
        .collect()
}

fn mutate_safetensors(rng: &mut Rng, data: &mut Vec<u8>) {
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

fn bank_seeds() -> Vec<Vec<u8>> {
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

fn mutate_bank(rng: &mut Rng, data: &mut Vec<u8>) {
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

fn manifest_seed() -> Vec<u8> {
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

fn items_seed() -> Vec<u8> {
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

fn lines_seed() -> Vec<u8> {
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

fn npy_seeds() -> Vec<Vec<u8>> {
    vec![
        crate::npy::encode_f32(2, 3, &[0.0, 1.0, 2.0, 3.0, 4.0, 5.0]),
        crate::npy::encode_i64(&[4, 5, 6]),
    ]
}

fn mutate_npy(rng: &mut Rng, data: &mut Vec<u8>) {
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

fn mutate_gguf(rng: &mut Rng, data: &mut [u8]) {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn seeds_are_valid_and_inputs_replay() {
        for t in Target::ALL {
            let seeds = t.seeds();
            assert!(!seeds.is_empty());
            assert_eq!(t.input(&seeds, 5, 77), t.input(&seeds, 5, 77), "{t:?}");
            assert_ne!(t.input(&seeds, 5, 77), t.input(&seeds, 5, 78), "{t:?}");
            assert_eq!(Target::parse(t.name()), Some(t));
        }
        let bank = &Target::Bank.seeds()[0];
        crate::bank::Bank::from_bytes(Path::new("seed"), bank)
            .unwrap()
            .verify()
            .unwrap();
        crate::bundle::Manifest::parse(&manifest_seed()).unwrap();
        crate::llm::GgufInfo::parse(&gguf_seed().0, Path::new("seed")).unwrap();
    }
}
