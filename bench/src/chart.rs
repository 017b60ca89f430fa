//! The PNG chart: bars per system, one panel per figure. Text is drawn with a font embedded
//! in the binary (DejaVu Sans via the `dejavu` crate, rendered by ab_glyph): no fontconfig,
//! no system fonts.

use crate::report::fmt_num;
use anyhow::{Result, anyhow};
use plotters::coord::ranged1d::SegmentValue;
use plotters::prelude::*;
use plotters::style::text_anchor::{HPos, Pos, VPos};
use std::path::Path;
use std::sync::Once;

/// One panel: a title and (system, value) bars.
#[derive(Debug, Clone)]
pub struct Panel {
    pub title: String,
    pub bars: Vec<(String, f64)>,
}

static FONT: Once = Once::new();

fn register_font() {
    FONT.call_once(|| {
        let _ = plotters::style::register_font(
            "sans-serif",
            FontStyle::Normal,
            dejavu::sans::regular(),
        );
    });
}

fn color(label: &str) -> RGBColor {
    match label {
        "direct" => RGBColor(120, 120, 120),
        "socat" => RGBColor(76, 114, 176),
        "rathole" => RGBColor(221, 132, 82),
        "bore" => RGBColor(129, 114, 179),
        "ssh" => RGBColor(147, 120, 96),
        "relay" => RGBColor(85, 168, 104),
        _ => RGBColor(140, 200, 150),
    }
}

fn e<E: std::fmt::Debug>(err: E) -> anyhow::Error {
    anyhow!("chart: {err:?}")
}

/// Draws `panels` (up to 6, in a 2×3 grid) to a PNG at `path`.
pub fn render(path: &Path, title: &str, panels: &[Panel]) -> Result<()> {
    register_font();
    let root = BitMapBackend::new(path, (1500, 900)).into_drawing_area();
    root.fill(&WHITE).map_err(e)?;
    let root = root.titled(title, ("sans-serif", 26)).map_err(e)?;
    let areas = root.split_evenly((2, 3));
    for (area, p) in areas.iter().zip(panels) {
        let n = p.bars.len().max(1);
        let max = p.bars.iter().map(|b| b.1).fold(0.0, f64::max);
        let max = if max > 0.0 { max * 1.18 } else { 1.0 };
        let names: Vec<String> = p.bars.iter().map(|b| b.0.clone()).collect();
        let mut chart = ChartBuilder::on(area)
            .caption(&p.title, ("sans-serif", 19))
            .margin(12)
            .x_label_area_size(32)
            .y_label_area_size(62)
            .build_cartesian_2d((0..n - 1).into_segmented(), 0f64..max)
            .map_err(e)?;
        let fmt_x = |v: &SegmentValue<usize>| match v {
            SegmentValue::CenterOf(i) => names.get(*i).cloned().unwrap_or_default(),
            _ => String::new(),
        };
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&fmt_x)
            .y_label_formatter(&|v| fmt_num(*v))
            .label_style(("sans-serif", 14))
            .draw()
            .map_err(e)?;
        chart
            .draw_series(p.bars.iter().enumerate().map(|(i, (name, v))| {
                let mut r = Rectangle::new(
                    [
                        (SegmentValue::Exact(i), 0.0),
                        (SegmentValue::Exact(i + 1), *v),
                    ],
                    color(name).filled(),
                );
                r.set_margin(0, 0, 10, 10);
                r
            }))
            .map_err(e)?;
        chart
            .draw_series(p.bars.iter().enumerate().map(|(i, (_, v))| {
                Text::new(
                    fmt_num(*v),
                    (SegmentValue::CenterOf(i), *v + max * 0.01),
                    ("sans-serif", 14)
                        .into_font()
                        .color(&BLACK)
                        .pos(Pos::new(HPos::Center, VPos::Bottom)),
                )
            }))
            .map_err(e)?;
    }
    root.present().map_err(e)?;
    Ok(())
}
