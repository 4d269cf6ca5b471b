//! The report of a history-length sweep ([`super::sweep`]): the machine and build it ran on, the
//! runtime-over-engine ratios, its markdown, CSV and JSON renderings and its PNG plot (drawn
//! with plotters in an embedded DejaVu font, so no system font is needed).

use super::sweep::{Plan, Row, Style};
use crate::bench::plot::FONT;
use crate::recommender::Recommender;
use anyhow::{ensure, Result};
use serde::Serialize;
use std::fmt::Write as _;

/// Facts about the machine and build a sweep ran on.
#[derive(Clone, Debug, Default, Serialize)]
pub struct Machine {
    /// `model name` of /proc/cpuinfo, with its family and model numbers.
    pub cpu: String,
    /// Logical CPUs the process may use.
    pub cpus: usize,
    /// The CPU's instruction sets and the AMX verdict.
    pub cpu_features: String,
    /// Which llama.cpp CPU build runs (fixed, or the variant chosen at run time).
    pub cpu_build: String,
    /// Whether illmrec's AVX-512 kernels run attention and GEGLU (`illmrec::engine::kernels`).
    pub kernels: String,
    /// LLM threads.
    pub threads: i32,
    pub model: String,
    pub n_ctx: usize,
    /// 1-minute load average of /proc/loadavg before and after the sweep (other work on the
    /// machine shows here).
    pub load_before: Option<f64>,
    pub load_after: Option<f64>,
}

/// The CPU of /proc/cpuinfo text: its `model name`, with `cpu family` and `model` when given
/// (e.g. "Intel(R) Xeon(R) Processor (family 6 model 207)").
pub fn cpu_model_name(cpuinfo: &str) -> Option<String> {
    let field = |name: &str| {
        cpuinfo
            .lines()
            .filter_map(|l| l.split_once(':'))
            .find(|(k, _)| k.trim() == name)
            .map(|(_, v)| v.trim().to_string())
    };
    let name = field("model name")?;
    Some(match (field("cpu family"), field("model")) {
        (Some(f), Some(m)) => format!("{name} (family {f} model {m})"),
        _ => name,
    })
}

/// The 1-minute load average of /proc/loadavg text.
pub fn load_average(loadavg: &str) -> Option<f64> {
    loadavg.split_whitespace().next()?.parse().ok()
}

/// This machine's 1-minute load average (Linux), if readable.
pub fn current_load() -> Option<f64> {
    load_average(&std::fs::read_to_string("/proc/loadavg").ok()?)
}

impl Machine {
    /// Reads this machine's facts for a recommender (the load after is left empty).
    pub fn detect(rec: &mut Recommender, threads: i32) -> Self {
        Machine {
            cpu: std::fs::read_to_string("/proc/cpuinfo")
                .ok()
                .and_then(|t| cpu_model_name(&t))
                .unwrap_or_else(|| "unknown".into()),
            cpus: crate::engine::default_threads() as usize,
            cpu_features: crate::engine::cpu::Features::detect().to_string(),
            cpu_build: crate::engine::cpu_build(),
            kernels: crate::engine::kernels::describe(),
            threads,
            model: rec.model().path.display().to_string(),
            n_ctx: rec.context().n_ctx(),
            load_before: current_load(),
            load_after: None,
        }
    }
}

/// A finished sweep: what ran where, and its rows.
#[derive(Clone, Debug, Serialize)]
pub struct Report {
    pub bundle: String,
    pub dataset: String,
    pub machine: Machine,
    pub plan: Plan,
    pub rows: Vec<Row>,
    pub ratios: Vec<Ratio>,
}

/// The runtime's time over the engine's at one length: the image-token request (prompt, adaptor,
/// LLM, heads, top 10) over the same positions decoded as plain tokens.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct Ratio {
    pub length: usize,
    pub runtime_ms: f64,
    pub engine_ms: f64,
    pub ratio: f64,
}

impl Report {
    pub fn new(
        bundle: String,
        dataset: String,
        machine: Machine,
        plan: Plan,
        rows: Vec<Row>,
    ) -> Self {
        let ratios = ratios(&rows);
        Report {
            bundle,
            dataset,
            machine,
            plan,
            rows,
            ratios,
        }
    }

    fn get(&self, length: usize, style: Style) -> Option<&Row> {
        self.rows
            .iter()
            .find(|r| r.length == length && r.style == style)
    }

    fn lengths(&self) -> Vec<usize> {
        let mut l: Vec<usize> = self.rows.iter().map(|r| r.length).collect();
        l.dedup();
        l
    }

