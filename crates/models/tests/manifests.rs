//! The models our presets build have exactly the keys and shapes of the official checkpoints
//! (manifests listed from the official builders), without allocating the weights.

mod common;

use std::collections::BTreeMap;

use candle_core::Device;
use sam2rad_models::checkpoint::{diff_key_shapes, is_ignored_key, Source, WeightsBackend};
use sam2rad_models::config::SamConfig;
use sam2rad_models::detect::parameter_count;
use sam2rad_models::sam::Sam;

struct Manifest {
    shapes: BTreeMap<String, Vec<usize>>,
    num_parameters: usize,
}

fn manifest(file: &str) -> Manifest {
    let v = common::manifest(file).expect("manifest readable JSON");
    let shapes = common::manifest_shapes(&v).expect("tensor list");
    let num_parameters = v["num_parameters"].as_u64().expect("num_parameters") as usize;
    Manifest {
        shapes,
        num_parameters,
    }
}

fn numel(shape: &[usize]) -> usize {
    shape.iter().product()
}

fn check(preset: &str, file: &str) {
    let m = manifest(file);
    // Our buffer rule reproduces PyTorch's parameter count of the official model.
    let all = parameter_count(m.shapes.iter().map(|(k, s)| (k.as_str(), numel(s))));
    assert_eq!(all, m.num_parameters, "{preset}: parameter count rule");

    let cfg = SamConfig::preset(preset).expect("preset");
    let backend = WeightsBackend::new(Source::Zeros, |_| false);
    Sam::new(&cfg, backend.var_builder(&Device::Cpu)).expect("model builds from zeros");
    let built = backend.used();
    let expected: BTreeMap<String, Vec<usize>> = m
        .shapes
        .into_iter()
        .filter(|(k, _)| !is_ignored_key(k))
        .collect();
    let diff = diff_key_shapes(&built, &expected);
    assert!(
        diff.is_empty(),
        "{preset} differs from {file}:\n{}",
        diff.join("\n")
    );
}

#[test]
fn sam_vit_b_matches_official_keys() {
    check("sam-vit-b", "sam_vit_b.json");
}

#[test]
fn sam_vit_l_matches_official_keys() {
    check("sam-vit-l", "sam_vit_l.json");
}

#[test]
fn sam_vit_h_matches_official_keys() {
    check("sam-vit-h", "sam_vit_h.json");
}

#[test]
fn medsam_has_the_vit_b_layout() {
    check("medsam", "sam_vit_b.json");
}

#[test]
fn mobile_sam_matches_official_keys() {
    check("mobile-sam", "mobile_sam_vit_t.json");
    // The keys we skip are exactly TinyViT's classifier and the BatchNorm step counters.
    let m = manifest("mobile_sam_vit_t.json");
    let skipped: Vec<&String> = m.shapes.keys().filter(|k| is_ignored_key(k)).collect();
    assert!(skipped.iter().all(|k| k.starts_with("image_encoder.head.")
        || k.starts_with("image_encoder.norm_head.")
        || k.ends_with(".num_batches_tracked")));
    assert_eq!(
        skipped
            .iter()
            .filter(|k| !k.ends_with(".num_batches_tracked"))
            .count(),
        4,
        "head.weight, head.bias, norm_head.weight, norm_head.bias"
    );
}
