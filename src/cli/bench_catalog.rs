//! `illmrec bench-catalog`: the synthetic-catalog benchmark ([`illmrec::bench::synthetic`]) as a
//! markdown table or JSON.

use anyhow::{Context, Result};
use clap::Args;
use illmrec::bench::synthetic::{run as measure, Report, Spec};
use std::path::PathBuf;

#[derive(Args)]
pub struct BenchCatalogArgs {
    /// Items in the catalog.
    #[arg(long, default_value_t = 1_000_000)]
    items: usize,
    /// Projected dimension per modality.
    #[arg(long, default_value_t = 512)]
    dim: usize,
    /// Modalities per item (1 to 3); every tenth item lacks the first.
    #[arg(long, default_value_t = 3)]
    modalities: usize,
    /// Dimension of the synthetic feature bank.
    #[arg(long, default_value_t = 64)]
    bank_dim: usize,
    /// Timed users (one more, untimed, maps the file first).
    #[arg(long, default_value_t = 5)]
    users: usize,
    /// Items returned per user.
    #[arg(long, default_value_t = 10)]
    k: usize,
    /// Ids excluded per user (a history).
    #[arg(long, default_value_t = 50)]
    exclude: usize,
    /// Smaller catalogs whose open time is also measured (comma-separated).
    #[arg(long, value_delimiter = ',', default_value = "10000,100000")]
    open_sizes: Vec<usize>,
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Threads for the all-threads bandwidth figure (the scan uses one).
    #[arg(long, default_value_t = 1)]
    threads: usize,
    /// MiB streamed by the bandwidth measurement (keep it well above the last-level cache).
    #[arg(long, default_value_t = 2048)]
    bandwidth_mib: usize,
    /// Folder for the generated files [default: a temporary folder, removed after].
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Print JSON instead of a table.
    #[arg(long)]
    json: bool,
}

pub fn run(a: BenchCatalogArgs) -> Result<()> {
    let spec = Spec {
        items: a.items,
        dim: a.dim,
        modalities: a.modalities,
        bank_dim: a.bank_dim,
        users: a.users,
        k: a.k,
        exclude: a.exclude,
        open_sizes: a.open_sizes,
        seed: a.seed,
        threads: a.threads,
        bandwidth_bytes: a.bandwidth_mib << 20,
    };
    let tmp;
    let dir = match &a.dir {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("cannot create {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let r = measure(&dir, &spec)?;
    if a.json {
        println!("{}", serde_json::to_string_pretty(&r)?);
    } else {
        print!("{}", markdown(&r));
    }
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    let mut s = format!(
        "{} items × {} modalities × {} dims (f16 rows of {} bytes), top-{}; kernel {}\n\n",
        r.items,
        r.modalities,
        r.dim,
        r.modalities * r.dim * 2,
        r.k,
        r.kernel
    );
    s += "| items | bank MiB | cache MiB | bank first open ms | cache first open ms | bank open ms | cache open ms |\n";
    s += "|---:|---:|---:|---:|---:|---:|---:|\n";
    for o in &r.open {
        s += &format!(
            "| {} | {:.1} | {:.1} | {:.1} | {:.1} | {:.3} | {:.3} |\n",
            o.items,
            mib(o.bank_bytes),
            mib(o.cache_bytes),
            o.bank_first_ms,
            o.cache_first_ms,
            o.bank_ms,
            o.cache_ms
        );
    }
    s += &format!(
        "\nFirst open: the whole-file checks run and are stamped; later opens: header and stamp only.\n\n\
         | measure | value |\n|---|---:|\n\
         | RSS after open | {:.1} MiB |\n\
         | RSS after the scans (mapped pages count) | {:.1} MiB |\n\
         | first user (maps the file) | {:.1} ms |\n\
         | time per user, scoring + top-{} (median of {}) | {:.1} ms |\n\
         | time per user, best | {:.1} ms |\n\
         | bytes scanned per user | {:.1} MiB |\n\
         | scan rate, median / best | {:.2} / {:.2} GB/s |\n\
         | memory bandwidth, 1 thread (streaming read, best of 3) | {:.2} GB/s |\n\
         | streaming read of the mapped cache rows, 1 thread | {:.2} GB/s |\n",
        r.rss_after_open_mib,
        r.rss_after_scans_mib,
        r.first_user_ms,
        r.k,
        r.users,
        r.user_ms_median,
        r.user_ms_best,
        mib(r.bytes_per_user as u64),
        r.scan_gbps_median,
        r.scan_gbps_best,
        r.bandwidth_1t_gbps,
        r.mapped_read_gbps,
    );
    if r.bandwidth_threads > 1 {
        s += &format!(
            "| memory bandwidth, {} threads | {:.2} GB/s |\n",
            r.bandwidth_threads, r.bandwidth_nt_gbps
        );
    }
    s += &format!(
        "| scan / 1-thread bandwidth (best) | {:.0} % |\n| top-k equals a full sort (first user) | {} |\n",
        100.0 * r.scan_over_bandwidth,
        r.top_k_matches_full_sort
    );
    s
}
