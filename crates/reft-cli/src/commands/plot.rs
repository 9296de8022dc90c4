//! `loss.png`: the loss curve, drawn without a plotting library (a few hundred pixels do not need
//! one): loss per step in blue over a light grid, y from 0 to the highest loss.

use std::path::Path;

use anyhow::{Context, Result};
use reft::train::StepMetrics;

const W: usize = 640;
const H: usize = 360;
const MARGIN: usize = 24;

pub fn loss_png(metrics: &[StepMetrics], path: &Path) -> Result<()> {
    let mut px = vec![255u8; W * H * 3];
    let mut put = |x: usize, y: usize, c: [u8; 3]| {
        if x < W && y < H {
            px[(y * W + x) * 3..(y * W + x) * 3 + 3].copy_from_slice(&c);
        }
    };
    let (x0, x1, y0, y1) = (MARGIN, W - MARGIN, MARGIN, H - MARGIN);
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
    let file =
        std::fs::File::create(path).with_context(|| format!("writing {}", path.display()))?;
    let mut enc = png::Encoder::new(std::io::BufWriter::new(file), W as u32, H as u32);
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    enc.write_header()?.write_image_data(&px)?;
    Ok(())
}
