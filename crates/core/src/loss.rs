//! The Sam2Rad training loss (SPEC §3, paper eq. 1): `L = 10·L_mask + 1·L_box + 1·L_obj`.
//!
//! Exactly what is computed, for R rows with targets in the padded input frame (S×S):
//! - Rows with foreground F ⊆ R carry the mask and box terms; L_obj uses every row.
//! - `seg(logits)`: logits bilinear-upsampled to S×S (`align_corners=False`); `focal` = mean over
//!   F·S² pixels of the sigmoid focal loss (torchvision semantics: α weights positives, 1 − α
//!   negatives; γ = 3, α = 0.7); `dice` = mean over F of the soft Dice loss (smooth 1). With Dice
//!   on (default): `seg = (dice + 10·focal) / 2`; off: `seg = focal`.
//! - `L_mask = seg(final mask logits) + seg(PPN mask-prompt logits)` (the latter 0 in manual mode).
//! - `L_box = mean over F of (mean_4 |b − b*| + (1 − GIoU(b, b*)))` on normalised xyxy boxes; the
//!   target b* is the mask's pixel extent `(x_min, y_min, x_max + 1, y_max + 1) / S`.
//! - `L_obj = mean over R of BCE-with-logits(objectness, row has foreground)`.
//!
//! With no foreground row the mask and box terms are exact zeros (no 0/0).

use candle_core::{DType, Result, Tensor, D};
use sam2rad_nn::loss::{
    bce_with_logits, giou_loss, l1_loss, mean_or_zero, sigmoid_focal_loss, soft_dice_loss,
};
use sam2rad_nn::ops;

use crate::features::index_tensor;
use crate::model::Sam2RadOutput;

/// Weights and hyper-parameters of the loss (defaults: SPEC §3).
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct LossConfig {
    /// λ1, weight of L_mask (10).
    pub mask_weight: f64,
    /// λ2, weight of L_box (1).
    pub box_weight: f64,
    /// λ3, weight of L_obj (1).
    pub obj_weight: f64,
    /// Focal γ (3).
    pub focal_gamma: f64,
    /// Focal α (0.7; negative disables the α weighting).
    pub focal_alpha: f64,
    /// Add soft Dice: `seg = (dice + dice_focal_weight·focal) / 2` (on).
    pub dice: bool,
    /// Weight of the focal term inside the Dice combination (10).
    pub dice_focal_weight: f64,
    /// Smoothing of the soft Dice (1).
    pub dice_smooth: f64,
}

impl Default for LossConfig {
    fn default() -> Self {
        Self {
            mask_weight: 10.0,
            box_weight: 1.0,
            obj_weight: 1.0,
            focal_gamma: 3.0,
            focal_alpha: 0.7,
            dice: true,
            dice_focal_weight: 10.0,
            dice_smooth: 1.0,
        }
    }
}

/// The loss and its unweighted parts (scalar tensors), for the backward pass and for logging.
#[derive(Debug, Clone)]
pub struct LossParts {
    /// `mask_weight·mask + box_weight·boxes + obj_weight·obj`.
    pub total: Tensor,
    /// L_mask = `mask_final + mask_prompt`.
    pub mask: Tensor,
    /// `seg` of the final mask.
    pub mask_final: Tensor,
    /// `seg` of the PPN mask prompt (0 without learned prompts).
    pub mask_prompt: Tensor,
    /// L_box (0 without learned prompts).
    pub boxes: Tensor,
    /// L_obj.
    pub obj: Tensor,
    /// Number of rows with foreground.
    pub num_foreground: usize,
}

/// Inclusive pixel bounding box `[x_min, y_min, x_max, y_max]` of every row's mask (> 0.5), or
/// None for an empty mask. `masks` is `[R, H, W]` or `[R, 1, H, W]` (any dtype).
pub fn bbox_of_mask(masks: &Tensor) -> Result<Vec<Option<[f32; 4]>>> {
    let dims = masks.dims();
    if dims.len() < 3 {
        candle_core::bail!("bbox_of_mask: expected [R, H, W] or [R, 1, H, W], got {dims:?}")
    }
    let (h, w) = (dims[dims.len() - 2], dims[dims.len() - 1]);
    let r = dims[0];
    if r * h * w != masks.elem_count() {
        candle_core::bail!("bbox_of_mask: expected one mask per row, got {dims:?}")
    }
    let on: Vec<u8> = masks
        .to_dtype(DType::F32)?
        .gt(0.5)?
        .flatten_all()?
        .to_vec1()?;
    Ok(on
        .chunks(h * w)
        .map(|m| {
            let mut b: Option<[usize; 4]> = None;
            for (i, &v) in m.iter().enumerate() {
                if v == 0 {
                    continue;
                }
                let (y, x) = (i / w, i % w);
                b = Some(match b {
                    None => [x, y, x, y],
                    Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
                });
            }
            b.map(|[x0, y0, x1, y1]| [x0 as f32, y0 as f32, x1 as f32, y1 as f32])
        })
        .collect())
}

