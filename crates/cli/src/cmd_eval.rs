//! `sam2rad eval`: Dice/IoU (optionally HD95/NSD) of a trained run, or of the zero-shot box
//! baseline of a frozen base model, on a data set split.

use std::path::PathBuf;

use anyhow::{bail, Result};
use candle_core::Device;
use sam2rad_core::eval::{evaluate, EvalOptions, EvalReport, Target};
use sam2rad_core::infer::Mode;
use sam2rad_core::metrics::SurfaceOptions;
use sam2rad_core::run::{self, Which};
use sam2rad_data::layout::Dataset;
use sam2rad_models::sam::AnySam;

use crate::model_args::{with_variant_hint, ModelArgs};

/// Parses a spacing `MM` (both axes) or `ROW,COL`, each positive and finite.
fn parse_spacing(s: &str) -> Result<(f64, f64), String> {
    let vals: Vec<f64> = s
        .split(',')
        .map(|p| p.trim().parse::<f64>())
        .collect::<Result<_, _>>()
        .map_err(|_| format!("spacing `{s}`: expected MM or ROW,COL numbers"))?;
    let ok = |v: f64| v.is_finite() && v > 0.0;
    match vals.as_slice() {
        [v] if ok(*v) => Ok((*v, *v)),
        [r, c] if ok(*r) && ok(*c) => Ok((*r, *c)),
        _ => Err(format!(
            "spacing `{s}`: expected one or two positive numbers"
        )),
    }
}

/// Options of `sam2rad eval`.
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Run folder written by `sam2rad train` (config.json + best/last.safetensors).
    #[arg(long, value_name = "RUN", conflicts_with_all = ["model", "model_config"])]
    run: Option<PathBuf>,
    /// Zero-shot baseline: the frozen base model (with --weights), prompted with ground-truth
    /// boxes. With --run, --weights replaces the run's base weights path.
    #[command(flatten)]
    model: ModelArgs,
    /// Data set root (Layout A or nnU-Net raw).
    #[arg(long, value_name = "DIR")]
    data: PathBuf,
    /// Split to evaluate.
    #[arg(long, default_value = "Test")]
    split: String,
    /// Prompting: auto (learned prompts), box (ground-truth box only), auto+box. Default: auto
    /// for a run, box for the zero-shot baseline (its only mode).
    #[arg(long, value_parser = clap::value_parser!(Mode))]
    mode: Option<Mode>,
    /// Output folder (default: RUN/eval-<split>-<mode>, or eval-zeroshot-<model>-<split>).
    #[arg(long, value_name = "DIR")]
    out: Option<PathBuf>,
    /// Which checkpoint of the run: best or last.
    #[arg(long, default_value = "best", value_parser = clap::value_parser!(Which))]
    checkpoint: Which,
    /// Also compute HD95 and normalised surface Dice.
    #[arg(long)]
    hd95: bool,
    /// Pixel spacing for HD95/NSD: MM, or ROW,COL (default 1 = pixels).
    #[arg(long, value_name = "MM", value_parser = parse_spacing, requires = "hd95")]
    spacing: Option<(f64, f64)>,
    /// NSD tolerance, in the units of --spacing.
    #[arg(long, value_name = "MM", default_value_t = 2.0, requires = "hd95")]
    nsd_tolerance: f64,
    /// Zero-shot baseline: number of classes (default: the data set's metadata, else 1).
    #[arg(long, value_name = "C", conflicts_with = "run")]
    num_classes: Option<usize>,
    /// Overlays of the N worst and N best cases.
    #[arg(long, value_name = "N", default_value_t = 3)]
    overlays: usize,
    /// One-click experiment: give this share of the worst cases (e.g. 0.1) one simulated
    /// corrective click each in semi-autonomous mode and report their Dice before and after.
    #[arg(long, value_name = "FRACTION", requires = "run")]
    click_worst: Option<f64>,
}

