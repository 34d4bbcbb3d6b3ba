//! Data set layouts on disk, sample loading with mask validation, and subject-wise splitting.
//!
//! Layout A (the authors'): `root/{split}/imgs/*` and `root/{split}/gts/*` with the same file
//! names (a mask may also share only the stem, e.g. `a.jpg` + `a.png`); split `Train`/`Test`,
//! lower case accepted. Layout B (nnU-Net raw): `root/imagesTr/{id}_0000.png` with
//! `root/labelsTr/{id}.png`, `root/imagesTs/` (+ `labelsTs/` when present) and an optional
//! `root/dataset.json` whose `"labels"` names the classes and `"file_ending"` the extension.
//! Only channel `_0000` is read (a 2-D RGB PNG is one channel file in nnU-Net).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use crate::mask::read_mask;
use crate::{DataError, Result};

/// File extensions read as 2-D images (case-insensitive).
const IMAGE_EXTENSIONS: [&str; 6] = ["png", "jpg", "jpeg", "tif", "tiff", "bmp"];

/// Which on-disk layout a data set uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LayoutKind {
    /// `root/{Train,Test}/{imgs,gts}`.
    Folders,
    /// nnU-Net raw: `imagesTr`, `labelsTr`, `imagesTs`, `labelsTs`, `dataset.json`.
    NnUnet,
}

/// One image of a data set and its (optional) mask.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Sample {
    /// Case id: the image file stem (without the nnU-Net `_0000` channel suffix).
    pub id: String,
    /// Image file.
    pub image_path: PathBuf,
    /// Label mask file, if the split has masks.
    pub mask_path: Option<PathBuf>,
    /// Subject the image belongs to (see [`subject_of`]); splits never separate a subject.
    pub subject: String,
}

/// The samples of one split of a data set.
#[derive(Debug, Clone, PartialEq)]
pub struct Dataset {
    /// Data set root folder.
    pub root: PathBuf,
    /// Split folder actually used (e.g. `Train`, `imagesTs`).
    pub split: String,
    /// Detected layout.
    pub layout: LayoutKind,
    /// Samples sorted by image file name.
    pub samples: Vec<Sample>,
    /// Foreground class names in label order (label 1 first), when `dataset.json` gives them.
    pub class_names: Option<Vec<String>>,
}

/// An image as 8-bit RGB and its label mask, both at original size.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadedSample {
    /// Pixels, `h * w * 3` bytes, row-major HWC.
    pub rgb: Vec<u8>,
    /// Rows.
    pub h: usize,
    /// Columns.
    pub w: usize,
    /// Label per pixel, `0..=num_classes` (binary 0/255 masks mapped to 0/1).
    pub mask: Vec<u8>,
}

/// A layout error about `path`.
fn layout_err(path: &Path, reason: impl Into<String>) -> DataError {
    DataError::Layout {
        path: path.display().to_string(),
        reason: reason.into(),
    }
}

impl Dataset {
    /// Opens split `split` (`Train`/`Test`, any case; `Tr`/`Ts` also for nnU-Net) of the data
    /// set at `root`, detecting Layout B by `dataset.json` or `imagesTr/`, else Layout A.
    pub fn open(root: &Path, split: &str) -> Result<Dataset> {
        if !root.is_dir() {
            return Err(layout_err(root, "not a folder"));
        }
        if root.join("dataset.json").is_file() || root.join("imagesTr").is_dir() {
            open_nnunet(root, split)
        } else {
            open_folders(root, split)
        }
    }

    /// Number of foreground classes named by the metadata, if any.
    pub fn num_classes(&self) -> Option<usize> {
        self.class_names.as_ref().map(Vec::len)
    }
}

