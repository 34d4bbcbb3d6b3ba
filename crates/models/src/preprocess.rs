//! Official preprocessing: Pillow-exact uint8 bilinear resize, normalisation and padding (SAM,
//! MobileSAM); MedSAM's square bicubic resize and min-max scaling; image-file loading. The resize
//! is written here because parity needs Pillow's fixed-point arithmetic bit for bit, which no
//! Rust image crate reproduces.

use std::path::Path;

use candle_core::{Device, Result, Tensor};

use crate::error::ModelError;

/// SAM's `pixel_mean` (RGB, 0..255 scale).
pub const PIXEL_MEAN: [f32; 3] = [123.675, 116.28, 103.53];
/// SAM's `pixel_std` (RGB, 0..255 scale).
pub const PIXEL_STD: [f32; 3] = [58.395, 57.12, 57.375];

/// Pillow's fixed-point precision for 8-bit resampling.
const PRECISION_BITS: u32 = 22;

/// Fixed-point filter taps of one resampling pass: for output index `i`, taps
/// `weights[i * ksize .. i * ksize + count[i]]` apply to source indices `first[i]..`.
struct Taps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<i32>,
}

/// Pillow's `precompute_coeffs` + `normalize_coeffs_8bpc` for the bilinear (triangle) filter.
fn bilinear_taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f64 / out_size as f64;
    // Downscaling widens the triangle (antialias); upscaling keeps support 1.
    let filter_scale = scale.max(1.0);
    let support = filter_scale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut taps = Taps {
        ksize,
        first: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        weights: vec![0; out_size * ksize],
    };
    let mut k = vec![0f64; ksize];
    // Pillow multiplies by the reciprocal rather than dividing; keep that rounding.
    let ss = 1.0 / filter_scale;
    for o in 0..out_size {
        let center = (o as f64 + 0.5) * scale;
        // `(int)` in C truncates toward zero; the clamps make that the same as floor here.
        let lo = ((center - support + 0.5) as i64).max(0) as usize;
        let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
        let n = hi.saturating_sub(lo);
        let mut total = 0.0;
        for (x, kx) in k.iter_mut().enumerate().take(n) {
            let t = ((x + lo) as f64 - center + 0.5) * ss;
            let w = (1.0 - t.abs()).max(0.0);
            *kx = w;
            total += w;
        }
        let row = &mut taps.weights[o * ksize..o * ksize + n];
        for (dst, &w) in row.iter_mut().zip(&k[..n]) {
            let w = if total != 0.0 { w / total } else { w };
            let fixed = w * (1u32 << PRECISION_BITS) as f64;
            // Round half away from zero, as Pillow does.
            *dst = if fixed < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        taps.first.push(lo);
        taps.count.push(n);
    }
    taps
}

/// Pillow's `clip8`: drop the fixed-point fraction and saturate to 0..255.
fn clip8(v: i64) -> u8 {
    if v >= (1i64 << (PRECISION_BITS + 8)) {
        255
    } else if v <= 0 {
        0
    } else {
        (v >> PRECISION_BITS) as u8
    }
}

