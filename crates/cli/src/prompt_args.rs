//! The prompt options shared by `sam2rad segment` and `sam2rad predict`: `--point`, `--box` and
//! `--mask-input`, their parsers, and reading the mask prompt.

use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use sam2rad_models::preprocess::Preprocessed;

/// A click in original-image pixels.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Point {
    /// Column in original pixels.
    pub x: f32,
    /// Row in original pixels.
    pub y: f32,
    /// 1 positive, 0 negative.
    pub label: i64,
}

fn parse_numbers<const N: usize>(s: &str, what: &str) -> Result<[f32; N], String> {
    let parts: Vec<&str> = s.split(',').map(str::trim).collect();
    if parts.len() != N {
        return Err(format!(
            "{what} needs {N} comma-separated numbers, got `{s}`"
        ));
    }
    let mut out = [0f32; N];
    for (o, p) in out.iter_mut().zip(&parts) {
        *o = p
            .parse::<f32>()
            .ok()
            .filter(|v| v.is_finite())
            .ok_or_else(|| format!("`{p}` in {what} `{s}` is not a finite number"))?;
    }
    Ok(out)
}

/// Parses `x,y,label` with label 1 (positive) or 0 (negative).
pub fn parse_point(s: &str) -> Result<Point, String> {
    let [x, y, l] = parse_numbers::<3>(s, "point")?;
    if l != 0.0 && l != 1.0 {
        return Err(format!(
            "point `{s}`: label must be 1 (positive) or 0 (negative), got {l}"
        ));
    }
    Ok(Point {
        x,
        y,
        label: l as i64,
    })
}

/// Parses `x0,y0,x1,y1` with x0 ≤ x1 and y0 ≤ y1.
pub fn parse_box(s: &str) -> Result<[f32; 4], String> {
    let b = parse_numbers::<4>(s, "box")?;
    if b[0] > b[2] || b[1] > b[3] {
        return Err(format!(
            "box `{s}` must be x0,y0,x1,y1 with x0 <= x1 and y0 <= y1"
        ));
    }
    Ok(b)
}

/// User prompts in original-image pixels. The help texts are `segment`'s; a command can reword
/// them with `#[command(mut_arg("points", ...))]` (ids `points`, `bbox`, `mask_input`).
#[derive(clap::Args, Debug)]
pub struct PromptArgs {
    /// A click `x,y,label` in original-image pixels; label 1 = positive, 0 = negative. Repeatable.
    #[arg(long = "point", value_name = "X,Y,LABEL", value_parser = parse_point, allow_hyphen_values = true)]
    pub points: Vec<Point>,
    /// A box `x0,y0,x1,y1` in original-image pixels.
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    pub bbox: Option<[f32; 4]>,
    /// Low-resolution mask prompt: safetensors holding [1,1,256,256] logits (e.g. a previous
    /// `low_res_logits`), or a mask image of the input's size (non-zero = object).
    #[arg(long, value_name = "FILE")]
    pub mask_input: Option<PathBuf>,
}

impl PromptArgs {
    /// No point, box or mask prompt was given.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.bbox.is_none() && self.mask_input.is_none()
    }

    /// The clicks as `(x, y, label)`.
    pub fn point_tuples(&self) -> Vec<(f32, f32, i64)> {
        self.points.iter().map(|p| (p.x, p.y, p.label)).collect()
    }

    /// The `--mask-input` prompt for the image preprocessed as `pre` (see [`read_mask_input`]).
    pub fn mask(
        &self,
        pre: &Preprocessed,
        image_size: usize,
        dev: &Device,
    ) -> Result<Option<Tensor>> {
        match &self.mask_input {
            Some(p) => Ok(Some(read_mask_input(p, pre, image_size, dev)?)),
            None => Ok(None),
        }
    }
}

/// Reads a mask prompt: safetensors low-resolution logits, or a mask image of the original size
/// mapped into the padded input frame of `pre` (object → +8, background → −8).
pub fn read_mask_input(
    path: &Path,
    pre: &Preprocessed,
    image_size: usize,
    dev: &Device,
) -> Result<Tensor> {
    let is_st = path.extension().and_then(|e| e.to_str()) == Some("safetensors");
    if is_st {
        let tensors = candle_core::safetensors::load(path, dev).with_context(|| {
            format!(
                "mask input {}: not a readable safetensors file",
                path.display()
            )
        })?;
        let t = tensors
            .get("low_res_logits")
            .or_else(|| tensors.get("mask_input"))
            .or_else(|| {
                if tensors.len() == 1 {
                    tensors.values().next()
                } else {
                    None
                }
            })
            .with_context(|| {
                format!(
                    "mask input {}: expected a tensor `low_res_logits` or `mask_input`",
                    path.display()
                )
            })?;
        let low = image_size / 4;
        let t = t.to_dtype(candle_core::DType::F32)?;
        let t = match t.dims() {
            [1, 1, h, w] if *h == low && *w == low => t,
            [1, k, h, w] if *h == low && *w == low && *k > 1 => t.narrow(1, 0, 1)?,
            [h, w] | [1, h, w] if *h == low && *w == low => t.reshape((1, 1, low, low))?,
            d => bail!(
                "mask input {}: shape {d:?}, expected [1,1,{low},{low}] logits",
                path.display()
            ),
        };
        return Ok(t);
    }
    // A mask image at the original size: map it into the padded input frame, then to logits.
    let (orig_h, orig_w) = pre.original_size;
    let img = image::open(path)
        .with_context(|| format!("mask input {}: not a readable image", path.display()))?
        .to_luma8();
    if (img.height() as usize, img.width() as usize) != (orig_h, orig_w) {
        bail!(
            "mask input {}: size {}x{} differs from the image's {}x{}",
            path.display(),
            img.width(),
            img.height(),
            orig_w,
            orig_h
        );
    }
    let vals: Vec<f32> = img
        .pixels()
        .map(|p| if p.0[0] > 0 { 1.0 } else { 0.0 })
        .collect();
    let m = Tensor::from_vec(vals, (1, 1, orig_h, orig_w), dev)?;
    let (ih, iw) = pre.input_size;
    let m = sam2rad_nn::ops::resize_bilinear(&m, ih, iw)?;
    let m = m
        .pad_with_zeros(2, 0, image_size - ih)?
        .pad_with_zeros(3, 0, image_size - iw)?;
    let low = image_size / 4;
    let m = sam2rad_nn::ops::resize_bilinear(&m, low, low)?;
    // Object → +8, background → −8: a confident prompt, like a thresholded previous prediction.
    Ok(((m * 16.0)? - 8.0)?)
}
