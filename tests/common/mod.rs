//! Helpers shared by the integration tests: the real default model, the CLI binary, and a small
//! bundle built through the CLI itself from real MovieLens titles with seeded features.
#![allow(dead_code)]

pub mod load;
pub mod server;

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_illmrec");

/// The real default model; tests fail loudly when it has not been fetched.
pub fn model_path() -> PathBuf {
    illmrec::bundle::default_model_path()
        .expect("the default model is missing: run models/fetch-default-model.sh")
}

pub fn shared_data() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/data")
}

/// Runs the CLI and returns its output.
pub fn illmrec(args: &[&str]) -> Output {
    Command::new(BIN)
        .args(args)
        .output()
        .expect("cannot run the illmrec binary")
}

/// Runs the CLI and panics with its stderr when it fails.
pub fn illmrec_ok(args: &[&str]) -> String {
    let out = illmrec(args);
    assert!(
        out.status.success(),
        "illmrec {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// Asserts a clean failure: exit code 1, one `error:` line naming `needle`, no panic or abort.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "expected exit code 1, got {:?}; stderr: {stderr}",
        out.status
    );
    let errors: Vec<&str> = stderr
        .lines()
        .filter(|l| l.starts_with("error: "))
        .collect();
    assert_eq!(errors.len(), 1, "expected one error line, stderr: {stderr}");
    assert!(
        errors[0].contains(needle),
        "error line {:?} does not mention {needle:?}",
        errors[0]
    );
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
}

/// The first `n` movies of ml-latest-small as (id, title), read from the real movies.csv.
pub fn movies(n: usize) -> Vec<(u64, String)> {
    let text = std::fs::read_to_string(shared_data().join("ml-latest-small-posters/movies.csv"))
        .expect("movies.csv");
    text.lines()
        .skip(1)
        .take(n)
        .map(|line| {
            let (id, rest) = line.split_once(',').unwrap();
            let title = if let Some(q) = rest.strip_prefix('"') {
                q[..q.rfind('"').unwrap()].replace("\"\"", "\"")
            } else {
                rest.split(',').next().unwrap().to_string()
            };
            (id.parse().unwrap(), title)
        })
        .collect()
}

/// The largest magnitude of `a`.
pub fn max_abs(a: &[f32]) -> f32 {
    a.iter().fold(0f32, |m, x| m.max(x.abs()))
}

/// The largest element-wise difference of `a` and `b`.
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// The largest difference relative to `b`'s largest magnitude.
pub fn rel_diff(a: &[f32], b: &[f32]) -> f32 {
    max_abs_diff(a, b) / max_abs(b)
}

pub fn cosine(a: &[f32], b: &[f32]) -> f32 {
    let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
    dot / (a.iter().map(|x| x * x).sum::<f32>().sqrt()
        * b.iter().map(|x| x * x).sum::<f32>().sqrt())
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn seeded(seed: u64, n: usize) -> Vec<f32> {
    let mut s = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect()
}

pub const IMG_DIM: usize = 48;
pub const TEXT_DIM: usize = 24;

/// Heads config for the test bundle: image prompt, img + text scoring (no cf), small heads.
pub fn heads_config(llm_dim: usize) -> String {
    format!(
        r#"{{"format": "illmrec-heads", "version": 1, "llm_dim": {llm_dim}, "proj_dim": 32, "hidden_dim": 64,
        "prompt": "image", "image_dim": {IMG_DIM}, "adaptor_dim": 32, "item_dims": {{"img": {IMG_DIM}, "text": {TEXT_DIM}}},
        "trained": false, "provenance": "random init for tests"}}"#
    )
}

