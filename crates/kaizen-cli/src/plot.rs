//! Training charts as PNG files: `loss.png` from a run's `metrics.jsonl`, drawn by a generic
//! [`line_chart`]; a multi-run comparison (`kaizen compare`) draws [`curves_chart`] (colours chosen
//! per curve) and [`bar_chart`].
//!
//! Pure Rust: plotters' bitmap backend, with text rendered by `ab_glyph` from a TTF font read at run
//! time (no fontconfig or freetype). Without a font the curves are still drawn, with no text at all,
//! and the caller gets a warning naming the package that brings the font.

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

use anyhow::{anyhow, bail, Context, Result};
use plotters::coord::ranged1d::ValueFormatter;
use plotters::coord::types::RangedCoordf64;
use plotters::coord::Shift;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use plotters::style::{register_font, FontStyle};

/// The `(x, y)` points of one curve.
pub type Points = Vec<(f64, f64)>;
/// One named curve.
pub type Series = (String, Points);

/// Width and height of every chart, in pixels.
pub const CHART_SIZE: (u32, u32) = (1024, 640);

/// Where Debian, Arch and Fedora put DejaVu Sans; the first that exists is used.
const FONT_PATHS: [&str; 3] = [
    "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf",
    "/usr/share/fonts/TTF/DejaVuSans.ttf",
    "/usr/share/fonts/dejavu/DejaVuSans.ttf",
];
const FONT_PACKAGE: &str = "fonts-dejavu-core";
/// The family plotters asks for by default, so tick labels find the font too.
const FONT: &str = "sans-serif";

/// Series with this many points or fewer also get a dot per point (eval curves are sparse, and a
/// single point draws no line).
const MARKER_MAX_POINTS: usize = 100;
/// Matplotlib's tab10 colours, in order.
const PALETTE: [RGBColor; 10] = [
    RGBColor(31, 119, 180),
    RGBColor(255, 127, 14),
    RGBColor(44, 160, 44),
    RGBColor(214, 39, 40),
    RGBColor(148, 103, 189),
    RGBColor(140, 86, 75),
    RGBColor(227, 119, 194),
    RGBColor(127, 127, 127),
    RGBColor(188, 189, 34),
    RGBColor(23, 190, 207),
];

/// One curve of a [`curves_chart`].
#[derive(Clone, Debug)]
pub struct Curve {
    /// Legend entry; an empty name gets none.
    pub name: String,
    pub points: Points,
    /// Index into the palette (wraps around).
    pub color: usize,
    /// Draw only a dot per point, no line (e.g. sparse eval points beside a train curve).
    pub dots_only: bool,
}

/// Draw the train and eval loss of one run (`metrics.jsonl`, as the trainer writes it) against step.
/// Returns a warning to show the user, if any.
pub fn loss_chart(metrics: &Path, out_png: &Path) -> Result<Option<String>> {
    let (train, eval) = read_losses(metrics)?;
    let title = match metrics.parent().and_then(Path::file_name) {
        Some(run) => format!("Loss: {}", run.to_string_lossy()),
        None => "Loss".to_string(),
    };
    let series = [
        ("train loss".to_string(), train),
        ("eval loss".to_string(), eval),
    ];
    line_chart(out_png, &title, "step", "loss", &series)
}

/// The `step`/`loss` and `step`/`eval_loss` points of a metrics file. A `null` loss (how serde_json
/// writes NaN) is skipped; anything else that is not a number is an error naming `file:line`.
pub fn read_losses(metrics: &Path) -> Result<(Points, Points)> {
    let text = fs::read_to_string(metrics)
        .with_context(|| format!("cannot read metrics file {}", metrics.display()))?;
    let (mut train, mut eval) = (Vec::new(), Vec::new());
    for (i, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let at = || format!("{}:{}", metrics.display(), i + 1);
        let value: serde_json::Value = serde_json::from_str(line)
            .with_context(|| format!("{}: not a JSON object, found {line:?}", at()))?;
        let obj = value
            .as_object()
            .ok_or_else(|| anyhow!("{}: expected a JSON object, found {line:?}", at()))?;
        let step = match obj.get("step").and_then(serde_json::Value::as_f64) {
            Some(step) => step,
            None => bail!("{}: expected a numeric \"step\", found {line:?}", at()),
        };
        for (key, out) in [("loss", &mut train), ("eval_loss", &mut eval)] {
            match obj.get(key) {
                None | Some(serde_json::Value::Null) => {}
                Some(v) => match v.as_f64() {
                    Some(y) => out.push((step, y)),
                    None => bail!("{}: \"{key}\" should be a number, found {v}", at()),
                },
            }
        }
    }
    Ok((train, eval))
}

