//! Sam2Rad's image geometry, the same in training, validation and test for every family: resize
//! the longest side to the model's input size and pad bottom/right, with the family's own
//! intensity scaling. Label masks follow into that padded frame; predictions go back with
//! `sam2rad_models::postprocess::postprocess_masks`.

use candle_core::{Device, Result, Tensor};
use sam2rad_models::config::{Family, SamConfig};
use sam2rad_models::preprocess::{self, longest_side_size, resize_pillow_bilinear, Preprocessed};
use sam2rad_models::preprocess_sam2;

/// Longest-side resize + padding with the scaling the family's weights expect.
pub fn preprocess(
    cfg: &SamConfig,
    rgb: &[u8],
    h: usize,
    w: usize,
    device: &Device,
) -> Result<Preprocessed> {
    let s = cfg.image_size;
    match cfg.family {
        Family::Sam | Family::MobileSam => preprocess::sam_preprocess(rgb, h, w, s, device),
        Family::Sam2 => preprocess_sam2::sam2_preprocess_longest_side(rgb, h, w, s, device),
        Family::MedSam => medsam_longest_side(rgb, h, w, s, device),
    }
}

/// MedSAM's scaling (per-image min-max to [0, 1], no mean/std) on the longest-side geometry.
fn medsam_longest_side(
    rgb: &[u8],
    h: usize,
    w: usize,
    s: usize,
    device: &Device,
) -> Result<Preprocessed> {
    if h == 0 || w == 0 || rgb.len() != h * w * 3 {
        candle_core::bail!(
            "expected an RGB buffer of {h}x{w}x3 bytes, got {}",
            rgb.len()
        )
    }
    let (nh, nw) = longest_side_size(h, w, s);
    let resized = resize_pillow_bilinear(rgb, h, w, 3, nh, nw);
    let lo = resized.iter().copied().min().unwrap_or(0) as f32;
    let hi = resized.iter().copied().max().unwrap_or(0) as f32;
    let range = (hi - lo).max(1e-8);
    let mut data = vec![0f32; 3 * s * s];
    for (c, plane) in data.chunks_exact_mut(s * s).enumerate() {
        for y in 0..nh {
            for x in 0..nw {
                plane[y * s + x] = (resized[(y * nw + x) * 3 + c] as f32 - lo) / range;
            }
        }
    }
    Ok(Preprocessed {
        input: Tensor::from_vec(data, (1, 3, s, s), device)?,
        original_size: (h, w),
        input_size: (nh, nw),
    })
}

/// The binary mask of `class` in a label map of `h × w`, nearest-resized to `input_size` and
/// zero-padded to `image_size²` (row-major, 0/1).
pub fn class_target(
    labels: &[u8],
    h: usize,
    w: usize,
    class: u8,
    input_size: (usize, usize),
    image_size: usize,
) -> Vec<f32> {
    let (ih, iw) = input_size;
    let mut out = vec![0f32; image_size * image_size];
    for y in 0..ih.min(image_size) {
        // Pixel-centre nearest neighbour, so small structures keep their position.
        let sy = (((y as f64 + 0.5) * h as f64 / ih as f64) as usize).min(h - 1);
        for x in 0..iw.min(image_size) {
            let sx = (((x as f64 + 0.5) * w as f64 / iw as f64) as usize).min(w - 1);
            if labels[sy * w + sx] == class {
                out[y * image_size + x] = 1.0;
            }
        }
    }
    out
}
