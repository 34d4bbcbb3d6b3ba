//! `sam2rad train`: train the prompt predictor (and the decoder adaptation) of a Sam2Rad model
//! on a labelled data set, with an exactly resumable run folder.

use std::cell::RefCell;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use indicatif::{ProgressBar, ProgressStyle};
use sam2rad_core::train::{
    train, BaseModel, EpochRecord, ProgressEvent, TrainConfig, TrainRunConfig, BEST_FILE,
    CONFIG_FILE, METRICS_FILE,
};
use sam2rad_core::{DecoderMode, PpnVariant};
use sam2rad_models::config::SamConfig;
use serde::Serialize;

use crate::model_args::ModelArgs;

/// PPN variant on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum PpnArg {
    /// Three blocks over three feature levels (default).
    Hierarchical,
    /// One block over the image embedding.
    Single,
}

/// Decoder adaptation on the command line.
#[derive(clap::ValueEnum, Debug, Clone, Copy)]
enum DecoderArg {
    /// Decoder frozen: only the PPN and objectness train.
    Frozen,
    /// LoRA on the decoder attentions plus its output parts (default).
    Lora,
    /// The whole decoder trains.
    Full,
}

/// Options of `sam2rad train`. Unset options take the defaults of a fresh run, or the run's
/// recorded values with `--resume` (where a given option must agree with them).
#[derive(clap::Args, Debug)]
pub struct Args {
    /// Data set root: Layout A (`Train/{imgs,gts}`) or nnU-Net raw; its Train split is used.
    #[arg(long, value_name = "DIR")]
    data: Option<PathBuf>,
    #[command(flatten)]
    model: ModelArgs,
    /// Seeded fresh base weights instead of `--weights` (for presets without official weights,
    /// such as `sam-vit-mini`); the seed is `--seed`.
    #[arg(long, conflicts_with = "weights")]
    random_init: bool,
    /// Run folder: config.json, last/best checkpoints, metrics.csv, curves.png, cache/.
    #[arg(long, value_name = "RUN")]
    out: PathBuf,
    /// Number of classes C (mask labels 1..=C) [default: 1].
    #[arg(long)]
    classes: Option<usize>,
    /// Learned tokens per class N [default: 8].
    #[arg(long)]
    tokens: Option<usize>,
    /// Prompt predictor variant [default: hierarchical].
    #[arg(long, value_enum)]
    ppn: Option<PpnArg>,
    /// Which decoder parameters train [default: lora].
    #[arg(long, value_enum)]
    decoder: Option<DecoderArg>,
    /// Epochs [default: 50].
    #[arg(long)]
    epochs: Option<usize>,
    /// Images per step [default: 4].
    #[arg(long)]
    batch: Option<usize>,
    /// Train on only this many images (picked with the seed), e.g. 10 for few-shot.
    #[arg(long, value_name = "N")]
    limit_train: Option<usize>,
    /// Seed of every random choice [default: 0].
    #[arg(long)]
    seed: Option<u64>,
    /// Cached augmented views per image, view 0 unaugmented [default: 4].
    #[arg(long, value_name = "K")]
    views: Option<usize>,
    /// Embedding cache folder [default: RUN/cache].
    #[arg(long, value_name = "DIR", conflicts_with = "no_cache")]
    cache: Option<PathBuf>,
    /// Augment pixels and run the encoder in every step instead of caching embeddings.
    #[arg(long)]
    no_cache: bool,
    /// Learning rate of the prompt predictor, queries and objectness [default: 1e-4].
    #[arg(long, value_name = "LR")]
    lr_prompt: Option<f64>,
    /// Learning rate of the decoder parameters [default: 1e-5].
    #[arg(long, value_name = "LR")]
    lr_decoder: Option<f64>,
    /// Share of subjects held out for validation [default: 0.1].
    #[arg(long, value_name = "F")]
    val_fraction: Option<f64>,
    /// Share of all steps spent in linear lr warm-up [default: 0.05].
    #[arg(long, value_name = "F")]
    warmup_fraction: Option<f64>,
    /// Largest global gradient L2 norm [default: 1].
    #[arg(long, value_name = "NORM")]
    clip_norm: Option<f64>,
    /// Continue the run in `--out` after its last finished epoch (settings from its config.json).
    #[arg(long)]
    resume: bool,
}

