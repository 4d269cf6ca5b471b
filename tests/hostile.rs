//! Bad files, bad input and bad outputs, as a hostile user would try them (issue 12): every case
//! ends in one clean `error:` line (or works), never a wrong answer, a hang, a panic or a
//! replaced file that is not ours.

mod common;

use common::{assert_clean_error, illmrec, s};
use illmrec::method::heads::{encode_safetensors, random_tensors, HeadsConfig, WeightDtype};
use sha2::{Digest, Sha256};
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// (work dir, bundle dir, item ids), built once per test run.
fn setup() -> &'static (PathBuf, PathBuf, Vec<u64>) {
    static S: OnceLock<(PathBuf, PathBuf, Vec<u64>)> = OnceLock::new();
    S.get_or_init(|| common::fresh_bundle("hostile-test"))
}

fn history() -> String {
    let ids = &setup().2;
    format!("{},{},{}", ids[0], ids[1], ids[2])
}

/// `info` and `recommend` with `--model MODEL`: the two ways a bad model file reaches the runtime.
fn model_commands(model: &Path) -> [Vec<String>; 2] {
    let m = s(model);
    [
        vec!["info".into(), "--model".into(), m.clone()],
        vec![
            "recommend".into(),
            "--bundle".into(),
            s(&setup().1),
            "--history".into(),
            history(),
            "--model".into(),
            m,
        ],
    ]
}

/// A copy of the test bundle to damage (beside it, so the model path stays valid).
fn bundle_copy(name: &str) -> PathBuf {
    common::copy_bundle(&setup().1, &setup().0.join(name))
}

/// Replaces a bundle file and records its new size and sha256 in the manifest, so that only the
/// check under test can catch it.
fn replace_listed(bundle: &Path, name: &str, bytes: &[u8]) {
    std::fs::write(bundle.join(name), bytes).unwrap();
    let path = bundle.join("manifest.json");
    let mut m: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
    for f in m["files"].as_array_mut().unwrap() {
        if f["path"] == name {
            f["size"] = bytes.len().into();
            f["sha256"] = illmrec::store::fsutil::hex(&Sha256::digest(bytes)).into();
        }
    }
    std::fs::write(&path, serde_json::to_string_pretty(&m).unwrap()).unwrap();
}

fn recommend(bundle: &Path, extra: &[&str]) -> Output {
    let b = s(bundle);
    let h = history();
    let mut args = vec![
        "recommend",
        "--bundle",
        &b,
        "--history",
        &h,
        "--json",
        "--threads",
        "1",
    ];
    args.extend_from_slice(extra);
    illmrec(&args)
}

fn json_of(out: &Output) -> serde_json::Value {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice(&out.stdout).unwrap()
}

