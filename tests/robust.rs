//! Issue 27 (items 1, 2, 3, 5) and issue 28 §3: writes never follow a symbolic link out of the
//! runtime's folders; concurrent writers of one bundle queue on its lock and all land; an output
//! that is the input is refused; silently meaningless answers are said; `score` keeps a record
//! for every line, counts its kinds of errors and stops past `--max-errors`; `--resume` on a
//! finished output says so.

mod common;

use common::{assert_clean_error, illmrec, illmrec_ok, s, shared_data};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

fn demo_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle")
}

fn work(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("robust")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the demo bundle's files (not its cache) in `dir/bundle`.
fn demo_copy(dir: &Path) -> PathBuf {
    common::copy_bundle(&demo_bundle(), &dir.join("bundle"))
}

/// The demo bundle's sample history.
fn history() -> String {
    std::fs::read_to_string(demo_bundle().join("sample-history.txt"))
        .unwrap()
        .trim()
        .to_string()
}

fn recommend(bundle: &Path, extra: &[&str]) -> std::process::Output {
    let b = s(bundle);
    let h = history();
    let mut args = vec![
        "recommend",
        "--bundle",
        &b,
        "--history",
        &h,
        "--top-k",
        "5",
        "--threads",
        "2",
    ];
    args.extend_from_slice(extra);
    illmrec(&args)
}

fn ok(out: &std::process::Output) -> String {
    assert!(
        out.status.success(),
        "failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stderr).into_owned()
}

#[cfg(unix)]
#[test]
fn writes_never_follow_symlinks_out_of_the_bundle() {
    use std::os::unix::fs::symlink;
    let dir = work("symlinks");
    let bundle = demo_copy(&dir);
    let outside = dir.join("outside");
    std::fs::create_dir_all(&outside).unwrap();
    let victim = outside.join("victim.txt");
    std::fs::write(&victim, "precious").unwrap();
    // Old enough for verified-file stamps to be recorded (see store::verified::RACY_SECS).
    std::thread::sleep(std::time::Duration::from_millis(2500));

    // 1. A link named like the item-vector cache: replaced by the cache, the target untouched.
    ok(&recommend(&bundle, &[]));
    let cache_dir = bundle.join("cache");
    let cache = common::item_vector_files(&cache_dir);
    assert_eq!(cache.len(), 1, "{cache:?}");
    std::fs::remove_file(&cache[0]).unwrap();
    symlink(&victim, &cache[0]).unwrap();
    let stderr = ok(&recommend(&bundle, &[]));
    assert_eq!(std::fs::read_to_string(&victim).unwrap(), "precious");
    assert!(
        std::fs::symlink_metadata(&cache[0]).unwrap().is_file(),
        "the link was not replaced by a file"
    );
    assert!(stderr.contains("symbolic link"), "not said: {stderr}");

    // 2. Links named like verified-file stamps: removed and said, never written through.
    let stamps: Vec<PathBuf> = std::fs::read_dir(&cache_dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| s(p).contains("verified-"))
        .collect();
    assert!(!stamps.is_empty(), "no stamps were written");
    for (k, p) in stamps.iter().enumerate() {
        let target = outside.join(format!("stamp-{k}.txt"));
        std::fs::write(&target, "mine").unwrap();
        std::fs::remove_file(p).unwrap();
        symlink(&target, p).unwrap();
    }
    let stderr = ok(&recommend(&bundle, &[]));
    for k in 0..stamps.len() {
        assert_eq!(
            std::fs::read_to_string(outside.join(format!("stamp-{k}.txt"))).unwrap(),
            "mine"
        );
    }
    assert!(stderr.contains("verified-"), "not said: {stderr}");
    for p in &stamps {
        assert!(!std::fs::symlink_metadata(p).is_ok_and(|m| m.file_type().is_symlink()));
    }

    // 3. A cache folder that is a link: nothing is written where it points; the answer still
    //    comes, with a warning naming the folder.
    let elsewhere = outside.join("cache-target");
    std::fs::create_dir_all(&elsewhere).unwrap();
    std::fs::remove_dir_all(&cache_dir).unwrap();
    symlink(&elsewhere, &cache_dir).unwrap();
    let stderr = ok(&recommend(&bundle, &[]));
    assert_eq!(
        std::fs::read_dir(&elsewhere).unwrap().count(),
        0,
        "written through the cache link"
    );
    assert!(
        stderr.contains("cache") && stderr.contains("symbolic link"),
        "{stderr}"
    );

    // 4. An item edit on that bundle gives it a cache folder of its own, the target untouched.
    let out = illmrec(&[
        "items",
        "remove",
        "--bundle",
        &s(&bundle),
        "--id",
        history().split(',').next().unwrap().trim(),
    ]);
    ok(&out);
    assert_eq!(std::fs::read_dir(&elsewhere).unwrap().count(), 0);
    assert!(std::fs::symlink_metadata(&cache_dir).unwrap().is_dir());
    illmrec_ok(&["bundle", "verify", &s(&bundle)]);
}

#[test]
fn concurrent_item_adds_both_land() {
    let dir = work("concurrent");
    let bundle = demo_copy(&dir);
    let posters = shared_data().join("ml-latest-small-posters/posters");
    // Two movies with posters that are not in the demo catalog.
    let catalog = std::fs::read_to_string(bundle.join("items.jsonl")).unwrap();
    let known: std::collections::HashSet<u64> = catalog
        .lines()
        .map(|l| {
            serde_json::from_str::<serde_json::Value>(l).unwrap()["id"]
                .as_u64()
                .unwrap()
        })
        .collect();
    let new: Vec<u64> = [62211u64, 10001, 10002, 10003, 10005, 10008]
        .into_iter()
        .filter(|id| !known.contains(id) && posters.join(format!("{id}.jpg")).exists())
        .take(2)
        .collect();
    assert_eq!(new.len(), 2);
    for round in 0..2 {
        let children: Vec<_> = new
            .iter()
            .map(|id| {
                let verb = if round == 0 { "add" } else { "remove" };
                let mut c = Command::new(common::BIN);
                c.args([
                    "items",
                    verb,
                    "--bundle",
                    &s(&bundle),
                    "--id",
                    &id.to_string(),
                ]);
                if round == 0 {
                    c.args([
                        "--title",
                        &format!("New movie {id} (2020)"),
                        "--image",
                        &s(&posters.join(format!("{id}.jpg"))),
                    ]);
                }
                c.stdout(Stdio::piped())
                    .stderr(Stdio::piped())
                    .spawn()
                    .unwrap()
            })
            .collect();
        for c in children {
            let out = c.wait_with_output().unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let text = std::fs::read_to_string(bundle.join("items.jsonl")).unwrap();
        for id in &new {
            let present = text.contains(&format!("{{\"id\":{id},"));
            assert_eq!(present, round == 0, "round {round}: item {id} lost");
        }
        illmrec_ok(&["bundle", "verify", &s(&bundle)]);
    }
}

#[test]
fn an_output_that_is_the_input_is_refused() {
    let dir = work("same-file");
    let input = dir.join("users.jsonl");
    let text = format!("{{\"user\": 1, \"history\": [{}]}}\n", history());
    std::fs::write(&input, &text).unwrap();
    let link = dir.join("link.jsonl");
    let hard = dir.join("hard.jsonl");
    #[cfg(unix)]
    std::os::unix::fs::symlink(&input, &link).unwrap();
    std::fs::hard_link(&input, &hard).unwrap();
    let b = s(&demo_bundle());
    for out in [&input, &link, &hard] {
        for command in ["score", "embed"] {
            let o = illmrec(&[
                command,
                "--bundle",
                &b,
                "--input",
                &s(&input),
                "--output",
                &s(out),
            ]);
            assert_clean_error(&o, "is the input");
        }
        assert_eq!(std::fs::read_to_string(&input).unwrap(), text);
    }
    // bank build: the ids file as the output.
    let ids = dir.join("ids.txt");
    std::fs::write(&ids, "1\n").unwrap();
    let o = illmrec(&[
        "bank",
        "build",
        "--npy",
        &s(&dir.join("x.npy")),
        "--ids",
        &s(&ids),
        "--modality",
        "img",
        "--out",
        &s(&ids),
    ]);
    assert_clean_error(&o, "is the input");
    assert_eq!(std::fs::read_to_string(&ids).unwrap(), "1\n");
}

/// Replaces bundle files and records their new sizes and sha256 in the manifest.
fn replace_listed(bundle: &Path, files: &[(&str, Vec<u8>)]) {
    use sha2::Digest;
    let path = bundle.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for (name, bytes) in files {
        std::fs::write(bundle.join(name), bytes).unwrap();
        for f in m["files"].as_array_mut().unwrap() {
            if f["path"] == *name {
                f["size"] = bytes.len().into();
                f["sha256"] = illmrec::store::fsutil::hex(&sha2::Sha256::digest(bytes)).into();
            }
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

/// Heads for the demo bundle's config edited by `config`, with random weights edited by `weights`.
fn new_heads(
    bundle: &Path,
    config: impl FnOnce(&mut serde_json::Value),
    weights: impl FnOnce(&mut Vec<(String, Vec<usize>, Vec<f32>)>),
) {
    use illmrec::method::heads::{encode_safetensors, random_tensors, HeadsConfig, WeightDtype};
    let mut cfg: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(bundle.join("heads.json")).unwrap()).unwrap();
    config(&mut cfg);
    let cfg_bytes = serde_json::to_vec_pretty(&cfg).unwrap();
    let parsed = HeadsConfig::parse(&cfg_bytes).unwrap();
    let mut tensors = random_tensors(&parsed, 3).unwrap();
    weights(&mut tensors);
    let heads = encode_safetensors(&tensors, WeightDtype::F16).unwrap();
    replace_listed(
        bundle,
        &[("heads.json", cfg_bytes), ("heads.safetensors", heads)],
    );
}

#[test]
fn meaningless_answers_are_said() {
    let dir = work("meaningless");
    let h = history();
    let seen: Vec<&str> = h.split(',').collect();
    // Only seen items as candidates: an error naming why, not an empty table.
    let o = recommend(&demo_bundle(), &["--candidates", &seen[..2].join(",")]);
    assert_clean_error(&o, "every candidate is in the history");

    // A bank the heads do not score: said, naming the bank.
    let bundle = demo_copy(&dir.join("unscored"));
    new_heads(
        &bundle,
        |c| {
            c["item_dims"].as_object_mut().unwrap().remove("cf");
        },
        |_| {},
    );
    let stderr = ok(&recommend(&bundle, &[]));
    assert!(
        stderr.contains("cf bank") && stderr.contains("cf.bank") && stderr.contains("item_dims"),
        "{stderr}"
    );

    // User heads of all zeros: an error naming the heads file, not a ranking of zeros.
    let bundle = demo_copy(&dir.join("zeros"));
    new_heads(
        &bundle,
        |_| {},
        |t| {
            for (name, _, values) in t.iter_mut() {
                if name.starts_with("f_u_") {
                    values.iter_mut().for_each(|v| *v = 0.0);
                }
            }
        },
    );
    let o = recommend(&bundle, &[]);
    assert_clean_error(&o, "all-zero user vector");
    assert!(String::from_utf8_lossy(&o.stderr).contains("heads.safetensors"));
}

#[test]
fn score_keeps_a_record_for_every_line_and_stops_past_max_errors() {
    let dir = work("score");
    let b = s(&demo_bundle());
    let h = history();
    let good = format!("{{\"user\": \"a\", \"history\": [{h}], \"top_k\": 3}}");
    let lines = [
        good.clone(),
        "{not json".to_string(),
        "{\"user\": \"b\", \"history\": [999999999]}".to_string(),
        "{\"user\": \"c\", \"history\": []}".to_string(),
        good.replace("\"a\"", "\"d\""),
    ];
    let input = dir.join("users.jsonl");
    std::fs::write(&input, lines.join("\n") + "\n").unwrap();
    let output = dir.join("out.jsonl");
    let score = |extra: &[&str]| {
        let (i, o) = (s(&input), s(&output));
        let mut args = vec![
            "score",
            "--bundle",
            &b,
            "--input",
            &i,
            "--output",
            &o,
            "--threads",
            "2",
        ];
        args.extend_from_slice(extra);
        illmrec(&args)
    };
    let o = score(&[]);
    let stderr = ok(&o);
    let records: Vec<serde_json::Value> = std::fs::read_to_string(&output)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(records.len(), 5, "one record per line");
    assert_eq!(records[1]["line"], 2);
    assert!(records[1]["error"]
        .as_str()
        .unwrap()
        .contains("not a valid user line"));
    assert_eq!(records[2]["line"], 3);
    assert!(records[2]["error"]
        .as_str()
        .unwrap()
        .contains("item 999999999 is not in the catalog"));
    assert_eq!(records[3]["line"], 4);
    assert!(
        stderr.contains("1 malformed, 1 with an unknown item, 1 invalid"),
        "{stderr}"
    );
    // The same field names as `recommend --json`.
    let rec: serde_json::Value = serde_json::from_str(&illmrec_ok(&[
        "recommend",
        "--bundle",
        &b,
        "--history",
        &h,
        "--top-k",
        "3",
        "--json",
        "--threads",
        "2",
    ]))
    .unwrap();
    assert_eq!(records[0]["history_used"], rec["history_used"]);
    let keys = |v: &serde_json::Value| -> Vec<String> {
        let mut k: Vec<String> = v.as_object().unwrap().keys().cloned().collect();
        k.sort();
        k
    };
    assert_eq!(keys(&records[0]["items"][0]), keys(&rec["items"][0]));
    for k in ["rank", "id", "score", "title", "year", "genres"] {
        assert!(records[0]["items"][0].get(k).is_some(), "no {k}");
    }
    assert_eq!(records[0]["items"][0]["id"], rec["items"][0]["id"]);

    // --resume on the finished output says so and leaves it.
    let before = std::fs::read(&output).unwrap();
    let stderr = ok(&score(&["--resume"]));
    assert!(stderr.contains("is complete"), "{stderr}");
    assert!(!stderr.contains("scored"), "re-scored: {stderr}");
    assert_eq!(std::fs::read(&output).unwrap(), before);

    // Past --max-errors: a non-zero exit; within it, success.
    assert_clean_error(&score(&["--max-errors", "2"]), "--max-errors 2");
    ok(&score(&["--max-errors", "3"]));

    // embed shares the policy: the bad lines get NaN rows, the run goes on, or stops past N.
    let npy = dir.join("states.npy");
    let embed = |extra: &[&str]| {
        let (i, o) = (s(&input), s(&npy));
        let mut args = vec![
            "embed",
            "--bundle",
            &b,
            "--input",
            &i,
            "--output",
            &o,
            "--threads",
            "2",
            "--restart",
        ];
        args.extend_from_slice(extra);
        illmrec(&args)
    };
    let stderr = ok(&embed(&[]));
    assert!(stderr.contains("unknown item"), "{stderr}");
    let m = illmrec::store::npy::NpyArray::read(&npy).unwrap();
    assert_eq!(m.shape[0], 5);
    assert_clean_error(&embed(&["--max-errors", "1"]), "--max-errors 1");
}
