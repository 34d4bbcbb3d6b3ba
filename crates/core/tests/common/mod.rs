//! Shared helpers of the sam2rad-core tests: tiny base configurations, deterministic noise, inputs.

#![allow(dead_code)] // each test binary uses a different subset

use candle_core::{DType, Device, Tensor};
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
