//! `trainer plot RUN_DIR`: the curves of `metrics.jsonl` as one PNG (plotters' bitmap backend,
//! drawn into a buffer and encoded with the `image` crate; text uses a bundled font so nothing
//! depends on the system's fonts).

use crate::metrics::{read_metrics, StepMetrics, METRICS_FILE};
use anyhow::{ensure, Context, Result};
use plotters::prelude::*;
use std::path::{Path, PathBuf};
use std::sync::Once;

static FONT: &[u8] = include_bytes!("../assets/DejaVuSansMono.ttf");
const FONT_NAME: &str = "udi-mono";

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The font is bundled and known good; a failure here is a build defect.
        if plotters::style::register_font(FONT_NAME, FontStyle::Normal, FONT).is_err() {
            panic!("bundled font does not parse");
        }
    });
}

type Getter = fn(&StepMetrics) -> f64;

struct Panel {
    title: &'static str,
    series: Vec<(&'static str, Getter)>,
}

fn panels() -> Vec<Panel> {
    vec![
        Panel {
            title: "losses",
            series: vec![
                ("total", |m| m.loss as f64),
                ("cls", |m| m.loss_cls as f64),
                ("udi", |m| m.loss_udi as f64),
                ("patch", |m| m.loss_patch as f64),
            ],
        },
        Panel {
            title: "teacher entropy (nats)",
            series: vec![
                ("[cls]", |m| m.teacher_entropy[0] as f64),
                ("multimodal", |m| m.teacher_entropy[1] as f64),
                ("patch", |m| m.teacher_entropy[2] as f64),
                ("ln K", |m| m.ln_k as f64),
            ],
        },
        Panel {
            title: "learning rate",
            series: vec![("lr", |m| m.lr)],
        },
        Panel {
            title: "wd, EMA momentum, teacher temp",
            series: vec![
                ("wd", |m| m.wd),
                ("momentum", |m| m.momentum),
                ("teacher_temp", |m| m.teacher_temp),
            ],
        },
        Panel {
            title: "centre norms",
            series: vec![
                ("c0", |m| m.centre_norm[0] as f64),
                ("c1", |m| m.centre_norm[1] as f64),
                ("c2", |m| m.centre_norm[2] as f64),
            ],
        },
        Panel {
            title: "throughput (img/s) and data wait (%)",
            series: vec![
                ("img/s", |m| m.images_per_s),
                ("wait %", |m| 100.0 * m.data_wait_frac),
            ],
        },
    ]
}

const COLORS: [RGBColor; 5] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(80, 80, 80),
];

