//! The runtime's image encoder through the CLI: `encode-images`, `bank build --images` (rows
//! identical to the Python-made demo bank), `items add|replace|remove` on a copy of the demo
//! bundle (atomic, cache extended, hashes updated, a kill leaves the old bundle or the new one),
//! and bad image files.

mod common;

use common::{assert_clean_error, illmrec, illmrec_ok, s, shared_data};
use illmrec::bundle::Bundle;
use illmrec::store::bank::Bank;
use std::path::{Path, PathBuf};

fn demo_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle")
}

fn posters() -> PathBuf {
    shared_data().join("ml-latest-small-posters/posters")
}

fn work(name: &str) -> PathBuf {
    let dir = PathBuf::from(env!("CARGO_TARGET_TMPDIR"))
        .join("images")
        .join(name);
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

/// A copy of the demo bundle's files (the model is the default one, so no path to keep valid).
fn demo_copy(dir: &Path) -> PathBuf {
    let dst = dir.join("bundle");
    std::fs::create_dir_all(&dst).unwrap();
    for e in std::fs::read_dir(demo_bundle()).unwrap() {
        let e = e.unwrap();
        if e.file_type().unwrap().is_file() {
            std::fs::copy(e.path(), dst.join(e.file_name())).unwrap();
        }
    }
    dst
}

/// movieId → tmdbId poster file of ml-latest-small, for the first `n` demo items with a poster.
fn demo_posters(n: usize) -> Vec<(u64, PathBuf)> {
    let links = std::fs::read_to_string(shared_data().join("ml-latest-small-posters/links.csv"))
        .expect("links.csv");
    let bundle = Bundle::open(&demo_bundle()).unwrap();
    let img = Bank::open(&bundle.file("img.bank")).unwrap();
    links
        .lines()
        .skip(1)
        .filter_map(|l| {
            let f: Vec<&str> = l.split(',').collect();
            let id: u64 = f[0].parse().ok()?;
            let p = posters().join(format!("{}.jpg", f.get(2)?));
            (img.get(id).is_some() && p.is_file()).then_some((id, p))
        })
        .take(n)
        .collect()
}

#[test]
fn bank_build_from_images_equals_the_python_made_demo_bank() {
    let dir = work("bank");
    let pairs = demo_posters(12);
    assert_eq!(pairs.len(), 12);
    let map: String = pairs
        .iter()
        .map(|(id, p)| format!("{id},{}\n", p.file_name().unwrap().to_string_lossy()))
        .collect();
    std::fs::write(dir.join("map.csv"), map).unwrap();
    let out = dir.join("img.bank");
    illmrec_ok(&[
        "bank",
        "build",
        "--images",
        &s(&posters()),
        "--map",
        &s(&dir.join("map.csv")),
        "--dtype",
        "f16",
        "--threads",
        "2",
        "--out",
        &s(&out),
    ]);
    let ours = Bank::open(&out).unwrap();
    let demo = Bank::open(&demo_bundle().join("img.bank")).unwrap();
    assert_eq!(ours.len(), 12);
    for (id, _) in &pairs {
        // features.py's float32 rows, stored in f16 by the demo bundle: the runtime's rows
        // round to the same f16 values, bit for bit.
        assert_eq!(
            ours.row(*id).unwrap().to_f32(),
            demo.row(*id).unwrap().to_f32(),
            "item {id}"
        );
    }

    // encode-images: the same rows in f32, in file order, ids written beside.
    let files: Vec<String> = pairs[..3].iter().map(|(_, p)| s(p)).collect();
    let dir2 = work("encode");
    for (i, f) in files.iter().enumerate() {
        std::fs::copy(f, dir2.join(format!("{}.jpg", pairs[i].0))).unwrap();
    }
    let npy = dir2.join("x.npy");
    let ids = dir2.join("ids.txt");
    illmrec_ok(&[
        "encode-images",
        "--images",
        &s(&dir2),
        "--out",
        &s(&npy),
        "--ids",
        &s(&ids),
        "--threads",
        "1",
    ]);
    let m = illmrec::store::npy::NpyArray::read(&npy).unwrap();
    assert_eq!(m.shape, vec![3, 1024]);
    let listed: Vec<u64> = std::fs::read_to_string(&ids)
        .unwrap()
        .lines()
        .map(|l| l.parse().unwrap())
        .collect();
    let mut expect: Vec<u64> = pairs[..3].iter().map(|p| p.0).collect();
    expect.sort_by_key(|id| format!("{id}.jpg"));
    assert_eq!(listed, expect);
}

fn recommend_candidates(bundle: &Path, history: &str, candidates: &str) -> serde_json::Value {
    let out = illmrec_ok(&[
        "recommend",
        "--bundle",
        &s(bundle),
        "--history",
        history,
        "--candidates",
        candidates,
        "--top-k",
        "5",
        "--threads",
        "2",
        "--json",
    ]);
    serde_json::from_str(&out).unwrap()
}

#[test]
fn items_add_remove_replace_on_the_demo_bundle() {
    let dir = work("items");
    let bundle = demo_copy(&dir);
    // Monsters University (2013): in ml-latest-small with a poster, not in the demo catalog.
    let poster = posters().join("62211.jpg");
    let out = illmrec_ok(&[
        "items",
        "add",
        "--bundle",
        &s(&bundle),
        "--id",
        "103141",
        "--title",
        "Monsters University (2013)",
        "--genres",
        "Adventure,Animation,Comedy",
        "--image",
        &s(&poster),
    ]);
    assert!(out.contains("added item 103141"), "{out}");
    assert!(out.contains("item 103141 is scored on: img"), "{out}");
    assert!(
        out.contains("no text row: the runtime has no text encoder"),
        "{out}"
    );
    // Every hash in the manifest is right, the bank rows are the new ones.
    let b = Bundle::open(&bundle).unwrap();
    for f in &b.manifest.files {
        assert_eq!(
            illmrec::store::fsutil::sha256_file(&b.file(&f.path)).unwrap(),
            f.sha256,
            "{}",
            f.path
        );
    }
    let img = Bank::open(&bundle.join("img.bank")).unwrap();
    let demo_img = Bank::open(&demo_bundle().join("img.bank")).unwrap();
    assert_eq!(img.len(), demo_img.len() + 1);
    let row = illmrec::images::ImageEncoder::new()
        .unwrap()
        .encode_file(&poster)
        .unwrap();
    let stored = img.row(103141).unwrap().to_f32();
    let f16: Vec<f32> = row
        .iter()
        .map(|v| half::f16::from_f32(*v).to_f32())
        .collect();
    assert_eq!(stored, f16);
    assert!(Bank::open(&bundle.join("text.bank"))
        .unwrap()
        .get(103141)
        .is_none());

    // The extended item-vector cache is the one a full rebuild makes.
    let cache: Vec<PathBuf> = common::item_vector_files(&bundle.join("cache"));
    assert_eq!(cache.len(), 1, "{cache:?}");
    let extended = std::fs::read(&cache[0]).unwrap();
    let r = recommend_candidates(&bundle, "1,3114,4886,6377", "103141,2,3");
    let items = r["items"].as_array().unwrap();
    assert!(items
        .iter()
        .any(|i| i["id"] == 103141 && i["score"].as_f64().unwrap().is_finite()));
    std::fs::remove_dir_all(bundle.join("cache")).unwrap();
    let r2 = recommend_candidates(&bundle, "1,3114,4886,6377", "103141,2,3");
    assert_eq!(
        std::fs::read(&cache[0]).unwrap(),
        extended,
        "extended cache != rebuilt cache"
    );
    assert_eq!(r["items"], r2["items"]);
    // The new item in a history gets its visual token (no missing-image fallback).
    let p = illmrec_ok(&[
        "prompt",
        "--bundle",
        &s(&bundle),
        "--history",
        "1,103141",
        "--json",
    ]);
    assert!(p.contains("Monsters University (2013)"), "{p}");

    // Errors leave the bundle as it is.
    let manifest = std::fs::read(bundle.join("manifest.json")).unwrap();
    let dup = illmrec(&[
        "items",
        "add",
        "--bundle",
        &s(&bundle),
        "--id",
        "103141",
        "--title",
        "X",
        "--image",
        &s(&poster),
    ]);
    assert_clean_error(&dup, "already in the catalog");
    std::fs::write(dir.join("bad.jpg"), b"\xff\xd8\xff\xe0 not really a jpeg").unwrap();
    let bad = illmrec(&[
        "items",
        "add",
        "--bundle",
        &s(&bundle),
        "--id",
        "5",
        "--title",
        "X",
        "--image",
        &s(&dir.join("bad.jpg")),
    ]);
    assert_clean_error(&bad, "bad.jpg");
    assert_clean_error(
        &illmrec(&[
            "items",
            "remove",
            "--bundle",
            &s(&bundle),
            "--id",
            "999999999",
        ]),
        "999999999",
    );
    assert_eq!(
        std::fs::read(bundle.join("manifest.json")).unwrap(),
        manifest
    );

    // Replace an existing item's image only: its text and cf rows stay.
    let out = illmrec_ok(&[
        "items",
        "replace",
        "--bundle",
        &s(&bundle),
        "--id",
        "1",
        "--title",
        "Toy Story (1995)",
        "--genres",
        "Adventure,Animation,Children,Comedy,Fantasy",
        "--image",
        &s(&poster),
    ]);
    assert!(out.contains("item 1 is scored on: img, cf, text"), "{out}");
    let img = Bank::open(&bundle.join("img.bank")).unwrap();
    assert_eq!(img.row(1).unwrap().to_f32(), f16);
    // A changed title drops the text row (it described the old one).
    let out = illmrec_ok(&[
        "items",
        "replace",
        "--bundle",
        &s(&bundle),
        "--id",
        "1",
        "--title",
        "Toy Story (1995, restored)",
    ]);
    assert!(out.contains("scored on: img, cf\n"), "{out}");
    assert!(out.contains("no text row"), "{out}");

    // Removing an item drops its line and every row.
    illmrec_ok(&["items", "remove", "--bundle", &s(&bundle), "--id", "1"]);
    let b = Bundle::open(&bundle).unwrap();
    for m in ["img.bank", "text.bank", "cf.bank"] {
        assert!(Bank::open(&b.file(m)).unwrap().get(1).is_none(), "{m}");
    }
    assert!(!std::fs::read_to_string(bundle.join("items.jsonl"))
        .unwrap()
        .contains("Toy Story (1995"));
}

#[test]
fn items_add_then_remove_restores_the_bundle_byte_for_byte() {
    let dir = work("roundtrip");
    let bundle = demo_copy(&dir);
    let files = [
        "manifest.json",
        "items.jsonl",
        "img.bank",
        "text.bank",
        "cf.bank",
        "heads.safetensors",
    ];
    let before: Vec<Vec<u8>> = files
        .iter()
        .map(|f| std::fs::read(bundle.join(f)).unwrap())
        .collect();
    illmrec_ok(&[
        "items",
        "add",
        "--bundle",
        &s(&bundle),
        "--id",
        "103141",
        "--title",
        "Monsters University (2013)",
        "--image",
        &s(&posters().join("62211.jpg")),
    ]);
    assert_ne!(
        std::fs::read(bundle.join("manifest.json")).unwrap(),
        before[0]
    );
    illmrec_ok(&["items", "remove", "--bundle", &s(&bundle), "--id", "103141"]);
    for (f, b) in files.iter().zip(&before) {
        assert_eq!(&std::fs::read(bundle.join(f)).unwrap(), b, "{f} differs");
    }
    // Extra files of the folder (the licence) are carried over.
    assert!(bundle.join("README-ml-latest-small.txt").is_file());
}

/// `kill -9` at seeded points of `items add`: the folder always holds a bundle that opens and
/// verifies, with either the old catalog or the new one.
#[test]
fn items_add_killed_leaves_the_old_bundle_or_the_new_one() {
    let dir = work("kill");
    let bundle = demo_copy(&dir);
    let args: Vec<String> = [
        "items",
        "add",
        "--bundle",
        &s(&bundle),
        "--id",
        "103141",
        "--title",
        "Monsters University (2013)",
        "--image",
        &s(&posters().join("62211.jpg")),
    ]
    .iter()
    .map(|x| x.to_string())
    .collect();
    let span = common::run_timed(&args);
    illmrec_ok(&["items", "remove", "--bundle", &s(&bundle), "--id", "103141"]);
    let (mut old, mut new) = (0, 0);
    for k in 0..8u64 {
        let delay = span.mul_f64(((k * 7919 + 13) % 97) as f64 / 97.0);
        common::kill_after(&args, delay);
        let b = Bundle::open(&bundle).expect("a bundle after the kill");
        for f in &b.manifest.files {
            assert_eq!(
                illmrec::store::fsutil::sha256_file(&b.file(&f.path)).unwrap(),
                f.sha256,
                "after {delay:?}"
            );
        }
        let items = std::fs::read_to_string(bundle.join("items.jsonl")).unwrap();
        if items.contains("\"id\":103141") {
            new += 1;
            illmrec_ok(&["items", "remove", "--bundle", &s(&bundle), "--id", "103141"]);
        } else {
            old += 1;
        }
    }
    assert_eq!(old + new, 8);
    let left: Vec<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n != "bundle")
        .collect();
    // A killed run's temporary folder is removed by the next run; at most the last one stays.
    assert!(left.len() <= 1, "{left:?}");
}