/// Evaluates and prints the per-class means and where the files went.
pub fn run(args: Args) -> Result<()> {
    let dev = Device::Cpu;
    let surface = args.hd95.then(|| SurfaceOptions {
        spacing: args.spacing.unwrap_or((1.0, 1.0)),
        nsd_tolerance: args.nsd_tolerance,
    });
    if args.hd95 && !(args.nsd_tolerance.is_finite() && args.nsd_tolerance >= 0.0) {
        bail!(
            "--nsd-tolerance {} must be a non-negative number",
            args.nsd_tolerance
        );
    }
    let dataset = Dataset::open(&args.data, &args.split)?;
    let report = match &args.run {
        Some(dir) => {
            let mode = args.mode.unwrap_or(Mode::Auto);
            let run = run::load(dir, args.checkpoint, args.model.weights.as_deref(), &dev)?;
            let opts = EvalOptions {
                mode,
                num_classes: None,
                surface,
                model_name: format!("run {}", run.checkpoint.display()),
                out_dir: args
                    .out
                    .clone()
                    .unwrap_or_else(|| dir.join(format!("eval-{}-{}", dataset.split, mode.name()))),
                overlays: args.overlays,
                click_worst: args.click_worst,
            };
            evaluate(Target::Sam2Rad(&run.model), &dataset, &opts)?
        }
        None => {
            let mode = args.mode.unwrap_or(Mode::Box);
            if args.model.model.is_none() && args.model.model_config.is_none() {
                bail!("choose --run RUN, or --model/--model-config with --weights for the zero-shot baseline");
            }
            let cfg = args.model.config()?;
            let backend = args.model.backend(false)?;
            let sam =
                with_variant_hint(AnySam::new(&cfg, backend.var_builder(&dev)), &backend, &cfg)?;
            with_variant_hint(
                backend.check_unexpected(sam.unexpected_allowed_prefixes()),
                &backend,
                &cfg,
            )?;
            let weights = args
                .model
                .weights
                .as_ref()
                .map(|w| w.display().to_string())
                .unwrap_or_default();
            let opts = EvalOptions {
                mode,
                num_classes: args.num_classes,
                surface,
                model_name: format!("{} zero-shot ({weights})", cfg.name),
                out_dir: args.out.clone().unwrap_or_else(|| {
                    PathBuf::from(format!("eval-zeroshot-{}-{}", cfg.name, dataset.split))
                }),
                overlays: args.overlays,
                click_worst: None,
            };
            evaluate(Target::ZeroShot(&sam), &dataset, &opts)?
        }
    };
    print_report(&report);
    Ok(())
}

/// Prints one line per class and the output files.
fn print_report(r: &EvalReport) {
    println!(
        "{} on {} ({}, {} images), mode {} (Dice and IoU ×100, mean ± std over images)",
        r.model, r.data, r.split, r.num_images, r.mode
    );
    let f = |v: Option<f64>| v.map_or("-".to_string(), |x| format!("{:.2}", 100.0 * x));
    for c in &r.classes {
        let s = &c.summary;
        let name = c
            .name
            .as_deref()
            .map(|n| format!(" ({n})"))
            .unwrap_or_default();
        let mut line = format!(
            "class {}{name}: Dice {} ± {}, IoU {} ± {} over {} cases; {} false positive(s) on empty ground truth, {} true negative(s)",
            s.class,
            f(s.dice_mean),
            f(s.dice_std),
            f(s.iou_mean),
            f(s.iou_std),
            s.scored,
            s.false_positives,
            s.true_negatives
        );
        if let Some(hd) = s.hd95_mean {
            line += &format!(", HD95 {hd:.2}, NSD {}", f(s.nsd_mean));
        }
        if c.not_prompted > 0 {
            line += &format!(", {} not prompted (empty ground truth)", c.not_prompted);
        }
        println!("{line}");
    }
    if let Some(c) = &r.clicks {
        println!(
            "one corrective click on the worst {:.0}% ({} cases): Dice {:.2} -> {:.2}",
            100.0 * c.fraction,
            c.cases.len(),
            100.0 * c.dice_before_mean,
            100.0 * c.dice_after_mean
        );
    }
    println!("summary: {}", r.summary_path.display());
    println!("per case: {}", r.csv_path.display());
    if let Some(dir) = r.overlays.first().and_then(|p| p.parent()) {
        println!("overlays: {} ({} files)", dir.display(), r.overlays.len());
    }
}
