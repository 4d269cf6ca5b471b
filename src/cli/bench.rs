//! `illmrec bench`: what a deployment costs, measured in one run on one loaded model: load time,
//! per-user latency and prompt positions for each way of writing items (image token, title only,
//! description), the saving of the prefix KV cache, and memory. With `--sweep`, the same
//! measurements against the history length (the paper's Fig. 3, [`illmrec::bench::sweep`]), written as
//! markdown, CSV, JSON and a PNG plot.

use super::RuntimeArgs;
use anyhow::{ensure, Context, Result};
use clap::Args;
use illmrec::method::eval::load_split;
use illmrec::method::prompt::PromptStyle;
use std::collections::HashSet;
use std::path::PathBuf;
use std::time::Instant;

#[derive(Args)]
pub struct BenchArgs {
    /// The bundle to benchmark.
    #[arg(long, value_name = "DIR")]
    bundle: PathBuf,
    /// A prepared dataset whose test histories are used as requests.
    #[arg(long, value_name = "DIR")]
    dataset: PathBuf,
    /// Number of users (requests) per configuration.
    #[arg(long, default_value_t = 20)]
    users: usize,
    /// Untimed requests before measuring (graph allocation, page cache).
    #[arg(long, default_value_t = 2)]
    warmup: usize,
    /// Images timed for the image-encoding rows (decode + resize + MobileNet), taken from the
    /// dataset's items (`image` paths); 0 skips them.
    #[arg(long, default_value_t = 50)]
    images: usize,
    /// Also time throughput with this many users decoded per llama.cpp call (a list, e.g.
    /// `1,2,4,8`: each runs every user, in two passes in opposite orders).
    #[arg(long, value_name = "N,N,...", value_delimiter = ',')]
    batch_users: Vec<usize>,
    /// Print JSON instead of a table.
    #[arg(long, conflicts_with = "sweep")]
    json: bool,
    /// Time requests against the history length instead (the paper's Fig. 3): the lengths in
    /// items, comma-separated (bare: 1 to 20). Each length takes the newest items of the first
    /// --users test histories that long; image token, title only, description and engine only
    /// (the image prompt's positions as plain tokens) take turns on each. Needs --out.
    #[arg(long, value_name = "LENGTHS", num_args = 0..=1, value_delimiter = ',', requires = "out")]
    sweep: Option<Vec<usize>>,
    /// Folder for the sweep's fig3.md, fig3.csv, fig3.json and fig3.png (created if missing).
    #[arg(long, value_name = "DIR", requires = "sweep")]
    out: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
}

#[derive(serde::Serialize)]
struct Row {
    config: String,
    users: usize,
    mean_positions: f64,
    positions_per_item: f64,
    p50_ms: f64,
    p90_ms: f64,
    mean_ms: f64,
    users_per_second: f64,
}

