//! Model configurations: the official presets and JSON-described architectures.

use serde::{Deserialize, Serialize};

use crate::error::ModelError;

/// Which official model family a configuration belongs to (decides preprocessing defaults).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Family {
    /// Segment Anything (ViT-B/L/H).
    Sam,
    /// MobileSAM (TinyViT encoder, SAM prompt encoder and decoder).
    MobileSam,
    /// MedSAM (SAM ViT-B layout with its own preprocessing).
    MedSam,
    /// SAM 2 / SAM 2.1 (Hiera encoder, FPN neck, object-score decoder).
    Sam2,
}

/// SAM ViT image encoder hyper-parameters (`ImageEncoderViT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct VitConfig {
    /// Transformer width.
    pub embed_dim: usize,
    /// Number of blocks.
    pub depth: usize,
    /// Attention heads per block.
    pub num_heads: usize,
    /// Blocks that attend globally; all others use windows.
    pub global_attn_indexes: Vec<usize>,
    /// Window size of the windowed blocks.
    #[serde(default = "default_window")]
    pub window_size: usize,
    /// Patch size of the patch embedding.
    #[serde(default = "default_patch")]
    pub patch_size: usize,
    /// MLP hidden ratio.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
}

/// TinyViT image encoder hyper-parameters (MobileSAM's `TinyViT`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TinyVitConfig {
    /// Width of each of the four stages.
    pub embed_dims: Vec<usize>,
    /// Blocks in each stage.
    pub depths: Vec<usize>,
    /// Attention heads of each stage (stage 0 is convolutional and ignores it).
    pub num_heads: Vec<usize>,
    /// Attention window of each stage.
    pub window_sizes: Vec<usize>,
    /// MLP hidden ratio of the attention stages.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Expansion ratio of the MBConv blocks in stage 0.
    #[serde(default = "default_mlp_ratio")]
    pub mbconv_expand_ratio: f64,
    /// Kernel of the depthwise local convolution in attention blocks.
    #[serde(default = "default_local_conv")]
    pub local_conv_size: usize,
}

/// SAM 2 Hiera trunk + FPN neck hyper-parameters (`configs/sam2.1/sam2.1_hiera_*.yaml`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct HieraConfig {
    /// Width of the first stage (doubles at every stage).
    pub embed_dim: usize,
    /// Heads of the first stage (doubles at every stage).
    pub num_heads: usize,
    /// Blocks per stage.
    pub stages: Vec<usize>,
    /// Blocks that attend globally.
    pub global_att_blocks: Vec<usize>,
    /// Attention window of each stage.
    #[serde(default = "default_window_spec")]
    pub window_spec: Vec<usize>,
    /// Side of the background positional embedding before bicubic interpolation.
    #[serde(default = "default_bkg")]
    pub window_pos_embed_bkg_spatial_size: [usize; 2],
    /// Number of stage transitions that pool q (2×2).
    #[serde(default = "default_three")]
    pub q_pool: usize,
    /// MLP hidden ratio.
    #[serde(default = "default_mlp_ratio")]
    pub mlp_ratio: f64,
    /// Channels of the trunk stages, coarsest first (the FPN neck's input list).
    pub backbone_channel_list: Vec<usize>,
    /// FPN levels that receive the top-down (nearest-upsampled) path.
    #[serde(default = "default_top_down")]
    pub fpn_top_down_levels: Vec<usize>,
    /// Coarsest FPN levels dropped from the output.
    #[serde(default = "default_scalp")]
    pub scalp: usize,
}

/// The image encoder variant and its hyper-parameters.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum EncoderConfig {
    /// SAM's plain ViT with windowed and global attention.
    Vit(VitConfig),
    /// MobileSAM's TinyViT.
    TinyVit(TinyVitConfig),
    /// SAM 2's Hiera trunk with its FPN neck.
    Hiera(HieraConfig),
}

/// Mask decoder hyper-parameters (`MaskDecoder` + `TwoWayTransformer`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct DecoderConfig {
    /// Two-way transformer depth.
    #[serde(default = "default_two")]
    pub depth: usize,
    /// Attention heads.
    #[serde(default = "default_eight")]
    pub num_heads: usize,
    /// Hidden width of the transformer MLP.
    #[serde(default = "default_mlp_dim")]
    pub mlp_dim: usize,
    /// Number of multimask outputs (one more mask token is used for the single-mask output).
    #[serde(default = "default_three")]
    pub num_multimask_outputs: usize,
    /// Layers of the IoU prediction head.
    #[serde(default = "default_three")]
    pub iou_head_depth: usize,
    /// Hidden width of the IoU prediction head.
    #[serde(default = "default_iou_hidden")]
    pub iou_head_hidden_dim: usize,
}

impl Default for DecoderConfig {
    fn default() -> Self {
        Self {
            depth: 2,
            num_heads: 8,
            mlp_dim: 2048,
            num_multimask_outputs: 3,
            iou_head_depth: 3,
            iou_head_hidden_dim: 256,
        }
    }
}