/// Trains, showing a progress bar and a line per epoch.
pub fn run(args: Args) -> Result<()> {
    let cfg = if args.resume {
        resumed_config(&args)?
    } else {
        fresh_config(&args)?
    };
    let display = Display::default();
    let summary = train(&cfg, &args.out, args.resume, &|e| display.show(e))?;
    display.finish();
    let score = summary
        .best_score
        .map_or_else(|| "no score".to_string(), |s| format!("Dice {s:.4}"));
    println!(
        "best epoch {} ({score}): {}; metrics in {}",
        summary.best_epoch,
        args.out.join(BEST_FILE).display(),
        args.out.join(METRICS_FILE).display()
    );
    if summary.skipped_steps > 0 {
        println!(
            "warning: {} step(s) skipped for a non-finite loss or gradient",
            summary.skipped_steps
        );
    }
    Ok(())
}

/// An existing path made absolute (so a run can be resumed from any folder).
fn existing(path: &Path, what: &str) -> Result<PathBuf> {
    std::fs::canonicalize(path).with_context(|| format!("{what} {}", path.display()))
}

/// The base model named by `--model` / `--model-config`, if any.
fn base_model(args: &ModelArgs) -> Result<Option<BaseModel>> {
    Ok(match (&args.model, &args.model_config) {
        (Some(name), _) => {
            SamConfig::preset(name)?;
            Some(BaseModel::Preset(name.clone()))
        }
        (None, Some(path)) => Some(BaseModel::Config(Box::new(SamConfig::from_json_file(
            path,
        )?))),
        (None, None) => None,
    })
}

/// The settings of a new run.
fn fresh_config(args: &Args) -> Result<TrainConfig> {
    let Some(data) = &args.data else {
        bail!("--data DIR is required (a data set with Train/imgs and Train/gts)")
    };
    let Some(base) = base_model(&args.model)? else {
        bail!("choose a base model with --model PRESET or --model-config FILE.json")
    };
    let weights = match (&args.model.weights, args.random_init) {
        (Some(w), false) => Some(existing(w, "weights file")?),
        (None, true) => None,
        _ => bail!("give --weights FILE (official checkpoint) or --random-init"),
    };
    let mut cfg = TrainConfig::new(existing(data, "data set folder")?, base, weights);
    if let Some(seed) = args.seed {
        cfg.seed = seed;
    }
    if args.random_init {
        cfg.random_init_seed = Some(cfg.seed);
    }
    macro_rules! set {
        ($($field:ident),*) => {$(
            if let Some(v) = args.$field {
                cfg.$field = v;
            }
        )*};
    }
    set!(
        classes,
        tokens,
        epochs,
        batch,
        views,
        lr_prompt,
        lr_decoder,
        val_fraction,
        warmup_fraction,
        clip_norm
    );
    cfg.limit_train = args.limit_train;
    if let Some(p) = args.ppn {
        cfg.ppn = ppn_variant(p);
    }
    if let Some(d) = args.decoder {
        cfg.decoder = decoder_mode(d);
    }
    cfg.no_cache = args.no_cache;
    if let Some(c) = &args.cache {
        cfg.cache = Some(std::path::absolute(c).with_context(|| format!("{}", c.display()))?);
    }
    cfg.validate()?;
    Ok(cfg)
}