/// Layout A.
fn open_folders(root: &Path, split: &str) -> Result<Dataset> {
    let mut candidates = vec![split.to_string()];
    let mut cap = split.to_ascii_lowercase();
    if let Some(first) = cap.get_mut(0..1) {
        first.make_ascii_uppercase();
    }
    candidates.extend([cap, split.to_ascii_lowercase(), split.to_ascii_uppercase()]);
    let dir = candidates
        .iter()
        .map(|c| root.join(c))
        .find(|d| d.join("imgs").is_dir())
        .ok_or_else(|| {
            layout_err(
                root,
                format!(
                    "no `{split}/imgs` folder (Layout A: {split}/imgs + {split}/gts) and no \
                     `imagesTr`/`dataset.json` (nnU-Net layout)"
                ),
            )
        })?;
    let gts = dir.join("gts");
    let gts = gts.is_dir().then_some(gts);
    let mut samples = Vec::new();
    for image_path in list_images(&dir.join("imgs"))? {
        let id = file_stem(&image_path);
        let mask_path = match &gts {
            None => None,
            Some(gts) => Some(find_mask(gts, &image_path, &id)?),
        };
        samples.push(Sample {
            subject: subject_of(&id),
            id,
            image_path,
            mask_path,
        });
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        split: file_name(&dir),
        layout: LayoutKind::Folders,
        samples,
        class_names: None,
    })
}

/// The mask of `image` in `gts`: the same file name, else the same stem with an image extension.
fn find_mask(gts: &Path, image: &Path, id: &str) -> Result<PathBuf> {
    let same = gts.join(file_name(image));
    if same.is_file() {
        return Ok(same);
    }
    for ext in IMAGE_EXTENSIONS {
        for e in [ext.to_string(), ext.to_ascii_uppercase()] {
            let p = gts.join(format!("{id}.{e}"));
            if p.is_file() {
                return Ok(p);
            }
        }
    }
    Err(DataError::MissingMask {
        image: image.display().to_string(),
        expected: same.display().to_string(),
    })
}

/// What `dataset.json` says about labels and file ending.
struct NnUnetMeta {
    class_names: Option<Vec<String>>,
    file_ending: Option<String>,
}

/// Reads `dataset.json` (nnU-Net v2 `{"labels": {"background": 0, "bone": 1}}` or v1
/// `{"labels": {"0": "background", "1": "bone"}}`).
fn read_nnunet_meta(path: &Path) -> Result<NnUnetMeta> {
    let text = std::fs::read_to_string(path).map_err(|e| DataError::Io {
        path: path.display().to_string(),
        source: e,
    })?;
    let json: serde_json::Value =
        serde_json::from_str(&text).map_err(|e| layout_err(path, format!("invalid JSON ({e})")))?;
    let file_ending = json
        .get("file_ending")
        .and_then(|v| v.as_str())
        .map(str::to_string);
    let Some(labels) = json.get("labels") else {
        return Ok(NnUnetMeta {
            class_names: None,
            file_ending,
        });
    };
    let labels = labels
        .as_object()
        .ok_or_else(|| layout_err(path, "\"labels\" must be an object"))?;
    let mut by_value: BTreeMap<u64, String> = BTreeMap::new();
    for (key, value) in labels {
        let (name, label) = match (value.as_u64(), value.as_str(), key.parse::<u64>()) {
            (Some(v), _, _) => (key.clone(), v),
            (None, Some(name), Ok(v)) => (name.to_string(), v),
            _ => {
                return Err(layout_err(
                    path,
                    format!(
                        "label `{key}`: {value} is not an integer label value (region-based \
                         labels are not supported)"
                    ),
                ))
            }
        };
        if let Some(prev) = by_value.insert(label, name.clone()) {
            return Err(layout_err(
                path,
                format!("labels `{prev}` and `{name}` share the value {label}"),
            ));
        }
    }
    let n = by_value.len() as u64;
    if by_value.keys().copied().ne(0..n) {
        return Err(layout_err(
            path,
            "label values must be 0 (background), 1, 2, ... without gaps",
        ));
    }
    Ok(NnUnetMeta {
        class_names: Some(by_value.into_values().skip(1).collect()),
        file_ending,
    })
}

