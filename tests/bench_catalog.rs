//! `illmrec bench-catalog` on a tiny catalog: the benchmark path runs end to end and its top-k
//! equals a full sort. No timing is asserted (figures are the benchmark's to report).

mod common;

#[test]
fn bench_catalog_runs_on_a_tiny_catalog() {
    let dir = tempfile::tempdir().unwrap();
    let out = common::illmrec_ok(&[
        "bench-catalog",
        "--items",
        "2000",
        "--dim",
        "16",
        "--users",
        "2",
        "--open-sizes",
        "200",
        "--bandwidth-mib",
        "4",
        "--dir",
        &common::s(dir.path()),
        "--json",
    ]);
    let r: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(r["top_k_matches_full_sort"], true, "{out}");
    assert_eq!(r["items"], 2000);
    assert_eq!(r["open"].as_array().unwrap().len(), 2);
    assert_eq!(r["bytes_per_user"], 2000 * (3 * 16 * 2 + 9));
    for key in [
        "user_ms_median",
        "scan_gbps_best",
        "bandwidth_1t_gbps",
        "rss_after_open_mib",
    ] {
        assert!(r[key].as_f64().unwrap() > 0.0, "{key}: {out}");
    }
    // Bad input is one clear error.
    common::assert_clean_error(
        &common::illmrec(&["bench-catalog", "--items", "10", "--modalities", "4"]),
        "--modalities must be 1, 2 or 3",
    );
}
