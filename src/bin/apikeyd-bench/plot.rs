//! The latency-versus-throughput chart of `--plot`, drawn with plotters' SVG backend.
//!
//! Only the SVG backend, without plotters' font features: SVG text is written as
//! `<text>` elements that the viewer renders, so nothing here needs font files,
//! FreeType or fontconfig; label sizes for the layout are estimated from their length.

use std::path::Path;

use plotters::prelude::*;

use crate::load::Report;

/// One server's runs: the paced points of the sweep, in order of offered load, and
/// the closed-loop maximum.
pub struct Series<'a> {
    /// The legend's name for the server.
    pub name: &'a str,
    /// Paced runs (p50 and p99 at each achieved rate).
    pub paced: &'a [Report],
    /// The closed-loop run: drawn as its own markers, not as a point of the curve,
    /// since nothing was offered between the last paced rate and it.
    pub closed_loop: &'a Report,
}

const COLORS: [RGBColor; 4] = [
    RGBColor(0x1f, 0x77, 0xb4),
    RGBColor(0xd6, 0x27, 0x28),
    RGBColor(0x2c, 0xa0, 0x2c),
    RGBColor(0x94, 0x67, 0xbd),
];

/// `12,345` as `12k`: tick labels stay short.
fn thousands(v: &f64) -> String {
    if *v >= 1000.0 {
        format!("{:.0}k", v / 1000.0)
    } else {
        format!("{v:.0}")
    }
}

