//! `kill -9` at seeded random points of `bank build`, `bundle create`, `score` and
//! `eval --resume`: afterwards the previous files are intact (or the new ones complete), and an
//! interrupted evaluation resumes without losing or repeating a finished user. Leftover
//! temporary files are removed by the next run.

mod common;

use common::s;
use illmrec::bundle::Bundle;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;
use std::time::Duration;

/// Kills per command (seeded delays, so every run of the suite kills at the same points).
const KILLS: u64 = 5;

/// (work dir, bundle dir, item ids), built once per test run.
fn setup() -> &'static (PathBuf, PathBuf, Vec<u64>) {
    static S: OnceLock<(PathBuf, PathBuf, Vec<u64>)> = OnceLock::new();
    S.get_or_init(|| common::fresh_bundle("kill-test"))
}

/// Seeded delays spread over `0..span`, one per kill.
fn delays(seed: u64, span: Duration) -> Vec<Duration> {
    let v = common::seeded(seed, KILLS as usize);
    v.iter()
        .map(|x| span.mul_f64(((x + 1.0) / 2.0) as f64))
        .collect()
}

fn temporaries(dir: &Path) -> Vec<String> {
    std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.contains(".tmp-"))
        .collect()
}

#[test]
fn bank_build_killed_leaves_the_old_bank_or_the_new_one() {
    let dir = setup().0.join("kill-bank");
    std::fs::create_dir_all(&dir).unwrap();
    let (n, dim) = (30_000usize, 128usize);
    let ids: Vec<i64> = (0..n as i64).collect();
    std::fs::write(dir.join("ids.npy"), illmrec::store::npy::encode_i64(&ids)).unwrap();
    for (name, seed) in [("old.npy", 1), ("new.npy", 2)] {
        let v = common::seeded(seed, n * dim);
        std::fs::write(dir.join(name), illmrec::store::npy::encode_f32(n, dim, &v)).unwrap();
    }
    let build = |npy: &str, out: &Path| -> Vec<String> {
        [
            "bank",
            "build",
            "--npy",
            &s(&dir.join(npy)),
            "--ids",
            &s(&dir.join("ids.npy")),
            "--modality",
            "img",
            "--out",
            &s(out),
        ]
        .map(String::from)
        .to_vec()
    };
    let out = dir.join("feat.bank");
    common::run_timed(&build("new.npy", &dir.join("reference.bank")));
    let new = std::fs::read(dir.join("reference.bank")).unwrap();
    let span = common::run_timed(&build("old.npy", &out)).mul_f64(1.3);
    let old = std::fs::read(&out).unwrap();
    for delay in delays(11, span) {
        common::kill_after(&build("new.npy", &out), delay);
        let now = std::fs::read(&out).unwrap();
        assert!(
            now == old || now == new,
            "killed after {delay:?}: a mixed bank"
        );
        illmrec::store::bank::Bank::open(&out)
            .unwrap()
            .verify()
            .unwrap();
        if now == new {
            std::fs::write(&out, &old).unwrap();
        }
    }
    common::run_timed(&build("new.npy", &out));
    assert_eq!(std::fs::read(&out).unwrap(), new);
    assert_eq!(temporaries(&dir), Vec::<String>::new(), "left by the kills");
}

#[test]
fn bundle_create_killed_leaves_a_usable_bundle() {
    let src = &setup().0;
    let dir = src.join("kill-bundle");
    std::fs::create_dir_all(&dir).unwrap();
    let out = dir.join("b");
    let create = |heads: &Path| common::bundle_create_args(src, &out, heads, true);
    // Other heads for the new bundle, so that old and new manifests differ.
    let cfg = std::fs::read(src.join("heads-config.json")).unwrap();
    let cfg = illmrec::method::heads::HeadsConfig::parse(&cfg).unwrap();
    let tensors = illmrec::method::heads::random_tensors(&cfg, 99).unwrap();
    let new_heads = dir.join("new.safetensors");
    illmrec::method::heads::write_safetensors(
        &new_heads,
        &tensors,
        illmrec::method::heads::WeightDtype::F16,
    )
    .unwrap();
    let old_heads = src.join("heads-src.safetensors");
    let span = common::run_timed(&create(&old_heads)).mul_f64(1.3);
    std::fs::write(out.join("NOTES.txt"), "not the bundle's").unwrap();
    let old = std::fs::read(out.join("manifest.json")).unwrap();
    for delay in delays(12, span) {
        common::kill_after(&create(&new_heads), delay);
        let b = Bundle::open(&out).unwrap_or_else(|e| panic!("after {delay:?}: {e:#}"));
        for f in &b.manifest.files {
            b.read_verified(&f.path)
                .unwrap_or_else(|e| panic!("after {delay:?}: {e:#}"));
        }
        assert!(
            out.join("NOTES.txt").exists(),
            "a file that is not ours was lost"
        );
        if std::fs::read(out.join("manifest.json")).unwrap() != old {
            // The new bundle is complete: put the old one back for the next kill.
            common::run_timed(&create(&old_heads));
        }
    }
    common::run_timed(&create(&new_heads));
    assert_eq!(temporaries(&dir), Vec::<String>::new(), "left by the kills");
    assert_eq!(
        std::fs::read_to_string(out.join("NOTES.txt")).unwrap(),
        "not the bundle's"
    );
}

