//! `illmrec bench-models`: several GGUF files side by side on one bundle, in the spirit of
//! `llama-bench`: file size, load time, RSS, prompt processing, time per user and agreement with
//! a reference model on the same users (and HR@5/NDCG@5 on a dataset), as markdown, CSV, JSON
//! and a plot. `--quantize` makes the quantized copies first (cached). Each model runs in a
//! process of its own (this binary again, with the hidden `--worker JOB`), so that no model's
//! pages count in another's RSS; the library part is [`illmrec::bench::models`].

use super::{model_check, RuntimeArgs};
use anyhow::{bail, ensure, Context, Result};
use clap::{Args, ValueEnum};
use illmrec::bench::agreement::{file_type_name, gguf_file_type, random_histories};
use illmrec::bench::models::{self, Job, Machine, Measured, ModelFacts, Report, UserCase};
use illmrec::bundle::Bundle;
use illmrec::store::catalog::Catalog;
use illmrec::store::fsutil::{read_regular, read_regular_string, write_atomic};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Format {
    /// A markdown table with the machine and the command above it.
    Markdown,
    Csv,
    Json,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Split {
    Valid,
    Test,
}

#[derive(Args)]
pub struct BenchModelsArgs {
    /// The bundle whose heads, banks and catalog every model runs with.
    #[arg(long, value_name = "DIR", required_unless_present = "render")]
    bundle: Option<PathBuf>,
    /// GGUF files to compare [default: --model, else the bundle's model]. The first is the
    /// reference unless --reference names another.
    #[arg(value_name = "MODEL")]
    models: Vec<PathBuf>,
    /// Also compare these types, made from the bundle's model (or --model) with llama.cpp's
    /// quantizer into --quantize-dir (kept there and reused while the source is unchanged):
    /// f32, f16, bf16, q8_0, q6_k, q5_k_m, q5_0, q4_k_m, q4_0, q3_k_m, q2_k.
    #[arg(long, value_name = "TYPE,TYPE,...", value_delimiter = ',')]
    quantize: Vec<String>,
    /// Folder of the --quantize copies [default: cache/quantized/ beside the source model,
    /// git-ignored].
    #[arg(long, value_name = "DIR")]
    quantize_dir: Option<PathBuf>,
    /// The model the others are compared with [default: the first model].
    #[arg(long, value_name = "FILE")]
    reference: Option<PathBuf>,
    /// Users scored by every model: seeded random histories (or the first lines of --input, or
    /// the first users of --dataset).
    #[arg(long, default_value_t = 10)]
    users: usize,
    /// Items in each random history, drawn without repetition from the bundle's catalog.
    #[arg(long, value_name = "N", default_value_t = 10)]
    history_len: usize,
    /// Seed of the random histories.
    #[arg(long, default_value_t = 1)]
    seed: u64,
    /// Users from a JSON-lines file (`score`'s input: `history`, optional `candidates`) instead
    /// of random histories.
    #[arg(long, value_name = "FILE", conflicts_with = "dataset")]
    input: Option<PathBuf>,
    /// A prepared dataset: its --split users rank their target among its negatives, and HR@5
    /// and NDCG@5 are reported too.
    #[arg(long, value_name = "DIR")]
    dataset: Option<PathBuf>,
    /// Which split of --dataset.
    #[arg(long, value_enum, default_value_t = Split::Test, requires = "dataset")]
    split: Split,
    /// Untimed requests before the timed ones, in each model's process.
    #[arg(long, default_value_t = 1)]
    warmup: usize,
    /// Passes over the models, each model in a fresh process every pass; the second pass runs
    /// the models in reverse order, and so on, so that load from other work weighs on all alike.
    #[arg(long, default_value_t = 1)]
    passes: usize,
    /// Positions of the prompt-processing test (the catalog's titles as plain tokens, one
    /// batch, no prefix cache, median of 2 runs after 1 untimed); 0 skips it.
    #[arg(long, value_name = "N", default_value_t = 256)]
    pp: usize,
    /// Length of the top lists compared with the reference's.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// What goes to stdout.
    #[arg(long, value_enum, default_value_t = Format::Markdown)]
    format: Format,
    /// Also write bench-models.md, bench-models.csv, bench-models.json and the plot
    /// bench-models.png into this folder (created if missing).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Render a saved bench-models.json again (stdout per --format, files per --out) instead
    /// of measuring: the same report, e.g. after a change of the plot.
    #[arg(long, value_name = "JSON")]
    render: Option<PathBuf>,
    #[command(flatten)]
    runtime: RuntimeArgs,
    /// Internal: measure the one model of this job file in this process and write the result
    /// beside it.
    #[arg(long, hide = true, value_name = "JOB")]
    worker: Option<PathBuf>,
}

pub fn run(a: BenchModelsArgs) -> Result<()> {
    if let Some(job) = &a.worker {
        return worker(&a, job);
    }
    if let Some(saved) = &a.render {
        let report: Report = serde_json::from_slice(&read_regular(saved)?)
            .with_context(|| format!("{} is not a bench-models.json", saved.display()))?;
        return output(&a, &report);
    }
    let bundle_dir = a.bundle.as_deref().context("--bundle DIR is needed")?;
    ensure!(a.users >= 1, "--users must be at least 1");
    ensure!(a.top_k >= 1, "--top-k must be at least 1");
    ensure!(a.history_len >= 1, "--history-len must be at least 1");
    ensure!((1..=10).contains(&a.passes), "--passes takes 1 to 10");
    ensure!(
        a.pp < a.runtime.n_ctx as usize,
        "--pp {} does not fit the context of {} positions (--ctx)",
        a.pp,
        a.runtime.n_ctx
    );
    let opts = a.runtime.options();
    opts.context.check_threads()?;
    let threads = opts.context.n_threads;
    let bundle = Bundle::open(bundle_dir)?;
    let m = &bundle.manifest;
    let catalog = Catalog::parse(&bundle.read_verified(&m.items)?, &bundle.file(&m.items))?;

    // The models: those given (or the bundle's), then the quantized copies.
    let names: Vec<&str> = illmrec::engine::QUANT_TYPES
        .iter()
        .map(|(n, _)| *n)
        .collect();
    for t in &a.quantize {
        ensure!(
            names.contains(&t.to_ascii_lowercase().as_str()),
            "--quantize: unknown type '{t}' (expected one of {})",
            names.join(", ")
        );
    }
    let source = bundle.model_path(a.runtime.model.as_deref())?;
    let mut list: Vec<(PathBuf, String)> = match a.models.is_empty() {
        true => vec![(source.clone(), "given".to_string())],
        false => a
            .models
            .iter()
            .map(|p| (p.clone(), "given".into()))
            .collect(),
    };
    if let Some(r) = &a.reference {
        let same = |p: &Path| same_file(p, r);
        match list.iter().position(|(p, _)| same(p)) {
            Some(i) => {
                let item = list.remove(i);
                list.insert(0, item);
            }
            None => list.insert(0, (r.clone(), "given (--reference)".into())),
        }
    }
    for (path, _) in &list {
        let info = illmrec::engine::GgufInfo::read(path)?;
        bundle.check_model(path, &info)?;
    }
    let qdir = a
        .quantize_dir
        .clone()
        .unwrap_or_else(|| models::default_quantize_dir(&source));
    let mut notes = Vec::new();
    for t in &a.quantize {
        eprintln!(
            "quantizing {} to {t} into {}…",
            source.display(),
            qdir.display()
        );
        let q = models::ensure_quantized(&source, &qdir, t, threads)?;
        eprintln!(
            "  {} {} ({:.1} s)",
            if q.reused { "reused" } else { "made" },
            q.path.display(),
            q.seconds
        );
        if q.reused {
            notes.push(format!(
                "`{}`: `--quantize {}` of the same file, read from the quantization cache (not requantized).",
                q.path.display(),
                q.type_name
            ));
        }
        list.push((
            q.path,
            format!("--quantize {} of {}", q.type_name, source.display()),
        ));
    }
    let mut facts = Vec::new();
    for (path, origin) in &list {
        facts.push(ModelFacts {
            path: path.clone(),
            file_type: gguf_file_type(path)?.map_or("?".into(), file_type_name),
            origin: origin.clone(),
            manifest_model: model_check::is_manifest_model(&bundle, path),
            file_bytes: std::fs::metadata(path)?.len(),
        });
    }
    let others: Vec<String> = facts
        .iter()
        .filter(|f| !f.manifest_model)
        .map(|f| f.path.display().to_string())
        .collect();
    if !others.is_empty() {
        super::messages::warning(format!(
            "{} of these models {} not the model the bundle's manifest records ({}): its heads were trained on that model's hidden states ({})",
            others.len(),
            if others.len() == 1 { "is" } else { "are" },
            model_check::manifest_model(&bundle),
            others.join(", ")
        ));
    }

    // The users.
    let (users, source_text) = users(&a, &catalog)?;
    let mut machine = Machine::detect(threads);
    let tmp = tempfile::Builder::new()
        .prefix("illmrec-bench-models-")
        .tempdir()?;
    let mut jobs = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        let job = Job {
            model: f.path.clone(),
            users: users.clone(),
            warmup: a.warmup,
            pp: a.pp,
            pp_runs: 2,
            top_k: a.top_k,
        };
        let path = tmp.path().join(format!("job-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&job)?)?;
        jobs.push(path);
    }
    let mut runs: Vec<Vec<Measured>> = vec![Vec::new(); facts.len()];
    for pass in 0..a.passes {
        let order: Vec<usize> = match pass % 2 {
            0 => (0..facts.len()).collect(),
            _ => (0..facts.len()).rev().collect(),
        };
        for i in order {
            eprintln!(
                "pass {}/{}: {} ({} users)…",
                pass + 1,
                a.passes,
                facts[i].path.display(),
                users.len()
            );
            let mut m = spawn(&jobs[i])?;
            if m.item_vectors_built {
                // The load also built the bundle's item-vector cache: measure it again.
                m = spawn(&jobs[i])?;
            }
            for w in &m.warnings {
                if !runs.iter().flatten().any(|r| r.warnings.contains(w)) {
                    super::messages::warning(w);
                }
            }
            runs[i].push(m);
        }
    }
    machine.load_after = illmrec::bench::report::current_load();
    let rows = facts
        .iter()
        .zip(&runs)
        .enumerate()
        .map(|(i, (f, r))| models::row(f, r, &runs[0], i == 0, a.top_k))
        .collect::<Result<Vec<_>>>()?;
    let report = Report {
        command: command_line(),
        machine,
        bundle: bundle_dir.display().to_string(),
        manifest_model: model_check::manifest_model(&bundle),
        users_source: source_text,
        users: users.len(),
        warmup: a.warmup,
        passes: a.passes,
        top_k: a.top_k,
        rows,
        notes,
    };
    output(&a, &report)
}

/// Prints the report per --format and writes the four files into --out.
fn output(a: &BenchModelsArgs, report: &Report) -> Result<()> {
    let markdown = report.markdown();
    let csv = report.csv();
    let json = serde_json::to_string_pretty(report)?;
    if let Some(out) = &a.out {
        std::fs::create_dir_all(out).with_context(|| format!("cannot create {}", out.display()))?;
        let png = report.png(1000, 640)?;
        let files: [(&str, &[u8]); 4] = [
            ("bench-models.md", markdown.as_bytes()),
            ("bench-models.csv", csv.as_bytes()),
            ("bench-models.json", json.as_bytes()),
            ("bench-models.png", &png),
        ];
        for (name, bytes) in files {
            write_atomic(&out.join(name), |w| Ok(w.write_all(bytes)?))?;
        }
        eprintln!(
            "wrote bench-models.md, bench-models.csv, bench-models.json and bench-models.png to {}",
            out.display()
        );
    }
    match a.format {
        Format::Markdown => print!("{markdown}"),
        Format::Csv => print!("{csv}"),
        Format::Json => println!("{json}"),
    }
    Ok(())
}

/// Whether two paths name the same file (or the same path when either is missing).
fn same_file(a: &Path, b: &Path) -> bool {
    match (a.canonicalize(), b.canonicalize()) {
        (Ok(x), Ok(y)) => x == y,
        _ => a == b,
    }
}

/// The users every model scores, and where they came from in words.
fn users(a: &BenchModelsArgs, catalog: &Catalog) -> Result<(Vec<UserCase>, String)> {
    let known = |ids: &[u64]| ids.iter().all(|&id| catalog.get(id).is_some());
    if let Some(dataset) = &a.dataset {
        let split = match a.split {
            Split::Valid => "valid",
            Split::Test => "test",
        };
        let cases = illmrec::method::eval::load_split(dataset, split)?;
        let total = cases.len();
        let users: Vec<UserCase> = cases
            .into_iter()
            .filter(|c| known(&c.history) && known(&c.candidates()))
            .take(a.users)
            .map(|c| UserCase {
                candidates: Some(c.candidates()),
                target: Some(c.target),
                history: c.history,
            })
            .collect();
        ensure!(
            !users.is_empty(),
            "no user of {} has all its items in the bundle's catalog: a bundle is compared on a dataset prepared for its catalog",
            dataset.display()
        );
        let text = format!(
            "the first {} {split} users of {} whose items are all in the catalog (of {total}), each ranking its target among its negatives",
            users.len(),
            dataset.display()
        );
        return Ok((users, text));
    }
    if let Some(input) = &a.input {
        #[derive(serde::Deserialize)]
        struct Line {
            history: Vec<u64>,
            #[serde(default)]
            candidates: Option<Vec<u64>>,
        }
        let text = read_regular_string(input)?;
        let mut users = Vec::new();
        for (n, line) in text.lines().enumerate() {
            if line.trim().is_empty() {
                continue;
            }
            if users.len() == a.users {
                break;
            }
            let l: Line = serde_json::from_str(line)
                .with_context(|| format!("{}:{}: not a user line", input.display(), n + 1))?;
            ensure!(
                !l.history.is_empty() && l.candidates.as_ref().is_none_or(|c| !c.is_empty()),
                "{}:{}: an empty history or candidate list",
                input.display(),
                n + 1
            );
            for id in l.history.iter().chain(l.candidates.iter().flatten()) {
                ensure!(
                    catalog.get(*id).is_some(),
                    "{}:{}: item {id} is not in the catalog",
                    input.display(),
                    n + 1
                );
            }
            users.push(UserCase {
                history: l.history,
                candidates: l.candidates,
                target: None,
            });
        }
        ensure!(!users.is_empty(), "{} has no user line", input.display());
        let text = format!("the first {} lines of {}", users.len(), input.display());
        return Ok((users, text));
    }
    let ids: Vec<u64> = catalog.items().iter().map(|i| i.id).collect();
    ensure!(!ids.is_empty(), "the bundle's catalog is empty");
    let users: Vec<UserCase> = random_histories(&ids, a.users, a.history_len, a.seed)
        .into_iter()
        .map(|history| UserCase {
            history,
            candidates: None,
            target: None,
        })
        .collect();
    let text = format!(
        "seeded random histories of {} catalog items (--seed {}), each ranking the whole catalog ({} items) but its history",
        a.history_len.min(ids.len()),
        a.seed,
        ids.len()
    );
    Ok((users, text))
}

/// The result file of a job file.
fn result_path(job: &Path) -> PathBuf {
    job.with_extension("result.json")
}

/// Runs one job in a fresh process of this binary (the same command line plus `--worker`), its
/// stderr kept and shown only if it fails.
fn spawn(job: &Path) -> Result<Measured> {
    let exe = std::env::current_exe().context("cannot find this binary to run a model in")?;
    let _ = std::fs::remove_file(result_path(job));
    let out = Command::new(exe)
        .args(std::env::args_os().skip(1))
        .arg("--worker")
        .arg(job)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .output()
        .context("cannot start a measuring process")?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr);
        let why = stderr
            .lines()
            .rfind(|l| !l.trim().is_empty())
            .unwrap_or("no message")
            .trim_start_matches("error: ")
            .to_string();
        bail!("measuring {} failed ({}): {why}", job.display(), out.status);
    }
    let bytes = read_regular(&result_path(job))?;
    serde_json::from_slice(&bytes).context("a measuring process wrote an unreadable result")
}

/// `--worker JOB`: measures the job's model in this process and writes the result beside it.
fn worker(a: &BenchModelsArgs, job_path: &Path) -> Result<()> {
    let job: Job = serde_json::from_slice(&read_regular(job_path)?)
        .with_context(|| format!("{} is not a bench-models job", job_path.display()))?;
    let bundle = a.bundle.as_deref().context("--bundle DIR is needed")?;
    let m = models::measure(bundle, a.runtime.options(), &job)?;
    let bytes = serde_json::to_vec(&m)?;
    write_atomic(&result_path(job_path), |w| Ok(w.write_all(&bytes)?))
}

/// This process's command line as one shell-quoted string, starting `illmrec`.
fn command_line() -> String {
    let quote = |s: String| {
        if !s.is_empty()
            && s.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_./=,:@+".contains(c))
        {
            s
        } else {
            format!("'{}'", s.replace('\'', "'\\''"))
        }
    };
    std::iter::once("illmrec".to_string())
        .chain(
            std::env::args_os()
                .skip(1)
                .map(|s| quote(s.to_string_lossy().into_owned())),
        )
        .collect::<Vec<_>>()
        .join(" ")
}