/// Layout B.
fn open_nnunet(root: &Path, split: &str) -> Result<Dataset> {
    let (images, labels, labels_required) = match split.to_ascii_lowercase().as_str() {
        "train" | "training" | "tr" | "imagestr" => ("imagesTr", "labelsTr", true),
        "test" | "testing" | "ts" | "imagests" => ("imagesTs", "labelsTs", false),
        other => {
            return Err(layout_err(
                root,
                format!("unknown split `{other}` for an nnU-Net data set (use Train or Test)"),
            ))
        }
    };
    let json = root.join("dataset.json");
    let meta = if json.is_file() {
        read_nnunet_meta(&json)?
    } else {
        NnUnetMeta {
            class_names: None,
            file_ending: None,
        }
    };
    if let Some(ending) = &meta.file_ending {
        let ext = ending.trim_start_matches('.');
        if !IMAGE_EXTENSIONS.iter().any(|e| e.eq_ignore_ascii_case(ext)) {
            return Err(layout_err(
                &json,
                format!("file_ending `{ending}` is not a 2-D image format this reader supports"),
            ));
        }
    }
    let image_dir = root.join(images);
    if !image_dir.is_dir() {
        return Err(layout_err(root, format!("no `{images}` folder")));
    }
    let label_dir = root.join(labels);
    let label_dir = if label_dir.is_dir() {
        Some(label_dir)
    } else if labels_required {
        return Err(layout_err(root, format!("no `{labels}` folder")));
    } else {
        None
    };
    let mut samples = Vec::new();
    for image_path in list_images(&image_dir)? {
        let stem = file_stem(&image_path);
        let Some((id, channel)) = split_channel(&stem) else {
            return Err(layout_err(
                &image_path,
                "nnU-Net image names need a channel suffix such as `_0000`",
            ));
        };
        if channel != "0000" {
            continue;
        }
        let ext = image_path
            .extension()
            .map(|e| e.to_string_lossy().into_owned())
            .unwrap_or_default();
        let mask_path = match &label_dir {
            None => None,
            Some(dir) => {
                let p = dir.join(format!("{id}.{ext}"));
                if !p.is_file() {
                    return Err(DataError::MissingMask {
                        image: image_path.display().to_string(),
                        expected: p.display().to_string(),
                    });
                }
                Some(p)
            }
        };
        samples.push(Sample {
            subject: subject_of(id),
            id: id.to_string(),
            image_path,
            mask_path,
        });
    }
    if samples.is_empty() {
        return Err(layout_err(&image_dir, "no `*_0000` images"));
    }
    Ok(Dataset {
        root: root.to_path_buf(),
        split: images.to_string(),
        layout: LayoutKind::NnUnet,
        samples,
        class_names: meta.class_names,
    })
}

/// Splits `case_0000` into (`case`, `0000`): a trailing `_` and exactly four digits.
fn split_channel(stem: &str) -> Option<(&str, &str)> {
    let (id, channel) = stem.rsplit_once('_')?;
    (channel.len() == 4 && channel.bytes().all(|b| b.is_ascii_digit()) && !id.is_empty())
        .then_some((id, channel))
}

/// Image files (by extension, no hidden files) in `dir`, sorted by name; at least one.
fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let entries = std::fs::read_dir(dir).map_err(|e| DataError::Io {
        path: dir.display().to_string(),
        source: e,
    })?;
    let mut files = Vec::new();
    for entry in entries {
        let entry = entry.map_err(|e| DataError::Io {
            path: dir.display().to_string(),
            source: e,
        })?;
        let path = entry.path();
        let hidden = entry.file_name().to_string_lossy().starts_with('.');
        let is_image = path
            .extension()
            .is_some_and(|e| IMAGE_EXTENSIONS.iter().any(|x| e.eq_ignore_ascii_case(x)));
        if !hidden && is_image && path.is_file() {
            files.push(path);
        }
    }
    if files.is_empty() {
        return Err(layout_err(dir, "no image files (png, jpg, tif, bmp)"));
    }
    files.sort();
    Ok(files)
}

