//! Long fuzzing campaigns over every parser of outside bytes (see `illmrec::fuzz`).
//!
//! ```sh
//! cargo run --release --example fuzz -- [--target NAME|all] [--inputs 1000000] [--seed 1] [--chunk 100000]
//! ```
//!
//! Each target runs in child processes (this same program with `--child`), one chunk of inputs
//! each, with a memory limit: a panic is reported by the child, and an abort (llama.cpp's
//! `GGML_ASSERT`, a failed allocation) or a hang ends the child, after which the chunk is split
//! until the single input is found. Inputs are replayable from (target, seed, index).

use illmrec::fuzz::{run, Target};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// An input slower than this is reported as slow; a chunk gets this per input, plus a minute.
const SLOW: Duration = Duration::from_secs(1);
/// Address-space limit of a child: a parser that tries to allocate more aborts, and is found.
const CHILD_MEMORY: u64 = 4 << 30;

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn num(args: &[String], name: &str, default: u64) -> u64 {
    arg(args, name).map_or(default, |v| v.parse().expect("a number"))
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let seed = num(&args, "--seed", 1);
    if let Some(name) = arg(&args, "--child") {
        let target = Target::parse(&name).expect("a target name");
        let report = run(
            target,
            seed,
            num(&args, "--from", 0),
            num(&args, "--to", 0),
            SLOW,
        );
        for (i, msg) in &report.panics {
            println!("panic {i} {}", msg.replace('\n', " "));
        }
        for (i, t) in &report.slow {
            println!("slow {i} {:.3}s", t.as_secs_f64());
        }
        println!(
            "done {} accepted {} slowest {:.6}s",
            report.inputs,
            report.accepted,
            report.slowest.as_secs_f64()
        );
        return;
    }
    let inputs = num(&args, "--inputs", 1_000_000);
    let chunk = num(&args, "--chunk", 100_000).max(1);
    let targets: Vec<Target> = match arg(&args, "--target").as_deref() {
        None | Some("all") => Target::ALL.to_vec(),
        Some(n) => vec![Target::parse(n).unwrap_or_else(|| panic!("unknown target {n}"))],
    };
    println!(
        "| parser | inputs | seed | accepted | seconds | slowest input | panics | aborts | hangs |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    let mut bad = 0;
    for t in targets {
        let started = Instant::now();
        let mut findings = Findings::default();
        let mut from = 0;
        while from < inputs {
            let to = (from + chunk).min(inputs);
            run_chunk(t, seed, from, to, &mut findings);
            from = to;
        }
        for line in &findings.lines {
            eprintln!("{}: {line}", t.name());
        }
        bad += findings.panics + findings.aborts + findings.hangs;
        println!(
            "| {} | {inputs} | {seed} | {} | {:.1} | {:.4} s | {} | {} | {} |",
            t.name(),
            findings.accepted,
            started.elapsed().as_secs_f64(),
            findings.slowest,
            findings.panics,
            findings.aborts,
            findings.hangs
        );
    }
    std::process::exit(if bad == 0 { 0 } else { 1 });
}

#[derive(Default)]
struct Findings {
    panics: usize,
    aborts: usize,
    hangs: usize,
    accepted: u64,
    slowest: f64,
    lines: Vec<String>,
}

/// Runs inputs `from..to` in a child; on an abnormal end, splits the range to find the input.
fn run_chunk(t: Target, seed: u64, from: u64, to: u64, f: &mut Findings) {
    let limit = SLOW * (to - from) as u32 + Duration::from_secs(60);
    let mut cmd = Command::new(std::env::current_exe().unwrap());
    cmd.args(["--child", t.name(), "--seed", &seed.to_string()])
        .args(["--from", &from.to_string(), "--to", &to.to_string()])
        .stdout(Stdio::piped())
        .stderr(Stdio::null());
    #[cfg(unix)]
    {
        use std::os::unix::process::CommandExt;
        // SAFETY: only async-signal-safe setrlimit between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                let lim = libc::rlimit {
                    rlim_cur: CHILD_MEMORY,
                    rlim_max: CHILD_MEMORY,
                };
                libc::setrlimit(libc::RLIMIT_AS, &lim);
                Ok(())
            });
        }
    }
    let mut child = cmd.spawn().expect("cannot start a child");
    let stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || std::io::read_to_string(stdout).unwrap_or_default());
    let started = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break Some(s);
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            break None;
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let out = reader.join().unwrap();
    let finished = matches!(status, Some(s) if s.success()) && out.contains("done ");
    if finished {
        for line in out.lines() {
            if line.starts_with("panic ") {
                f.panics += 1;
                f.lines.push(line.to_string());
            } else if line.starts_with("slow ") {
                f.lines.push(line.to_string());
            } else if let Some(rest) = line.strip_prefix("done ") {
                let words: Vec<&str> = rest.split(' ').collect();
                f.accepted += words[2].parse::<u64>().unwrap();
                let slowest: f64 = words[4].trim_end_matches('s').parse().unwrap();
                f.slowest = f.slowest.max(slowest);
            }
        }
        return;
    }
    if to - from == 1 {
        match status {
            None => {
                f.hangs += 1;
                f.lines
                    .push(format!("hang {from} (over {}s)", limit.as_secs()));
            }
            Some(s) => {
                f.aborts += 1;
                f.lines.push(format!("abort {from} ({s})"));
            }
        }
        return;
    }
    let mid = from + (to - from) / 2;
    run_chunk(t, seed, from, mid, f);
    run_chunk(t, seed, mid, to, f);
}
