//! SAM 2 preprocessing (`SAM2Transforms`): `ToTensor` (/255), PyTorch's antialiased float
//! bilinear resize (`F.interpolate(..., mode="bilinear", align_corners=False, antialias=True)`,
//! reproduced with its f32 arithmetic) and ImageNet normalisation; plus a longest-side + pad
//! variant.

use candle_core::{Device, Result, Tensor};

use crate::preprocess::{check_rgb, longest_side_size, Preprocessed};

/// SAM 2's normalisation mean (RGB, 0..1 scale).
pub const SAM2_MEAN: [f32; 3] = [0.485, 0.456, 0.406];
/// SAM 2's normalisation std (RGB, 0..1 scale).
pub const SAM2_STD: [f32; 3] = [0.229, 0.224, 0.225];

/// Filter taps of one resampling pass: output `o` reads `count[o]` inputs from `first[o]` with
/// weights `weights[o * ksize ..]`.
struct Taps {
    ksize: usize,
    first: Vec<usize>,
    count: Vec<usize>,
    weights: Vec<f32>,
}

/// PyTorch's `_compute_indices_min_size_weights_aa` for the linear (triangle) filter, keeping
/// its mix of f32 storage and f64 intermediates so the weights match bit for bit.
fn aa_taps(in_size: usize, out_size: usize) -> Taps {
    let scale = in_size as f32 / out_size as f32;
    // Downscaling widens the triangle by the scale (antialias); upscaling keeps support 1.
    let (support, invscale) = if scale >= 1.0 {
        (scale, (1.0 / scale as f64) as f32)
    } else {
        (1.0f32, 1.0f32)
    };
    let ksize = support.ceil() as usize * 2 + 1;
    let mut taps = Taps {
        ksize,
        first: Vec::with_capacity(out_size),
        count: Vec::with_capacity(out_size),
        weights: vec![0.0; out_size * ksize],
    };
    for o in 0..out_size {
        let center = (scale as f64 * (o as f64 + 0.5)) as f32;
        // C++ `static_cast<int64_t>` truncates toward zero, as `as i64` does.
        let lo = (((center - support) as f64 + 0.5) as i64).max(0);
        let hi = (((center + support) as f64 + 0.5) as i64).min(in_size as i64);
        let n = (hi - lo).clamp(0, ksize as i64) as usize;
        let row = &mut taps.weights[o * ksize..o * ksize + n];
        let mut total = 0f32;
        for (j, wt) in row.iter_mut().enumerate() {
            let x = ((((j as i64 + lo) as f32 - center) as f64 + 0.5) * invscale as f64) as f32;
            let x = x.abs();
            *wt = if x < 1.0 { 1.0 - x } else { 0.0 };
            total += *wt;
        }
        if total != 0.0 {
            row.iter_mut().for_each(|wt| *wt /= total);
        }
        taps.first.push(lo as usize);
        taps.count.push(n);
    }
    taps
}

/// Resamples the middle axis of row-major `[outer, in_len, inner]` data to `out_len`.
fn resample_pass(
    src: &[f32],
    dims: (usize, usize, usize),
    out_len: usize,
    taps: &Taps,
) -> Vec<f32> {
    let (outer, in_len, inner) = dims;
    let mut out = vec![0f32; outer * out_len * inner];
    for b in 0..outer {
        let plane = &src[b * in_len * inner..(b + 1) * in_len * inner];
        for o in 0..out_len {
            let (first, n) = (taps.first[o], taps.count[o]);
            let k = &taps.weights[o * taps.ksize..o * taps.ksize + n];
            let dst = &mut out[(b * out_len + o) * inner..(b * out_len + o + 1) * inner];
            for (i, d) in dst.iter_mut().enumerate() {
                // PyTorch's kernel starts from the first product and accumulates the rest in
                // tap order; its build contracts `acc += v * w` to an FMA, and only the FMA
                // reproduces its output bit for bit.
                let mut acc = k.first().map_or(0.0, |&w0| plane[first * inner + i] * w0);
                for (j, &wt) in k.iter().enumerate().skip(1) {
                    acc = plane[(first + j) * inner + i].mul_add(wt, acc);
                }
                *d = acc;
            }
        }
    }
    out
}

