//! A tiny line-chart renderer for training curves (`RUN/curves.png`), drawn pixel by pixel with
//! the `image` crate.
//!
//! No text is drawn: labels would need a font (a dependency, or a hand-made glyph table) for
//! little gain, since the exact numbers are in `metrics.csv` next to the picture and the picture
//! is only for the shape of the curves. Instead every panel has a fixed, documented layout: the
//! x axis runs over epochs 1..=E with a light vertical grid line per epoch (at most 50 lines),
//! and the y axis has 10 equal divisions between the panel's `y_range` bounds.

use image::{Rgb, RgbImage};

/// Background colour.
const WHITE: Rgb<u8> = Rgb([255, 255, 255]);
/// Panel frame colour.
const FRAME: Rgb<u8> = Rgb([90, 90, 90]);
/// Grid colour.
const GRID: Rgb<u8> = Rgb([225, 225, 225]);
/// Pixels between a panel's frame and the image edge / the next panel.
const MARGIN: u32 = 12;
/// Most vertical grid lines per panel.
const MAX_X_GRID: usize = 50;
/// Horizontal grid divisions.
const Y_GRID: usize = 10;

/// One curve: a value per x position (None = no point there) and its colour.
#[derive(Debug, Clone)]
pub struct Series<'a> {
    /// Values in x order; consecutive defined values are joined by a line.
    pub values: &'a [Option<f64>],
    /// Line colour (RGB).
    pub color: [u8; 3],
}

/// One chart panel.
#[derive(Debug, Clone)]
pub struct Panel<'a> {
    /// Curves drawn in order (later ones on top).
    pub series: Vec<Series<'a>>,
    /// Fixed y range (bottom, top); None = 0 up to the largest finite value (at least 1e-6).
    pub y_range: Option<(f64, f64)>,
}

/// Renders `panels` side by side, each `panel_w × panel_h` pixels inside its frame.
pub fn render(panels: &[Panel], panel_w: u32, panel_h: u32) -> RgbImage {
    let n = panels.len().max(1) as u32;
    let width = n * (panel_w + MARGIN) + MARGIN;
    let height = panel_h + 2 * MARGIN;
    let mut img = RgbImage::from_pixel(width, height, WHITE);
    for (i, panel) in panels.iter().enumerate() {
        let x0 = MARGIN + i as u32 * (panel_w + MARGIN);
        draw_panel(&mut img, panel, x0, MARGIN, panel_w, panel_h);
    }
    img
}

/// Encodes `img` as PNG bytes.
pub fn png_bytes(img: &RgbImage) -> image::ImageResult<Vec<u8>> {
    let mut out = std::io::Cursor::new(Vec::new());
    img.write_to(&mut out, image::ImageFormat::Png)?;
    Ok(out.into_inner())
}

/// Draws one panel with its frame at (`x0`, `y0`).
fn draw_panel(img: &mut RgbImage, panel: &Panel, x0: u32, y0: u32, w: u32, h: u32) {
    let n = panel
        .series
        .iter()
        .map(|s| s.values.len())
        .max()
        .unwrap_or(0);
    let (lo, hi) = panel.y_range.unwrap_or_else(|| {
        let top = panel
            .series
            .iter()
            .flat_map(|s| s.values.iter().flatten())
            .copied()
            .filter(|v| v.is_finite())
            .fold(0f64, f64::max);
        (0.0, top.max(1e-6))
    });
    let span = if hi > lo { hi - lo } else { 1.0 };
    let (x1, y1) = (x0 + w - 1, y0 + h - 1);
    // Grid first, then the frame and the curves over it.
    for k in 1..Y_GRID {
        let y = y0 + (k as u32 * (h - 1)) / Y_GRID as u32;
        line(img, (x0 as f64, y as f64), (x1 as f64, y as f64), GRID, 1);
    }
    let px = |i: usize| -> f64 {
        if n <= 1 {
            x0 as f64 + (w - 1) as f64 / 2.0
        } else {
            x0 as f64 + i as f64 * (w - 1) as f64 / (n - 1) as f64
        }
    };
    let every = n.div_ceil(MAX_X_GRID).max(1);
    for i in (0..n).step_by(every) {
        line(img, (px(i), y0 as f64), (px(i), y1 as f64), GRID, 1);
    }
    for (a, b) in [
        ((x0, y0), (x1, y0)),
        ((x1, y0), (x1, y1)),
        ((x1, y1), (x0, y1)),
        ((x0, y1), (x0, y0)),
    ] {
        line(
            img,
            (a.0 as f64, a.1 as f64),
            (b.0 as f64, b.1 as f64),
            FRAME,
            1,
        );
    }
    let py = |v: f64| -> f64 {
        let t = ((v - lo) / span).clamp(0.0, 1.0);
        y1 as f64 - t * (h - 1) as f64
    };
    for s in &panel.series {
        let color = Rgb(s.color);
        let mut prev: Option<(f64, f64)> = None;
        for (i, v) in s.values.iter().enumerate() {
            let Some(v) = v.filter(|v| v.is_finite()) else {
                prev = None;
                continue;
            };
            let p = (px(i), py(v));
            match prev {
                Some(q) => line(img, q, p, color, 2),
                None => line(img, p, p, color, 3),
            }
            prev = Some(p);
        }
    }
}

/// Draws a line of `thickness` pixels (square brush) from `a` to `b`, clipped to the image.
fn line(img: &mut RgbImage, a: (f64, f64), b: (f64, f64), color: Rgb<u8>, thickness: u32) {
    let steps = (b.0 - a.0).abs().max((b.1 - a.1).abs()).ceil().max(1.0) as usize;
    let r = thickness as i64 / 2;
    let (w, h) = (img.width() as i64, img.height() as i64);
    for k in 0..=steps {
        let t = k as f64 / steps as f64;
        let x = (a.0 + t * (b.0 - a.0)).round() as i64;
        let y = (a.1 + t * (b.1 - a.1)).round() as i64;
        for dy in -r..=(thickness as i64 - 1 - r) {
            for dx in -r..=(thickness as i64 - 1 - r) {
                let (xx, yy) = (x + dx, y + dy);
                if (0..w).contains(&xx) && (0..h).contains(&yy) {
                    img.put_pixel(xx as u32, yy as u32, color);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draws_curves_inside_the_frame() {
        let a = [Some(1.0), Some(0.5), None, Some(0.25)];
        let b = [Some(0.2), Some(0.8)];
        let img = render(
            &[
                Panel {
                    series: vec![Series {
                        values: &a,
                        color: [255, 0, 0],
                    }],
                    y_range: None,
                },
                Panel {
                    series: vec![Series {
                        values: &b,
                        color: [0, 0, 255],
                    }],
                    y_range: Some((0.0, 1.0)),
                },
            ],
            100,
            60,
        );
        assert_eq!(img.dimensions(), (2 * 112 + 12, 84));
        let count = |c: [u8; 3]| img.pixels().filter(|p| p.0 == c).count();
        assert!(count([255, 0, 0]) > 50);
        assert!(count([0, 0, 255]) > 50);
        // The top-left value 1.0 of the autoscaled panel sits on the top frame row.
        assert_eq!(img.get_pixel(MARGIN, MARGIN).0, [255, 0, 0]);
        assert!(png_bytes(&img).is_ok_and(|b| b.starts_with(b"\x89PNG")));
    }
}