/// Draws the curves of `metrics` into an RGB8 buffer of `w × h`.
pub fn render(metrics: &[StepMetrics], w: u32, h: u32) -> Result<Vec<u8>> {
    register_font();
    ensure!(!metrics.is_empty(), "no metrics to plot");
    let mut buf = vec![0u8; (w * h * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buf, (w, h)).into_drawing_area();
        root.fill(&WHITE).map_err(|e| anyhow::anyhow!("{e}"))?;
        let ps = panels();
        let areas = root.split_evenly((3, 2));
        let x_lo = metrics.first().map(|m| m.step).unwrap_or(0) as f64;
        let x_hi = (metrics.last().map(|m| m.step).unwrap_or(1) as f64).max(x_lo + 1.0);
        for (p, area) in ps.iter().zip(areas.iter()) {
            let mut lo = f64::INFINITY;
            let mut hi = f64::NEG_INFINITY;
            for (_, g) in &p.series {
                for m in metrics {
                    let v = g(m);
                    if v.is_finite() {
                        lo = lo.min(v);
                        hi = hi.max(v);
                    }
                }
            }
            if !lo.is_finite() {
                (lo, hi) = (0.0, 1.0);
            }
            let pad = ((hi - lo).abs() * 0.05).max(1e-9 + hi.abs() * 1e-3);
            let (lo, hi) = (lo - pad, hi + pad);
            let mut chart = ChartBuilder::on(area)
                .caption(p.title, (FONT_NAME, 16))
                .margin(8)
                .x_label_area_size(28)
                .y_label_area_size(64)
                .build_cartesian_2d(x_lo..x_hi, lo..hi)
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            chart
                .configure_mesh()
                .label_style((FONT_NAME, 11))
                .x_desc("step")
                .y_label_formatter(&|v| format_tick(*v))
                .x_label_formatter(&|v| format!("{}", *v as u64))
                .light_line_style(RGBColor(235, 235, 235))
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
            for (i, (name, g)) in p.series.iter().enumerate() {
                let c = COLORS[i % COLORS.len()];
                let pts: Vec<(f64, f64)> = metrics
                    .iter()
                    .map(|m| (m.step as f64, g(m)))
                    .filter(|(_, y)| y.is_finite())
                    .collect();
                chart
                    .draw_series(LineSeries::new(pts, c.stroke_width(2)))
                    .map_err(|e| anyhow::anyhow!("{e}"))?
                    .label(*name)
                    .legend(move |(x, y)| {
                        PathElement::new(vec![(x, y), (x + 16, y)], c.stroke_width(2))
                    });
            }
            chart
                .configure_series_labels()
                .label_font((FONT_NAME, 11))
                .background_style(WHITE.mix(0.8))
                .border_style(BLACK)
                .position(SeriesLabelPosition::UpperRight)
                .draw()
                .map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        root.present().map_err(|e| anyhow::anyhow!("{e}"))?;
    }
    Ok(buf)
}

fn format_tick(v: f64) -> String {
    let a = v.abs();
    if a != 0.0 && !(1e-2..1e4).contains(&a) {
        return format!("{v:.1e}");
    }
    let s = format!("{v:.4}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}

/// Reads `RUN_DIR/metrics.jsonl` and writes `out` (default `RUN_DIR/curves.png`).
pub fn plot_run(run_dir: &Path, out: Option<&Path>) -> Result<PathBuf> {
    let metrics = read_metrics(&run_dir.join(METRICS_FILE))?;
    ensure!(
        !metrics.is_empty(),
        "{}: no steps logged yet",
        run_dir.join(METRICS_FILE).display()
    );
    let (w, h) = (1400u32, 1200u32);
    let buf = render(&metrics, w, h)?;
    let out = out
        .map(Path::to_path_buf)
        .unwrap_or_else(|| run_dir.join("curves.png"));
    image::RgbImage::from_raw(w, h, buf)
        .context("plot buffer size")?
        .save(&out)
        .with_context(|| format!("writing {}", out.display()))?;
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::metrics::MetricsLog;

    #[test]
    fn plot_writes_a_png_with_curves_in_it() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = MetricsLog::open(dir.path(), None).unwrap();
        for s in 1..=40u64 {
            let x = s as f32;
            log.write(&StepMetrics {
                step: s,
                loss: 10.0 / x.sqrt(),
                loss_cls: 9.0 / x.sqrt(),
                loss_udi: 11.0 / x.sqrt(),
                loss_patch: 10.5 / x.sqrt(),
                lr: 1e-4 * x as f64,
                teacher_entropy: [3.0, 3.5, 4.0],
                ln_k: 5.5,
                images_per_s: 30.0,
                data_wait_frac: 0.1,
                ..Default::default()
            })
            .unwrap();
        }
        drop(log);
        let out = plot_run(dir.path(), None).unwrap();
        let img = image::open(&out).unwrap().to_rgb8();
        assert_eq!(img.dimensions(), (1400, 1200));
        // The first series colour appears (curves drawn), and so does dark text/axes.
        let blue = img.pixels().filter(|p| p.0 == [31, 119, 180]).count();
        let dark = img.pixels().filter(|p| p.0.iter().all(|&c| c < 60)).count();
        assert!(blue > 200, "blue pixels: {blue}");
        assert!(dark > 1000, "dark pixels: {dark}");
    }

    #[test]
    fn tick_labels_are_short() {
        assert_eq!(format_tick(7.0), "7");
        assert_eq!(format_tick(6.5), "6.5");
        assert_eq!(format_tick(0.0), "0");
        assert_eq!(format_tick(0.9961), "0.9961");
        assert_eq!(format_tick(1.2e-4), "1.2e-4");
    }

    #[test]
    fn empty_metrics_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(METRICS_FILE), "").unwrap();
        assert!(plot_run(dir.path(), None).is_err());
    }
}
