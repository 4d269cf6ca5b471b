//! A synthetic catalog of N items for `illmrec bench-catalog`: a seeded feature bank and
//! item-vector cache written in the real formats, and what it costs to open them and to rank
//! the whole catalog for one user, set against this machine's memory bandwidth measured in the
//! same run. Measurements only: nothing here prints, nothing is asserted about time.

use crate::method::heads::SplitMix64;
use crate::method::item_vectors::{cache_file_name, write_cache, Expect, ItemVectors};
use crate::method::rank::Scored;
use crate::store::bank::{write_bank, Bank, BankRows, Modality};
use crate::store::verified::{Stamps, RACY_SECS};
use anyhow::{ensure, Result};
use half::f16;
use half::slice::HalfFloatSliceExt;
use sha2::{Digest, Sha256};
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// What to generate and measure.
#[derive(Clone, Debug)]
pub struct Spec {
    pub items: usize,
    /// Projected dimension per modality.
    pub dim: usize,
    /// Modalities per item row (1 to 3); every tenth item lacks the first (an item without an
    /// image).
    pub modalities: usize,
    /// Dimension of the synthetic feature bank (f16).
    pub bank_dim: usize,
    pub users: usize,
    pub k: usize,
    /// Ids excluded per user (a history).
    pub exclude: usize,
    /// Smaller catalogs whose open time is also measured.
    pub open_sizes: Vec<usize>,
    pub seed: u64,
    /// Threads for the all-threads bandwidth figure (the scan itself runs on one thread).
    pub threads: usize,
    /// Bytes streamed by the bandwidth measurement (more than the last-level cache).
    pub bandwidth_bytes: usize,
}

/// Open times of one catalog size, in milliseconds.
#[derive(Clone, Debug, serde::Serialize)]
pub struct OpenRow {
    pub items: usize,
    pub bank_bytes: u64,
    pub cache_bytes: u64,
    /// First open of a new file version: the whole-file checks run and are stamped.
    pub bank_first_ms: f64,
    pub cache_first_ms: f64,
    /// Later opens (median of 5): header read and stamp comparison.
    pub bank_ms: f64,
    pub cache_ms: f64,
}

#[derive(Clone, Debug, serde::Serialize)]
pub struct Report {
    pub items: usize,
    pub dim: usize,
    pub modalities: usize,
    pub k: usize,
    pub users: usize,
    pub kernel: &'static str,
    pub write_s: f64,
    pub open: Vec<OpenRow>,
    pub rss_after_open_mib: f64,
    pub rss_after_scans_mib: f64,
    /// First user after the open: includes mapping the file's pages.
    pub first_user_ms: f64,
    pub user_ms_median: f64,
    pub user_ms_best: f64,
    pub bytes_per_user: usize,
    pub scan_gbps_median: f64,
    pub scan_gbps_best: f64,
    /// Streaming read of a buffer larger than the last-level cache, best of 3 passes.
    pub bandwidth_1t_gbps: f64,
    pub bandwidth_threads: usize,
    pub bandwidth_nt_gbps: f64,
    /// A plain streaming read of the mapped rows (the same memory the scan reads), best of 2.
    pub mapped_read_gbps: f64,
    /// `scan_gbps_best / bandwidth_1t_gbps` (the scan runs on one thread).
    pub scan_over_bandwidth: f64,
    /// The first user's scan equals a full sort of every score (a correctness check).
    pub top_k_matches_full_sort: bool,
}

const MODALITIES: [Modality; 3] = [Modality::Img, Modality::Cf, Modality::Text];

fn ids(n: usize) -> Vec<u64> {
    (0..n as u64).map(|i| 2 * i + 1).collect()
}

fn masks(n: usize, m: usize) -> Vec<u8> {
    let full = (1u8 << m) - 1;
    (0..n)
        .map(|i| {
            if i % 10 == 9 && m > 1 {
                full & !1
            } else {
                full
            }
        })
        .collect()
}

fn key(spec: &Spec, n: usize) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(b"illmrec synthetic catalog");
    for v in [n, spec.dim, spec.modalities, spec.seed as usize] {
        h.update((v as u64).to_le_bytes());
    }
    h.finalize().into()
}

struct Files {
    bank: PathBuf,
    cache: PathBuf,
    key: [u8; 32],
    written: Instant,
}

