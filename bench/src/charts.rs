//! SVG charts of a bench run, drawn with `plotters`: latency distributions
//! (CDF) and throughput against backlog size.

use std::path::{Path, PathBuf};

use anyhow::Context as _;
use plotters::prelude::*;

use super::{Figure, Samples};

/// Every chart the figures and samples allow; (title, path) of each drawn.
pub(super) fn draw_all(
    dir: &Path,
    figures: &[Figure],
    samples: &Samples,
) -> anyhow::Result<Vec<(String, PathBuf)>> {
    let mut drawn = Vec::new();
    let latency: Vec<&(String, Vec<f64>)> = samples
        .iter()
        .filter(|(name, v)| (name.starts_with("O3") || name.starts_with("Q3")) && !v.is_empty())
        .collect();
    if !latency.is_empty() {
        let title = "Latency, O3 (commit to Redis receive) and Q3 (commit to handler start)";
        let path = dir.join("bench-latency.svg");
        latency_cdf(&path, title, &latency)?;
        drawn.push((title.to_string(), path));
    }
    let o4: Vec<&(String, Vec<f64>)> = samples
        .iter()
        .filter(|(name, v)| name.starts_with("O4") && !v.is_empty())
        .collect();
    if !o4.is_empty() {
        let title = "Latency in O4 (1,000 events/s and 1,000 tasks/s offered to one herald run)";
        let path = dir.join("bench-latency-o4.svg");
        latency_cdf(&path, title, &o4)?;
        drawn.push((title.to_string(), path));
    }
    let point = |workload: &str, metric: &str, size: f64| {
        figures
            .iter()
            .find(|f| f.workload == workload && f.metric == metric)
            .map(|f| (size, f.median(), f.min(), f.max()))
    };
    let o2: Vec<_> = [
        point("O2", "events_per_s", 100_000.0),
        point("O2", "events_per_s_at_1000000", 1_000_000.0),
    ]
    .into_iter()
    .flatten()
    .collect();
    let q2: Vec<_> = [
        point("Q2", "tasks_per_s", 20_000.0),
        point("Q2-SCALE", "tasks_per_s_at_200000", 200_000.0),
        point("Q2-SCALE", "tasks_per_s_at_1000000", 1_000_000.0),
    ]
    .into_iter()
    .flatten()
    .collect();
    if !o2.is_empty() || !q2.is_empty() {
        let title = "Throughput against backlog size (median, bars min–max)";
        let path = dir.join("bench-throughput.svg");
        throughput(
            &path,
            title,
            &[
                ("O2: relay, events/s", o2),
                ("Q2, Q2-scale: worker, tasks/s", q2),
            ],
        )?;
        drawn.push((title.to_string(), path));
    }
    Ok(drawn)
}

fn chart_error(path: &Path, e: impl std::fmt::Display) -> anyhow::Error {
    anyhow::anyhow!("drawing {}: {e}", path.display())
}

/// The fraction of samples at or below each latency, one line per series;
/// the x axis stops at the largest p99.9 so the tail does not flatten the
/// rest (the table has the maxima).
fn latency_cdf(path: &Path, title: &str, series: &[&(String, Vec<f64>)]) -> anyhow::Result<()> {
    let err = |e| chart_error(path, e);
    let sorted: Vec<(String, Vec<f64>)> = series
        .iter()
        .map(|(name, v)| {
            let mut v = v.clone();
            v.sort_by(f64::total_cmp);
            (name.clone(), v)
        })
        .collect();
    let p999 = |v: &[f64]| v[((v.len() as f64 * 0.999).ceil() as usize).saturating_sub(1)];
    let x_max = sorted.iter().map(|(_, v)| p999(v)).fold(0.1f64, f64::max) * 1.05;
    let x_min = sorted.iter().map(|(_, v)| v[0]).fold(0.0f64, f64::min);
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(60)
        .build_cartesian_2d(x_min..x_max, 0.0f64..100.0)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("latency (ms); x axis cut at the largest p99.9")
        .y_desc("% of samples at or below")
        .draw()
        .map_err(err)?;
    for (i, (name, v)) in sorted.iter().enumerate() {
        let n = v.len();
        let step = (n / 2000).max(1);
        let points: Vec<(f64, f64)> = v
            .iter()
            .enumerate()
            .filter(|(k, x)| (k % step == 0 || *k == n - 1) && **x <= x_max)
            .map(|(k, x)| (*x, (k + 1) as f64 * 100.0 / n as f64))
            .collect();
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(points, color.stroke_width(2)))
            .map_err(err)?
            .label(format!("{name} ({n} samples)"))
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().map_err(err)?;
    Ok(())
}