#[test]
fn bad_image_files_get_one_line_errors() {
    let dir = work("bad");
    let write = |name: &str, bytes: &[u8]| {
        let p = dir.join(name);
        std::fs::write(&p, bytes).unwrap();
        p
    };
    let poster = std::fs::read(posters().join("62211.jpg")).unwrap();
    let cases: Vec<(PathBuf, &str)> = vec![
        (write("1.jpg", b"hello, not an image"), "not an image"),
        (
            write("2.jpg", &poster[..poster.len() / 2]),
            "truncated JPEG",
        ),
        (write("3.png", &png_header(50_000, 50_000)), "50000"),
        (write("4.png", &png_header(100, 100)[..40]), "4.png"),
        (write("5.jpg", b""), "5.jpg"),
    ];
    for (path, needle) in cases {
        let out = illmrec(&[
            "encode-images",
            "--images",
            &s(&path),
            "--out",
            &s(&dir.join("x.npy")),
            "--ids",
            &s(&dir.join("x.txt")),
        ]);
        assert_clean_error(&out, needle);
        assert!(!dir.join("x.npy").exists());
    }
    // A file name that is not an id.
    let named = write("poster.jpg", &poster);
    assert_clean_error(
        &illmrec(&[
            "encode-images",
            "--images",
            &s(&named),
            "--out",
            "x.npy",
            "--ids",
            "x.txt",
        ]),
        "not an item id",
    );
}

