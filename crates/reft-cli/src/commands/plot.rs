//! `loss.png`: the loss curve, drawn without a plotting library (a few hundred pixels do not need
//! one): loss per step in blue over a light grid, y from 0 to the highest loss, both axes
//! numbered and labelled ("step", "loss") in a small built-in bitmap font.

use std::path::Path;

use anyhow::{Context, Result};
use reft::train::StepMetrics;

pub use super::sweep_plot::sweep_png;

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 24;
/// Room for the y numbers and label on the left, and the x numbers and label below.
const LEFT: usize = 64;
const BOTTOM: usize = 44;
/// Each font pixel drawn as SCALE×SCALE.
const SCALE: usize = 2;

/// 3×5 glyphs, one row per `u8` (bits 2..0 left to right), for the characters the axes need.
fn glyph(c: char) -> Option<[u8; 5]> {
    Some(match c {
        '0' => [7, 5, 5, 5, 7],
        '1' => [2, 6, 2, 2, 7],
        '2' => [7, 1, 7, 4, 7],
        '3' => [7, 1, 3, 1, 7],
        '4' => [5, 5, 7, 1, 1],
        '5' => [7, 4, 7, 1, 7],
        '6' => [7, 4, 7, 5, 7],
        '7' => [7, 1, 1, 2, 2],
        '8' => [7, 5, 7, 5, 7],
        '9' => [7, 5, 7, 1, 7],
        '.' => [0, 0, 0, 0, 2],
        '-' => [0, 0, 7, 0, 0],
        '_' => [0, 0, 0, 0, 7],
        '+' => [0, 2, 7, 2, 0],
        '=' => [0, 7, 0, 7, 0],
        ':' => [0, 2, 0, 2, 0],
        '(' => [1, 2, 2, 2, 1],
        ')' => [4, 2, 2, 2, 4],
        '/' => [1, 1, 2, 4, 4],
        ';' => [0, 2, 0, 2, 4],
        ',' => [0, 0, 0, 2, 4],
        c if c.is_ascii_alphabetic() => letter(c.to_ascii_uppercase())?,
        _ => return None,
    })
}

/// Letters, all drawn as capitals (3×5 pixels leave no room for readable lower case).
fn letter(c: char) -> Option<[u8; 5]> {
    const CAPS: [[u8; 5]; 26] = [
        [2, 5, 7, 5, 5],
        [6, 5, 6, 5, 6],
        [3, 4, 4, 4, 3],
        [6, 5, 5, 5, 6],
        [7, 4, 6, 4, 7],
        [7, 4, 6, 4, 4],
        [3, 4, 5, 5, 3],
        [5, 5, 7, 5, 5],
        [7, 2, 2, 2, 7],
        [1, 1, 1, 5, 2],
        [5, 5, 6, 5, 5],
        [4, 4, 4, 4, 7],
        [5, 7, 7, 5, 5],
        [6, 5, 5, 5, 5],
        [2, 5, 5, 5, 2],
        [6, 5, 6, 4, 4],
        [2, 5, 5, 6, 3],
        [6, 5, 6, 5, 5],
        [3, 4, 2, 1, 6],
        [7, 2, 2, 2, 2],
        [5, 5, 5, 5, 7],
        [5, 5, 5, 5, 2],
        [5, 5, 7, 7, 5],
        [5, 5, 2, 5, 5],
        [5, 5, 2, 2, 2],
        [7, 1, 2, 4, 7],
    ];
    CAPS.get((c as u8).checked_sub(b'A')? as usize).copied()
}

/// Width in pixels of `text` drawn by [`draw_text`].
pub(super) fn text_width(text: &str) -> usize {
    text.chars().count() * 4 * SCALE
}

/// Draws `text` with its top-left corner at (x, y).
pub(super) fn draw_text(
    put: &mut impl FnMut(usize, usize, [u8; 3]),
    text: &str,
    x: usize,
    y: usize,
) {
    for (i, c) in text.chars().enumerate() {
        let Some(rows) = glyph(c) else { continue };
        for (r, bits) in rows.iter().enumerate() {
            for col in 0..3 {
                if bits >> (2 - col) & 1 == 1 {
                    for dy in 0..SCALE {
                        for dx in 0..SCALE {
                            put(
                                x + (i * 4 + col) * SCALE + dx,
                                y + r * SCALE + dy,
                                [0, 0, 0],
                            );
                        }
                    }
                }
            }
        }
    }
}

/// A tick label: up to three significant digits, no exponent for everyday losses.
pub(super) fn tick(v: f64) -> String {
    if v == 0.0 {
        return "0".into();
    }
    let decimals = (2 - v.abs().log10().floor() as i32).clamp(0, 4) as usize;
    format!("{v:.decimals$}")
}

