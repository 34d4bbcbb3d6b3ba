//! Sam2Rad inference on one image in the three modes of SPEC §2.5 (autonomous, semi-autonomous,
//! manual) and their box variants, with objectness gating and the multi-class label decision.

use std::str::FromStr;

use anyhow::{bail, Context, Result};
use candle_core::{DType, Tensor};
use sam2rad_models::postprocess::{apply_boxes, apply_coords, postprocess_masks};
use sam2rad_models::preprocess::Preprocessed;

use crate::features::{extract, Rows};
use crate::model::{Phase, RowPrompts, Sam2Rad};

/// The logit of an empty class (SAM 2's "no object" score): used for classes whose objectness
/// logit is negative and for classes that get no prompt in manual mode.
pub const EMPTY_LOGIT: f32 = -1024.0;

/// Which prompts drive the decoder.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Autonomous: the learned prompts only.
    Auto,
    /// Semi-autonomous: learned prompts plus the user's points, box and/or mask (a user mask
    /// replaces the learned dense prompt).
    Semi,
    /// Manual: the user's prompts only, exactly like SAM.
    Manual,
    /// Manual with one box (e.g. the ground-truth box in evaluation).
    Box,
    /// Learned prompts plus one box.
    AutoBox,
}

impl Mode {
    /// Whether the PPN's learned prompts are used.
    pub fn learned(self) -> bool {
        matches!(self, Mode::Auto | Mode::Semi | Mode::AutoBox)
    }

    /// The name used on the command line and in reports.
    pub fn name(self) -> &'static str {
        match self {
            Mode::Auto => "auto",
            Mode::Semi => "semi",
            Mode::Manual => "manual",
            Mode::Box => "box",
            Mode::AutoBox => "auto+box",
        }
    }
}

impl FromStr for Mode {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "auto" => Ok(Mode::Auto),
            "semi" => Ok(Mode::Semi),
            "manual" => Ok(Mode::Manual),
            "box" => Ok(Mode::Box),
            "auto+box" | "autobox" | "auto-box" => Ok(Mode::AutoBox),
            _ => Err(format!(
                "mode `{s}`: expected auto, semi, manual, box or auto+box"
            )),
        }
    }
}

/// User prompts for one image, in original pixels.
#[derive(Debug, Clone, Default)]
pub struct UserPrompts {
    /// Clicks `(x, y, label)`, label 1 positive, 0 negative.
    pub points: Vec<(f32, f32, i64)>,
    /// One xyxy box.
    pub boxes: Option<[f32; 4]>,
    /// Mask-prompt logits `[1, 1, 4h, 4w]` in the padded input frame (e.g. a previous
    /// prediction's low-resolution logits, or a brushed mask mapped into that frame).
    pub mask: Option<Tensor>,
}

impl UserPrompts {
    /// True when there is no point, box or mask.
    pub fn is_empty(&self) -> bool {
        self.points.is_empty() && self.boxes.is_none() && self.mask.is_none()
    }

    /// True when a prompt says the object is there: a positive click, a box or a mask.
    fn asserts_object(&self) -> bool {
        self.boxes.is_some() || self.mask.is_some() || self.points.iter().any(|p| p.2 == 1)
    }

    /// The prompts `mode` reads: none in auto mode, the box only in the box modes.
    fn for_mode(&self, mode: Mode) -> UserPrompts {
        match mode {
            Mode::Auto => UserPrompts::default(),
            Mode::Box | Mode::AutoBox => UserPrompts {
                boxes: self.boxes,
                ..UserPrompts::default()
            },
            Mode::Semi | Mode::Manual => self.clone(),
        }
    }
}

/// The prediction for one image with C classes.
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Label per pixel at original size, row-major: 0 background, `c + 1` for class c.
    pub labels: Vec<u8>,
    /// Original height.
    pub height: usize,
    /// Original width.
    pub width: usize,
    /// Class logits at original size `[C, H, W]` ([`EMPTY_LOGIT`] for gated or unprompted classes).
    pub class_logits: Tensor,
    /// Low-resolution logits `[C, 1, 4h, 4w]` in the padded frame (gated like `class_logits`).
    pub low_res_logits: Tensor,
    /// Objectness logits `[C]` (< 0: the class is absent; [`EMPTY_LOGIT`] when unprompted).
    pub object_logits: Tensor,
    /// The PPN's box per class in original pixels (None where the learned prompts were off).
    pub boxes: Vec<Option<[f32; 4]>>,
}

impl Prediction {
    /// Number of classes C.
    pub fn num_classes(&self) -> usize {
        self.boxes.len()
    }

    /// The binary mask of label `label` (1..=C) in the label map.
    pub fn class_mask(&self, label: u8) -> Vec<bool> {
        self.labels.iter().map(|&l| l == label).collect()
    }
}

