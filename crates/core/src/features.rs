//! The frozen image features Sam2Rad reads: the decoder's image embedding, the three levels the
//! prompt predictor attends to (coarse → fine) and SAM 2's high-resolution skips; how they are
//! computed from a base model, selected per (image, class) row, and named for an on-disk cache.

use std::collections::HashMap;

use candle_core::{DType, Device, Result, Tensor};
use sam2rad_models::config::SamConfig;
use sam2rad_models::sam::AnySam;

/// Cache key of the image embedding.
const KEY_EMBED: &str = "embed";
/// Cache keys of SAM 1's two block-output levels (level 0 is the embedding itself).
const KEY_LEVELS: [&str; 2] = ["levels.1", "levels.2"];
/// Cache keys of SAM 2's `[feat_s0, feat_s1]` (levels 2 and 1).
const KEY_HIGH_RES: [&str; 2] = ["high_res.0", "high_res.1"];

/// Image features of a batch of B images.
///
/// Invariant (kept by the constructors): `levels[0]` is `embed`; for SAM 2, `levels[1]` is
/// `high_res[1]` (s1) and `levels[2]` is `high_res[0]` (s0), so a cache stores each map once.
#[derive(Debug, Clone)]
pub struct Features {
    /// Stride-16 image embedding the decoder attends to, `[B, D, h, w]` (SAM 2: with `no_mem_embed`).
    pub embed: Tensor,
    /// The three levels the hierarchical PPN reads, coarse → fine. SAM/MobileSAM/MedSAM:
    /// `[embed, last block, second-to-last block]` (all h×w); SAM 2: `[embed, s1 (2h, D/4 ch),
    /// s0 (4h, D/8 ch)]`.
    pub levels: Vec<Tensor>,
    /// SAM 2's decoder skips `[feat_s0 [B, D/8, 4h, 4w], feat_s1 [B, D/4, 2h, 2w]]`; None for SAM 1.
    pub high_res: Option<[Tensor; 2]>,
}

impl Features {
    /// SAM / MobileSAM / MedSAM features: the neck output and the last two encoder blocks' outputs.
    pub fn sam(embed: Tensor, last_block: Tensor, second_last_block: Tensor) -> Self {
        Self {
            levels: vec![embed.clone(), last_block, second_last_block],
            embed,
            high_res: None,
        }
    }

    /// SAM 2 features: the embedding (with `no_mem_embed`) and the projected skips s0, s1.
    pub fn sam2(embed: Tensor, feat_s0: Tensor, feat_s1: Tensor) -> Self {
        Self {
            levels: vec![embed.clone(), feat_s1.clone(), feat_s0.clone()],
            embed,
            high_res: Some([feat_s0, feat_s1]),
        }
    }

    /// Number of images B.
    pub fn batch(&self) -> Result<usize> {
        self.embed.dim(0)
    }

    /// The features of images `image_of_row` (one entry per output row, repeats allowed), e.g.
    /// `[0, 0, 1, 1]` for B = 2 images × C = 2 classes. The identity selection costs no copy.
    pub fn rows(&self, image_of_row: &[usize]) -> Result<Features> {
        let b = self.batch()?;
        if let Some(&bad) = image_of_row.iter().find(|&&i| i >= b) {
            candle_core::bail!("features: row refers to image {bad}, the batch has {b}")
        }
        if image_of_row.len() == b && image_of_row.iter().enumerate().all(|(r, &i)| r == i) {
            return Ok(self.clone());
        }
        let idx = index_tensor(image_of_row, self.embed.device())?;
        let pick = |t: &Tensor| t.contiguous()?.index_select(&idx, 0);
        let embed = pick(&self.embed)?;
        Ok(match &self.high_res {
            Some([s0, s1]) => Features::sam2(embed, pick(s0)?, pick(s1)?),
            None => Features::sam(embed, pick(&self.levels[1])?, pick(&self.levels[2])?),
        })
    }

    /// Concatenates the images of several feature batches (e.g. cached single images) into one.
    pub fn cat(parts: &[Features]) -> Result<Features> {
        let Some(first) = parts.first() else {
            candle_core::bail!("features: nothing to concatenate")
        };
        let cat = |f: &dyn Fn(&Features) -> &Tensor| -> Result<Tensor> {
            let ts: Vec<&Tensor> = parts.iter().map(f).collect();
            Tensor::cat(&ts, 0)
        };
        let embed = cat(&|p| &p.embed)?;
        if parts
            .iter()
            .any(|p| p.high_res.is_some() != first.high_res.is_some())
        {
            candle_core::bail!("features: cannot concatenate SAM 1 and SAM 2 features")
        }
        Ok(match &first.high_res {
            Some(_) => {
                // Every part has high_res (checked above); levels 1/2 are the same maps.
                Features::sam2(embed, cat(&|p| &p.levels[2])?, cat(&|p| &p.levels[1])?)
            }
            None => Features::sam(embed, cat(&|p| &p.levels[1])?, cat(&|p| &p.levels[2])?),
        })
    }

