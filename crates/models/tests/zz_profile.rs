//! TEMPORARY profiling harness (to be deleted).
use std::time::Instant;
use candle_core::{Device, Tensor};
use sam2rad_models::checkpoint::{Source, WeightsBackend};
use sam2rad_models::config::SamConfig;
use sam2rad_models::encoder::ImageEncoder;

fn once(preset: &str) {
    let x = Tensor::randn(0f32, 1.0, (1, 3, 1024, 1024), &Device::Cpu).unwrap();
    let cfg = SamConfig::preset(preset).unwrap();
    let backend = WeightsBackend::new(Source::Random { seed: 7, std: 0.02 }, |_| false);
    let encoder = ImageEncoder::new(&cfg, backend.var_builder(&Device::Cpu)).unwrap();
    let start = Instant::now();
    let _ = encoder.forward(&x).unwrap();
    println!("{preset}: {:.2}", start.elapsed().as_secs_f64());
}
#[test] #[ignore] fn prof_mobile() { once("mobile-sam"); }
#[test] #[ignore] fn prof_vitb() { once("sam-vit-b"); }
