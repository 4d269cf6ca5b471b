//! `illmrec bench --sweep` on the small test bundle (real default model): the Fig. 3 path runs
//! end to end and writes its four files with the expected rows; prompt positions grow with the
//! history length and order description > image token > title only; the engine-only row decodes
//! the image prompt's positions. No timing is asserted (figures are the benchmark's to report).

mod common;

use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// (work dir, bundle, dataset): the test bundle's items with a description each, and a dataset
/// of 3 test users whose histories hold only items with an image feature (every third item of
/// the test bundle has none).
fn setup() -> &'static (PathBuf, PathBuf, PathBuf) {
    static S: OnceLock<(PathBuf, PathBuf, PathBuf)> = OnceLock::new();
    S.get_or_init(build)
}

fn build() -> (PathBuf, PathBuf, PathBuf) {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join("bench-sweep");
    let _ = std::fs::remove_dir_all(&dir);
    let ids = common::build_bundle(&dir, 24);
    let items: String = std::fs::read_to_string(dir.join("items.jsonl"))
        .unwrap()
        .lines()
        .map(|l| {
            let mut v: serde_json::Value = serde_json::from_str(l).unwrap();
            v["description"] = format!(
                "{} is a film that a user of this test once watched on a long evening, and liked.",
                v["title"].as_str().unwrap()
            )
            .into();
            v.to_string() + "\n"
        })
        .collect();
    std::fs::write(dir.join("items.jsonl"), items).unwrap();
    let bundle = dir.join("bundle-described");
    let args = common::bundle_create_args(&dir, &bundle, &dir.join("heads-src.safetensors"), true);
    common::illmrec_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
    let with_image: Vec<u64> = ids
        .iter()
        .enumerate()
        .filter(|(i, _)| i % 3 != 2)
        .map(|(_, &id)| id)
        .collect();
    let dataset = dir.join("dataset");
    std::fs::create_dir_all(&dataset).unwrap();
    let mut cases = String::new();
    for u in 0..3usize {
        let history: Vec<u64> = (0..3).map(|k| with_image[u * 3 + k]).collect();
        let case = serde_json::json!({"user": u, "history": history, "target": ids[20], "negatives": [ids[21], ids[22]]});
        cases += &(case.to_string() + "\n");
    }
    std::fs::write(dataset.join("test.jsonl"), cases).unwrap();
    (dir.clone(), bundle, dataset)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

#[test]
fn sweep_writes_markdown_csv_json_and_png() {
    let (dir, bundle, dataset) = setup();
    let out = dir.join("fig3");
    let stdout = common::illmrec_ok(&[
        "bench",
        "--bundle",
        &s(bundle),
        "--dataset",
        &s(dataset),
        "--sweep",
        "2,1",
        "--users",
        "1",
        "--warmup",
        "1",
        "--threads",
        "2",
        "--out",
        &s(&out),
    ]);
    for f in ["fig3.md", "fig3.csv", "fig3.json", "fig3.png"] {
        assert!(out.join(f).is_file(), "{f} is missing");
    }
    let md = std::fs::read_to_string(out.join("fig3.md")).unwrap();
    assert_eq!(stdout, md, "stdout is the markdown table");
    assert_eq!(
        md.lines().count(),
        4,
        "header, rule and lengths 1 and 2:\n{md}"
    );
    assert!(md.lines().nth(2).unwrap().starts_with("| 1 | 1 |"));
    assert!(md.lines().nth(3).unwrap().starts_with("| 2 | 1 |"));

    let csv = std::fs::read_to_string(out.join("fig3.csv")).unwrap();
    let lines: Vec<Vec<String>> = csv
        .lines()
        .map(|l| l.split(',').map(str::to_string).collect())
        .collect();
    assert_eq!(
        lines[0].join(","),
        "length,style,users,mean_positions,mean_ms,p50_ms,p90_ms"
    );
    assert_eq!(lines.len(), 9, "4 styles × 2 lengths:\n{csv}");
    let keys: Vec<String> = lines[1..]
        .iter()
        .map(|l| format!("{}:{}", l[0], l[1]))
        .collect();
    assert_eq!(
        keys,
        [
            "1:image",
            "1:title",
            "1:description",
            "1:engine",
            "2:image",
            "2:title",
            "2:description",
            "2:engine"
        ]
    );
    for l in &lines[1..] {
        assert_eq!(l[2], "1", "one user per row");
        let ms: f64 = l[4].parse().unwrap();
        assert!(ms.is_finite() && ms > 0.0, "time {ms}");
    }

    let report: serde_json::Value =
        serde_json::from_slice(&std::fs::read(out.join("fig3.json")).unwrap()).unwrap();
    let rows = report["rows"].as_array().unwrap();
    assert_eq!(rows.len(), 8);
    let pos = |length: u64, style: &str| {
        rows.iter()
            .find(|r| r["length"] == length && r["style"] == style)
            .unwrap_or_else(|| panic!("no row {length} {style}"))["mean_positions"]
            .as_f64()
            .unwrap()
    };
    for l in [1, 2] {
        assert!(
            pos(l, "description") > pos(l, "image") && pos(l, "image") > pos(l, "title"),
            "length {l}: description {} image {} title {}",
            pos(l, "description"),
            pos(l, "image"),
            pos(l, "title")
        );
        assert_eq!(
            pos(l, "engine"),
            pos(l, "image"),
            "the engine row decodes the image prompt"
        );
    }
    for style in ["image", "title", "description"] {
        assert!(
            pos(2, style) > pos(1, style),
            "{style}: positions grow with length"
        );
    }
    let ratios = report["ratios"].as_array().unwrap();
    assert_eq!(ratios.len(), 2);
    assert!(ratios.iter().all(|r| r["ratio"].as_f64().unwrap() > 0.0));
    let machine = &report["machine"];
    assert_eq!(machine["threads"], 2);
    assert!(!machine["cpu"].as_str().unwrap().is_empty());
    assert!(machine["model"].as_str().unwrap().ends_with(".gguf"));
    assert_eq!(report["plan"]["lengths"], serde_json::json!([1, 2]));

    let png = image::open(out.join("fig3.png")).unwrap().to_rgb8();
    assert_eq!(png.dimensions(), (1200, 480));
    assert!(
        png.pixels().filter(|p| p.0 == [31, 119, 180]).count() > 50,
        "the image-token line is drawn"
    );
}

#[test]
fn sweep_refuses_lengths_no_history_has_and_prompts_that_do_not_fit() {
    let (dir, bundle, dataset) = setup();
    let out = s(&dir.join("fig3-refused"));
    let base = [
        "bench",
        "--bundle",
        &s(bundle),
        "--dataset",
        &s(dataset),
        "--users",
        "1",
        "--warmup",
        "0",
        "--threads",
        "2",
        "--out",
        &out,
    ];
    let run = |extra: &[&str]| common::illmrec(&[&base[..], extra].concat());
    common::assert_clean_error(&run(&["--sweep", "1,4"]), "no history has 4 items");
    common::assert_clean_error(&run(&["--sweep", "0,1"]), "at least 1 item");
    // 200 positions hold the image prompt of 3 items (131) but not the description one (204):
    // the sweep refuses instead of timing a truncated prompt.
    common::assert_clean_error(
        &run(&["--sweep", "3", "--ctx", "200"]),
        "the description prompt of 3 items does not fit the context of 200 positions",
    );
    common::assert_clean_error(&run(&["--sweep", "3", "--ctx", "80"]), "does not fit");
    assert!(
        !dir.join("fig3-refused").exists(),
        "nothing written on failure"
    );
    let out = common::illmrec(&["bench", "--bundle", "x", "--dataset", "y", "--sweep", "1"]);
    assert_eq!(out.status.code(), Some(2), "--sweep needs --out");
}
