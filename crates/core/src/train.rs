//! Sam2Rad training (SPEC §3): data and augmented views, cached frozen-encoder features, prompt
//! mixing, AdamW with two groups and a warm-up cosine schedule, per-epoch validation, and a run
//! folder that can be resumed exactly.
//!
//! A run folder `RUN/` holds:
//! - `config.json`: [`TrainRunConfig`] — the [`TrainConfig`], the [`Sam2RadConfig`] and the base
//!   weights (path and identity, or the random-init seed);
//! - `last.safetensors`: every trained tensor after the last finished epoch
//!   ([`Sam2Rad::trained_tensors`]); `best.safetensors`: the same at the best epoch;
//! - `last.state.safetensors`: everything a resume needs, in one file so it is consistent with
//!   itself: `model.*` (a copy of the trained tensors), `optim.*` (AdamW moments and step
//!   counts), `epoch`, `global_step`, `skipped_steps`, `best_epoch` (i64), `best_score` (f64,
//!   NaN = none) and `history` (f64 `[epochs, 14]`, the rows of `metrics.csv`). It is written
//!   last at every epoch end: it is the commit point of an epoch;
//! - `metrics.csv` (one row per epoch, columns in [`METRICS_HEADER`]) and `curves.png` (left
//!   panel: train loss in red and the unweighted L_mask in orange, autoscaled from 0; right
//!   panel: train running Dice in blue and validation Dice in green, 0 to 1);
//! - `cache/` (unless another `--cache` folder or `--no-cache` is chosen).
//!
//! Every file is written atomically. Every random decision (shuffle, view choice, prompt mix,
//! box jitter, dropout, on-the-fly augmentation) is drawn from a ChaCha8 stream seeded by a hash
//! of (seed, epoch, global step, purpose), never from a running generator, so a resumed run
//! repeats the uninterrupted one bit for bit.
//!
//! Choices made here:
//! - One epoch visits every training image once, in a seeded random order; with the cache each
//!   image uses one of its K views (view 0 = no augmentation), drawn per (epoch, image). Without
//!   the cache each image of each step gets freshly drawn augmentation parameters and the
//!   encoder runs inside the step.
//! - The lr of step g (0-based) is the base lr × `CosineSchedule { warmup, total + 1 }.factor(g + 1)`,
//!   so no step runs with lr 0.
//! - Prompt mix (per batch): learned only / learned + jittered GT box / learned + one simulated
//!   corrective click / manual (GT box, one positive click, or both, without learned prompts).
//!   A GT box needs foreground in every row, so the box and manual branches fall back to
//!   learned only for a batch with an empty row. The corrective click comes from a no-grad
//!   autonomous forward: a positive click at the point of the false-negative region farthest
//!   from its border, or a negative one in the false-positive region, whichever region is
//!   larger; rows without error get a padding point (label −1). Coordinates are pixels of the
//!   padded input frame.
//! - Validation Dice: autonomous prediction (learned prompts, objectness < 0 → empty) of view 0
//!   at the original image resolution, averaged over the (image, class) pairs where ground truth
//!   or prediction is non-empty (SPEC §5). `best` is the epoch with the highest validation Dice
//!   (the train running Dice when there is no validation image); ties keep the earlier epoch.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use anyhow::{anyhow, bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sam2rad_data::augment::{self, AugmentParams};
use sam2rad_data::fsutil::write_atomic;
use sam2rad_data::layout::{self, Dataset, LoadedSample};
use sam2rad_models::checkpoint::{Checkpoint, Source};
use sam2rad_models::config::SamConfig;
use sam2rad_models::postprocess::postprocess_masks;
use sam2rad_models::preprocess::longest_side_size;
use sam2rad_nn::ops;
use sam2rad_nn::optim::{clip_grad_norm, AdamW, AdamWConfig, CosineSchedule, ParamGroup};
use serde::{Deserialize, Serialize};

use crate::cache::{content_key, model_key, view_key, weights_identity, EmbeddingCache};
use crate::clicks::{corrective_click, deepest_point};
use crate::features::{extract, Features, Rows};
use crate::input::{class_target, preprocess};
use crate::loss::{sam2rad_loss, LossConfig};
use crate::metrics::score;
use crate::model::{DecoderMode, Phase, PpnVariant, RowPrompts, Sam2Rad, Sam2RadConfig};
use crate::plot;
pub use crate::run::{BEST_FILE, CONFIG_FILE, LAST_FILE};

/// `RUN/last.state.safetensors`: optimiser state, counters and a copy of the trained tensors.
pub const STATE_FILE: &str = "last.state.safetensors";
/// `RUN/metrics.csv`.
pub const METRICS_FILE: &str = "metrics.csv";
/// `RUN/curves.png`.
pub const CURVES_FILE: &str = "curves.png";
/// Format tag of `config.json`.
pub const RUN_FORMAT: &str = "sam2rad-run-v1";
/// Header of `metrics.csv` (losses are epoch means over the steps taken; Dice in 0..1).
pub const METRICS_HEADER: &str = "epoch,steps,lr,loss,loss_mask,loss_mask_final,\
loss_mask_prompt,loss_box,loss_obj,train_dice,val_dice,skipped_steps,seconds,ms_per_step";
/// Preprocessing name in the cache's model key (Sam2Rad always uses longest side + pad).
const PREPROCESSING: &str = "longest-side";
/// Columns of a history row (= fields of `METRICS_HEADER`).
const NCOL: usize = 14;

/// Purposes of the stateless random streams (the last word hashed into a seed).
mod purpose {
    /// Initial values of the trained parts.
    pub const INIT: u64 = 1;
    /// Epoch order of the training images.
    pub const SHUFFLE: u64 = 2;
    /// Which cached view each image uses in an epoch.
    pub const VIEW: u64 = 3;
    /// Prompt-mix branch and its random details.
    pub const MIX: u64 = 4;
    /// Dropout masks of a step.
    pub const DROPOUT: u64 = 5;
    /// On-the-fly augmentation (no cache).
    pub const AUGMENT: u64 = 6;
}

/// The frozen foundation model of a run.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BaseModel {
    /// A built-in preset by name (`sam2rad_models::config::PRESETS`).
    Preset(String),
    /// An explicit architecture (e.g. from `--model-config`).
    Config(Box<SamConfig>),
}

impl BaseModel {
    /// The architecture.
    pub fn config(&self) -> Result<SamConfig> {
        match self {
            BaseModel::Preset(name) => Ok(SamConfig::preset(name)?),
            BaseModel::Config(cfg) => {
                cfg.validate()
                    .map_err(|e| anyhow!("base model `{}`: {e}", cfg.name))?;
                Ok((**cfg).clone())
            }
        }
    }
}

/// The base weights as recorded in `config.json`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsInfo {
    /// The weights file (None for random init).
    pub path: Option<PathBuf>,
    /// `cache::weights_identity` of the file, or `init:<seed>`.
    pub identity: String,
}

