//! SVG line charts for reports (one series per router).

use std::path::Path;
use std::sync::Once;

use plotters::prelude::*;

use crate::report::Report;

static FONT: &[u8] = include_bytes!("../../../assets/fonts/DejaVuSans.ttf");
static REGISTER: Once = Once::new();

#[derive(Debug, thiserror::Error)]
#[error("plot {path}: {message}")]
pub struct PlotError {
    path: String,
    message: String,
}

fn register_font() {
    REGISTER.call_once(|| {
        // Errors only if the bytes are not a font; they are ours.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

pub struct Series {
    pub name: String,
    pub points: Vec<(f64, f64)>,
}

/// How the y axis is drawn.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum YScale {
    Linear,
    /// Logarithmic when the values span more than [`LOG_SPAN`]x (latencies
    /// of a collapsed router next to a healthy one), linear otherwise.
    LogIfWide,
}

/// Max/min ratio above which [`YScale::LogIfWide`] draws a log axis.
pub const LOG_SPAN: f64 = 20.0;

pub fn line_chart(
    path: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
    y_scale: YScale,
) -> Result<(), PlotError> {
    register_font();
    let err = |e: &dyn std::fmt::Display| PlotError {
        path: path.display().to_string(),
        message: e.to_string(),
    };
    let pts = || series.iter().flat_map(|s| s.points.iter());
    let x_max = pts().map(|p| p.0).fold(0.0, f64::max).max(1e-9) * 1.05;
    let y_max = pts().map(|p| p.1).fold(0.0, f64::max).max(1e-9) * 1.1;
    let y_min_positive = pts()
        .map(|p| p.1)
        .filter(|y| *y > 0.0)
        .fold(f64::INFINITY, f64::min);
    let log = y_scale == YScale::LogIfWide
        && y_min_positive.is_finite()
        && y_max / y_min_positive > LOG_SPAN;
    let root = SVGBackend::new(path, (900, 540)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| err(&e))?;
    let mut builder = ChartBuilder::on(&root);
    builder
        .caption(title, ("sans-serif", 22))
        .margin(16)
        .x_label_area_size(44)
        .y_label_area_size(70);
    let y_label = if log {
        format!("{y_label}, log scale")
    } else {
        y_label.to_string()
    };
    if log {
        let chart = builder
            .build_cartesian_2d(0.0..x_max, (y_min_positive * 0.8..y_max).log_scale())
            .map_err(|e| err(&e))?;
        draw_series(chart, x_label, &y_label, series).map_err(|e| err(&e))?;
    } else {
        let chart = builder
            .build_cartesian_2d(0.0..x_max, 0.0..y_max)
            .map_err(|e| err(&e))?;
        draw_series(chart, x_label, &y_label, series).map_err(|e| err(&e))?;
    }
    root.present().map_err(|e| err(&e))?;
    Ok(())
}

type Chart<'a, 'b, Y> =
    ChartContext<'a, SVGBackend<'b>, Cartesian2d<plotters::coord::types::RangedCoordf64, Y>>;

fn draw_series<'a, 'b: 'a, Y>(
    mut chart: Chart<'a, 'b, Y>,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<(), String>
where
    Y: Ranged<ValueType = f64> + plotters::coord::ranged1d::ValueFormatter<f64>,
{
    let e = |e: &dyn std::fmt::Display| e.to_string();
    chart
        .configure_mesh()
        .x_desc(x_label)
        .y_desc(y_label)
        .label_style(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    for (i, s) in series.iter().enumerate() {
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                s.points.iter().copied(),
                color.stroke_width(2),
            ))
            .map_err(|x| e(&x))?
            .label(s.name.clone())
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 18, y)], color.stroke_width(2))
            });
        chart
            .draw_series(s.points.iter().map(|p| Circle::new(*p, 4, color.filled())))
            .map_err(|x| e(&x))?;
    }
    chart
        .configure_series_labels()
        .background_style(WHITE.mix(0.85))
        .border_style(BLACK)
        .label_font(("sans-serif", 14))
        .draw()
        .map_err(|x| e(&x))?;
    Ok(())
}

