//! The streaming `score`: `kill -9` at seeded random points then `--resume` gives exactly the
//! uninterrupted run's output, with no finished user lost on the way; `--shard I/N` outputs
//! together are exactly the unsharded output; bad `--shard`/`--resume` uses are clean errors;
//! users decoded together (`--batch-users`) get one-at-a-time's records within float noise.

mod common;

use common::s;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;

/// (work dir, bundle dir, item ids), built once per test run.
fn setup() -> &'static (PathBuf, PathBuf, Vec<u64>) {
    static S: OnceLock<(PathBuf, PathBuf, Vec<u64>)> = OnceLock::new();
    S.get_or_init(|| common::fresh_bundle("score-test"))
}

/// `n` user lines over the test bundle; line 5 (if any) has an unknown id: its record is
/// `{"line": 5, "error": ...}`.
fn users(dir: &Path, n: usize) -> PathBuf {
    let ids = &setup().2;
    let lines: String = (0..n)
        .map(|u| match u {
            4 => "{\"user\": \"bad\", \"history\": [999999999]}\n".to_string(),
            _ => {
                serde_json::json!({"user": format!("u{u}"),
                "history": [ids[u % 40], ids[(u * 7 + 3) % 40], ids[(u * 13 + 5) % 40]]})
                .to_string()
                    + "\n"
            }
        })
        .collect();
    let p = dir.join("users.jsonl");
    std::fs::write(&p, lines).unwrap();
    p
}

fn score_args(input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    score_args_on(&setup().1, input, output, extra)
}

fn score_args_on(bundle: &Path, input: &Path, output: &Path, extra: &[&str]) -> Vec<String> {
    let mut a: Vec<String> = [
        "score",
        "--bundle",
        &s(bundle),
        "--input",
        &s(input),
        "--output",
        &s(output),
        "--threads",
        "1",
    ]
    .map(String::from)
    .to_vec();
    a.extend(extra.iter().map(|x| x.to_string()));
    a
}

/// The records a killed run has committed: the partial file up to the journal's last entry.
fn committed(output: &Path) -> Vec<u8> {
    let (partial, journal) = illmrec::store::journal::work_files(output).unwrap();
    let Ok(j) = std::fs::read(&journal) else {
        return Vec::new();
    };
    let p = std::fs::read(&partial).unwrap_or_default();
    let header: serde_json::Value =
        serde_json::from_slice(j.split(|&b| b == b'\n').next().unwrap()).unwrap();
    let point = illmrec::store::journal::resume_point(&j, &header["run"], p.len() as u64).unwrap();
    p[..point.end as usize].to_vec()
}

#[test]
fn score_killed_then_resumed_equals_the_uninterrupted_run() {
    let dir = setup().0.join("resume");
    std::fs::create_dir_all(&dir).unwrap();
    let input = users(&dir, 16);
    let whole = dir.join("whole.jsonl");
    let span = common::run_timed(&score_args(&input, &whole, &[])).mul_f64(1.1);
    let complete = std::fs::read(&whole).unwrap();
    assert_eq!(complete.iter().filter(|&&b| b == b'\n').count(), 16);
    let output = dir.join("killed.jsonl");
    std::fs::write(&output, "previous results\n").unwrap();
    let mut before = 0;
    let delays = common::seeded(21, 5);
    for (k, x) in delays.iter().enumerate() {
        let delay = span.mul_f64(((x + 1.0) / 2.0) as f64 * 0.6);
        let resume: &[&str] = if k > 0 { &["--resume"] } else { &[] };
        common::kill_after(&score_args(&input, &output, resume), delay);
        if std::fs::read(&output).unwrap() != b"previous results\n" {
            // The run finished before the kill.
            assert_eq!(
                std::fs::read(&output).unwrap(),
                complete,
                "a partial output"
            );
            break;
        }
        let now = committed(&output);
        assert!(
            complete.starts_with(&now),
            "kill {k} after {delay:?}: committed records differ from the uninterrupted run's"
        );
        assert!(now.len() >= before, "kill {k}: a finished user was lost");
        before = now.len();
    }
    assert!(
        before > 0,
        "no kill came after a commit: the test proves nothing"
    );
    common::run_timed(&score_args(&input, &output, &["--resume"]));
    assert_eq!(
        std::fs::read(&output).unwrap(),
        complete,
        "users lost, repeated or scored differently"
    );
    let (partial, journal) = illmrec::store::journal::work_files(&output).unwrap();
    assert!(!partial.exists() && !journal.exists(), "work files left");

    // A journal of another run is not resumed into.
    let mut child = Command::new(common::BIN)
        .args(score_args(&input, &output, &[]))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(span.mul_f64(0.5));
    let _ = child.kill();
    let _ = child.wait();
    if journal.exists() {
        let out = common::illmrec(
            &score_args(&input, &output, &["--resume", "--top-k", "3"])
                .iter()
                .map(String::as_str)
                .collect::<Vec<_>>(),
        );
        common::assert_clean_error(&out, "another input or other settings");
    }
}

