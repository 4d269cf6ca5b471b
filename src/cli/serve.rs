//! `illmrec serve`: the kiosk service. Parses the flags, listens, and hands the server
//! (src/server/) a loader that opens the bundle once and starts one llama.cpp context per
//! worker (the server answers `/health` meanwhile).

use super::BundleArgs;
use crate::server;
use anyhow::{bail, ensure, Context, Result};
use clap::Args;
use illmrec::recommender::Recommender;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    bundle: BundleArgs,
    /// Address to listen on (port 0 picks a free port). Only loopback addresses unless
    /// --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Allow listening on a non-loopback address (without --api-key-file the API has no
    /// authentication: put it on a network only the kiosk's devices reach).
    #[arg(long)]
    allow_remote: bool,
    /// Require this file's key (first line) on every /v1/ route but item pictures, as
    /// `Authorization: Bearer KEY` or `X-API-Key: KEY` (the page takes it from `/#key=KEY`).
    #[arg(long, value_name = "FILE")]
    api_key_file: Option<PathBuf>,
    /// Turn on the admin API (item add, replace, remove with photos) behind this file's token
    /// (first line), sent as `Authorization: Bearer TOKEN`.
    #[arg(long, value_name = "FILE")]
    admin_token_file: Option<PathBuf>,
    /// llama.cpp contexts, one worker thread each (requests computed in parallel).
    #[arg(long, default_value_t = 1)]
    contexts: usize,
    /// LLM requests that may wait for a worker; more are answered 503 with Retry-After.
    #[arg(long, default_value_t = 16)]
    queue: usize,
    /// Largest request body, in bytes.
    #[arg(long, default_value_t = 1 << 20)]
    max_body: usize,
    /// Longest time a request may wait for its answer (queue included), in seconds.
    #[arg(long, default_value_t = 60.0)]
    request_timeout: f64,
    /// Longest time to receive a request body, in seconds.
    #[arg(long, default_value_t = 10.0)]
    body_timeout: f64,
    /// Longest time to receive a request's headers, in seconds (the connection is closed).
    #[arg(long, default_value_t = 10.0)]
    header_timeout: f64,
    /// Seconds after which a connection without a request in flight is closed.
    #[arg(long, default_value_t = 30.0)]
    idle_timeout: f64,
    /// Open connections at most (default: 512, or less under the descriptor limit); beyond,
    /// the longest idle one is closed, or the new one refused (503) when all are busy.
    #[arg(long)]
    max_connections: Option<usize>,
    /// Kiosk sessions kept (the least recently used is dropped beyond).
    #[arg(long, default_value_t = 64)]
    max_sessions: usize,
    /// Seconds after which an unused session is dropped.
    #[arg(long, default_value_t = 900.0)]
    session_idle: f64,
    /// Serve item images from this folder: an item's `image` path is taken relative to it, and
    /// an item without one is looked up as <id>.jpg (or .jpeg, .png, .webp).
    #[arg(long, value_name = "DIR")]
    images: Option<PathBuf>,
    /// Items returned when a request gives no top_k.
    #[arg(long, default_value_t = 10)]
    top_k: usize,
    /// The row an empty session shows, comma-separated item ids (default: the items picked most
    /// on this kiosk, topped up in catalog order).
    #[arg(long, value_delimiter = ',', value_name = "IDS")]
    featured: Vec<u64>,
    /// Show the developer controls on the page (show scores).
    #[arg(long)]
    dev_controls: bool,
    /// Request log on stderr: `json` (a line per request) or `off`.
    #[arg(long, default_value = "json", value_name = "json|off")]
    request_log: String,
}

/// The soft limit on open descriptors (Linux `/proc/self/limits`), if known.
fn descriptor_limit() -> Option<usize> {
    let limits = std::fs::read_to_string("/proc/self/limits").ok()?;
    let line = limits.lines().find(|l| l.starts_with("Max open files"))?;
    line.split_whitespace().nth(3)?.parse().ok()
}

/// Descriptors kept for the model, banks, logs and pictures beside the connections.
const RESERVED_DESCRIPTORS: usize = 64;

fn max_connections(asked: Option<usize>) -> Result<usize> {
    let room = descriptor_limit().map(|n| n.saturating_sub(RESERVED_DESCRIPTORS));
    match (asked, room) {
        (Some(0), _) => bail!("--max-connections must be at least 1"),
        (Some(n), Some(room)) if n > room => bail!(
            "--max-connections {n} is above what the descriptor limit allows ({room}: the limit less {RESERVED_DESCRIPTORS} kept for files); raise `ulimit -n` or ask for fewer"
        ),
        (Some(n), _) => Ok(n),
        (None, Some(room)) => {
            ensure!(
                room >= 8,
                "the descriptor limit is too low to serve (raise `ulimit -n`)"
            );
            Ok(room.min(512))
        }
        (None, None) => Ok(512),
    }
}

