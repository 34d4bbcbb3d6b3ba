//! `sam2rad segment`: manual-mode segmentation from points, a box and/or a mask prompt.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use sam2rad_models::config::{Family, SamConfig};
use sam2rad_models::preprocess::{self, Preprocessed, RgbImage};
use sam2rad_models::preprocess_sam2;
use sam2rad_models::sam::{AnySam, Prompts};

use crate::model_args::{with_variant_hint, ModelArgs};
use crate::output::{overlay, save_png, save_tensors};
use crate::prompt_args::PromptArgs;

/// Options of `sam2rad segment`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Input image (PNG, JPEG, TIFF, BMP; grey or RGB, 8 or 16 bit).
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    #[command(flatten)]
    prompts: PromptArgs,
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
    let mask_input = args.prompts.mask(&pre, cfg.image_size, &dev)?;
    if args.prompts.is_empty() {
        bail!("segment needs at least one prompt: --point, --box or --mask-input");
    }
    let t_pre = t1.elapsed();

    let t2 = Instant::now();
    let emb = sam.embed(&pre.input)?;
    let t_enc = t2.elapsed();

    let t3 = Instant::now();
    let prompts = Prompts {
        points: args.prompts.point_tuples(),
        boxes: args.prompts.bbox,
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
