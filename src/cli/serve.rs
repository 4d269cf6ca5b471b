//! `illmrec serve`: the kiosk service. Parses the flags, opens the bundle once, starts one
//! llama.cpp context per worker and hands them to the server (src/server/).

use super::BundleArgs;
use crate::server;
use anyhow::{bail, Context, Result};
use clap::Args;
use illmrec::recommender::Recommender;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

#[derive(Args)]
pub struct ServeArgs {
    #[command(flatten)]
    bundle: BundleArgs,
    /// Address to listen on (port 0 picks a free port). Only loopback addresses unless
    /// --allow-remote is given.
    #[arg(long, default_value = "127.0.0.1:8080")]
    addr: SocketAddr,
    /// Allow listening on a non-loopback address (the API has no authentication: put it on a
    /// network only the kiosk's devices reach).
    #[arg(long)]
    allow_remote: bool,
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
}

fn seconds(value: f64, flag: &str) -> Result<Duration> {
    Duration::try_from_secs_f64(value)
        .ok()
        .filter(|d| !d.is_zero())
        .with_context(|| format!("{flag} {value} is not a positive number of seconds"))
}

pub fn run(a: ServeArgs) -> Result<()> {
    let ip = a.addr.ip();
    if !ip.is_loopback() {
        if !a.allow_remote {
            bail!(
                "refusing to listen on {} (not a loopback address) without --allow-remote: the API has no authentication",
                a.addr
            );
        }
        super::messages::warning(format_args!(
            "listening on {}, reachable from other machines: the API has no authentication",
            a.addr
        ));
    }
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
        max_sessions: a.max_sessions,
        session_idle: seconds(a.session_idle, "--session-idle")?,
        images: a.images.clone(),
        default_top_k: a.top_k,
    };
    // Bind before loading, so that a taken port fails fast.
    let listener = std::net::TcpListener::bind(cfg.addr)
        .with_context(|| format!("cannot listen on {}", cfg.addr))?;
    let first = a.bundle.open()?;
    if !first.heads.config.trained {
        super::messages::untrained(&first.heads.config.provenance);
    }
    let shared = first.shared().clone();
    let mut workers = vec![first];
    for _ in 1..a.contexts {
        workers.push(Recommender::on(shared.clone())?);
    }
    let pool = server::Pool::new(workers, cfg.queue);
    let local = listener.local_addr()?;
    println!("listening on http://{local}/");
    eprintln!(
        "serving {} ({} items) with {} context(s), queue {}; SIGTERM or Ctrl-C stops after the requests in flight",
        a.bundle.bundle.display(),
        shared.catalog.len(),
        a.contexts,
        a.queue
    );
    use std::io::Write;
    std::io::stdout().flush()?;
    server::run(listener, shared, pool, cfg)?;
    eprintln!("stopped");
    Ok(())
}
