//! `sweep.png`: one panel of the dev metric against trainable parameters, then one against
//! each searched hyper-parameter; completed trials in blue, early-stopped ones in grey (their
//! metric is from fewer epochs), the best trial in red.

use std::path::Path;

use anyhow::Result;
use reft::sweep::journal::History;
use reft::sweep::report::short;
use reft::sweep::{Param, Record, Space, Status, Value};

use super::plot::{draw_text, text_width, tick, write_png};

const PANEL_W: usize = 320;
const PANEL_H: usize = 230;
const COLS: usize = 3;
const LEFT: usize = 60;
const TOP: usize = 26;
const BOTTOM: usize = 30;
const RIGHT: usize = 14;

const BLUE: [u8; 3] = [31, 90, 200];
const GREY: [u8; 3] = [160, 160, 160];
const RED: [u8; 3] = [210, 30, 30];

/// One point to draw: where on the x axis (already mapped to a number), its metric, colour.
struct Point {
    x: f64,
    y: f64,
    colour: [u8; 3],
    best: bool,
}

/// What a panel's x axis shows.
enum Axis {
    /// Numbers (log10 when `log`), labelled at both ends.
    Numeric { log: bool },
    /// Categories at evenly spaced places, labelled under each.
    Categories(Vec<String>),
}

struct Canvas {
    w: usize,
    h: usize,
    px: Vec<u8>,
}

impl Canvas {
    fn put(&mut self, x: usize, y: usize, c: [u8; 3]) {
        if x < self.w && y < self.h {
            let i = (y * self.w + x) * 3;
            self.px[i..i + 3].copy_from_slice(&c);
        }
    }

    fn text(&mut self, s: &str, x: usize, y: usize) {
        let mut put = |x, y, c| self.put(x, y, c);
        draw_text(&mut put, s, x, y);
    }

    fn dot(&mut self, x: usize, y: usize, r: usize, c: [u8; 3]) {
        for dy in 0..=2 * r {
            for dx in 0..=2 * r {
                self.put((x + dx).saturating_sub(r), (y + dy).saturating_sub(r), c);
            }
        }
    }
}

/// Writes the panels for `history`'s finished trials to `path`.
pub fn sweep_png(history: &History, space: &Space, metric: &str, path: &Path) -> Result<()> {
    let finished: Vec<&Record> = history
        .finished()
        .filter(|r| r.status != Status::Failed && r.metric.is_some())
        .collect();
    let best = history.best().map(|b| b.trial);
    let colour = |r: &Record| match r.status {
        Status::Completed => BLUE,
        _ => GREY,
    };
    let point = |r: &Record, x: f64| Point {
        x,
        y: r.metric.unwrap_or(f64::NAN),
        colour: colour(r),
        best: Some(r.trial) == best,
    };
    let mut panels: Vec<(String, Axis, Vec<Point>)> = vec![(
        "params".into(),
        Axis::Numeric { log: true },
        finished
            .iter()
            .filter(|r| r.params > 0)
            .map(|r| point(r, (r.params as f64).log10()))
            .collect(),
    )];
    for (key, param) in &space.params {
        let (axis, points) = match param {
            Param::Categorical(values) => {
                let at = |v: &Value| values.iter().position(|x| x == v);
                let points = finished
                    .iter()
                    .filter_map(|r| Some(point(r, at(r.config.get(key)?)? as f64)))
                    .collect();
                (Axis::Categories(values.iter().map(short).collect()), points)
            }
            Param::Int { log, .. } | Param::Float { log, .. } => {
                let x = |v: &Value| v.as_f64().map(|x| if *log { x.log10() } else { x });
                let points = finished
                    .iter()
                    .filter_map(|r| Some(point(r, x(r.config.get(key)?)?)))
                    .collect();
                (Axis::Numeric { log: *log }, points)
            }
        };
        panels.push((key.clone(), axis, points));
    }
    let rows = panels.len().div_ceil(COLS);
    let mut c = Canvas {
        w: PANEL_W * COLS,
        h: PANEL_H * rows,
        px: vec![255; PANEL_W * COLS * PANEL_H * rows * 3],
    };
    for (i, (title, axis, points)) in panels.iter().enumerate() {
        let (ox, oy) = ((i % COLS) * PANEL_W, (i / COLS) * PANEL_H);
        panel(
            &mut c,
            (ox, oy),
            &format!("{metric} / {title}"),
            axis,
            points,
        );
    }
    write_png(path, &c.px, c.w, c.h)
}

fn panel(c: &mut Canvas, (ox, oy): (usize, usize), title: &str, axis: &Axis, points: &[Point]) {
    let (x0, x1) = (ox + LEFT, ox + PANEL_W - RIGHT);
    let (y0, y1) = (oy + TOP, oy + PANEL_H - BOTTOM);
    for y in y0..=y1 {
        c.put(x0, y, [0, 0, 0]);
    }
    for x in x0..=x1 {
        c.put(x, y1, [0, 0, 0]);
    }
    c.text(title, ox + 6, oy + 6);
    let ys: Vec<f64> = points
        .iter()
        .map(|p| p.y)
        .filter(|y| y.is_finite())
        .collect();
    let (lo, hi) = bounds(&ys);
    let xs: Vec<f64> = points.iter().map(|p| p.x).collect();
    let (xlo, xhi) = match axis {
        Axis::Categories(names) => (-0.5, names.len() as f64 - 0.5),
        Axis::Numeric { .. } => bounds(&xs),
    };
    for (v, y) in [(lo, y1), (hi, y0)] {
        let label = tick(v);
        c.text(
            &label,
            x0.saturating_sub(6 + text_width(&label)),
            y.saturating_sub(5),
        );
    }
    let px = |x: f64| x0 + ((x - xlo) / (xhi - xlo) * (x1 - x0) as f64) as usize;
    let py = |y: f64| y1 - ((y - lo) / (hi - lo) * (y1 - y0) as f64) as usize;
    match axis {
        Axis::Categories(names) => {
            for (k, n) in names.iter().enumerate() {
                let x = px(k as f64);
                c.text(n, x.saturating_sub(text_width(n) / 2), y1 + 8);
            }
        }
        Axis::Numeric { log } => {
            for (v, x) in [(xlo, x0), (xhi, x1)] {
                let label = if *log {
                    short_number(10f64.powf(v))
                } else {
                    tick(v)
                };
                let at = x.saturating_sub(text_width(&label) / 2);
                c.text(&label, at.min(ox + PANEL_W - text_width(&label)), y1 + 8);
            }
        }
    }
    // The best trial last, so that it is on top.
    for p in points
        .iter()
        .filter(|p| !p.best)
        .chain(points.iter().filter(|p| p.best))
    {
        if p.y.is_finite() {
            let (r, colour) = if p.best { (4, RED) } else { (2, p.colour) };
            c.dot(px(p.x), py(p.y), r, colour);
        }
    }
}

/// The range of `v`, widened by 5 % (or by 1 when it has no spread).
fn bounds(v: &[f64]) -> (f64, f64) {
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    if !lo.is_finite() || !hi.is_finite() {
        return (0.0, 1.0);
    }
    let pad = if hi > lo { (hi - lo) * 0.05 } else { 1.0 };
    (lo - pad, hi + pad)
}

/// A number in three significant digits, with an exponent when it is far from 1.
fn short_number(v: f64) -> String {
    if (0.01..10000.0).contains(&v.abs()) {
        tick(v)
    } else {
        format!("{v:.1e}")
    }
}
