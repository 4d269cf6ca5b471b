//! The comparison of several models with a reference on the same users: the machine it ran on,
//! one row per model ([`row`]), and the [`Report`] as markdown, CSV, JSON and a PNG plot.

use super::super::agreement::{spearman_scored, top1_agrees, top_k_overlap};
use super::*;
use crate::bench::plot::FONT;
use anyhow::{ensure, Context as _, Result};
use serde::{Deserialize, Serialize};
use std::fmt::Write as _;
use std::path::PathBuf;

/// The machine and build a comparison ran on.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo with its family and model numbers.
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub cpus: usize,
    /// The CPU's instruction sets and the AMX verdict (`illmrec info`'s `cpu:` line).
    pub cpu_features: String,
    /// ggml's CPU build (`cpu build:`).
    pub cpu_build: String,
    /// OpenBLAS in use (`blas:`).
    pub blas: String,
    /// illmrec's AVX-512 kernels (`kernels:`).
    pub kernels: String,
    /// illmrec's version, profile and cargo features.
    pub build: String,
    /// LLM threads.
    pub threads: i32,
    /// 1-minute load average before and after the runs (other work on the machine shows here).
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

impl Machine {
    /// This machine's facts (the load after is left empty).
    pub fn detect(threads: i32) -> Self {
        let mut features = vec![];
        for (on, name) in [
            (cfg!(feature = "cuda"), "cuda"),
            (cfg!(feature = "metal"), "metal"),
            (cfg!(feature = "cpu-variants"), "cpu-variants"),
        ] {
            if on {
                features.push(name);
            }
        }
        let build = format!(
            "illmrec {} ({} build{})",
            env!("CARGO_PKG_VERSION"),
            if cfg!(debug_assertions) {
                "debug"
            } else {
                "release"
            },
            match features.is_empty() {
                true => ", default features".to_string(),
                false => format!(", features {}", features.join(", ")),
            }
        );
        Machine {
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| crate::bench::report::cpu_model_name(&t))
                .unwrap_or_else(|| "unknown".into()),
            cpus: crate::engine::default_threads() as usize,
            cpu_features: crate::engine::cpu::Features::detect().to_string(),
            cpu_build: crate::engine::cpu_build(),
            blas: crate::engine::blas::describe(),
            kernels: crate::engine::kernels::describe(),
            build,
            threads,
            load_before: crate::bench::report::current_load(),
            load_after: None,
        }
    }

    /// One line for tables' captions.
    pub fn line(&self) -> String {
        let load = |l: Option<f64>| l.map_or("?".into(), |l| format!("{l:.1}"));
        format!(
            "{}, {} CPUs, {} LLM threads; cpu: {}; ggml CPU build: {}; blas: {}; kernels: {}; {}; load average {} before, {} after",
            self.cpu,
            self.cpus,
            self.threads,
            self.cpu_features,
            self.cpu_build,
            self.blas,
            self.kernels,
            self.build,
            load(self.load_before),
            load(self.load_after)
        )
    }
}

/// One model's line of the comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct ModelRow {
    /// The file name.
    pub label: String,
    pub path: String,
    /// `general.file_type` as `illmrec quantize --type` names it.
    pub file_type: String,
    /// How the file came to be: `given`, or `--quantize TYPE` of its source.
    pub origin: String,
    /// Whether it is the model the bundle's manifest records (by size); its heads were trained
    /// on that model's states.
    pub manifest_model: bool,
    pub reference: bool,
    pub file_mib: f64,
    /// Median of the passes' load times.
    pub load_s: f64,
    /// Largest over the passes.
    pub rss_after_load_mib: f64,
    pub peak_rss_mib: f64,
    pub pp_positions: usize,
    pub pp_positions_per_s: Option<f64>,
    /// Timed requests (users × passes).
    pub requests: usize,
    pub mean_positions: f64,
    pub ms_p50: f64,
    pub ms_p90: f64,
    pub ms_mean: f64,
    /// Mean time per request over the reference's.
    pub time_vs_reference: f64,
    /// Mean over users of the share of the reference's top `k` in this model's top `k`.
    pub top_k_overlap: f64,
    /// Share of users whose first item is the reference's.
    pub top1_agreement: f64,
    /// Mean over users of Spearman's coefficient of the candidates' scores against the
    /// reference's; `None` when no user had two scored candidates.
    pub spearman: Option<f64>,
    /// On a dataset: HR@5 and NDCG@5 of the target among its candidates.
    pub hr5: Option<f64>,
    pub ndcg5: Option<f64>,
}