/// Draw `series` as lines (with a dot per point when sparse) into `out_png`, with a title, axis
/// labels and a legend. Non-finite points are dropped; with no points at all the chart is empty
/// and says so. The file is written beside `out_png` and renamed, so readers never see half a PNG.
/// Returns a warning to show the user, if any.
pub fn line_chart(
    out_png: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    series: &[Series],
) -> Result<Option<String>> {
    let curves: Vec<Curve> = series
        .iter()
        .enumerate()
        .map(|(i, (name, pts))| Curve {
            name: name.clone(),
            points: pts.clone(),
            color: i,
            dots_only: false,
        })
        .collect();
    curves_chart(out_png, title, x_label, y_label, &curves)
}

/// [`line_chart`] with each curve's colour and style given: several runs on one chart, a run's
/// train and eval curves in the same colour.
pub fn curves_chart(
    out_png: &Path,
    title: &str,
    x_label: &str,
    y_label: &str,
    curves: &[Curve],
) -> Result<Option<String>> {
    let text = font_loaded();
    let curves: Vec<Curve> = curves
        .iter()
        .map(|c| {
            let finite = c
                .points
                .iter()
                .filter(|(x, y)| x.is_finite() && y.is_finite());
            Curve {
                points: finite.copied().collect(),
                ..c.clone()
            }
        })
        .filter(|c| !c.points.is_empty())
        .collect();
    let labels = text.then_some(Labels {
        title,
        x: x_label,
        y: y_label,
    });
    write_atomically(out_png, |tmp| draw(tmp, labels, &curves))?;
    Ok(warnings(title, out_png, curves.is_empty(), text))
}

/// What to tell the user about a chart: no data, no font.
fn warnings(title: &str, out_png: &Path, empty: bool, text: bool) -> Option<String> {
    let mut warnings = Vec::new();
    if empty {
        warnings.push(format!("{title}: no data points yet, drew an empty chart"));
    }
    if !text {
        warnings.push(format!(
            "no font at {}: drew {} without text; install {FONT_PACKAGE} for labels",
            FONT_PATHS.join(" or "),
            out_png.display()
        ));
    }
    (!warnings.is_empty()).then(|| warnings.join("; "))
}

/// The chart's text; `None` draws a chart with no text at all (no font to draw it with).
#[derive(Clone, Copy)]
struct Labels<'a> {
    title: &'a str,
    x: &'a str,
    y: &'a str,
}

fn write_atomically(out: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    let tmp = temp_path(out);
    let written = write(&tmp).and_then(|()| {
        fs::rename(&tmp, out).with_context(|| format!("cannot move {} into place", tmp.display()))
    });
    if written.is_err() {
        let _ = fs::remove_file(&tmp);
    }
    written.with_context(|| format!("cannot write chart {}", out.display()))
}

/// A hidden sibling of `out` that still ends in `.png`: plotters picks the encoder by extension.
fn temp_path(out: &Path) -> PathBuf {
    let name = out.file_name().unwrap_or_default().to_string_lossy();
    out.with_file_name(format!(".{name}.{}.tmp.png", std::process::id()))
}

