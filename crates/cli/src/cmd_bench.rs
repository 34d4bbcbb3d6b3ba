//! `sam2rad bench`: encoder and decoder milliseconds per call (a benchmark, not a test).

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{ensure, Result};
use candle_core::{DType, Device, Tensor};
use sam2rad_models::sam::AnySam;

use crate::model_args::{with_variant_hint, ModelArgs};

/// Options of `sam2rad bench`.
#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    model: ModelArgs,
    /// Use seeded random weights instead of --weights (speed does not depend on the values).
    #[arg(long)]
    random: bool,
    /// Timed encoder calls after one untimed warm-up.
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Timed decoder calls (prompt encoder + dense PE + mask decoder, no mask upscaling).
    #[arg(long, default_value_t = 10)]
    decoder_runs: usize,
    /// Also write the figures as JSON.
    #[arg(long, value_name = "FILE.json")]
    json: Option<PathBuf>,
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn min(v: &[f64]) -> f64 {
    v.iter().copied().fold(f64::INFINITY, f64::min)
}

/// Times the encoder on a random 1024² input and the decoder with two clicks, multimask output.
pub fn run(args: Args) -> Result<()> {
    ensure!(
        args.runs >= 1 && args.decoder_runs >= 1,
        "--runs and --decoder-runs must be at least 1"
    );
    let dev = Device::Cpu;
    let cfg = args.model.config()?;
    let backend = args.model.backend(args.random)?;
    let sam = with_variant_hint(AnySam::new(&cfg, backend.var_builder(&dev)), &backend, &cfg)?;
    let s = cfg.image_size;
    let x = Tensor::randn(0f32, 1f32, (1, 3, s, s), &dev)?;

    let mut enc = Vec::new();
    let mut emb = sam.embed(&x)?; // warm-up
    for _ in 0..args.runs {
        let t = Instant::now();
        emb = sam.embed(&x)?;
        enc.push(t.elapsed().as_secs_f64() * 1e3);
    }

    let coords = Tensor::new(&[[[500f32, 375.], [200., 600.]]], &dev)?;
    let labels = Tensor::new(&[[1f32, 0.]], &dev)?;
    let mut dec = Vec::new();
    for i in 0..=args.decoder_runs {
        let t = Instant::now();
        let (sparse, dense) = sam
            .prompt_encoder()
            .forward(Some((&coords, &labels)), None, None)?;
        let out = sam.decode_full(&emb, &sparse, &dense)?;
        out.masks_all
            .to_dtype(DType::F32)?
            .sum_all()?
            .to_scalar::<f32>()?;
        if i > 0 {
            dec.push(t.elapsed().as_secs_f64() * 1e3);
        }
    }
    let threads = candle_core::utils::get_num_threads();
    println!(
        "model: {} ({} weights), {threads} threads",
        cfg.name,
        if args.random { "random" } else { "file" }
    );
    println!(
        "encoder: median {:.0} ms, min {:.0} ms over {} calls",
        median(enc.clone()),
        min(&enc),
        enc.len()
    );
    println!(
        "decoder: median {:.1} ms, min {:.1} ms over {} calls",
        median(dec.clone()),
        min(&dec),
        dec.len()
    );
    if let Some(p) = &args.json {
        let v = serde_json::json!({
            "model": cfg.name,
            "threads": threads,
            "encoder_ms": enc,
            "encoder_median_ms": median(enc.clone()),
            "decoder_ms": dec,
            "decoder_median_ms": median(dec.clone()),
        });
        crate::output::write_atomic(p, |tmp| {
            std::fs::write(tmp, serde_json::to_string_pretty(&v)?)?;
            Ok(())
        })?;
    }
    Ok(())
}
