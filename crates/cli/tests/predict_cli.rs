//! `sam2rad predict` end to end with a tiny random-init run: label maps of the input's size,
//! overlays and logits, prompts changing the output, and one-line errors naming the file.

mod common;

use std::path::{Path, PathBuf};

use candle_core::Tensor;
use common::{assert_clean_error, assert_ok, load, make_run, max_abs_diff, sam2rad, Res};

fn scratch(name: &str) -> PathBuf {
    common::scratch("predcli", name)
}

/// Writes a grey gradient test image.
fn write_image(path: &Path, w: u32, h: u32) -> Res<()> {
    let img = image::GrayImage::from_fn(w, h, |x, y| image::Luma([((x * 3 + y * 5) % 256) as u8]));
    img.save(path)?;
    Ok(())
}

fn labels(path: &Path) -> Res<image::GrayImage> {
    Ok(image::open(path)?.to_luma8())
}

#[test]
fn predict_writes_label_maps_and_prompts_matter() -> Res<()> {
    let base = scratch("ok");
    let run_dir = base.join("run");
    make_run(&run_dir, 2)?;
    let (a, b) = (base.join("a.png"), base.join("b.png"));
    write_image(&a, 100, 70)?;
    write_image(&b, 64, 90)?;
    let r = run_dir.display().to_string();
    let auto = base.join("auto");
    let out = sam2rad(&[
        "predict",
        "--run",
        &r,
        &a.display().to_string(),
        &b.display().to_string(),
        "--out",
        &auto.display().to_string(),
        "--overlay",
        "--logits",
    ]);
    assert_ok(&out);
    for (stem, w, h) in [("a", 100, 70), ("b", 64, 90)] {
        let l = labels(&auto.join(format!("{stem}.png")))?;
        assert_eq!(l.dimensions(), (w, h));
        assert!(l.pixels().all(|p| p.0[0] <= 2));
        let o = image::open(auto.join(format!("{stem}_overlay.png")))?;
        assert_eq!((o.width(), o.height()), (w, h));
        let t = load(&auto.join(format!("{stem}_logits.safetensors")));
        assert_eq!(t["class_logits"].dims(), &[2, h as usize, w as usize]);
        assert_eq!(t["object_logits"].dims(), &[2]);
        assert_eq!(t["boxes"].dims(), &[2, 4]);
    }

    // Manual mode with a box, and semi-autonomous mode with it, change the logits.
    let logits =
        |dir: &Path| -> Tensor { load(&dir.join("a_logits.safetensors"))["class_logits"].clone() };
    let auto_logits = logits(&auto);
    for (name, extra) in [
        ("manual", vec!["--box", "10,10,60,50", "--manual"]),
        ("semi", vec!["--box", "10,10,60,50", "--point", "30,30,1"]),
    ] {
        let dir = base.join(name);
        let mut args = vec![
            "predict".to_string(),
            "--run".into(),
            r.clone(),
            a.display().to_string(),
            "--out".into(),
            dir.display().to_string(),
            "--logits".into(),
        ];
        args.extend(extra.iter().map(|s| s.to_string()));
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_ok(&sam2rad(&refs));
        assert!(
            max_abs_diff(&auto_logits, &logits(&dir)) > 1e-3,
            "{name} equals auto"
        );
        assert_eq!(labels(&dir.join("a.png"))?.dimensions(), (100, 70));
    }

    // A mask image of the input's size is a valid mask prompt.
    let mask = base.join("mask.png");
    write_image(&mask, 100, 70)?;
    let out = sam2rad(&[
        "predict",
        "--run",
        &r,
        &a.display().to_string(),
        "--out",
        &base.join("masked").display().to_string(),
        "--mask-input",
        &mask.display().to_string(),
    ]);
    assert_ok(&out);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn predict_errors_name_the_file() -> Res<()> {
    let base = scratch("errors");
    let run_dir = base.join("run");
    make_run(&run_dir, 1)?;
    let r = run_dir.display().to_string();
    let img = base.join("img.png");
    write_image(&img, 80, 60)?;
    let i = img.display().to_string();
    let o = base.join("out").display().to_string();

    let missing = base.join("nope").display().to_string();
    assert_clean_error(
        &sam2rad(&["predict", "--run", &missing, &i, "--out", &o]),
        &missing,
    );

    let broken = base.join("broken.png");
    std::fs::write(&broken, b"not an image")?;
    let bad = broken.display().to_string();
    assert_clean_error(&sam2rad(&["predict", "--run", &r, &bad, "--out", &o]), &bad);

    let small = base.join("small.png");
    write_image(&small, 40, 30)?;
    let s = small.display().to_string();
    let out = sam2rad(&["predict", "--run", &r, &i, "--out", &o, "--mask-input", &s]);
    assert_clean_error(&out, &s);

    let out = sam2rad(&["predict", "--run", &r, &i, "--out", &o, "--manual"]);
    assert_clean_error(&out, "--manual needs a prompt");
    let out = sam2rad(&["predict", "--run", &r, &i, "--out", &o, "--box", "5,5,1,1"]);
    assert_eq!(out.status.code(), Some(2), "clap rejects a reversed box");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
