//! On-disk cache of frozen-encoder outputs. The encoder never trains, so each (image, augmented
//! view) is encoded once and a training step costs only the prompt predictor and the decoder.
//! Entries are keyed by the image's bytes, the model (architecture, weights, preprocessing) and
//! the view's augmentation parameters; change any of them and the key changes.

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};
use candle_core::{Device, Tensor};
use sha2::{Digest, Sha256};

use crate::features::Features;

/// Bump when the stored layout or the feature extraction changes meaning.
const FORMAT_VERSION: &str = "sam2rad-cache-v1";

/// Hex SHA-256 of `parts`, each length-prefixed so concatenations cannot collide.
fn digest(parts: &[&[u8]]) -> String {
    let mut h = Sha256::new();
    for p in parts {
        h.update((p.len() as u64).to_le_bytes());
        h.update(p);
    }
    h.finalize().iter().map(|b| format!("{b:02x}")).collect()
}

/// Identity of a weights file without reading all of it: size plus the first and last MiB.
pub fn weights_identity(path: &Path) -> Result<String> {
    let mut f =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let len = f.metadata()?.len();
    let chunk = 1 << 20;
    let mut head = vec![0u8; chunk.min(len as usize)];
    f.read_exact(&mut head)?;
    let mut tail = vec![0u8; chunk.min(len as usize)];
    f.seek(SeekFrom::Start(len - tail.len() as u64))?;
    f.read_exact(&mut tail)?;
    Ok(digest(&[&len.to_le_bytes(), &head, &tail]))
}

/// Key of a model: its architecture JSON, weights identity (or init seed) and preprocessing.
pub fn model_key(config_json: &str, weights: &str, preprocessing: &str) -> String {
    digest(&[
        FORMAT_VERSION.as_bytes(),
        config_json.as_bytes(),
        weights.as_bytes(),
        preprocessing.as_bytes(),
    ])
}

/// Key of an image file's content.
pub fn content_key(bytes: &[u8]) -> String {
    digest(&[bytes])
}

/// Key of an augmented view (its exact parameters, so any change in augmentation re-encodes).
pub fn view_key(params: &impl std::fmt::Debug) -> String {
    digest(&[format!("{params:?}").as_bytes()])
}

/// A cache folder for one model.
#[derive(Debug, Clone)]
pub struct EmbeddingCache {
    dir: PathBuf,
}

impl EmbeddingCache {
    /// Opens (creating) `root/<model_key>`.
    pub fn open(root: &Path, model_key: &str) -> Result<Self> {
        let dir = root.join(&model_key[..32.min(model_key.len())]);
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create cache folder {}", dir.display()))?;
        Ok(Self { dir })
    }

    /// The folder holding this model's entries.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn path(&self, image_key: &str, view_key: &str) -> PathBuf {
        let name = digest(&[image_key.as_bytes(), view_key.as_bytes()]);
        self.dir.join(format!("{}.safetensors", &name[..40]))
    }

    /// The cached features of (image, view), if present and readable.
    pub fn load(&self, image_key: &str, view_key: &str, device: &Device) -> Option<Features> {
        let path = self.path(image_key, view_key);
        let map: HashMap<String, Tensor> = candle_core::safetensors::load(&path, device).ok()?;
        Features::from_named_tensors(&map, device).ok()
    }

    /// Stores features atomically (a crash never leaves a truncated entry behind).
    pub fn store(&self, image_key: &str, view_key: &str, features: &Features) -> Result<()> {
        let path = self.path(image_key, view_key);
        let map: HashMap<String, Tensor> = features.to_named_tensors().into_iter().collect();
        sam2rad_data::fsutil::write_atomic(&path, |tmp| -> Result<()> {
            candle_core::safetensors::save(&map, tmp)?;
            Ok(())
        })
        .with_context(|| format!("cannot write cache entry {}", path.display()))
    }

    /// Cached features of (image, view), computing and storing them on a miss; returns whether
    /// it was a hit.
    pub fn get_or_compute(
        &self,
        image_key: &str,
        view_key: &str,
        device: &Device,
        compute: impl FnOnce() -> Result<Features>,
    ) -> Result<(Features, bool)> {
        if let Some(f) = self.load(image_key, view_key, device) {
            return Ok((f, true));
        }
        let f = compute()?;
        self.store(image_key, view_key, &f)?;
        Ok((f, false))
    }
}