fn median(v: &[f64]) -> f64 {
    summarize(v).map_or(f64::NAN, |s| s.p50)
}

/// Agreement of `m` with `reference` on the same users: (top-k overlap, top-1 agreement,
/// Spearman), each averaged over users.
pub fn agreement(reference: &Measured, m: &Measured, k: usize) -> Result<(f64, f64, Option<f64>)> {
    ensure!(
        reference.users.len() == m.users.len(),
        "{} scored {} users, the reference {}",
        m.model.display(),
        m.users.len(),
        reference.users.len()
    );
    let n = m.users.len().max(1) as f64;
    let mut overlap = 0.0;
    let mut top1 = 0usize;
    let mut rhos = Vec::new();
    for (r, u) in reference.users.iter().zip(&m.users) {
        overlap += top_k_overlap(&r.top, &u.top, k);
        top1 += top1_agrees(&r.top, &u.top) as usize;
        if let Some(rho) = spearman_scored(&r.scores, &u.scores) {
            rhos.push(rho);
        }
    }
    let spearman = (!rhos.is_empty()).then(|| rhos.iter().sum::<f64>() / rhos.len() as f64);
    Ok((overlap / n, top1 as f64 / n, spearman))
}

/// What the report says about a model besides its measurements.
#[derive(Clone, Debug)]
pub struct ModelFacts {
    pub path: PathBuf,
    pub file_type: String,
    pub origin: String,
    pub manifest_model: bool,
    pub file_bytes: u64,
}

/// One model's row from its passes (`runs`, at least one) and the reference's: times pooled over
/// the passes; agreement and ranking quality from the first pass (scores do not depend on it).
pub fn row(
    facts: &ModelFacts,
    runs: &[Measured],
    reference: &[Measured],
    is_reference: bool,
    k: usize,
) -> Result<ModelRow> {
    let first = runs.first().context("no run of this model")?;
    let ref_first = reference.first().context("no run of the reference")?;
    let times: Vec<f64> = runs
        .iter()
        .flat_map(|m| m.users.iter().map(|u| u.ms))
        .collect();
    let ref_times: Vec<f64> = reference
        .iter()
        .flat_map(|m| m.users.iter().map(|u| u.ms))
        .collect();
    let s = summarize(&times).context("no request was timed")?;
    let ref_mean = summarize(&ref_times).context("no reference request")?.mean;
    let (top_k_overlap, top1_agreement, spearman) = agreement(ref_first, first, k)?;
    let ranks: Vec<usize> = first.users.iter().filter_map(|u| u.rank).collect();
    let metrics = (!ranks.is_empty()).then(|| Metrics::from_ranks(&ranks));
    let pp: Vec<f64> = runs
        .iter()
        .flat_map(|m| m.pp_seconds.iter().copied())
        .collect();
    let positions: usize = first.users.iter().map(|u| u.positions).sum();
    Ok(ModelRow {
        label: facts.path.file_name().map_or_else(
            || facts.path.display().to_string(),
            |n| n.to_string_lossy().into_owned(),
        ),
        path: facts.path.display().to_string(),
        file_type: facts.file_type.clone(),
        origin: facts.origin.clone(),
        manifest_model: facts.manifest_model,
        reference: is_reference,
        file_mib: facts.file_bytes as f64 / (1u64 << 20) as f64,
        load_s: median(&runs.iter().map(|m| m.load_s).collect::<Vec<_>>()),
        rss_after_load_mib: runs
            .iter()
            .map(|m| m.rss_after_load_mib)
            .fold(0.0, f64::max),
        peak_rss_mib: runs.iter().map(|m| m.peak_rss_mib).fold(0.0, f64::max),
        pp_positions: first.pp_positions,
        pp_positions_per_s: (!pp.is_empty()).then(|| first.pp_positions as f64 / median(&pp)),
        requests: s.n,
        mean_positions: positions as f64 / first.users.len().max(1) as f64,
        ms_p50: s.p50,
        ms_p90: s.p90,
        ms_mean: s.mean,
        time_vs_reference: s.mean / ref_mean,
        top_k_overlap,
        top1_agreement,
        spearman,
        hr5: metrics.as_ref().map(|m| m.hr5),
        ndcg5: metrics.as_ref().map(|m| m.ndcg5),
    })
}