/// Preprocesses an RGB image (`h × w × 3` bytes) and predicts it; `prompts` apply to every class.
pub fn predict_image(
    model: &Sam2Rad,
    rgb: &[u8],
    h: usize,
    w: usize,
    mode: Mode,
    prompts: &UserPrompts,
) -> Result<Prediction> {
    let pre = crate::input::preprocess(&model.config().base, rgb, h, w, &model_device(model)?)?;
    predict_preprocessed(model, &pre, mode, prompts)
}

/// Predicts a preprocessed image ([`crate::input::preprocess`]); `prompts` apply to every class.
///
/// Fails when the prompts do not fit the mode: auto takes none, manual needs at least one, the
/// box modes need a box and take nothing else.
pub fn predict_preprocessed(
    model: &Sam2Rad,
    pre: &Preprocessed,
    mode: Mode,
    prompts: &UserPrompts,
) -> Result<Prediction> {
    match mode {
        Mode::Auto if !prompts.is_empty() => {
            bail!("autonomous mode takes no user prompts (use semi-autonomous mode)")
        }
        Mode::Manual if prompts.is_empty() => {
            bail!("manual mode needs at least one prompt (a point, a box or a mask)")
        }
        Mode::Box | Mode::AutoBox
            if prompts.boxes.is_none() || !prompts.points.is_empty() || prompts.mask.is_some() =>
        {
            bail!(
                "{} mode takes exactly one box and no other prompt",
                mode.name()
            )
        }
        _ => {}
    }
    let c = model.config().num_classes;
    predict_classes(model, pre, mode, &vec![prompts.clone(); c])
}

/// Predicts with prompts per class (`per_class[c]` for class c; an empty entry means "no user
/// prompt": learned prompts only, or an empty class where the mode has no learned prompts).
pub(crate) fn predict_classes(
    model: &Sam2Rad,
    pre: &Preprocessed,
    mode: Mode,
    per_class: &[UserPrompts],
) -> Result<Prediction> {
    let cfg = model.config();
    let c = cfg.num_classes;
    if c > u8::MAX as usize {
        bail!("{c} classes do not fit an 8-bit label map");
    }
    if per_class.len() != c {
        bail!("{} class prompt sets for {c} classes", per_class.len());
    }
    let s = cfg.base.image_size;
    let low = 4 * cfg.base.embedding_size();
    let (oh, ow) = pre.original_size;
    let (ih, iw) = pre.input_size;
    let dev = &model_device(model)?;
    let feats = extract(model.base(), &pre.input)?;
    let prompts: Vec<UserPrompts> = per_class.iter().map(|p| p.for_mode(mode)).collect();

    // Rows with the same prompt layout run together (RowPrompts holds one tensor per kind).
    let mut groups: Vec<((bool, usize, bool), Vec<usize>)> = Vec::new();
    for (class, p) in prompts.iter().enumerate() {
        if !mode.learned() && p.is_empty() {
            continue;
        }
        let key = (p.boxes.is_some(), p.points.len(), p.mask.is_some());
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, members)) => members.push(class),
            None => groups.push((key, vec![class])),
        }
    }

    let empty_low = Tensor::full(EMPTY_LOGIT, (1, 1, low, low), dev)?;
    let mut low_res: Vec<Tensor> = vec![empty_low; c];
    let mut object = vec![EMPTY_LOGIT; c];
    let mut boxes: Vec<Option<[f32; 4]>> = vec![None; c];
    for ((has_box, n_points, has_mask), classes) in &groups {
        let r = classes.len();
        let members: Vec<&UserPrompts> = classes.iter().map(|&k| &prompts[k]).collect();
        let row_prompts = RowPrompts {
            learned: mode.learned(),
            boxes: if *has_box {
                let b: Vec<[f32; 4]> = members.iter().filter_map(|p| p.boxes).collect();
                let mapped: Vec<f32> = apply_boxes(&b, pre.original_size, pre.input_size)
                    .into_iter()
                    .flatten()
                    .collect();
                Some(Tensor::from_vec(mapped, (r, 4), dev)?)
            } else {
                None
            },
            points: if *n_points > 0 {
                let xy: Vec<[f32; 2]> = members
                    .iter()
                    .flat_map(|p| p.points.iter().map(|&(x, y, _)| [x, y]))
                    .collect();
                let coords: Vec<f32> = apply_coords(&xy, pre.original_size, pre.input_size)
                    .into_iter()
                    .flatten()
                    .collect();
                let labels: Vec<i64> = members
                    .iter()
                    .flat_map(|p| p.points.iter().map(|pt| pt.2))
                    .collect();
                Some((
                    Tensor::from_vec(coords, (r, *n_points, 2), dev)?,
                    Tensor::from_vec(labels, (r, *n_points), dev)?,
                ))
            } else {
                None
            },
            mask: if *has_mask {
                let masks = members
                    .iter()
                    .filter_map(|p| p.mask.as_ref())
                    .map(|m| mask_prompt(m, low))
                    .collect::<Result<Vec<_>>>()?;
                Some(Tensor::cat(&masks, 0)?)
            } else {
                None
            },
        };
        let rows = Rows::new(vec![0; r], classes.clone())?;
        let out = model.forward(&feats, &rows, &row_prompts, Phase::Eval)?;
        let obj: Vec<f32> = out.object_logits.to_dtype(DType::F32)?.to_vec1()?;
        let pred_boxes: Option<Vec<Vec<f32>>> = out
            .boxes
            .as_ref()
            .map(|b| b.to_dtype(DType::F32)?.to_vec2())
            .transpose()?;
        for (i, &class) in classes.iter().enumerate() {
            object[class] = obj[i];
            // Objectness gating: a negative logit means "no such object" (SPEC §2.4). In
            // semi-autonomous mode a positive click, a box or a mask from the user overrules the
            // learned abstention (manual mode keeps SAM 2's official gating).
            let asserted = mode == Mode::Semi && prompts[class].asserts_object();
            if obj[i] >= 0.0 || asserted {
                low_res[class] = out.mask_logits.narrow(0, i, 1)?;
            }
            boxes[class] = pred_boxes.as_ref().map(|b| {
                // Normalised xyxy in the padded frame → original pixels.
                let (sx, sy) = (
                    s as f32 * ow as f32 / iw as f32,
                    s as f32 * oh as f32 / ih as f32,
                );
                [b[i][0] * sx, b[i][1] * sy, b[i][2] * sx, b[i][3] * sy]
            });
        }
    }
    let low_res_logits = Tensor::cat(&low_res, 0)?.to_dtype(DType::F32)?;
    let class_logits = postprocess_masks(&low_res_logits, pre.input_size, pre.original_size, s)?
        .squeeze(1)?
        .contiguous()?;
    let labels = label_map(&class_logits.flatten_all()?.to_vec1::<f32>()?, c, oh * ow);
    Ok(Prediction {
        labels,
        height: oh,
        width: ow,
        class_logits,
        low_res_logits,
        object_logits: Tensor::from_vec(object, c, dev)?,
        boxes,
    })
}

