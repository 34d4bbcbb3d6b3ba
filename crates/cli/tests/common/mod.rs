//! Shared helpers of the `sam2rad` binary tests: running the binary, scratch folders, fixtures,
//! the one-line-error check, safetensors and tensor comparisons, and a tiny run folder.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use candle_core::{Device, Tensor};
use sam2rad_core::run;
use sam2rad_core::{DecoderMode, Sam2Rad, Sam2RadConfig};
use sam2rad_models::checkpoint::Source;
use sam2rad_models::config::{DecoderConfig, EncoderConfig, Family, SamConfig, VitConfig};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `fixtures/<name>` of the repository.
pub fn fixture_path(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(name)
}

/// `fixtures/<name>` as a command-line argument.
pub fn fixture(name: &str) -> String {
    fixture_path(name).display().to_string()
}

/// The `sam2rad` binary under test.
pub fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_sam2rad"))
}

/// Runs the binary to completion with `args`.
pub fn sam2rad(args: &[&str]) -> Output {
    bin().args(args).output().expect("binary runs")
}

/// A fresh, empty scratch folder `sam2rad-<tag>-<pid>-<name>` under the system temp folder.
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sam2rad-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("scratch dir");
    dir
}

/// The command succeeded.
pub fn assert_ok(out: &Output) {
    assert!(
        out.status.success(),
        "status {:?}\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The command failed with exit code 1 and a single-line error that mentions `needle`.
pub fn assert_clean_error(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(1), "exit code; stderr: {stderr}");
    assert!(!stderr.contains("panicked"), "panic: {stderr}");
    let lines: Vec<&str> = stderr.lines().filter(|l| l.starts_with("error:")).collect();
    assert_eq!(lines.len(), 1, "one error line expected: {stderr}");
    assert!(lines[0].contains(needle), "`{needle}` not in: {stderr}");
}

/// Every tensor of a safetensors file.
pub fn load(path: &Path) -> HashMap<String, Tensor> {
    candle_core::safetensors::load(path, &Device::Cpu).expect("safetensors")
}

/// Max |t| over all elements.
pub fn max_abs(t: &Tensor) -> f32 {
    t.abs()
        .and_then(|t| t.flatten_all())
        .and_then(|t| t.max(0))
        .and_then(|t| t.to_scalar::<f32>())
        .expect("max")
}

/// Max |a − b| of two tensors of the same shape.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> f32 {
    assert_eq!(a.dims(), b.dims());
    max_abs(&(a - b).expect("diff"))
}

/// A tiny SAM ViT (width 32, 2 blocks, 256 input).
pub fn tiny_sam() -> SamConfig {
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

/// A run folder in training's format (best and last checkpoints, config.json): random-init base
/// (seed 3), objectness always positive.
pub fn make_run(dir: &Path, classes: usize) -> Res<()> {
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
    let mut t: HashMap<String, Tensor> = model.trained_tensors().into_iter().collect();
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
