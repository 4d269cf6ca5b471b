//! `illmrec eval` end to end on a small dataset over the test bundle: a resumed run equals an
//! uninterrupted one, and items without an image work in histories and as candidates.

mod common;

use common::{illmrec, illmrec_ok};
use illmrec::recommender::{Options, Recommender};
use std::path::PathBuf;
use std::sync::OnceLock;

/// (work dir, bundle, dataset, item ids)
fn setup() -> &'static (PathBuf, PathBuf, PathBuf, Vec<u64>) {
    static S: OnceLock<(PathBuf, PathBuf, PathBuf, Vec<u64>)> = OnceLock::new();
    S.get_or_init(|| {
        let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("eval-test");
        let _ = std::fs::remove_dir_all(&dir);
        let ids = common::build_bundle(&dir, 40);
        let dataset = dir.join("dataset");
        std::fs::create_dir_all(&dataset).unwrap();
        let mut cases = String::new();
        let mut train = String::new();
        for u in 0..6usize {
            // Histories mix items with and without image features (every third has none).
            let history: Vec<u64> = (0..3 + u % 3).map(|k| ids[(u * 5 + k) % 40]).collect();
            let target = ids[(u * 7 + 2) % 40];
            let negatives: Vec<u64> = (0..12).map(|k| ids[(u * 3 + 11 + k * 2) % 40]).filter(|n| *n != target && !history.contains(n)).collect();
            cases += &serde_json::json!({"user": u, "history": history, "target": target, "negatives": negatives}).to_string();
            cases.push('\n');
            train += &serde_json::json!({"user": u, "items": history}).to_string();
            train.push('\n');
        }
        std::fs::write(dataset.join("test.jsonl"), &cases).unwrap();
        std::fs::write(dataset.join("train.jsonl"), &train).unwrap();
        (dir.clone(), dir.join("bundle"), dataset, ids)
    })
}

fn metrics(summary: &str) -> serde_json::Value {
    let mut v: serde_json::Value = serde_json::from_str(summary).unwrap();
    for volatile in ["users_per_second", "users_this_run"] {
        v.as_object_mut().unwrap().remove(volatile);
    }
    v
}

/// `illmrec eval` of the test bundle on the test split, 2 threads, then `extra`, run by `run`
/// (`common::illmrec`, or `common::illmrec_ok` where it must succeed).
fn eval_with<R>(run: fn(&[&str]) -> R, extra: &[&str]) -> R {
    let (_, bundle, dataset, _) = setup();
    let (b, d) = (bundle.to_string_lossy(), dataset.to_string_lossy());
    let base = [
        "eval",
        "--bundle",
        &b,
        "--dataset",
        &d,
        "--split",
        "test",
        "--threads",
        "2",
    ];
    run(&[&base[..], extra].concat())
}

#[test]
fn resumed_eval_equals_an_uninterrupted_one() {
    let (dir, _, _, _) = setup();
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    let full_out = s(&dir.join("full"));
    let full = eval_with(illmrec_ok, &["--out", &full_out]);
    let part_out = s(&dir.join("part"));
    eval_with(illmrec_ok, &["--out", &part_out, "--limit", "3"]);
    // Simulate a kill in the middle of writing the fourth user's line.
    let ranks = dir.join("part/ranks.jsonl");
    let mut bytes = std::fs::read(&ranks).unwrap();
    bytes.extend_from_slice(b"{\"user\":\"3\",\"ta");
    std::fs::write(&ranks, bytes).unwrap();
    let out = eval_with(illmrec, &["--out", &part_out, "--resume"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(String::from_utf8_lossy(&out.stderr).contains("3 users done, 3 to go"));
    let resumed = String::from_utf8(out.stdout).unwrap();
    let (a, b) = (metrics(&full), metrics(&resumed));
    assert_eq!(a["n_users"], 6);
    assert_eq!(a, b, "same metrics after an interruption and --resume");
    assert_eq!(
        std::fs::read_to_string(&ranks).unwrap(),
        std::fs::read_to_string(dir.join("full/ranks.jsonl")).unwrap()
    );
    let summary: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("part/summary.json")).unwrap())
            .unwrap();
    assert_eq!(summary["n_users"], 6);
}

