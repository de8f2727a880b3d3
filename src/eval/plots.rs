//! ROC, precision-recall and reliability plots as PNG (640 x 640 px, RGB).
//!
//! Drawn with plotters into an in-memory RGB buffer and encoded with the `png` crate. Text
//! uses DejaVu Sans (assets/fonts, Bitstream Vera licence beside it), embedded and
//! registered with plotters' ab_glyph backend, so no system font is needed.

use std::error::Error;
use std::path::{Path, PathBuf};
use std::sync::Once;

use plotters::coord::Shift;
use plotters::prelude::*;

use super::metrics::{OperatingPoint, PrPoint, ReliabilityBin, RocPoint};

const WIDTH: u32 = 640;
const HEIGHT: u32 = 640;
const FONT: &[u8] = include_bytes!("../../assets/fonts/DejaVuSans.ttf");
const CURVE: RGBColor = RGBColor(31, 119, 180);
const MARK: RGBColor = RGBColor(214, 39, 40);
const GUIDE: RGBColor = RGBColor(150, 150, 150);

/// Errors writing a plot.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum PlotError {
    /// Drawing failed.
    #[error("{path}: drawing the plot failed: {message}")]
    Draw {
        /// The PNG being made.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
    /// Writing the PNG failed.
    #[error("{path}: {message}")]
    Write {
        /// The PNG being written.
        path: PathBuf,
        /// What went wrong.
        message: String,
    },
}

type Area<'a> = DrawingArea<BitMapBackend<'a>, Shift>;
type DrawResult = Result<(), Box<dyn Error>>;

fn register_font() {
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        // The embedded font is known to parse; a failure would only lose text.
        let _ = plotters::style::register_font("sans-serif", FontStyle::Normal, FONT);
    });
}

/// Draws with `draw` on a white canvas and writes the PNG to `path`.
fn render(path: &Path, draw: impl FnOnce(&Area) -> DrawResult) -> Result<(), PlotError> {
    register_font();
    let mut buffer = vec![255u8; (WIDTH * HEIGHT * 3) as usize];
    {
        let root = BitMapBackend::with_buffer(&mut buffer, (WIDTH, HEIGHT)).into_drawing_area();
        let drawn = root
            .fill(&WHITE)
            .map_err(Into::into)
            .and_then(|_| draw(&root))
            .and_then(|_| root.present().map_err(Into::into));
        drawn.map_err(|e| PlotError::Draw {
            path: path.to_path_buf(),
            message: e.to_string(),
        })?;
    }
    let write_err = |message: String| PlotError::Write {
        path: path.to_path_buf(),
        message,
    };
    let file = std::fs::File::create(path).map_err(|e| write_err(e.to_string()))?;
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), WIDTH, HEIGHT);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    encoder.set_compression(png::Compression::Best);
    let mut writer = encoder
        .write_header()
        .map_err(|e| write_err(e.to_string()))?;
    writer
        .write_image_data(&buffer)
        .map_err(|e| write_err(e.to_string()))?;
    writer.finish().map_err(|e| write_err(e.to_string()))
}

/// A unit-square chart with axis descriptions.
macro_rules! unit_chart {
    ($root:expr, $title:expr, $x:expr, $y:expr) => {{
        let mut chart = ChartBuilder::on($root)
            .caption($title, ("sans-serif", 24))
            .margin(18)
            .x_label_area_size(52)
            .y_label_area_size(60)
            .build_cartesian_2d(0f64..1f64, 0f64..1.02f64)?;
        chart
            .configure_mesh()
            .x_desc($x)
            .y_desc($y)
            .axis_desc_style(("sans-serif", 18))
            .label_style(("sans-serif", 14))
            .light_line_style(RGBColor(235, 235, 235))
            .draw()?;
        chart
    }};
}

/// The ROC curve with the chance diagonal and the operating points marked.
pub fn roc_png(
    path: &Path,
    curve: &[RocPoint],
    auroc: f64,
    points: &[OperatingPoint],
) -> Result<(), PlotError> {
    render(path, |root| {
        let mut chart = unit_chart!(
            root,
            format!("ROC curve (AUROC {auroc:.3})"),
            "False-positive rate",
            "True-positive rate (recall)"
        );
        chart.draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            GUIDE.stroke_width(1),
        ))?;
        let line = std::iter::once((0.0, 0.0)).chain(curve.iter().map(|p| (p.fpr, p.tpr)));
        chart.draw_series(LineSeries::new(line, CURVE.stroke_width(2)))?;
        chart.draw_series(
            points
                .iter()
                .map(|p| Circle::new((p.fpr, p.recall), 5, MARK.filled())),
        )?;
        chart.draw_series(points.iter().map(|p| {
            Text::new(
                format!("recall {:.2}", p.recall),
                (p.fpr + 0.02, p.recall - 0.035),
                ("sans-serif", 13).into_font(),
            )
        }))?;
        Ok(())
    })
}

/// The precision-recall curve (step-wise, as average precision integrates it) with the
/// prevalence line.
pub fn pr_png(
    path: &Path,
    curve: &[PrPoint],
    average_precision: f64,
    prevalence: f64,
) -> Result<(), PlotError> {
    render(path, |root| {
        let mut chart = unit_chart!(
            root,
            format!("Precision-recall (AP {average_precision:.3})"),
            "Recall",
            "Precision"
        );
        chart.draw_series(LineSeries::new(
            [(0.0, prevalence), (1.0, prevalence)],
            GUIDE.stroke_width(1),
        ))?;
        let mut steps = Vec::with_capacity(2 * curve.len() + 1);
        let mut recall = 0.0;
        steps.push((0.0, curve.first().map_or(1.0, |p| p.precision)));
        for p in curve {
            steps.push((recall, p.precision));
            steps.push((p.recall, p.precision));
            recall = p.recall;
        }
        chart.draw_series(LineSeries::new(steps, CURVE.stroke_width(2)))?;
        Ok(())
    })
}

/// The reliability diagram: observed rate against mean predicted probability per non-empty
/// bin (marker area grows with the bin's count), with the diagonal of perfect calibration.
pub fn reliability_png(path: &Path, bins: &[ReliabilityBin], brier: f64) -> Result<(), PlotError> {
    render(path, |root| {
        let mut chart = unit_chart!(
            root,
            format!("Reliability (Brier {brier:.3})"),
            "Mean predicted probability",
            "Observed malignant fraction"
        );
        chart.draw_series(LineSeries::new(
            [(0.0, 0.0), (1.0, 1.0)],
            GUIDE.stroke_width(1),
        ))?;
        let filled: Vec<(f64, f64, usize)> = bins
            .iter()
            .filter_map(|b| Some((b.mean_predicted?, b.observed_rate?, b.count)))
            .collect();
        let max_count = filled.iter().map(|f| f.2).max().unwrap_or(1).max(1) as f64;
        chart.draw_series(LineSeries::new(
            filled.iter().map(|&(x, y, _)| (x, y)),
            CURVE.stroke_width(2),
        ))?;
        chart.draw_series(filled.iter().map(|&(x, y, n)| {
            let radius = 3.0 + 7.0 * (n as f64 / max_count).sqrt();
            Circle::new((x, y), radius as i32, CURVE.filled())
        }))?;
        Ok(())
    })
}
