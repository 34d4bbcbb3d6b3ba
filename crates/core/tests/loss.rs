//! The Sam2Rad loss against values computed by hand (in f64, from the formulas in the module
//! docs), its behaviour on empty and extreme batches, and `bbox_of_mask`.

mod common;

use candle_core::{Device, Tensor};
use common::{rect_targets, Res};
use sam2rad_core::{bbox_of_mask, sam2rad_loss, LossConfig, Sam2RadOutput};

const DEV: Device = Device::Cpu;

fn sigmoid(x: f64) -> f64 {
    1.0 / (1.0 + (-x).exp())
}

/// Paper eq. 2 with torchvision's α convention: α on positives, 1 − α on negatives.
fn focal(x: f64, y: f64, gamma: f64, alpha: f64) -> f64 {
    let p = sigmoid(x);
    if y > 0.5 {
        -alpha * (1.0 - p).powf(gamma) * p.ln()
    } else {
        -(1.0 - alpha) * p.powf(gamma) * (1.0 - p).ln()
    }
}

fn dice(xs: &[f64], ys: &[f64]) -> f64 {
    let p: Vec<f64> = xs.iter().map(|&x| sigmoid(x)).collect();
    let inter: f64 = p.iter().zip(ys).map(|(p, y)| p * y).sum();
    1.0 - (2.0 * inter + 1.0) / (p.iter().sum::<f64>() + ys.iter().sum::<f64>() + 1.0)
}

fn bce(x: f64, y: f64) -> f64 {
    -(y * sigmoid(x).ln() + (1.0 - y) * (1.0 - sigmoid(x)).ln())
}

/// 1 − GIoU of two xyxy boxes.
fn giou_loss(a: [f64; 4], b: [f64; 4]) -> f64 {
    let area = |r: [f64; 4]| (r[2] - r[0]).max(0.0) * (r[3] - r[1]).max(0.0);
    let inter = area([
        a[0].max(b[0]),
        a[1].max(b[1]),
        a[2].min(b[2]),
        a[3].min(b[3]),
    ]);
    let union = area(a) + area(b) - inter;
    let hull = area([
        a[0].min(b[0]),
        a[1].min(b[1]),
        a[2].max(b[2]),
        a[3].max(b[3]),
    ]);
    1.0 - inter / union + (hull - union) / hull
}

fn scalar(t: &Tensor) -> Res<f64> {
    Ok(t.to_scalar::<f32>()? as f64)
}

fn close(what: &str, got: f64, want: f64) {
    assert!(
        (got - want).abs() <= 1e-5 * want.abs().max(1.0),
        "{what}: got {got}, expected {want}"
    );
}

/// Two rows in a 2×2 frame: row 0 has foreground at pixel (x 0, y 0), row 1 is empty.
fn tiny_output() -> Res<(Sam2RadOutput, Tensor)> {
    let out = Sam2RadOutput {
        mask_logits: Tensor::new(
            &[[[[2.0f32, -1.0], [0.5, -3.0]]], [[[1.0, 1.0], [1.0, 1.0]]]],
            &DEV,
        )?,
        iou: Tensor::new(&[0.9f32, 0.1], &DEV)?,
        object_logits: Tensor::new(&[0.5f32, -1.0], &DEV)?,
        mask_prompt_logits: Some(Tensor::new(
            &[[[[-0.5f32, 0.25], [1.5, -2.0]]], [[[0.0, 0.0], [0.0, 0.0]]]],
            &DEV,
        )?),
        boxes: Some(Tensor::new(
            &[[0.0f32, 0.0, 0.4, 0.6], [0.2, 0.2, 0.9, 0.9]],
            &DEV,
        )?),
    };
    let targets = rect_targets(2, &[Some([0, 0, 1, 1]), None])?;
    Ok((out, targets))
}

