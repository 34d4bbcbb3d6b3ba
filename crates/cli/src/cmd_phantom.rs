//! `sam2rad phantom`: generated B-mode ultrasound images with label masks (Layout A).

use std::path::PathBuf;

use anyhow::{ensure, Result};
use sam2rad_data::phantom::{generate, PhantomClass, PhantomConfig};

/// Options of `sam2rad phantom`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Output folder; gets `Train/{imgs,gts}` and `Test/{imgs,gts}`.
    #[arg(long)]
    out: PathBuf,
    /// Training images.
    #[arg(long, default_value_t = 100)]
    train: usize,
    /// Test images.
    #[arg(long, default_value_t = 50)]
    test: usize,
    /// Random seed; the same seed gives the same files.
    #[arg(long, default_value_t = 0)]
    seed: u64,
    /// Classes: `bone` or `bone,bursa` (labels 1, 2 in that order).
    #[arg(long, default_value = "bone")]
    classes: String,
    /// Fraction of images without bone (empty masks).
    #[arg(long, default_value_t = 0.1)]
    empty_fraction: f64,
}

/// Generates the phantom data set.
pub fn run(args: Args) -> Result<()> {
    ensure!(
        (0.0..=1.0).contains(&args.empty_fraction),
        "--empty-fraction must be within 0..1, got {}",
        args.empty_fraction
    );
    let cfg = PhantomConfig {
        train: args.train,
        test: args.test,
        seed: args.seed,
        classes: PhantomClass::parse_list(&args.classes)?,
        empty_fraction: args.empty_fraction,
        ..PhantomConfig::default()
    };
    let s = generate(&cfg, &args.out)?;
    println!(
        "wrote {} training and {} test images ({} without bone) to {}",
        s.train,
        s.test,
        s.empty,
        args.out.display()
    );
    Ok(())
}
