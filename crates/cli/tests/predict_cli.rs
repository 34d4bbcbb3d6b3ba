//! `sam2rad predict` end to end with a tiny random-init run: label maps of the input's size,
//! overlays and logits, prompts changing the output, and one-line errors naming the file.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use sam2rad_core::run;
use sam2rad_core::{DecoderMode, Sam2Rad, Sam2RadConfig};
use sam2rad_models::checkpoint::Source;
use sam2rad_models::config::{DecoderConfig, EncoderConfig, Family, SamConfig, VitConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn sam2rad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sam2rad"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sam2rad-predcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The command failed with exit code 1 and a single-line error that mentions `needle`.
fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {stderr}");
}

fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "stderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A tiny SAM ViT (width 32, 2 blocks, 256 input).
fn tiny_sam() -> SamConfig {
    SamConfig {
        name: "tiny-sam".into(),
        family: Family::Sam,
        encoder: EncoderConfig::Vit(VitConfig {
            embed_dim: 32,
            depth: 2,
            num_heads: 2,
            global_attn_indexes: vec![1],
            window_size: 4,
            patch_size: 16,
            mlp_ratio: 4.0,
        }),
        prompt_embed_dim: 32,
        image_size: 256,
        decoder: DecoderConfig {
            mlp_dim: 64,
            iou_head_hidden_dim: 32,
            ..DecoderConfig::default()
        },
    }
}

/// A run folder in training's format: random-init base (seed 3), objectness always positive.
fn make_run(dir: &Path, classes: usize) -> Res<()> {
    let dev = Device::Cpu;
    let cfg = Sam2RadConfig {
        num_tokens: 4,
        decoder: DecoderMode::Lora,
        ..Sam2RadConfig::new(tiny_sam(), classes)
    };
    let model = Sam2Rad::new(
        &cfg,
        Source::Init { seed: 3 },
        Source::Init { seed: 7 },
        &dev,
    )?;
    let mut t: std::collections::HashMap<String, Tensor> =
        model.trained_tensors().into_iter().collect();
    for (key, v) in [
        ("objectness.head.layers.2.weight", 0f32),
        ("objectness.head.layers.2.bias", 5.0),
    ] {
        let shape = t.get(key).ok_or(key)?.dims().to_vec();
        t.insert(key.into(), Tensor::full(v, shape, &dev)?);
    }
    std::fs::create_dir_all(dir)?;
    candle_core::safetensors::save(&t, dir.join(run::BEST_FILE))?;
    let json = serde_json::json!({
        "model": cfg,
        "train": {"weights": null, "random_init_seed": 3},
    });
    std::fs::write(dir.join(run::CONFIG_FILE), serde_json::to_string(&json)?)?;
    Ok(())
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
        let t = candle_core::safetensors::load(
            auto.join(format!("{stem}_logits.safetensors")),
            &Device::Cpu,
        )?;
        assert_eq!(t["class_logits"].dims(), &[2, h as usize, w as usize]);
        assert_eq!(t["object_logits"].dims(), &[2]);
        assert_eq!(t["boxes"].dims(), &[2, 4]);
    }

    // Manual mode with a box, and semi-autonomous mode with it, change the logits.
    let logits = |dir: &Path| -> Res<Tensor> {
        let t = candle_core::safetensors::load(dir.join("a_logits.safetensors"), &Device::Cpu)?;
        Ok(t["class_logits"].clone())
    };
    let diff = |x: &Tensor, y: &Tensor| -> Res<f32> {
        Ok((x - y)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
    };
    let auto_logits = logits(&auto)?;
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
            diff(&auto_logits, &logits(&dir)?)? > 1e-3,
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
