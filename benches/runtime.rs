//! Criterion benchmarks of the runtime's parts. The LLM request benchmark needs the default model
//! (models/fetch-default-model.sh) and builds a small bundle from the shipped demo bundle.
//!
//!     cargo bench --bench runtime

use criterion::{black_box, criterion_group, criterion_main, Criterion};
use illmrec::method::heads::{random_tensors, write_safetensors, Heads, HeadsConfig, WeightDtype};
use illmrec::recommender::{Options, Recommender};
use illmrec::store::bank::{write_bank, Bank, BankRows, Modality};
use std::collections::HashSet;
use std::path::Path;

fn demo_bundle() -> &'static Path {
    Path::new(concat!(env!("CARGO_MANIFEST_DIR"), "/models/demo-bundle"))
}

fn bank_lookup(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("b.bank");
    let n = 100_000usize;
    let ids: Vec<u64> = (0..n as u64).map(|i| i * 3).collect();
    let rows: Vec<half::f16> = (0..n * 64)
        .map(|i| half::f16::from_f32((i % 97) as f32))
        .collect();
    write_bank(&path, Modality::Img, 64, &ids, BankRows::F16(&rows)).unwrap();
    c.bench_function("bank open (100k items)", |b| {
        b.iter(|| black_box(Bank::open(&path).unwrap()))
    });
    let bank = Bank::open(&path).unwrap();
    let mut k = 0u64;
    c.bench_function("bank lookup by id (zero-copy row)", |b| {
        b.iter(|| {
            k = (k + 7919) % n as u64;
            black_box(bank.get(k * 3).unwrap());
        })
    });
}

fn heads(c: &mut Criterion) {
    let dir = tempfile::tempdir().unwrap();
    let cfg: HeadsConfig = serde_json::from_str(
        r#"{"format": "illmrec-heads", "version": 1, "llm_dim": 640, "proj_dim": 512, "hidden_dim": 1024, "prompt": "image",
            "image_dim": 1024, "item_dims": {"img": 1024, "cf": 50, "text": 384}, "trained": false}"#,
    )
    .unwrap();
    std::fs::write(
        dir.path().join("h.json"),
        serde_json::to_string(&cfg).unwrap(),
    )
    .unwrap();
    write_safetensors(
        &dir.path().join("h.safetensors"),
        &random_tensors(&cfg, 1).unwrap(),
        WeightDtype::F16,
    )
    .unwrap();
    let heads = Heads::load(
        &dir.path().join("h.safetensors"),
        &dir.path().join("h.json"),
    )
    .unwrap();
    let h = vec![0.5f32; 640];
    c.bench_function("three user heads (640 -> 1024 -> 512)", |b| {
        b.iter(|| {
            heads
                .modalities()
                .iter()
                .map(|m| heads.user[m].forward(black_box(&h)))
                .collect::<Vec<_>>()
        })
    });
    let x = vec![0.25f32; 1024];
    c.bench_function("adaptor (1024 -> 512 -> 640)", |b| {
        b.iter(|| heads.adaptor.as_ref().unwrap().forward(black_box(&x)))
    });
}

fn requests(c: &mut Criterion) {
    let Ok(mut rec) = Recommender::open(demo_bundle(), Options::default()) else {
        eprintln!("skipping request benchmarks: the default model is missing (models/fetch-default-model.sh)");
        return;
    };
    let history: Vec<u64> = std::fs::read_to_string(demo_bundle().join("sample-history.txt"))
        .unwrap()
        .trim()
        .split(',')
        .map(|s| s.parse().unwrap())
        .collect();
    let user = rec.encode_user(&history).unwrap();
    let seen: HashSet<u64> = history.iter().copied().collect();
    c.bench_function("top-10 over the demo catalog (1,297 items)", |b| {
        b.iter(|| rec.top_k(black_box(&user), 10, None, &seen).unwrap())
    });
    let mut group = c.benchmark_group("LLM request (5-item history)");
    group.sample_size(10);
    group.bench_function("encode user, prefix cache", |b| {
        b.iter(|| rec.encode_user(black_box(&history)).unwrap())
    });
    rec.set_request_options(false, None).unwrap();
    group.bench_function("encode user, no prefix cache", |b| {
        b.iter(|| rec.encode_user(black_box(&history)).unwrap())
    });
    group.finish();
}

criterion_group!(benches, bank_lookup, heads, requests);
criterion_main!(benches);