/// Register DejaVu Sans with plotters once per process; false when no font file is there.
fn font_loaded() -> bool {
    static LOADED: OnceLock<bool> = OnceLock::new();
    *LOADED.get_or_init(|| {
        FONT_PATHS.iter().any(|path| {
            let Ok(bytes) = fs::read(path) else {
                return false;
            };
            // plotters keeps fonts in a global table that wants 'static bytes; this runs once.
            let bytes: &'static [u8] = Box::leak(bytes.into_boxed_slice());
            register_font(FONT, FontStyle::Normal, bytes).is_ok()
        })
    })
}

fn draw(path: &Path, labels: Option<Labels>, series: &[Curve]) -> Result<()> {
    let root = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let (x_range, y_range) = ranges(series);
    let (x_fmt, y_fmt) = (tick_format(&x_range), tick_format(&y_range));
    let mut builder = ChartBuilder::on(&root);
    builder.margin(24);
    if let Some(l) = labels {
        builder
            .caption(l.title, (FONT, 28))
            .x_label_area_size(56)
            .y_label_area_size(80);
    }
    let mut chart = builder
        .build_cartesian_2d(x_range, y_range)
        .map_err(plot_err)?;

    let mut mesh = chart.configure_mesh();
    mesh.light_line_style(RGBColor(240, 240, 240));
    if let Some(l) = labels {
        mesh.x_desc(l.x)
            .y_desc(l.y)
            .label_style((FONT, 16))
            .axis_desc_style((FONT, 20))
            .x_label_formatter(&x_fmt)
            .y_label_formatter(&y_fmt);
    }
    // Without label areas plotters draws the grid but no axes and no text: frame it instead.
    mesh.draw().map_err(plot_err)?;
    if labels.is_none() {
        let (x, y) = (chart.x_range(), chart.y_range());
        let frame = Rectangle::new([(x.start, y.start), (x.end, y.end)], BLACK.stroke_width(1));
        chart.draw_series([frame]).map_err(plot_err)?;
    }

    for c in series {
        let (color, pts) = (PALETTE[c.color % PALETTE.len()], &c.points);
        let named = labels.is_some() && !c.name.is_empty();
        if c.dots_only {
            let dots = pts.iter().map(|&p| Circle::new(p, 5, color.filled()));
            let drawn = chart.draw_series(dots).map_err(plot_err)?;
            if named {
                drawn
                    .label(&c.name)
                    .legend(move |(x, y)| Circle::new((x + 12, y), 5, color.filled()));
            }
            continue;
        }
        let line = LineSeries::new(pts.iter().copied(), color.stroke_width(2));
        let drawn = chart.draw_series(line).map_err(plot_err)?;
        if named {
            drawn.label(&c.name).legend(move |(x, y)| {
                PathElement::new([(x, y), (x + 24, y)], color.stroke_width(3))
            });
        }
        if pts.len() <= MARKER_MAX_POINTS {
            let dots = pts.iter().map(|&p| Circle::new(p, 4, color.filled()));
            chart.draw_series(dots).map_err(plot_err)?;
        }
    }
    if labels.is_some() && series.iter().any(|c| !c.name.is_empty()) {
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::UpperRight)
            .background_style(WHITE.mix(0.85))
            .border_style(RGBColor(180, 180, 180))
            .label_font((FONT, 16))
            .draw()
            .map_err(plot_err)?;
    }
    if labels.is_some() && series.is_empty() {
        let (w, h) = CHART_SIZE;
        let centred = Pos::new(HPos::Center, VPos::Center);
        let style = (FONT, 24).into_font().color(&BLACK.mix(0.6)).pos(centred);
        root.draw_text("no data points yet", &style, (w as i32 / 2, h as i32 / 2))
            .map_err(plot_err)?;
    }
    root.present().map_err(present_err)
}

type BitmapError = <BitMapBackend<'static> as DrawingBackend>::ErrorType;

/// Writing the file: the I/O error's own sentence (plotters' bitmap errors print as Debug, e.g.
/// `ImageError(IoError(Custom { .. }))` on a full disk).
fn present_err(e: DrawingAreaErrorKind<BitmapError>) -> anyhow::Error {
    use plotters_backend::DrawingErrorKind::DrawingError;
    use DrawingAreaErrorKind::BackendError;
    match e {
        BackendError(DrawingError(BitmapError::IOError(io))) => anyhow!(io),
        BackendError(DrawingError(BitmapError::ImageError(e))) => anyhow!("{e}"),
        e => plot_err(e),
    }
}