/// Reproduces Pillow's `Image.resize((new_w, new_h), Image.BILINEAR)` on uint8 HWC data exactly
/// (two fixed-point passes, horizontal first into a uint8 buffer, antialiased when shrinking).
///
/// Panics if `src.len() != h * w * channels` (callers validate user input first).
pub fn resize_pillow_bilinear(
    src: &[u8],
    h: usize,
    w: usize,
    channels: usize,
    new_h: usize,
    new_w: usize,
) -> Vec<u8> {
    assert_eq!(
        src.len(),
        h * w * channels,
        "resize: buffer is not {h}x{w}x{channels}"
    );
    if new_h == 0 || new_w == 0 || h == 0 || w == 0 {
        return vec![0; new_h * new_w * channels];
    }
    let round = 1i64 << (PRECISION_BITS - 1);
    let vert = bilinear_taps(h, new_h);
    // Only the source rows the vertical pass reads are resampled horizontally.
    let (row0, row1) = if h != new_h {
        (vert.first[0], vert.first[new_h - 1] + vert.count[new_h - 1])
    } else {
        (0, h)
    };
    let (tmp, tmp_w, row_off) = if w != new_w {
        let horiz = bilinear_taps(w, new_w);
        let mut tmp = vec![0u8; (row1 - row0) * new_w * channels];
        for (y, out_row) in tmp.chunks_exact_mut(new_w * channels).enumerate() {
            let in_row = &src[(y + row0) * w * channels..(y + row0 + 1) * w * channels];
            for (x, out_px) in out_row.chunks_exact_mut(channels).enumerate() {
                let k = &horiz.weights[x * horiz.ksize..x * horiz.ksize + horiz.count[x]];
                let first = horiz.first[x];
                for (c, out) in out_px.iter_mut().enumerate() {
                    let mut acc = round;
                    for (i, &kw) in k.iter().enumerate() {
                        acc += in_row[(first + i) * channels + c] as i64 * kw as i64;
                    }
                    *out = clip8(acc);
                }
            }
        }
        (tmp, new_w, row0)
    } else {
        (src.to_vec(), w, 0)
    };
    if h == new_h {
        return tmp;
    }
    let stride = tmp_w * channels;
    let mut out = vec![0u8; new_h * stride];
    for (y, out_row) in out.chunks_exact_mut(stride).enumerate() {
        let k = &vert.weights[y * vert.ksize..y * vert.ksize + vert.count[y]];
        let first = vert.first[y] - row_off;
        for (i, out) in out_row.iter_mut().enumerate() {
            let mut acc = round;
            for (j, &kw) in k.iter().enumerate() {
                acc += tmp[(first + j) * stride + i] as i64 * kw as i64;
            }
            *out = clip8(acc);
        }
    }
    out
}

/// SAM's `ResizeLongestSide.get_preprocess_shape`: the longest side becomes `target`, the other
/// is `int(side * scale + 0.5)` with `scale = target / max(h, w)` in f64.
pub fn longest_side_size(h: usize, w: usize, target: usize) -> (usize, usize) {
    let scale = target as f64 / h.max(w) as f64;
    (
        (h as f64 * scale + 0.5) as usize,
        (w as f64 * scale + 0.5) as usize,
    )
}

/// An encoder input together with the geometry needed to map prompts and masks back.
#[derive(Debug, Clone)]
pub struct Preprocessed {
    /// Encoder input, `[1, 3, S, S]` f32.
    pub input: Tensor,
    /// Original image size `(h, w)`.
    pub original_size: (usize, usize),
    /// Size of the resized image inside the input before padding, `(h, w)`.
    pub input_size: (usize, usize),
}

/// An error unless `rgb` is a non-empty RGB HWC buffer of `h`×`w` pixels.
pub(crate) fn check_rgb(rgb: &[u8], h: usize, w: usize) -> Result<()> {
    if h == 0 || w == 0 || rgb.len() != h * w * 3 {
        candle_core::bail!(
            "expected an RGB HWC buffer of {h}x{w}x3 = {} bytes, got {} bytes",
            h * w * 3,
            rgb.len()
        )
    }
    Ok(())
}

/// SAM / MobileSAM preprocessing of an RGB uint8 HWC image: Pillow-bilinear resize of the longest
/// side to `image_size`, `(x − mean) / std`, then zero padding at the bottom and right.
pub fn sam_preprocess(
    rgb: &[u8],
    h: usize,
    w: usize,
    image_size: usize,
    device: &Device,
) -> Result<Preprocessed> {
    check_rgb(rgb, h, w)?;
    let (nh, nw) = longest_side_size(h, w, image_size);
    let resized = resize_pillow_bilinear(rgb, h, w, 3, nh, nw);
    let s = image_size;
    // Padding is applied after normalisation, so pads are exactly 0.
    let mut data = vec![0f32; 3 * s * s];
    for (c, plane) in data.chunks_exact_mut(s * s).enumerate() {
        for y in 0..nh {
            let src_row = &resized[y * nw * 3..(y + 1) * nw * 3];
            let dst_row = &mut plane[y * s..y * s + nw];
            for (x, d) in dst_row.iter_mut().enumerate() {
                *d = (src_row[x * 3 + c] as f32 - PIXEL_MEAN[c]) / PIXEL_STD[c];
            }
        }
    }
    Ok(Preprocessed {
        input: Tensor::from_vec(data, (1, 3, s, s), device)?,
        original_size: (h, w),
        input_size: (nh, nw),
    })
}