    /// The features as named tensors for a cache: `embed`, then `levels.1`/`levels.2` (SAM 1) or
    /// `high_res.0`/`high_res.1` (SAM 2). Level 0 is `embed` and is not stored twice.
    pub fn to_named_tensors(&self) -> Vec<(String, Tensor)> {
        let mut out = vec![(KEY_EMBED.to_string(), self.embed.clone())];
        match &self.high_res {
            Some(hr) => {
                for (k, t) in KEY_HIGH_RES.iter().zip(hr) {
                    out.push((k.to_string(), t.clone()));
                }
            }
            None => {
                for (k, t) in KEY_LEVELS.iter().zip(&self.levels[1..]) {
                    out.push((k.to_string(), t.clone()));
                }
            }
        }
        out
    }

    /// Rebuilds features from [`Self::to_named_tensors`]' names (any float dtype; converted to
    /// f32 on `device`). SAM 2 features are recognised by their `high_res.*` keys.
    pub fn from_named_tensors(map: &HashMap<String, Tensor>, device: &Device) -> Result<Self> {
        let get = |k: &str| -> Result<Tensor> {
            match map.get(k) {
                Some(t) => t.to_dtype(DType::F32)?.to_device(device),
                None => candle_core::bail!("cached features lack `{k}`"),
            }
        };
        let embed = get(KEY_EMBED)?;
        let f = if map.contains_key(KEY_HIGH_RES[0]) {
            Features::sam2(embed, get(KEY_HIGH_RES[0])?, get(KEY_HIGH_RES[1])?)
        } else {
            Features::sam(embed, get(KEY_LEVELS[0])?, get(KEY_LEVELS[1])?)
        };
        let b = f.batch()?;
        for t in &f.levels {
            if t.rank() != 4 || t.dim(0)? != b {
                candle_core::bail!(
                    "cached features: a level has shape {:?}, the embedding {:?}",
                    t.dims(),
                    f.embed.dims()
                )
            }
        }
        Ok(f)
    }
}

/// Image features of a preprocessed `[B, 3, S, S]` batch through the frozen encoder of `base`.
pub fn extract(base: &AnySam, input: &Tensor) -> Result<Features> {
    match base {
        AnySam::Sam(m) => {
            let (embed, blocks) = m.image_encoder.forward_levels(input)?;
            // forward_levels returns the earlier block first.
            let [second_last, last] = blocks.as_slice() else {
                candle_core::bail!(
                    "model `{}`: the encoder needs at least two blocks for the PPN levels",
                    m.config.name
                )
            };
            Ok(Features::sam(embed, last.clone(), second_last.clone()))
        }
        AnySam::Sam2(m) => {
            let f = m.embed(input)?;
            let [s0, s1] = f.high_res;
            Ok(Features::sam2(f.image_embed, s0, s1))
        }
    }
}

/// Channels of the three [`Features::levels`] of `base`, coarse → fine.
pub fn level_channels(base: &AnySam) -> Result<[usize; 3]> {
    let d = base.config().prompt_embed_dim;
    match base {
        AnySam::Sam(m) => match m.image_encoder.level_channels().as_slice() {
            &[second_last, last] => Ok([d, last, second_last]),
            _ => candle_core::bail!(
                "model `{}`: the encoder needs at least two blocks for the PPN levels",
                m.config.name
            ),
        },
        AnySam::Sam2(_) => Ok([d, d / 4, d / 8]),
    }
}

/// Expected side of each of the three levels for the square input of `cfg` (SAM 1: all equal to
/// the embedding side; SAM 2: ×1, ×2, ×4).
pub fn level_sides(cfg: &SamConfig) -> [usize; 3] {
    let e = cfg.embedding_size();
    match cfg.family {
        sam2rad_models::config::Family::Sam2 => [e, 2 * e, 4 * e],
        _ => [e, e, e],
    }
}

/// A u32 index tensor for `index_select`.
pub(crate) fn index_tensor(idx: &[usize], device: &Device) -> Result<Tensor> {
    let v: Vec<u32> = idx.iter().map(|&i| i as u32).collect();
    Tensor::from_vec(v, idx.len(), device)
}

/// Which image and which class each output row is (row r = b·C + c for [`Rows::all`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rows {
    image: Vec<usize>,
    class: Vec<usize>,
}

impl Rows {
    /// Every (image, class) pair of `batch` images and `classes` classes, image-major.
    pub fn all(batch: usize, classes: usize) -> Self {
        let n = batch * classes;
        Self {
            image: (0..n).map(|r| r / classes.max(1)).collect(),
            class: (0..n).map(|r| r % classes.max(1)).collect(),
        }
    }

    /// Explicit rows: `image[r]` and `class[r]` of every row (same lengths).
    pub fn new(image: Vec<usize>, class: Vec<usize>) -> Result<Self> {
        if image.len() != class.len() {
            candle_core::bail!(
                "rows: {} image indices but {} class indices",
                image.len(),
                class.len()
            )
        }
        Ok(Self { image, class })
    }

    /// Number of rows R.
    pub fn len(&self) -> usize {
        self.image.len()
    }

    /// True when there are no rows.
    pub fn is_empty(&self) -> bool {
        self.image.is_empty()
    }

    /// Image index of every row.
    pub fn image(&self) -> &[usize] {
        &self.image
    }

    /// Class index of every row.
    pub fn class(&self) -> &[usize] {
        &self.class
    }
}