/// plotters' errors borrow the backend's error type; keep only the message.
fn plot_err(e: impl std::fmt::Display) -> anyhow::Error {
    anyhow!("plotting failed: {e}")
}

/// Axis ranges covering every point with a little margin; a unit box when there are none.
fn ranges(series: &[Curve]) -> (std::ops::Range<f64>, std::ops::Range<f64>) {
    let pts = || series.iter().flat_map(|c| c.points.iter());
    let span = |vals: Vec<f64>, pad_frac: f64| {
        let lo = vals.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = vals.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        if !lo.is_finite() {
            return 0.0..1.0;
        }
        // A flat or single-point curve still needs a non-empty range.
        let pad = if hi > lo {
            (hi - lo) * pad_frac
        } else {
            lo.abs().max(1.0) * 0.5
        };
        lo - pad..hi + pad
    };
    (
        span(pts().map(|p| p.0).collect(), 0.02),
        span(pts().map(|p| p.1).collect(), 0.05),
    )
}

/// One bar of a [`bar_chart`]: its name under the axis and its value.
pub type Bar = (String, f64);

/// Draw one bar per `(name, value)`, each labelled with `fmt(value)`, into `out_png` (written
/// atomically like [`line_chart`]). With `log_y` and every value above zero the y axis is
/// logarithmic, so bars orders of magnitude apart stay readable; otherwise it is linear, includes
/// zero, and bars may go below it. A non-finite value keeps its slot, with no bar and "n/a".
/// Returns a warning to show the user, if any.
pub fn bar_chart(
    out_png: &Path,
    title: &str,
    y_label: &str,
    bars: &[Bar],
    log_y: bool,
    fmt: &dyn Fn(f64) -> String,
) -> Result<Option<String>> {
    let text = font_loaded();
    let labels = text.then_some(Labels {
        title,
        x: "",
        y: y_label,
    });
    write_atomically(out_png, |tmp| draw_bars(tmp, labels, bars, log_y, fmt))?;
    let empty = !bars.iter().any(|(_, v)| v.is_finite());
    Ok(warnings(title, out_png, empty, text))
}

fn draw_bars(
    path: &Path,
    labels: Option<Labels>,
    bars: &[Bar],
    log_y: bool,
    fmt: &dyn Fn(f64) -> String,
) -> Result<()> {
    let root = BitMapBackend::new(path, CHART_SIZE).into_drawing_area();
    root.fill(&WHITE).map_err(plot_err)?;
    let mut builder = ChartBuilder::on(&root);
    builder.margin(24);
    if let Some(l) = labels {
        builder
            .caption(l.title, (FONT, 28))
            .x_label_area_size(48)
            .y_label_area_size(96);
    }
    // Bar i is centred on x = i.
    let x = -0.5..bars.len().max(1) as f64 - 0.5;
    let values: Vec<f64> = bars.iter().map(|b| b.1).filter(|v| v.is_finite()).collect();
    let lo = values.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = values.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    let bars = BarsOn {
        root: &root,
        labels,
        bars,
        fmt,
    };
    if log_y && lo > 0.0 && lo.is_finite() {
        // At least a decade, so there is a tick; room above the tallest bar for its label.
        let bottom = (lo / 2.0).min(hi / 10.0);
        let chart = builder
            .build_cartesian_2d(x, (bottom..hi * 2.5).log_scale())
            .map_err(plot_err)?;
        bars.fill(chart, bottom)?;
    } else {
        let (lo, hi) = if lo.is_finite() {
            (lo.min(0.0), hi.max(0.0))
        } else {
            (0.0, 1.0)
        };
        let pad = if hi > lo { (hi - lo) * 0.12 } else { 1.0 };
        let y = (lo - if lo < 0.0 { pad } else { 0.0 })..hi + pad;
        let chart = builder.build_cartesian_2d(x, y).map_err(plot_err)?;
        bars.fill(chart, 0.0)?;
    }
    root.present().map_err(present_err)
}