/// Writes the bank and the cache of a catalog of `n` items into `dir`.
fn write_files(dir: &Path, spec: &Spec, n: usize) -> Result<Files> {
    let ids = ids(n);
    let mut rng = SplitMix64(spec.seed ^ n as u64);
    let bank = dir.join(format!("synthetic-{n}.bank"));
    let mut rows = vec![f16::ZERO; n * spec.bank_dim];
    let wide: Vec<f32> = (0..rows.len()).map(|_| rng.uniform(1.0)).collect();
    rows.convert_from_f32_slice(&wide);
    drop(wide);
    write_bank(
        &bank,
        Modality::Cf,
        spec.bank_dim,
        &ids,
        BankRows::F16(&rows),
    )?;
    drop(rows);
    let key = key(spec, n);
    let cache = dir.join(cache_file_name(&key));
    let masks = masks(n, spec.modalities);
    let mods = &MODALITIES[..spec.modalities];
    let mut wide = vec![0f32; spec.dim * spec.modalities];
    write_cache(&cache, &key, mods, spec.dim, &ids, &masks, |i, row| {
        for (s, chunk) in wide.chunks_mut(spec.dim).enumerate() {
            let present = masks[i] & (1 << s) != 0;
            chunk
                .iter_mut()
                .for_each(|v| *v = if present { rng.uniform(1.0) * 0.2 } else { 0.0 });
        }
        row.convert_from_f32_slice(&wide);
        Ok(())
    })?;
    Ok(Files {
        bank,
        cache,
        key,
        written: Instant::now(),
    })
}

fn open_bank(path: &Path, stamps: &Stamps) -> Result<(Bank, bool)> {
    let bank = Bank::open(path)?;
    let tag = [b"bank verify ".as_slice(), &bank.header.checksum].concat();
    let checked = Stamps::check_once(Some(stamps), path, &tag, || bank.verify())?;
    Ok((
        bank,
        matches!(checked, crate::store::verified::Checked::Full { .. }),
    ))
}