/// Keys cubic-convolution kernel (a = −0.5).
fn cubic(t: f64) -> f64 {
    let t = t.abs();
    if t <= 1.0 {
        (1.5 * t - 2.5) * t * t + 1.0
    } else if t < 2.0 {
        ((-0.5 * t + 2.5) * t - 4.0) * t + 2.0
    } else {
        0.0
    }
}

/// Mirror an index into `0..n` (`d c b | a b c d | c b a`), scipy's "mirror" boundary.
fn mirror(i: i64, n: usize) -> usize {
    let n = n as i64;
    if n == 1 {
        return 0;
    }
    let period = 2 * (n - 1);
    let m = i.rem_euclid(period);
    (if m < n { m } else { period - m }) as usize
}

/// Resamples one line `src` to `out.len()` samples (pixel-centre aligned), with a Gaussian
/// anti-alias prefilter when `sigma > 0`, then cubic interpolation.
fn resample_line(src: &[f64], out: &mut [f64], sigma: f64) {
    let n = src.len();
    let blurred;
    let line = if sigma > 0.0 {
        // scipy's gaussian_filter1d: truncate at 4σ, mirror boundary ("reflect" in skimage terms).
        let r = (4.0 * sigma + 0.5) as i64;
        let k: Vec<f64> = (-r..=r)
            .map(|i| (-0.5 * (i as f64 / sigma).powi(2)).exp())
            .collect();
        let sum: f64 = k.iter().sum();
        blurred = (0..n as i64)
            .map(|i| {
                k.iter()
                    .enumerate()
                    .map(|(j, kj)| kj * src[mirror(i + j as i64 - r, n)])
                    .sum::<f64>()
                    / sum
            })
            .collect::<Vec<_>>();
        &blurred[..]
    } else {
        src
    };
    let scale = n as f64 / out.len() as f64;
    for (o, dst) in out.iter_mut().enumerate() {
        let x = (o as f64 + 0.5) * scale - 0.5;
        let x0 = x.floor() as i64;
        let mut acc = 0.0;
        for i in x0 - 1..=x0 + 2 {
            acc += cubic(x - i as f64) * line[mirror(i, n)];
        }
        *dst = acc;
    }
}

/// MedSAM preprocessing: resize straight to `image_size`² (aspect ratio not kept), truncate to
/// uint8, then per-image min-max scaling to [0, 1]; no mean/std and no padding.
///
/// MedSAM uses scikit-image `resize(order=3, anti_aliasing=True, preserve_range=True)`. This port
/// is skimage-like, not bit-exact: the same Gaussian anti-alias prefilter (σ = (scale − 1)/2,
/// mirror boundary) but Keys cubic convolution instead of a cubic B-spline, so pixels can differ
/// by a few grey levels. The output is clipped to the input range before the uint8 cast, as
/// skimage's `clip=True` does.
pub fn medsam_preprocess(
    rgb: &[u8],
    h: usize,
    w: usize,
    image_size: usize,
    device: &Device,
) -> Result<Preprocessed> {
    check_rgb(rgb, h, w)?;
    let s = image_size;
    let (lo, hi) = rgb
        .iter()
        .fold((u8::MAX, u8::MIN), |(lo, hi), &v| (lo.min(v), hi.max(v)));
    let (lo, hi) = (lo as f64, hi as f64);
    let sigma_x = ((w as f64 / s as f64 - 1.0) / 2.0).max(0.0);
    let sigma_y = ((h as f64 / s as f64 - 1.0) / 2.0).max(0.0);
    let mut resized = vec![0u8; 3 * s * s];
    let mut line = vec![0f64; w];
    let mut col = vec![0f64; h];
    let mut col_out = vec![0f64; s];
    for c in 0..3 {
        // Horizontal pass into an f64 [h, s] plane, then vertical pass per column.
        let mut mid = vec![0f64; h * s];
        for y in 0..h {
            for (x, v) in line.iter_mut().enumerate() {
                *v = rgb[(y * w + x) * 3 + c] as f64;
            }
            resample_line(&line, &mut mid[y * s..(y + 1) * s], sigma_x);
        }
        for x in 0..s {
            for (y, v) in col.iter_mut().enumerate() {
                *v = mid[y * s + x];
            }
            resample_line(&col, &mut col_out, sigma_y);
            for (y, v) in col_out.iter().enumerate() {
                // `.astype(np.uint8)` truncates.
                resized[c * s * s + y * s + x] = v.clamp(lo, hi) as u8;
            }
        }
    }
    let (mn, mx) = resized
        .iter()
        .fold((u8::MAX, u8::MIN), |(a, b), &v| (a.min(v), b.max(v)));
    let range = ((mx as f64 - mn as f64).max(1e-8)) as f32;
    let data: Vec<f32> = resized
        .iter()
        .map(|&v| (v as f32 - mn as f32) / range)
        .collect();
    Ok(Preprocessed {
        input: Tensor::from_vec(data, (1, 3, s, s), device)?,
        original_size: (h, w),
        input_size: (s, s),
    })
}