#[test]
fn users_decoded_together_rank_as_one_at_a_time() {
    let (dir, _, _, _) = setup();
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    let ranks = |name: &str, per_call: &str| -> Vec<serde_json::Value> {
        eval_with(
            illmrec_ok,
            &["--batch-users", per_call, "--out", &s(&dir.join(name))],
        );
        std::fs::read_to_string(dir.join(name).join("ranks.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let (one, four) = (ranks("one-at-a-time", "1"), ranks("four-per-call", "4"));
    assert_eq!(one.len(), 6);
    let users = |r: &[serde_json::Value]| r.iter().map(|x| x["user"].clone()).collect::<Vec<_>>();
    assert_eq!(
        users(&one),
        users(&four),
        "the same users in the same order"
    );
    // Float noise may swap candidates whose scores are within ~1e-3 of each other.
    let same = one
        .iter()
        .zip(&four)
        .filter(|(a, b)| a["rank"] == b["rank"])
        .count();
    assert!(same >= 5, "{one:?} vs {four:?}");
    for (a, b) in one.iter().zip(&four) {
        assert!((a["rank"].as_i64().unwrap() - b["rank"].as_i64().unwrap()).abs() <= 2);
    }
}

#[test]
fn embed_rows_of_users_decoded_together_equal_one_at_a_time() {
    let (dir, bundle, dataset, _) = setup();
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    let rows = |name: &str, per_call: &str| -> Vec<f32> {
        let out = dir.join(name);
        illmrec_ok(&[
            "embed",
            "--bundle",
            &s(bundle),
            "--input",
            &s(&dataset.join("test.jsonl")),
            "--output",
            &s(&out),
            "--threads",
            "2",
            "--batch-users",
            per_call,
        ]);
        let bytes = std::fs::read(&out).unwrap();
        // .npy v1: 10-byte preamble, header length at bytes 8..10, then little-endian f32 rows.
        let start = 10 + u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
        bytes[start..]
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()))
            .collect()
    };
    let (one, three) = (rows("embed-1.npy", "1"), rows("embed-3.npy", "3"));
    assert_eq!(one.len(), 6 * 640);
    assert_eq!(one.len(), three.len());
    for (k, (a, b)) in one.chunks(640).zip(three.chunks(640)).enumerate() {
        let dot: f32 = a.iter().zip(b).map(|(x, y)| x * y).sum();
        let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
        let cos = dot / (norm(a) * norm(b));
        assert!(cos > 0.9999, "row {k}: cosine {cos}");
    }
}

#[test]
fn reference_rankers_run_without_a_bundle() {
    let (dir, _, dataset, _) = setup();
    let s = |p: &PathBuf| p.to_string_lossy().into_owned();
    for ranker in ["popularity", "random"] {
        let out = illmrec_ok(&[
            "eval",
            "--dataset",
            &s(dataset),
            "--ranker",
            ranker,
            "--out",
            &s(&dir.join(ranker)),
        ]);
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_eq!(v["n_users"], 6);
        assert_eq!(v["ranker"], ranker);
    }
    let out = illmrec(&["eval", "--dataset", &s(dataset)]);
    common::assert_clean_error(&out, "--ranker llm needs --bundle");
    let out = illmrec(&["eval", "--dataset", "/nonexistent", "--ranker", "random"]);
    common::assert_clean_error(&out, "cannot read /nonexistent/test.jsonl");
}

#[test]
fn items_without_image_are_scored_on_the_modalities_they_have() {
    let (_, bundle, _, ids) = setup();
    let mut rec = Recommender::open(
        bundle,
        Options {
            context: illmrec::engine::ContextOptions {
                n_threads: 2,
                ..Default::default()
            },
            ..Options::default()
        },
    )
    .unwrap();
    let no_image = ids[2];
    assert!(rec.banks[&illmrec::store::bank::Modality::Img]
        .get(no_image)
        .is_none());
    // In a history: the prompt has two visual tokens for three items.
    let user = rec.encode_user(&[ids[0], no_image, ids[1]]).unwrap();
    assert_eq!(user.used.len(), 3);
    // As a candidate: the mean over the modalities it has, i.e. its text score alone.
    let text_slot = rec
        .modalities()
        .iter()
        .position(|m| *m == illmrec::store::bank::Modality::Text)
        .unwrap();
    let i = rec.catalog.position(no_image).unwrap();
    // (One dot product over the f16 row, whose image part is zeros: equal to float rounding.)
    let want =
        illmrec::method::heads::dot(&user.vectors[text_slot], &rec.items.vector(i, text_slot));
    let got = rec.score_items(&user, &[no_image]).unwrap()[0].unwrap();
    assert!(
        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
        "{got} vs {want}"
    );
    // An item with both: the mean of two dot products.
    let j = rec.catalog.position(ids[0]).unwrap();
    let both: f32 = (0..2)
        .map(|m| illmrec::method::heads::dot(&user.vectors[m], &rec.items.vector(j, m)))
        .sum::<f32>()
        / 2.0;
    let got = rec.score_items(&user, &[ids[0]]).unwrap()[0].unwrap();
    assert!(
        (got - both).abs() <= 1e-5 * (1.0 + both.abs()),
        "{got} vs {both}"
    );
}