    /// A markdown table: one line per length, mean ms and positions per style, and the
    /// runtime/engine ratio.
    pub fn markdown(&self) -> String {
        let mut s = String::from(
            "| items | users | image token ms | positions | title only ms | positions | description ms | positions | engine only ms | runtime / engine |\n|---|---|---|---|---|---|---|---|---|---|\n",
        );
        for l in self.lengths() {
            let cell = |style| {
                self.get(l, style).map_or("–".to_string(), |r: &Row| {
                    format!("{:.0} | {:.0}", r.mean_ms, r.mean_positions)
                })
            };
            let engine = self
                .get(l, Style::Engine)
                .map_or("–".to_string(), |r| format!("{:.0}", r.mean_ms));
            let ratio = self
                .ratios
                .iter()
                .find(|r| r.length == l)
                .map_or("–".to_string(), |r| format!("{:.2}×", r.ratio));
            let users = self.get(l, Style::Image).map_or(0, |r| r.users);
            let _ = writeln!(
                s,
                "| {l} | {users} | {} | {} | {} | {engine} | {ratio} |",
                cell(Style::Image),
                cell(Style::Title),
                cell(Style::Description)
            );
        }
        s
    }

    /// CSV: a header and one line per (length, style).
    pub fn csv(&self) -> String {
        let mut s = String::from("length,style,users,mean_positions,mean_ms,p50_ms,p90_ms\n");
        for r in &self.rows {
            let _ = writeln!(
                s,
                "{},{},{},{:.2},{:.3},{:.3},{:.3}",
                r.length,
                r.style.name(),
                r.users,
                r.mean_positions,
                r.mean_ms,
                r.p50_ms,
                r.p90_ms
            );
        }
        s
    }

    /// The figure as PNG bytes: mean latency (left) and prompt positions (right) against the
    /// history length, one line per style.
    pub fn png(&self, width: u32, height: u32) -> Result<Vec<u8>> {
        plot(self, width, height)
    }
}

/// Runtime/engine ratios (of mean times) for every length that has both rows.
pub fn ratios(rows: &[Row]) -> Vec<Ratio> {
    rows.iter()
        .filter(|r| r.style == Style::Image)
        .filter_map(|img| {
            let eng = rows
                .iter()
                .find(|r| r.style == Style::Engine && r.length == img.length)?;
            Some(Ratio {
                length: img.length,
                runtime_ms: img.mean_ms,
                engine_ms: eng.mean_ms,
                ratio: img.mean_ms / eng.mean_ms,
            })
        })
        .collect()
}