pub fn run(a: BenchArgs) -> Result<()> {
    ensure!(a.users >= 1, "--users must be at least 1");
    if let Some(lengths) = &a.sweep {
        return sweep(&a, lengths);
    }
    let cases = load_split(&a.dataset, "test")?;
    let t0 = Instant::now();
    let opts = a.runtime.options();
    let mut rec = super::open_recommender(&a.bundle, opts.clone())?;
    let open_s = t0.elapsed().as_secs_f64();
    let cache_built = rec.items.computed;
    let rss_after_open = memory_kib("VmRSS");
    let known: Vec<_> = cases
        .iter()
        .filter(|c| c.history.iter().all(|id| rec.catalog.get(*id).is_some()))
        .take(a.users + a.warmup)
        .collect();
    ensure!(
        known.len() > a.warmup,
        "the dataset's histories are not in this bundle's catalog"
    );

    let mut configs = vec![
        ("image token, prefix cache", true, Some(PromptStyle::Image)),
        (
            "image token, no prefix cache",
            false,
            Some(PromptStyle::Image),
        ),
    ];
    if rec.heads.adaptor.is_none() {
        configs.clear();
    }
    configs.push(("title only, prefix cache", true, Some(PromptStyle::Title)));
    configs.push((
        "description, prefix cache",
        true,
        Some(PromptStyle::Description),
    ));
    // Configurations take turns on every user, so that load from other processes that comes
    // and goes weighs on all of them alike and their ratios stay meaningful.
    let mut times = vec![Vec::new(); configs.len()];
    let mut positions = vec![0usize; configs.len()];
    let mut items = vec![0usize; configs.len()];
    for (k, case) in known.iter().enumerate() {
        for (c, (_, reuse, style)) in configs.iter().enumerate() {
            rec.set_request_options(*reuse && opts.reuse_prefix, *style)?;
            let t = Instant::now();
            let user = rec.encode_user(&case.history)?;
            let exclude: HashSet<u64> = case.history.iter().copied().collect();
            std::hint::black_box(rec.top_k(&user, 10, None, &exclude)?);
            if k >= a.warmup {
                times[c].push(t.elapsed().as_secs_f64() * 1e3);
                positions[c] += user.prompt_positions;
                items[c] += user.used.len();
            }
        }
    }
    // Positions that do not depend on the items: BOS, task text, closing text and [REC].
    let t = illmrec::method::prompt::template();
    let fixed = rec
        .model()
        .tokenize(
            &format!("{}{}{}{}", t.task, t.list_close, t.closing, t.instruction),
            true,
        )?
        .len()
        + 1;
    let mut rows = Vec::new();
    for (c, (name, _, _)) in configs.iter().enumerate() {
        let s = illmrec::bench::sweep::summarize(&times[c]).context("no user was timed")?;
        rows.push(Row {
            config: name.to_string(),
            users: s.n,
            mean_positions: positions[c] as f64 / s.n as f64,
            positions_per_item: (positions[c] as f64 - (fixed * s.n) as f64) / items[c] as f64,
            p50_ms: s.p50,
            p90_ms: s.p90,
            mean_ms: s.mean,
            users_per_second: 1e3 / s.mean,
        });
    }
    rec.set_request_options(opts.reuse_prefix, opts.prompt_style)?;
    let batched = batch_timings(
        &mut rec,
        &known[a.warmup.min(known.len())..],
        &a.batch_users,
    )?;
    let encoding = image_timings(&a.dataset, a.images)?;
    let items_per_user = items[0] as f64 / times[0].len().max(1) as f64;
    let per_item_image_ms = rows.first().map(|r| r.mean_ms / items_per_user);
    let report = serde_json::json!({
        "bundle": a.bundle.display().to_string(),
        "model": rec.model().path.display().to_string(),
        "threads": opts.context.n_threads,
        "open_seconds": open_s,
        "item_vectors_built": cache_built,
        "catalog_items": rec.catalog.len(),
        "rss_after_open_mib": rss_after_open / 1024.0,
        "peak_rss_mib": memory_kib("VmHWM") / 1024.0,
        "rows": rows,
        "batched": batched,
        "image_encoding": encoding,
    });
    if a.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    println!(
        "open {:.2} s (item vectors {}), {} catalog items, RSS after open {:.0} MiB, peak {:.0} MiB, {} threads",
        open_s,
        if cache_built { "computed" } else { "from cache" },
        rec.catalog.len(),
        rss_after_open / 1024.0,
        memory_kib("VmHWM") / 1024.0,
        opts.context.n_threads
    );
    println!("\n| configuration | users | positions / prompt | positions / item | p50 ms | p90 ms | users/s | time vs image |");
    println!("|---|---|---|---|---|---|---|---|");
    let base = rows.first().map(|r| r.mean_ms).unwrap_or(1.0);
    for r in &rows {
        println!(
            "| {} | {} | {:.1} | {:.1} | {:.0} | {:.0} | {:.2} | {:.2}× |",
            r.config,
            r.users,
            r.mean_positions,
            r.positions_per_item,
            r.p50_ms,
            r.p90_ms,
            r.users_per_second,
            r.mean_ms / base
        );
    }
    if !batched.is_empty() {
        println!("\n| users per llama.cpp call | users | seconds | users/s | vs one at a time |");
        println!("|---|---|---|---|---|");
        let one = batched
            .iter()
            .find(|b| b.per_call == 1)
            .map(|b| b.users_per_second);
        for b in &batched {
            println!(
                "| {} | {} | {:.2} | {:.3} | {} |",
                b.per_call,
                b.users,
                b.seconds,
                b.users_per_second,
                one.map_or("—".into(), |o| format!("{:.2}×", b.users_per_second / o))
            );
        }
    }
    if !encoding.is_empty() {
        println!("\n| image encoding (decode + resize + MobileNet) | images | threads | ms / image | images/s |");
        println!("|---|---|---|---|---|");
        for e in &encoding {
            println!(
                "| {} | {} | {} | {:.1} | {:.1} |",
                e.what,
                e.images,
                e.threads,
                e.ms_per_image,
                1e3 / e.ms_per_image
            );
        }
        if let (Some(first), Some(per_item)) = (encoding.first(), per_item_image_ms) {
            println!(
                "\nadding an item costs {:.1} ms of image encoding once (1 thread); a request costs {per_item:.0} ms per history item (first configuration, {items_per_user:.1} items per history)",
                first.ms_per_image
            );
        }
    }
    Ok(())
}