/// The device of the model's parameters.
pub(crate) fn model_device(model: &Sam2Rad) -> Result<candle_core::Device> {
    Ok(model
        .base()
        .prompt_encoder()
        .get_dense_pe()?
        .device()
        .clone())
}

/// A user mask prompt as `[1, 1, low, low]` f32 logits.
fn mask_prompt(m: &Tensor, low: usize) -> Result<Tensor> {
    if m.elem_count() != low * low {
        bail!(
            "mask prompt has shape {:?}, expected [1, 1, {low}, {low}] logits",
            m.dims()
        );
    }
    m.reshape((1, 1, low, low))?
        .to_dtype(DType::F32)
        .context("mask prompt")
}

/// Per pixel: `c + 1` for the class with the largest logit when that logit is > 0, else 0.
fn label_map(logits: &[f32], classes: usize, pixels: usize) -> Vec<u8> {
    (0..pixels)
        .map(|i| {
            let mut best = 0u8;
            let mut best_v = 0f32;
            for c in 0..classes {
                let v = logits[c * pixels + i];
                if v > best_v {
                    best_v = v;
                    best = (c + 1) as u8;
                }
            }
            best
        })
        .collect()
}

/// A colour per class label (1-based), cycling after six.
pub fn class_colour(label: u8) -> [u8; 3] {
    const PALETTE: [[u8; 3]; 6] = [
        [230, 40, 40],
        [40, 200, 60],
        [50, 110, 240],
        [240, 210, 30],
        [210, 60, 210],
        [40, 210, 220],
    ];
    PALETTE[(label.max(1) as usize - 1) % PALETTE.len()]
}

/// The RGB image (`h × w × 3`) with every labelled pixel blended half-way to its class colour.
pub fn overlay_labels(rgb: &[u8], labels: &[u8], h: usize, w: usize) -> image::RgbImage {
    let mut out = image::RgbImage::new(w as u32, h as u32);
    for (i, p) in out.pixels_mut().enumerate().take(h * w) {
        let px = [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
        p.0 = match labels[i] {
            0 => px,
            l => {
                let col = class_colour(l);
                [0, 1, 2].map(|k| ((px[k] as u16 + col[k] as u16) / 2) as u8)
            }
        };
    }
    out
}
