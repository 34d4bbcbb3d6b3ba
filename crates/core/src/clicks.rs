//! Simulated corrective clicks: where an annotator would click to fix a predicted mask. Shared by
//! training (the click branch of the prompt mix) and evaluation (the one-click experiment).

use anyhow::{Context, Result};
use sam2rad_data::layout::{load_sample, Dataset};
use serde::Serialize;

use crate::infer::{model_device, predict_classes, Mode, UserPrompts};
use crate::metrics::{distance_transform, score};
use crate::model::Sam2Rad;

/// The pixel (x, y) of the top-left `ih × iw` part of a row-major `region` with row stride
/// `stride` that lies farthest from the region's border (the crop edge counts as border); None
/// for an empty region. Ties: first in row-major order.
pub fn deepest_point(
    region: &[bool],
    stride: usize,
    ih: usize,
    iw: usize,
) -> Option<(usize, usize)> {
    let (ph, pw) = (ih + 2, iw + 2);
    let mut outside = vec![true; ph * pw];
    let mut any = false;
    for y in 0..ih {
        for x in 0..iw {
            if region[y * stride + x] {
                outside[(y + 1) * pw + x + 1] = false;
                any = true;
            }
        }
    }
    if !any {
        return None;
    }
    let dist = distance_transform(&outside, ph, pw, (1.0, 1.0));
    let mut best: Option<(f64, (usize, usize))> = None;
    for y in 0..ih {
        for x in 0..iw {
            let d = dist[(y + 1) * pw + x + 1];
            if region[y * stride + x] && best.is_none_or(|(b, _)| d > b) {
                best = Some((d, (x, y)));
            }
        }
    }
    best.map(|(_, p)| p)
}

/// One corrective click `(x, y, label)` for a prediction against ground truth (both row-major
/// with row stride `stride`, read in their top-left `ih × iw` part): a positive click (label 1)
/// deep inside the missed region, or a negative one (label 0) deep inside the false-positive
/// region, whichever region is larger (ties: positive). None when the prediction is exact.
pub fn corrective_click(
    pred: &[bool],
    gt: &[bool],
    stride: usize,
    ih: usize,
    iw: usize,
) -> Option<(usize, usize, i64)> {
    let missed: Vec<bool> = gt.iter().zip(pred).map(|(&g, &p)| g && !p).collect();
    let extra: Vec<bool> = gt.iter().zip(pred).map(|(&g, &p)| p && !g).collect();
    let count = |m: &[bool]| {
        (0..ih)
            .map(|y| {
                m[y * stride..y * stride + iw]
                    .iter()
                    .filter(|v| **v)
                    .count()
            })
            .sum::<usize>()
    };
    let (region, label) = if count(&missed) >= count(&extra) {
        (missed, 1)
    } else {
        (extra, 0)
    };
    deepest_point(&region, stride, ih, iw).map(|(x, y)| (x, y, label))
}

/// One case of the one-click experiment.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClickCase {
    /// Case id (image file stem).
    pub image: String,
    /// Class label (1..=C).
    pub class: usize,
    /// The simulated click `[x, y]` in original pixels.
    pub click: [usize; 2],
    /// Positive (add missed object) or negative (remove a false positive) click.
    pub positive: bool,
    /// Autonomous Dice.
    pub dice_before: f64,
    /// Semi-autonomous Dice: learned prompts plus the click.
    pub dice_after: f64,
}

/// What one corrective click does to the worst autonomous cases.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClickReport {
    /// Share of the scored cases with foreground that got a click (the worst ones).
    pub fraction: f64,
    /// Mean autonomous Dice of those cases.
    pub dice_before_mean: f64,
    /// Mean Dice after one click.
    pub dice_after_mean: f64,
    /// Every clicked case, worst first.
    pub cases: Vec<ClickCase>,
}

