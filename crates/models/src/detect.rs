//! Recognises which official model a weights file holds, from its key names and shapes alone.

use crate::checkpoint::Checkpoint;

/// What `inspect` reports about a weights file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Detected {
    /// Human-readable family, e.g. "SAM ViT" or "MobileSAM (TinyViT)".
    pub family: String,
    /// The matching preset, if the layout is an official one.
    pub preset: Option<String>,
    /// Extra remarks (e.g. MedSAM shares the ViT-B layout).
    pub note: Option<String>,
}

/// True for tensors that PyTorch keeps as buffers rather than parameters (not counted as
/// parameters, matching `sum(p.numel() for p in model.parameters())`).
pub fn is_buffer_key(key: &str) -> bool {
    key.ends_with("positional_encoding_gaussian_matrix")
        || key.ends_with(".running_mean")
        || key.ends_with(".running_var")
        || key.ends_with(".num_batches_tracked")
}

/// Number of parameters (all tensor elements except buffers).
pub fn parameter_count<'a>(shapes: impl Iterator<Item = (&'a str, usize)>) -> usize {
    shapes
        .filter(|(k, _)| !is_buffer_key(k))
        .map(|(_, n)| n)
        .sum()
}

fn block_count(ckpt: &Checkpoint, prefix: &str) -> usize {
    let mut n = 0;
    while ckpt
        .tensors
        .keys()
        .any(|k| k.starts_with(&format!("{prefix}{n}.")))
    {
        n += 1;
    }
    n
}

/// Identifies the family and preset of a checkpoint.
pub fn detect(ckpt: &Checkpoint) -> Detected {
    let t = &ckpt.tensors;
    if let Some(pos) = t.get("image_encoder.trunk.pos_embed") {
        let dim = pos.dims().get(1).copied().unwrap_or(0);
        let blocks = block_count(ckpt, "image_encoder.trunk.blocks.");
        let version = if t.contains_key("no_obj_embed_spatial") {
            "sam2.1"
        } else {
            "sam2"
        };
        let size = match (dim, blocks) {
            (96, 12) => Some("t"),
            (96, 16) => Some("s"),
            (112, 24) => Some("b+"),
            (144, 48) => Some("l"),
            _ => None,
        };
        return Detected {
            family: format!("SAM 2 (Hiera, {version} layout)"),
            preset: size.map(|s| format!("{version}-hiera-{s}")),
            note: Some(format!("trunk width {dim}, {blocks} blocks")),
        };
    }
    if t.contains_key("image_encoder.patch_embed.seq.0.c.weight") {
        let official = t
            .get("image_encoder.patch_embed.seq.2.c.weight")
            .map(|w| w.dims() == [64, 32, 3, 3])
            .unwrap_or(false)
            && block_count(ckpt, "image_encoder.layers.2.blocks.") == 6;
        return Detected {
            family: "MobileSAM (TinyViT)".into(),
            preset: official.then(|| "mobile-sam".to_string()),
            note: (!t.contains_key("mask_decoder.iou_token.weight"))
                .then(|| "image encoder only (no prompt encoder / mask decoder keys)".to_string()),
        };
    }
    if let Some(pos) = t.get("image_encoder.pos_embed") {
        let dim = pos.dims().last().copied().unwrap_or(0);
        let depth = block_count(ckpt, "image_encoder.blocks.");
        let preset = match (dim, depth) {
            (768, 12) => Some("sam-vit-b"),
            (1024, 24) => Some("sam-vit-l"),
            (1280, 32) => Some("sam-vit-h"),
            _ => None,
        };
        let note = match preset {
            Some("sam-vit-b") => Some(
                "MedSAM uses the same layout: pass --model medsam for its preprocessing".into(),
            ),
            Some(_) => None,
            None => Some(format!(
                "custom ViT: embed_dim {dim}, depth {depth} (use --model-config)"
            )),
        };
        return Detected {
            family: "SAM ViT".into(),
            preset: preset.map(String::from),
            note,
        };
    }
    Detected {
        family: "unknown".into(),
        preset: None,
        note: Some("no Segment-Anything image encoder keys found".into()),
    }
}