/// Probabilities of the prompt-mixing branches (normalised by their sum).
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct PromptMix {
    /// Learned prompts only (0.5).
    pub learned: f64,
    /// Learned prompts + the ground-truth box (0.4).
    pub gt_box: f64,
    /// Learned prompts + a simulated corrective click (0.05).
    pub clicks: f64,
    /// Manual: ground-truth box and/or a click, no learned prompts (0.05).
    pub manual: f64,
}

impl Default for PromptMix {
    fn default() -> Self {
        Self {
            learned: 0.5,
            gt_box: 0.4,
            clicks: 0.05,
            manual: 0.05,
        }
    }
}

/// A prompt-mixing branch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MixKind {
    Learned,
    GtBox,
    Clicks,
    Manual,
}

impl PromptMix {
    /// The branch of a uniform draw `u` in [0, 1).
    fn pick(&self, u: f64) -> MixKind {
        let total = self.learned + self.gt_box + self.clicks + self.manual;
        let mut acc = 0.0;
        for (p, kind) in [
            (self.learned, MixKind::Learned),
            (self.gt_box, MixKind::GtBox),
            (self.clicks, MixKind::Clicks),
            (self.manual, MixKind::Manual),
        ] {
            acc += p / total;
            if u < acc {
                return kind;
            }
        }
        // Rounding left u just above the last boundary: the last branch with weight.
        [
            (self.manual, MixKind::Manual),
            (self.clicks, MixKind::Clicks),
            (self.gt_box, MixKind::GtBox),
        ]
        .into_iter()
        .find(|(p, _)| *p > 0.0)
        .map_or(MixKind::Learned, |(_, k)| k)
    }
}

/// Everything that defines a training run (serialised into `RUN/config.json`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainConfig {
    /// Data set root (Layout A or nnU-Net); its `Train` split is used.
    pub data: PathBuf,
    /// Frozen foundation model.
    pub base: BaseModel,
    /// Official base weights file (exactly one of this and `random_init_seed`).
    pub weights: Option<PathBuf>,
    /// Seed of fresh base parameters (`Source::Init`) for models without official weights.
    pub random_init_seed: Option<u64>,
    /// Classes C (label values 1..=C).
    pub classes: usize,
    /// Learned tokens per class N.
    pub tokens: usize,
    /// PPN variant.
    pub ppn: PpnVariant,
    /// Decoder adaptation.
    pub decoder: DecoderMode,
    /// Epochs.
    pub epochs: usize,
    /// Images per step.
    pub batch: usize,
    /// Use only this many training images (picked with the seed), before the validation split.
    pub limit_train: Option<usize>,
    /// Master seed.
    pub seed: u64,
    /// Learning rate of the prompt group (queries, PPN, objectness).
    pub lr_prompt: f64,
    /// Learning rate of the decoder group (LoRA / decoder tensors).
    pub lr_decoder: f64,
    /// AdamW weight decay (both groups).
    pub weight_decay: f64,
    /// Largest global gradient L2 norm.
    pub clip_norm: f64,
    /// Share of all steps spent in linear warm-up.
    pub warmup_fraction: f64,
    /// Final lr factor of the cosine schedule.
    pub min_lr_ratio: f64,
    /// Cached augmented views per training image K (view 0 = no augmentation).
    pub views: usize,
    /// Cache root (None = `RUN/cache`).
    pub cache: Option<PathBuf>,
    /// Do not cache: augment pixels and run the encoder in every step.
    pub no_cache: bool,
    /// Share of subjects held out for validation.
    pub val_fraction: f64,
    /// Loss weights and hyper-parameters.
    pub loss: LossConfig,
    /// Prompt-mixing probabilities.
    pub mix: PromptMix,
}

impl TrainConfig {
    /// The SPEC §3 defaults for one class on `base` with official `weights` (None: random
    /// init with seed 0), reading `data`.
    pub fn new(data: PathBuf, base: BaseModel, weights: Option<PathBuf>) -> Self {
        Self {
            data,
            base,
            random_init_seed: weights.is_none().then_some(0),
            weights,
            classes: 1,
            tokens: 8,
            ppn: PpnVariant::default(),
            decoder: DecoderMode::default(),
            epochs: 50,
            batch: 4,
            limit_train: None,
            seed: 0,
            lr_prompt: 1e-4,
            lr_decoder: 1e-5,
            weight_decay: 0.1,
            clip_norm: 1.0,
            warmup_fraction: 0.05,
            min_lr_ratio: 0.0,
            views: 4,
            cache: None,
            no_cache: false,
            val_fraction: 0.1,
            loss: LossConfig::default(),
            mix: PromptMix::default(),
        }
    }

    /// Checks the settings; returns the first problem.
    pub fn validate(&self) -> Result<()> {
        ensure!(
            (1..=255).contains(&self.classes),
            "classes must be within 1..=255, got {}",
            self.classes
        );
        ensure!(
            self.tokens >= 2,
            "tokens must be at least 2, got {}",
            self.tokens
        );
        ensure!(
            self.weights.is_some() != self.random_init_seed.is_some(),
            "give either base weights or a random-init seed (exactly one)"
        );
        ensure!(self.epochs >= 1, "epochs must be at least 1");
        ensure!(self.batch >= 1, "batch must be at least 1");
        ensure!(self.views >= 1, "views must be at least 1");
        ensure!(
            self.limit_train != Some(0),
            "limit_train must be at least 1"
        );
        for (name, v) in [
            ("lr_prompt", self.lr_prompt),
            ("lr_decoder", self.lr_decoder),
            ("weight_decay", self.weight_decay),
        ] {
            ensure!(
                v.is_finite() && v >= 0.0,
                "{name} must be finite and ≥ 0, got {v}"
            );
        }
        ensure!(
            self.clip_norm.is_finite() && self.clip_norm > 0.0,
            "clip_norm must be positive, got {}",
            self.clip_norm
        );
        for (name, v) in [
            ("warmup_fraction", self.warmup_fraction),
            ("min_lr_ratio", self.min_lr_ratio),
        ] {
            ensure!(
                (0.0..=1.0).contains(&v),
                "{name} must be within 0..1, got {v}"
            );
        }
        ensure!(
            (0.0..1.0).contains(&self.val_fraction),
            "val_fraction must be within [0, 1), got {}",
            self.val_fraction
        );
        let m = self.mix;
        let probs = [m.learned, m.gt_box, m.clicks, m.manual];
        ensure!(
            probs.iter().all(|p| p.is_finite() && *p >= 0.0) && probs.iter().sum::<f64>() > 0.0,
            "prompt-mix probabilities must be ≥ 0 with a positive sum, got {probs:?}"
        );
        ensure!(
            !(self.no_cache && self.cache.is_some()),
            "a cache folder and no_cache exclude each other"
        );
        Ok(())
    }

    /// The training and validation samples: the `Train` split of `data`, cut to `limit_train`
    /// images picked with the seed, then split by subject.
    pub fn split(&self) -> Result<(Vec<layout::Sample>, Vec<layout::Sample>)> {
        let ds = Dataset::open(&self.data, "Train")?;
        let samples = match self.limit_train {
            Some(n) => layout::limit(&ds.samples, n, self.seed),
            None => ds.samples,
        };
        Ok(layout::split_by_subject(
            &samples,
            self.val_fraction,
            self.seed,
        ))
    }

