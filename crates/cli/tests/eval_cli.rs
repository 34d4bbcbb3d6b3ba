//! `sam2rad eval` end to end on phantoms: a tiny random-init run (default output folder, the
//! box modes, the last checkpoint), the zero-shot box baseline on the reduced SAM fixture, and
//! one-line errors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use sam2rad_core::run;
use sam2rad_core::{DecoderMode, Sam2Rad, Sam2RadConfig};
use sam2rad_data::phantom::{generate, PhantomClass, PhantomConfig};
use sam2rad_models::checkpoint::Source;
use sam2rad_models::config::{DecoderConfig, EncoderConfig, Family, SamConfig, VitConfig};

type Res<T> = Result<T, Box<dyn std::error::Error>>;

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
        .display()
        .to_string()
}

fn sam2rad(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_sam2rad"))
        .args(args)
        .output()
        .expect("binary runs")
}

fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sam2rad-evalcli-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
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
    candle_core::safetensors::save(&t, dir.join(run::LAST_FILE))?;
    let json = serde_json::json!({
        "format": "sam2rad-run-v1",
        "model": cfg,
        "train": {"weights": null, "random_init_seed": 3},
        "base_weights": {"path": null, "identity": "init:3"},
    });
    std::fs::write(dir.join(run::CONFIG_FILE), serde_json::to_string(&json)?)?;
    Ok(())
}

fn phantoms(dir: &Path, classes: Vec<PhantomClass>) -> Res<()> {
    generate(
        &PhantomConfig {
            train: 1,
            test: 3,
            seed: 5,
            classes,
            empty_fraction: 0.3,
            width_range: (64, 90),
            height_range: (64, 80),
        },
        dir,
    )?;
    Ok(())
}

fn summary(dir: &Path) -> Res<serde_json::Value> {
    Ok(serde_json::from_str(&std::fs::read_to_string(
        dir.join("summary.json"),
    )?)?)
}

#[test]
fn eval_a_run_in_every_mode() -> Res<()> {
    let base = scratch("run");
    let (run_dir, data) = (base.join("run"), base.join("data"));
    make_run(&run_dir, 2)?;
    phantoms(&data, vec![PhantomClass::Bone, PhantomClass::Bursa])?;
    let (r, d) = (run_dir.display().to_string(), data.display().to_string());

    let out = sam2rad(&["eval", "--run", &r, "--data", &d]);
    assert_ok(&out);
    let default_out = run_dir.join("eval-Test-auto");
    let json = summary(&default_out)?;
    assert_eq!(json["mode"], "auto");
    assert_eq!(json["num_images"], 3);
    assert_eq!(json["results"]["all"].as_array().map(Vec::len), Some(6));
    assert!(default_out.join("per_case.csv").is_file());
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        stdout.contains("class 1: Dice") && stdout.contains("class 2: Dice"),
        "{stdout}"
    );
    assert!(stdout.contains(&default_out.join("summary.json").display().to_string()));

    let custom = base.join("boxed");
    let c = custom.display().to_string();
    let out = sam2rad(&[
        "eval",
        "--run",
        &r,
        "--data",
        &d,
        "--mode",
        "auto+box",
        "--out",
        &c,
        "--checkpoint",
        "last",
        "--hd95",
        "--spacing",
        "0.5,0.4",
    ]);
    assert_ok(&out);
    let json = summary(&custom)?;
    assert_eq!(json["mode"], "auto+box");
    assert_eq!(json["surface"]["spacing"][0].as_f64(), Some(0.5));
    assert!(json["model"]
        .as_str()
        .is_some_and(|m| m.contains("last.safetensors")));

    let out = sam2rad(&["eval", "--run", &r, "--data", &d, "--mode", "box"]);
    assert_ok(&out);
    assert!(run_dir.join("eval-Test-box").join("summary.json").is_file());
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn eval_zero_shot_box_baseline() -> Res<()> {
    let base = scratch("zeroshot");
    let data = base.join("data");
    phantoms(&data, vec![PhantomClass::Bone])?;
    let out_dir = base.join("out");
    let out = sam2rad(&[
        "eval",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--data",
        &data.display().to_string(),
        "--mode",
        "box",
        "--out",
        &out_dir.display().to_string(),
    ]);
    assert_ok(&out);
    let json = summary(&out_dir)?;
    assert_eq!(json["mode"], "box");
    assert!(json["model"]
        .as_str()
        .is_some_and(|m| m.contains("zero-shot")));
    assert_eq!(json["results"]["mean"]["1"]["false_positives"], 0);
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}

#[test]
fn eval_errors_are_one_line() -> Res<()> {
    let base = scratch("errors");
    let data = base.join("data");
    phantoms(&data, vec![PhantomClass::Bone, PhantomClass::Bursa])?;
    let d = data.display().to_string();
    let missing = base.join("no-such-run").display().to_string();
    assert_clean_error(
        &sam2rad(&["eval", "--run", &missing, "--data", &d]),
        &missing,
    );

    let run_dir = base.join("run");
    make_run(&run_dir, 2)?;
    let r = run_dir.display().to_string();
    let out = sam2rad(&["eval", "--run", &r, "--data", &d, "--mode", "semi"]);
    assert_clean_error(&out, "auto, box or auto+box");
    let nodata = base.join("no-data").display().to_string();
    assert_clean_error(&sam2rad(&["eval", "--run", &r, "--data", &nodata]), &nodata);

    // A two-class data set evaluated as one class names the mask and the fix.
    let out = sam2rad(&[
        "eval",
        "--model-config",
        &fixture("configs/sam_vit_reduced.json"),
        "--weights",
        &fixture("reference/sam_vit_reduced.safetensors"),
        "--data",
        &d,
        "--out",
        &base.join("zs").display().to_string(),
    ]);
    let ds = sam2rad_data::layout::Dataset::open(&data, "Test")?;
    let has_bursa = ds
        .samples
        .iter()
        .map(|s| sam2rad_data::layout::load_sample(s, 2))
        .collect::<Result<Vec<_>, _>>()?
        .iter()
        .any(|s| s.mask.contains(&2));
    assert!(has_bursa, "the phantoms need a bursa");
    assert_clean_error(&out, "--num-classes");
    let out = sam2rad(&["eval", "--data", &d]);
    assert_clean_error(&out, "--run");
    let _ = std::fs::remove_dir_all(&base);
    Ok(())
}
