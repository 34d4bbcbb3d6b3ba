//! Losses (stable BCE-with-logits, sigmoid focal, soft Dice, L1, GIoU) built from differentiable ops.
//!
//! Every loss is finite (values and gradients) for any finite logits, including ±1e4, and for empty
//! batches; elementwise losses keep the input shape so callers choose the reduction.

use candle_core::{Result, Tensor, D};

use crate::ops;

/// Smallest denominator `soft_dice_loss` divides by (only reached when `smooth` is ~0 and both
/// prediction and target are empty); its square stays a normal f32 so the backward stays finite.
const DICE_MIN_DENOM: f64 = 1e-6;

/// Lower clamp of `1 − p_t` before raising it to a power `γ < 1`, whose derivative is infinite at 0.
const FOCAL_MIN_BASE: f64 = 1e-30;

/// Epsilon of the GIoU denominators (torchvision's `generalized_box_iou_loss` uses 1e-7).
const GIOU_EPS: f64 = 1e-7;

/// Numerically stable elementwise `softplus(x) = log(1 + exp(x))` = `relu(x) + log(1 + exp(−|x|))`.
fn softplus(x: &Tensor) -> Result<Tensor> {
    x.relu()?.add(&(x.abs()?.neg()?.exp()? + 1.0)?.log()?)
}

/// Elementwise BCE with logits, `relu(x) − x·y + log(1 + exp(−|x|))` (PyTorch semantics).
pub fn bce_with_logits(logits: &Tensor, targets: &Tensor) -> Result<Tensor> {
    softplus(logits)?.sub(&logits.mul(targets)?)
}

/// Mean of all elements, or a zero scalar when the tensor is empty (instead of 0/0 = NaN).
pub fn mean_or_zero(x: &Tensor) -> Result<Tensor> {
    let n = x.elem_count();
    if n == 0 {
        Tensor::zeros((), x.dtype(), x.device())
    } else {
        x.sum_all()?.affine(1.0 / n as f64, 0.0)
    }
}

/// Elementwise sigmoid focal loss `α_t·ce·(1 − p_t)^γ` (torchvision semantics; `alpha < 0` disables α).
pub fn sigmoid_focal_loss(
    logits: &Tensor,
    targets: &Tensor,
    gamma: f64,
    alpha: f64,
) -> Result<Tensor> {
    let ce = bce_with_logits(logits, targets)?;
    let mut loss = if gamma == 0.0 {
        ce
    } else {
        // 1 − p_t = y·(1 − σ(x)) + (1 − y)·σ(x) = y·σ(−x) + (1 − y)·σ(x): no cancellation.
        let p = ops::sigmoid(logits)?;
        let q = ops::sigmoid(&logits.neg()?)?;
        let one_minus_pt = targets.mul(&q)?.add(&targets.affine(-1.0, 1.0)?.mul(&p)?)?;
        let base = if gamma < 1.0 {
            one_minus_pt.maximum(FOCAL_MIN_BASE)?
        } else {
            one_minus_pt
        };
        ce.mul(&base.powf(gamma)?)?
    };
    if alpha >= 0.0 {
        // α_t = α·y + (1 − α)·(1 − y) = (2α − 1)·y + (1 − α)
        loss = loss.mul(&targets.affine(2.0 * alpha - 1.0, 1.0 - alpha)?)?;
    }
    Ok(loss)
}

/// Soft Dice loss per instance over all non-batch dims, `1 − (2Σpy + s)/(Σp + Σy + s)`, shape [B].
pub fn soft_dice_loss(logits: &Tensor, targets: &Tensor, smooth: f64) -> Result<Tensor> {
    let p = ops::sigmoid(logits)?.flatten_from(1)?;
    let y = targets.flatten_from(1)?;
    let inter = p.mul(&y)?.sum(1)?;
    let num = inter.affine(2.0, smooth)?;
    let den = (p.sum(1)? + y.sum(1)?)?
        .affine(1.0, smooth)?
        .maximum(DICE_MIN_DENOM)?;
    num.div(&den)?.affine(-1.0, 1.0)
}

/// Elementwise L1 loss `|a − b|`.
pub fn l1_loss(a: &Tensor, b: &Tensor) -> Result<Tensor> {
    a.sub(b)?.abs()
}

/// Splits `[..., 4]` xyxy boxes into their four coordinates, each `[...]`.
fn coords(boxes: &Tensor) -> Result<[Tensor; 4]> {
    let c = |i| boxes.narrow(D::Minus1, i, 1)?.squeeze(D::Minus1);
    Ok([c(0)?, c(1)?, c(2)?, c(3)?])
}

/// Generalized-IoU loss `1 − GIoU` of xyxy boxes `[B, 4]` → `[B]` (degenerate boxes count as empty).
pub fn giou_loss(pred_xyxy: &Tensor, target_xyxy: &Tensor) -> Result<Tensor> {
    let [px1, py1, px2, py2] = coords(pred_xyxy)?;
    let [tx1, ty1, tx2, ty2] = coords(target_xyxy)?;
    let area = |x1: &Tensor, y1: &Tensor, x2: &Tensor, y2: &Tensor| -> Result<Tensor> {
        x2.sub(x1)?.relu()?.mul(&y2.sub(y1)?.relu()?)
    };
    let area_p = area(&px1, &py1, &px2, &py2)?;
    let area_t = area(&tx1, &ty1, &tx2, &ty2)?;
    let inter = area(
        &px1.maximum(&tx1)?,
        &py1.maximum(&ty1)?,
        &px2.minimum(&tx2)?,
        &py2.minimum(&ty2)?,
    )?;
    let union = (area_p + area_t)?.sub(&inter)?;
    let iou = inter.div(&union.affine(1.0, GIOU_EPS)?)?;
    let enclosing = area(
        &px1.minimum(&tx1)?,
        &py1.minimum(&ty1)?,
        &px2.maximum(&tx2)?,
        &py2.maximum(&ty2)?,
    )?;
    let penalty = enclosing
        .sub(&union)?
        .div(&enclosing.affine(1.0, GIOU_EPS)?)?;
    // 1 − GIoU = 1 − iou + penalty
    iou.affine(-1.0, 1.0)?.add(&penalty)
}
