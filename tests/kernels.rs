//! illmrec's AVX-512 kernels (src/engine/kernels.cpp) through the real model: ggml's scheduler hands them
//! the attention and GEGLU, and their hidden states match ggml's own kernels (the same binary
//! with `ILLMREC_KERNELS=ggml`) and do not depend on the thread count.
mod common;

use common::{cosine, max_abs, max_abs_diff};
use illmrec::engine::kernels::State;
use illmrec::engine::{Context, ContextOptions, Input, Model, ModelOptions};
use illmrec::store::catalog::Catalog;
use illmrec::store::npy::{NpyArray, NpyData};
use std::path::{Path, PathBuf};
use std::sync::Arc;

fn demo_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle")
}

/// `illmrec embed` of `input`: one hidden state per history (rows of the returned array).
fn embed(dir: &Path, input: &Path, threads: &str, kernels: Option<&str>) -> (Vec<f32>, usize) {
    let out = dir.join(format!("{threads}-{}.npy", kernels.unwrap_or("default")));
    let mut cmd = std::process::Command::new(common::BIN);
    cmd.args(["embed", "--bundle"])
        .arg(demo_bundle())
        .arg("--input")
        .arg(input)
        .arg("--output")
        .arg(&out)
        .args(["--threads", threads]);
    if let Some(k) = kernels {
        cmd.env("ILLMREC_KERNELS", k);
    }
    let res = cmd.output().unwrap();
    assert!(
        res.status.success(),
        "{}",
        String::from_utf8_lossy(&res.stderr)
    );
    let array = NpyArray::read(&out).unwrap();
    match array.data {
        NpyData::F32(v) => (v, array.shape[1]),
        _ => panic!("embed wrote a non-f32 array"),
    }
}

#[test]
fn the_scheduler_hands_attention_and_geglu_to_the_backend() {
    let model = Arc::new(Model::load(&common::model_path(), &ModelOptions::default()).unwrap());
    let state = illmrec::engine::kernels::install();
    let before = illmrec::engine::kernels::calls();
    let mut ctx = Context::new(model.clone(), &ContextOptions::default()).unwrap();
    let tokens = model
        .tokenize(&"Toy Story (1995), Heat (1995), ".repeat(20), true)
        .unwrap();
    let inputs: Vec<Input> = tokens.into_iter().map(Input::Token).collect();
    ctx.last_hidden(&inputs, false).unwrap();
    let after = illmrec::engine::kernels::calls();
    let used = (after.0 - before.0, after.1 - before.1);
    if state == State::On {
        // one attention and one GEGLU per layer (Gemma 3 270M: 18 layers)
        assert!(
            used.0 >= 18 && used.1 >= 18,
            "the backend computed {used:?} (attention, GEGLU) operations"
        );
    } else {
        eprintln!("AVX-512 kernels not in use here ({state:?}): nothing to check");
        assert_eq!(used, (0, 0));
    }
    // `illmrec info` says the same, with the word scripts read first
    let info = common::illmrec_ok(&["info"]);
    let line = info
        .lines()
        .find_map(|l| l.strip_prefix("kernels: "))
        .unwrap_or_else(|| panic!("no kernels line in {info}"));
    assert_eq!(line.starts_with("on:"), state == State::On, "{line}");
}

#[test]
fn backend_states_match_ggml_and_do_not_depend_on_threads() {
    let dir = tempfile::tempdir().unwrap();
    let catalog = Catalog::load(&demo_bundle().join("items.jsonl")).unwrap();
    let ids: Vec<u64> = catalog.items().iter().take(40).map(|i| i.id).collect();
    // 2 items (< 64 positions: ggml's one-tile path) up to 20 (its tiled path, several KV blocks)
    let histories: Vec<String> = [2usize, 7, 20]
        .iter()
        .enumerate()
        .map(|(k, &n)| {
            let h: Vec<String> = ids[k..k + n].iter().map(u64::to_string).collect();
            format!("{{\"user\": {k}, \"history\": [{}]}}", h.join(", "))
        })
        .collect();
    let input = dir.path().join("histories.jsonl");
    std::fs::write(&input, histories.join("\n") + "\n").unwrap();
    let (ours2, dim) = embed(dir.path(), &input, "2", None);
    let (ours1, _) = embed(dir.path(), &input, "1", None);
    let (ggml, _) = embed(dir.path(), &input, "2", Some("ggml"));
    if illmrec::engine::kernels::install() == State::On {
        // illmrec's kernels give each 4-row group of a head to one thread: byte-identical
        assert_eq!(ours1, ours2, "hidden states differ between 1 and 2 threads");
        // the variable reached the child and ggml's kernels ran instead
        assert_ne!(ours2, ggml, "ILLMREC_KERNELS=ggml changed nothing");
    } else {
        // ggml's own kernels split work by thread count: equal to float rounding only
        for (k, (a, b)) in ours1.chunks(dim).zip(ours2.chunks(dim)).enumerate() {
            let (diff, max) = (max_abs_diff(a, b), max_abs(b));
            assert!(
                diff / max < 3e-3,
                "history {k}: 1 vs 2 threads, max abs diff {diff} of {max}"
            );
            assert!(
                cosine(a, b) > 0.99999,
                "history {k}: 1 vs 2 threads, cosine {}",
                cosine(a, b)
            );
        }
    }
    for (k, (a, b)) in ours2.chunks(dim).zip(ggml.chunks(dim)).enumerate() {
        let (diff, max) = (max_abs_diff(a, b), max_abs(b));
        assert!(
            diff / max < 3e-3,
            "history {k}: max abs diff {diff} of {max}"
        );
        assert!(
            cosine(a, b) > 0.99999,
            "history {k}: cosine {}",
            cosine(a, b)
        );
    }
}
