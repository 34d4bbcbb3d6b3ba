//! Label-mask decoding: raw label values from grey, palette (index = label) and grey-as-RGB
//! PNGs at any bit depth, and from other formats through the `image` crate.

use std::io::BufReader;
use std::path::Path;

use crate::{DataError, Result};

/// Raw label values of a mask file, row-major.
pub(crate) struct RawMask {
    /// One value per pixel.
    pub values: Vec<u16>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Reads a mask file without any colour conversion.
pub(crate) fn read_mask(path: &Path) -> Result<RawMask> {
    let is_png = path
        .extension()
        .is_some_and(|e| e.eq_ignore_ascii_case("png"));
    if is_png {
        read_png(path)
    } else {
        read_other(path)
    }
}

/// A mask error naming `path`.
fn bad(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Mask {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

/// PNG through the `png` crate with no transformations, so palette indices stay labels.
fn read_png(path: &Path) -> Result<RawMask> {
    let file = std::fs::File::open(path).map_err(|e| DataError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let mut decoder = png::Decoder::new(BufReader::new(file));
    decoder.set_transformations(png::Transformations::IDENTITY);
    let mut reader = decoder
        .read_info()
        .map_err(|e| bad(path, format!("not a readable PNG ({e})")))?;
    let size = reader
        .output_buffer_size()
        .ok_or_else(|| bad(path, "image too large"))?;
    let mut buf = vec![0u8; size];
    let info = reader
        .next_frame(&mut buf)
        .map_err(|e| bad(path, format!("not a readable PNG ({e})")))?;
    let (width, height) = (info.width as usize, info.height as usize);
    let depth = info.bit_depth as usize;
    let channels = info.color_type.samples();
    let mut values = Vec::with_capacity(width * height);
    for row in buf.chunks(info.line_size).take(height) {
        for x in 0..width {
            let sample = |c: usize| -> u16 {
                let idx = x * channels + c;
                match depth {
                    16 => u16::from_be_bytes([row[2 * idx], row[2 * idx + 1]]),
                    8 => row[idx] as u16,
                    // 1, 2 and 4 bits: packed, most significant bits first.
                    d => {
                        let bit = idx * d;
                        let byte = row[bit / 8];
                        ((byte >> (8 - d - bit % 8)) & ((1u8 << d) - 1)) as u16
                    }
                }
            };
            use png::ColorType as C;
            let v = match info.color_type {
                C::Grayscale | C::GrayscaleAlpha | C::Indexed => sample(0),
                C::Rgb | C::Rgba => {
                    let (r, g, b) = (sample(0), sample(1), sample(2));
                    if r != g || g != b {
                        return Err(bad(
                            path,
                            format!(
                                "colour pixel ({r}, {g}, {b}) at x={x}; label masks must be \
                                 single-channel grey or palette images"
                            ),
                        ));
                    }
                    r
                }
            };
            values.push(v);
        }
    }
    Ok(RawMask {
        values,
        height,
        width,
    })
}

/// Other formats (TIFF, BMP, ...) through the `image` crate: grey, or RGB with equal channels.
fn read_other(path: &Path) -> Result<RawMask> {
    let img = image::ImageReader::open(path)
        .map_err(|e| DataError::Io {
            path: path.display().to_string(),
            source: e,
        })?
        .with_guessed_format()
        .map_err(|e| bad(path, format!("not a readable image ({e})")))?
        .decode()
        .map_err(|e| bad(path, format!("not a readable image ({e})")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    use image::DynamicImage as D;
    let values = match img {
        D::ImageLuma8(g) => g.into_raw().into_iter().map(u16::from).collect(),
        D::ImageLuma16(g) => g.into_raw(),
        D::ImageLumaA8(g) => g.into_raw().chunks_exact(2).map(|p| p[0] as u16).collect(),
        D::ImageLumaA16(g) => g.into_raw().chunks_exact(2).map(|p| p[0]).collect(),
        other => {
            let wide = other.color().bits_per_pixel() > 32;
            let rgb = other.to_rgb16().into_raw();
            let mut values = Vec::with_capacity(width * height);
            for (i, p) in rgb.chunks_exact(3).enumerate() {
                if p[0] != p[1] || p[1] != p[2] {
                    return Err(bad(
                        path,
                        format!(
                            "colour pixel at x={}, y={}; label masks must be single-channel",
                            i % width.max(1),
                            i / width.max(1)
                        ),
                    ));
                }
                // 8-bit sources are scaled by 257 in `to_rgb16`; undo that exactly.
                values.push(if wide { p[0] } else { p[0] / 257 });
            }
            values
        }
    };
    Ok(RawMask {
        values,
        height,
        width,
    })
}
