//! Evaluation on a data set split (SPEC §5): Dice and IoU (optionally HD95 and NSD) per image
//! and class at original resolution, mean ± std per class, false positives on empty ground truth
//! reported on their own; `summary.json` (nnU-Net-like), `per_case.csv` and overlays of the
//! worst and best cases.
//!
//! Protocol: a class whose ground truth and prediction are both empty is not scored (a true
//! negative); a prediction on an empty ground truth is a false positive, scored Dice = IoU = 0
//! and counted separately. In `box` mode (the model, or the zero-shot baseline, prompted with the
//! ground-truth box only) a class with empty ground truth has no box: it is not prompted, gets
//! no case and is counted as `not_prompted`. In `auto+box` mode such a class runs on the learned
//! prompts alone.

use std::fmt::Write as _;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::DType;
use sam2rad_data::fsutil::write_atomic;
use sam2rad_data::layout::{load_sample, Dataset, LoadedSample};
use sam2rad_models::config::Family;
use sam2rad_models::preprocess::{self, Preprocessed};
use sam2rad_models::preprocess_sam2;
use sam2rad_models::sam::{AnySam, Prompts};
use serde::Serialize;

use crate::clicks::{one_click, ClickReport};
use crate::infer::{class_colour, model_device, predict_classes, Mode, UserPrompts};
use crate::metrics::{score, summarise, CaseMetrics, ClassSummary, SurfaceOptions};
use crate::model::Sam2Rad;

/// What is evaluated.
#[derive(Debug, Clone, Copy)]
pub enum Target<'a> {
    /// A trained Sam2Rad model (modes auto, box, auto+box).
    Sam2Rad(&'a Sam2Rad),
    /// The frozen base model prompted with each class's ground-truth box through the official
    /// predictor (single mask; mode box only): the zero-shot baseline of the paper's Table 2.
    ZeroShot(&'a AnySam),
}

/// Settings of [`evaluate`].
#[derive(Debug, Clone)]
pub struct EvalOptions {
    /// Prompting mode: auto, box or auto+box.
    pub mode: Mode,
    /// Number of classes for the zero-shot baseline (default: the data set's metadata, else 1);
    /// a Sam2Rad model always uses its own.
    pub num_classes: Option<usize>,
    /// HD95 and NSD with this spacing and tolerance; None skips them.
    pub surface: Option<SurfaceOptions>,
    /// Description of the model for the report (e.g. the run folder and checkpoint).
    pub model_name: String,
    /// Output folder for `summary.json`, `per_case.csv` and `overlays/`.
    pub out_dir: PathBuf,
    /// How many worst and how many best cases get an overlay.
    pub overlays: usize,
    /// Give this share of the worst cases with foreground one corrective click each (auto mode
    /// of a Sam2Rad model only) and report their Dice before and after.
    pub click_worst: Option<f64>,
}

/// Metrics of one (image, class) case.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CaseResult {
    /// Case id (image file stem).
    pub image: String,
    /// Class label (1..=C).
    pub class: usize,
    /// The metrics.
    #[serde(flatten)]
    pub metrics: CaseMetrics,
}

/// Summary of one class.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ClassResult {
    /// Class name from the data set metadata, if any.
    pub name: Option<String>,
    /// Images of that class that got no prompt (box mode with empty ground truth).
    pub not_prompted: usize,
    /// Mean ± std and counts.
    #[serde(flatten)]
    pub summary: ClassSummary,
}

/// What [`evaluate`] computed and wrote.
#[derive(Debug, Clone)]
pub struct EvalReport {
    /// Mode name.
    pub mode: String,
    /// Model description.
    pub model: String,
    /// Data set root.
    pub data: String,
    /// Split folder.
    pub split: String,
    /// Images evaluated.
    pub num_images: usize,
    /// Every scored or true-negative case, image-major.
    pub cases: Vec<CaseResult>,
    /// Per-class summaries, class 1 first.
    pub classes: Vec<ClassResult>,
    /// `summary.json`.
    pub summary_path: PathBuf,
    /// `per_case.csv`.
    pub csv_path: PathBuf,
    /// Overlay PNGs written (worst first, then best).
    pub overlays: Vec<PathBuf>,
    /// The one-click experiment, when asked for.
    pub clicks: Option<ClickReport>,
}

/// A case kept for an overlay.
struct Candidate {
    dice: f64,
    sample: usize,
    class: usize,
    pred: Vec<bool>,
}

/// The `k` lowest- and `k` highest-Dice cases seen so far (earlier cases win ties).
struct Extremes {
    k: usize,
    worst: Vec<Candidate>,
    best: Vec<Candidate>,
}