/// A secret's first line, which must be at least 16 characters.
fn read_secret(path: &Path, flag: &str) -> Result<String> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("{flag}: cannot read {}", path.display()))?;
    let secret = text.lines().next().unwrap_or("").trim().to_string();
    ensure!(
        secret.len() >= 16 && secret.bytes().all(|b| b.is_ascii_graphic()),
        "{flag} {}: the first line must be a key of at least 16 visible ASCII characters",
        path.display()
    );
    Ok(secret)
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {value} is not a positive number of seconds"))
}

pub fn run(a: ServeArgs) -> Result<()> {
    let api_key = match &a.api_key_file {
        Some(p) => Some(read_secret(p, "--api-key-file")?),
        None => None,
    };
    let admin_token = match &a.admin_token_file {
        Some(p) => Some(read_secret(p, "--admin-token-file")?),
        None => None,
    };
    let ip = a.addr.ip();
    if !ip.is_loopback() {
        if !a.allow_remote {
            bail!(
                "refusing to listen on {} (not a loopback address) without --allow-remote",
                a.addr
            );
        }
        if api_key.is_none() {
            super::messages::warning(format_args!(
                "listening on {}, reachable from other machines: without --api-key-file the API has no authentication",
                a.addr
            ));
        }
    }
    let request_log = match a.request_log.as_str() {
        "json" => true,
        "off" => false,
        other => bail!("--request-log {other:?}: expected json or off"),
    };
    anyhow::ensure!(
        (1..=64).contains(&a.contexts),
        "--contexts {} is out of range: expected 1 to 64",
        a.contexts
    );
    anyhow::ensure!(a.queue >= 1, "--queue must be at least 1");
    anyhow::ensure!(a.max_body >= 1024, "--max-body must be at least 1024 bytes");
    anyhow::ensure!(a.max_sessions >= 1, "--max-sessions must be at least 1");
    anyhow::ensure!(
        (1..=illmrec::recommender::MAX_TOP_K).contains(&a.top_k),
        "--top-k must be between 1 and {}",
        illmrec::recommender::MAX_TOP_K
    );
    if let Some(dir) = &a.images {
        anyhow::ensure!(dir.is_dir(), "--images {} is not a folder", dir.display());
    }
    let cfg = server::Config {
        addr: a.addr,
        queue: a.queue,
        max_body: a.max_body,
        request_timeout: seconds(a.request_timeout, "--request-timeout")?,
        body_timeout: seconds(a.body_timeout, "--body-timeout")?,
        header_timeout: seconds(a.header_timeout, "--header-timeout")?,
        idle_timeout: seconds(a.idle_timeout, "--idle-timeout")?,
        max_connections: max_connections(a.max_connections)?,
        max_sessions: a.max_sessions,
        session_idle: seconds(a.session_idle, "--session-idle")?,
        images: a.images.clone(),
        default_top_k: a.top_k,
        admin_token,
        api_key,
        featured: a.featured.clone(),
        dev_controls: a.dev_controls,
        request_log,
    };
    // Bind before loading, so that a taken port fails fast; `/health/ready` says 503 until
    // the bundle is loaded.
    let listener = std::net::TcpListener::bind(cfg.addr)
        .with_context(|| format!("cannot listen on {}", cfg.addr))?;
    let local = listener.local_addr()?;
    println!("listening on http://{local}/");
    eprintln!(
        "loading {} with {} context(s), queue {}, at most {} connections; SIGTERM or Ctrl-C stops after the requests in flight",
        a.bundle.bundle.display(),
        a.contexts,
        a.queue,
        cfg.max_connections
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    let contexts = a.contexts;
    let bundle = a.bundle;
    let load: server::Loader = Box::new(move || {
        let first = bundle.open()?;
        if !first.heads.config.trained {
            super::messages::untrained(&first.heads.config.provenance);
        }
        let shared = first.shared().clone();
        let mut workers = vec![first];
        for _ in 1..contexts {
            workers.push(Recommender::on(shared.clone())?);
        }
        Ok(workers)
    });
    server::run(listener, cfg, load)?;
    eprintln!("stopped");
    Ok(())
}