/// A finished comparison.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Report {
    /// The command line that made it.
    pub command: String,
    pub machine: Machine,
    pub bundle: String,
    /// The model the bundle's manifest records (its heads were trained on its states).
    pub manifest_model: String,
    /// Where the users came from.
    pub users_source: String,
    pub users: usize,
    pub warmup: usize,
    pub passes: usize,
    pub top_k: usize,
    pub rows: Vec<ModelRow>,
    /// Things the reader must know (models that are not the manifest's, reused copies).
    pub notes: Vec<String>,
}

/// "1 user", "2 users", "2 passes".
fn plural(n: usize, noun: &str) -> String {
    match (n, noun.ends_with('s')) {
        (1, _) => format!("1 {noun}"),
        (_, true) => format!("{n} {noun}es"),
        _ => format!("{n} {noun}s"),
    }
}

fn opt(v: Option<f64>, digits: usize) -> String {
    v.map_or("–".into(), |v| format!("{v:.digits$}"))
}

impl Report {
    fn has_quality(&self) -> bool {
        self.rows.iter().any(|r| r.hr5.is_some())
    }

    /// Markdown: the machine, the command and the users, then one table line per model.
    pub fn markdown(&self) -> String {
        let mut s = String::new();
        let _ = writeln!(s, "**Machine:** {}  ", self.machine.line());
        let _ = writeln!(s, "**Command:** `{}`  ", self.command);
        let _ = writeln!(
            s,
            "**Bundle:** {} (heads trained on {}); {}: {}; {} per model, {}{}",
            self.bundle,
            self.manifest_model,
            plural(self.users, "user"),
            self.users_source,
            plural(self.warmup, "warm-up request"),
            plural(self.passes, "pass"),
            match self.rows.first() {
                Some(r) => format!(", {:.0} prompt positions per user", r.mean_positions),
                None => String::new(),
            }
        );
        let k = self.top_k;
        let pp = match self.rows.first().map_or(0, |r| r.pp_positions) {
            0 => String::new(),
            n => n.to_string(),
        };
        s.push('\n');
        let quality = self.has_quality();
        let _ = write!(
            s,
            "| model | type | file MiB | load s | RSS MiB | peak RSS MiB | pp{pp} positions/s | ms/user p50 | p90 | time vs ref | top-{k} overlap | top-1 agreement | Spearman |"
        );
        if quality {
            s.push_str(" HR@5 | NDCG@5 |");
        }
        s.push('\n');
        s.push_str(&"|---".repeat(13 + 2 * quality as usize));
        s.push_str("|\n");
        for r in &self.rows {
            let mut name = format!("`{}`", r.label);
            if r.reference {
                name.push_str(" (reference)");
            }
            if !r.manifest_model {
                name.push_str(" ¹");
            }
            let _ = write!(
                s,
                "| {name} | {} | {:.0} | {:.2} | {:.0} | {:.0} | {} | {:.0} | {:.0} | {:.2}× | {:.3} | {:.3} | {} |",
                r.file_type,
                r.file_mib,
                r.load_s,
                r.rss_after_load_mib,
                r.peak_rss_mib,
                opt(r.pp_positions_per_s, 0),
                r.ms_p50,
                r.ms_p90,
                r.time_vs_reference,
                r.top_k_overlap,
                r.top1_agreement,
                opt(r.spearman, 4)
            );
            if quality {
                let _ = write!(s, " {} | {} |", opt(r.hr5, 4), opt(r.ndcg5, 4));
            }
            s.push('\n');
        }
        s.push('\n');
        if self.rows.iter().any(|r| !r.manifest_model) {
            let _ = writeln!(
                s,
                "¹ not the model the bundle's manifest records ({}): the heads were trained on that model's hidden states, so this row shows what these heads give on another model's states.\n",
                self.manifest_model
            );
        }
        let _ = writeln!(
            s,
            "RSS after the load and peak RSS are each model's own process. Agreement is with the reference on the same users: top-{k} overlap (share of its top {k}), top-1 agreement (share of users with the same first item), Spearman (rank correlation of every candidate's score, ties averaged; mean over users).{}",
            if quality {
                " HR@5 and NDCG@5: the target's rank among its candidates."
            } else {
                ""
            }
        );
        for n in &self.notes {
            let _ = writeln!(s, "\n{n}");
        }
        s
    }