/// What [`draw_bars`] draws, for either y axis.
struct BarsOn<'a, 'b> {
    root: &'a DrawingArea<BitMapBackend<'b>, Shift>,
    labels: Option<Labels<'a>>,
    bars: &'a [Bar],
    fmt: &'a dyn Fn(f64) -> String,
}

impl BarsOn<'_, '_> {
    /// Mesh, bars rising (or falling) from `base`, value labels and the names under the axis.
    fn fill<'c, Y>(
        &self,
        mut chart: ChartContext<'c, BitMapBackend<'c>, Cartesian2d<RangedCoordf64, Y>>,
        base: f64,
    ) -> Result<()>
    where
        Y: Ranged<ValueType = f64> + ValueFormatter<f64>,
    {
        let y_fmt = |v: &f64| (self.fmt)(*v);
        let mut mesh = chart.configure_mesh();
        mesh.disable_x_mesh()
            .light_line_style(RGBColor(240, 240, 240))
            .x_labels(0);
        match self.labels {
            Some(l) => mesh
                .y_desc(l.y)
                .label_style((FONT, 16))
                .axis_desc_style((FONT, 20))
                .y_label_formatter(&y_fmt),
            None => mesh.y_label_formatter(&|_| String::new()),
        };
        mesh.draw().map_err(plot_err)?;
        let bottom = chart.y_range().start;
        for (i, (name, v)) in self.bars.iter().enumerate() {
            let (x, v) = (i as f64, *v);
            let color = PALETTE[i % PALETTE.len()];
            if v.is_finite() {
                let bar = Rectangle::new([(x - 0.35, base), (x + 0.35, v)], color.filled());
                chart.draw_series([bar]).map_err(plot_err)?;
            }
            if self.labels.is_none() {
                continue;
            }
            let (text, at, v_pos) = match v.is_finite() {
                true if v < base => ((self.fmt)(v), v, VPos::Top),
                true => ((self.fmt)(v), v, VPos::Bottom),
                false => ("n/a".to_string(), base, VPos::Bottom),
            };
            let style = |v_pos| {
                (FONT, 16)
                    .into_font()
                    .color(&BLACK)
                    .pos(Pos::new(HPos::Center, v_pos))
            };
            chart
                .draw_series([Text::new(text, (x, at), style(v_pos))])
                .map_err(plot_err)?;
            // Names go under the axis, in the label area outside the plot.
            let (px, py) = chart.backend_coord(&(x, bottom));
            self.root
                .draw_text(name, &style(VPos::Top), (px, py + 8))
                .map_err(plot_err)?;
        }
        if base == 0.0 {
            let zero = PathElement::new([(-0.5, 0.0), (self.bars.len() as f64, 0.0)], BLACK);
            chart.draw_series([zero]).map_err(plot_err)?;
        }
        Ok(())
    }
}

/// Tick labels with as many decimals as the axis span needs: `1200` for steps, `2.35` for losses.
fn tick_format(range: &std::ops::Range<f64>) -> impl Fn(&f64) -> String {
    let span = range.end - range.start;
    let decimals = if span >= 10.0 {
        0
    } else {
        ((-span.log10()).ceil() as i64 + 1).clamp(0, 6) as usize
    };
    move |v| format!("{v:.decimals$}")
}

#[cfg(test)]
mod tests {
    use super::*;

    const METRICS: &str = r#"{"step": 10, "loss": 2.31, "lr": 0.0002, "grad_norm": 0.8, "tokens_per_sec": 310.5, "elapsed": 12.3}
{"step": 10, "eval_loss": 2.5, "elapsed": 13.0}
{"step": 20, "loss": 2.02, "lr": 0.0002, "grad_norm": 0.7, "tokens_per_sec": 312.0, "elapsed": 24.1}

{"step": 30, "loss": null, "lr": 0.0002, "elapsed": 36.0}
{"step": 40, "loss": 1.71, "lr": 0.0002, "elapsed": 48.0, "eval_loss": 1.95}
"#;

