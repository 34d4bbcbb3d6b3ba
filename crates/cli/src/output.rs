//! Output files: written to a temporary name beside the target and renamed, so a failed run never
//! leaves a partial file behind.

use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::Tensor;

/// Writes through `write` into a temporary file, then renames it to `path`.
pub fn write_atomic(path: &Path, write: impl FnOnce(&Path) -> Result<()>) -> Result<()> {
    sam2rad_data::fsutil::write_atomic(path, write)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Saves named tensors as safetensors, atomically.
pub fn save_tensors(path: &Path, tensors: &HashMap<String, Tensor>) -> Result<()> {
    write_atomic(path, |tmp| {
        candle_core::safetensors::save(tensors, tmp)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Saves an image buffer as PNG, atomically (the format is fixed, whatever the extension says).
pub fn save_png<P, C>(path: &Path, img: &image::ImageBuffer<P, C>) -> Result<()>
where
    P: image::PixelWithColorType,
    [P::Subpixel]: image::EncodableLayout,
    C: std::ops::Deref<Target = [P::Subpixel]>,
{
    write_atomic(path, |tmp| {
        img.save_with_format(tmp, image::ImageFormat::Png)
            .with_context(|| format!("cannot write {}", path.display()))
    })
}

/// Blends a red fill and a yellow outline of `mask` (row-major, true = object) over an RGB image.
pub fn overlay(rgb: &[u8], h: usize, w: usize, mask: &[bool]) -> image::RgbImage {
    let mut out = image::RgbImage::new(w as u32, h as u32);
    for y in 0..h {
        for x in 0..w {
            let i = y * w + x;
            let px = [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
            let edge = mask[i]
                && [(0i64, 1i64), (0, -1), (1, 0), (-1, 0)]
                    .iter()
                    .any(|(dy, dx)| {
                        let (yy, xx) = (y as i64 + dy, x as i64 + dx);
                        yy < 0
                            || xx < 0
                            || yy >= h as i64
                            || xx >= w as i64
                            || !mask[yy as usize * w + xx as usize]
                    });
            let p = if edge {
                [255, 230, 0]
            } else if mask[i] {
                [
                    ((px[0] as u16 + 255) / 2) as u8,
                    (px[1] as u16 / 2) as u8,
                    (px[2] as u16 / 2) as u8,
                ]
            } else {
                px
            };
            out.put_pixel(x as u32, y as u32, image::Rgb(p));
        }
    }
    out
}