/// PyTorch's `F.interpolate(x, (out_h, out_w), mode="bilinear", align_corners=False,
/// antialias=True)` on planar f32 `[channels, h, w]` data: width pass first, then height; a
/// dimension whose size does not change is left untouched.
pub fn resize_bilinear_antialias(
    src: &[f32],
    channels: usize,
    h: usize,
    w: usize,
    out_h: usize,
    out_w: usize,
) -> Result<Vec<f32>> {
    if src.len() != channels * h * w || h == 0 || w == 0 || out_h == 0 || out_w == 0 {
        candle_core::bail!(
            "antialiased resize: {} values are not a non-empty {channels}x{h}x{w} image, or the {out_h}x{out_w} target is empty",
            src.len()
        )
    }
    let mut x = src.to_vec();
    if out_w != w {
        x = resample_pass(&x, (channels * h, w, 1), out_w, &aa_taps(w, out_w));
    }
    if out_h != h {
        x = resample_pass(&x, (channels, h, out_w), out_h, &aa_taps(h, out_h));
    }
    Ok(x)
}

/// `ToTensor` of RGB uint8 HWC data: planar `[3, h, w]` floats in 0..1.
fn to_planar_unit(rgb: &[u8], h: usize, w: usize) -> Result<Vec<f32>> {
    check_rgb(rgb, h, w)?;
    let mut out = vec![0f32; 3 * h * w];
    for (c, plane) in out.chunks_exact_mut(h * w).enumerate() {
        for (d, px) in plane.iter_mut().zip(rgb.chunks_exact(3)) {
            *d = px[c] as f32 / 255.0;
        }
    }
    Ok(out)
}

/// Resizes to `(nh, nw)`, normalises, and zero-pads bottom/right to `s`×`s` (after the
/// normalisation, so pads are exactly 0).
fn resize_normalise_pad(
    rgb: &[u8],
    h: usize,
    w: usize,
    (nh, nw): (usize, usize),
    s: usize,
    device: &Device,
) -> Result<Preprocessed> {
    let planar = to_planar_unit(rgb, h, w)?;
    let resized = resize_bilinear_antialias(&planar, 3, h, w, nh, nw)?;
    let mut data = vec![0f32; 3 * s * s];
    for (c, (dst, src)) in data
        .chunks_exact_mut(s * s)
        .zip(resized.chunks_exact(nh * nw))
        .enumerate()
    {
        for (dst_row, src_row) in dst.chunks_exact_mut(s).zip(src.chunks_exact(nw)) {
            for (d, &v) in dst_row.iter_mut().zip(src_row) {
                *d = (v - SAM2_MEAN[c]) / SAM2_STD[c];
            }
        }
    }
    Ok(Preprocessed {
        input: Tensor::from_vec(data, (1, 3, s, s), device)?,
        original_size: (h, w),
        input_size: (nh, nw),
    })
}

/// `SAM2ImagePredictor` preprocessing of RGB uint8 HWC data: /255, antialiased bilinear resize
/// straight to `image_size`² (aspect ratio not kept), ImageNet normalisation.
pub fn sam2_preprocess(
    rgb: &[u8],
    h: usize,
    w: usize,
    image_size: usize,
    device: &Device,
) -> Result<Preprocessed> {
    let s = image_size;
    resize_normalise_pad(rgb, h, w, (s, s), s, device)
}

/// Sam2Rad's variant: the same float resize but of the longest side to `image_size`
/// (`new = int(side·scale + 0.5)`), normalised, then zero-padded bottom/right to `image_size`².
pub fn sam2_preprocess_longest_side(
    rgb: &[u8],
    h: usize,
    w: usize,
    image_size: usize,
    device: &Device,
) -> Result<Preprocessed> {
    let (nh, nw) = longest_side_size(h, w, image_size);
    if nh == 0 || nw == 0 {
        candle_core::bail!("a {h}x{w} image resized to longest side {image_size} has an empty side")
    }
    resize_normalise_pad(rgb, h, w, (nh, nw), image_size, device)
}
