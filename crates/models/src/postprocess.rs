//! Official prompt-coordinate transform (`ResizeLongestSide.apply_coords/apply_boxes`) and mask
//! upscaling (`Sam.postprocess_masks`).

use candle_core::{Result, Tensor};
use sam2rad_nn::ops;

/// Upscales low-res logits [B,K,h',w'] to the original image: bilinear to `image_size`², crop to
/// the resized image `input_size` (h, w), bilinear to `original_size` (h, w). Differentiable.
pub fn postprocess_masks(
    low_res: &Tensor,
    input_size: (usize, usize),
    original_size: (usize, usize),
    image_size: usize,
) -> Result<Tensor> {
    let (ih, iw) = input_size;
    let (oh, ow) = original_size;
    if ih == 0 || iw == 0 || ih > image_size || iw > image_size || oh == 0 || ow == 0 {
        candle_core::bail!(
            "postprocess: input size {ih}x{iw} must be within {image_size}² and the original size {oh}x{ow} non-empty"
        )
    }
    let full = ops::resize_bilinear(low_res, image_size, image_size)?;
    let cropped = full.narrow(2, 0, ih)?.narrow(3, 0, iw)?;
    ops::resize_bilinear(&cropped, oh, ow)
}

/// Scale factors `(new_w/old_w, new_h/old_h)` in f64, as numpy computes them.
fn scales(original_size: (usize, usize), input_size: (usize, usize)) -> (f64, f64) {
    let (oh, ow) = original_size;
    let (ih, iw) = input_size;
    (iw as f64 / ow as f64, ih as f64 / oh as f64)
}

/// Maps (x, y) points in original pixels to the resized `input_size` frame (f64 math, f32 result).
pub fn apply_coords(
    coords: &[[f32; 2]],
    original_size: (usize, usize),
    input_size: (usize, usize),
) -> Vec<[f32; 2]> {
    let (sx, sy) = scales(original_size, input_size);
    coords
        .iter()
        .map(|&[x, y]| [(x as f64 * sx) as f32, (y as f64 * sy) as f32])
        .collect()
}

/// Maps xyxy boxes in original pixels to the resized `input_size` frame (as two corner points).
pub fn apply_boxes(
    boxes: &[[f32; 4]],
    original_size: (usize, usize),
    input_size: (usize, usize),
) -> Vec<[f32; 4]> {
    let (sx, sy) = scales(original_size, input_size);
    boxes
        .iter()
        .map(|&[x0, y0, x1, y1]| {
            [
                (x0 as f64 * sx) as f32,
                (y0 as f64 * sy) as f32,
                (x1 as f64 * sx) as f32,
                (y1 as f64 * sy) as f32,
            ]
        })
        .collect()
}