#[test]
fn shards_together_are_the_unsharded_run() {
    let dir = setup().0.join("shards");
    std::fs::create_dir_all(&dir).unwrap();
    let input = users(&dir, 11);
    let whole = dir.join("whole.jsonl");
    common::run_timed(&score_args(&input, &whole, &[]));
    let whole = std::fs::read_to_string(&whole).unwrap();
    // Input line n is output line n (line 5's is an error record).
    let by_line: Vec<(usize, &str)> = (1..=11).zip(whole.lines()).collect();
    let mut union: Vec<String> = Vec::new();
    for i in 0..3 {
        let out = dir.join(format!("shard-{i}.jsonl"));
        // --resume with no earlier run just starts.
        common::run_timed(&score_args(
            &input,
            &out,
            &["--shard", &format!("{i}/3"), "--resume"],
        ));
        let text = std::fs::read_to_string(&out).unwrap();
        let want: Vec<&str> = by_line
            .iter()
            .filter(|(n, _)| (n - 1) % 3 == i)
            .map(|(_, l)| *l)
            .collect();
        assert_eq!(text.lines().collect::<Vec<_>>(), want, "shard {i}/3");
        union.extend(text.lines().map(String::from));
    }
    let mut all: Vec<String> = whole.lines().map(String::from).collect();
    all.sort();
    union.sort();
    assert_eq!(union, all, "shards lost or repeated a user");
}

#[test]
fn bad_shards_and_resumes_are_clean_errors() {
    let dir = setup().0.join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let input = users(&dir, 2);
    let out = dir.join("o.jsonl");
    for bad in ["3/3", "1/0", "x", "-1/2"] {
        let flag = format!("--shard={bad}");
        let args = score_args(&input, &out, &[&flag]);
        let o = common::illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(o.status.code(), Some(2), "--shard {bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("shard"));
    }
    let args = score_args(&input, Path::new("/dev/null"), &["--resume"]);
    let o = common::illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>());
    common::assert_clean_error(&o, "--resume needs a regular output file");
}