/// Runs the CLI but fails the test (instead of hanging it) when it takes over `limit`.
fn illmrec_within(args: &[&str], limit: Duration) -> Output {
    let mut child = Command::new(common::BIN)
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let started = Instant::now();
    while child.try_wait().unwrap().is_none() {
        if started.elapsed() > limit {
            child.kill().unwrap();
            panic!("illmrec {args:?} hangs (killed after {limit:?})");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

fn heads_config() -> HeadsConfig {
    HeadsConfig::parse(&std::fs::read(setup().0.join("heads-config.json")).unwrap()).unwrap()
}

/// The test bundle's heads (seed 7, f16) with one value replaced.
fn heads_with(tensor: &str, index: usize, value: f32) -> Vec<u8> {
    let mut tensors = random_tensors(&heads_config(), 7).unwrap();
    let t = tensors.iter_mut().find(|t| t.0 == tensor).unwrap();
    t.2[index] = value;
    encode_safetensors(&tensors, WeightDtype::F16).unwrap()
}

#[cfg(unix)]
fn mkfifo(path: &Path) {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes()).unwrap();
    // SAFETY: a valid C string.
    assert_eq!(unsafe { libc::mkfifo(c.as_ptr(), 0o600) }, 0);
}

#[test]
fn non_finite_weights_are_refused_naming_the_tensor() {
    // The same heads as the bundle's, rebuilt: nothing changes until a value does.
    let copy = bundle_copy("nan-heads");
    replace_listed(
        &copy,
        "heads.safetensors",
        &heads_with("rec_token", 0, 0.125),
    );
    json_of(&recommend(&copy, &[]));
    for (tensor, value) in [
        ("f_i_img.mlp.3.weight", f32::NAN),
        ("f_u_text.mlp.0.bias", f32::INFINITY),
        ("adaptor.layernorm.weight", f32::NEG_INFINITY),
    ] {
        replace_listed(&copy, "heads.safetensors", &heads_with(tensor, 3, value));
        assert_clean_error(&recommend(&copy, &[]), &format!("tensor '{tensor}'"));
    }
    // `bundle create` checks the heads too.
    let bad = setup().0.join("nan.safetensors");
    std::fs::write(&bad, heads_with("f_i_img.mlp.3.weight", 0, f32::NAN)).unwrap();
    let out = illmrec(&[
        "bundle",
        "create",
        "--out",
        &s(&setup().0.join("nan-bundle")),
        "--heads",
        &s(&bad),
        "--heads-config",
        &s(&setup().0.join("heads-config.json")),
        "--items",
        &s(&setup().0.join("items.jsonl")),
        "--model",
        &s(&common::model_path()),
    ]);
    assert_clean_error(&out, "non-finite value");
}

#[test]
fn a_changed_byte_in_any_bundle_file_is_caught_at_open() {
    let copy = bundle_copy("flipped");
    let cache = copy.join("cache");
    // A first run builds the item-vector cache.
    let before = json_of(&recommend(&copy, &[]));
    assert!(common::item_vector_files(&cache).len() == 1);
    for (name, at) in [
        ("heads.safetensors", 0.6),
        ("heads.json", 0.5),
        ("items.jsonl", 0.5),
        ("img.bank", 0.9),
        ("text.bank", 0.3),
    ] {
        let p = copy.join(name);
        let original = std::fs::read(&p).unwrap();
        let mut bytes = original.clone();
        let i = (bytes.len() as f64 * at) as usize;
        bytes[i] ^= 0x04;
        std::fs::write(&p, &bytes).unwrap();
        assert_clean_error(&recommend(&copy, &[]), "does not match its sha256");
        std::fs::write(&p, original).unwrap();
    }
    assert_eq!(json_of(&recommend(&copy, &[])), before);
}

#[test]
fn a_damaged_item_vector_cache_is_rebuilt_not_used() {
    let copy = bundle_copy("cache-damage");
    let before = json_of(&recommend(&copy, &[]));
    let cache_dir = copy.join("cache");
    let file = common::item_vector_files(&cache_dir).remove(0);
    let n = setup().2.len();
    // A vector value, then a presence byte (item 0's image).
    for at in [
        std::fs::metadata(&file).unwrap().len() as usize - 40,
        128 + 8 * n,
    ] {
        let mut bytes = std::fs::read(&file).unwrap();
        bytes[at] ^= 0x01;
        std::fs::write(&file, &bytes).unwrap();
        let out = recommend(&copy, &[]);
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains("is damaged"), "{stderr}");
        assert_eq!(json_of(&out), before, "the damaged cache was used");
        assert!(String::from_utf8_lossy(&recommend(&copy, &[]).stderr)
            .lines()
            .all(|l| !l.contains("damaged")));
    }
    // Other heads: another cache file (the key covers what the vectors derive from).
    replace_listed(&copy, "heads.safetensors", &heads_with("rec_token", 0, 0.5));
    json_of(&recommend(&copy, &[]));
    assert_eq!(common::item_vector_files(&cache_dir).len(), 2);
}

#[test]
fn heads_config_values_out_of_range_are_refused() {
    let copy = bundle_copy("bad-config");
    let base: serde_json::Value =
        serde_json::from_slice(&std::fs::read(copy.join("heads.json")).unwrap()).unwrap();
    for (key, value) in [
        ("head_ln_eps", serde_json::json!(-1.0)),
        ("head_ln_eps", serde_json::json!(0.0)),
        ("head_ln_eps", serde_json::json!(1e300)),
        ("adaptor_ln_eps", serde_json::json!(1e300)),
        ("adaptor_ln_eps", serde_json::json!(0.5)),
        ("hidden_dim", serde_json::json!(0)),
        ("proj_dim", serde_json::json!(1_000_000_000)),
    ] {
        let mut cfg = base.clone();
        cfg[key] = value;
        replace_listed(&copy, "heads.json", &serde_json::to_vec(&cfg).unwrap());
        assert_clean_error(&recommend(&copy, &[]), key);
    }
}

#[test]
fn empty_candidates_are_an_error() {
    assert_clean_error(
        &recommend(&setup().1, &["--candidates", ""]),
        "--candidates is empty",
    );
    assert_clean_error(
        &recommend(&setup().1, &["--candidates", " , "]),
        "--candidates is empty",
    );
}

#[test]
fn bounds_on_threads_and_context() {
    let b = s(&setup().1);
    let h = history();
    for t in ["0", "-3", "100000"] {
        let threads = format!("--threads={t}");
        let out = illmrec(&["recommend", "--bundle", &b, "--history", &h, &threads]);
        assert_clean_error(&out, &format!("--threads {t} is out of range"));
    }
    let out = illmrec_within(
        &[
            "recommend",
            "--bundle",
            &b,
            "--history",
            &h,
            "--ctx",
            "1000000000",
        ],
        Duration::from_secs(60),
    );
    assert_clean_error(&out, "larger than the model's training context (32768");
    assert_clean_error(
        &recommend(&setup().1, &["--ctx", "8"]),
        "--ctx 8 is too small",
    );
}

#[cfg(unix)]
#[test]
fn inputs_that_are_not_regular_files_are_refused() {
    let dir = setup().0.join("special-inputs");
    std::fs::create_dir_all(&dir).unwrap();
    let fifo = dir.join("model.fifo");
    let _ = std::fs::remove_file(&fifo);
    mkfifo(&fifo);
    let limit = Duration::from_secs(60);
    for args in model_commands(&fifo) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&illmrec_within(&args, limit), &s(&fifo));
    }
    let (b, h) = (s(&setup().1), history());
    let out = illmrec_within(
        &[
            "recommend",
            "--bundle",
            &b,
            "--history",
            &h,
            "--model",
            &s(&dir),
        ],
        limit,
    );
    assert_clean_error(&out, &format!("{} is a directory", s(&dir)));
    let out = illmrec_within(
        &[
            "score",
            "--bundle",
            &b,
            "--input",
            &s(&fifo),
            "--output",
            &s(&dir.join("o")),
        ],
        limit,
    );
    assert_clean_error(&out, "not a regular file");
    // A bundle file swapped for a FIFO.
    let copy = bundle_copy("fifo-bundle");
    std::fs::remove_file(copy.join("heads.json")).unwrap();
    mkfifo(&copy.join("heads.json"));
    let out = illmrec_within(
        &["recommend", "--bundle", &s(&copy), "--history", &h],
        limit,
    );
    assert_clean_error(&out, "heads.json");
}

