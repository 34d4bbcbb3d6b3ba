//! The prompt predictor network (PPN, SPEC §2.3): learnable class queries attend to the frozen
//! image features through SAM-style two-way blocks and become a box, a mask prompt and N−2 free
//! tokens per (image, class) row, all expressed through the frozen prompt encoder.

use candle_core::{DType, Device, Module, Result, Tensor};
use candle_nn::{Init, VarBuilder};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use sam2rad_models::mask_decoder::Mlp;
use sam2rad_models::prompt_encoder::PromptEncoder;
use sam2rad_models::transformer::{MlpNames, TwoWayAttentionBlock};
use sam2rad_nn::ops;
use serde::{Deserialize, Serialize};

use crate::conv::ConvNhwc;
use crate::features::{index_tensor, Features, Rows};

/// Temperature of the sine position codes.
const PE_TEMPERATURE: f64 = 10_000.0;
/// Added to the normalising size of the 2-D code (DETR / SAM 2 `PositionEmbeddingSine`).
const PE_EPS: f64 = 1e-6;
/// Internal width divisor of the cross-attentions, as in SAM's decoder.
const CROSS_ATTN_DOWNSAMPLE: usize = 2;

/// Which features the PPN attends to.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PpnVariant {
    /// Three two-way blocks, coarse → fine over the three feature levels (default).
    #[default]
    Hierarchical,
    /// One two-way block over the image embedding only (the paper's figure).
    Single,
}

impl PpnVariant {
    /// Number of two-way blocks (= feature levels read).
    pub fn num_blocks(self) -> usize {
        match self {
            Self::Hierarchical => 3,
            Self::Single => 1,
        }
    }
}

/// Whether a forward pass trains (dropout on, with a seed for reproducible masks) or evaluates.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Inference: no dropout.
    Eval,
    /// Training: dropout masks drawn from ChaCha8 seeded with `seed` (same seed ⇒ same masks).
    Train {
        /// Seed of this pass' dropout masks (e.g. a hash of the run seed and the step).
        seed: u64,
    },
}

/// Hyper-parameters of a [`PromptPredictor`].
#[derive(Debug, Clone, PartialEq)]
pub struct PpnConfig {
    /// Token / key width (the base model's `prompt_embed_dim`, 256 for real presets).
    pub dim: usize,
    /// Attention heads (8).
    pub num_heads: usize,
    /// Hidden width of the blocks' MLP (2048).
    pub mlp_dim: usize,
    /// Number of classes C (one query set each).
    pub num_classes: usize,
    /// Tokens per class N (≥ 2: tokens 0 and 1 become the box).
    pub num_tokens: usize,
    /// Hierarchical or single.
    pub variant: PpnVariant,
    /// Dropout probability of the mask head (training only).
    pub dropout: f64,
    /// Channels of the three feature levels, coarse → fine.
    pub level_channels: [usize; 3],
    /// Expected side of the three levels (their key PEs are precomputed; others are built on use).
    pub level_sides: [usize; 3],
    /// Side of the mask prompt (4 × embedding side: 256 for a 1024 input).
    pub mask_side: usize,
    /// Side of the padded input frame the box is scaled to (1024).
    pub image_size: usize,
}

/// What the PPN predicts for R rows.
#[derive(Debug, Clone)]
pub struct PpnOutput {
    /// Sparse prompt tokens `[R, N, D]`: the embedded box (2 tokens), then N−2 learned tokens.
    pub sparse: Tensor,
    /// Dense prompt `[R, D, h, w]` (the mask prompt through the frozen mask downscaler).
    pub dense: Tensor,
    /// Mask-prompt logits `[R, 1, 4h, 4w]`.
    pub mask_prompt_logits: Tensor,
    /// Box, normalised xyxy in [0, 1] of the padded input frame, `[R, 4]`.
    pub boxes: Tensor,
}