    /// CSV: a header and one line per model; every line repeats the machine (CPU, features,
    /// build, kernels, threads), so a line read alone still says where it was measured.
    pub fn csv(&self) -> String {
        let mut s = String::from(
            "model,path,type,origin,manifest_model,reference,file_mib,load_s,rss_after_load_mib,peak_rss_mib,pp_positions,pp_positions_per_s,requests,mean_positions,ms_p50,ms_p90,ms_mean,time_vs_reference,top_k,top_k_overlap,top1_agreement,spearman,hr5,ndcg5,cpu,cpu_features,cpu_build,blas,kernels,build,threads\n",
        );
        let q = |t: &str| format!("\"{}\"", t.replace('"', "\"\""));
        let o = |v: Option<f64>| v.map_or(String::new(), |v| format!("{v:.6}"));
        let m = &self.machine;
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{},{},{},{},{},{},{:.3},{:.4},{:.1},{:.1},{},{},{},{:.1},{:.3},{:.3},{:.3},{:.4},{},{:.6},{:.6},{},{},{},{},{},{},{},{},{},{}",
                q(&r.label),
                q(&r.path),
                r.file_type,
                q(&r.origin),
                r.manifest_model,
                r.reference,
                r.file_mib,
                r.load_s,
                r.rss_after_load_mib,
                r.peak_rss_mib,
                r.pp_positions,
                o(r.pp_positions_per_s),
                r.requests,
                r.mean_positions,
                r.ms_p50,
                r.ms_p90,
                r.ms_mean,
                r.time_vs_reference,
                self.top_k,
                r.top_k_overlap,
                r.top1_agreement,
                o(r.spearman),
                o(r.hr5),
                o(r.ndcg5),
                q(&m.cpu),
                q(&m.cpu_features),
                q(&m.cpu_build),
                q(&m.blas),
                q(&m.kernels),
                q(&m.build),
                m.threads
            );
        }
        s
    }

    /// The plot as PNG bytes: time per user (p50) against top-k agreement with the reference,
    /// one labelled point per model (the point's area follows the file size), the machine below.
    pub fn png(&self, width: u32, height: u32) -> Result<Vec<u8>> {
        plot(self, width, height)
    }
}