/// The recorded settings of the run in `--out`, refusing options that disagree with them.
fn resumed_config(args: &Args) -> Result<TrainConfig> {
    let stored = TrainRunConfig::read(&args.out)?.train;
    let file = args.out.join(CONFIG_FILE);
    let mut conflicts = String::new();
    let mut check = |flag: &str, given: Option<String>, recorded: String| {
        if let Some(g) = given.filter(|g| *g != recorded) {
            let _ = write!(conflicts, "; {flag} {g} vs {recorded}");
        }
    };
    check(
        "--data",
        args.data
            .as_deref()
            .map(|d| existing(d, "data set folder"))
            .transpose()?
            .map(|d| d.display().to_string()),
        stored.data.display().to_string(),
    );
    check(
        "--model",
        base_model(&args.model)?.map(|b| json(&b)),
        json(&stored.base),
    );
    check(
        "--weights",
        args.model
            .weights
            .as_deref()
            .map(|w| existing(w, "weights file"))
            .transpose()?
            .map(|w| w.display().to_string()),
        stored
            .weights
            .as_ref()
            .map_or("(random init)".into(), |w| w.display().to_string()),
    );
    check(
        "--random-init",
        args.random_init.then(|| "true".to_string()),
        stored.random_init_seed.is_some().to_string(),
    );
    check(
        "--classes",
        args.classes.map(|v| v.to_string()),
        stored.classes.to_string(),
    );
    check(
        "--tokens",
        args.tokens.map(|v| v.to_string()),
        stored.tokens.to_string(),
    );
    check(
        "--ppn",
        args.ppn.map(|p| json(&ppn_variant(p))),
        json(&stored.ppn),
    );
    check(
        "--decoder",
        args.decoder.map(|d| json(&decoder_mode(d))),
        json(&stored.decoder),
    );
    check(
        "--epochs",
        args.epochs.map(|v| v.to_string()),
        stored.epochs.to_string(),
    );
    check(
        "--batch",
        args.batch.map(|v| v.to_string()),
        stored.batch.to_string(),
    );
    check(
        "--limit-train",
        args.limit_train.map(|v| v.to_string()),
        stored
            .limit_train
            .map_or("(none)".into(), |v| v.to_string()),
    );
    check(
        "--seed",
        args.seed.map(|v| v.to_string()),
        stored.seed.to_string(),
    );
    check(
        "--views",
        args.views.map(|v| v.to_string()),
        stored.views.to_string(),
    );
    check(
        "--cache",
        args.cache
            .as_deref()
            .map(std::path::absolute)
            .transpose()?
            .map(|c| c.display().to_string()),
        stored
            .cache
            .as_ref()
            .map_or("(RUN/cache)".into(), |c| c.display().to_string()),
    );
    check(
        "--no-cache",
        args.no_cache.then(|| "true".to_string()),
        stored.no_cache.to_string(),
    );
    check(
        "--lr-prompt",
        args.lr_prompt.map(|v| v.to_string()),
        stored.lr_prompt.to_string(),
    );
    check(
        "--lr-decoder",
        args.lr_decoder.map(|v| v.to_string()),
        stored.lr_decoder.to_string(),
    );
    check(
        "--val-fraction",
        args.val_fraction.map(|v| v.to_string()),
        stored.val_fraction.to_string(),
    );
    check(
        "--warmup-fraction",
        args.warmup_fraction.map(|v| v.to_string()),
        stored.warmup_fraction.to_string(),
    );
    check(
        "--clip-norm",
        args.clip_norm.map(|v| v.to_string()),
        stored.clip_norm.to_string(),
    );
    if let Some(rest) = conflicts.strip_prefix("; ") {
        bail!(
            "--resume continues the run as recorded in {}, but options differ: {rest}",
            file.display()
        );
    }
    Ok(stored)
}

/// Compact JSON of a setting, for comparing and showing it.
fn json<T: Serialize>(v: &T) -> String {
    serde_json::to_string(v).unwrap_or_default()
}

fn ppn_variant(p: PpnArg) -> PpnVariant {
    match p {
        PpnArg::Hierarchical => PpnVariant::Hierarchical,
        PpnArg::Single => PpnVariant::Single,
    }
}

