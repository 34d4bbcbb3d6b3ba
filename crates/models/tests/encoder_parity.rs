//! Image-encoder parity with the official PyTorch outputs on the reduced reference models
//! (SAM ViT and MobileSAM TinyViT), from both `.safetensors` and `.pt` weights.

mod common;

use std::sync::Arc;
use std::time::Instant;

use candle_core::{Device, Tensor};
use common::{max_abs_diff, reference_file, Res};
use sam2rad_models::checkpoint::{Checkpoint, Source, WeightsBackend};
use sam2rad_models::config::{
    DecoderConfig, EncoderConfig, Family, SamConfig, TinyVitConfig, VitConfig,
};
use sam2rad_models::encoder::ImageEncoder;
use sam2rad_models::preprocess::{load_rgb, sam_preprocess};

fn reduced_vit() -> SamConfig {
    SamConfig {
        name: "sam-vit-reduced".into(),
        family: Family::Sam,
        encoder: EncoderConfig::Vit(VitConfig {
            embed_dim: 64,
            depth: 2,
            num_heads: 2,
            global_attn_indexes: vec![1],
            window_size: 14,
            patch_size: 16,
            mlp_ratio: 4.0,
        }),
        prompt_embed_dim: 32,
        image_size: 1024,
        decoder: DecoderConfig::default(),
    }
}

fn reduced_tiny_vit() -> SamConfig {
    SamConfig {
        name: "mobile-sam-reduced".into(),
        family: Family::MobileSam,
        encoder: EncoderConfig::TinyVit(TinyVitConfig {
            embed_dims: vec![16, 32, 48, 320],
            depths: vec![1, 1, 1, 1],
            num_heads: vec![1, 2, 3, 5],
            window_sizes: vec![7, 7, 14, 7],
            mlp_ratio: 1.0,
            mbconv_expand_ratio: 4.0,
            local_conv_size: 3,
        }),
        prompt_embed_dim: 256,
        image_size: 1024,
        decoder: DecoderConfig::default(),
    }
}

fn input() -> Res<Tensor> {
    let img = load_rgb(&reference_file("image_300x400.png"))?;
    Ok(sam_preprocess(&img.data, img.height, img.width, 1024, &Device::Cpu)?.input)
}

/// Builds the encoder from `weights`, checks every image-encoder key was used, and returns the
/// max abs error of the embedding against `outputs` plus the levels.
fn parity(cfg: &SamConfig, weights: &str, outputs: &str) -> Res<(f32, Vec<Tensor>)> {
    let ckpt = Arc::new(Checkpoint::load(&reference_file(weights))?);
    let backend = WeightsBackend::frozen(ckpt);
    let encoder = ImageEncoder::new(cfg, backend.var_builder(&Device::Cpu))?;
    backend.check_unexpected(&["prompt_encoder.", "mask_decoder."])?;
    let x = input()?;
    let start = Instant::now();
    let (emb, levels) = encoder.forward_levels(&x)?;
    let secs = start.elapsed().as_secs_f64();
    let mut refs = candle_core::safetensors::load(reference_file(outputs), &Device::Cpu)?;
    let want = refs
        .remove("image_embeddings")
        .ok_or("no image_embeddings")?;
    assert_eq!(emb.dims(), want.dims());
    let err = max_abs_diff(&emb, &want)?;
    let plain = encoder.forward(&x)?;
    assert_eq!(
        max_abs_diff(&emb, &plain)?,
        0.0,
        "forward and forward_levels disagree"
    );
    println!("{weights}: image_embeddings max abs error {err:.3e} ({secs:.2} s)");
    assert_eq!(levels.len(), 2);
    for (l, c) in levels.iter().zip(encoder.level_channels()) {
        assert_eq!(l.dims(), &[1, c, 64, 64]);
    }
    Ok((err, levels))
}

#[test]
fn sam_vit_reduced_safetensors() -> Res<()> {
    let (err, _) = parity(
        &reduced_vit(),
        "sam_vit_reduced.safetensors",
        "sam_vit_reduced_outputs.safetensors",
    )?;
    assert!(err <= 1e-4, "max abs error {err}");
    Ok(())
}

#[test]
fn sam_vit_reduced_pt() -> Res<()> {
    let (err, _) = parity(
        &reduced_vit(),
        "sam_vit_reduced.pt",
        "sam_vit_reduced_outputs.safetensors",
    )?;
    assert!(err <= 1e-4, "max abs error {err}");
    Ok(())
}

#[test]
fn tiny_vit_reduced_safetensors() -> Res<()> {
    let (err, levels) = parity(
        &reduced_tiny_vit(),
        "mobile_sam_tinyvit_reduced.safetensors",
        "mobile_sam_tinyvit_reduced_outputs.safetensors",
    )?;
    assert!(err <= 1e-4, "max abs error {err}");
    // depths [1,1,1,1]: the last block of stage 2 (48 wide) and of stage 3 (320 wide).
    assert_eq!(levels[0].dim(1)?, 48);
    assert_eq!(levels[1].dim(1)?, 320);
    Ok(())
}

#[test]
fn tiny_vit_reduced_pt() -> Res<()> {
    let (err, _) = parity(
        &reduced_tiny_vit(),
        "mobile_sam_tinyvit_reduced.pt",
        "mobile_sam_tinyvit_reduced_outputs.safetensors",
    )?;
    assert!(err <= 1e-4, "max abs error {err}");
    Ok(())
}

/// Wall time of the full-size encoders with random weights on a random input
/// (`cargo test --release -p sam2rad-models --test encoder_parity -- --ignored --nocapture`).
#[test]
#[ignore = "slow: full-size encoder timing"]
fn full_size_encoder_timing() -> Res<()> {
    let x = Tensor::randn(0f32, 1.0, (1, 3, 1024, 1024), &Device::Cpu)?;
    for preset in ["mobile-sam", "sam-vit-b"] {
        let cfg = SamConfig::preset(preset)?;
        let backend = WeightsBackend::new(Source::Random { seed: 7, std: 0.02 }, |_| false);
        let encoder = ImageEncoder::new(&cfg, backend.var_builder(&Device::Cpu))?;
        let mut times = Vec::new();
        for _ in 0..2 {
            let start = Instant::now();
            let emb = encoder.forward(&x)?;
            times.push(start.elapsed().as_secs_f64());
            assert_eq!(emb.dims(), &[1, 256, 64, 64]);
        }
        println!("{preset}: encoder {:.2} s, {:.2} s", times[0], times[1]);
    }
    Ok(())
}