    /// The model description this configuration trains.
    pub fn model_config(&self) -> Result<Sam2RadConfig> {
        let cfg = Sam2RadConfig {
            num_tokens: self.tokens,
            ppn: self.ppn,
            decoder: self.decoder,
            ..Sam2RadConfig::new(self.base.config()?, self.classes)
        };
        cfg.validate().map_err(|e| anyhow!("model: {e}"))?;
        Ok(cfg)
    }
}

/// `RUN/config.json` as training writes it (`crate::run::RunConfig` reads the part inference
/// needs: `model`, `train.weights` / `train.random_init_seed`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TrainRunConfig {
    /// [`RUN_FORMAT`].
    pub format: String,
    /// The training settings.
    pub train: TrainConfig,
    /// The model (base architecture included).
    pub model: Sam2RadConfig,
    /// The base weights.
    pub base_weights: WeightsInfo,
}

impl TrainRunConfig {
    /// Reads `run_dir/config.json`.
    pub fn read(run_dir: &Path) -> Result<Self> {
        let path = run_dir.join(CONFIG_FILE);
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read {}", path.display()))?;
        let cfg: TrainRunConfig = serde_json::from_str(&text)
            .with_context(|| format!("{} is not a sam2rad run configuration", path.display()))?;
        ensure!(
            cfg.format == RUN_FORMAT,
            "{}: unsupported format `{}` (expected {RUN_FORMAT})",
            path.display(),
            cfg.format
        );
        Ok(cfg)
    }
}

/// The base weights source of `cfg` and its identity.
fn base_weights(cfg: &TrainConfig) -> Result<(Source, WeightsInfo)> {
    match (&cfg.weights, cfg.random_init_seed) {
        (Some(path), None) => {
            let ckpt = Checkpoint::load(path)?;
            let identity = weights_identity(path)?;
            Ok((
                Source::File(Arc::new(ckpt)),
                WeightsInfo {
                    path: Some(path.clone()),
                    identity,
                },
            ))
        }
        (None, Some(seed)) => Ok((
            Source::Init { seed },
            WeightsInfo {
                path: None,
                identity: format!("init:{seed}"),
            },
        )),
        _ => bail!("give either base weights or a random-init seed (exactly one)"),
    }
}

/// One row of `metrics.csv`.
#[derive(Debug, Clone, PartialEq)]
pub struct EpochRecord {
    /// Epoch number, 1-based.
    pub epoch: usize,
    /// Global steps done after this epoch.
    pub steps: usize,
    /// Prompt-group learning rate at the epoch's last step.
    pub lr: f64,
    /// Mean total loss over the steps taken.
    pub loss: f64,
    /// Mean L_mask.
    pub mask: f64,
    /// Mean seg loss of the final mask.
    pub mask_final: f64,
    /// Mean seg loss of the PPN mask prompt.
    pub mask_prompt: f64,
    /// Mean L_box.
    pub boxes: f64,
    /// Mean L_obj.
    pub obj: f64,
    /// Running Dice of the training predictions (padded frame, cropped to the image).
    pub train_dice: Option<f64>,
    /// Validation Dice (None without validation images or scored pairs).
    pub val_dice: Option<f64>,
    /// Steps skipped in this epoch for a non-finite loss or gradient norm.
    pub skipped: usize,
    /// Wall time of the epoch (training and validation).
    pub seconds: f64,
    /// Mean milliseconds per training step (data, forward, backward, update).
    pub ms_per_step: f64,
}

impl EpochRecord {
    /// The record as a history row (None as NaN).
    fn to_row(&self) -> [f64; NCOL] {
        let opt = |v: Option<f64>| v.unwrap_or(f64::NAN);
        [
            self.epoch as f64,
            self.steps as f64,
            self.lr,
            self.loss,
            self.mask,
            self.mask_final,
            self.mask_prompt,
            self.boxes,
            self.obj,
            opt(self.train_dice),
            opt(self.val_dice),
            self.skipped as f64,
            self.seconds,
            self.ms_per_step,
        ]
    }

    /// The inverse of [`Self::to_row`].
    fn from_row(r: &[f64]) -> Self {
        let opt = |v: f64| (!v.is_nan()).then_some(v);
        Self {
            epoch: r[0] as usize,
            steps: r[1] as usize,
            lr: r[2],
            loss: r[3],
            mask: r[4],
            mask_final: r[5],
            mask_prompt: r[6],
            boxes: r[7],
            obj: r[8],
            train_dice: opt(r[9]),
            val_dice: opt(r[10]),
            skipped: r[11] as usize,
            seconds: r[12],
            ms_per_step: r[13],
        }
    }

    /// The CSV line (no newline).
    fn csv(&self) -> String {
        let opt = |v: Option<f64>| v.map(|d| format!("{d:.6}")).unwrap_or_default();
        format!(
            "{},{},{:.6e},{:.6},{:.6},{:.6},{:.6},{:.6},{:.6},{},{},{},{:.3},{:.1}",
            self.epoch,
            self.steps,
            self.lr,
            self.loss,
            self.mask,
            self.mask_final,
            self.mask_prompt,
            self.boxes,
            self.obj,
            opt(self.train_dice),
            opt(self.val_dice),
            self.skipped,
            self.seconds,
            self.ms_per_step
        )
    }
}

/// What training reports while it runs.
#[derive(Debug, Clone)]
pub enum ProgressEvent<'a> {
    /// Encoding (or finding in the cache) the views before the first epoch.
    Caching {
        /// Views done.
        done: usize,
        /// Views in all.
        total: usize,
        /// Of those, found in the cache.
        hits: usize,
    },
    /// Training starts (or resumes) at `first_epoch` (1-based).
    Start {
        /// First epoch to run.
        first_epoch: usize,
        /// Last epoch.
        epochs: usize,
        /// Steps per epoch.
        steps_per_epoch: usize,
        /// Steps of the whole run.
        total_steps: usize,
        /// Training images.
        train_images: usize,
        /// Validation images.
        val_images: usize,
    },
    /// A training step finished.
    Step {
        /// Epoch, 1-based.
        epoch: usize,
        /// Global step, 1-based.
        step: usize,
        /// Steps of the whole run.
        total_steps: usize,
        /// Loss of this step (NaN if skipped).
        loss: f64,
        /// Running Dice of the epoch so far.
        running_dice: Option<f64>,
    },
    /// An epoch finished and was checkpointed.
    Epoch(&'a EpochRecord),
}

/// What [`train`] returns.
#[derive(Debug, Clone)]
pub struct TrainSummary {
    /// One record per finished epoch (including those of a resumed run's earlier part).
    pub records: Vec<EpochRecord>,
    /// The best epoch (1-based).
    pub best_epoch: usize,
    /// Its score (validation Dice, or train Dice without validation images).
    pub best_score: Option<f64>,
    /// Steps skipped over the whole run.
    pub skipped_steps: usize,
}

/// A seed from (parts...), by chained SplitMix64.
fn mix(parts: &[u64]) -> u64 {
    parts
        .iter()
        .fold(0x51_7cc1_b727_220a_u64, |h, &p| splitmix64(h ^ p))
}