/// Writes the chart of `series` to `path` (an SVG file): p50 (solid) and p99
/// (dashed) latency against achieved throughput, each closed-loop maximum a filled
/// marker of its own.
pub fn chart(path: &Path, series: &[Series]) -> Result<(), String> {
    let all = || {
        series
            .iter()
            .flat_map(|s| s.paced.iter().chain(std::iter::once(s.closed_loop)))
    };
    let max_x = all().map(|r| r.rps).fold(1.0, f64::max) * 1.05;
    // Headroom above the highest p99 for the legend.
    let max_y = all().map(|r| r.p99_us).fold(1.0, f64::max) * 1.25;
    let fail = |e: &dyn std::fmt::Display| format!("cannot draw the chart: {e}");

    let root = SVGBackend::new(path, (800, 500)).into_drawing_area();
    root.fill(&WHITE).map_err(|e| fail(&e))?;
    let mut chart = ChartBuilder::on(&root)
        .caption(
            "Latency against throughput (8 connections)",
            ("sans-serif", 22),
        )
        .margin(15)
        .x_label_area_size(45)
        .y_label_area_size(65)
        .build_cartesian_2d(0.0..max_x, 0.0..max_y)
        .map_err(|e| fail(&e))?;
    chart
        .configure_mesh()
        .x_desc("throughput (requests/s)")
        .y_desc("latency (µs)")
        .x_label_formatter(&thousands)
        .y_label_formatter(&|v| format!("{v:.0}"))
        .x_labels(10)
        .y_labels(8)
        .label_style(("sans-serif", 15))
        .axis_desc_style(("sans-serif", 16))
        .light_line_style(WHITE.mix(0.0))
        .draw()
        .map_err(|e| fail(&e))?;

    for (i, s) in series.iter().enumerate() {
        let color = COLORS[i % COLORS.len()];
        let p50: Vec<(f64, f64)> = s.paced.iter().map(|r| (r.rps, r.p50_us)).collect();
        let p99: Vec<(f64, f64)> = s.paced.iter().map(|r| (r.rps, r.p99_us)).collect();
        chart
            .draw_series(LineSeries::new(p50.clone(), color.stroke_width(2)))
            .map_err(|e| fail(&e))?
            .label(format!("{} p50, paced", s.name))
            .legend(move |(x, y)| PathElement::new([(x, y), (x + 20, y)], color.stroke_width(2)));
        chart
            .draw_series(p50.iter().map(|&p| Circle::new(p, 3, color.filled())))
            .map_err(|e| fail(&e))?;
        chart
            .draw_series(DashedLineSeries::new(
                p99.clone(),
                6,
                4,
                color.stroke_width(2),
            ))
            .map_err(|e| fail(&e))?
            .label(format!("{} p99, paced", s.name))
            .legend(move |(x, y)| {
                plotters::element::DashedPathElement::new(
                    [(x, y), (x + 20, y)],
                    6,
                    4,
                    color.stroke_width(2),
                )
            });
        chart
            .draw_series(
                p99.iter()
                    .map(|&p| TriangleMarker::new(p, 4, color.filled())),
            )
            .map_err(|e| fail(&e))?;
        let max = s.closed_loop;
        chart
            .draw_series([
                Circle::new((max.rps, max.p50_us), 6, color.stroke_width(2)),
                Circle::new((max.rps, max.p99_us), 6, color.filled()),
            ])
            .map_err(|e| fail(&e))?
            .label(format!(
                "{} closed-loop maximum (hollow p50, filled p99)",
                s.name
            ))
            .legend(move |(x, y)| Circle::new((x + 10, y), 5, color.filled()));
    }
    chart
        .configure_series_labels()
        // Upper right: paced points sit at low throughput and the closed-loop
        // maximum at low latency, so that corner stays free.
        .position(SeriesLabelPosition::UpperRight)
        .label_font(("sans-serif", 14))
        .background_style(WHITE.mix(0.9))
        .border_style(BLACK.mix(0.3))
        .draw()
        .map_err(|e| fail(&e))?;
    root.present().map_err(|e| fail(&e))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn report(rps: f64, p50: f64, p99: f64) -> Report {
        Report {
            target: "apikeyd".into(),
            connections: 8,
            pipeline: 1,
            offered_rps: None,
            requests: 1,
            errors: 0,
            seconds: 1.0,
            rps,
            p50_us: p50,
            p90_us: p99,
            p99_us: p99,
            p999_us: p99,
            max_us: p99,
            pacer_late_p50_us: None,
            pacer_late_p99_us: None,
            cpu: Vec::new(),
            cpu_us_per_request: None,
            client_cpu_share: None,
            saturated: None,
        }
    }

    #[test]
    fn the_chart_has_labelled_axes_and_a_separate_maximum() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("latency.svg");
        let paced: Vec<Report> = [10_000.0, 20_000.0, 30_000.0]
            .iter()
            .map(|&r| report(r, 120.0, 300.0))
            .collect();
        let max = report(190_000.0, 40.0, 117.0);
        let series = [Series {
            name: "apikeyd",
            paced: &paced,
            closed_loop: &max,
        }];
        chart(&path, &series).unwrap();
        let svg = std::fs::read_to_string(&path).unwrap();
        // plotters writes each label's text on a line of its own.
        let texts: Vec<&str> = svg.lines().map(str::trim).collect();
        for label in [
            "throughput (requests/s)",
            "latency (µs)",
            // Ticks labelled along both axes.
            "100k",
            "180k",
            "100",
            "300",
            "apikeyd closed-loop maximum (hollow p50, filled p99)",
        ] {
            assert!(texts.contains(&label), "no {label:?} in {svg}");
        }
        // No line (curve, dash or legend sample) reaches the maximum's markers: it
        // is not joined to the paced points.
        let attr = |l: &str, name: &str| -> f64 {
            let v = l.split(&format!(" {name}=\"")).nth(1).unwrap();
            v.split('"').next().unwrap().parse().unwrap()
        };
        let max_x: Vec<f64> = texts
            .iter()
            .filter(|l| l.starts_with("<circle") && l.contains(" r=\"6\""))
            .map(|l| attr(l, "cx"))
            .collect();
        assert_eq!(max_x.len(), 2, "{svg}");
        for l in texts.iter().filter(|l| l.starts_with("<polyline")) {
            let points = l.split("points=\"").nth(1).unwrap().split('"').next();
            for p in points.unwrap().split_whitespace() {
                let x: f64 = p.split(',').next().unwrap().parse().unwrap();
                assert!((x - max_x[0]).abs() > 20.0, "{l} reaches the maximum");
            }
        }
    }
}