/// `seg(logits)` against `targets` (both F rows; logits resized to the targets' size).
fn seg_loss(logits: &Tensor, targets: &Tensor, cfg: &LossConfig) -> Result<Tensor> {
    let (_, _, h, w) = targets.dims4()?;
    let (_, _, lh, lw) = logits.dims4()?;
    let up = if (lh, lw) == (h, w) {
        logits.clone()
    } else {
        ops::resize_bilinear(logits, h, w)?
    };
    let focal = mean_or_zero(&sigmoid_focal_loss(
        &up,
        targets,
        cfg.focal_gamma,
        cfg.focal_alpha,
    )?)?;
    if !cfg.dice {
        return Ok(focal);
    }
    let dice = mean_or_zero(&soft_dice_loss(&up, targets, cfg.dice_smooth)?)?;
    (dice + focal.affine(cfg.dice_focal_weight, 0.0)?)?.affine(0.5, 0.0)
}

/// The Sam2Rad loss of `out` against binary `targets` `[R, 1, S, S]` (or `[R, S, S]`) in the
/// padded input frame; see the module documentation for the exact terms.
pub fn sam2rad_loss(out: &Sam2RadOutput, targets: &Tensor, cfg: &LossConfig) -> Result<LossParts> {
    let r = out.mask_logits.dim(0)?;
    let targets = match targets.rank() {
        3 => targets.unsqueeze(1)?,
        _ => targets.clone(),
    };
    let (tr, tc, s_h, s_w) = targets.dims4()?;
    if tr != r || tc != 1 {
        candle_core::bail!(
            "loss: targets have shape {:?}, expected [{r}, 1, S, S]",
            targets.dims()
        )
    }
    let targets = targets.to_dtype(out.mask_logits.dtype())?;
    let boxes = bbox_of_mask(&targets)?;
    let dev = out.mask_logits.device();
    let dt = out.mask_logits.dtype();
    let fg: Vec<usize> = (0..r).filter(|&i| boxes[i].is_some()).collect();
    let zero = Tensor::zeros((), dt, dev)?;

    let present: Vec<f32> = boxes.iter().map(|b| f32::from(b.is_some() as u8)).collect();
    let present = Tensor::from_vec(present, r, dev)?.to_dtype(dt)?;
    let obj = mean_or_zero(&bce_with_logits(&out.object_logits, &present)?)?;

    let (mask_final, mask_prompt, box_loss) = if fg.is_empty() {
        (zero.clone(), zero.clone(), zero.clone())
    } else {
        let idx = index_tensor(&fg, dev)?;
        // Foreground rows only (no copy when every row has foreground).
        let pick = |t: &Tensor| -> Result<Tensor> {
            if fg.len() == r {
                Ok(t.clone())
            } else {
                t.contiguous()?.index_select(&idx, 0)
            }
        };
        let t = pick(&targets)?;
        let mask_final = seg_loss(&pick(&out.mask_logits)?, &t, cfg)?;
        let mask_prompt = match &out.mask_prompt_logits {
            Some(m) => seg_loss(&pick(m)?, &t, cfg)?,
            None => zero.clone(),
        };
        let box_loss = match &out.boxes {
            Some(b) => {
                let (sw, sh) = (s_w as f32, s_h as f32);
                let tgt: Vec<f32> = fg
                    .iter()
                    .filter_map(|&i| boxes[i])
                    .flat_map(|[x0, y0, x1, y1]| {
                        [x0 / sw, y0 / sh, (x1 + 1.0) / sw, (y1 + 1.0) / sh]
                    })
                    .collect();
                let tgt = Tensor::from_vec(tgt, (fg.len(), 4), dev)?.to_dtype(dt)?;
                let pred = pick(b)?;
                let l1 = l1_loss(&pred, &tgt)?.mean(D::Minus1)?;
                mean_or_zero(&(l1 + giou_loss(&pred, &tgt)?)?)?
            }
            None => zero.clone(),
        };
        (mask_final, mask_prompt, box_loss)
    };
    let mask = (&mask_final + &mask_prompt)?;
    let total = (mask.affine(cfg.mask_weight, 0.0)?
        + box_loss.affine(cfg.box_weight, 0.0)?
        + obj.affine(cfg.obj_weight, 0.0)?)?;
    Ok(LossParts {
        total,
        mask,
        mask_final,
        mask_prompt,
        boxes: box_loss,
        obj,
        num_foreground: fg.len(),
    })
}