/// SplitMix64's finaliser.
fn splitmix64(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

/// A generator for one purpose.
fn stream(parts: &[u64]) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(mix(parts))
}

/// A loaded image with its cache key and geometry.
struct Image {
    data: LoadedSample,
    /// `content_key` of the image file.
    key: String,
    /// Size inside the padded input frame.
    input_size: (usize, usize),
}

/// A cached augmented view of a training image.
struct View {
    params: AugmentParams,
    key: String,
    /// Label map of the view at original size.
    labels: Vec<u8>,
}

/// What a resume starts from.
struct Resumed {
    epoch: usize,
    global_step: usize,
    skipped: usize,
    best_epoch: usize,
    best_score: Option<f64>,
    history: Vec<EpochRecord>,
    model: HashMap<String, Tensor>,
    optim: HashMap<String, Tensor>,
}

/// A training batch: features, rows and per-row targets in the padded frame.
struct Batch {
    feats: Features,
    rows: Rows,
    /// Row-major S×S binary targets, one per row (row r = b·C + c).
    targets: Vec<Vec<f32>>,
    /// `input_size` of each image.
    input_sizes: Vec<(usize, usize)>,
}

/// Fixed context of a run.
struct Ctx<'a> {
    cfg: &'a TrainConfig,
    dev: Device,
    s: usize,
    schedule: CosineSchedule,
}

