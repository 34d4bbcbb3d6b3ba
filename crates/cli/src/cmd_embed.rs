//! `sam2rad embed`: image → the image embedding the mask decoder receives.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Instant;

use anyhow::Result;
use candle_core::Device;
use sam2rad_models::encoder::ImageEncoder;

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
    /// Output safetensors file (tensor `image_embeddings`, [1,256,64,64]).
    #[arg(long, value_name = "EMB.safetensors")]
    out: PathBuf,
}

/// Runs the encoder and writes `image_embeddings`.
pub fn run(args: Args) -> Result<()> {
    let dev = Device::Cpu;
    let cfg = args.model.config()?;
    let t0 = Instant::now();
    let backend = args.model.backend(false)?;
    let encoder = with_variant_hint(
        ImageEncoder::new(&cfg, backend.var_builder(&dev)),
        &backend,
        &cfg,
    )?;
    // Only the encoder is built: decoder keys in the file are expected, anything else is not.
    with_variant_hint(
        backend.check_unexpected(&["prompt_encoder.", "mask_decoder."]),
        &backend,
        &cfg,
    )?;
    let t_load = t0.elapsed();
    let t1 = Instant::now();
    let image = crate::cmd_segment::read_image(&args.image)?;
    let pre = crate::cmd_segment::preprocess(&cfg, &image, &dev)?;
    let t_pre = t1.elapsed();
    let t2 = Instant::now();
    let emb = encoder.forward(&pre.input)?;
    let t_enc = t2.elapsed();
    let mut out = HashMap::new();
    out.insert("image_embeddings".to_string(), emb);
    save_tensors(&args.out, &out)?;
    eprintln!(
        "timings: load {:.2} s, preprocess {:.3} s, encoder {:.3} s",
        t_load.as_secs_f64(),
        t_pre.as_secs_f64(),
        t_enc.as_secs_f64()
    );
    Ok(())
}