impl Extremes {
    fn offer(&mut self, dice: Option<f64>, sample: usize, class: usize, pred: &[bool]) {
        let Some(dice) = dice else { return };
        let keep = |list: &mut Vec<Candidate>, before: &dyn Fn(f64, f64) -> bool| {
            if list.len() == self.k && list.last().is_none_or(|l| !before(dice, l.dice)) {
                return;
            }
            let at = list
                .iter()
                .position(|c| before(dice, c.dice))
                .unwrap_or(list.len());
            list.insert(
                at,
                Candidate {
                    dice,
                    sample,
                    class,
                    pred: pred.to_vec(),
                },
            );
            list.truncate(self.k);
        };
        keep(&mut self.worst, &|a, b| a < b);
        keep(&mut self.best, &|a, b| a > b);
    }
}

/// Evaluates `target` on every image of `dataset` and writes the report files to
/// `opts.out_dir`.
pub fn evaluate(target: Target, dataset: &Dataset, opts: &EvalOptions) -> Result<EvalReport> {
    let classes = match target {
        Target::Sam2Rad(m) => {
            if !matches!(opts.mode, Mode::Auto | Mode::Box | Mode::AutoBox) {
                bail!(
                    "evaluation mode `{}`: expected auto, box or auto+box",
                    opts.mode.name()
                );
            }
            let c = m.config().num_classes;
            if let Some(d) = dataset.num_classes().filter(|&d| d != c) {
                bail!(
                    "data set {} names {d} classes, the model has {c}",
                    dataset.root.display()
                );
            }
            c
        }
        Target::ZeroShot(_) => {
            if opts.mode != Mode::Box {
                bail!(
                    "the zero-shot baseline runs in box mode only (got `{}`)",
                    opts.mode.name()
                );
            }
            opts.num_classes.or(dataset.num_classes()).unwrap_or(1)
        }
    };
    if let Some(f) = opts.click_worst {
        if !matches!((target, opts.mode), (Target::Sam2Rad(_), Mode::Auto)) {
            bail!("the one-click experiment needs a trained run in auto mode");
        }
        if !(f > 0.0 && f <= 1.0) {
            bail!("click share {f}: expected a fraction in (0, 1]");
        }
    }
    if dataset.samples.is_empty() {
        bail!(
            "data set {}: split {} has no images",
            dataset.root.display(),
            dataset.split
        );
    }

    let mut cases = Vec::new();
    let mut per_class: Vec<Vec<CaseMetrics>> = vec![Vec::new(); classes];
    let mut not_prompted = vec![0usize; classes];
    // (sample, class, Dice) of every scored case with foreground, for the one-click experiment.
    let mut with_fg: Vec<(usize, usize, f64)> = Vec::new();
    let mut extremes = Extremes {
        k: opts.overlays,
        worst: Vec::new(),
        best: Vec::new(),
    };
    for (idx, sample) in dataset.samples.iter().enumerate() {
        let s = load(sample, classes, target)?;
        let preds = predict_sample(target, &s, classes, opts.mode)
            .with_context(|| format!("cannot predict {}", sample.image_path.display()))?;
        for (class, pred) in preds.iter().enumerate() {
            let Some(pred) = pred else {
                not_prompted[class] += 1;
                continue;
            };
            let gt: Vec<bool> = s.mask.iter().map(|&l| l as usize == class + 1).collect();
            let m = score(pred, &gt, s.h, s.w, opts.surface);
            extremes.offer(m.dice, idx, class, pred);
            if let (Some(d), true) = (m.dice, m.gt_pixels > 0) {
                with_fg.push((idx, class, d));
            }
            per_class[class].push(m);
            cases.push(CaseResult {
                image: sample.id.clone(),
                class: class + 1,
                metrics: m,
            });
        }
        tracing::info!(
            "evaluated {}/{}: {}",
            idx + 1,
            dataset.samples.len(),
            sample.id
        );
    }
    let class_results: Vec<ClassResult> = per_class
        .iter()
        .enumerate()
        .map(|(c, m)| ClassResult {
            name: dataset.class_names.as_ref().and_then(|n| n.get(c)).cloned(),
            not_prompted: not_prompted[c],
            summary: summarise(c + 1, m),
        })
        .collect();

    let out = &opts.out_dir;
    std::fs::create_dir_all(out)
        .with_context(|| format!("cannot create the output folder {}", out.display()))?;
    let csv_path = out.join("per_case.csv");
    write_text(&csv_path, &per_case_csv(&cases))?;
    let mut overlays = Vec::new();
    for (kind, list) in [("worst", &extremes.worst), ("best", &extremes.best)] {
        for (rank, cand) in list.iter().enumerate() {
            let sample = &dataset.samples[cand.sample];
            let s = load(sample, classes, target)?;
            let gt: Vec<bool> = s
                .mask
                .iter()
                .map(|&l| l as usize == cand.class + 1)
                .collect();
            let img = side_by_side(&s.rgb, &gt, &cand.pred, s.h, s.w, cand.class + 1);
            let path = out.join("overlays").join(format!(
                "{kind}{}_{}_class{}.png",
                rank + 1,
                sample.id,
                cand.class + 1
            ));
            write_atomic(&path, |tmp| -> Result<()> {
                img.save_with_format(tmp, image::ImageFormat::Png)?;
                Ok(())
            })
            .with_context(|| format!("cannot write {}", path.display()))?;
            overlays.push(path);
        }
    }
    let clicks = match (opts.click_worst, target) {
        (Some(f), Target::Sam2Rad(model)) if !with_fg.is_empty() => {
            // Stable sort: ties keep image order.
            with_fg.sort_by(|a, b| a.2.total_cmp(&b.2));
            let k = ((f * with_fg.len() as f64).ceil() as usize).clamp(1, with_fg.len());
            Some(one_click(model, dataset, &with_fg[..k], f)?)
        }
        _ => None,
    };
    let report = EvalReport {
        mode: opts.mode.name().to_string(),
        model: opts.model_name.clone(),
        data: dataset.root.display().to_string(),
        split: dataset.split.clone(),
        num_images: dataset.samples.len(),
        cases,
        classes: class_results,
        summary_path: out.join("summary.json"),
        csv_path,
        overlays,
        clicks,
    };
    write_text(&report.summary_path, &summary_json(&report, opts)?)?;
    Ok(report)
}

