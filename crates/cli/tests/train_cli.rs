//! `sam2rad train` through the binary: a run killed with SIGKILL and resumed ends bit-identical
//! to an uninterrupted one; option errors are single clear lines.

mod common;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant};

use candle_core::Tensor;
use common::{assert_clean_error, assert_ok, bin, load, sam2rad};
use sam2rad_data::phantom::{generate, PhantomConfig};

/// A tiny SAM ViT (width 32, 2 blocks, 256 input) as a `--model-config` file.
const TINY_SAM: &str = r#"{"name": "tiny-sam", "family": "sam",
  "encoder": {"type": "vit", "embed_dim": 32, "depth": 2, "num_heads": 2,
              "global_attn_indexes": [1], "window_size": 4, "patch_size": 16, "mlp_ratio": 4.0},
  "prompt_embed_dim": 32, "image_size": 256,
  "decoder": {"depth": 2, "num_heads": 8, "mlp_dim": 64, "num_multimask_outputs": 3,
              "iou_head_depth": 3, "iou_head_hidden_dim": 32}}"#;

fn scratch(name: &str) -> PathBuf {
    common::scratch("train-cli", name)
}

/// Small phantoms and the tiny model config under `dir`; returns (data, config) paths.
fn setup(dir: &Path, train: usize) -> (PathBuf, PathBuf) {
    let data = dir.join("data");
    generate(
        &PhantomConfig {
            train,
            test: 0,
            seed: 3,
            width_range: (160, 200),
            height_range: (120, 160),
            ..PhantomConfig::default()
        },
        &data,
    )
    .expect("phantoms");
    let cfg = dir.join("tiny.json");
    std::fs::write(&cfg, TINY_SAM).expect("config");
    (data, cfg)
}

/// Training arguments for the tiny model: 4 epochs of 7 steps (14 train + 2 val images).
fn train_args<'a>(data: &'a str, cfg: &'a str, out: &'a str) -> Vec<&'a str> {
    vec![
        "train",
        "--data",
        data,
        "--model-config",
        cfg,
        "--random-init",
        "--out",
        out,
        "--epochs",
        "4",
        "--batch",
        "2",
        "--views",
        "2",
    ]
}

fn bits(t: &Tensor) -> Vec<u32> {
    t.flatten_all()
        .and_then(|t| t.to_vec1::<f32>())
        .expect("f32 tensor")
        .iter()
        .map(|v| v.to_bits())
        .collect()
}

fn metrics_rows(run: &Path) -> usize {
    std::fs::read_to_string(run.join("metrics.csv"))
        .map(|t| t.lines().count().saturating_sub(1))
        .unwrap_or(0)
}

#[test]
fn sigkill_then_resume_equals_uninterrupted() {
    let dir = scratch("kill");
    let (data, cfg) = setup(&dir, 16);
    let (data, cfg) = (data.display().to_string(), cfg.display().to_string());
    let a = dir.join("a").display().to_string();
    let b = dir.join("b").display().to_string();

    let t = Instant::now();
    assert_ok(&sam2rad(&train_args(&data, &cfg, &a)));
    let full_secs = t.elapsed().as_secs_f64();

    // Start the same run, kill it as soon as epoch 1 is committed.
    let mut child = bin()
        .args(train_args(&data, &cfg, &b))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn");
    let state = Path::new(&b).join("last.state.safetensors");
    let deadline = Instant::now() + Duration::from_secs(120);
    while !state.is_file() {
        if let Ok(Some(status)) = child.try_wait() {
            panic!("training ended ({status}) before its first checkpoint");
        }
        assert!(Instant::now() < deadline, "no checkpoint within 120 s");
        std::thread::sleep(Duration::from_millis(10));
    }
    child.kill().expect("SIGKILL");
    let status = child.wait().expect("reaped");
    assert!(!status.success(), "killed, not finished");
    let done = metrics_rows(Path::new(&b));
    assert!((1..4).contains(&done), "{done} epochs recorded at the kill");

    let out = sam2rad(&["train", "--out", &b, "--resume"]);
    assert_ok(&out);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("resuming at epoch"), "{stderr}");
    assert_eq!(metrics_rows(Path::new(&b)), 4);

    for file in ["last.safetensors", "best.safetensors"] {
        let (x, y) = (
            load(&Path::new(&a).join(file)),
            load(&Path::new(&b).join(file)),
        );
        assert_eq!(x.len(), y.len(), "{file}: key sets");
        for (k, t) in &x {
            assert!(bits(t) == bits(&y[k]), "{file}: `{k}` differs after resume");
        }
    }
    println!("uninterrupted run: {full_secs:.1} s, killed after {done} epoch(s)");
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn option_errors_are_one_line() {
    let dir = scratch("errors");
    let (data, cfg) = setup(&dir, 4);
    let (data, cfg) = (data.display().to_string(), cfg.display().to_string());
    let out_dir = dir.join("run").display().to_string();

    let out = sam2rad(&[
        "train",
        "--model-config",
        &cfg,
        "--random-init",
        "--out",
        &out_dir,
    ]);
    assert_clean_error(&out, "--data");
    let out = sam2rad(&[
        "train",
        "--data",
        &data,
        "--model-config",
        &cfg,
        "--out",
        &out_dir,
    ]);
    assert_clean_error(&out, "--random-init");
    let out = sam2rad(&["train", "--out", &out_dir, "--resume"]);
    assert_clean_error(&out, "config.json");
    let out = sam2rad(&[
        "train",
        "--data",
        &data,
        "--model",
        "sam-vit-nope",
        "--random-init",
        "--out",
        &out_dir,
    ]);
    assert_clean_error(&out, "sam-vit-nope");

    let mut args = train_args(&data, &cfg, &out_dir);
    args[9] = "1"; // one epoch
    assert_ok(&sam2rad(&args));
    let out = sam2rad(&["train", "--out", &out_dir, "--resume", "--epochs", "5"]);
    assert_clean_error(&out, "--epochs 5 vs 1");
    let out = sam2rad(&args);
    assert_clean_error(&out, "already holds a training run");
    let _ = std::fs::remove_dir_all(&dir);
}