fn open_cache(files: &Files, spec: &Spec, n: usize, stamps: &Stamps) -> Result<ItemVectors> {
    ItemVectors::open(
        &files.cache,
        &Expect {
            key: &files.key,
            modalities: &MODALITIES[..spec.modalities],
            count: n,
        },
        Some(stamps),
    )
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

/// The median of timed repeats (the benchmarks' one percentile function; NaN for none).
fn median(v: Vec<f64>) -> f64 {
    crate::bench::sweep::summarize(&v).map_or(f64::NAN, |s| s.p50)
}

/// Open times for one size; the files stay for the caller.
fn measure_open(dir: &Path, spec: &Spec, n: usize, stamps: &Stamps) -> Result<(Files, OpenRow)> {
    let files = write_files(dir, spec, n)?;
    // A check is only stamped for files older than RACY_SECS (see crate::store::verified).
    let settle = Duration::from_millis(RACY_SECS * 1000 + 200);
    if let Some(rest) = settle.checked_sub(files.written.elapsed()) {
        std::thread::sleep(rest);
    }
    let t = Instant::now();
    let (_, full) = open_bank(&files.bank, stamps)?;
    let bank_first = t.elapsed();
    ensure!(full, "the first bank open did not check the file");
    let t = Instant::now();
    let v = open_cache(&files, spec, n, stamps)?;
    let cache_first = t.elapsed();
    ensure!(
        v.checked_in_full,
        "the first cache open did not check the file"
    );
    drop(v);
    let (mut bank_ms, mut cache_ms) = (Vec::new(), Vec::new());
    for _ in 0..5 {
        let t = Instant::now();
        let (_, full) = open_bank(&files.bank, stamps)?;
        bank_ms.push(ms(t.elapsed()));
        ensure!(!full, "a stamped bank was checked again");
        let t = Instant::now();
        let v = open_cache(&files, spec, n, stamps)?;
        cache_ms.push(ms(t.elapsed()));
        ensure!(!v.checked_in_full, "a stamped cache was checked again");
    }
    let row = OpenRow {
        items: n,
        bank_bytes: std::fs::metadata(&files.bank)?.len(),
        cache_bytes: std::fs::metadata(&files.cache)?.len(),
        bank_first_ms: ms(bank_first),
        cache_first_ms: ms(cache_first),
        bank_ms: median(bank_ms),
        cache_ms: median(cache_ms),
    };
    Ok((files, row))
}

/// Generates the catalogs in `dir` and measures them (see [`Report`]).
pub fn run(dir: &Path, spec: &Spec) -> Result<Report> {
    ensure!(spec.items >= 1, "--items must be at least 1");
    ensure!(spec.dim >= 1, "--dim must be at least 1");
    ensure!(
        (1..=3).contains(&spec.modalities),
        "--modalities must be 1, 2 or 3"
    );
    ensure!(spec.bank_dim >= 1, "--bank-dim must be at least 1");
    ensure!(spec.users >= 1, "--users must be at least 1");
    ensure!(spec.k >= 1, "--k must be at least 1");
    ensure!(spec.threads >= 1, "--threads must be at least 1");
    let stamps = Stamps::new(dir.join("stamps"));
    let mut open = Vec::new();
    let mut sizes: Vec<usize> = spec
        .open_sizes
        .iter()
        .copied()
        .filter(|&s| s >= 1 && s < spec.items)
        .collect();
    sizes.sort_unstable();
    sizes.dedup();
    for &n in &sizes {
        let (files, row) = measure_open(dir, spec, n, &stamps)?;
        open.push(row);
        let _ = std::fs::remove_file(files.bank);
        let _ = std::fs::remove_file(files.cache);
    }
    let t = Instant::now();
    let (files, row) = measure_open(dir, spec, spec.items, &stamps)?;
    let write_s = t.elapsed().as_secs_f64() - (row.bank_first_ms + row.cache_first_ms) / 1e3;
    open.push(row);

    let v = open_cache(&files, spec, spec.items, &stamps)?;
    let rss_after_open_mib = rss_mib();
    let mut rng = SplitMix64(spec.seed.wrapping_add(77));
    let all_ids = v.ids();
    let mut user_ms = Vec::new();
    let mut first_user_ms = 0.0;
    let mut matches = true;
    // One untimed-for-the-median first user (it maps the file's pages), then `users` timed.
    for u in 0..=spec.users {
        let user: Vec<Vec<f32>> = (0..spec.modalities)
            .map(|_| (0..spec.dim).map(|_| rng.uniform(1.0)).collect())
            .collect();
        let exclude: HashSet<u64> = (0..spec.exclude)
            .map(|_| all_ids[rng.next() as usize % all_ids.len()])
            .collect();
        let t = Instant::now();
        let q = v.query(&user);
        let top = v.top_k(&q, &exclude, spec.k)?;
        let elapsed = ms(t.elapsed());
        std::hint::black_box(&top);
        if u == 0 {
            first_user_ms = elapsed;
            let mut all: Vec<Scored> = (0..v.len())
                .filter_map(|i| {
                    Some(Scored {
                        id: all_ids[i],
                        score: v.score(&q, i)?,
                    })
                })
                .filter(|s| !exclude.contains(&s.id))
                .collect();
            all.sort_by(|a, b| b.score.total_cmp(&a.score).then(a.id.cmp(&b.id)));
            all.truncate(spec.k);
            matches = all == top;
        } else {
            user_ms.push(elapsed);
        }
    }
    let rss_after_scans_mib = rss_mib();
    let mapped_read_gbps = {
        let words: &[u64] = bytemuck::cast_slice(&v.rows_bytes()[..v.rows_bytes().len() / 8 * 8]);
        let mut best = f64::INFINITY;
        for _ in 0..2 {
            let t = Instant::now();
            std::hint::black_box(read_sum(words));
            best = best.min(t.elapsed().as_secs_f64());
        }
        (words.len() * 8) as f64 / best / 1e9
    };
    let bytes_per_user = v.scan_bytes();
    drop(v);
    let best = user_ms.iter().copied().fold(f64::INFINITY, f64::min);
    let med = median(user_ms);
    let gbps = |ms: f64| bytes_per_user as f64 / (ms / 1e3) / 1e9;
    let bandwidth_1t_gbps = bandwidth(spec.bandwidth_bytes, 1);
    let bandwidth_nt_gbps = if spec.threads > 1 {
        bandwidth(spec.bandwidth_bytes, spec.threads)
    } else {
        bandwidth_1t_gbps
    };
    Ok(Report {
        items: spec.items,
        dim: spec.dim,
        modalities: spec.modalities,
        k: spec.k,
        users: spec.users,
        kernel: crate::method::dot16::kernel_name(),
        write_s,
        open,
        rss_after_open_mib,
        rss_after_scans_mib,
        first_user_ms,
        user_ms_median: med,
        user_ms_best: best,
        bytes_per_user,
        scan_gbps_median: gbps(med),
        scan_gbps_best: gbps(best),
        bandwidth_1t_gbps,
        mapped_read_gbps,
        bandwidth_threads: spec.threads,
        bandwidth_nt_gbps,
        scan_over_bandwidth: gbps(best) / bandwidth_1t_gbps,
        top_k_matches_full_sort: matches,
    })
}

/// This process's resident set (VmRSS), MiB; 0 where /proc is missing.
pub fn rss_mib() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse::<f64>().ok())
        })
        .unwrap_or(0.0)
        / 1024.0
}