/// Throughput (median with a min–max bar) against the backlog size, on a
/// logarithmic size axis.
type Point = (f64, f64, f64, f64);

fn throughput(path: &Path, title: &str, series: &[(&str, Vec<Point>)]) -> anyhow::Result<()> {
    let err = |e| chart_error(path, e);
    let y_max = series
        .iter()
        .flat_map(|(_, p)| p.iter().map(|p| p.3))
        .fold(1.0f64, f64::max)
        * 1.15;
    let root = SVGBackend::new(path, (900, 520)).into_drawing_area();
    root.fill(&WHITE).map_err(err)?;
    let mut chart = ChartBuilder::on(&root)
        .caption(title, ("sans-serif", 18))
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(70)
        .build_cartesian_2d((10_000f64..2_000_000f64).log_scale(), 0.0f64..y_max)
        .map_err(err)?;
    chart
        .configure_mesh()
        .x_desc("backlog when the relay or worker starts (rows, log scale)")
        .y_desc("per second")
        .x_label_formatter(&|x| {
            if *x >= 1_000_000.0 {
                format!("{:.0}M", x / 1_000_000.0)
            } else {
                format!("{:.0}k", x / 1000.0)
            }
        })
        .y_label_formatter(&|y| format!("{:.0}k", y / 1000.0))
        .draw()
        .map_err(err)?;
    for (i, (name, points)) in series.iter().enumerate() {
        if points.is_empty() {
            continue;
        }
        let color = Palette99::pick(i).to_rgba();
        chart
            .draw_series(LineSeries::new(
                points.iter().map(|p| (p.0, p.1)),
                color.stroke_width(2),
            ))
            .map_err(err)?
            .label(*name)
            .legend(move |(x, y)| {
                PathElement::new(vec![(x, y), (x + 20, y)], color.stroke_width(2))
            });
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| Circle::new((p.0, p.1), 4, color.filled())),
            )
            .map_err(err)?;
        chart
            .draw_series(
                points
                    .iter()
                    .map(|p| PathElement::new(vec![(p.0, p.2), (p.0, p.3)], color.stroke_width(1))),
            )
            .map_err(err)?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::LowerRight)
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK)
        .draw()
        .map_err(err)?;
    root.present().context("writing the chart")?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_the_charts_the_results_allow() {
        let dir = std::env::temp_dir().join(format!("herald-bench-charts-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let figure = |workload: &str, metric: &str, runs: Vec<f64>| Figure {
            workload: workload.into(),
            metric: metric.into(),
            unit: "tasks/s",
            runs,
        };
        let figures = vec![
            figure("Q2", "tasks_per_s", vec![30_000.0, 32_000.0, 31_000.0]),
            figure("Q2-SCALE", "tasks_per_s_at_1000000", vec![25_000.0]),
        ];
        let samples: Samples = vec![("Q3 at 200/s".into(), vec![0.5, 0.7, -0.1, 2.0])];
        let drawn = draw_all(&dir, &figures, &samples).unwrap();
        let names: Vec<_> = drawn
            .iter()
            .map(|(_, p)| p.file_name().unwrap().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, ["bench-latency.svg", "bench-throughput.svg"]);
        for (_, path) in &drawn {
            let svg = std::fs::read_to_string(path).unwrap();
            assert!(svg.starts_with("<svg") && svg.trim_end().ends_with("</svg>"));
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