/// A whole Segment-Anything model: encoder, prompt encoder and mask decoder.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SamConfig {
    /// Preset or user-chosen name.
    pub name: String,
    /// Model family (decides preprocessing).
    pub family: Family,
    /// Image encoder.
    pub encoder: EncoderConfig,
    /// Width of prompt embeddings, the neck output and the decoder (256 officially).
    #[serde(default = "default_prompt_dim")]
    pub prompt_embed_dim: usize,
    /// Square input size of the encoder (1024 officially).
    #[serde(default = "default_image_size")]
    pub image_size: usize,
    /// Mask decoder.
    #[serde(default)]
    pub decoder: DecoderConfig,
}

fn default_window() -> usize {
    14
}
fn default_patch() -> usize {
    16
}
fn default_mlp_ratio() -> f64 {
    4.0
}
fn default_local_conv() -> usize {
    3
}
fn default_two() -> usize {
    2
}
fn default_three() -> usize {
    3
}
fn default_eight() -> usize {
    8
}
fn default_mlp_dim() -> usize {
    2048
}
fn default_iou_hidden() -> usize {
    256
}
fn default_prompt_dim() -> usize {
    256
}
fn default_image_size() -> usize {
    1024
}
fn default_window_spec() -> Vec<usize> {
    vec![8, 4, 14, 7]
}
fn default_bkg() -> [usize; 2] {
    [7, 7]
}
fn default_top_down() -> Vec<usize> {
    vec![2, 3]
}
fn default_scalp() -> usize {
    1
}

/// Names of the built-in presets, in the order `--help` lists them.
pub const PRESETS: &[&str] = &[
    "sam-vit-b",
    "sam-vit-l",
    "sam-vit-h",
    "mobile-sam",
    "medsam",
    "sam-vit-mini",
    "sam2-hiera-t",
    "sam2-hiera-s",
    "sam2-hiera-b+",
    "sam2-hiera-l",
    "sam2.1-hiera-t",
    "sam2.1-hiera-s",
    "sam2.1-hiera-b+",
    "sam2.1-hiera-l",
];

/// A SAM 2 preset: (width, heads, stages, global blocks, window spec, background PE size).
fn hiera(
    name: &str,
    dim: usize,
    heads: usize,
    stages: [usize; 4],
    global: [usize; 3],
    windows: [usize; 4],
    bkg: usize,
) -> SamConfig {
    SamConfig {
        name: name.to_string(),
        family: Family::Sam2,
        encoder: EncoderConfig::Hiera(HieraConfig {
            embed_dim: dim,
            num_heads: heads,
            stages: stages.to_vec(),
            global_att_blocks: global.to_vec(),
            window_spec: windows.to_vec(),
            window_pos_embed_bkg_spatial_size: [bkg, bkg],
            q_pool: 3,
            mlp_ratio: 4.0,
            backbone_channel_list: vec![8 * dim, 4 * dim, 2 * dim, dim],
            fpn_top_down_levels: vec![2, 3],
            scalp: 1,
        }),
        prompt_embed_dim: 256,
        image_size: 1024,
        decoder: DecoderConfig::default(),
    }
}

fn vit(
    name: &str,
    family: Family,
    dim: usize,
    depth: usize,
    heads: usize,
    global: &[usize],
) -> SamConfig {
    SamConfig {
        name: name.to_string(),
        family,
        encoder: EncoderConfig::Vit(VitConfig {
            embed_dim: dim,
            depth,
            num_heads: heads,
            global_attn_indexes: global.to_vec(),
            window_size: 14,
            patch_size: 16,
            mlp_ratio: 4.0,
        }),
        prompt_embed_dim: 256,
        image_size: 1024,
        decoder: DecoderConfig::default(),
    }
}

impl SamConfig {
    /// The official architecture of a preset name (see [`PRESETS`]).
    pub fn preset(name: &str) -> Result<Self, ModelError> {
        Ok(match name {
            "sam-vit-b" => vit(name, Family::Sam, 768, 12, 12, &[2, 5, 8, 11]),
            "sam-vit-l" => vit(name, Family::Sam, 1024, 24, 16, &[5, 11, 17, 23]),
            "sam-vit-h" => vit(name, Family::Sam, 1280, 32, 16, &[7, 15, 23, 31]),
            "medsam" => vit(name, Family::MedSam, 768, 12, 12, &[2, 5, 8, 11]),
            // No official weights: a small ViT for random-init training (the demo, tests). A
            // 512 input keeps a CPU training step cheap (32×32 embedding, 128×128 masks).
            "sam-vit-mini" => SamConfig {
                image_size: 512,
                encoder: EncoderConfig::Vit(VitConfig {
                    embed_dim: 128,
                    depth: 4,
                    num_heads: 4,
                    global_attn_indexes: vec![1, 3],
                    window_size: 8,
                    patch_size: 16,
                    mlp_ratio: 4.0,
                }),
                ..vit(name, Family::Sam, 128, 4, 4, &[1, 3])
            },
            "mobile-sam" => SamConfig {
                name: name.to_string(),
                family: Family::MobileSam,
                encoder: EncoderConfig::TinyVit(TinyVitConfig {
                    embed_dims: vec![64, 128, 160, 320],
                    depths: vec![2, 2, 6, 2],
                    num_heads: vec![2, 4, 5, 10],
                    window_sizes: vec![7, 7, 14, 7],
                    mlp_ratio: 4.0,
                    mbconv_expand_ratio: 4.0,
                    local_conv_size: 3,
                }),
                prompt_embed_dim: 256,
                image_size: 1024,
                decoder: DecoderConfig::default(),
            },
            _ if name.starts_with("sam2") => {
                let size = name.rsplit('-').next().unwrap_or("");
                let w = [8, 4, 14, 7];
                match size {
                    "t" => hiera(name, 96, 1, [1, 2, 7, 2], [5, 7, 9], w, 7),
                    "s" => hiera(name, 96, 1, [1, 2, 11, 2], [7, 10, 13], w, 7),
                    "b+" => hiera(name, 112, 2, [2, 3, 16, 3], [12, 16, 20], w, 14),
                    "l" => hiera(name, 144, 2, [2, 6, 36, 4], [23, 33, 43], [8, 4, 16, 8], 7),
                    _ => {
                        return Err(ModelError::UnknownPreset {
                            name: name.to_string(),
                            known: PRESETS.join(", "),
                        })
                    }
                }
            }
            other => {
                return Err(ModelError::UnknownPreset {
                    name: other.to_string(),
                    known: PRESETS.join(", "),
                })
            }
        })
    }