/// Streaming-read bandwidth in GB/s over a buffer of `bytes` split among `threads`: best of 3
/// passes, after one pass that faults the pages in.
pub fn bandwidth(bytes: usize, threads: usize) -> f64 {
    let words = (bytes / 8).max(1024);
    let buf: Vec<u64> = (0..words as u64).collect();
    let chunk = words.div_ceil(threads);
    let pass = || {
        std::thread::scope(|s| {
            let handles: Vec<_> = buf
                .chunks(chunk)
                .map(|c| s.spawn(move || read_sum(c)))
                .collect();
            handles
                .into_iter()
                .fold(0u64, |a, h| a.wrapping_add(h.join().unwrap()))
        })
    };
    std::hint::black_box(pass());
    let mut best = f64::INFINITY;
    for _ in 0..3 {
        let t = Instant::now();
        std::hint::black_box(pass());
        best = best.min(t.elapsed().as_secs_f64());
    }
    (words * 8) as f64 / best / 1e9
}

/// Sum of a buffer: a read stream the CPU is never the bottleneck of.
fn read_sum(buf: &[u64]) -> u64 {
    #[cfg(target_arch = "x86_64")]
    if std::is_x86_feature_detected!("avx2") {
        // SAFETY: AVX2 was detected just above.
        return unsafe { read_sum_avx2(buf) };
    }
    read_sum_lanes(buf)
}

#[inline(always)]
fn read_sum_lanes(buf: &[u64]) -> u64 {
    let mut acc = [0u64; 16];
    let mut chunks = buf.chunks_exact(16);
    for c in &mut chunks {
        for l in 0..16 {
            acc[l] = acc[l].wrapping_add(c[l]);
        }
    }
    let rest = chunks
        .remainder()
        .iter()
        .fold(0u64, |a, b| a.wrapping_add(*b));
    acc.iter().fold(rest, |a, b| a.wrapping_add(*b))
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn read_sum_avx2(buf: &[u64]) -> u64 {
    read_sum_lanes(buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A tiny catalog end to end: opens are checked once then stamped, the scan equals a full
    /// sort, and every figure is a number (no timing is asserted).
    #[test]
    fn tiny_catalog_runs_and_ranks_correctly() {
        let dir = tempfile::tempdir().unwrap();
        let spec = Spec {
            items: 3000,
            dim: 24,
            modalities: 3,
            bank_dim: 8,
            users: 2,
            k: 10,
            exclude: 20,
            open_sizes: vec![100, 5000],
            seed: 1,
            threads: 2,
            bandwidth_bytes: 1 << 20,
        };
        let r = run(dir.path(), &spec).unwrap();
        assert!(r.top_k_matches_full_sort);
        assert_eq!(
            r.open.iter().map(|o| o.items).collect::<Vec<_>>(),
            vec![100, 3000]
        );
        assert_eq!(r.bytes_per_user, 3000 * (3 * 24 * 2 + 9));
        assert!(r.bandwidth_1t_gbps > 0.0 && r.scan_gbps_best > 0.0);
    }

    #[test]
    fn every_tenth_item_has_no_image() {
        let m = masks(20, 3);
        assert_eq!(m.iter().filter(|&&x| x == 0b110).count(), 2);
        assert_eq!(masks(4, 1), vec![1; 4]);
    }
}