fn plot(report: &Report, width: u32, height: u32) -> Result<Vec<u8>> {
    use plotters::prelude::*;
    crate::bench::plot::register_font();
    ensure!(
        width >= 200 && height >= 150,
        "a plot needs at least 200×150 pixels"
    );
    ensure!(
        !report.rows.is_empty(),
        "nothing to plot: the sweep has no row"
    );
    let e = crate::bench::plot::draw_error;
    let mut buf = vec![0u8; width as usize * height as usize * 3];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (width, height)).into_drawing_area();
        root.fill(&WHITE).map_err(|x| e(&x))?;
        let (left, right) = root.split_horizontally(width / 2);
        let max_len = report.rows.iter().map(|r| r.length).max().unwrap_or(1) as f64;
        let x_range = 0f64..max_len + 1.0;
        let color = |s: Style| match s {
            Style::Image => RGBColor(31, 119, 180),
            Style::Title => RGBColor(44, 160, 44),
            Style::Description => RGBColor(214, 39, 40),
            Style::Engine => RGBColor(90, 90, 90),
        };
        let panels: [(&DrawingArea<_, _>, &str, &str, bool); 2] = [
            (&left, "Latency per request", "mean ms", true),
            (&right, "Prompt positions", "positions", false),
        ];
        for (area, title, y_label, latency) in panels {
            let value = |r: &Row| if latency { r.mean_ms } else { r.mean_positions };
            let styles: Vec<Style> = Style::ALL
                .into_iter()
                .filter(|&s| latency || s != Style::Engine)
                .collect();
            let y_max = report
                .rows
                .iter()
                .filter(|r| styles.contains(&r.style))
                .map(value)
                .fold(0f64, f64::max)
                .max(1e-9)
                * 1.1;
            let mut chart = ChartBuilder::on(area)
                .caption(title, (FONT, 20))
                .margin(12)
                .x_label_area_size(40)
                .y_label_area_size(66)
                .build_cartesian_2d(x_range.clone(), 0f64..y_max)
                .map_err(|x| e(&x))?;
            chart
                .configure_mesh()
                .x_desc("history items")
                .x_label_formatter(&|v| format!("{v:.0}"))
                .y_label_formatter(&|v| format!("{v:.0}"))
                .y_desc(y_label)
                .label_style((FONT, 13))
                .axis_desc_style((FONT, 14))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|x| e(&x))?;
            for style in styles {
                let c = color(style);
                let points: Vec<(f64, f64)> = report
                    .rows
                    .iter()
                    .filter(|r| r.style == style)
                    .map(|r| (r.length as f64, value(r)))
                    .collect();
                let label = if !latency && style == Style::Image {
                    "image token (= engine only)"
                } else {
                    style.label()
                };
                chart
                    .draw_series(LineSeries::new(points.clone(), c.stroke_width(2)))
                    .map_err(|x| e(&x))?
                    .label(label)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 18, y)], c.stroke_width(2))
                    });
                chart
                    .draw_series(points.iter().map(|&p| Circle::new(p, 3, c.filled())))
                    .map_err(|x| e(&x))?;
            }
            chart
                .configure_series_labels()
                .position(SeriesLabelPosition::UpperLeft)
                .label_font((FONT, 13))
                .background_style(WHITE.mix(0.85))
                .border_style(RGBColor(200, 200, 200))
                .draw()
                .map_err(|x| e(&x))?;
        }
        root.present().map_err(|x| e(&x))?;
    }
    crate::bench::plot::png(width, height, buf)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bench::sweep::row;

    fn sample() -> Report {
        let mut rows = Vec::new();
        for l in [1usize, 2] {
            for (k, s) in Style::ALL.into_iter().enumerate() {
                let ms = [10.0 * l as f64 + k as f64, 12.0 * l as f64 + k as f64];
                let pos = [20 * l + 5 * k, 20 * l + 5 * k];
                rows.push(row(l, s, &ms, &pos).unwrap());
            }
        }
        let plan = Plan {
            lengths: vec![1, 2],
            users: 2,
            warmup: 0,
        };
        Report::new("b".into(), "d".into(), Machine::default(), plan, rows)
    }

    #[test]
    fn ratios_divide_the_image_request_by_the_engine() {
        let r = sample();
        assert_eq!(r.ratios.len(), 2);
        assert_eq!(r.ratios[0].length, 1);
        assert!((r.ratios[0].runtime_ms - 11.0).abs() < 1e-9);
        assert!((r.ratios[0].engine_ms - 14.0).abs() < 1e-9);
        assert!((r.ratios[1].ratio - 22.0 / 25.0).abs() < 1e-9);
    }

    #[test]
    fn tables_have_a_line_per_length_and_per_row() {
        let r = sample();
        let md = r.markdown();
        assert_eq!(md.lines().count(), 4);
        assert!(md
            .lines()
            .nth(2)
            .unwrap()
            .starts_with("| 1 | 2 | 11 | 20 | 12 | 25 | 13 | 30 | 14 | 0.79× |"));
        let csv = r.csv();
        assert_eq!(csv.lines().count(), 9);
        assert_eq!(
            csv.lines().nth(1).unwrap(),
            "1,image,2,20.00,11.000,11.000,11.800"
        );
        assert!(csv.lines().any(|l| l.starts_with("2,engine,2,55.00,")));
    }

    #[test]
    fn the_plot_is_a_png_of_the_asked_size_with_drawn_pixels() {
        let png = sample().png(640, 300).unwrap();
        let img = image::load_from_memory(&png).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (640, 300));
        let colored = img
            .pixels()
            .filter(|p| p.0 == [31, 119, 180] || p.0 == [214, 39, 40])
            .count();
        assert!(colored > 100, "the lines are missing ({colored} pixels)");
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 80)).count();
        assert!(dark > 200, "no text or axes drawn ({dark} dark pixels)");
        assert!(sample().png(10, 10).is_err());
    }

    #[test]
    fn cpu_and_load_facts_parse() {
        let info = "processor\t: 0\nvendor_id\t: GenuineIntel\nmodel name\t: Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz\nflags\t: fpu\n";
        assert_eq!(
            cpu_model_name(info).as_deref(),
            Some("Intel(R) Xeon(R) Platinum 8581C CPU @ 2.10GHz")
        );
        let full = "cpu family\t: 6\nmodel\t\t: 207\nmodel name\t: Intel(R) Xeon(R) Processor\n";
        assert_eq!(
            cpu_model_name(full).as_deref(),
            Some("Intel(R) Xeon(R) Processor (family 6 model 207)")
        );
        assert_eq!(cpu_model_name("flags: x"), None);
        assert_eq!(load_average("1.52 0.80 0.40 2/300 1234\n"), Some(1.52));
        assert_eq!(load_average(""), None);
    }
}
