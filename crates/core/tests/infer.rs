//! Inference from a run folder on a tiny random-init Sam2Rad: output geometry, the prompt modes,
//! objectness gating, the label decision and run-loading errors.

mod common;

use std::path::{Path, PathBuf};

use candle_core::{Device, Tensor};
use common::{make_run, max_abs_diff, Res};
use sam2rad_core::infer::{predict_image, Mode, UserPrompts, EMPTY_LOGIT};
use sam2rad_core::run::{self, Which};

const DEV: Device = Device::Cpu;

fn scratch(name: &str) -> PathBuf {
    common::scratch("infer", name)
}

/// A deterministic grey-ish RGB test image.
fn image(h: usize, w: usize) -> Vec<u8> {
    (0..h * w * 3)
        .map(|i| ((i / 3 % w) * 3 + (i / 3 / w) * 5 + (i % 3) * 17) as u8)
        .collect()
}

#[test]
fn prediction_has_the_input_geometry() -> Res<()> {
    let dir = scratch("geometry");
    make_run(&dir, 2, 5.0, None)?;
    let run = run::load(&dir, Which::Best, None, &DEV)?;
    let (h, w) = (70, 110);
    let p = predict_image(
        &run.model,
        &image(h, w),
        h,
        w,
        Mode::Auto,
        &UserPrompts::default(),
    )?;
    assert_eq!((p.height, p.width), (h, w));
    assert_eq!(p.labels.len(), h * w);
    assert!(p.labels.iter().all(|&l| l <= 2));
    assert_eq!(p.class_logits.dims(), &[2, h, w]);
    assert_eq!(p.object_logits.dims(), &[2]);
    assert_eq!(p.low_res_logits.dims(), &[2, 1, 64, 64]);
    assert_eq!(p.num_classes(), 2);
    // Learned boxes come back in original pixels.
    for b in &p.boxes {
        let [x0, y0, x1, y1] = b.ok_or("auto mode has learned boxes")?;
        assert!(x0 <= x1 && y0 <= y1 && x1 <= 256.0 * w as f32 / 110.0 + 1e-3);
        assert!(y1 <= 256.0 * h as f32 / 70.0 + 1e-3);
    }
    // The label map is the argmax of the class logits where one is positive.
    let logits = p.class_logits.flatten_all()?.to_vec1::<f32>()?;
    for i in 0..h * w {
        let (a, b) = (logits[i], logits[h * w + i]);
        let want = if a.max(b) <= 0.0 {
            0
        } else if a >= b {
            1
        } else {
            2
        };
        assert_eq!(p.labels[i], want, "pixel {i}: logits {a}, {b}");
    }
    // The last checkpoint loads too, and predicts the same (same tensors here).
    let last = run::load(&dir, Which::Last, None, &DEV)?;
    let q = predict_image(
        &last.model,
        &image(h, w),
        h,
        w,
        Mode::Auto,
        &UserPrompts::default(),
    )?;
    assert_eq!(max_abs_diff(&p.class_logits, &q.class_logits)?, 0.0);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn prompts_change_the_output_per_mode() -> Res<()> {
    let dir = scratch("modes");
    make_run(&dir, 2, 5.0, None)?;
    let model = run::load(&dir, Which::Best, None, &DEV)?.model;
    let (h, w) = (80, 100);
    let rgb = image(h, w);
    let bx = UserPrompts {
        boxes: Some([10.0, 12.0, 60.0, 50.0]),
        ..UserPrompts::default()
    };
    let auto = predict_image(&model, &rgb, h, w, Mode::Auto, &UserPrompts::default())?;
    let manual = predict_image(&model, &rgb, h, w, Mode::Manual, &bx)?;
    let boxed = predict_image(&model, &rgb, h, w, Mode::Box, &bx)?;
    let semi = predict_image(&model, &rgb, h, w, Mode::Semi, &bx)?;
    let auto_box = predict_image(&model, &rgb, h, w, Mode::AutoBox, &bx)?;
    assert!(max_abs_diff(&auto.class_logits, &manual.class_logits)? > 1e-3);
    assert!(max_abs_diff(&auto.class_logits, &semi.class_logits)? > 1e-3);
    assert!(max_abs_diff(&manual.class_logits, &semi.class_logits)? > 1e-3);
    // Box = manual with the box; auto+box = semi with the box.
    assert_eq!(
        max_abs_diff(&manual.class_logits, &boxed.class_logits)?,
        0.0
    );
    assert_eq!(
        max_abs_diff(&semi.class_logits, &auto_box.class_logits)?,
        0.0
    );
    assert!(
        manual.boxes.iter().all(Option::is_none),
        "manual mode has no PPN box"
    );
    // Points and a mask prompt (which replaces the learned dense prompt) also count.
    let clicks = UserPrompts {
        points: vec![(30.0, 40.0, 1), (70.0, 20.0, 0)],
        ..UserPrompts::default()
    };
    let semi_pts = predict_image(&model, &rgb, h, w, Mode::Semi, &clicks)?;
    assert!(max_abs_diff(&auto.class_logits, &semi_pts.class_logits)? > 1e-3);
    let mask = UserPrompts {
        mask: Some(Tensor::full(4f32, (1, 1, 64, 64), &DEV)?),
        ..UserPrompts::default()
    };
    let semi_mask = predict_image(&model, &rgb, h, w, Mode::Semi, &mask)?;
    assert!(max_abs_diff(&auto.class_logits, &semi_mask.class_logits)? > 1e-3);

    // Prompts that do not fit the mode are refused.
    let none = UserPrompts::default();
    let bad_mask = UserPrompts {
        mask: Some(Tensor::zeros(
            (1, 1, 32, 32),
            candle_core::DType::F32,
            &DEV,
        )?),
        ..UserPrompts::default()
    };
    for (mode, p, needle) in [
        (Mode::Auto, &bx, "no user prompts"),
        (Mode::Manual, &none, "at least one prompt"),
        (Mode::Box, &clicks, "exactly one box"),
        (Mode::AutoBox, &none, "exactly one box"),
        (Mode::Semi, &bad_mask, "mask prompt has shape"),
    ] {
        let e = predict_image(&model, &rgb, h, w, mode, p).expect_err("refused");
        assert!(format!("{e:#}").contains(needle), "{mode:?}: {e:#}");
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(())
}

#[test]
fn negative_objectness_empties_every_class() -> Res<()> {
    let (h, w) = (64, 96);
    let rgb = image(h, w);
    // Every mask logit is positive; objectness decides.
    let present = scratch("present");
    make_run(&present, 2, 5.0, Some(1.0))?;
    let model = run::load(&present, Which::Best, None, &DEV)?.model;
    let p = predict_image(&model, &rgb, h, w, Mode::Auto, &UserPrompts::default())?;
    // Both classes have the same positive logits: the first wins the tie everywhere.
    assert!(p.labels.iter().all(|&l| l == 1));
    let gated = scratch("gated");
    make_run(&gated, 2, -5.0, Some(1.0))?;
    let model = run::load(&gated, Which::Best, None, &DEV)?.model;
    for (mode, prompts) in [
        (Mode::Auto, UserPrompts::default()),
        (
            Mode::Manual,
            UserPrompts {
                boxes: Some([5.0, 5.0, 50.0, 40.0]),
                ..UserPrompts::default()
            },
        ),
    ] {
        let p = predict_image(&model, &rgb, h, w, mode, &prompts)?;
        assert!(
            p.labels.iter().all(|&l| l == 0),
            "{mode:?}: a gated class is present"
        );
        let obj = p.object_logits.to_vec1::<f32>()?;
        assert!(obj.iter().all(|&o| o < 0.0), "{obj:?}");
        let logits = p.class_logits.flatten_all()?.to_vec1::<f32>()?;
        assert!(logits.iter().all(|&v| v == EMPTY_LOGIT));
    }
    // Semi-autonomous: a positive click overrules the abstention, a negative one does not.
    let click = |label| UserPrompts {
        points: vec![(20.0, 20.0, label)],
        ..UserPrompts::default()
    };
    let p = predict_image(&model, &rgb, h, w, Mode::Semi, &click(1))?;
    assert!(
        p.labels.iter().all(|&l| l == 1),
        "a positive click was gated"
    );
    let p = predict_image(&model, &rgb, h, w, Mode::Semi, &click(0))?;
    assert!(p.labels.iter().all(|&l| l == 0), "a negative click ungated");
    let _ = std::fs::remove_dir_all(&present);
    let _ = std::fs::remove_dir_all(&gated);
    Ok(())
}

#[test]
fn run_loading_errors_name_the_file() -> Res<()> {
    let err = |dir: &Path, which: Which| -> String {
        format!(
            "{:#}",
            run::load(dir, which, None, &DEV).expect_err("load fails")
        )
    };
    let missing = scratch("missing");
    let e = err(&missing, Which::Best);
    assert!(
        e.contains(&missing.display().to_string()) && e.contains("does not exist"),
        "{e}"
    );

    let dir = scratch("broken");
    make_run(&dir, 1, 5.0, None)?;
    std::fs::remove_file(dir.join(run::LAST_FILE))?;
    let e = err(&dir, Which::Last);
    assert!(
        e.contains(&dir.join(run::LAST_FILE).display().to_string()),
        "{e}"
    );

    std::fs::write(dir.join(run::BEST_FILE), b"not safetensors")?;
    let e = err(&dir, Which::Best);
    assert!(
        e.contains(&dir.join(run::BEST_FILE).display().to_string()),
        "{e}"
    );

    let cfg_path = dir.join(run::CONFIG_FILE);
    std::fs::write(&cfg_path, b"{ not json")?;
    let e = err(&dir, Which::Best);
    assert!(
        e.contains(&cfg_path.display().to_string()) && e.contains("invalid JSON"),
        "{e}"
    );
    std::fs::write(&cfg_path, br#"{"model": {"num_classes": 1}}"#)?;
    let e = err(&dir, Which::Best);
    assert!(e.contains(&cfg_path.display().to_string()), "{e}");

    // A checkpoint of another configuration is refused with its name.
    let other = scratch("other");
    make_run(&other, 1, 5.0, None)?;
    make_run(&dir, 2, 5.0, None)?;
    std::fs::copy(other.join(run::BEST_FILE), dir.join(run::BEST_FILE))?;
    let e = err(&dir, Which::Best);
    assert!(
        e.contains(&dir.join(run::BEST_FILE).display().to_string()),
        "{e}"
    );

    // Base weights that are not the recorded ones are refused.
    let e = format!(
        "{:#}",
        run::load(&other, Which::Best, Some(&dir.join(run::LAST_FILE)), &DEV)
            .expect_err("identity")
    );
    assert!(e.contains("not the file"), "{e}");
    for d in [&dir, &other] {
        let _ = std::fs::remove_dir_all(d);
    }
    Ok(())
}