/// The prompt predictor network.
#[derive(Debug, Clone)]
pub struct PromptPredictor {
    cfg: PpnConfig,
    /// Class queries `[C, N, D]`.
    queries: Tensor,
    /// 1-D sine code of the token index, `[1, N, D]`.
    query_pe: Tensor,
    /// 1×1 projection of each level to D channels (hierarchical only).
    proj: Vec<sam2rad_nn::Linear>,
    /// 2-D sine key code of each level at its expected side, `[1, h·w, D]`.
    key_pe: Vec<Tensor>,
    blocks: Vec<TwoWayAttentionBlock>,
    box_head: Mlp,
    mask_conv1: ConvNhwc,
    mask_conv2: ConvNhwc,
    mask_conv3: ConvNhwc,
}

impl PromptPredictor {
    /// Builds the PPN under `vb` (keys `queries`, `proj.{i}`, `blocks.{i}.*`, `box_head.layers.{0,1}`,
    /// `mask_head.{conv1,conv2,conv3}`).
    pub fn new(cfg: &PpnConfig, vb: VarBuilder) -> Result<Self> {
        let d = cfg.dim;
        if cfg.num_tokens < 2 {
            candle_core::bail!(
                "PPN needs at least 2 tokens per class (the box), got {}",
                cfg.num_tokens
            )
        }
        if cfg.num_classes == 0 {
            candle_core::bail!("PPN needs at least one class")
        }
        if !d.is_multiple_of(4) || d < 8 {
            candle_core::bail!("PPN width {d} must be a multiple of 4 (sine codes) and ≥ 8")
        }
        if !(0.0..1.0).contains(&cfg.dropout) {
            candle_core::bail!("PPN dropout {} must lie in [0, 1)", cfg.dropout)
        }
        let dev = vb.device();
        let queries = vb.get_with_hints(
            (cfg.num_classes, cfg.num_tokens, d),
            "queries",
            Init::Randn {
                mean: 0.0,
                stdev: 1.0 / 16.0,
            },
        )?;
        let n_blocks = cfg.variant.num_blocks();
        let proj = match cfg.variant {
            PpnVariant::Hierarchical => (0..n_blocks)
                .map(|i| sam2rad_nn::linear(cfg.level_channels[i], d, vb.pp(format!("proj.{i}"))))
                .collect::<Result<Vec<_>>>()?,
            PpnVariant::Single => Vec::new(),
        };
        let key_pe = cfg.level_sides[..n_blocks]
            .iter()
            .map(|&s| sine_pe_2d(s, s, d, dev))
            .collect::<Result<Vec<_>>>()?;
        let blocks = (0..n_blocks)
            .map(|i| {
                TwoWayAttentionBlock::new(
                    d,
                    cfg.num_heads,
                    cfg.mlp_dim,
                    CROSS_ATTN_DOWNSAMPLE,
                    i == 0,
                    MlpNames::Lin,
                    vb.pp(format!("blocks.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let mh = vb.pp("mask_head");
        let hidden = d / 4;
        Ok(Self {
            queries,
            query_pe: sine_pe_1d(cfg.num_tokens, d, dev)?,
            proj,
            key_pe,
            blocks,
            box_head: Mlp::new(2 * d, d, 4, 2, vb.pp("box_head"))?,
            mask_conv1: ConvNhwc::new(d, hidden, 3, mh.pp("conv1"))?,
            mask_conv2: ConvNhwc::new(hidden, hidden, 3, mh.pp("conv2"))?,
            mask_conv3: ConvNhwc::new(hidden, 1, 1, mh.pp("conv3"))?,
            cfg: cfg.clone(),
        })
    }

    /// The configuration.
    pub fn config(&self) -> &PpnConfig {
        &self.cfg
    }

    /// Predicts the prompts of every row of `rows` from `feats` (batch B = the images `rows`
    /// refers to); `prompt_encoder` is the frozen one of the base model.
    pub fn forward(
        &self,
        feats: &Features,
        rows: &Rows,
        prompt_encoder: &PromptEncoder,
        phase: Phase,
    ) -> Result<PpnOutput> {
        let d = self.cfg.dim;
        let dev = feats.embed.device();
        if let Some(&c) = rows.class().iter().find(|&&c| c >= self.cfg.num_classes) {
            candle_core::bail!(
                "PPN: row class {c} but the model has {} classes",
                self.cfg.num_classes
            )
        }
        let class_idx = index_tensor(rows.class(), dev)?;
        let mut queries = self.queries.index_select(&class_idx, 0)?;
        let mut keys: Option<(Tensor, usize, usize)> = None;
        for (i, block) in self.blocks.iter().enumerate() {
            let level = match self.cfg.variant {
                PpnVariant::Hierarchical => feats.levels.get(i).ok_or_else(|| {
                    candle_core::Error::Msg(format!(
                        "PPN: the features have {} levels, the hierarchical PPN needs 3",
                        feats.levels.len()
                    ))
                })?,
                PpnVariant::Single => &feats.embed,
            };
            let (_, c, h, w) = level.dims4()?;
            // Project per image, then pick rows: the projection does not depend on the class.
            let flat = level.flatten_from(2)?.transpose(1, 2)?;
            let map = match self.proj.get(i) {
                Some(p) => p.forward(&flat)?,
                None if c == d => flat,
                None => candle_core::bail!("PPN: the embedding has {c} channels, expected {d}"),
            };
            let mut tokens = select_rows(&map, rows.image())?.contiguous()?;
            if let Some((prev, ph, pw)) = &keys {
                // The previous level's updated keys, nearest-upsampled to this level and added
                // (same size, as for every SAM 1 level: added directly in token layout).
                tokens = if (*ph, *pw) == (h, w) {
                    tokens.add(prev)?
                } else {
                    let prev_map = prev.transpose(1, 2)?.reshape((rows.len(), d, *ph, *pw))?;
                    let up = ops::resize_nearest(&prev_map, h, w)?;
                    tokens.add(&up.flatten_from(2)?.transpose(1, 2)?)?
                };
            }
            let key_pe = match self.key_pe.get(i) {
                Some(pe) if self.cfg.level_sides[i] == h && h == w => pe.clone(),
                _ => sine_pe_2d(h, w, d, dev)?,
            };
            let (q, k) = block.forward(&queries, &tokens, &self.query_pe, &key_pe)?;
            queries = q;
            keys = Some((k, h, w));
        }
        let Some((keys, h, w)) = keys else {
            candle_core::bail!("PPN has no blocks")
        };
        let r = rows.len();

        // Box head: tokens 0 and 1 → (x1, y1, w, h) in [0, 1]. Width and height are fractions of
        // the room left to the frame edge, so x2 = x1 + w·(1 − x1) never leaves [0, 1] and
        // x1 ≤ x2 holds without a clamp that would stop gradients.
        let box_in = queries.narrow(1, 0, 2)?.reshape((r, 2 * d))?;
        let s = ops::sigmoid(&self.box_head.forward(&box_in)?)?;
        let x1y1 = s.narrow(1, 0, 2)?;
        let wh = s.narrow(1, 2, 2)?;
        let x2y2 = x1y1.add(&wh.mul(&x1y1.affine(-1.0, 1.0)?)?)?;
        let boxes = Tensor::cat(&[&x1y1, &x2y2], 1)?;
        let box_tokens =
            prompt_encoder.embed_boxes(&boxes.affine(self.cfg.image_size as f64, 0.0)?)?;
        let sparse = if self.cfg.num_tokens > 2 {
            let free = queries.narrow(1, 2, self.cfg.num_tokens - 2)?;
            Tensor::cat(&[&box_tokens, &free], 1)?
        } else {
            box_tokens
        };

        // Mask head on the final level's updated keys (channels-last: no transpose needed).
        let (s1, s2) = match phase {
            Phase::Eval => (None, None),
            Phase::Train { seed } => (Some(seed), Some(seed ^ 0x5bd1_e995_u64)),
        };
        let x = keys.reshape((r, h, w, d))?;
        let x = self.dropout(&self.mask_conv1.forward(&x)?.relu()?, s1)?;
        let x = self.dropout(&self.mask_conv2.forward(&x)?.relu()?, s2)?;
        // [R, H, W, 1] has the same memory order as [R, 1, H, W].
        let logits = self.mask_conv3.forward(&x)?.reshape((r, 1, h, w))?;
        let side = self.cfg.mask_side;
        let mask_prompt_logits = if (h, w) == (side, side) {
            logits
        } else {
            ops::resize_bilinear(&logits, side, side)?
        };
        let dense = prompt_encoder.embed_masks(&mask_prompt_logits)?;
        Ok(PpnOutput {
            sparse,
            dense,
            mask_prompt_logits,
            boxes,
        })
    }

    /// Inverted dropout with a seeded Bernoulli mask; identity when `seed` is None or p = 0.
    fn dropout(&self, x: &Tensor, seed: Option<u64>) -> Result<Tensor> {
        let p = self.cfg.dropout;
        let Some(seed) = seed else {
            return Ok(x.clone());
        };
        if p == 0.0 {
            return Ok(x.clone());
        }
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        let keep = (1.0 / (1.0 - p)) as f32;
        let mask: Vec<f32> = (0..x.elem_count())
            .map(|_| if rng.random::<f64>() < p { 0.0 } else { keep })
            .collect();
        let mask = Tensor::from_vec(mask, x.shape(), x.device())?.to_dtype(x.dtype())?;
        x.mul(&mask)
    }
}

/// `t[image_of_row]` along dim 0, without a copy for the identity selection.
fn select_rows(t: &Tensor, image_of_row: &[usize]) -> Result<Tensor> {
    let b = t.dim(0)?;
    if let Some(&bad) = image_of_row.iter().find(|&&i| i >= b) {
        candle_core::bail!("PPN: row refers to image {bad}, the batch has {b}")
    }
    if image_of_row.len() == b && image_of_row.iter().enumerate().all(|(r, &i)| r == i) {
        return Ok(t.clone());
    }
    t.contiguous()?
        .index_select(&index_tensor(image_of_row, t.device())?, 0)
}

/// 1-D sine code of positions `0..n`, `[1, n, d]`: channel 2k is `sin(i/T^(2k/d))`, 2k+1 the cosine.
pub fn sine_pe_1d(n: usize, d: usize, device: &Device) -> Result<Tensor> {
    let mut v = Vec::with_capacity(n * d);
    for i in 0..n {
        for c in 0..d {
            let freq = PE_TEMPERATURE.powf((2 * (c / 2)) as f64 / d as f64);
            let a = i as f64 / freq;
            v.push(if c.is_multiple_of(2) {
                a.sin()
            } else {
                a.cos()
            } as f32);
        }
    }
    Tensor::from_vec(v, (1, n, d), device)
}

/// 2-D normalised sine code of an h×w grid as tokens `[1, h·w, d]` (row-major), like DETR's /
/// SAM 2's `PositionEmbeddingSine(normalize=True, scale=2π, temperature=10000)`: channels
/// `[0, d/2)` encode y, `[d/2, d)` encode x; position `(i+1)/(size+ε)·2π`; even channels sine,
/// odd channels cosine of the same frequency.
pub fn sine_pe_2d(h: usize, w: usize, d: usize, device: &Device) -> Result<Tensor> {
    let npf = d / 2;
    let scale = 2.0 * std::f64::consts::PI;
    let code = |pos: usize, size: usize, c: usize| -> f32 {
        let e = (pos + 1) as f64 / (size as f64 + PE_EPS) * scale;
        let a = e / PE_TEMPERATURE.powf((2 * (c / 2)) as f64 / npf as f64);
        (if c.is_multiple_of(2) {
            a.sin()
        } else {
            a.cos()
        }) as f32
    };
    let mut v = Vec::with_capacity(h * w * d);
    for y in 0..h {
        for x in 0..w {
            v.extend((0..npf).map(|c| code(y, h, c)));
            v.extend((0..npf).map(|c| code(x, w, c)));
        }
    }
    Tensor::from_vec(v, (1, h * w, d), device)?.to_dtype(DType::F32)
}
