//! End to end through the binary: recommend, score, bundle verify, and bad input.

mod common;

use common::{assert_clean_error, illmrec, illmrec_ok};
use std::path::PathBuf;
use std::sync::OnceLock;

/// (work dir, bundle dir, item ids), built once per test run.
fn setup() -> &'static (PathBuf, PathBuf, Vec<u64>) {
    static S: OnceLock<(PathBuf, PathBuf, Vec<u64>)> = OnceLock::new();
    S.get_or_init(|| common::fresh_bundle("cli-test"))
}

fn bundle() -> String {
    setup().1.to_string_lossy().into_owned()
}

fn ids(k: &[usize]) -> String {
    k.iter()
        .map(|&i| setup().2[i].to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// A copy of the test bundle to damage.
fn bundle_copy(name: &str) -> PathBuf {
    common::copy_bundle(&setup().1, &setup().0.join(name))
}

#[test]
fn recommend_is_deterministic_and_excludes_seen_items() {
    let history = ids(&[0, 1, 2, 3, 4]);
    let args = [
        "recommend",
        "--bundle",
        &bundle(),
        "--history",
        &history,
        "--top-k",
        "7",
        "--json",
        "--threads",
        "2",
    ];
    let first = illmrec(&args);
    let second = illmrec(&args);
    assert!(
        first.status.success(),
        "{}",
        String::from_utf8_lossy(&first.stderr)
    );
    assert_eq!(
        first.stdout, second.stdout,
        "two runs give identical output"
    );
    assert!(
        String::from_utf8_lossy(&first.stderr).contains("randomly initialised"),
        "untrained heads are announced"
    );
    let json: serde_json::Value = serde_json::from_slice(&first.stdout).unwrap();
    let items = json["items"].as_array().unwrap();
    assert_eq!(items.len(), 7);
    assert_eq!(json["trained"], false);
    let seen: Vec<u64> = history.split(',').map(|s| s.parse().unwrap()).collect();
    let scores: Vec<f64> = items.iter().map(|i| i["score"].as_f64().unwrap()).collect();
    assert!(scores.windows(2).all(|w| w[0] >= w[1]), "sorted by score");
    assert!(
        items
            .iter()
            .all(|i| !seen.contains(&i["id"].as_u64().unwrap())),
        "seen items excluded"
    );
    assert!(items
        .iter()
        .all(|i| !i["title"].as_str().unwrap().is_empty()));

    // --include-seen and --candidates.
    let candidates = ids(&[0, 10, 11, 12]);
    let out = illmrec_ok(&[
        "recommend",
        "--bundle",
        &bundle(),
        "--history",
        &history,
        "--candidates",
        &candidates,
        "--include-seen",
        "--json",
    ]);
    let json: serde_json::Value = serde_json::from_str(&out).unwrap();
    let got: Vec<u64> = json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| i["id"].as_u64().unwrap())
        .collect();
    let mut sorted = got.clone();
    sorted.sort();
    let mut want: Vec<u64> = candidates.split(',').map(|s| s.parse().unwrap()).collect();
    want.sort();
    assert_eq!(
        sorted, want,
        "exactly the candidates, the seen one included"
    );

    // The table form names the history and the results.
    let table = illmrec_ok(&[
        "recommend",
        "--bundle",
        &bundle(),
        "--history",
        &history,
        "--top-k",
        "3",
    ]);
    assert!(
        table.contains("rank") && table.lines().count() >= 3 + 5 + 2,
        "{table}"
    );

    // Reusing the prefix or not gives the same ranking.
    let a = illmrec_ok(&[
        "recommend",
        "--bundle",
        &bundle(),
        "--history",
        &history,
        "--json",
    ]);
    let b = illmrec_ok(&[
        "recommend",
        "--bundle",
        &bundle(),
        "--history",
        &history,
        "--json",
        "--no-prefix-cache",
    ]);
    let ids_of = |s: &str| -> Vec<u64> {
        serde_json::from_str::<serde_json::Value>(s).unwrap()["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["id"].as_u64().unwrap())
            .collect()
    };
    assert_eq!(ids_of(&a), ids_of(&b));
}

#[test]
fn score_skips_and_counts_malformed_lines() {
    let dir = &setup().0;
    let input = dir.join("users.jsonl");
    let output = dir.join("ranked.jsonl");
    let lines = [
        format!(r#"{{"user": "u1", "history": [{}]}}"#, ids(&[0, 1, 2])),
        "{not json".to_string(),
        format!(r#"{{"user": 2, "history": [{}], "top_k": 3}}"#, ids(&[5])),
        r#"{"user": 3, "history": []}"#.to_string(),
        r#"{"user": 4, "history": [123456789]}"#.to_string(),
        format!(
            r#"{{"user": 5, "history": [{}], "candidates": [{}]}}"#,
            ids(&[6, 7]),
            ids(&[8, 9])
        ),
    ];
    std::fs::write(&input, lines.join("\n")).unwrap();
    let out = illmrec(&[
        "score",
        "--bundle",
        &bundle(),
        "--input",
        &input.to_string_lossy(),
        "--output",
        &output.to_string_lossy(),
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(stderr.contains("users.jsonl:2: malformed line"), "{stderr}");
    assert!(
        stderr.contains("users.jsonl:4: invalid line") && stderr.contains("history is empty"),
        "{stderr}"
    );
    assert!(
        stderr.contains("users.jsonl:5: with an unknown item line")
            && stderr.contains("not in the catalog"),
        "{stderr}"
    );
    assert!(
        stderr.contains(
            "scored 3 users; 3 lines could not be scored (1 malformed, 1 with an unknown item, 1 invalid)"
        ),
        "{stderr}"
    );
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    // Every line has its record; a bad one `{"line", "error"}` as POST /v1/score writes it.
    assert_eq!(records.len(), 6);
    for (i, n) in [(1, 2), (3, 4), (4, 5)] {
        assert_eq!(records[i]["line"], n, "{}", records[i]);
        assert!(records[i]["error"].is_string());
    }
    let ranked: Vec<&serde_json::Value> = records
        .iter()
        .filter(|r| r.get("error").is_none())
        .collect();
    assert_eq!(ranked.len(), 3);
    assert_eq!(ranked[0]["user"], "u1");
    assert_eq!(ranked[0]["items"].as_array().unwrap().len(), 10);
    assert_eq!(ranked[1]["items"].as_array().unwrap().len(), 3);
    assert_eq!(ranked[2]["items"].as_array().unwrap().len(), 2);
}

#[test]
fn bundle_verify_detects_a_changed_file() {
    illmrec_ok(&["bundle", "verify", &bundle()]);
    let copy = bundle_copy("tampered");
    let items = copy.join("items.jsonl");
    let mut bytes = std::fs::read(&items).unwrap();
    let at = bytes.iter().position(|&b| b == b'T').unwrap();
    bytes[at] = b'X';
    std::fs::write(&items, bytes).unwrap();
    let model = common::model_path();
    let out = illmrec(&[
        "bundle",
        "verify",
        &copy.to_string_lossy(),
        "--model",
        &model.to_string_lossy(),
    ]);
    assert_clean_error(&out, "MISMATCH  items.jsonl");
}

#[test]
fn bad_input_gives_one_line_errors() {
    let b = bundle();
    let h = ids(&[0, 1]);
    let run = |extra: &[&str]| {
        let mut args = vec!["recommend", "--bundle", &b];
        args.extend_from_slice(extra);
        illmrec(&args)
    };
    assert_clean_error(&run(&["--history", ""]), "--history is empty");
    assert_clean_error(&run(&["--history", " , "]), "--history is empty");
    assert_clean_error(
        &run(&["--history", &format!("{h},abc")]),
        "'abc' is not an item id",
    );
    assert_clean_error(&run(&["--history=-5"]), "'-5' is not an item id");
    assert_clean_error(
        &run(&["--history", &format!("{h},987654321")]),
        "item 987654321 is not in the catalog",
    );
    assert_clean_error(
        &run(&["--history", &h, "--candidates", "987654321"]),
        "item 987654321 is not in the catalog",
    );
    assert_clean_error(
        &run(&["--history", &h, "--top-k", "0"]),
        "--top-k must be at least 1",
    );
    assert_clean_error(
        &run(&["--history", &h, "--max-history", "0"]),
        "--max-history must be at least 1",
    );
    assert_clean_error(
        &run(&["--history", &h, "--model", "/nonexistent/model.gguf"]),
        "cannot open model",
    );
    assert_clean_error(
        &run(&[
            "--history",
            &h,
            "--model",
            concat!(env!("CARGO_MANIFEST_DIR"), "/Cargo.toml"),
        ]),
        "not a GGUF model file",
    );
    assert_clean_error(
        &illmrec(&["recommend", "--bundle", "/nonexistent", "--history", "1"]),
        "is not a bundle",
    );

    // Damaged bundles.
    let copy = bundle_copy("corrupt-heads");
    let heads = copy.join("heads.safetensors");
    let len = std::fs::metadata(&heads).unwrap().len() as usize;
    std::fs::write(&heads, vec![0x55u8; len]).unwrap();
    let c = copy.to_string_lossy().into_owned();
    // Caught by the manifest's sha256 before it is parsed (tests/hostile.rs covers heads that
    // match their manifest but hold bad values).
    assert_clean_error(
        &illmrec(&["recommend", "--bundle", &c, "--history", &h]),
        "heads.safetensors does not match its sha256",
    );

    let copy = bundle_copy("truncated-items");
    let items = copy.join("items.jsonl");
    let text = std::fs::read(&items).unwrap();
    std::fs::write(&items, &text[..text.len() / 2]).unwrap();
    let c = copy.to_string_lossy().into_owned();
    assert_clean_error(
        &illmrec(&["recommend", "--bundle", &c, "--history", &h]),
        "modified or truncated",
    );

    let copy = bundle_copy("corrupt-bank");
    let bank = copy.join("text.bank");
    let mut bytes = std::fs::read(&bank).unwrap();
    let last = bytes.len() - 3;
    bytes[last] ^= 0x10;
    std::fs::write(&bank, bytes).unwrap();
    let c = copy.to_string_lossy().into_owned();
    let cache = copy.join("fresh-cache").to_string_lossy().into_owned();
    assert_clean_error(
        &illmrec(&[
            "recommend",
            "--bundle",
            &c,
            "--history",
            &h,
            "--cache-dir",
            &cache,
        ]),
        "text.bank does not match its sha256",
    );

    let copy = bundle_copy("no-manifest");
    std::fs::remove_file(copy.join("manifest.json")).unwrap();
    assert_clean_error(
        &illmrec(&[
            "recommend",
            "--bundle",
            &copy.to_string_lossy(),
            "--history",
            &h,
        ]),
        "is not a bundle",
    );
}

#[test]
fn heads_for_another_llm_or_other_features_are_refused() {
    let dir = setup().0.join("mismatch");
    std::fs::create_dir_all(&dir).unwrap();
    let p = |f: &str| dir.join(f).to_string_lossy().into_owned();
    let src = |f: &str| setup().0.join(f).to_string_lossy().into_owned();
    // Heads trained for a 320-d LLM.
    std::fs::write(p("h320.json"), common::heads_config(320)).unwrap();
    illmrec_ok(&[
        "init-heads",
        "--config",
        &p("h320.json"),
        "--out",
        &p("h320.safetensors"),
    ]);
    let model = common::model_path().to_string_lossy().into_owned();
    let create = |heads: &str, cfg: &str, out: &str| {
        illmrec_ok(&[
            "bundle",
            "create",
            "--out",
            &p(out),
            "--heads",
            &p(heads),
            "--heads-config",
            &p(cfg),
            "--items",
            &src("items.jsonl"),
            "--bank",
            &format!("img={}", src("img-src.bank")),
            "--bank",
            &format!("text={}", src("text-src.bank")),
            "--model",
            &model,
        ]);
    };
    create("h320.safetensors", "h320.json", "b320");
    let out = illmrec(&["recommend", "--bundle", &p("b320"), "--history", &ids(&[0])]);
    assert_clean_error(
        &out,
        "'rec_token' has shape [1, 320] but the model needs [1, 640]",
    );

    // Heads expecting 20-d text features, bundled with the 24-d bank.
    let cfg = common::heads_config(640).replace(r#""text": 24"#, r#""text": 20"#);
    std::fs::write(p("h20.json"), cfg).unwrap();
    illmrec_ok(&[
        "init-heads",
        "--config",
        &p("h20.json"),
        "--out",
        &p("h20.safetensors"),
    ]);
    create("h20.safetensors", "h20.json", "b20");
    let out = illmrec(&["recommend", "--bundle", &p("b20"), "--history", &ids(&[0])]);
    assert_clean_error(
        &out,
        "'f_i_text.mlp.0.weight' has shape [64, 20] but the text bank's features are 24-d",
    );
}

/// Scores by id from a `recommend --json` or a `score` output line.
fn scores_by_id(json: &serde_json::Value) -> std::collections::BTreeMap<u64, f64> {
    json["items"]
        .as_array()
        .unwrap()
        .iter()
        .map(|i| (i["id"].as_u64().unwrap(), i["score"].as_f64().unwrap()))
        .collect()
}

/// Candidates that overlap the history, at the start, in the middle and at the end: every kept
/// candidate carries the same score with and without `--include-seen`, in `recommend` and in
/// `score` (the bug this guards against paired filtered ids with unfiltered scores).
#[test]
fn candidate_scores_do_not_depend_on_excluded_candidates() {
    let history = ids(&[0, 1, 2]);
    let cases = [
        ids(&[0, 10, 1, 11]),      // seen at the start and in the middle
        ids(&[12, 13, 2]),         // seen at the end
        ids(&[14, 1, 15, 0, 16]),  // seen in the middle, twice
        ids(&[17, 17, 18, 2, 19]), // a duplicate and a seen one
    ];
    let bundle = bundle();
    for candidates in &cases {
        let run = |extra: &[&str]| -> serde_json::Value {
            let mut args = vec![
                "recommend",
                "--bundle",
                &bundle,
                "--history",
                &history,
                "--candidates",
                candidates,
                "--json",
            ];
            args.extend_from_slice(extra);
            serde_json::from_str(&illmrec_ok(&args)).unwrap()
        };
        let all = scores_by_id(&run(&["--include-seen"]));
        let unseen = scores_by_id(&run(&[]));
        let seen: Vec<u64> = history.split(',').map(|s| s.parse().unwrap()).collect();
        assert!(unseen.keys().all(|id| !seen.contains(id)));
        assert_eq!(
            unseen.len(),
            all.keys().filter(|id| !seen.contains(id)).count(),
            "{candidates}"
        );
        for (id, s) in &unseen {
            assert_eq!(all[id], *s, "item {id} of {candidates}: score changed");
        }
    }

    // The same through `score`, one line per case.
    let dir = &setup().0;
    let input = dir.join("overlap.jsonl");
    let text: String = cases
        .iter()
        .enumerate()
        .map(|(i, c)| {
            format!("{{\"user\": {i}, \"history\": [{history}], \"candidates\": [{c}]}}\n")
        })
        .collect();
    std::fs::write(&input, text).unwrap();
    let run = |extra: &[&str], name: &str| -> Vec<serde_json::Value> {
        let output = dir.join(name);
        let mut args = vec![
            "score".to_string(),
            "--bundle".into(),
            bundle.clone(),
            "--input".into(),
            input.to_string_lossy().into_owned(),
            "--output".into(),
            output.to_string_lossy().into_owned(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let args: Vec<&str> = args.iter().map(|s| s.as_str()).collect();
        illmrec_ok(&args);
        std::fs::read_to_string(&output)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let all = run(&["--include-seen"], "overlap-all.jsonl");
    let unseen = run(&[], "overlap-unseen.jsonl");
    assert_eq!(all.len(), cases.len());
    for (a, u) in all.iter().zip(&unseen) {
        let (a, u) = (scores_by_id(a), scores_by_id(u));
        assert!(!u.is_empty());
        for (id, s) in &u {
            assert_eq!(a[id], *s, "score line: item {id} changed");
        }
    }
}

/// The default build multiplies a prompt's large matrices with OpenBLAS, opened at run time with
/// kernels for this CPU; a missing library is a one-line error, not a crash inside ggml.
#[test]
fn the_default_build_uses_openblas_and_reports_a_missing_one() {
    if !illmrec::engine::blas::BUILT {
        return; // built with GGML_BLAS=OFF
    }
    let info = illmrec_ok(&["info"]);
    let line = info
        .lines()
        .find(|l| l.starts_with("blas: "))
        .unwrap_or_else(|| panic!("no blas line in {info}"));
    assert!(
        line.contains("OpenBLAS") && line.contains("kernels"),
        "{line}"
    );
    if illmrec::engine::blas::CpuLevel::detect().avx512 {
        assert!(
            line.contains("SkylakeX"),
            "AVX-512 CPU without AVX-512 kernels: {line}"
        );
    }
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_illmrec"))
        .args([
            "recommend",
            "--bundle",
            &bundle(),
            "--history",
            &ids(&[0, 1]),
        ])
        .env("ILLMREC_OPENBLAS", "/nonexistent/libopenblas.so.0")
        .output()
        .unwrap();
    assert_clean_error(&out, "ILLMREC_OPENBLAS=/nonexistent/libopenblas.so.0");
}