fn plot(report: &Report, width: u32, height: u32) -> Result<Vec<u8>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};
    crate::bench::plot::register_font();
    ensure!(
        width >= 300 && height >= 200,
        "a plot needs at least 300×200 pixels"
    );
    ensure!(!report.rows.is_empty(), "nothing to plot: no model");
    let e = crate::bench::plot::draw_error;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (chart_area, footer) = root.split_vertically(height - 56);
        let x_max = report
            .rows
            .iter()
            .map(|r| r.ms_p50)
            .fold(0.0, f64::max)
            .max(1e-9)
            * 1.25;
        let y_min = report
            .rows
            .iter()
            .map(|r| r.top_k_overlap)
            .fold(1.0, f64::min)
            .min(0.9)
            - 0.05;
        let mut chart = ChartBuilder::on(&chart_area)
            .caption(
                format!(
                    "Models on {} users: time against agreement with the reference",
                    report.users
                ),
                (FONT, 18),
            )
            .margin(14)
            .x_label_area_size(40)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..x_max, y_min.max(0.0)..1.02)
            .map_err(|x| e(&x))?;
        chart
            .configure_mesh()
            .x_desc("ms per user (p50)")
            .y_desc(format!("top-{} overlap with the reference", report.top_k))
            .x_label_formatter(&|v| format!("{v:.0}"))
            .y_label_formatter(&|v| format!("{v:.2}"))
            .label_style((FONT, 13))
            .axis_desc_style((FONT, 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()
            .map_err(|x| e(&x))?;
        let palette = [
            RGBColor(31, 119, 180),
            RGBColor(255, 127, 14),
            RGBColor(44, 160, 44),
            RGBColor(214, 39, 40),
            RGBColor(148, 103, 189),
            RGBColor(140, 86, 75),
            RGBColor(227, 119, 194),
            RGBColor(127, 127, 127),
        ];
        let biggest = report.rows.iter().map(|r| r.file_mib).fold(1.0, f64::max);
        // Points at about the same height whose labels go the same way get their labels
        // stacked, one line apart, instead of printed over each other.
        let near = (1.02 - y_min.max(0.0)) * 0.03;
        let right_of = |r: &ModelRow| r.ms_p50 > x_max / 2.0;
        for (i, r) in report.rows.iter().enumerate() {
            let stacked = report.rows[..i]
                .iter()
                .filter(|o| {
                    (o.top_k_overlap - r.top_k_overlap).abs() < near && right_of(o) == right_of(r)
                })
                .count() as i32;
            let c = palette[i % palette.len()];
            let radius = (4.0 + 14.0 * (r.file_mib / biggest).sqrt()) as i32;
            let at = (r.ms_p50, r.top_k_overlap);
            chart
                .draw_series(std::iter::once(Circle::new(
                    at,
                    radius,
                    c.mix(0.6).filled(),
                )))
                .map_err(|x| e(&x))?;
            let label = format!("{} ({}, {:.0} MiB)", r.label, r.file_type, r.file_mib);
            // Labels of points in the right half go to their left, so that none leaves the plot.
            let right = right_of(r);
            let gap = radius + 4;
            // In the point's colour, so that stacked labels still say which point they name.
            let style = (FONT, 13).into_font().color(&c).pos(Pos::new(
                if right { HPos::Right } else { HPos::Left },
                VPos::Center,
            ));
            chart
                .draw_series(std::iter::once(
                    EmptyElement::at(at)
                        + Text::new(label, (if right { -gap } else { gap }, 15 * stacked), style),
                ))
                .map_err(|x| e(&x))?;
        }
        let m = &report.machine;
        let grey = (FONT, 12).into_font().color(&RGBColor(60, 60, 60));
        let lines = [
            format!("{}, {} LLM threads; {}", m.cpu, m.threads, m.build),
            m.cpu_features.clone(),
            format!("kernels: {}", m.kernels),
        ];
        for (i, line) in lines.into_iter().enumerate() {
            footer
                .draw(&Text::new(line, (10, 4 + 16 * i as i32), grey.clone()))
                .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    crate::bench::plot::png(width, height, buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn user(ms: f64, top: &[u64], scores: &[f32], rank: Option<usize>) -> UserResult {
        UserResult {
            ms,
            positions: 100,
            top: top.to_vec(),
            scores: scores.iter().map(|&s| Some(s)).collect(),
            rank,
        }
    }

    fn measured(model: &str, users: Vec<UserResult>) -> Measured {
        Measured {
            model: model.into(),
            load_s: 1.0,
            item_vectors_built: false,
            rss_after_load_mib: 100.0,
            peak_rss_mib: 120.0,
            pp_positions: 8,
            pp_seconds: vec![0.5, 0.25],
            users,
            warnings: vec![],
        }
    }

    fn facts(path: &str, manifest: bool) -> ModelFacts {
        ModelFacts {
            path: path.into(),
            file_type: "f32".into(),
            origin: "given".into(),
            manifest_model: manifest,
            file_bytes: 3 << 20,
        }
    }

    #[test]
    fn rows_compare_with_the_reference() {
        let reference = vec![measured(
            "a.gguf",
            vec![
                user(100.0, &[1, 2, 3], &[3.0, 2.0, 1.0, 0.0], Some(0)),
                user(300.0, &[4, 5, 6], &[0.0, 1.0, 2.0, 3.0], Some(7)),
            ],
        )];
        let other = vec![measured(
            "b.gguf",
            vec![
                user(200.0, &[1, 2, 9], &[3.0, 2.0, 1.0, 0.0], Some(1)),
                user(600.0, &[5, 4, 7], &[3.0, 2.0, 1.0, 0.0], Some(4)),
            ],
        )];
        let r = row(&facts("x/a.gguf", true), &reference, &reference, true, 3).unwrap();
        assert_eq!(
            (r.top_k_overlap, r.top1_agreement, r.spearman),
            (1.0, 1.0, Some(1.0))
        );
        assert_eq!(r.time_vs_reference, 1.0);
        assert_eq!(r.label, "a.gguf");
        assert_eq!(r.pp_positions_per_s, Some(8.0 / 0.375));
        assert_eq!((r.hr5, r.requests), (Some(0.5), 2));
        let b = row(&facts("b.gguf", false), &other, &reference, false, 3).unwrap();
        assert!(
            (b.top_k_overlap - 2.0 / 3.0).abs() < 1e-12,
            "(2/3 + 2/3) / 2"
        );
        assert_eq!(b.top1_agreement, 0.5);
        assert!(b.spearman.unwrap().abs() < 1e-12, "(1 + -1) / 2");
        assert_eq!(b.time_vs_reference, 2.0);
        assert_eq!((b.ms_p50, b.hr5), (400.0, Some(1.0)));

        let report = Report {
            command: "illmrec bench-models".into(),
            machine: Machine::default(),
            bundle: "bundle".into(),
            manifest_model: "a.gguf".into(),
            users_source: "test".into(),
            users: 2,
            warmup: 0,
            passes: 1,
            top_k: 3,
            rows: vec![r, b],
            notes: vec![],
        };
        let md = report.markdown();
        let lines: Vec<&str> = md.lines().filter(|l| l.starts_with("| `")).collect();
        assert_eq!(lines.len(), 2, "{md}");
        assert!(
            lines[0].starts_with("| `a.gguf` (reference) | f32 | 3 |"),
            "{md}"
        );
        assert!(
            lines[0].contains("| 1.000 | 1.000 | 1.0000 | 0.5000 |"),
            "{md}"
        );
        assert!(lines[1].starts_with("| `b.gguf` ¹ |"), "{md}");
        assert!(md.contains("¹ not the model the bundle's manifest records"));
        let csv = report.csv();
        assert_eq!(csv.lines().count(), 3);
        let header: Vec<&str> = csv.lines().next().unwrap().split(',').collect();
        assert_eq!(header.len(), 31);
        assert!(csv
            .lines()
            .nth(1)
            .unwrap()
            .starts_with("\"a.gguf\",\"x/a.gguf\",f32,"));
        let png = report.png(640, 360).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 360));
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(dark > 200, "no text or axes drawn ({dark} dark pixels)");
        assert!(report.png(10, 10).is_err());
    }

    #[test]
    fn users_of_different_counts_do_not_compare() {
        let a = measured("a", vec![user(1.0, &[1], &[1.0, 2.0], None)]);
        let b = measured("b", vec![]);
        assert!(agreement(&a, &b, 10).is_err());
    }

    #[test]
    fn quantized_copies_are_named_by_source_and_type() {
        let p = quantized_path(Path::new("c"), Path::new("m/gemma-3-270m-f32.gguf"), "Q8_0");
        assert_eq!(p, Path::new("c/gemma-3-270m-f32.q8_0.gguf"));
        assert_eq!(
            default_quantize_dir(Path::new("models/x.gguf")),
            Path::new("models/cache/quantized")
        );
    }
}