    /// A failed write (here a full disk) reads as the OS's sentence, not plotters' Debug chain.
    #[test]
    fn a_write_error_is_one_plain_sentence() {
        use plotters_backend::DrawingErrorKind::DrawingError;
        let full = || std::io::Error::from_raw_os_error(28);
        let io = DrawingAreaErrorKind::BackendError(DrawingError(BitmapError::IOError(full())));
        let image = DrawingAreaErrorKind::BackendError(DrawingError(BitmapError::ImageError(
            full().into(),
        )));
        for e in [io, image] {
            let msg = format!("{:#}", present_err(e));
            assert!(msg.starts_with("No space left on device"), "{msg}");
            assert!(!msg.contains("Custom") && !msg.contains("Error("), "{msg}");
        }
    }

    /// Width and height from a PNG's signature and IHDR chunk; panics if it is not a PNG.
    fn png_size(path: &Path) -> (u32, u32) {
        let bytes = fs::read(path).unwrap();
        assert_eq!(
            &bytes[..8],
            b"\x89PNG\r\n\x1a\n",
            "not a PNG: {}",
            path.display()
        );
        assert_eq!(&bytes[12..16], b"IHDR");
        let be = |b: &[u8]| u32::from_be_bytes(b.try_into().unwrap());
        (be(&bytes[16..20]), be(&bytes[20..24]))
    }