#[cfg(unix)]
#[test]
fn outputs_that_are_not_ours_are_written_through_not_replaced() {
    use std::os::unix::fs::FileTypeExt;
    let dir = setup().0.join("special-outputs");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("users.jsonl");
    std::fs::write(
        &input,
        format!("{{\"user\": 1, \"history\": [{}]}}\n", history()),
    )
    .unwrap();
    let b = s(&setup().1);
    let score = |output: &Path| {
        illmrec_within(
            &[
                "score",
                "--bundle",
                &b,
                "--input",
                &s(&input),
                "--output",
                &s(output),
                "--threads",
                "1",
            ],
            Duration::from_secs(120),
        )
    };
    // A FIFO gets the lines and stays a FIFO.
    let fifo = dir.join("out.fifo");
    mkfifo(&fifo);
    let reader = {
        let fifo = fifo.clone();
        std::thread::spawn(move || std::fs::read_to_string(fifo).unwrap())
    };
    let out = score(&fifo);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(reader.join().unwrap().contains("\"user\":1"));
    assert!(std::fs::symlink_metadata(&fifo)
        .unwrap()
        .file_type()
        .is_fifo());
    // A symlink stays a symlink; its target gets the output.
    let target = dir.join("target.jsonl");
    std::fs::write(&target, "old\n").unwrap();
    let link = dir.join("link.jsonl");
    std::os::unix::fs::symlink("target.jsonl", &link).unwrap();
    assert!(score(&link).status.success());
    assert!(std::fs::symlink_metadata(&link)
        .unwrap()
        .file_type()
        .is_symlink());
    assert!(std::fs::read_to_string(&target)
        .unwrap()
        .contains("\"user\":1"));
    // A folder is refused; nothing is left beside it.
    assert_clean_error(&score(&dir), "is a directory");
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
    // A missing folder is named.
    assert_clean_error(&score(&dir.join("nope/out.jsonl")), "does not exist");
}

