//! Shared helpers of the sam2rad-core tests: tiny base configurations, deterministic noise, inputs,
//! scratch folders, run folders of a tiny random-init model, tensor comparisons.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use sam2rad_core::run;
use sam2rad_core::{DecoderMode, Sam2Rad, Sam2RadConfig};
use sam2rad_data::layout::{load_sample, Dataset, LoadedSample};
use sam2rad_models::checkpoint::Source;
use sam2rad_models::config::{DecoderConfig, EncoderConfig, Family, SamConfig, VitConfig};

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// A tiny SAM ViT (width 32, 2 blocks, 256 input: 16×16 embedding, 64×64 masks).
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
        decoder: tiny_decoder(),
    }
}

/// The reduced SAM 2.1 Hiera fixture at a 256 input (width 32: 16² embedding, 32²/64² skips).
pub fn tiny_sam2() -> Res<SamConfig> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures/configs/sam2.1_hiera_reduced.json");
    let mut cfg = SamConfig::from_json_file(&path)?;
    cfg.image_size = 256;
    cfg.decoder = tiny_decoder();
    Ok(cfg)
}

/// The official decoder layout (8 heads, depth 2) with a narrow MLP.
fn tiny_decoder() -> DecoderConfig {
    DecoderConfig {
        mlp_dim: 64,
        iou_head_hidden_dim: 32,
        ..DecoderConfig::default()
    }
}

/// Deterministic pseudo-random values in [-1, 1).
pub fn noise(shape: &[usize], seed: u64) -> Res<Tensor> {
    let n: usize = shape.iter().product();
    let mut s = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
    let v: Vec<f32> = (0..n)
        .map(|_| {
            s = s
                .wrapping_mul(6_364_136_223_846_793_005)
                .wrapping_add(1_442_695_040_888_963_407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        })
        .collect();
    Ok(Tensor::from_vec(v, shape, &Device::Cpu)?)
}

/// Binary targets `[R, 1, s, s]`: row r gets the rectangle `rects[r]` (x0, y0, x1, y1 exclusive)
/// or stays empty.
pub fn rect_targets(s: usize, rects: &[Option<[usize; 4]>]) -> Res<Tensor> {
    let mut v = vec![0f32; rects.len() * s * s];
    for (r, rect) in rects.iter().enumerate() {
        if let Some([x0, y0, x1, y1]) = rect {
            for y in *y0..*y1 {
                for x in *x0..*x1 {
                    v[r * s * s + y * s + x] = 1.0;
                }
            }
        }
    }
    Ok(Tensor::from_vec(v, (rects.len(), 1, s, s), &Device::Cpu)?.to_dtype(DType::F32)?)
}

/// Max |a − b| over all elements.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// The scratch folder `sam2rad-<tag>-<pid>-<name>` under the system temp folder, removed if it
/// exists (not created).
pub fn scratch(tag: &str, name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("sam2rad-{tag}-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Every sample of `ds` loaded with `classes` classes.
pub fn samples(ds: &Dataset, classes: usize) -> Res<Vec<LoadedSample>> {
    Ok(ds
        .samples
        .iter()
        .map(|s| load_sample(s, classes))
        .collect::<Result<_, _>>()?)
}

/// Random-init seed of the base model of [`make_run`].
const RUN_SEED: u64 = 3;

/// Replaces `key` by a tensor of its shape filled with `v`.
fn fill(t: &mut BTreeMap<String, Tensor>, key: &str, v: f32) -> Res<()> {
    let old = t
        .get(key)
        .ok_or_else(|| format!("no trained tensor `{key}`"))?;
    let new = Tensor::full(v, old.dims(), &Device::Cpu)?;
    t.insert(key.to_string(), new);
    Ok(())
}

/// Writes a run folder (training's format: best and last checkpoints, config.json) for a tiny
/// random-init model with `classes` classes. The objectness head always answers `objectness`;
/// with `fill_logit = Some(v)` every mask logit is the constant `v`-signed value (zero final
/// upscaling conv with bias 1, hypernetwork bias `v`).
pub fn make_run(dir: &Path, classes: usize, objectness: f32, fill_logit: Option<f32>) -> Res<()> {
    let cfg = Sam2RadConfig {
        num_tokens: 4,
        decoder: DecoderMode::Lora,
        ..Sam2RadConfig::new(tiny_sam(), classes)
    };
    let model = Sam2Rad::new(
        &cfg,
        Source::Init { seed: RUN_SEED },
        Source::Init { seed: 7 },
        &Device::Cpu,
    )?;
    let mut t = model.trained_tensors();
    fill(&mut t, "objectness.head.layers.2.weight", 0.0)?;
    fill(&mut t, "objectness.head.layers.2.bias", objectness)?;
    if let Some(v) = fill_logit {
        fill(&mut t, "mask_decoder.output_upscaling.3.weight", 0.0)?;
        fill(&mut t, "mask_decoder.output_upscaling.3.bias", 1.0)?;
        fill(
            &mut t,
            "mask_decoder.output_hypernetworks_mlps.0.layers.2.weight",
            0.0,
        )?;
        fill(
            &mut t,
            "mask_decoder.output_hypernetworks_mlps.0.layers.2.bias",
            v,
        )?;
    }
    std::fs::create_dir_all(dir)?;
    let map: HashMap<String, Tensor> = t.into_iter().collect();
    candle_core::safetensors::save(&map, dir.join(run::BEST_FILE))?;
    candle_core::safetensors::save(&map, dir.join(run::LAST_FILE))?;
    let json = serde_json::json!({
        "format": "sam2rad-run-v1",
        "model": cfg,
        "train": {"weights": null, "random_init_seed": RUN_SEED},
        "base_weights": {"path": null, "identity": format!("init:{RUN_SEED}")},
    });
    std::fs::write(
        dir.join(run::CONFIG_FILE),
        serde_json::to_string_pretty(&json)?,
    )?;
    Ok(())
}
