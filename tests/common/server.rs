//! Starts the real `illmrec serve` binary on an ephemeral loopback port (demo bundle, real
//! default model) for the HTTP tests and the load tool, with a small blocking HTTP client.
#![allow(dead_code)]

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

pub fn demo_bundle() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("models/demo-bundle")
}

pub struct Server {
    pub child: Child,
    pub url: String,
    pub stderr: std::sync::Arc<std::sync::Mutex<String>>,
}

impl Server {
    /// Starts `bin serve --bundle <demo> --addr 127.0.0.1:0 --threads 2 <extra>` and waits
    /// for its "listening on" line.
    pub fn start(bin: &str, extra: &[&str]) -> Server {
        Self::start_with(bin, &demo_bundle(), extra)
    }

    /// Starts the server and waits (up to 5 minutes) until `/health/ready` answers 200.
    pub fn start_with(bin: &str, bundle: &Path, extra: &[&str]) -> Server {
        let mut server = Self::spawn(bin, bundle, extra);
        server.wait_ready(Duration::from_secs(300));
        server
    }

    /// Waits until the bundle is loaded (`/health/ready` 200); panics with the server's
    /// stderr if it exits or takes longer than `limit`.
    pub fn wait_ready(&mut self, limit: Duration) {
        let a = agent();
        let start = Instant::now();
        loop {
            if let Ok(r) = a.get(format!("{}/health/ready", self.url)).call() {
                if r.status().as_u16() == 200 {
                    return;
                }
            }
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!(
                    "the server exited ({status}) while loading: {}",
                    self.stderr.lock().unwrap()
                );
            }
            assert!(
                start.elapsed() < limit,
                "the server was not ready after {limit:?}: {}",
                self.stderr.lock().unwrap()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Starts the server and returns once it listens (its bundle may still be loading).
    pub fn spawn(bin: &str, bundle: &Path, extra: &[&str]) -> Server {
        let cache =
            std::env::temp_dir().join(format!("illmrec-serve-cache-{}", std::process::id()));
        let mut child = Command::new(bin)
            .args(["serve", "--bundle"])
            .arg(bundle)
            .args(["--addr", "127.0.0.1:0"])
            .args(if extra.contains(&"--cache-dir") {
                vec![]
            } else {
                vec!["--cache-dir".into(), cache.into_os_string()]
            })
            .args(if extra.contains(&"--threads") {
                &[][..]
            } else {
                &["--threads", "2"][..]
            })
            .args(extra)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("cannot start illmrec serve");
        let stderr = std::sync::Arc::new(std::sync::Mutex::new(String::new()));
        let err_pipe = child.stderr.take().unwrap();
        let sink = stderr.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(err_pipe).lines().map_while(Result::ok) {
                let mut s = sink.lock().unwrap();
                s.push_str(&line);
                s.push('\n');
                // A long run logs a line per request: keep the last few MiB.
                if s.len() > 8 << 20 {
                    let cut = s.len() - (4 << 20);
                    let cut = (cut..s.len()).find(|&i| s.is_char_boundary(i)).unwrap_or(0);
                    s.drain(..cut);
                }
            }
        });
        let mut out = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        out.read_line(&mut line).unwrap();
        let url = line
            .trim()
            .strip_prefix("listening on ")
            .unwrap_or_else(|| panic!("unexpected first line {line:?}: {}", stderr.lock().unwrap()))
            .trim_end_matches('/')
            .to_string();
        Server { child, url, stderr }
    }

    /// The `host:port` it listens on.
    pub fn addr(&self) -> String {
        self.url.trim_start_matches("http://").to_string()
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Sends SIGTERM and waits (up to `limit`) for the exit status.
    pub fn terminate(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        // SAFETY: signalling our own child process.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let start = Instant::now();
        while start.elapsed() < limit {
            if let Some(status) = self.child.try_wait().unwrap() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// Resident memory of the server process, in KiB (Linux).
    pub fn rss_kib(&self) -> Option<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A blocking client that returns every status as a response (no error for 4xx/5xx).
pub fn agent() -> ureq::Agent {
    ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(120)))
        .build()
        .into()
}

/// A response: status, `Retry-After`, body.
pub struct Reply {
    pub status: u16,
    pub retry_after: Option<String>,
    pub content_type: String,
    pub body: String,
}

impl Reply {
    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.body))
    }
}

fn reply(r: Result<ureq::http::Response<ureq::Body>, ureq::Error>) -> Reply {
    let mut r = r.expect("HTTP request failed");
    let header = |name: &str| {
        r.headers()
            .get(name)
            .map(|v| v.to_str().unwrap_or("").to_string())
    };
    let retry_after = header("retry-after");
    let content_type = header("content-type").unwrap_or_default();
    let body = r
        .body_mut()
        .with_config()
        .limit(64 << 20)
        .read_to_string()
        .unwrap_or_default();
    Reply {
        status: r.status().as_u16(),
        retry_after,
        content_type,
        body,
    }
}

pub fn get(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.get(url).call())
}

pub fn post(agent: &ureq::Agent, url: &str, body: &str) -> Reply {
    reply(
        agent
            .post(url)
            .header("content-type", "application/json")
            .send(body),
    )
}

pub fn delete(agent: &ureq::Agent, url: &str) -> Reply {
    reply(agent.delete(url).call())
}

pub fn put(agent: &ureq::Agent, url: &str, body: &str) -> Reply {
    reply(agent.put(url).send(body))
}