/// Loads a sample, hinting at `--num-classes` for the zero-shot baseline.
fn load(
    sample: &sam2rad_data::layout::Sample,
    classes: usize,
    target: Target,
) -> Result<LoadedSample> {
    load_sample(sample, classes).map_err(|e| {
        let e = anyhow::Error::new(e);
        match target {
            Target::ZeroShot(_) => e.context(format!(
                "evaluating {classes} class(es); set the number of classes with --num-classes"
            )),
            Target::Sam2Rad(_) => e,
        }
    })
}

/// Per class: the predicted binary mask at original size, or None when the class got no prompt.
fn predict_sample(
    target: Target,
    s: &LoadedSample,
    classes: usize,
    mode: Mode,
) -> Result<Vec<Option<Vec<bool>>>> {
    let boxes = gt_boxes(&s.mask, s.h, s.w, classes);
    match target {
        Target::Sam2Rad(model) => {
            let dev = model_device(model)?;
            let pre = crate::input::preprocess(&model.config().base, &s.rgb, s.h, s.w, &dev)?;
            let prompts: Vec<UserPrompts> = boxes
                .iter()
                .map(|b| UserPrompts {
                    boxes: if mode == Mode::Auto { None } else { *b },
                    ..UserPrompts::default()
                })
                .collect();
            let pred = predict_classes(model, &pre, mode, &prompts)?;
            Ok(boxes
                .iter()
                .enumerate()
                .map(|(c, b)| {
                    (mode != Mode::Box || b.is_some()).then(|| pred.class_mask((c + 1) as u8))
                })
                .collect())
        }
        Target::ZeroShot(sam) => {
            let dev = sam.prompt_encoder().get_dense_pe()?.device().clone();
            let pre = official_preprocess(sam, &s.rgb, s.h, s.w, &dev)?;
            let emb = sam.embed(&pre.input)?;
            boxes
                .iter()
                .map(|b| {
                    let Some(b) = b else { return Ok(None) };
                    let prompts = Prompts {
                        boxes: Some(*b),
                        ..Prompts::default()
                    };
                    let p =
                        sam.predict(&emb, pre.original_size, pre.input_size, &prompts, false)?;
                    let logits: Vec<f32> = p
                        .masks_logits
                        .narrow(1, 0, 1)?
                        .to_dtype(DType::F32)?
                        .flatten_all()?
                        .to_vec1()?;
                    Ok(Some(logits.iter().map(|&v| v > 0.0).collect()))
                })
                .collect()
        }
    }
}

/// The official predictor's preprocessing of the base model's family (SAM 2: the 1024² stretch).
fn official_preprocess(
    sam: &AnySam,
    rgb: &[u8],
    h: usize,
    w: usize,
    dev: &candle_core::Device,
) -> Result<Preprocessed> {
    let s = sam.config().image_size;
    Ok(match sam.config().family {
        Family::Sam | Family::MobileSam => preprocess::sam_preprocess(rgb, h, w, s, dev)?,
        Family::MedSam => preprocess::medsam_preprocess(rgb, h, w, s, dev)?,
        Family::Sam2 => preprocess_sam2::sam2_preprocess(rgb, h, w, s, dev)?,
    })
}

