//! `illmrec bench-models` on the shipped demo bundle with the real default model: the f32 model
//! (the bundle's) against a q8_0 copy made by `--quantize` into a temporary folder, on 2 tiny
//! users. Both rows are in the table, the reference agrees with itself exactly, the JSON, CSV and
//! plot are written, the copy is reused by a second run, and a command run on another model than
//! the manifest's says so once. No timing is asserted (figures are the benchmark's to report).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

fn demo_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle")
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

fn run(args: &[String]) -> (String, String) {
    let out = Command::new(common::BIN).args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(out.status.success(), "illmrec {args:?} failed: {stderr}");
    (String::from_utf8(out.stdout).unwrap(), stderr)
}

const MANIFEST_NOTE: &str = "not the model the bundle's manifest records";

#[test]
fn f32_against_a_quantized_copy_on_the_demo_bundle() {
    common::model_path();
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-models");
    let _ = std::fs::remove_dir_all(&dir);
    let (quant, out, cache) = (dir.join("quantized"), dir.join("out"), dir.join("cache"));
    let base: Vec<String> = [
        "bench-models",
        "--bundle",
        &s(&demo_bundle()),
        "--quantize",
        "q8_0",
        "--quantize-dir",
        &s(&quant),
        "--cache-dir",
        &s(&cache),
        "--threads",
        "2",
        "--warmup",
        "0",
    ]
    .map(String::from)
    .to_vec();
    let mut args = base.clone();
    args.extend(
        [
            "--users",
            "2",
            "--history-len",
            "3",
            "--pp",
            "16",
            "--out",
            &s(&out),
        ]
        .map(String::from),
    );
    let (stdout, stderr) = run(&args);

    // The markdown table: the machine and command above it, one row per model.
    assert!(
        stdout.contains("**Machine:**") && stdout.contains("kernels:"),
        "{stdout}"
    );
    assert!(
        stdout.contains("`illmrec bench-models --bundle"),
        "{stdout}"
    );
    let rows: Vec<&str> = stdout.lines().filter(|l| l.starts_with("| `")).collect();
    assert_eq!(rows.len(), 2, "{stdout}");
    assert!(
        rows[0].starts_with("| `gemma-3-270m-f32.gguf` (reference) | f32 |"),
        "{stdout}"
    );
    assert!(
        rows[1].starts_with("| `gemma-3-270m-f32.q8_0.gguf` ¹ | q8_0 |"),
        "{stdout}"
    );
    assert!(
        rows[0].ends_with("| 1.000 | 1.000 | 1.0000 |"),
        "{}",
        rows[0]
    );
    assert_eq!(
        stderr.matches(MANIFEST_NOTE).count(),
        1,
        "said once: {stderr}"
    );

    // JSON: the reference agrees with itself exactly; the copy is smaller and agrees in [0, 1].
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("bench-models.json")).unwrap())
            .unwrap();
    let r = &json["rows"];
    assert_eq!(r.as_array().unwrap().len(), 2);
    for key in ["top_k_overlap", "top1_agreement", "spearman"] {
        assert_eq!(r[0][key].as_f64(), Some(1.0), "{key}: {json}");
        let v = r[1][key].as_f64().unwrap();
        assert!((-1.0..=1.0).contains(&v), "{key} {v}");
    }
    assert_eq!(r[0]["time_vs_reference"].as_f64(), Some(1.0));
    assert_eq!(r[0]["reference"], true);
    assert_eq!(
        (&r[0]["manifest_model"], &r[1]["manifest_model"]),
        (&true.into(), &false.into())
    );
    assert!(r[1]["file_mib"].as_f64().unwrap() < r[0]["file_mib"].as_f64().unwrap() / 3.0);
    for row in r.as_array().unwrap() {
        assert_eq!(row["requests"], 2);
        assert!(row["ms_p50"].as_f64().unwrap() > 0.0);
        assert!(
            row["peak_rss_mib"].as_f64().unwrap() >= row["rss_after_load_mib"].as_f64().unwrap()
        );
        assert!(row["pp_positions_per_s"].as_f64().unwrap() > 0.0);
        assert!(row["hr5"].is_null(), "no dataset, no HR@5");
    }
    assert!(!json["machine"]["cpu"].as_str().unwrap().is_empty());
    assert_eq!(json["users"], 2);
    let csv = std::fs::read_to_string(out.join("bench-models.csv")).unwrap();
    assert_eq!(csv.lines().count(), 3, "{csv}");
    let png = std::fs::read(out.join("bench-models.png")).unwrap();
    assert!(png.starts_with(b"\x89PNG"));
    assert!(out.join("bench-models.md").is_file());
    let copy = quant.join("gemma-3-270m-f32.q8_0.gguf");
    assert!(copy.is_file() && quant.join("gemma-3-270m-f32.q8_0.gguf.source").is_file());

    // A second run reuses the copy (not re-made) and prints CSV.
    let made = std::fs::metadata(&copy).unwrap().modified().unwrap();
    let mut args = base.clone();
    args.extend(
        [
            "--users",
            "1",
            "--history-len",
            "1",
            "--pp",
            "0",
            "--format",
            "csv",
        ]
        .map(String::from),
    );
    let (stdout, stderr) = run(&args);
    assert!(stderr.contains("reused"), "{stderr}");
    assert_eq!(std::fs::metadata(&copy).unwrap().modified().unwrap(), made);
    assert_eq!(stdout.lines().count(), 3, "{stdout}");
    assert!(stdout.starts_with("model,path,type,"));

    // Any command on another model than the manifest's says so, once; on the manifest's, not.
    let recommend = |model: Option<&Path>| {
        let mut a: Vec<String> = [
            "recommend",
            "--bundle",
            &s(&demo_bundle()),
            "--history",
            "260,1198",
            "--top-k",
            "3",
            "--cache-dir",
            &s(&cache),
        ]
        .map(String::from)
        .to_vec();
        if let Some(m) = model {
            a.extend(["--model".to_string(), s(m)]);
        }
        run(&a).1
    };
    assert_eq!(recommend(Some(&copy)).matches(MANIFEST_NOTE).count(), 1);
    assert_eq!(recommend(None).matches(MANIFEST_NOTE).count(), 0);
    // The q8_0 copy is 278 MiB: leave nothing behind.
    std::fs::remove_dir_all(&dir).unwrap();
}