    fn run_dir(metrics: &str) -> (tempfile::TempDir, PathBuf) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("metrics.jsonl");
        fs::write(&path, metrics).unwrap();
        (dir, path)
    }

    fn dir_names(dir: &Path) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        names.sort();
        names
    }

    #[test]
    fn plot_reads_train_and_eval_losses() {
        let (_dir, path) = run_dir(METRICS);
        let (train, eval) = read_losses(&path).unwrap();
        assert_eq!(train, vec![(10.0, 2.31), (20.0, 2.02), (40.0, 1.71)]);
        assert_eq!(eval, vec![(10.0, 2.5), (40.0, 1.95)]);
    }

    #[test]
    fn plot_loss_chart_writes_png_of_chart_size() {
        let (dir, path) = run_dir(METRICS);
        let out = dir.path().join("loss.png");
        let warning = loss_chart(&path, &out).unwrap();
        assert_eq!(warning.is_some(), !font_loaded(), "{warning:?}");
        assert_eq!(png_size(&out), CHART_SIZE);
        assert_eq!(dir_names(dir.path()), ["loss.png", "metrics.jsonl"]);
    }

    #[test]
    fn plot_without_font_draws_curves_only() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("bare.png");
        let curve = Curve {
            name: "a".to_string(),
            points: vec![(0.0, 1.0), (1.0, 0.5)],
            color: 0,
            dots_only: false,
        };
        draw(&out, None, &[curve]).unwrap();
        assert_eq!(png_size(&out), CHART_SIZE);
    }

    #[test]
    fn plot_empty_series_draws_empty_chart_with_note() {
        let (dir, path) = run_dir("{\"step\": 1, \"lr\": 0.1}\n");
        let out = dir.path().join("loss.png");
        let warning = loss_chart(&path, &out).unwrap().unwrap();
        assert!(warning.contains("no data points"), "{warning}");
        assert_eq!(png_size(&out), CHART_SIZE);
        let none: [Series; 0] = [];
        line_chart(&dir.path().join("none.png"), "t", "x", "y", &none).unwrap();
    }

    #[test]
    fn plot_single_point_and_flat_series_draw() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("one.png");
        let series = [
            ("one".to_string(), vec![(5.0, 2.0)]),
            (
                "flat".to_string(),
                vec![(5.0, 2.0), (5.0, 2.0), (f64::NAN, 1.0)],
            ),
        ];
        line_chart(&out, "t", "x", "y", &series).unwrap();
        assert_eq!(png_size(&out), CHART_SIZE);
    }

    #[test]
    fn plot_missing_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let missing = dir.path().join("nope.jsonl");
        let err = loss_chart(&missing, &dir.path().join("loss.png")).unwrap_err();
        assert!(format!("{err:#}").contains("nope.jsonl"), "{err:#}");
        assert!(dir_names(dir.path()).is_empty());
    }

    #[test]
    fn plot_bad_lines_are_errors_naming_file_and_line() {
        for (bad, expect) in [
            ("{\"step\": 2, \"loss\": 1.0", "not a JSON object"),
            ("[1, 2]", "expected a JSON object"),
            ("{\"loss\": 1.0}", "numeric \"step\""),
            (
                "{\"step\": 2, \"loss\": \"high\"}",
                "\"loss\" should be a number",
            ),
        ] {
            let (dir, path) = run_dir(&format!("{{\"step\": 1, \"loss\": 2.0}}\n{bad}\n"));
            let err = format!(
                "{:#}",
                loss_chart(&path, &dir.path().join("loss.png")).unwrap_err()
            );
            assert!(err.contains("metrics.jsonl:2"), "{err}");
            assert!(err.contains(expect), "{err}");
            assert_eq!(dir_names(dir.path()), ["metrics.jsonl"]);
        }
    }

    #[test]
    fn plot_unwritable_output_is_an_error_and_leaves_no_temp_file() {
        let (dir, path) = run_dir(METRICS);
        let out = dir.path().join("no_such_dir").join("loss.png");
        let err = format!("{:#}", loss_chart(&path, &out).unwrap_err());
        assert!(err.contains("cannot write chart"), "{err}");
        assert_eq!(dir_names(dir.path()), ["metrics.jsonl"]);
    }

    #[test]
    fn plot_bar_chart_draws_log_negative_missing_and_single_bars() {
        let dir = tempfile::tempdir().unwrap();
        let fmt = |v: f64| format!("{v:.1}");
        let cases: [(&str, Vec<f64>, bool); 5] = [
            ("log", vec![10.0, 1.3e8, 384.0], true),
            ("neg", vec![-0.3, 0.2, f64::NAN], false),
            ("one", vec![384.0], true),
            ("zero_on_log", vec![0.0, 5.0], true),
            ("none", vec![], false),
        ];
        for (name, values, log_y) in cases {
            let bars: Vec<Bar> = values
                .iter()
                .enumerate()
                .map(|(i, v)| (format!("bar {i}"), *v))
                .collect();
            let out = dir.path().join(format!("{name}.png"));
            let warning = bar_chart(&out, name, "y", &bars, log_y, &fmt).unwrap();
            assert_eq!(png_size(&out), CHART_SIZE, "{name}");
            let empty = !values.iter().any(|v| v.is_finite());
            let says_empty = warning.is_some_and(|w| w.contains("no data points"));
            assert_eq!(says_empty, empty, "{name}");
        }
        assert_eq!(dir_names(dir.path()).len(), 5, "temp files left behind");
    }

    #[test]
    fn plot_curves_chart_draws_lines_and_unnamed_dots() {
        let dir = tempfile::tempdir().unwrap();
        let out = dir.path().join("curves.png");
        let curves: Vec<Curve> = (0..12)
            .map(|i| Curve {
                name: if i % 2 == 0 {
                    format!("run {i}")
                } else {
                    String::new()
                },
                points: vec![(0.0, i as f64), (1.0, i as f64 / 2.0)],
                color: i / 2,
                dots_only: i % 2 == 1,
            })
            .collect();
        curves_chart(&out, "t", "x", "y", &curves).unwrap();
        assert_eq!(png_size(&out), CHART_SIZE);
    }

    #[test]
    fn plot_tick_format_fits_the_span() {
        assert_eq!(tick_format(&(0.0..1200.0))(&400.0), "400");
        assert_eq!(tick_format(&(1.5..2.5))(&2.0), "2.0");
        assert_eq!(tick_format(&(1.9..2.1))(&2.0), "2.00");
    }
}