/// Trains per `cfg` into `run_dir` (see the module documentation); with `resume`, continues the
/// run recorded there after its last finished epoch. `progress` receives events for a display.
pub fn train(
    cfg: &TrainConfig,
    run_dir: &Path,
    resume: bool,
    progress: &dyn Fn(ProgressEvent),
) -> Result<TrainSummary> {
    cfg.validate()?;
    let dev = Device::Cpu;
    let base_cfg = cfg.base.config()?;
    let model_cfg = cfg.model_config()?;
    let (base_source, weights_info) = base_weights(cfg)?;
    let run_cfg = TrainRunConfig {
        format: RUN_FORMAT.into(),
        train: cfg.clone(),
        model: model_cfg.clone(),
        base_weights: weights_info.clone(),
    };
    let resumed = prepare_run_dir(run_dir, &run_cfg, resume)?;
    let s = base_cfg.image_size;

    // Data: every image and mask read (and validated) up front.
    let (train_s, val_s) = cfg.split()?;
    ensure!(
        !train_s.is_empty(),
        "no training images left after the validation split of {}",
        cfg.data.display()
    );
    let load = |sample: &layout::Sample| -> Result<Image> {
        let data = layout::load_sample(sample, cfg.classes)?;
        let bytes = std::fs::read(&sample.image_path)
            .with_context(|| format!("cannot read {}", sample.image_path.display()))?;
        Ok(Image {
            key: content_key(&bytes),
            input_size: longest_side_size(data.h, data.w, s),
            data,
        })
    };
    let train_imgs = train_s.iter().map(load).collect::<Result<Vec<_>>>()?;
    let val_imgs = val_s.iter().map(load).collect::<Result<Vec<_>>>()?;

    let trained = match &resumed {
        Some(r) => Source::File(Arc::new(Checkpoint {
            path: run_dir.join(STATE_FILE).display().to_string(),
            tensors: r.model.clone(),
        })),
        None => Source::Init {
            seed: mix(&[cfg.seed, purpose::INIT]),
        },
    };
    let model = Sam2Rad::new(&model_cfg, base_source, trained, &dev)?;
    let encode = |rgb: &[u8], h: usize, w: usize| -> Result<Features> {
        let pre = preprocess(&base_cfg, rgb, h, w, &dev)?;
        Ok(extract(model.base(), &pre.input)?)
    };

    // Cached views: encoded once before the first epoch.
    let cache = if cfg.no_cache {
        None
    } else {
        let root = cfg.cache.clone().unwrap_or_else(|| run_dir.join("cache"));
        let key = model_key(
            &serde_json::to_string(&base_cfg)?,
            &weights_info.identity,
            PREPROCESSING,
        );
        Some(EmbeddingCache::open(&root, &key)?)
    };
    let views: Vec<Vec<View>> = match &cache {
        None => Vec::new(),
        Some(cache) => {
            let total = train_imgs.len() * cfg.views + val_imgs.len();
            let (mut done, mut hits) = (0, 0);
            let mut out = Vec::with_capacity(train_imgs.len());
            for (i, img) in train_imgs.iter().enumerate() {
                let mut per = Vec::with_capacity(cfg.views);
                for k in 0..cfg.views {
                    let params = AugmentParams::for_view(cfg.seed, i as u64, k as u64);
                    let d = &img.data;
                    let (rgb, labels) = augment::apply(&params, &d.rgb, &d.mask, d.h, d.w);
                    let key = view_key(&params);
                    let (_, hit) =
                        cache.get_or_compute(&img.key, &key, &dev, || encode(&rgb, d.h, d.w))?;
                    hits += usize::from(hit);
                    done += 1;
                    progress(ProgressEvent::Caching { done, total, hits });
                    per.push(View {
                        params,
                        key,
                        labels,
                    });
                }
                out.push(per);
            }
            let identity = view_key(&AugmentParams::identity());
            for img in &val_imgs {
                let d = &img.data;
                let (_, hit) =
                    cache.get_or_compute(&img.key, &identity, &dev, || encode(&d.rgb, d.h, d.w))?;
                hits += usize::from(hit);
                done += 1;
                progress(ProgressEvent::Caching { done, total, hits });
            }
            out
        }
    };

    let n = train_imgs.len();
    let spe = n.div_ceil(cfg.batch);
    let total_steps = spe * cfg.epochs;
    let ctx = Ctx {
        cfg,
        dev: dev.clone(),
        s,
        schedule: CosineSchedule {
            warmup_steps: (cfg.warmup_fraction * total_steps as f64).round() as usize,
            total_steps: total_steps + 1,
            min_ratio: cfg.min_lr_ratio,
        },
    };

    let tv = model.trainable_vars();
    let prompt_vars: Vec<Var> = tv.prompt.iter().map(|(_, v)| v.clone()).collect();
    let decoder_vars: Vec<Var> = tv.decoder.iter().map(|(_, v)| v.clone()).collect();
    let all_vars: Vec<Var> = prompt_vars.iter().chain(&decoder_vars).cloned().collect();
    let mut opt = AdamW::new(
        vec![
            ParamGroup {
                vars: prompt_vars,
                lr: cfg.lr_prompt,
                weight_decay: cfg.weight_decay,
            },
            ParamGroup {
                vars: decoder_vars,
                lr: cfg.lr_decoder,
                weight_decay: cfg.weight_decay,
            },
        ],
        AdamWConfig::default(),
    )?;

    let (
        first_epoch,
        mut global_step,
        mut skipped_total,
        mut best_epoch,
        mut best_score,
        mut history,
    ) = match resumed {
        Some(r) => {
            opt.load_state(&r.optim)
                .with_context(|| format!("{}", run_dir.join(STATE_FILE).display()))?;
            (
                r.epoch,
                r.global_step,
                r.skipped,
                r.best_epoch,
                r.best_score,
                r.history,
            )
        }
        None => (0, 0, 0, 0, None, Vec::new()),
    };
    ensure!(
        first_epoch == 0 || global_step == first_epoch * spe,
        "{} was written with {} steps per epoch, the data now gives {spe}: the data set changed",
        run_dir.join(STATE_FILE).display(),
        global_step / first_epoch.max(1)
    );
    progress(ProgressEvent::Start {
        first_epoch: first_epoch + 1,
        epochs: cfg.epochs,
        steps_per_epoch: spe,
        total_steps,
        train_images: n,
        val_images: val_imgs.len(),
    });

    for epoch in first_epoch..cfg.epochs {
        let t_epoch = Instant::now();
        let e = epoch as u64;
        let mut order: Vec<usize> = (0..n).collect();
        order.shuffle(&mut stream(&[cfg.seed, e, purpose::SHUFFLE]));
        let mut view_rng = stream(&[cfg.seed, e, purpose::VIEW]);
        let view_of: Vec<usize> = (0..n)
            .map(|_| view_rng.random_range(0..cfg.views))
            .collect();
        let mut sums = [0f64; 6];
        let (mut taken, mut skipped) = (0usize, 0usize);
        let mut dices: Vec<f64> = Vec::new();
        let mut step_secs = 0f64;
        for j in 0..spe {
            let t_step = Instant::now();
            let idx = &order[j * cfg.batch..((j + 1) * cfg.batch).min(n)];
            let g = global_step as u64;
            let batch = match &cache {
                Some(cache) => {
                    let mut feats = Vec::with_capacity(idx.len());
                    let mut labels = Vec::with_capacity(idx.len());
                    for &i in idx {
                        let img = &train_imgs[i];
                        let view = &views[i][view_of[i]];
                        let d = &img.data;
                        let (f, _) = cache.get_or_compute(&img.key, &view.key, &dev, || {
                            let (rgb, _) = augment::apply(&view.params, &d.rgb, &[], d.h, d.w);
                            encode(&rgb, d.h, d.w)
                        })?;
                        feats.push(f);
                        labels.push(LabelMap {
                            labels: &view.labels,
                            h: d.h,
                            w: d.w,
                            input_size: img.input_size,
                        });
                    }
                    make_batch(&ctx, Features::cat(&feats)?, &labels)?
                }
                None => {
                    let mut inputs = Vec::with_capacity(idx.len());
                    let mut masks = Vec::with_capacity(idx.len());
                    for &i in idx {
                        let d = &train_imgs[i].data;
                        let params = AugmentParams::sample(&mut stream(&[
                            cfg.seed,
                            e,
                            g,
                            i as u64,
                            purpose::AUGMENT,
                        ]));
                        let (rgb, mask) = augment::apply(&params, &d.rgb, &d.mask, d.h, d.w);
                        inputs.push(preprocess(&base_cfg, &rgb, d.h, d.w, &dev)?.input);
                        masks.push(mask);
                    }
                    let feats = extract(model.base(), &Tensor::cat(&inputs, 0)?)?;
                    let labels: Vec<_> = idx
                        .iter()
                        .zip(&masks)
                        .map(|(&i, m)| {
                            let img = &train_imgs[i];
                            LabelMap {
                                labels: m,
                                h: img.data.h,
                                w: img.data.w,
                                input_size: img.input_size,
                            }
                        })
                        .collect();
                    make_batch(&ctx, feats, &labels)?
                }
            };
            let out = train_step(&ctx, &model, &mut opt, &all_vars, &batch, e, g)?;
            global_step += 1;
            dices.extend(&out.dice);
            match out.parts {
                Some(p) => {
                    taken += 1;
                    for (a, v) in sums.iter_mut().zip(p) {
                        *a += v;
                    }
                }
                None => skipped += 1,
            }
            step_secs += t_step.elapsed().as_secs_f64();
            progress(ProgressEvent::Step {
                epoch: epoch + 1,
                step: global_step,
                total_steps,
                loss: out.parts.map_or(f64::NAN, |p| p[0]),
                running_dice: mean(&dices),
            });
        }

        let val_dice = if val_imgs.is_empty() {
            None
        } else {
            let identity = view_key(&AugmentParams::identity());
            let mut features = |i: usize| -> Result<Features> {
                let d = &val_imgs[i].data;
                match &cache {
                    Some(c) => Ok(c
                        .get_or_compute(&val_imgs[i].key, &identity, &dev, || {
                            encode(&d.rgb, d.h, d.w)
                        })?
                        .0),
                    None => encode(&d.rgb, d.h, d.w),
                }
            };
            let data: Vec<(&LoadedSample, (usize, usize))> =
                val_imgs.iter().map(|v| (&v.data, v.input_size)).collect();
            autonomous_dice(&model, &data, cfg.batch, &mut features)?
        };
        let avg = |k: usize| {
            if taken == 0 {
                f64::NAN
            } else {
                sums[k] / taken as f64
            }
        };
        let record = EpochRecord {
            epoch: epoch + 1,
            steps: global_step,
            lr: cfg.lr_prompt * ctx.schedule.factor(global_step),
            loss: avg(0),
            mask: avg(1),
            mask_final: avg(2),
            mask_prompt: avg(3),
            boxes: avg(4),
            obj: avg(5),
            train_dice: mean(&dices),
            val_dice,
            skipped,
            seconds: t_epoch.elapsed().as_secs_f64(),
            ms_per_step: 1000.0 * step_secs / spe as f64,
        };
        skipped_total += skipped;
        let score = if val_imgs.is_empty() {
            record.train_dice
        } else {
            record.val_dice
        };
        let improved = best_epoch == 0
            || match (score, best_score) {
                (Some(s), Some(b)) => s > b,
                (Some(_), None) => true,
                (None, _) => false,
            };
        history.push(record);
        let trained = model.trained_tensors();
        if improved {
            best_epoch = epoch + 1;
            best_score = score;
            save_tensors(&run_dir.join(BEST_FILE), trained.clone())?;
        }
        write_metrics(run_dir, &history)?;
        write_curves(run_dir, &history)?;
        save_tensors(&run_dir.join(LAST_FILE), trained.clone())?;
        let mut state: HashMap<String, Tensor> = trained
            .into_iter()
            .map(|(k, t)| (format!("model.{k}"), t))
            .collect();
        for (k, t) in opt.state_tensors()? {
            state.insert(format!("optim.{k}"), t);
        }
        let int = |v: usize| Tensor::new(v as i64, &dev);
        state.insert("epoch".into(), int(epoch + 1)?);
        state.insert("global_step".into(), int(global_step)?);
        state.insert("skipped_steps".into(), int(skipped_total)?);
        state.insert("best_epoch".into(), int(best_epoch)?);
        state.insert(
            "best_score".into(),
            Tensor::new(best_score.unwrap_or(f64::NAN), &dev)?,
        );
        let rows: Vec<f64> = history.iter().flat_map(|r| r.to_row()).collect();
        state.insert(
            "history".into(),
            Tensor::from_vec(rows, (history.len(), NCOL), &dev)?,
        );
        save_tensors(&run_dir.join(STATE_FILE), state)?;
        if let Some(last) = history.last() {
            progress(ProgressEvent::Epoch(last));
        }
    }
    Ok(TrainSummary {
        records: history,
        best_epoch,
        best_score,
        skipped_steps: skipped_total,
    })
}