/// `--sweep`: runs [`illmrec::bench::sweep::run`] and writes its four files.
fn sweep(a: &BenchArgs, lengths: &[usize]) -> Result<()> {
    use illmrec::bench::{report, sweep};
    let lengths = match lengths.is_empty() {
        true => sweep::default_lengths(),
        false => sweep::check_lengths(lengths)?,
    };
    let out = a.out.as_ref().context("--sweep needs --out DIR")?;
    let histories: Vec<Vec<u64>> = load_split(&a.dataset, "test")?
        .into_iter()
        .map(|c| c.history)
        .collect();
    let mut opts = a.runtime.options();
    let longest = *lengths.last().context("no length")?;
    opts.max_history = opts.max_history.max(longest);
    let threads = opts.context.n_threads;
    let mut rec = super::open_recommender(&a.bundle, opts)?;
    let mut machine = report::Machine::detect(&mut rec, threads);
    let plan = sweep::Plan {
        lengths,
        users: a.users,
        warmup: a.warmup,
    };
    let rows = sweep::run(&mut rec, &histories, &plan, &mut |l| {
        eprintln!("history length {l}…")
    })?;
    machine.load_after = report::current_load();
    let report = report::Report::new(
        a.bundle.display().to_string(),
        a.dataset.display().to_string(),
        machine,
        plan,
        rows,
    );
    std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
    let png = report.png(1200, 480)?;
    let files: [(&str, Vec<u8>); 4] = [
        ("fig3.md", report.markdown().into_bytes()),
        ("fig3.csv", report.csv().into_bytes()),
        ("fig3.json", serde_json::to_vec_pretty(&report)?),
        ("fig3.png", png),
    ];
    for (name, bytes) in &files {
        illmrec::store::fsutil::write_atomic(&out.join(name), |w| Ok(w.write_all(bytes)?))?;
    }
    print!("{}", report.markdown());
    eprintln!(
        "{} on {} ({} LLM threads); wrote fig3.md, fig3.csv, fig3.json and fig3.png to {}",
        report.machine.model,
        report.machine.cpu,
        threads,
        out.display()
    );
    Ok(())
}

#[derive(serde::Serialize)]
struct BatchRow {
    per_call: usize,
    users: usize,
    seconds: f64,
    users_per_second: f64,
}

