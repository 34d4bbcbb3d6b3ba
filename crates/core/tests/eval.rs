//! Evaluation on generated phantoms: the report files agree with each other, the metric protocol
//! on crafted predictions (empty vs empty not scored, prediction on empty = false positive), box
//! mode skipping empty ground truth, and the zero-shot box baseline on the reduced SAM fixture.

mod common;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::Device;
use common::{make_run, samples, Res};
use sam2rad_core::eval::{evaluate, EvalOptions, EvalReport, Target};
use sam2rad_core::infer::Mode;
use sam2rad_core::metrics::SurfaceOptions;
use sam2rad_core::run::{self, Which};
use sam2rad_data::layout::{Dataset, LoadedSample};
use sam2rad_data::phantom::{generate, PhantomClass, PhantomConfig};
use sam2rad_models::checkpoint::{Checkpoint, WeightsBackend};
use sam2rad_models::config::SamConfig;
use sam2rad_models::sam::AnySam;

const DEV: Device = Device::Cpu;

fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

fn scratch(name: &str) -> PathBuf {
    common::scratch("eval", name)
}

/// Small two-class phantoms (bone, bursa); about half of the images are empty.
fn phantoms(dir: &Path, classes: Vec<PhantomClass>, test: usize) -> Res<Dataset> {
    let cfg = PhantomConfig {
        train: 1,
        test,
        seed: 11,
        classes,
        empty_fraction: 0.4,
        width_range: (64, 96),
        height_range: (64, 80),
    };
    generate(&cfg, dir)?;
    Ok(Dataset::open(dir, "Test")?)
}

fn options(mode: Mode, out: &Path) -> EvalOptions {
    EvalOptions {
        mode,
        num_classes: None,
        surface: None,
        model_name: "test".into(),
        out_dir: out.to_path_buf(),
        overlays: 3,
        click_worst: None,
    }
}

/// Mean of the non-empty values of CSV column `col` over the rows of `class`.
fn csv_mean(csv: &str, class: usize, col: &str) -> Option<f64> {
    let mut lines = csv.lines();
    let header: Vec<&str> = lines.next()?.split(',').collect();
    let ci = header.iter().position(|h| *h == col)?;
    let vals: Vec<f64> = lines
        .map(|l| l.split(',').collect::<Vec<_>>())
        .filter(|f| f[1] == class.to_string())
        .filter_map(|f| f[ci].parse::<f64>().ok())
        .collect();
    (!vals.is_empty()).then(|| vals.iter().sum::<f64>() / vals.len() as f64)
}

/// summary.json, per_case.csv and the overlays agree with each other and with the report.
fn check_files(report: &EvalReport, out: &Path) -> Res<serde_json::Value> {
    let json: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json"))?)?;
    let csv = std::fs::read_to_string(out.join("per_case.csv"))?;
    let rows = csv.lines().count() - 1;
    let all = json["results"]["all"].as_array().ok_or("results.all")?;
    assert_eq!(all.len(), rows);
    assert_eq!(rows, report.cases.len());
    for c in &report.classes {
        let k = c.summary.class;
        let mean = &json["results"]["mean"][k.to_string()];
        for (col, key) in [("dice", "dice_mean"), ("iou", "iou_mean")] {
            let from_csv = csv_mean(&csv, k, col);
            let from_json = mean[key].as_f64();
            match (from_csv, from_json) {
                (Some(a), Some(b)) => assert!((a - b).abs() < 1e-12, "{col} {a} vs {b}"),
                (None, None) => {}
                other => panic!("class {k} {col}: {other:?}"),
            }
        }
        let fp_csv = csv
            .lines()
            .skip(1)
            .filter(|l| l.split(',').nth(1) == Some(&k.to_string()) && l.ends_with(",true"))
            .count();
        assert_eq!(mean["false_positives"].as_u64(), Some(fp_csv as u64));
        assert_eq!(
            mean["false_positives"].as_u64(),
            Some(c.summary.false_positives as u64)
        );
    }
    assert_eq!(json["mode"], report.mode.as_str());
    // Overlays: up to three worst and three best, twice the image width.
    let scored = report
        .cases
        .iter()
        .filter(|c| c.metrics.dice.is_some())
        .count();
    assert_eq!(report.overlays.len(), 2 * scored.min(3));
    for p in &report.overlays {
        let name = p.file_name().ok_or("name")?.to_string_lossy().into_owned();
        assert!(
            name.starts_with("worst") || name.starts_with("best"),
            "{name}"
        );
        assert!(p.is_file(), "{}", p.display());
    }
    Ok(json)
}