/// Mean of `v` (None when empty).
fn mean(v: &[f64]) -> Option<f64> {
    (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
}

/// Checks or creates the run folder; reads the resume state when resuming.
fn prepare_run_dir(
    run_dir: &Path,
    run_cfg: &TrainRunConfig,
    resume: bool,
) -> Result<Option<Resumed>> {
    let config_path = run_dir.join(CONFIG_FILE);
    let state_path = run_dir.join(STATE_FILE);
    if resume {
        let stored = TrainRunConfig::read(run_dir)?;
        if stored != *run_cfg {
            let a = serde_json::to_value(&stored)?;
            let b = serde_json::to_value(run_cfg)?;
            let diff = first_difference(&a, &b, "").unwrap_or_else(|| "(unknown field)".into());
            bail!(
                "cannot resume {}: the settings differ from its {CONFIG_FILE} at {diff}",
                run_dir.display()
            );
        }
        if !state_path.is_file() {
            // The run never finished an epoch: start it again from the beginning.
            return Ok(None);
        }
        return read_state(&state_path).map(Some);
    }
    for p in [&config_path, &state_path] {
        ensure!(
            !p.exists(),
            "{} already holds a training run ({}); resume it or choose another output folder",
            run_dir.display(),
            p.file_name()
                .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
        );
    }
    let text = serde_json::to_string_pretty(run_cfg)?;
    sam2rad_data::fsutil::write_bytes_atomic(&config_path, text.as_bytes())
        .with_context(|| format!("cannot write {}", config_path.display()))?;
    Ok(None)
}

/// The first place where two JSON values differ, as `path: stored vs now`.
fn first_difference(a: &serde_json::Value, b: &serde_json::Value, path: &str) -> Option<String> {
    use serde_json::Value;
    if let (Value::Object(x), Value::Object(y)) = (a, b) {
        let mut keys: Vec<&String> = x.keys().chain(y.keys()).collect();
        keys.sort();
        keys.dedup();
        for k in keys {
            let p = if path.is_empty() {
                k.clone()
            } else {
                format!("{path}.{k}")
            };
            match (x.get(k), y.get(k)) {
                (Some(u), Some(v)) => {
                    if let Some(d) = first_difference(u, v, &p) {
                        return Some(d);
                    }
                }
                (u, v) => {
                    let show = |o: Option<&Value>| o.map_or("(absent)".into(), Value::to_string);
                    return Some(format!("`{p}`: stored {} vs now {}", show(u), show(v)));
                }
            }
        }
        return None;
    }
    (a != b).then(|| format!("`{path}`: stored {a} vs now {b}"))
}

/// Reads `last.state.safetensors`.
fn read_state(path: &Path) -> Result<Resumed> {
    let all: HashMap<String, Tensor> = candle_core::safetensors::load(path, &Device::Cpu)
        .with_context(|| format!("cannot read {}", path.display()))?;
    let scalar = |k: &str| -> Result<Tensor> {
        all.get(k)
            .cloned()
            .ok_or_else(|| anyhow!("{} lacks `{k}`", path.display()))
    };
    let int = |k: &str| -> Result<usize> {
        let v = scalar(k)?.to_dtype(DType::I64)?.to_scalar::<i64>()?;
        usize::try_from(v).map_err(|_| anyhow!("{}: `{k}` is negative", path.display()))
    };
    let best = scalar("best_score")?
        .to_dtype(DType::F64)?
        .to_scalar::<f64>()?;
    let history = scalar("history")?.to_dtype(DType::F64)?;
    ensure!(
        history.rank() == 2 && history.dim(1)? == NCOL,
        "{}: `history` has shape {:?}, expected [epochs, {NCOL}]",
        path.display(),
        history.dims()
    );
    let history: Vec<EpochRecord> = history
        .to_vec2::<f64>()?
        .iter()
        .map(|r| EpochRecord::from_row(r))
        .collect();
    let epoch = int("epoch")?;
    ensure!(
        history.len() == epoch,
        "{}: {} history rows for {epoch} epochs",
        path.display(),
        history.len()
    );
    let strip = |prefix: &str| -> HashMap<String, Tensor> {
        all.iter()
            .filter_map(|(k, t)| k.strip_prefix(prefix).map(|k| (k.to_string(), t.clone())))
            .collect()
    };
    Ok(Resumed {
        epoch,
        global_step: int("global_step")?,
        skipped: int("skipped_steps")?,
        best_epoch: int("best_epoch")?,
        best_score: (!best.is_nan()).then_some(best),
        history,
        model: strip("model."),
        optim: strip("optim."),
    })
}

/// Saves named tensors as safetensors, atomically.
fn save_tensors(path: &Path, tensors: impl IntoIterator<Item = (String, Tensor)>) -> Result<()> {
    let map: HashMap<String, Tensor> = tensors.into_iter().collect();
    write_atomic(path, |tmp| -> Result<()> {
        candle_core::safetensors::save(&map, tmp)?;
        Ok(())
    })
    .with_context(|| format!("cannot write {}", path.display()))
}

/// Rewrites `metrics.csv` from the history.
fn write_metrics(run_dir: &Path, history: &[EpochRecord]) -> Result<()> {
    let mut text = String::from(METRICS_HEADER);
    text.push('\n');
    for r in history {
        text.push_str(&r.csv());
        text.push('\n');
    }
    let path = run_dir.join(METRICS_FILE);
    sam2rad_data::fsutil::write_bytes_atomic(&path, text.as_bytes())
        .with_context(|| format!("cannot write {}", path.display()))
}

/// Redraws `curves.png` (colours: see the module documentation).
fn write_curves(run_dir: &Path, history: &[EpochRecord]) -> Result<()> {
    let col = |f: &dyn Fn(&EpochRecord) -> Option<f64>| -> Vec<Option<f64>> {
        history.iter().map(f).collect()
    };
    let loss = col(&|r| Some(r.loss));
    let mask = col(&|r| Some(r.mask));
    let train_dice = col(&|r| r.train_dice);
    let val_dice = col(&|r| r.val_dice);
    let img = plot::render(
        &[
            plot::Panel {
                series: vec![
                    plot::Series {
                        values: &mask,
                        color: [240, 150, 30],
                    },
                    plot::Series {
                        values: &loss,
                        color: [200, 30, 30],
                    },
                ],
                y_range: None,
            },
            plot::Panel {
                series: vec![
                    plot::Series {
                        values: &train_dice,
                        color: [40, 80, 220],
                    },
                    plot::Series {
                        values: &val_dice,
                        color: [20, 160, 60],
                    },
                ],
                y_range: Some((0.0, 1.0)),
            },
        ],
        480,
        300,
    );
    let path = run_dir.join(CURVES_FILE);
    let bytes =
        plot::png_bytes(&img).with_context(|| format!("cannot encode {}", path.display()))?;
    sam2rad_data::fsutil::write_bytes_atomic(&path, &bytes)
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A label map at original size and the image's size in the padded frame.
struct LabelMap<'a> {
    labels: &'a [u8],
    h: usize,
    w: usize,
    input_size: (usize, usize),
}

/// Builds the rows and padded-frame targets of a batch of images.
fn make_batch(ctx: &Ctx, feats: Features, labels: &[LabelMap]) -> Result<Batch> {
    let c = ctx.cfg.classes;
    let mut targets = Vec::with_capacity(labels.len() * c);
    for l in labels {
        for class in 0..c {
            targets.push(class_target(
                l.labels,
                l.h,
                l.w,
                class as u8 + 1,
                l.input_size,
                ctx.s,
            ));
        }
    }
    Ok(Batch {
        feats,
        rows: Rows::all(labels.len(), c),
        targets,
        input_sizes: labels.iter().map(|l| l.input_size).collect(),
    })
}

/// What one step produced.
struct StepOutcome {
    /// [total, mask, mask_final, mask_prompt, box, obj]; None when the step was skipped.
    parts: Option<[f64; 6]>,
    /// Dice of each row where ground truth or prediction is non-empty.
    dice: Vec<f64>,
}

/// One optimisation step on `batch` (global step `g` of epoch `e`).
fn train_step(
    ctx: &Ctx,
    model: &Sam2Rad,
    opt: &mut AdamW,
    vars: &[Var],
    batch: &Batch,
    e: u64,
    g: u64,
) -> Result<StepOutcome> {
    let (r, s) = (batch.rows.len(), ctx.s);
    let flat: Vec<f32> = batch.targets.concat();
    let targets = Tensor::from_vec(flat, (r, 1, s, s), &ctx.dev)?;
    let prompts = mixed_prompts(ctx, model, batch, e, g)?;
    let phase = Phase::Train {
        seed: mix(&[ctx.cfg.seed, e, g, purpose::DROPOUT]),
    };
    let out = model.forward(&batch.feats, &batch.rows, &prompts, phase)?;
    let parts = sam2rad_loss(&out, &targets, &ctx.cfg.loss)?;
    let mut values = [0f64; 6];
    for (v, t) in values.iter_mut().zip([
        &parts.total,
        &parts.mask,
        &parts.mask_final,
        &parts.mask_prompt,
        &parts.boxes,
        &parts.obj,
    ]) {
        *v = t.to_dtype(DType::F64)?.to_scalar::<f64>()?;
    }
    let pred = predicted_masks(&out.mask_logits, &out.object_logits, s)?;
    let dice = (0..r)
        .filter_map(|row| {
            let (ih, iw) = batch.input_sizes[batch.rows.image()[row]];
            crop_dice(&pred[row], &batch.targets[row], s, ih, iw)
        })
        .collect();
    if !values[0].is_finite() {
        return Ok(StepOutcome { parts: None, dice });
    }
    let mut grads = parts.total.backward()?;
    let norm = clip_grad_norm(&mut grads, vars, ctx.cfg.clip_norm)?;
    if !norm.is_finite() {
        return Ok(StepOutcome { parts: None, dice });
    }
    opt.set_lr_scale(ctx.schedule.factor(g as usize + 1));
    opt.step(&grads)?;
    Ok(StepOutcome {
        parts: Some(values),
        dice,
    })
}

/// Binary S×S predictions per row: logit > 0 after bilinear upsampling, and objectness ≥ 0.
fn predicted_masks(
    mask_logits: &Tensor,
    object_logits: &Tensor,
    s: usize,
) -> Result<Vec<Vec<bool>>> {
    let up = ops::resize_bilinear(&mask_logits.detach(), s, s)?;
    let v: Vec<f32> = up.flatten_all()?.to_vec1()?;
    let obj: Vec<f32> = object_logits.detach().to_dtype(DType::F32)?.to_vec1()?;
    Ok(v.chunks(s * s)
        .zip(&obj)
        .map(|(m, &o)| m.iter().map(|&x| o >= 0.0 && x > 0.0).collect())
        .collect())
}

/// Dice of a predicted vs target S×S mask over the top-left `ih × iw` (the image inside the
/// padding); None when both are empty there.
fn crop_dice(pred: &[bool], target: &[f32], s: usize, ih: usize, iw: usize) -> Option<f64> {
    let (mut inter, mut p, mut t) = (0usize, 0usize, 0usize);
    for y in 0..ih {
        for x in 0..iw {
            let (a, b) = (pred[y * s + x], target[y * s + x] > 0.5);
            inter += usize::from(a && b);
            p += usize::from(a);
            t += usize::from(b);
        }
    }
    (p + t > 0).then(|| 2.0 * inter as f64 / (p + t) as f64)
}

/// Inclusive pixel box `[x0, y0, x1, y1]` of an S×S target, or None when empty.
fn target_box(target: &[f32], s: usize) -> Option<[usize; 4]> {
    let mut b: Option<[usize; 4]> = None;
    for (i, _) in target.iter().enumerate().filter(|(_, v)| **v > 0.5) {
        let (x, y) = (i % s, i / s);
        b = Some(match b {
            None => [x, y, x, y],
            Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
        });
    }
    b
}

/// The prompts of a step, per the prompt mix (see the module documentation).
fn mixed_prompts(ctx: &Ctx, model: &Sam2Rad, batch: &Batch, e: u64, g: u64) -> Result<RowPrompts> {
    let mut rng = stream(&[ctx.cfg.seed, e, g, purpose::MIX]);
    let kind = ctx.cfg.mix.pick(rng.random::<f64>());
    let s = ctx.s;
    let r = batch.rows.len();
    let boxes: Vec<Option<[usize; 4]>> = batch.targets.iter().map(|t| target_box(t, s)).collect();
    let all_fg = boxes.iter().all(Option::is_some);
    let box_tensor = |rng: &mut ChaCha8Rng| -> Result<Tensor> {
        // Jitter each side by up to 10% of the box size, at most 20 px of a 1024 frame.
        let cap = 20.0 * s as f64 / 1024.0;
        let mut v = Vec::with_capacity(4 * r);
        for [x0, y0, x1, y1] in boxes.iter().flatten() {
            let (x0, y0, x1, y1) = (*x0 as f64, *y0 as f64, *x1 as f64 + 1.0, *y1 as f64 + 1.0);
            let (jx, jy) = ((0.1 * (x1 - x0)).min(cap), (0.1 * (y1 - y0)).min(cap));
            for (c, j) in [(x0, jx), (y0, jy), (x1, jx), (y1, jy)] {
                let d = if j > 0.0 {
                    rng.random_range(-j..=j)
                } else {
                    0.0
                };
                v.push((c + d).clamp(0.0, s as f64) as f32);
            }
        }
        Ok(Tensor::from_vec(v, (r, 4), &ctx.dev)?)
    };
    let points = |xy: Vec<f32>, labels: Vec<i64>| -> Result<(Tensor, Tensor)> {
        Ok((
            Tensor::from_vec(xy, (r, 1, 2), &ctx.dev)?,
            Tensor::from_vec(labels, (r, 1), &ctx.dev)?,
        ))
    };
    Ok(match kind {
        MixKind::GtBox if all_fg => RowPrompts {
            boxes: Some(box_tensor(&mut rng)?),
            ..RowPrompts::learned()
        },
        MixKind::Clicks => {
            let out = model.forward(
                &batch.feats,
                &batch.rows,
                &RowPrompts::learned(),
                Phase::Eval,
            )?;
            let pred = predicted_masks(&out.mask_logits, &out.object_logits, s)?;
            let (mut xy, mut labels) = (Vec::with_capacity(2 * r), Vec::with_capacity(r));
            for (row, p) in pred.iter().enumerate() {
                let (ih, iw) = batch.input_sizes[batch.rows.image()[row]];
                let gt: Vec<bool> = batch.targets[row].iter().map(|&v| v > 0.5).collect();
                match corrective_click(p, &gt, s, ih, iw) {
                    Some((x, y, label)) => {
                        xy.extend([x as f32, y as f32]);
                        labels.push(label);
                    }
                    None => {
                        xy.extend([0.0, 0.0]);
                        labels.push(-1);
                    }
                }
            }
            RowPrompts {
                points: Some(points(xy, labels)?),
                ..RowPrompts::learned()
            }
        }
        MixKind::Manual if all_fg => {
            // 0: box only, 1: one positive click, 2: both.
            let variant = rng.random_range(0..3u32);
            let boxes = (variant != 1).then(|| box_tensor(&mut rng)).transpose()?;
            let clicks = if variant != 0 {
                let mut xy = Vec::with_capacity(2 * r);
                for row in 0..r {
                    let (ih, iw) = batch.input_sizes[batch.rows.image()[row]];
                    let gt: Vec<bool> = batch.targets[row].iter().map(|&v| v > 0.5).collect();
                    // Always Some: every row has foreground, and targets are zero outside the crop.
                    let (x, y) = deepest_point(&gt, s, ih, iw).unwrap_or((0, 0));
                    xy.extend([x as f32, y as f32]);
                }
                Some(points(xy, vec![1; r])?)
            } else {
                None
            };
            RowPrompts {
                learned: false,
                boxes,
                points: clicks,
                mask: None,
            }
        }
        _ => RowPrompts::learned(),
    })
}

/// Mean Dice of autonomous predictions over `images` (`(sample, input_size)`), `batch` images at
/// a time, features from `features(i)`.
fn autonomous_dice(
    model: &Sam2Rad,
    images: &[(&LoadedSample, (usize, usize))],
    batch: usize,
    features: &mut dyn FnMut(usize) -> Result<Features>,
) -> Result<Option<f64>> {
    let c = model.config().num_classes;
    let s = model.config().base.image_size;
    let mut dices = Vec::new();
    let n = images.len();
    for start in (0..n).step_by(batch.max(1)) {
        let end = (start + batch.max(1)).min(n);
        let feats = (start..end)
            .map(&mut *features)
            .collect::<Result<Vec<_>>>()?;
        let feats = Features::cat(&feats)?;
        let rows = Rows::all(end - start, c);
        let out = model.forward(&feats, &rows, &RowPrompts::learned(), Phase::Eval)?;
        let obj: Vec<f32> = out.object_logits.to_dtype(DType::F32)?.to_vec1()?;
        for (bi, &(sample, input_size)) in images[start..end].iter().enumerate() {
            let (h, w) = (sample.h, sample.w);
            let low = out.mask_logits.narrow(0, bi * c, c)?;
            let full = postprocess_masks(&low, input_size, (h, w), s)?;
            let v: Vec<f32> = full.flatten_all()?.to_vec1()?;
            for (class, logits) in v.chunks(h * w).enumerate() {
                let on = obj[bi * c + class] >= 0.0;
                let pred: Vec<bool> = logits.iter().map(|&x| on && x > 0.0).collect();
                let gt: Vec<bool> = sample
                    .mask
                    .iter()
                    .map(|&l| l as usize == class + 1)
                    .collect();
                if let Some(d) = score(&pred, &gt, h, w, None).dice {
                    dices.push(d);
                }
            }
        }
    }
    Ok(mean(&dices))
}

/// Mean Dice of `model`'s autonomous predictions (learned prompts only, objectness < 0 → empty
/// class) over the (image, class) pairs of `samples` at original resolution, pairs with empty
/// ground truth and empty prediction left out (None if no pair is scored). Runs the encoder on
/// every image, `batch` images at a time.
pub fn evaluate_dice(
    model: &Sam2Rad,
    samples: &[LoadedSample],
    batch: usize,
) -> Result<Option<f64>> {
    let base = &model.config().base;
    let dev = Device::Cpu;
    let data: Vec<(&LoadedSample, (usize, usize))> = samples
        .iter()
        .map(|d| (d, longest_side_size(d.h, d.w, base.image_size)))
        .collect();
    let mut features = |i: usize| -> Result<Features> {
        let d = &samples[i];
        let pre = preprocess(base, &d.rgb, d.h, d.w, &dev)?;
        Ok(extract(model.base(), &pre.input)?)
    };
    autonomous_dice(model, &data, batch, &mut features)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prompt_mix_follows_the_probabilities() {
        let m = PromptMix::default();
        assert_eq!(m.pick(0.0), MixKind::Learned);
        assert_eq!(m.pick(0.49), MixKind::Learned);
        assert_eq!(m.pick(0.5), MixKind::GtBox);
        assert_eq!(m.pick(0.92), MixKind::Clicks);
        assert_eq!(m.pick(0.97), MixKind::Manual);
        assert_eq!(m.pick(1.0), MixKind::Manual);
        let only = PromptMix {
            learned: 0.0,
            gt_box: 2.0,
            clicks: 0.0,
            manual: 0.0,
        };
        assert_eq!(only.pick(0.3), MixKind::GtBox);
        assert_eq!(only.pick(1.0), MixKind::GtBox);
    }

    #[test]
    fn history_rows_round_trip() {
        let r = EpochRecord {
            epoch: 3,
            steps: 12,
            lr: 1e-4,
            loss: 1.5,
            mask: 0.1,
            mask_final: 0.06,
            mask_prompt: 0.04,
            boxes: 0.3,
            obj: 0.2,
            train_dice: Some(0.5),
            val_dice: None,
            skipped: 1,
            seconds: 2.0,
            ms_per_step: 150.0,
        };
        assert_eq!(EpochRecord::from_row(&r.to_row()), r);
        assert_eq!(
            r.csv().split(',').count(),
            METRICS_HEADER.split(',').count()
        );
    }

    #[test]
    fn streams_differ_by_every_part() {
        let a = mix(&[1, 2, 3, 4]);
        assert_ne!(a, mix(&[1, 2, 3, 5]));
        assert_ne!(a, mix(&[1, 2, 4, 4]));
        assert_ne!(a, mix(&[0, 2, 3, 4]));
        assert_eq!(a, mix(&[1, 2, 3, 4]));
    }
}
