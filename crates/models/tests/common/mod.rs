//! Shared helpers of the sam2rad-models tests: fixture paths and tensors, tensor comparisons,
//! deterministic noise, a small decoder configuration and the official key manifests.

#![allow(dead_code)] // each test binary uses a different subset

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;

use candle_core::{DType, Device, Tensor};
use sam2rad_models::config::DecoderConfig;

pub type Res<T> = Result<T, Box<dyn std::error::Error>>;

/// `fixtures/<rel>` of the repository.
pub fn fixture(rel: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../../fixtures")
        .join(rel)
}

/// `fixtures/reference/<name>`: the reduced reference models, their inputs and outputs.
pub fn reference_file(name: &str) -> PathBuf {
    fixture("reference").join(name)
}

/// Every tensor of the safetensors file `fixtures/reference/<name>`.
pub fn load_reference(name: &str) -> Res<HashMap<String, Tensor>> {
    Ok(candle_core::safetensors::load(
        reference_file(name),
        &Device::Cpu,
    )?)
}

/// The tensor `key` of a fixture file.
pub fn get<'a>(map: &'a HashMap<String, Tensor>, key: &str) -> Res<&'a Tensor> {
    map.get(key)
        .ok_or_else(|| format!("fixture tensor `{key}` missing").into())
}

/// Max |t| over all elements, in f32.
pub fn max_abs(t: &Tensor) -> Res<f32> {
    Ok(t.to_dtype(DType::F32)?
        .abs()?
        .flatten_all()?
        .max(0)?
        .to_scalar::<f32>()?)
}

/// Max |a − b| in f32; an error when the shapes differ.
pub fn max_abs_diff(a: &Tensor, b: &Tensor) -> Res<f32> {
    max_abs(&(a.to_dtype(DType::F32)? - b.to_dtype(DType::F32)?)?)
}

/// An error when `ours` and `reference` hold different numbers of elements.
pub fn check_elem_count(what: &str, ours: &Tensor, reference: &Tensor) -> Res<()> {
    if ours.elem_count() != reference.elem_count() {
        return Err(format!(
            "{what}: shape {:?} vs reference {:?}",
            ours.dims(),
            reference.dims()
        )
        .into());
    }
    Ok(())
}

/// An error when a mask logit of `ours` has the other sign than `reference` where |ref| > 1e-3.
pub fn check_no_flips(case: &str, ours: &Tensor, reference: &Tensor) -> Res<()> {
    let ours: Vec<f32> = ours.flatten_all()?.to_vec1()?;
    let theirs: Vec<f32> = reference.flatten_all()?.to_vec1()?;
    let flipped = ours
        .iter()
        .zip(&theirs)
        .filter(|(o, t)| t.abs() > 1e-3 && (**o > 0.0) != (**t > 0.0))
        .count();
    if flipped > 0 {
        return Err(format!("{case}: {flipped} mask pixels flip where |ref| > 1e-3").into());
    }
    Ok(())
}

/// Subsamples `[1, 3, S, S]` as `x[..., off::8, off::8]`.
pub fn stride8(x: &Tensor, off: usize) -> Res<Tensor> {
    let s = x.dim(3)?;
    let idx = Tensor::new(
        (off..s).step_by(8).map(|i| i as u32).collect::<Vec<_>>(),
        &Device::Cpu,
    )?;
    Ok(x.index_select(&idx, 2)?.index_select(&idx, 3)?)
}

/// Deterministic pseudo-random values in [-1, 1) (no dependence on candle's RNG).
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

/// A small mask decoder (2 heads, MLP 24, IoU head 16 wide) for 16-wide random models.
pub fn small_decoder() -> DecoderConfig {
    DecoderConfig {
        depth: 2,
        num_heads: 2,
        mlp_dim: 24,
        num_multimask_outputs: 3,
        iou_head_depth: 3,
        iou_head_hidden_dim: 16,
    }
}

/// The official manifest `fixtures/manifests/<file>` (JSON).
pub fn manifest(file: &str) -> Res<serde_json::Value> {
    let text = std::fs::read_to_string(fixture(&format!("manifests/{file}")))?;
    Ok(serde_json::from_str(&text)?)
}

/// Key → shape of every tensor of a manifest's state dict.
pub fn manifest_shapes(manifest: &serde_json::Value) -> Res<BTreeMap<String, Vec<usize>>> {
    let tensors = manifest["state_dict"]["tensors"]
        .as_array()
        .ok_or("tensor list")?;
    let mut out = BTreeMap::new();
    for t in tensors {
        let key = t["key"].as_str().ok_or("key")?.to_string();
        let shape = t["shape"]
            .as_array()
            .ok_or("shape")?
            .iter()
            .map(|d| d.as_u64().map(|d| d as usize).ok_or("dim"))
            .collect::<Result<Vec<_>, _>>()?;
        out.insert(key, shape);
    }
    Ok(out)
}