#[test]
fn users_decoded_together_get_the_records_of_one_at_a_time() {
    let dir = setup().0.join("batched");
    std::fs::create_dir_all(&dir).unwrap();
    let input = users(&dir, 11); // line 5 is bad
    let read = |p: &Path| -> Vec<serde_json::Value> {
        std::fs::read_to_string(p)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let one = dir.join("one.jsonl");
    let args = score_args(&input, &one, &["--batch-users", "1"]);
    common::illmrec_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let four = dir.join("four.jsonl");
    let args = score_args(&input, &four, &["--batch-users", "4"]);
    let o = common::illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(stderr.contains(":5: with an unknown item line"), "{stderr}");
    assert!(
        stderr.contains("scored 10 users; 1 lines could not be scored (1 with an unknown item)"),
        "{stderr}"
    );
    let (a, b) = (read(&one), read(&four));
    assert_eq!(a.len(), 11);
    assert_eq!(a.len(), b.len());
    assert_eq!(
        a[4],
        serde_json::json!({"line": 5, "error": "item 999999999 is not in the catalog"})
    );
    assert_eq!(a[4], b[4]);
    for (x, y) in a.iter().zip(&b).filter(|(x, _)| x.get("error").is_none()) {
        assert_eq!(x["user"], y["user"], "records stay in line order");
        assert_eq!(x["history_used"], y["history_used"]);
        let items = |r: &serde_json::Value| -> Vec<(u64, f64)> {
            r["items"]
                .as_array()
                .unwrap()
                .iter()
                .map(|i| (i["id"].as_u64().unwrap(), i["score"].as_f64().unwrap()))
                .collect()
        };
        let (ix, iy) = (items(x), items(y));
        let top = ix[0].1.abs().max(1e-6);
        let common_ids = ix
            .iter()
            .filter(|(id, _)| iy.iter().any(|(j, _)| j == id))
            .count();
        assert!(common_ids >= ix.len() - 1, "{x} vs {y}");
        for (id, sx) in &ix {
            if let Some((_, sy)) = iy.iter().find(|(j, _)| j == id) {
                assert!(
                    (sx - sy).abs() <= 5e-3 * top,
                    "user {}: item {id} {sx} alone, {sy} batched",
                    x["user"]
                );
            }
        }
    }
    for bad in ["0", "17", "x"] {
        let args = score_args(&input, &dir.join("bad.jsonl"), &["--batch-users", bad]);
        let o = common::illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>());
        assert_eq!(o.status.code(), Some(2), "--batch-users {bad}");
        assert!(String::from_utf8_lossy(&o.stderr).contains("batch-users"));
    }
}

#[test]
fn a_featureless_candidate_is_left_out_with_a_warning_naming_its_line() {
    let (src, _, ids) = setup();
    let dir = src.join("featureless");
    std::fs::create_dir_all(&dir).unwrap();
    for f in [
        "heads-config.json",
        "heads-src.safetensors",
        "img-src.bank",
        "text-src.bank",
    ] {
        std::fs::copy(src.join(f), dir.join(f)).unwrap();
    }
    // A catalog item with no row in any bank (`items add` refuses such an item; a bundle made
    // from a catalog and banks that disagree has one).
    let mut items = std::fs::read_to_string(src.join("items.jsonl")).unwrap();
    items.push_str("{\"id\": 777777777, \"title\": \"Bare (2026)\", \"genres\": []}\n");
    std::fs::write(dir.join("items.jsonl"), items).unwrap();
    let bundle = dir.join("bundle");
    let _ = std::fs::remove_dir_all(&bundle);
    let args = common::bundle_create_args(&dir, &bundle, &dir.join("heads-src.safetensors"), true);
    common::illmrec_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let input = dir.join("users.jsonl");
    let line = serde_json::json!({"user": "u", "history": [ids[0]], "candidates": [ids[1], 777777777u64, ids[2]]});
    std::fs::write(&input, format!("{line}\n")).unwrap();
    let output = dir.join("out.jsonl");
    let args = score_args_on(&bundle, &input, &output, &[]);
    let o = common::illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let stderr = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "{stderr}");
    assert!(
        stderr.contains(":1: candidates 777777777 have no feature in a scored modality"),
        "{stderr}"
    );
    let rec: serde_json::Value =
        serde_json::from_str(std::fs::read_to_string(&output).unwrap().trim()).unwrap();
    let got: Vec<u64> = rec["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    assert_eq!(got.len(), 2, "{rec}");
    assert!(!got.contains(&777777777), "{rec}");
    assert!(
        rec.get("left_out").is_none(),
        "the warning is not part of the record: {rec}"
    );
}