#[test]
fn report_files_are_consistent() -> Res<()> {
    let base = scratch("consistent");
    let ds = phantoms(
        &base.join("data"),
        vec![PhantomClass::Bone, PhantomClass::Bursa],
        5,
    )?;
    make_run(&base.join("run"), 2, 5.0, None)?;
    let run = run::load(&base.join("run"), Which::Best, None, &DEV)?;
    let out = base.join("out");
    let mut opts = options(Mode::Auto, &out);
    opts.surface = Some(SurfaceOptions {
        spacing: (0.5, 0.25),
        nsd_tolerance: 1.0,
    });
    let report = evaluate(Target::Sam2Rad(&run.model), &ds, &opts)?;
    assert_eq!(report.num_images, 5);
    // Auto mode: every (image, class) is a case (scored or a true negative).
    assert_eq!(report.cases.len(), 10);
    let json = check_files(&report, &out)?;
    assert_eq!(json["surface"]["spacing"][1].as_f64(), Some(0.25));
    for c in &report.cases {
        let m = &c.metrics;
        assert_eq!(m.hd95.is_some(), m.gt_pixels > 0 && m.pred_pixels > 0);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn one_click_experiment_clicks_into_the_worst_errors() -> Res<()> {
    let base = scratch("one_click");
    let ds = phantoms(
        &base.join("data"),
        vec![PhantomClass::Bone, PhantomClass::Bursa],
        6,
    )?;
    make_run(&base.join("run"), 2, 5.0, None)?;
    let run = run::load(&base.join("run"), Which::Best, None, &DEV)?;
    let out = base.join("out");
    let mut opts = options(Mode::Auto, &out);
    opts.click_worst = Some(0.5);
    let report = evaluate(Target::Sam2Rad(&run.model), &ds, &opts)?;
    let clicks = report.clicks.as_ref().ok_or("no one-click report")?;
    // The worst half of the scored cases with foreground, worst first.
    let mut fg: Vec<f64> = report
        .cases
        .iter()
        .filter(|c| c.metrics.gt_pixels > 0)
        .filter_map(|c| c.metrics.dice)
        .collect();
    fg.sort_by(f64::total_cmp);
    assert!(!fg.is_empty());
    assert_eq!(clicks.cases.len(), fg.len().div_ceil(2));
    let before: Vec<f64> = clicks.cases.iter().map(|c| c.dice_before).collect();
    assert_eq!(before, fg[..before.len()].to_vec());
    for c in &clicks.cases {
        // A positive click lands on the class, a negative one off it.
        let sample = ds.samples.iter().find(|s| s.id == c.image).ok_or("case")?;
        let s = sam2rad_data::layout::load_sample(sample, 2)?;
        let [x, y] = c.click;
        assert_eq!(s.mask[y * s.w + x] as usize == c.class, c.positive, "{c:?}");
        assert!((0.0..=1.0).contains(&c.dice_after));
    }
    let json = check_files(&report, &out)?;
    let listed = json["one_click"]["cases"].as_array().ok_or("one_click")?;
    assert_eq!(listed.len(), clicks.cases.len());
    // Only a trained run in auto mode can take clicks.
    let err = evaluate(
        Target::Sam2Rad(&run.model),
        &ds,
        &EvalOptions {
            click_worst: Some(0.1),
            ..options(Mode::Box, &base.join("box"))
        },
    )
    .err()
    .ok_or("box mode accepted the click experiment")?;
    assert!(err.to_string().contains("auto mode"), "{err}");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn protocol_on_crafted_predictions() -> Res<()> {
    let base = scratch("protocol");
    let ds = phantoms(
        &base.join("data"),
        vec![PhantomClass::Bone, PhantomClass::Bursa],
        6,
    )?;
    let loaded = samples(&ds, 2)?;
    let count = |s: &LoadedSample, l: u8| s.mask.iter().filter(|&&v| v == l).count();
    assert!(
        loaded.iter().any(|s| count(s, 1) == 0) && loaded.iter().any(|s| count(s, 1) > 0),
        "the phantoms need empty and non-empty bone masks"
    );

    // Every logit positive for both classes: class 1 wins the tie everywhere, class 2 is empty.
    make_run(&base.join("everywhere"), 2, 5.0, Some(1.0))?;
    let run = run::load(&base.join("everywhere"), Which::Best, None, &DEV)?;
    let out = base.join("out-everywhere");
    let report = evaluate(Target::Sam2Rad(&run.model), &ds, &options(Mode::Auto, &out))?;
    check_files(&report, &out)?;
    for (s, id) in loaded.iter().zip(&ds.samples) {
        let hw = s.h * s.w;
        let case = |class: usize| {
            report
                .cases
                .iter()
                .find(|c| c.image == id.id && c.class == class)
                .expect("case")
                .metrics
        };
        let (g1, g2) = (count(s, 1), count(s, 2));
        let m1 = case(1);
        assert_eq!(m1.pred_pixels, hw);
        assert_eq!(m1.false_positive, g1 == 0);
        let want = 2.0 * g1 as f64 / (g1 + hw) as f64;
        assert!((m1.dice.ok_or("class 1 scored")? - want).abs() < 1e-12);
        let m2 = case(2);
        assert_eq!(m2.pred_pixels, 0);
        assert!(!m2.false_positive);
        // Empty ground truth and empty prediction: not scored.
        assert_eq!(m2.dice, if g2 == 0 { None } else { Some(0.0) });
    }
    let fp: usize = loaded.iter().filter(|s| count(s, 1) == 0).count();
    assert_eq!(report.classes[0].summary.false_positives, fp);
    assert_eq!(
        report.classes[1].summary.true_negatives,
        loaded.iter().filter(|s| count(s, 2) == 0).count()
    );

    // Every logit negative: nothing predicted, no false positive, empty classes not scored.
    make_run(&base.join("nowhere"), 2, 5.0, Some(-1.0))?;
    let run = run::load(&base.join("nowhere"), Which::Best, None, &DEV)?;
    let out = base.join("out-nowhere");
    let report = evaluate(Target::Sam2Rad(&run.model), &ds, &options(Mode::Auto, &out))?;
    check_files(&report, &out)?;
    for c in &report.cases {
        assert_eq!(c.metrics.pred_pixels, 0);
        assert!(!c.metrics.false_positive);
        assert_eq!(c.metrics.dice.is_some(), c.metrics.gt_pixels > 0);
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn box_mode_skips_empty_ground_truth() -> Res<()> {
    let base = scratch("box");
    let ds = phantoms(
        &base.join("data"),
        vec![PhantomClass::Bone, PhantomClass::Bursa],
        4,
    )?;
    let loaded = samples(&ds, 2)?;
    make_run(&base.join("run"), 2, 5.0, None)?;
    let run = run::load(&base.join("run"), Which::Best, None, &DEV)?;
    let present = |l: u8| loaded.iter().filter(|s| s.mask.contains(&l)).count();
    for mode in [Mode::Box, Mode::AutoBox] {
        let out = base.join(format!("out-{}", mode.name()));
        let report = evaluate(Target::Sam2Rad(&run.model), &ds, &options(mode, &out))?;
        check_files(&report, &out)?;
        for (k, c) in report.classes.iter().enumerate() {
            let n = present(k as u8 + 1);
            let (cases, skipped) = if mode == Mode::Box {
                (n, 4 - n)
            } else {
                (4, 0)
            };
            assert_eq!(
                report.cases.iter().filter(|c| c.class == k + 1).count(),
                cases
            );
            assert_eq!(c.not_prompted, skipped, "{mode:?} class {}", k + 1);
        }
    }
    for mode in [Mode::Semi, Mode::Manual] {
        let e = evaluate(
            Target::Sam2Rad(&run.model),
            &ds,
            &options(mode, &base.join("x")),
        )
        .expect_err("not an evaluation mode");
        assert!(format!("{e}").contains("auto, box or auto+box"), "{e}");
    }
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn zero_shot_box_baseline_on_the_reduced_sam() -> Res<()> {
    let base = scratch("zeroshot");
    let ds = phantoms(&base.join("data"), vec![PhantomClass::Bone], 3)?;
    let loaded = samples(&ds, 1)?;
    let cfg = SamConfig::from_json_file(&root().join("fixtures/configs/sam_vit_reduced.json"))?;
    let ckpt = Checkpoint::load(&root().join("fixtures/reference/sam_vit_reduced.safetensors"))?;
    let backend = WeightsBackend::frozen(Arc::new(ckpt));
    let sam = AnySam::new(&cfg, backend.var_builder(&DEV))?;
    let out = base.join("out");
    let report = evaluate(Target::ZeroShot(&sam), &ds, &options(Mode::Box, &out))?;
    check_files(&report, &out)?;
    let with_bone = loaded.iter().filter(|s| s.mask.contains(&1)).count();
    assert!(with_bone > 0, "the phantoms need some bone");
    assert_eq!(report.cases.len(), with_bone);
    assert_eq!(report.classes[0].not_prompted, 3 - with_bone);
    assert_eq!(report.classes[0].summary.false_positives, 0);
    for c in &report.cases {
        assert!(c.metrics.gt_pixels > 0);
        let d = c.metrics.dice.ok_or("scored")?;
        assert!((0.0..=1.0).contains(&d));
    }
    // The baseline has no learned prompts: box mode only.
    let e = evaluate(Target::ZeroShot(&sam), &ds, &options(Mode::Auto, &out))
        .expect_err("auto refused");
    assert!(format!("{e}").contains("box mode only"), "{e}");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