/// The report's standard plots: TTFT p90, hit rate and throughput vs offered QPS.
/// Closed-loop stages are plotted at their achieved request rate.
pub fn report_plots(report: &Report, dir: &Path) -> Result<Vec<String>, PlotError> {
    let by_router = |f: &dyn Fn(&crate::report::StageReport) -> Option<f64>| -> Vec<Series> {
        report
            .runs
            .iter()
            .map(|r| Series {
                name: r.router.clone(),
                points: r
                    .stages
                    .iter()
                    .filter_map(|s| {
                        f(s).map(|y| (s.offered_rate.unwrap_or(s.summary.request_rate), y))
                    })
                    .collect(),
            })
            .collect()
    };
    let plots = [
        (
            "ttft_p90.svg",
            "TTFT p90 vs offered load",
            "TTFT p90 (ms)",
            by_router(&|s| Some(s.summary.ttft_p90_ms)),
            YScale::LogIfWide,
        ),
        (
            "hit_rate.svg",
            "Fleet prefix-cache hit rate",
            "hit rate (%)",
            by_router(&|s| s.fleet_hit_rate.map(|h| h * 100.0)),
            YScale::Linear,
        ),
        (
            "throughput.svg",
            "Output throughput",
            "output tokens/s",
            by_router(&|s| Some(s.summary.output_tok_s)),
            YScale::Linear,
        ),
    ];
    let mut written = Vec::new();
    for (file, title, y, series, y_scale) in plots {
        if series.iter().all(|s| s.points.is_empty()) {
            continue;
        }
        line_chart(
            &dir.join(file),
            title,
            "offered load (requests/s)",
            y,
            &series,
            y_scale,
        )?;
        written.push(file.to_string());
    }
    Ok(written)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::report::{RunReport, StageReport};
    use crate::runner::summarize;

    #[test]
    fn report_plots_render_with_text_and_series() {
        let stage = |rate: f64, ttft: f64, hit: f64| {
            let mut summary = summarize("s", &[], 1.0);
            summary.ttft_p90_ms = ttft;
            summary.output_tok_s = 100.0 * rate;
            StageReport {
                offered_rate: Some(rate),
                summary,
                fleet_hit_rate: Some(hit),
            }
        };
        let report = Report {
            title: "t".into(),
            target: "x".into(),
            workload: "w".into(),
            command: "c".into(),
            runs: vec![
                RunReport {
                    router: "kvgate precise".into(),
                    stages: vec![stage(1.0, 50.0, 0.8), stage(2.0, 60.0, 0.8)],
                },
                RunReport {
                    router: "round robin".into(),
                    stages: vec![stage(1.0, 200.0, 0.2), stage(2.0, 900.0, 0.2)],
                },
            ],
        };
        let dir = std::env::temp_dir().join(format!("kvgate-plot-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let files = report_plots(&report, &dir).unwrap();
        assert_eq!(
            files,
            vec!["ttft_p90.svg", "hit_rate.svg", "throughput.svg"]
        );
        let svg = std::fs::read_to_string(dir.join("ttft_p90.svg")).unwrap();
        assert!(svg.contains("TTFT p90 vs offered load"));
        assert!(svg.contains("round robin") && svg.contains("kvgate precise"));
        assert!(svg.matches("<polyline").count() >= 2, "one line per router");
        // 50..900 ms spans less than LOG_SPAN: linear.
        assert!(!svg.contains("log scale"));
    }

    #[test]
    fn wide_latency_ranges_get_a_log_axis() {
        let dir = std::env::temp_dir().join(format!("kvgate-plot-log-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let series = [
            Series {
                name: "healthy".into(),
                points: vec![(1.0, 100.0), (2.0, 120.0)],
            },
            Series {
                name: "collapsed".into(),
                points: vec![(1.0, 110.0), (2.0, 30_000.0)],
            },
        ];
        let path = dir.join("log.svg");
        line_chart(&path, "t", "x", "ms", &series, YScale::LogIfWide).unwrap();
        assert!(std::fs::read_to_string(&path)
            .unwrap()
            .contains("ms, log scale"));
        line_chart(&path, "t", "x", "ms", &series, YScale::Linear).unwrap();
        assert!(!std::fs::read_to_string(&path)
            .unwrap()
            .contains("log scale"));
    }
}