#[test]
fn parts_match_hand_computed_values() -> Res<()> {
    let (out, targets) = tiny_output()?;
    let ys = [1.0, 0.0, 0.0, 0.0];
    let final_x = [2.0, -1.0, 0.5, -3.0];
    let prompt_x = [-0.5, 0.25, 1.5, -2.0];
    let focal_mean = |xs: &[f64]| {
        xs.iter()
            .zip(&ys)
            .map(|(&x, &y)| focal(x, y, 3.0, 0.7))
            .sum::<f64>()
            / 4.0
    };
    let seg = |xs: &[f64]| (dice(xs, &ys) + 10.0 * focal_mean(xs)) / 2.0;
    let boxes =
        (0.0 + 0.0 + 0.1 + 0.1) / 4.0 + giou_loss([0.0, 0.0, 0.4, 0.6], [0.0, 0.0, 0.5, 0.5]);
    let obj = (bce(0.5, 1.0) + bce(-1.0, 0.0)) / 2.0;

    let cfg = LossConfig::default();
    let p = sam2rad_loss(&out, &targets, &cfg)?;
    assert_eq!(p.num_foreground, 1);
    close("mask_final", scalar(&p.mask_final)?, seg(&final_x));
    close("mask_prompt", scalar(&p.mask_prompt)?, seg(&prompt_x));
    close("mask", scalar(&p.mask)?, seg(&final_x) + seg(&prompt_x));
    close("boxes", scalar(&p.boxes)?, boxes);
    close("obj", scalar(&p.obj)?, obj);
    let total = 10.0 * (seg(&final_x) + seg(&prompt_x)) + boxes + obj;
    close("total", scalar(&p.total)?, total);

    // Without Dice the mask terms are the plain focal means; weights are honoured.
    let cfg = LossConfig {
        dice: false,
        mask_weight: 2.0,
        box_weight: 3.0,
        obj_weight: 0.5,
        ..LossConfig::default()
    };
    let p = sam2rad_loss(&out, &targets, &cfg)?;
    close("focal final", scalar(&p.mask_final)?, focal_mean(&final_x));
    close(
        "focal prompt",
        scalar(&p.mask_prompt)?,
        focal_mean(&prompt_x),
    );
    let total = 2.0 * (focal_mean(&final_x) + focal_mean(&prompt_x)) + 3.0 * boxes + 0.5 * obj;
    close("weighted total", scalar(&p.total)?, total);
    Ok(())
}

#[test]
fn mask_logits_are_upsampled_to_the_target_frame() -> Res<()> {
    // A constant 1×1 logit upsamples to a constant 4×4 map.
    let out = Sam2RadOutput {
        mask_logits: Tensor::new(&[[[[0.75f32]]]], &DEV)?,
        iou: Tensor::new(&[0.0f32], &DEV)?,
        object_logits: Tensor::new(&[2.0f32], &DEV)?,
        mask_prompt_logits: None,
        boxes: None,
    };
    let targets = rect_targets(4, &[Some([1, 1, 3, 2])])?;
    let cfg = LossConfig {
        dice: false,
        ..LossConfig::default()
    };
    let p = sam2rad_loss(&out, &targets, &cfg)?;
    let want = (2.0 * focal(0.75, 1.0, 3.0, 0.7) + 14.0 * focal(0.75, 0.0, 3.0, 0.7)) / 16.0;
    close("upsampled focal", scalar(&p.mask_final)?, want);
    assert_eq!(scalar(&p.mask_prompt)?, 0.0);
    assert_eq!(scalar(&p.boxes)?, 0.0);
    Ok(())
}

#[test]
fn empty_batch_is_finite_with_zero_mask_and_box_terms() -> Res<()> {
    let (out, _) = tiny_output()?;
    let targets = rect_targets(2, &[None, None])?;
    let p = sam2rad_loss(&out, &targets, &LossConfig::default())?;
    assert_eq!(p.num_foreground, 0);
    assert_eq!(scalar(&p.mask)?, 0.0);
    assert_eq!(scalar(&p.boxes)?, 0.0);
    let obj = (bce(0.5, 0.0) + bce(-1.0, 0.0)) / 2.0;
    close("obj", scalar(&p.obj)?, obj);
    close("total", scalar(&p.total)?, obj);
    Ok(())
}

#[test]
fn extreme_logits_stay_finite() -> Res<()> {
    let (mut out, targets) = tiny_output()?;
    out.mask_logits = (out.mask_logits * 1e4)?;
    out.object_logits = (out.object_logits * 1e4)?;
    out.mask_prompt_logits = Some(
        Tensor::new(&[1e4f32, -1e4, 1e4, -1e4], &DEV)?
            .reshape((1, 1, 2, 2))?
            .repeat((2, 1, 1, 1))?,
    );
    let p = sam2rad_loss(&out, &targets, &LossConfig::default())?;
    for (k, t) in [("total", &p.total), ("mask", &p.mask), ("obj", &p.obj)] {
        assert!(scalar(t)?.is_finite(), "{k} is not finite");
    }
    Ok(())
}

#[test]
fn bbox_of_mask_gives_inclusive_pixel_extents() -> Res<()> {
    let t = rect_targets(8, &[Some([2, 3, 5, 4]), None, Some([0, 0, 8, 8])])?;
    let b = bbox_of_mask(&t)?;
    assert_eq!(
        b,
        vec![Some([2.0, 3.0, 4.0, 3.0]), None, Some([0.0, 0.0, 7.0, 7.0])]
    );
    assert_eq!(bbox_of_mask(&t.squeeze(1)?)?, b);
    assert!(bbox_of_mask(&Tensor::zeros(4, candle_core::DType::F32, &DEV)?).is_err());
    Ok(())
}
