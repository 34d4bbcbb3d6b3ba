//! Run folders written by training, read back for evaluation and prediction.
//!
//! A run folder holds `config.json` and the trained tensors of the best and the last epoch
//! (`best.safetensors`, `last.safetensors`, as [`Sam2Rad::trained_tensors`] writes them).
//! `config.json` is an object with the [`Sam2RadConfig`] under `"model"` and the base weights
//! under `"train"` (`"weights"`: the official checkpoint the run was trained on, or
//! `"random_init_seed"`: a seeded [`Source::Init`] base for demos and tests). The two keys are
//! also accepted at the top level. A relative weights path is taken relative to the current
//! folder, else to the run folder. When `"base_weights"."identity"` is present (training
//! records [`crate::cache::weights_identity`]), the weights file must match it.

use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use anyhow::{bail, Context, Result};
use candle_core::Device;
use sam2rad_models::checkpoint::{Checkpoint, Source};

use crate::cache::weights_identity;
use crate::model::{Sam2Rad, Sam2RadConfig};

/// File name of a run's configuration.
pub const CONFIG_FILE: &str = "config.json";
/// File name of the best checkpoint (by validation score).
pub const BEST_FILE: &str = "best.safetensors";
/// File name of the checkpoint of the last epoch.
pub const LAST_FILE: &str = "last.safetensors";

/// Which checkpoint of a run to load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Which {
    /// `best.safetensors` (default).
    #[default]
    Best,
    /// `last.safetensors`.
    Last,
}

impl Which {
    /// The checkpoint's file name inside the run folder.
    pub fn file_name(self) -> &'static str {
        match self {
            Which::Best => BEST_FILE,
            Which::Last => LAST_FILE,
        }
    }
}

impl FromStr for Which {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "best" => Ok(Which::Best),
            "last" => Ok(Which::Last),
            _ => Err(format!("checkpoint `{s}`: expected `best` or `last`")),
        }
    }
}

/// Where the frozen base model's weights come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BaseWeights {
    /// An official checkpoint file.
    File(PathBuf),
    /// Seeded fresh parameters ([`Source::Init`]).
    Init {
        /// Seed of the initialisation.
        seed: u64,
    },
}

/// The parts of a run's `config.json` needed to rebuild its model.
#[derive(Debug, Clone, PartialEq)]
pub struct RunConfig {
    /// The Sam2Rad model description.
    pub model: Sam2RadConfig,
    /// The base weights.
    pub base: BaseWeights,
    /// Identity of the weights file the run was trained on, when recorded.
    pub base_identity: Option<String>,
}

impl RunConfig {
    /// Reads `dir/config.json`; errors name the file.
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CONFIG_FILE);
        if !dir.is_dir() {
            bail!("run folder {} does not exist", dir.display());
        }
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("cannot read the run configuration {}", path.display()))?;
        let json: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: invalid JSON", path.display()))?;
        let model_json = json
            .get("model")
            .with_context(|| format!("{}: no \"model\" entry", path.display()))?;
        let model: Sam2RadConfig = serde_json::from_value(model_json.clone())
            .with_context(|| format!("{}: invalid \"model\" entry", path.display()))?;
        model
            .validate()
            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
        // `train.<key>` first, then `<key>` at the top level.
        let lookup = |key: &str| {
            json.get("train")
                .and_then(|t| t.get(key))
                .or_else(|| json.get(key))
                .filter(|v| !v.is_null())
        };
        let base = match (lookup("weights"), lookup("random_init_seed")) {
            (Some(w), _) => {
                let w = w.as_str().with_context(|| {
                    format!("{}: \"weights\" must be a path string", path.display())
                })?;
                BaseWeights::File(resolve(dir, Path::new(w)))
            }
            (None, Some(s)) => BaseWeights::Init {
                seed: s.as_u64().with_context(|| {
                    format!(
                        "{}: \"random_init_seed\" must be a non-negative integer",
                        path.display()
                    )
                })?,
            },
            (None, None) => bail!(
                "{}: names neither base \"weights\" nor a \"random_init_seed\"",
                path.display()
            ),
        };
        let base_identity = json
            .get("base_weights")
            .and_then(|b| b.get("identity"))
            .and_then(|v| v.as_str())
            .map(str::to_string);
        Ok(Self {
            model,
            base,
            base_identity,
        })
    }
}

/// `p` as given when it exists (or is absolute), else relative to the run folder `dir`.
fn resolve(dir: &Path, p: &Path) -> PathBuf {
    if p.is_absolute() || p.exists() {
        return p.to_path_buf();
    }
    let beside = dir.join(p);
    if beside.exists() {
        beside
    } else {
        p.to_path_buf()
    }
}

/// A run loaded for inference.
#[derive(Debug)]
pub struct Run {
    /// The run folder.
    pub dir: PathBuf,
    /// Its configuration.
    pub config: RunConfig,
    /// The checkpoint file that was loaded.
    pub checkpoint: PathBuf,
    /// The model with the trained tensors of `checkpoint`.
    pub model: Sam2Rad,
}

/// Loads the run in `dir` with its `which` checkpoint on `device`; `weights` replaces the base
/// weights path of the configuration (e.g. after moving the file; its identity is still checked).
pub fn load(dir: &Path, which: Which, weights: Option<&Path>, device: &Device) -> Result<Run> {
    let mut config = RunConfig::read(dir)?;
    if let Some(w) = weights {
        config.base = BaseWeights::File(w.to_path_buf());
    }
    let ckpt_path = dir.join(which.file_name());
    if !ckpt_path.is_file() {
        bail!(
            "run checkpoint {} does not exist (train first, or choose the other with --checkpoint)",
            ckpt_path.display()
        );
    }
    let trained = Arc::new(Checkpoint::load(&ckpt_path)?);
    let base = match &config.base {
        BaseWeights::File(p) => {
            let ckpt = Checkpoint::load(p).context("cannot load the run's base weights")?;
            if let Some(want) = &config.base_identity {
                if *want != weights_identity(p)? {
                    bail!(
                        "base weights {} are not the file run {} was trained on",
                        p.display(),
                        dir.display()
                    );
                }
            }
            Source::File(Arc::new(ckpt))
        }
        BaseWeights::Init { seed } => Source::Init { seed: *seed },
    };
    let model =
        Sam2Rad::new(&config.model, base, Source::File(trained), device).with_context(|| {
            format!(
                "cannot build the model of {} with {}",
                dir.join(CONFIG_FILE).display(),
                ckpt_path.display()
            )
        })?;
    Ok(Run {
        dir: dir.to_path_buf(),
        config,
        checkpoint: ckpt_path,
        model,
    })
}