    /// Reads a JSON architecture description (the same fields this type serialises to).
    pub fn from_json_file(path: &std::path::Path) -> Result<Self, ModelError> {
        let text = std::fs::read_to_string(path).map_err(|e| ModelError::Io {
            path: path.display().to_string(),
            source: e,
        })?;
        let cfg: SamConfig = serde_json::from_str(&text).map_err(|e| ModelError::Config {
            path: path.display().to_string(),
            reason: e.to_string(),
        })?;
        cfg.validate().map_err(|reason| ModelError::Config {
            path: path.display().to_string(),
            reason,
        })?;
        Ok(cfg)
    }

    /// Checks the invariants the model code relies on; returns the first violation.
    pub fn validate(&self) -> Result<(), String> {
        if self.image_size == 0 || self.prompt_embed_dim == 0 {
            return Err("image_size and prompt_embed_dim must be positive".into());
        }
        if self.decoder.num_heads == 0
            || !self.prompt_embed_dim.is_multiple_of(self.decoder.num_heads)
        {
            return Err(format!(
                "prompt_embed_dim {} must be divisible by decoder num_heads {}",
                self.prompt_embed_dim, self.decoder.num_heads
            ));
        }
        match &self.encoder {
            EncoderConfig::Vit(v) => {
                if v.num_heads == 0 || !v.embed_dim.is_multiple_of(v.num_heads) {
                    return Err(format!(
                        "encoder embed_dim {} must be divisible by num_heads {}",
                        v.embed_dim, v.num_heads
                    ));
                }
                if v.patch_size == 0 || !self.image_size.is_multiple_of(v.patch_size) {
                    return Err(format!(
                        "image_size {} must be a multiple of patch_size {}",
                        self.image_size, v.patch_size
                    ));
                }
                if let Some(i) = v.global_attn_indexes.iter().find(|&&i| i >= v.depth) {
                    return Err(format!(
                        "global_attn_indexes has {i} but depth is {}",
                        v.depth
                    ));
                }
            }
            EncoderConfig::Hiera(h) => {
                let n = h.stages.len();
                if n == 0 || h.window_spec.len() != n || h.backbone_channel_list.len() != n {
                    return Err(
                        "hiera needs one window_spec and backbone_channel_list entry per stage"
                            .into(),
                    );
                }
                let blocks: usize = h.stages.iter().sum();
                if let Some(i) = h.global_att_blocks.iter().find(|&&i| i >= blocks) {
                    return Err(format!(
                        "global_att_blocks has {i} but there are {blocks} blocks"
                    ));
                }
                if h.num_heads == 0 || !h.embed_dim.is_multiple_of(h.num_heads) {
                    return Err(format!(
                        "hiera embed_dim {} must be divisible by num_heads {}",
                        h.embed_dim, h.num_heads
                    ));
                }
            }
            EncoderConfig::TinyVit(t) => {
                let n = t.embed_dims.len();
                if n != 4
                    || t.depths.len() != n
                    || t.num_heads.len() != n
                    || t.window_sizes.len() != n
                {
                    return Err("tiny_vit needs 4 entries in embed_dims, depths, num_heads and window_sizes".into());
                }
                for i in 1..n {
                    if t.num_heads[i] == 0 || !t.embed_dims[i].is_multiple_of(t.num_heads[i]) {
                        return Err(format!(
                            "tiny_vit stage {i}: embed_dim {} must be divisible by num_heads {}",
                            t.embed_dims[i], t.num_heads[i]
                        ));
                    }
                }
            }
        }
        Ok(())
    }

    /// The stride-16 embedding grid side (64 for 1024 inputs).
    pub fn embedding_size(&self) -> usize {
        self.image_size / 16
    }
}
