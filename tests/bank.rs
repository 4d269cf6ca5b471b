//! Feature bank format: round trip and every refusal.

mod common;

use half::f16;
use illmrec::store::bank::{write_bank, Bank, BankHeader, BankRows, DType, Modality};

fn sample(n: usize, dim: usize) -> (Vec<u64>, Vec<f32>) {
    // Ids deliberately out of order: the writer sorts them.
    let ids: Vec<u64> = (0..n as u64).map(|i| (i * 7919) % 1000 + 1).collect();
    (ids, common::seeded(3, n * dim))
}

#[test]
fn header_encodes_to_its_documented_size() {
    let h = BankHeader {
        magic: *b"ILLMBANK",
        version: 1,
        modality: 0,
        dtype: 0,
        reserved0: 0,
        dim: 1,
        reserved1: 0,
        count: 0,
        ids_offset: 128,
        rows_offset: 128,
        file_len: 128,
        checksum: [0; 32],
    };
    let cfg = bincode::config::standard()
        .with_little_endian()
        .with_fixed_int_encoding();
    assert_eq!(bincode::encode_to_vec(&h, cfg).unwrap().len(), 88);
}

#[test]
fn round_trip_f32_and_f16() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, values) = sample(50, 12);
    for dtype in [DType::F32, DType::F16] {
        let path = dir.path().join(format!("b-{}.bank", dtype.name()));
        let halves: Vec<f16> = values.iter().map(|v| f16::from_f32(*v)).collect();
        let rows = match dtype {
            DType::F32 => BankRows::F32(&values),
            DType::F16 => BankRows::F16(&halves),
        };
        write_bank(&path, Modality::Text, 12, &ids, rows).unwrap();
        let bank = Bank::open(&path).unwrap();
        assert_eq!(
            (bank.modality, bank.dtype, bank.dim(), bank.len()),
            (Modality::Text, dtype, 12, 50)
        );
        assert!(
            bank.ids().windows(2).all(|w| w[0] < w[1]),
            "ids are stored sorted"
        );
        bank.verify().unwrap();
        for (k, id) in ids.iter().enumerate() {
            let got = bank.row(*id).unwrap().to_f32();
            let want = &values[k * 12..(k + 1) * 12];
            let tol = if dtype == DType::F16 { 1e-3 } else { 0.0 };
            assert!(
                got.iter().zip(want).all(|(a, b)| (a - b).abs() <= tol),
                "row of item {id}"
            );
        }
    }
}

#[test]
fn write_leaves_no_temporary_file() {
    let dir = tempfile::tempdir().unwrap();
    let (ids, values) = sample(5, 4);
    write_bank(
        &dir.path().join("x.bank"),
        Modality::Img,
        4,
        &ids,
        BankRows::F32(&values),
    )
    .unwrap();
    let names: Vec<_> = std::fs::read_dir(dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert_eq!(names, vec![std::ffi::OsString::from("x.bank")]);
}

fn bank_file(dir: &std::path::Path) -> (std::path::PathBuf, Vec<u64>) {
    let (ids, values) = sample(20, 8);
    let path = dir.join("f.bank");
    write_bank(&path, Modality::Img, 8, &ids, BankRows::F32(&values)).unwrap();
    (path, ids)
}

#[test]
fn wrong_magic_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = bank_file(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    bytes[0] = b'X';
    std::fs::write(&path, bytes).unwrap();
    let err = Bank::open(&path).err().unwrap().to_string();
    assert!(err.contains("wrong magic"), "{err}");
}

#[test]
fn truncated_file_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = bank_file(dir.path());
    let bytes = std::fs::read(&path).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 5]).unwrap();
    let err = Bank::open(&path).err().unwrap().to_string();
    assert!(err.contains("truncated"), "{err}");
}

#[test]
fn checksum_mismatch_is_detected() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = bank_file(dir.path());
    let mut bytes = std::fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 0x40;
    std::fs::write(&path, bytes).unwrap();
    let bank = Bank::open(&path).unwrap();
    let err = bank.verify().unwrap_err().to_string();
    assert!(err.contains("checksum mismatch"), "{err}");
    let out = common::illmrec(&["bank", "inspect", &path.to_string_lossy()]);
    common::assert_clean_error(&out, "checksum mismatch");
}

#[test]
fn unknown_id_is_an_error_naming_it() {
    let dir = tempfile::tempdir().unwrap();
    let (path, _) = bank_file(dir.path());
    let bank = Bank::open(&path).unwrap();
    assert!(bank.get(999_999).is_none());
    let err = bank.row(999_999).err().unwrap().to_string();
    assert!(err.contains("999999") && err.contains("img"), "{err}");
}

#[test]
fn rows_that_do_not_match_ids_times_dim_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let err = write_bank(
        &dir.path().join("d.bank"),
        Modality::Cf,
        8,
        &[1, 2, 3],
        BankRows::F32(&[0.0; 20]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("3 ids but 20 values"), "{err}");
    let err = write_bank(
        &dir.path().join("d.bank"),
        Modality::Cf,
        2,
        &[1, 1],
        BankRows::F32(&[0.0; 4]),
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("more than once"), "{err}");
}

#[test]
fn cli_build_and_inspect() {
    let dir = tempfile::tempdir().unwrap();
    let p = |f: &str| dir.path().join(f).to_string_lossy().into_owned();
    std::fs::write(
        p("x.npy"),
        illmrec::store::npy::encode_f32(3, 4, &common::seeded(1, 12)),
    )
    .unwrap();
    std::fs::write(p("ids.txt"), "10\n30\n20\n").unwrap();
    common::illmrec_ok(&[
        "bank",
        "build",
        "--npy",
        &p("x.npy"),
        "--ids",
        &p("ids.txt"),
        "--modality",
        "text",
        "--dtype",
        "f16",
        "--out",
        &p("x.bank"),
    ]);
    let out = common::illmrec_ok(&["bank", "inspect", &p("x.bank")]);
    for want in [
        "modality  text",
        "dtype     f16",
        "dim       4",
        "count     3",
        "ids       10 .. 30",
        "verified  ok",
    ] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    // The wrong number of ids, a non-numeric id, and a 1-D matrix are refused cleanly.
    std::fs::write(p("two.txt"), "1\n2\n").unwrap();
    let out = common::illmrec(&[
        "bank",
        "build",
        "--npy",
        &p("x.npy"),
        "--ids",
        &p("two.txt"),
        "--modality",
        "text",
        "--out",
        &p("y.bank"),
    ]);
    common::assert_clean_error(&out, "has 2 ids but");
    std::fs::write(p("bad.txt"), "1\nfoo\n3\n").unwrap();
    let out = common::illmrec(&[
        "bank",
        "build",
        "--npy",
        &p("x.npy"),
        "--ids",
        &p("bad.txt"),
        "--modality",
        "text",
        "--out",
        &p("y.bank"),
    ]);
    common::assert_clean_error(&out, "line 2");
    std::fs::write(p("v.npy"), illmrec::store::npy::encode_i64(&[1, 2, 3])).unwrap();
    let out = common::illmrec(&[
        "bank",
        "build",
        "--npy",
        &p("v.npy"),
        "--ids",
        &p("ids.txt"),
        "--modality",
        "text",
        "--out",
        &p("y.bank"),
    ]);
    common::assert_clean_error(&out, "N×D matrix");
    assert!(!dir.path().join("y.bank").exists());
}