/// Gives each of `worst` — `(sample index, class index, autonomous Dice)`, worst first — one
/// simulated corrective click in semi-autonomous mode and scores it again at original size.
pub fn one_click(
    model: &Sam2Rad,
    dataset: &Dataset,
    worst: &[(usize, usize, f64)],
    fraction: f64,
) -> Result<ClickReport> {
    let classes = model.config().num_classes;
    let dev = model_device(model)?;
    let mut cases = Vec::with_capacity(worst.len());
    for &(idx, class, before) in worst {
        let sample = &dataset.samples[idx];
        let s = load_sample(sample, classes)?;
        let pre = crate::input::preprocess(&model.config().base, &s.rgb, s.h, s.w, &dev)?;
        let none = vec![UserPrompts::default(); classes];
        let auto = predict_classes(model, &pre, Mode::Auto, &none)
            .with_context(|| format!("cannot predict {}", sample.image_path.display()))?;
        let label = (class + 1) as u8;
        let gt: Vec<bool> = s.mask.iter().map(|&l| l == label).collect();
        let pred = auto.class_mask(label);
        let Some((x, y, positive)) = corrective_click(&pred, &gt, s.w, s.h, s.w) else {
            continue;
        };
        let mut prompts = none;
        prompts[class].points.push((x as f32, y as f32, positive));
        let semi = predict_classes(model, &pre, Mode::Semi, &prompts)
            .with_context(|| format!("cannot predict {}", sample.image_path.display()))?;
        let after = score(&semi.class_mask(label), &gt, s.h, s.w, None)
            .dice
            .unwrap_or(0.0);
        cases.push(ClickCase {
            image: sample.id.clone(),
            class: class + 1,
            click: [x, y],
            positive: positive == 1,
            dice_before: before,
            dice_after: after,
        });
    }
    let mean = |f: &dyn Fn(&ClickCase) -> f64| {
        cases.iter().map(f).sum::<f64>() / cases.len().max(1) as f64
    };
    Ok(ClickReport {
        fraction,
        dice_before_mean: mean(&|c| c.dice_before),
        dice_after_mean: mean(&|c| c.dice_after),
        cases,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn deepest_point_is_the_centre_of_a_square() {
        let s = 16;
        let mut region = vec![false; s * s];
        for y in 2..9 {
            for x in 4..11 {
                region[y * s + x] = true;
            }
        }
        assert_eq!(deepest_point(&region, s, 12, 12), Some((7, 5)));
        // The crop edge is a border: in a full 3×5 crop the middle row is deepest (distance 2 at
        // x = 1, 2, 3); ties go to the first in row-major order.
        let full = vec![true; s * s];
        assert_eq!(deepest_point(&full, s, 3, 5), Some((1, 1)));
        assert_eq!(deepest_point(&vec![false; s * s], s, 8, 8), None);
    }

    #[test]
    fn click_goes_into_the_larger_error_region() {
        let (h, w) = (10, 12);
        // Ground truth: columns 0..6; prediction: columns 0..2 and a stray 2×2 blob at (9..11).
        let gt: Vec<bool> = (0..h * w).map(|i| i % w < 6).collect();
        let mut pred: Vec<bool> = (0..h * w).map(|i| i % w < 2).collect();
        for y in 4..6 {
            for x in 9..11 {
                pred[y * w + x] = true;
            }
        }
        // Missed: columns 2..6 (40 px) beat the 4 false-positive pixels: a positive click.
        let (x, y, label) = corrective_click(&pred, &gt, w, h, w).expect("a click");
        assert_eq!(label, 1);
        assert!((2..6).contains(&x) && (0..h).contains(&y), "({x}, {y})");
        // Predicting everything: the false positives (columns 6..12) win, a negative click.
        let all = vec![true; h * w];
        let (x, _, label) = corrective_click(&all, &gt, w, h, w).expect("a click");
        assert_eq!(label, 0);
        assert!(x >= 6, "{x}");
        assert_eq!(corrective_click(&gt, &gt, w, h, w), None);
    }
}