/// An 8-bit RGB image in HWC order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RgbImage {
    /// Pixels, `height * width * 3` bytes, row-major HWC.
    pub data: Vec<u8>,
    /// Rows.
    pub height: usize,
    /// Columns.
    pub width: usize,
}

/// Min-max scales samples of any depth to 0..255 (constant images map to 0).
fn minmax_to_u8(v: &[f64]) -> Vec<u8> {
    let (lo, hi) = v
        .iter()
        .fold((f64::INFINITY, f64::NEG_INFINITY), |(a, b), &x| {
            (a.min(x), b.max(x))
        });
    let range = hi - lo;
    v.iter()
        .map(|&x| {
            if range > 0.0 {
                ((x - lo) / range * 255.0).round() as u8
            } else {
                0
            }
        })
        .collect()
}

/// Loads a PNG/JPEG/TIFF/BMP file as 8-bit RGB: grey is repeated to 3 channels and alpha is
/// dropped (not composited). 16-bit and float images are min-max scaled to 0..255 over the whole
/// image, which keeps the contrast of medical scans that use a small part of the 16-bit range
/// (a plain `>> 8` would leave them nearly black). 8-bit images are used as stored.
pub fn load_rgb(path: &Path) -> std::result::Result<RgbImage, ModelError> {
    let shown = path.display().to_string();
    let bad = |reason: String| ModelError::Io {
        path: shown.clone(),
        source: std::io::Error::new(std::io::ErrorKind::InvalidData, reason),
    };
    let reader = image::ImageReader::open(path).map_err(|e| ModelError::Io {
        path: shown.clone(),
        source: e,
    })?;
    let reader = reader
        .with_guessed_format()
        .map_err(|e| bad(format!("not a readable image ({e})")))?;
    let img = reader
        .decode()
        .map_err(|e| bad(format!("not a readable image ({e})")))?;
    let (width, height) = (img.width() as usize, img.height() as usize);
    use image::DynamicImage as D;
    let data = match img {
        D::ImageLuma8(g) => g.into_raw().iter().flat_map(|&v| [v, v, v]).collect(),
        D::ImageLumaA8(g) => g
            .into_raw()
            .chunks_exact(2)
            .flat_map(|p| [p[0]; 3])
            .collect(),
        D::ImageRgb8(rgb) => rgb.into_raw(),
        D::ImageRgba8(rgba) => rgba
            .into_raw()
            .chunks_exact(4)
            .flat_map(|p| [p[0], p[1], p[2]])
            .collect(),
        D::ImageLuma16(g) => {
            let v: Vec<f64> = g.into_raw().iter().map(|&x| x as f64).collect();
            minmax_to_u8(&v).iter().flat_map(|&v| [v, v, v]).collect()
        }
        D::ImageLumaA16(g) => {
            let v: Vec<f64> = g.into_raw().chunks_exact(2).map(|p| p[0] as f64).collect();
            minmax_to_u8(&v).iter().flat_map(|&v| [v, v, v]).collect()
        }
        other => {
            // Every remaining layout (16-bit or float RGB(A)) goes through f32 RGB.
            let v: Vec<f64> = other
                .into_rgb32f()
                .into_raw()
                .iter()
                .map(|&x| x as f64)
                .collect();
            minmax_to_u8(&v)
        }
    };
    if data.len() != height * width * 3 || height == 0 || width == 0 {
        return Err(bad(format!(
            "unsupported or empty image ({height}x{width})"
        )));
    }
    Ok(RgbImage {
        data,
        height,
        width,
    })
}