#[test]
fn score_skips_a_non_utf8_line_with_its_number() {
    let dir = setup().0.join("non-utf8");
    std::fs::create_dir_all(&dir).unwrap();
    let input = dir.join("users.jsonl");
    let good = format!("{{\"user\": 1, \"history\": [{}]}}\n", history());
    let mut bytes = good.clone().into_bytes();
    bytes.extend_from_slice(b"{\"user\": \"\xff\xfe\", \"history\": [1]}\n");
    bytes.extend_from_slice(good.replace("1,", "2,").as_bytes());
    std::fs::write(&input, bytes).unwrap();
    let output = dir.join("out.jsonl");
    let out = illmrec(&[
        "score",
        "--bundle",
        &s(&setup().1),
        "--input",
        &s(&input),
        "--output",
        &s(&output),
        "--threads",
        "1",
    ]);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    assert!(
        stderr.contains("users.jsonl:2: malformed line") && stderr.contains("UTF-8"),
        "{stderr}"
    );
    assert!(
        stderr.contains("scored 2 users; 1 lines could not be scored (1 malformed)"),
        "{stderr}"
    );
    assert_eq!(std::fs::read_to_string(&output).unwrap().lines().count(), 3);
}

#[cfg(unix)]
#[test]
fn a_closed_pipe_ends_output_quietly() {
    use std::io::BufRead;
    let mut child = Command::new(common::BIN)
        .args(["bank", "inspect", &s(&setup().1.join("img.bank"))])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    std::io::BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    // The reader is gone: the rest of the output goes into a closed pipe.
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(first.starts_with("file"), "{first}");
    assert!(!stderr.contains("panicked"), "{stderr}");
    use std::os::unix::process::ExitStatusExt;
    assert!(
        out.status.success() || out.status.signal() == Some(libc::SIGPIPE),
        "{:?}",
        out.status
    );
}

#[test]
fn llama_log_stays_quiet_before_the_error_line() {
    let dir = setup().0.join("truncated-gguf");
    std::fs::create_dir_all(&dir).unwrap();
    let trunc = dir.join("model.gguf");
    let bytes = std::fs::read(common::model_path()).unwrap();
    std::fs::write(&trunc, &bytes[..4096]).unwrap();
    for args in model_commands(&trunc) {
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = illmrec(&args);
        assert_clean_error(&out, "not a readable GGUF file");
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(stderr.lines().count(), 1, "{stderr}");
    }
}

#[test]
fn quantize_into_a_missing_folder_says_so() {
    let out = illmrec(&[
        "quantize",
        &s(&common::model_path()),
        &s(&setup().0.join("no-such-folder/out.gguf")),
        "--type",
        "q8_0",
    ]);
    assert_clean_error(&out, "no-such-folder does not exist");
}

#[test]
fn bundle_create_never_replaces_what_is_not_a_bundle() {
    let src = &setup().0;
    let create = |out: &Path| {
        let args = common::bundle_create_args(src, out, &src.join("heads-src.safetensors"), false);
        illmrec(&args.iter().map(String::as_str).collect::<Vec<_>>())
    };
    let dir = src.join("not-bundles");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(dir.join("home/photos")).unwrap();
    std::fs::write(dir.join("home/photos/a.jpg"), "x").unwrap();
    assert_clean_error(&create(&dir.join("home")), "refusing to replace it");
    assert!(dir.join("home/photos/a.jpg").exists());
    std::fs::write(dir.join("file"), "mine").unwrap();
    assert_clean_error(&create(&dir.join("file")), "is not a folder");
    assert_eq!(std::fs::read_to_string(dir.join("file")).unwrap(), "mine");
    // A folder of plain files (a model the bundle will point to) becomes the bundle, keeping them.
    std::fs::create_dir_all(dir.join("fresh")).unwrap();
    std::fs::write(dir.join("fresh/NOTES.txt"), "kept").unwrap();
    let out = create(&dir.join("fresh"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("fresh/NOTES.txt")).unwrap(),
        "kept"
    );
    illmrec::bundle::Bundle::open(&dir.join("fresh")).unwrap();
    let names: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains(".tmp-")), "{names:?}");
}
