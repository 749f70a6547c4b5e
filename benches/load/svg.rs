//! A small self-contained SVG line chart of per-second values: one
//! polyline per series, seconds along x, milliseconds up y, a legend.
//! Only `std`: the integration tests include this file as it is
//! (tests/it/load_harness.rs).

use std::fmt::Write;

/// One line: its name and a value per second (`None`: no sample, the
/// point is left out), drawn in colour number `color`, dashed or not (a
/// server's NATS-path probe shares its colour, dashed).
pub(crate) struct Series<'a> {
    pub(crate) name: &'a str,
    pub(crate) values: &'a [Option<f64>],
    pub(crate) color: usize,
    pub(crate) dashed: bool,
}

const W: f64 = 760.0;
const H: f64 = 360.0;
const LEFT: f64 = 70.0;
const RIGHT: f64 = 190.0;
const TOP: f64 = 36.0;
const BOTTOM: f64 = 44.0;
const COLORS: [&str; 6] = [
    "#1f77b4", "#d62728", "#2ca02c", "#9467bd", "#ff7f0e", "#17becf",
];

/// The smallest 1, 2 or 5 times a power of ten at or above `x` (> 0).
pub(crate) fn nice_ceil(x: f64) -> f64 {
    let x = x.max(1e-3);
    let p = 10f64.powi(x.log10().floor() as i32);
    [1.0, 2.0, 5.0, 10.0]
        .iter()
        .map(|m| m * p)
        .find(|v| *v >= x)
        .unwrap_or(10.0 * p)
}

fn escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The chart as an SVG document.
pub(crate) fn line_chart(title: &str, series: &[Series<'_>]) -> String {
    let seconds = series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0)
        .max(2);
    let top = series
        .iter()
        .flat_map(|s| s.values.iter().flatten())
        .fold(0.0f64, |a, &b| a.max(b));
    let ymax = nice_ceil(top);
    let (pw, ph) = (W - LEFT - RIGHT, H - TOP - BOTTOM);
    let x = |sec: usize| LEFT + pw * sec as f64 / (seconds - 1) as f64;
    let y = |ms: f64| TOP + ph * (1.0 - (ms / ymax).clamp(0.0, 1.0));
    let mut out = String::new();
    let _ = writeln!(
        out,
        r#"<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" font-family="sans-serif" font-size="12">"#
    );
    let _ = writeln!(out, r#"<rect width="{W}" height="{H}" fill="white"/>"#);
    let _ = writeln!(
        out,
        r#"<text x="{LEFT}" y="20" font-size="14">{}</text>"#,
        escape(title)
    );
    // Axes, y ticks (ms) and x ticks (s).
    let (x0, y0, x1) = (LEFT, TOP + ph, LEFT + pw);
    let _ = writeln!(
        out,
        r#"<path d="M{x0},{TOP} V{y0} H{x1}" fill="none" stroke="black"/>"#
    );
    for i in 0..=4 {
        let v = ymax * i as f64 / 4.0;
        let yy = y(v);
        let _ = writeln!(
            out,
            r##"<line x1="{x0}" y1="{yy:.1}" x2="{x1}" y2="{yy:.1}" stroke="#ddd"/><text x="{:.1}" y="{:.1}" text-anchor="end">{} ms</text>"##,
            x0 - 6.0,
            yy + 4.0,
            trim(v)
        );
    }
    let step = seconds.div_ceil(10).max(1);
    for sec in (0..seconds).step_by(step) {
        let xx = x(sec);
        let _ = writeln!(
            out,
            r#"<line x1="{xx:.1}" y1="{y0}" x2="{xx:.1}" y2="{:.1}" stroke="black"/><text x="{xx:.1}" y="{:.1}" text-anchor="middle">{sec} s</text>"#,
            y0 + 5.0,
            y0 + 18.0
        );
    }
    let _ = writeln!(
        out,
        r#"<text x="{:.1}" y="{:.1}" text-anchor="middle">seconds since the first publish (p99 of each second)</text>"#,
        LEFT + pw / 2.0,
        H - 6.0
    );
    for (i, s) in series.iter().enumerate() {
        let color = COLORS[s.color % COLORS.len()];
        let dash = if s.dashed {
            r#" stroke-dasharray="6 4""#
        } else {
            ""
        };
        let points: Vec<String> = s
            .values
            .iter()
            .enumerate()
            .filter_map(|(sec, v)| v.map(|ms| format!("{:.1},{:.1}", x(sec), y(ms))))
            .collect();
        let _ = writeln!(
            out,
            r#"<polyline fill="none" stroke="{color}" stroke-width="2"{dash} points="{}"/>"#,
            points.join(" ")
        );
        let ly = TOP + 16.0 * i as f64 + 8.0;
        let _ = writeln!(
            out,
            r#"<line x1="{:.1}" y1="{ly:.1}" x2="{:.1}" y2="{ly:.1}" stroke="{color}" stroke-width="2"{dash}/><text x="{:.1}" y="{:.1}">{}</text>"#,
            x1 + 12.0,
            x1 + 32.0,
            x1 + 38.0,
            ly + 4.0,
            escape(s.name)
        );
    }
    out.push_str("</svg>\n");
    out
}

/// A tick value without needless decimals.
fn trim(v: f64) -> String {
    let s = format!("{v:.3}");
    s.trim_end_matches('0').trim_end_matches('.').to_string()
}
