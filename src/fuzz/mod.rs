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
//! The byte-level and JSON mutators are in `mutate.rs`, each format's seed inputs and
//! structure-aware edits in `seeds.rs`.
//!
//! [`run`] catches panics and flags slow inputs; `examples/fuzz.rs` runs the long campaigns in
//! child processes, so that an abort inside llama.cpp or a hang is caught too. The test suite
//! runs a short seeded slice of every target.

mod mutate;
mod seeds;

pub use mutate::{mutate_bytes, mutate_json, Rng};
pub use seeds::{gguf_seed, small_config};

use crate::method::heads::{encode_safetensors, random_tensors, Heads, HeadsConfig, WeightDtype};
use mutate::{mutate_json_bytes, mutate_json_lines};
use seeds::*;
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
                if let Ok(bank) = crate::store::bank::Bank::from_bytes(name, data) {
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
                if let Ok(c) = crate::store::catalog::Catalog::parse(data, name) {
                    accepted = true;
                    for item in c.items() {
                        assert_eq!(c.get(item.id).map(|i| i.id), Some(item.id));
                        let _ = item.title();
                    }
                }
            }
            Target::Lines => {
                for line in crate::store::jsonl::Lines::new(std::io::Cursor::new(data)) {
                    let line = line.expect("reading memory cannot fail");
                    accepted |= line.parse::<crate::store::jsonl::ScoreLine>().is_ok();
                    let _ = line.parse::<crate::store::jsonl::HistoryLine>();
                }
            }
            Target::Npy => {
                if let Ok(a) = crate::store::npy::NpyArray::parse(data) {
                    accepted = true;
                    let n = match &a.data {
                        crate::store::npy::NpyData::F32(v) => v.len(),
                        crate::store::npy::NpyData::F16(v) => v.len(),
                        crate::store::npy::NpyData::I64(v) => v.len(),
                    };
                    assert_eq!(n, a.shape.iter().product::<usize>());
                }
            }
            Target::Gguf => {
                if let Ok(info) = crate::engine::GgufInfo::parse(data, name) {
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
        crate::store::bank::Bank::from_bytes(Path::new("seed"), bank)
            .unwrap()
            .verify()
            .unwrap();
        crate::bundle::Manifest::parse(&manifest_seed()).unwrap();
        crate::engine::GgufInfo::parse(&gguf_seed().0, Path::new("seed")).unwrap();
    }
}
