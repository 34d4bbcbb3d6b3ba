//! The `--model / --model-config / --weights` options shared by every model command.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::{bail, Result};
use sam2rad_models::checkpoint::{Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::{SamConfig, PRESETS};
use sam2rad_models::detect::detect;

/// Which architecture to build and which weights to load into it.
#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model preset: sam-vit-b, sam-vit-l, sam-vit-h, mobile-sam, medsam.
    #[arg(long, conflicts_with = "model_config")]
    pub model: Option<String>,
    /// JSON architecture description instead of a preset (see fixtures/configs/).
    #[arg(long, value_name = "FILE.json")]
    pub model_config: Option<PathBuf>,
    /// Official weights file (.pth, .pt or .safetensors, official key names).
    #[arg(long, value_name = "FILE")]
    pub weights: Option<PathBuf>,
}

impl ModelArgs {
    /// The architecture named by `--model` or `--model-config`.
    pub fn config(&self) -> Result<SamConfig> {
        match (&self.model, &self.model_config) {
            (Some(name), _) => Ok(SamConfig::preset(name)?),
            (None, Some(path)) => Ok(SamConfig::from_json_file(path)?),
            (None, None) => bail!(
                "choose a model with --model ({}) or --model-config FILE.json",
                PRESETS.join(", ")
            ),
        }
    }

    /// The loaded `--weights` file (required).
    pub fn checkpoint(&self) -> Result<Arc<Checkpoint>> {
        let Some(path) = &self.weights else {
            bail!("--weights FILE is required (official .pth, .pt or .safetensors)")
        };
        Ok(Arc::new(Checkpoint::load(path)?))
    }

    /// A frozen weights backend over `--weights`, or seeded random weights when `random` is set.
    pub fn backend(&self, random: bool) -> Result<WeightsBackend> {
        if random {
            if self.weights.is_some() {
                bail!("--random and --weights exclude each other");
            }
            return Ok(WeightsBackend::new(
                Source::Random { seed: 0, std: 0.02 },
                |_| false,
            ));
        }
        Ok(WeightsBackend::frozen(self.checkpoint()?))
    }
}

/// Adds "cannot build X (the file looks like Y)" to a model-building error.
pub fn with_variant_hint<T, E: Into<anyhow::Error>>(
    result: std::result::Result<T, E>,
    backend: &WeightsBackend,
    cfg: &SamConfig,
) -> Result<T> {
    result.map_err(|e| {
        let e: anyhow::Error = e.into();
        match backend.checkpoint().map(|c| detect(&c)) {
            Some(d) if d.preset.as_deref() != Some(cfg.name.as_str()) => {
                let looks = d.preset.unwrap_or(d.family);
                e.context(format!(
                    "cannot build `{}` (the file looks like {looks})",
                    cfg.name
                ))
            }
            _ => e.context(format!("cannot build `{}`", cfg.name)),
        }
    })
}