/// The ground-truth box of every class: inclusive pixel bounds `[x0, y0, x1, y1]` of its mask in
/// original pixels (None when the class is absent).
fn gt_boxes(mask: &[u8], h: usize, w: usize, classes: usize) -> Vec<Option<[f32; 4]>> {
    let mut b: Vec<Option<[usize; 4]>> = vec![None; classes];
    for y in 0..h {
        for x in 0..w {
            let l = mask[y * w + x] as usize;
            if l == 0 || l > classes {
                continue;
            }
            let e = &mut b[l - 1];
            *e = Some(match *e {
                None => [x, y, x, y],
                Some([x0, y0, x1, y1]) => [x0.min(x), y0.min(y), x1.max(x), y1.max(y)],
            });
        }
    }
    b.into_iter()
        .map(|o| o.map(|v| v.map(|c| c as f32)))
        .collect()
}

/// Writes `text` to `path` atomically.
fn write_text(path: &Path, text: &str) -> Result<()> {
    write_atomic(path, |tmp| std::fs::write(tmp, text))
        .with_context(|| format!("cannot write {}", path.display()))
}

/// A CSV field, quoted when it holds a comma, quote or line break.
fn csv_field(s: &str) -> String {
    if s.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", s.replace('"', "\"\""))
    } else {
        s.to_string()
    }
}

/// `image,class,dice,iou,hd95,nsd,gt_pixels,pred_pixels,false_positive`; undefined values empty.
fn per_case_csv(cases: &[CaseResult]) -> String {
    let opt = |v: Option<f64>| v.map(|x| x.to_string()).unwrap_or_default();
    let mut out =
        String::from("image,class,dice,iou,hd95,nsd,gt_pixels,pred_pixels,false_positive\n");
    for c in cases {
        let m = &c.metrics;
        let _ = writeln!(
            out,
            "{},{},{},{},{},{},{},{},{}",
            csv_field(&c.image),
            c.class,
            opt(m.dice),
            opt(m.iou),
            opt(m.hd95),
            opt(m.nsd),
            m.gt_pixels,
            m.pred_pixels,
            m.false_positive
        );
    }
    out
}

/// The nnU-Net-like `summary.json` text.
fn summary_json(report: &EvalReport, opts: &EvalOptions) -> Result<String> {
    let mean: serde_json::Map<String, serde_json::Value> = report
        .classes
        .iter()
        .map(|c| Ok((c.summary.class.to_string(), serde_json::to_value(c)?)))
        .collect::<Result<_>>()?;
    let json = serde_json::json!({
        "mode": report.mode,
        "model": report.model,
        "data": report.data,
        "split": report.split,
        "num_images": report.num_images,
        "num_classes": report.classes.len(),
        "surface": opts.surface.map(|s| serde_json::json!({
            "spacing": [s.spacing.0, s.spacing.1],
            "nsd_tolerance": s.nsd_tolerance,
        })),
        "protocol": "Dice/IoU per (image, class) at original resolution, logit threshold 0; \
            empty ground truth with empty prediction: not scored; prediction on empty ground \
            truth: false positive (Dice 0, counted separately); box mode: classes with empty \
            ground truth are not prompted",
        "results": {
            "all": report.cases,
            "mean": mean,
        },
        "one_click": report.clicks,
    });
    Ok(serde_json::to_string_pretty(&json)? + "\n")
}

/// Foreground pixels of `mask` with a 4-neighbour outside it (the border counts as outside).
fn contour(mask: &[bool], h: usize, w: usize) -> Vec<bool> {
    (0..h * w)
        .map(|i| {
            let (y, x) = (i / w, i % w);
            mask[i]
                && (y == 0
                    || x == 0
                    || y + 1 == h
                    || x + 1 == w
                    || !mask[i - w]
                    || !mask[i + w]
                    || !mask[i - 1]
                    || !mask[i + 1])
        })
        .collect()
}

/// Left: the image with the ground-truth contour (white); right: the prediction filled in the
/// class colour, with the same contour.
fn side_by_side(
    rgb: &[u8],
    gt: &[bool],
    pred: &[bool],
    h: usize,
    w: usize,
    label: usize,
) -> image::RgbImage {
    let edge = contour(gt, h, w);
    let col = class_colour(label.min(255) as u8);
    let mut out = image::RgbImage::new(2 * w as u32, h as u32);
    for i in 0..h * w {
        let (y, x) = ((i / w) as u32, (i % w) as u32);
        let px = [rgb[3 * i], rgb[3 * i + 1], rgb[3 * i + 2]];
        let filled = if pred[i] {
            [0, 1, 2].map(|k| ((px[k] as u16 + col[k] as u16) / 2) as u8)
        } else {
            px
        };
        let (left, right) = if edge[i] {
            ([255; 3], [255; 3])
        } else {
            (px, filled)
        };
        out.put_pixel(x, y, image::Rgb(left));
        out.put_pixel(x + w as u32, y, image::Rgb(right));
    }
    out
}