pub fn loss_png(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    let mut px = vec![255u8; W * H * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < W && y < H {
            px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    let (x0, x1, y0, y1) = (LEFT, W - MARGIN, MARGIN, H - BOTTOM);
    for i in 0..=4 {
        let y = y0 + (y1 - y0) * i / 4;
        for x in x0..=x1 {
            put(x, y, [225, 225, 225]);
        }
    }
    for y in y0..=y1 {
        put(x0, y, [0, 0, 0]);
    }
    for x in x0..=x1 {
        put(x, y1, [0, 0, 0]);
    }
    let max = metrics
        .iter()
        .map(|m| m.loss)
        .fold(0f64, f64::max)
        .max(1e-9);
    let n = metrics.len().max(2) - 1;
    // Numbers: the loss at each grid line, the step at five places along x; then the labels.
    for i in 0..=4 {
        let y = y1 - (y1 - y0) * i / 4;
        let label = tick(max * i as f64 / 4.0);
        draw_text(&mut put, &label, x0 - 6 - text_width(&label), y - 5);
    }
    let last_step = metrics.last().map_or(1, |m| m.step);
    let first_step = metrics.first().map_or(1, |m| m.step);
    for i in 0..=4 {
        let step = first_step + (last_step - first_step) * i / 4;
        let x = x0 + (x1 - x0) * (step - first_step) / (last_step - first_step).max(1);
        for y in y1..y1 + 4 {
            put(x, y, [0, 0, 0]);
        }
        let label = step.to_string();
        draw_text(
            &mut put,
            &label,
            x.saturating_sub(text_width(&label) / 2),
            y1 + 8,
        );
    }
    draw_text(
        &mut put,
        "step",
        (x0 + x1 - text_width("step")) / 2,
        y1 + 24,
    );
    draw_text(&mut put, "loss", 4, 2);
    let point = |i: usize, loss: f64| -> (f64, f64) {
        let x = x0 as f64 + (x1 - x0) as f64 * i as f64 / n as f64;
        let y = y1 as f64 - (y1 - y0) as f64 * (loss / max).clamp(0.0, 1.0);
        (x, y)
    };
    for (i, w) in metrics.windows(2).enumerate() {
        let (a, b) = (point(i, w[0].loss), point(i + 1, w[1].loss));
        let steps = ((b.0 - a.0).abs().max((b.1 - a.1).abs()) as usize).max(1);
        for s in 0..=steps {
            let t = s as f64 / steps as f64;
            let (x, y) = (a.0 + (b.0 - a.0) * t, a.1 + (b.1 - a.1) * t);
            for d in 0..2 {
                put(x as usize, y as usize + d, [31, 90, 200]);
            }
        }
    }
    write_png(path, &px, W, H)
}

/// Writes RGB pixels `w` × `h` as a PNG file.
pub(super) fn write_png(path: &Path, px: &[u8], w: usize, h: usize) -> Result<()> {
    let file =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), w as u32, h as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(px)?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metrics(losses: &[f64]) -> Vec<StepMetrics> {
        losses
            .iter()
            .enumerate()
            .map(|(i, &loss)| StepMetrics {
                step: i + 1,
                epoch: (i + 1) as f64 / 2.0,
                loss,
                lr: 1e-3,
                grad_norm: 1.0,
                tokens: 10,
                step_time_s: 0.1,
            })
            .collect()
    }

    /// Dark pixels in the rectangle [x0, x1) × [y0, y1) of an RGB image `W` wide.
    fn ink(px: &[u8], (x0, x1): (usize, usize), (y0, y1): (usize, usize)) -> usize {
        (y0..y1)
            .flat_map(|y| (x0..x1).map(move |x| (y * W + x) * 3))
            .filter(|&i| px[i] < 80 && px[i + 1] < 80 && px[i + 2] < 80)
            .count()
    }

    #[test]
    fn both_axes_carry_numbers_and_labels() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("loss.png");
        loss_png(&metrics(&[3.0, 2.5, 1.0, 0.5]), &path).unwrap();
        let decoder = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut reader = decoder.read_info().unwrap();
        let mut px = vec![0; reader.output_buffer_size()];
        reader.next_frame(&mut px).unwrap();
        // Left of the y axis: the loss numbers; below the x axis: the steps and "step".
        assert!(ink(&px, (0, LEFT - 4), (MARGIN, H - BOTTOM)) > 100);
        assert!(ink(&px, (LEFT, W), (H - BOTTOM + 6, H - BOTTOM + 20)) > 50);
        assert!(ink(&px, (LEFT, W), (H - BOTTOM + 22, H)) > 20);
        // The "loss" label above the numbers.
        assert!(ink(&px, (0, LEFT), (0, MARGIN - 8)) > 20);
        assert_eq!(tick(3.0), "3.00");
        assert_eq!(tick(0.75), "0.750");
        assert_eq!(tick(12.5), "12.5");
    }
}
