//! `sam2rad segment`: manual-mode segmentation from points, a box and/or a mask prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use sam2rad_models::config::{Family, SamConfig};
use sam2rad_models::preprocess::{self, Preprocessed, RgbImage};
use sam2rad_models::preprocess_sam2;
use sam2rad_models::sam::{AnySam, Prompts};

use crate::model_args::{with_variant_hint, ModelArgs};
use crate::output::{overlay, save_png, save_tensors};

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

/// Options of `sam2rad segment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Input image (PNG, JPEG, TIFF, BMP; grey or RGB, 8 or 16 bit).
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// A click `x,y,label` in original-image pixels; label 1 = positive, 0 = negative. Repeatable.
    #[arg(long = "point", value_name = "X,Y,LABEL", value_parser = parse_point, allow_hyphen_values = true)]
    points: Vec<Point>,
    /// A box `x0,y0,x1,y1` in original-image pixels.
    #[arg(long = "box", value_name = "X0,Y0,X1,Y1", value_parser = parse_box)]
    bbox: Option<[f32; 4]>,
    /// Low-resolution mask prompt: safetensors holding [1,1,256,256] logits (e.g. a previous
    /// `low_res_logits`), or a mask image of the input's size (non-zero = object).
    #[arg(long, value_name = "FILE")]
    mask_input: Option<PathBuf>,
    /// Return three masks (ambiguity-aware) instead of one; MASK.png is the best-IoU one.
    #[arg(long)]
    multimask: bool,
    /// Output mask PNG (0 background, 255 object).
    #[arg(long, value_name = "MASK.png")]
    out: PathBuf,
    /// Also write `low_res_logits`, `iou_predictions` and `masks_logits` here.
    #[arg(long, value_name = "OUT.safetensors")]
    logits: Option<PathBuf>,
    /// Also write the image with the mask drawn over it.
    #[arg(long, value_name = "OVERLAY.png")]
    overlay: Option<PathBuf>,
    /// SAM 2 only: resize the longest side and pad (Sam2Rad's geometry) instead of the official
    /// stretch to 1024×1024.
    #[arg(long)]
    longest_side: bool,
}

/// Reads any supported image as RGB u8.
pub fn read_image(path: &Path) -> Result<RgbImage> {
    Ok(preprocess::load_rgb(path)?)
}

/// The family's official preprocessing; `longest_side` switches SAM 2 from the official
/// 1024×1024 stretch to longest-side resize + padding (what Sam2Rad trains with).
pub fn preprocess(
    cfg: &SamConfig,
    img: &RgbImage,
    longest_side: bool,
    dev: &Device,
) -> Result<Preprocessed> {
    let (rgb, h, w, s) = (&img.data, img.height, img.width, cfg.image_size);
    Ok(match cfg.family {
        Family::MedSam => preprocess::medsam_preprocess(rgb, h, w, s, dev)?,
        Family::Sam2 if longest_side => {
            preprocess_sam2::sam2_preprocess_longest_side(rgb, h, w, s, dev)?
        }
        Family::Sam2 => preprocess_sam2::sam2_preprocess(rgb, h, w, s, dev)?,
        Family::Sam | Family::MobileSam => preprocess::sam_preprocess(rgb, h, w, s, dev)?,
    })
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

/// Segments and writes the mask, optional logits and overlay.
pub fn run(args: Args) -> Result<()> {
    let dev = Device::Cpu;
    let cfg = args.model.config()?;
    let t0 = Instant::now();
    let backend = args.model.backend(false)?;
    let sam = with_variant_hint(AnySam::new(&cfg, backend.var_builder(&dev)), &backend, &cfg)?;
    with_variant_hint(
        backend.check_unexpected(sam.unexpected_allowed_prefixes()),
        &backend,
        &cfg,
    )?;
    let t_load = t0.elapsed();

    let t1 = Instant::now();
    let image = read_image(&args.image)?;
    let pre = preprocess(&cfg, &image, args.longest_side, &dev)?;
    let mask_input = match &args.mask_input {
        Some(p) => Some(read_mask_input(p, &pre, cfg.image_size, &dev)?),
        None => None,
    };
    if args.points.is_empty() && args.bbox.is_none() && mask_input.is_none() {
        bail!("segment needs at least one prompt: --point, --box or --mask-input");
    }
    let t_pre = t1.elapsed();

    let t2 = Instant::now();
    let emb = sam.embed(&pre.input)?;
    let t_enc = t2.elapsed();

    let t3 = Instant::now();
    let prompts = Prompts {
        points: args.points.iter().map(|p| (p.x, p.y, p.label)).collect(),
        boxes: args.bbox,
        mask_input,
    };
    let pred = sam.predict(
        &emb,
        pre.original_size,
        pre.input_size,
        &prompts,
        args.multimask,
    )?;
    let t_dec = t3.elapsed();

    let ious = pred.iou_predictions.flatten_all()?.to_vec1::<f32>()?;
    let best = ious
        .iter()
        .enumerate()
        .max_by(|a, b| a.1.total_cmp(b.1))
        .map(|(i, _)| i)
        .unwrap_or(0);
    let (h, w) = pre.original_size;
    let logits = pred
        .masks_logits
        .get(0)?
        .get(best)?
        .flatten_all()?
        .to_vec1::<f32>()?;
    let mask: Vec<bool> = logits.iter().map(|&v| v > 0.0).collect();
    let png = image::GrayImage::from_raw(
        w as u32,
        h as u32,
        mask.iter().map(|&m| if m { 255 } else { 0 }).collect(),
    )
    .context("mask buffer size")?;

    if let Some(p) = &args.logits {
        let mut out = HashMap::new();
        out.insert("low_res_logits".to_string(), pred.low_res_logits.clone());
        out.insert("iou_predictions".to_string(), pred.iou_predictions.clone());
        out.insert("masks_logits".to_string(), pred.masks_logits.clone());
        if let Some(obj) = &pred.object_score_logits {
            out.insert("object_score_logits".to_string(), obj.clone());
        }
        save_tensors(p, &out)?;
    }
    if let Some(p) = &args.overlay {
        save_png(p, &overlay(&image.data, h, w, &mask))?;
    }
    save_png(&args.out, &png)?;
    let area = mask.iter().filter(|&&m| m).count();
    eprintln!(
        "timings: load {:.2} s, preprocess {:.3} s, encoder {:.3} s, decoder {:.3} s",
        t_load.as_secs_f64(),
        t_pre.as_secs_f64(),
        t_enc.as_secs_f64(),
        t_dec.as_secs_f64()
    );
    eprintln!(
        "mask {best} of {}: predicted IoU {:.3}, {area} pixels",
        ious.len(),
        ious.get(best).copied().unwrap_or(f32::NAN)
    );
    Ok(())
}