/// Builds a bundle of `n` real movie titles in `dir` with the CLI; every third item has no
/// image feature. Returns the item ids.
pub fn build_bundle(dir: &Path, n: usize) -> Vec<u64> {
    std::fs::create_dir_all(dir).unwrap();
    let movies = movies(n);
    let ids: Vec<u64> = movies.iter().map(|m| m.0).collect();
    let items: String = movies
        .iter()
        .map(|(id, t)| {
            serde_json::json!({"id": id, "title": t, "genres": ["Drama"]}).to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("items.jsonl"), items).unwrap();
    let with_image: Vec<i64> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 2)
        .map(|(_, &id)| id as i64)
        .collect();
    write_features(dir, "img", &with_image, IMG_DIM);
    write_features(
        dir,
        "text",
        &ids.iter().map(|&i| i as i64).collect::<Vec<_>>(),
        TEXT_DIM,
    );
    std::fs::write(dir.join("heads-config.json"), heads_config(640)).unwrap();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    illmrec_ok(&[
        "init-heads",
        "--config",
        &p("heads-config.json"),
        "--out",
        &p("heads-src.safetensors"),
        "--seed",
        "7",
        "--dtype",
        "f16",
    ]);
    for m in ["img", "text"] {
        illmrec_ok(&[
            "bank",
            "build",
            "--npy",
            &p(&format!("{m}.npy")),
            "--ids",
            &p(&format!("{m}.ids.npy")),
            "--modality",
            m,
            "--out",
            &p(&format!("{m}-src.bank")),
        ]);
    }
    let args = bundle_create_args(
        dir,
        &dir.join("bundle"),
        &dir.join("heads-src.safetensors"),
        true,
    );
    illmrec_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    ids
}

/// `bundle create` arguments for a bundle at `out` from the files `build_bundle` left in `dir`
/// (heads config, items, and with `banks` the img and text banks), with `heads` and the default model.
pub fn bundle_create_args(dir: &Path, out: &Path, heads: &Path, banks: bool) -> Vec<String> {
    let mut a: Vec<String> = vec![
        "bundle".into(),
        "create".into(),
        "--out".into(),
        s(out),
        "--heads".into(),
        s(heads),
        "--heads-config".into(),
        s(&dir.join("heads-config.json")),
        "--items".into(),
        s(&dir.join("items.jsonl")),
        "--model".into(),
        s(&model_path()),
    ];
    if banks {
        for m in ["img", "text"] {
            a.push("--bank".into());
            a.push(format!("{m}={}", s(&dir.join(format!("{m}-src.bank")))));
        }
    }
    a
}

fn write_features(dir: &Path, name: &str, ids: &[i64], dim: usize) {
    let values: Vec<f32> = ids
        .iter()
        .flat_map(|&id| seeded(id as u64 * 31 + dim as u64, dim))
        .collect();
    std::fs::write(
        dir.join(format!("{name}.npy")),
        illmrec::store::npy::encode_f32(ids.len(), dim, &values),
    )
    .unwrap();
    std::fs::write(
        dir.join(format!("{name}.ids.npy")),
        illmrec::store::npy::encode_i64(ids),
    )
    .unwrap();
}

/// A fresh work folder `CARGO_TARGET_TMPDIR/<name>` with the 40-item test bundle in `bundle/`:
/// (work dir, bundle dir, item ids). Each test binary keeps one in a `OnceLock`.
pub fn fresh_bundle(name: &str) -> (PathBuf, PathBuf, Vec<u64>) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&dir);
    let ids = build_bundle(&dir, 40);
    (dir.clone(), dir.join("bundle"), ids)
}

/// A copy of the files of bundle `src` in `dst` (beside it, so the model path stays valid).
pub fn copy_bundle(src: &Path, dst: &Path) -> PathBuf {
    let _ = std::fs::remove_dir_all(dst);
    std::fs::create_dir_all(dst).unwrap();
    for e in std::fs::read_dir(src).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst.to_path_buf()
}

/// A path as a string argument.
/// The item-vector cache files in a cache folder (the folder also holds verified-file stamps).
#[allow(dead_code)]
pub fn item_vector_files(cache_dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("item-vectors-"))
        })
        .collect();
    v.sort();
    v
}

pub fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Runs the CLI to the end, asserting success, and returns how long it took (the span the kill
/// tests spread their kills over).
pub fn run_timed(args: &[String]) -> Duration {
    let t = Instant::now();
    let out = Command::new(BIN).args(args).output().unwrap();
    assert!(
        out.status.success(),
        "illmrec {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    t.elapsed()
}

/// Starts the CLI and kills it with SIGKILL after `delay` (if it is still running).
pub fn kill_after(args: &[String], delay: Duration) {
    let mut child = Command::new(BIN)
        .args(args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(delay);
    let _ = child.kill(); // SIGKILL on Unix
    let _ = child.wait();
}