#[test]
fn score_killed_leaves_the_old_output() {
    let dir = setup().0.join("kill-score");
    std::fs::create_dir_all(&dir).unwrap();
    let ids = &setup().2;
    let lines: String = (0..12)
        .map(|u| {
            format!(
                "{{\"user\": {u}, \"history\": [{}, {}]}}\n",
                ids[u % 40],
                ids[(u * 7 + 3) % 40]
            )
        })
        .collect();
    std::fs::write(dir.join("users.jsonl"), lines).unwrap();
    let output = dir.join("ranked.jsonl");
    let args: Vec<String> = [
        "score",
        "--bundle",
        &s(&setup().1),
        "--input",
        &s(&dir.join("users.jsonl")),
        "--output",
        &s(&output),
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec();
    let span = common::run_timed(&args).mul_f64(1.2);
    let complete = std::fs::read(&output).unwrap();
    std::fs::write(&output, "previous results\n").unwrap();
    for delay in delays(13, span) {
        common::kill_after(&args, delay);
        let now = std::fs::read(&output).unwrap();
        assert!(
            now == b"previous results\n" || now == complete,
            "killed after {delay:?}: a partial output"
        );
        std::fs::write(&output, "previous results\n").unwrap();
    }
    common::run_timed(&args);
    assert_eq!(std::fs::read(&output).unwrap(), complete);
    assert_eq!(temporaries(&dir), Vec::<String>::new(), "left by the kills");
}

#[test]
fn eval_killed_resumes_without_losing_a_user() {
    let dir = setup().0.join("kill-eval");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("data")).unwrap();
    let ids = &setup().2;
    let cases: String = (0..10)
        .map(|u| {
            let history: Vec<u64> = (0..3).map(|k| ids[(u * 3 + k) % 40]).collect();
            let negatives: Vec<u64> = (0..6).map(|k| ids[(u + 10 + k * 3) % 40]).collect();
            serde_json::json!({"user": u, "history": history, "target": ids[(u + 30) % 40],
                               "negatives": negatives})
            .to_string()
                + "\n"
        })
        .collect();
    std::fs::write(dir.join("data/test.jsonl"), cases).unwrap();
    let eval = |out: &str, resume: bool| -> Vec<String> {
        let mut a: Vec<String> = [
            "eval",
            "--dataset",
            &s(&dir.join("data")),
            "--bundle",
            &s(&setup().1),
            "--out",
            &s(&dir.join(out)),
            "--threads",
            "1",
        ]
        .map(String::from)
        .to_vec();
        if resume {
            a.push("--resume".into());
        }
        a
    };
    let ranks = |out: &str| -> Vec<(String, u64)> {
        let text = std::fs::read_to_string(dir.join(out).join("ranks.jsonl")).unwrap();
        let mut v: Vec<(String, u64)> = text
            .lines()
            .map(|l| {
                let r: serde_json::Value = serde_json::from_str(l).unwrap();
                (
                    r["user"].as_str().unwrap().to_string(),
                    r["rank"].as_u64().unwrap(),
                )
            })
            .collect();
        v.sort();
        v
    };
    let span = common::run_timed(&eval("whole", false)).mul_f64(1.2);
    let whole = ranks("whole");
    assert_eq!(whole.len(), 10);
    let mut done_before = 0;
    for (k, delay) in delays(14, span).into_iter().enumerate() {
        common::kill_after(&eval("killed", k > 0), delay);
        let path = dir.join("killed/ranks.jsonl");
        if !path.exists() {
            continue;
        }
        // Every whole line is a finished user with the uninterrupted run's rank.
        let text = std::fs::read_to_string(&path).unwrap();
        let finished: Vec<&str> = text
            .split_inclusive('\n')
            .filter(|l| l.ends_with('\n'))
            .collect();
        assert!(finished.len() >= done_before, "a finished user was lost");
        done_before = finished.len();
    }
    common::run_timed(&eval("killed", true));
    assert_eq!(
        ranks("killed"),
        whole,
        "users lost, repeated or ranked differently"
    );
}