fn decoder_mode(d: DecoderArg) -> DecoderMode {
    match d {
        DecoderArg::Frozen => DecoderMode::Frozen,
        DecoderArg::Lora => DecoderMode::Lora,
        DecoderArg::Full => DecoderMode::Full,
    }
}

/// The terminal display: a bar while caching, a bar over all steps with loss and running Dice,
/// and one line per epoch (printed plainly when stderr is not a terminal).
#[derive(Default)]
pub(crate) struct Display {
    bar: RefCell<Option<ProgressBar>>,
}

impl Display {
    /// Updates the display for one event.
    pub(crate) fn show(&self, event: ProgressEvent) {
        let mut bar = self.bar.borrow_mut();
        match event {
            ProgressEvent::Caching { done, total, hits } => {
                let b = bar.get_or_insert_with(|| {
                    new_bar(
                        total,
                        "caching embeddings {bar:30} {pos}/{len} views {msg} [{elapsed}<{eta}]",
                    )
                });
                b.set_position(done as u64);
                b.set_message(format!("({hits} cached)"));
            }
            ProgressEvent::Start {
                first_epoch,
                epochs,
                steps_per_epoch,
                total_steps,
                train_images,
                val_images,
            } => {
                if let Some(b) = bar.take() {
                    b.finish_and_clear();
                }
                let what = if first_epoch > epochs {
                    format!("all {epochs} epochs are done")
                } else if first_epoch > 1 {
                    format!("resuming at epoch {first_epoch}/{epochs}")
                } else {
                    format!("training {epochs} epochs")
                };
                eprintln!(
                    "{what}: {train_images} training and {val_images} validation images, \
                     {steps_per_epoch} steps per epoch"
                );
                let b = new_bar(
                    total_steps,
                    "{bar:30} {pos}/{len} steps {msg} [{elapsed}<{eta}]",
                );
                b.set_position(((first_epoch - 1) * steps_per_epoch) as u64);
                b.reset_eta();
                *bar = Some(b);
            }
            ProgressEvent::Step {
                epoch,
                step,
                loss,
                running_dice,
                ..
            } => {
                if let Some(b) = bar.as_ref() {
                    b.set_position(step as u64);
                    b.set_message(format!(
                        "epoch {epoch}  loss {loss:.4}  dice {}",
                        running_dice.map_or("-".into(), |d| format!("{d:.3}"))
                    ));
                }
            }
            ProgressEvent::Epoch(r) => {
                let line = epoch_line(r);
                match bar.as_ref().filter(|b| !b.is_hidden()) {
                    Some(b) => b.println(line),
                    None => println!("{line}"),
                }
            }
        }
    }

    /// Removes the bar.
    pub(crate) fn finish(&self) {
        if let Some(b) = self.bar.borrow_mut().take() {
            b.finish_and_clear();
        }
    }
}

/// A bar of `len` with `template` (falls back to the default style if the template is bad).
fn new_bar(len: usize, template: &str) -> ProgressBar {
    let b = ProgressBar::new(len as u64);
    if let Ok(style) = ProgressStyle::with_template(template) {
        b.set_style(style);
    }
    b.enable_steady_tick(Duration::from_millis(250));
    b
}

/// One line summarising an epoch.
fn epoch_line(r: &EpochRecord) -> String {
    let dice = |d: Option<f64>| d.map_or("-".into(), |d| format!("{d:.4}"));
    let mut line = format!(
        "epoch {}: loss {:.4} (mask {:.4}, box {:.4}, obj {:.4}), train Dice {}, val Dice {}, \
         {:.1} s ({:.0} ms/step)",
        r.epoch,
        r.loss,
        r.mask,
        r.boxes,
        r.obj,
        dice(r.train_dice),
        dice(r.val_dice),
        r.seconds,
        r.ms_per_step
    );
    if r.skipped > 0 {
        let _ = write!(line, ", {} step(s) skipped", r.skipped);
    }
    line
}