/// File name as a string.
fn file_name(path: &Path) -> String {
    path.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// File stem as a string.
fn file_stem(path: &Path) -> String {
    path.file_stem()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

/// Words that mark a frame/slice/time-point suffix (longest first so `frame` wins over `f`).
const FRAME_WORDS: [&str; 8] = ["frame", "slice", "time", "frm", "fr", "sl", "f", "t"];

/// The subject of a case id: the id with a trailing frame suffix removed. A frame suffix is a
/// separator (`_`, `-`, `.` or space), a frame word (`frame`, `frm`, `fr`, `f`, `slice`, `sl`,
/// `time`, `t`; any case), an optional `_`/`-`, then digits, at the end of the id:
/// `subj01_frame003`, `subj01-f12`, `subj01_slice_7` and `subj01.t5` all give `subj01`.
/// Bare numbers are not frame suffixes (`case_0000` is its own subject), nor is anything else.
pub fn subject_of(id: &str) -> String {
    let digits = id.len() - id.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    if digits == 0 {
        return id.to_string();
    }
    let mut head = &id[..id.len() - digits];
    head = head.strip_suffix(['_', '-']).unwrap_or(head);
    let lower = head.to_ascii_lowercase();
    for word in FRAME_WORDS {
        if let Some(rest) = lower.strip_suffix(word) {
            if rest.ends_with(['_', '-', '.', ' ']) && rest.len() > 1 {
                return id[..rest.len() - 1].to_string();
            }
        }
    }
    id.to_string()
}

/// Loads a sample: the image as RGB (via `sam2rad_models::preprocess::load_rgb`) and its mask
/// as labels `0..=num_classes`. A 0/255 (or 0/65535) binary mask maps to 0/1. Errors name the
/// file: unreadable image or mask, missing mask, mask size differing from the image size
/// (both files and sizes), or a label value above `num_classes`.
pub fn load_sample(sample: &Sample, num_classes: usize) -> Result<LoadedSample> {
    if !(1..=255).contains(&num_classes) {
        return Err(DataError::Config(format!(
            "num_classes must be within 1..=255, not {num_classes}"
        )));
    }
    let image_name = sample.image_path.display().to_string();
    let img = sam2rad_models::preprocess::load_rgb(&sample.image_path).map_err(|e| {
        let reason = match e {
            sam2rad_models::error::ModelError::Io { source, .. } => source.to_string(),
            other => other.to_string(),
        };
        DataError::Image {
            path: image_name.clone(),
            reason,
        }
    })?;
    let mask_path = sample
        .mask_path
        .as_ref()
        .ok_or_else(|| DataError::MissingMask {
            image: image_name.clone(),
            expected: "a mask (this split has no mask folder)".into(),
        })?;
    let raw = read_mask(mask_path)?;
    if (raw.width, raw.height) != (img.width, img.height) {
        return Err(DataError::SizeMismatch {
            image: image_name,
            mask: mask_path.display().to_string(),
            image_width: img.width,
            image_height: img.height,
            mask_width: raw.width,
            mask_height: raw.height,
        });
    }
    let max = raw.values.iter().copied().max().unwrap_or(0) as usize;
    let mask = if max <= num_classes {
        raw.values.iter().map(|&v| v as u8).collect()
    } else if (max == 255 || max == 65535)
        && raw.values.iter().all(|&v| v == 0 || v as usize == max)
    {
        raw.values.iter().map(|&v| u8::from(v != 0)).collect()
    } else {
        return Err(DataError::UnknownLabel {
            path: mask_path.display().to_string(),
            value: max as u32,
            num_classes,
        });
    };
    Ok(LoadedSample {
        rgb: img.data,
        h: img.height,
        w: img.width,
        mask,
    })
}

/// Splits samples into (train, validation) by subject: subjects are shuffled with `seed` and
/// `round(val_fraction * subjects)` of them go to validation (at least one, and at least one
/// left for training, when there are two or more subjects and `0 < val_fraction < 1`). Both
/// lists keep the input order; a subject is never split.
pub fn split_by_subject(
    samples: &[Sample],
    val_fraction: f64,
    seed: u64,
) -> (Vec<Sample>, Vec<Sample>) {
    let mut subjects: Vec<&str> = samples.iter().map(|s| s.subject.as_str()).collect();
    subjects.sort_unstable();
    subjects.dedup();
    let n = subjects.len();
    let frac = if val_fraction.is_nan() {
        0.0
    } else {
        val_fraction.clamp(0.0, 1.0)
    };
    let mut n_val = (frac * n as f64).round() as usize;
    if frac > 0.0 && frac < 1.0 && n >= 2 {
        n_val = n_val.clamp(1, n - 1);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    subjects.shuffle(&mut rng);
    let val: std::collections::HashSet<&str> = subjects[..n_val].iter().copied().collect();
    samples
        .iter()
        .cloned()
        .partition(|s| !val.contains(s.subject.as_str()))
}

/// Picks `n` samples deterministically (by `seed`), keeping their order; all if `n >= len`.
pub fn limit(samples: &[Sample], n: usize, seed: u64) -> Vec<Sample> {
    if n >= samples.len() {
        return samples.to_vec();
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut picked = rand::seq::index::sample(&mut rng, samples.len(), n).into_vec();
    picked.sort_unstable();
    picked.into_iter().map(|i| samples[i].clone()).collect()
}
