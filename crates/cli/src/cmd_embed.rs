//! `sam2rad embed`: image → the image embedding the mask decoder receives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use sam2rad_models::config::Family;
use sam2rad_models::encoder::ImageEncoder;
use sam2rad_models::sam2::SAM2_VIDEO_KEY_PREFIXES;
use sam2rad_models::sam2_image_encoder::Sam2ImageEncoder;

use crate::model_args::{with_variant_hint, ModelArgs};
use crate::output::save_tensors;

/// Options of `sam2rad embed`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Input image (PNG, JPEG, TIFF, BMP; grey or RGB, 8 or 16 bit).
    #[arg(long, value_name = "IMG")]
    image: PathBuf,
    /// Output safetensors file: `image_embeddings` [1,256,64,64]; SAM 2 adds `high_res_feats_0`
    /// [1,32,256,256] and `high_res_feats_1` [1,64,128,128] (after conv_s0 / conv_s1).
    #[arg(long, value_name = "EMB.safetensors")]
    out: PathBuf,
    /// SAM 2 only: longest-side resize + padding instead of the official 1024×1024 stretch.
    #[arg(long)]
    longest_side: bool,
}

/// Just the image path of a model (the decoder is not needed to embed).
enum Encoder {
    Sam(ImageEncoder),
    Sam2(Sam2ImageEncoder),
}

/// Runs the encoder and writes `image_embeddings`.
pub fn run(args: Args) -> Result<()> {
    let dev = Device::Cpu;
    let cfg = args.model.config()?;
    let t0 = Instant::now();
    let backend = args.model.backend(false)?;
    let vb = backend.var_builder(&dev);
    let (encoder, mut allowed) = match cfg.family {
        Family::Sam2 => (
            Encoder::Sam2(with_variant_hint(
                Sam2ImageEncoder::new(&cfg, vb),
                &backend,
                &cfg,
            )?),
            vec!["sam_prompt_encoder.", "sam_mask_decoder."],
        ),
        _ => (
            Encoder::Sam(with_variant_hint(
                ImageEncoder::new(&cfg, vb),
                &backend,
                &cfg,
            )?),
            vec!["prompt_encoder.", "mask_decoder."],
        ),
    };
    // Only the image path is built: decoder keys in the file are expected, anything else is not.
    if matches!(encoder, Encoder::Sam2(_)) {
        allowed.extend_from_slice(SAM2_VIDEO_KEY_PREFIXES);
    }
    with_variant_hint(backend.check_unexpected(&allowed), &backend, &cfg)?;
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let image = crate::cmd_segment::read_image(&args.image)?;
    let pre = crate::cmd_segment::preprocess(&cfg, &image, args.longest_side, &dev)?;
    let t_pre = t1.elapsed();
    let t2 = Instant::now();
    let mut out = HashMap::new();
    match &encoder {
        Encoder::Sam(e) => {
            out.insert("image_embeddings".to_string(), e.forward(&pre.input)?);
        }
        Encoder::Sam2(e) => {
            let f = e.forward(&pre.input)?;
            out.insert("image_embeddings".to_string(), f.image_embed);
            out.insert("high_res_feats_0".to_string(), f.high_res[0].clone());
            out.insert("high_res_feats_1".to_string(), f.high_res[1].clone());
        }
    }
    let t_enc = t2.elapsed();
    save_tensors(&args.out, &out)?;
    eprintln!(
        "timings: load {:.2} s, preprocess {:.3} s, encoder {:.3} s",
        t_load.as_secs_f64(),
        t_pre.as_secs_f64(),
        t_enc.as_secs_f64()
    );
    Ok(())
}