/// Throughput of whole requests (prompt, LLM, heads, top-10) with `per_call` users decoded per
/// llama.cpp call ([`illmrec::recommender::Recommender::encode_users`]), on the recommender's
/// configured prompt and prefix cache. Every setting runs every user twice, in two passes over
/// the settings in opposite orders, so that load that comes and goes weighs on all alike.
fn batch_timings(
    rec: &mut illmrec::recommender::Recommender,
    cases: &[&illmrec::method::eval::Case],
    settings: &[usize],
) -> Result<Vec<BatchRow>> {
    ensure!(
        settings
            .iter()
            .all(|&b| (1..=illmrec::engine::MAX_BRANCHES).contains(&b)),
        "--batch-users takes 1 to {} users per call",
        illmrec::engine::MAX_BRANCHES
    );
    let mut seconds = vec![0.0; settings.len()];
    let order: Vec<usize> = (0..settings.len())
        .chain((0..settings.len()).rev())
        .collect();
    for s in order {
        let t = Instant::now();
        for chunk in cases.chunks(settings[s]) {
            let histories: Vec<&[u64]> = chunk.iter().map(|c| c.history.as_slice()).collect();
            for (case, user) in chunk.iter().zip(rec.encode_users(&histories, settings[s])) {
                let exclude: HashSet<u64> = case.history.iter().copied().collect();
                std::hint::black_box(rec.top_k(&user?, 10, None, &exclude)?);
            }
        }
        seconds[s] += t.elapsed().as_secs_f64();
    }
    Ok(settings
        .iter()
        .zip(seconds)
        .map(|(&per_call, seconds)| BatchRow {
            per_call,
            users: 2 * cases.len(),
            seconds,
            users_per_second: (2 * cases.len()) as f64 / seconds,
        })
        .collect())
}

#[derive(serde::Serialize)]
struct EncodeRow {
    what: String,
    images: usize,
    threads: usize,
    ms_per_image: f64,
}

/// Times the runtime's image encoder on up to `n` of the dataset's item images, on 1 and 2
/// threads (one image per thread at a time); empty when the dataset has no readable image.
fn image_timings(dataset: &std::path::Path, n: usize) -> Result<Vec<EncodeRow>> {
    if n == 0 {
        return Ok(Vec::new());
    }
    let text = illmrec::store::fsutil::read_regular_string(&dataset.join("items.jsonl"))?;
    // Image paths are relative to the repository root (the dataset's grandparent), as the
    // Python tools write them, or to the current folder.
    let root = dataset.parent().and_then(|p| p.parent());
    let mut paths = Vec::new();
    for line in text.lines() {
        let Ok(v) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let Some(rel) = v.get("image").and_then(|i| i.as_str()) else {
            continue;
        };
        let candidates = [root.map(|r| r.join(rel)), Some(PathBuf::from(rel))];
        if let Some(p) = candidates.into_iter().flatten().find(|p| p.is_file()) {
            paths.push(p);
        }
        if paths.len() == n {
            break;
        }
    }
    if paths.is_empty() {
        eprintln!(
            "note: no item image of {} found: image encoding not timed",
            dataset.display()
        );
        return Ok(Vec::new());
    }
    let encoder = illmrec::images::ImageEncoder::new()?;
    encoder.encode_file(&paths[0])?; // warm-up
    let mut rows = Vec::new();
    for threads in [1, 2] {
        let t = Instant::now();
        for r in encoder.encode_files(&paths, threads, &|| {}) {
            r?;
        }
        rows.push(EncodeRow {
            what: "image encoding".into(),
            images: paths.len(),
            threads,
            ms_per_image: t.elapsed().as_secs_f64() * 1e3 / paths.len() as f64,
        });
    }
    Ok(rows)
}

/// A field of /proc/self/status in KiB (0 where unavailable).
fn memory_kib(field: &str) -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0.0)
}
