//! `sam2rad demo`: the whole pipeline on built-in defaults — generate ultrasound phantoms, train
//! Sam2Rad on a small random-initialised encoder, evaluate on the test split and write overlays.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::{Context, Result};
use candle_core::Device;
use sam2rad_core::eval::{evaluate, EvalOptions, Target};
use sam2rad_core::infer::Mode;
use sam2rad_core::run::{self, Which};
use sam2rad_core::train::{train, BaseModel, TrainConfig};
use sam2rad_core::DecoderMode;
use sam2rad_data::layout::{load_sample, Dataset};
use sam2rad_data::phantom::{generate, PhantomConfig};

/// Options of `sam2rad demo` (every one has a default).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Folder for the phantoms, the run and the evaluation.
    #[arg(long, default_value = "demo-out")]
    out: PathBuf,
    /// Training phantoms.
    #[arg(long, default_value_t = 100)]
    train: usize,
    /// Test phantoms.
    #[arg(long, default_value_t = 50)]
    test: usize,
    /// Training epochs [default: as many as make about 370 steps of 4 images, 16 for the
    /// default 90 training images].
    #[arg(long)]
    epochs: Option<usize>,
    /// Train on only this many labelled images (few-shot).
    #[arg(long)]
    limit_train: Option<usize>,
    /// Seed of the phantoms, the model init and training.
    #[arg(long, default_value_t = 0)]
    seed: u64,
}

/// Runs phantom → train → eval and prints the test Dice beside an intensity-threshold baseline.
pub fn run(args: Args) -> Result<()> {
    let t0 = Instant::now();
    let data = args.out.join("data");
    let run_dir = args.out.join("run");
    let phantoms = PhantomConfig {
        train: args.train,
        test: args.test,
        seed: args.seed,
        ..PhantomConfig::default()
    };
    let s = generate(&phantoms, &data)?;
    println!(
        "1/3 phantoms: {} train + {} test images ({} without bone) in {}",
        s.train,
        s.test,
        s.empty,
        data.display()
    );

    let mut cfg = TrainConfig::new(data.clone(), BaseModel::Preset("sam-vit-mini".into()), None);
    cfg.random_init_seed = Some(args.seed);
    cfg.seed = args.seed;
    cfg.limit_train = args.limit_train;
    // Few-shot runs see each image many times: cache augmented views so they do not memorise
    // one rendering of each.
    let n_train = cfg.split()?.0.len();
    cfg.views = if n_train <= FEW_SHOT_IMAGES { 4 } else { 1 };
    cfg.epochs = args
        .epochs
        .unwrap_or_else(|| STEP_BUDGET.div_ceil(n_train.div_ceil(cfg.batch).max(1)));
    // A random-init decoder has nothing worth keeping frozen: train all of it.
    cfg.decoder = DecoderMode::Full;
    // Random weights start far from a solution: the SPEC's fine-tuning rates (1e-4 / 1e-5) are
    // for official weights; here both groups learn faster.
    cfg.lr_prompt = 3e-3;
    cfg.lr_decoder = 1e-3;
    // A random decoder hit with full-size Adam steps at once stalls on empty masks for ~100
    // steps; a longer warm-up avoids it.
    cfg.warmup_fraction = 0.15;
    let resume = run_dir.join("last.state.safetensors").exists();
    println!(
        "2/3 training sam-vit-mini (random init) into {}",
        run_dir.display()
    );
    let display = crate::cmd_train::Display::default();
    let summary = train(&cfg, &run_dir, resume, &|e| display.show(e))?;
    display.finish();

    let loaded = run::load(&run_dir, Which::Best, None, &Device::Cpu)?;
    let test = Dataset::open(&data, "Test")?;
    let opts = EvalOptions {
        mode: Mode::Auto,
        num_classes: None,
        surface: None,
        model_name: format!("{} (best epoch {})", run_dir.display(), summary.best_epoch),
        out_dir: args.out.join("eval"),
        overlays: 3,
        click_worst: Some(0.1),
    };
    let report = evaluate(Target::Sam2Rad(&loaded.model), &test, &opts)?;
    let bone = report
        .classes
        .first()
        .context("the evaluation has no class")?;
    let baseline = threshold_baseline(&test)?;
    let (mut tn, mut fp, mut hit, mut with_bone) = (0usize, 0usize, 0usize, 0usize);
    for c in &report.cases {
        if c.metrics.gt_pixels == 0 {
            if c.metrics.pred_pixels == 0 {
                tn += 1
            } else {
                fp += 1
            }
        } else {
            with_bone += 1;
            hit += (c.metrics.pred_pixels > 0) as usize;
        }
    }
    // Cases with empty ground truth and empty prediction are not in `cases`: count them.
    tn = tn.max(bone.summary.true_negatives);
    println!(
        "3/3 test Dice {:.3} ± {:.3}, IoU {:.3} over {} bone images (autonomous, no prompts)",
        bone.summary.dice_mean.unwrap_or(0.0),
        bone.summary.dice_std.unwrap_or(0.0),
        bone.summary.iou_mean.unwrap_or(0.0),
        with_bone
    );
    println!(
        "    bone images segmented: {hit}/{with_bone}; bone-free images left empty: {tn}/{}",
        tn + fp
    );
    println!("    97th-percentile intensity threshold on the same images: Dice {baseline:.3}");
    if let Some(c) = &report.clicks {
        println!(
            "    one corrective click on the worst {} case(s) (semi-autonomous): Dice {:.3} -> {:.3}",
            c.cases.len(),
            c.dice_before_mean,
            c.dice_after_mean
        );
    }
    println!(
        "    summary {}, overlays in {}; {:.1} min in all",
        report.summary_path.display(),
        opts.out_dir.join("overlays").display(),
        t0.elapsed().as_secs_f64() / 60.0
    );
    Ok(())
}

/// Training steps of the demo when `--epochs` is not given (16 epochs of 90 images, batch 4).
const STEP_BUDGET: usize = 368;
/// Up to this many training images count as few-shot (4 cached augmented views each).
const FEW_SHOT_IMAGES: usize = 25;

/// Mean Dice of "pixel above the image's 97th percentile" against the bone mask, over the test
/// images that contain bone (the naive baseline the phantoms must defeat).
fn threshold_baseline(test: &Dataset) -> Result<f64> {
    let mut dices = Vec::new();
    for s in &test.samples {
        let l = load_sample(s, 1)?;
        let grey: Vec<u8> = l.rgb.chunks_exact(3).map(|p| p[0]).collect();
        let mut sorted = grey.clone();
        sorted.sort_unstable();
        let t = sorted[(sorted.len() as f64 * 0.97) as usize % sorted.len()];
        let pred: Vec<bool> = grey.iter().map(|&v| v > t).collect();
        let gt: Vec<bool> = l.mask.iter().map(|&m| m == 1).collect();
        if let Some(d) = sam2rad_core::metrics::score(&pred, &gt, l.h, l.w, None).dice {
            if gt.iter().any(|&g| g) {
                dices.push(d);
            }
        }
    }
    Ok(dices.iter().sum::<f64>() / dices.len().max(1) as f64)
}