/// A PNG that declares a `w`×`h` RGB picture (a decompression bomb when large): valid
/// signature, IHDR with its CRC, a tiny IDAT.
fn png_header(w: u32, h: u32) -> Vec<u8> {
    fn chunk(out: &mut Vec<u8>, kind: &[u8; 4], data: &[u8]) {
        out.extend_from_slice(&(data.len() as u32).to_be_bytes());
        let mut body = kind.to_vec();
        body.extend_from_slice(data);
        out.extend_from_slice(&body);
        out.extend_from_slice(&crc32(&body).to_be_bytes());
    }
    fn crc32(bytes: &[u8]) -> u32 {
        let mut c = !0u32;
        for &b in bytes {
            c ^= b as u32;
            for _ in 0..8 {
                c = if c & 1 != 0 {
                    0xEDB8_8320 ^ (c >> 1)
                } else {
                    c >> 1
                };
            }
        }
        !c
    }
    let mut out = b"\x89PNG\r\n\x1a\n".to_vec();
    let mut ihdr = Vec::new();
    ihdr.extend_from_slice(&w.to_be_bytes());
    ihdr.extend_from_slice(&h.to_be_bytes());
    ihdr.extend_from_slice(&[8, 2, 0, 0, 0]);
    chunk(&mut out, b"IHDR", &ihdr);
    chunk(
        &mut out,
        b"IDAT",
        &[0x78, 0x9c, 0x03, 0x00, 0x00, 0x00, 0x00, 0x01],
    );
    chunk(&mut out, b"IEND", &[]);
    out
}
