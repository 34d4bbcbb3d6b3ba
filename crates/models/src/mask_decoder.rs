//! Mask decoder: output tokens + two-way transformer + upscaling + hypernetwork heads (`MaskDecoder`
//! of SAM 1, and SAM 2's variant with an object-score token, high-resolution skips, a sigmoid IoU
//! head and the stability-based single-mask choice).

use candle_core::{DType, Module, Result, Tensor};
use candle_nn::{embedding, Embedding, VarBuilder};
use sam2rad_nn::{linear, ops, ConvTranspose2x2, LayerNorm2d, Linear};

use crate::config::DecoderConfig;
use crate::transformer::{MlpNames, TwoWayTransformer};

/// LayerNorm2d eps of the upscaler.
const LN2D_EPS: f64 = 1e-6;

/// The decoder's ReLU MLP (`MLP` of the official code, keys `layers.{i}`), no output activation.
#[derive(Debug, Clone)]
pub struct Mlp {
    layers: Vec<Linear>,
}

impl Mlp {
    /// Loads `num_layers` linears `input → hidden → … → output`.
    pub fn new(
        input: usize,
        hidden: usize,
        output: usize,
        num_layers: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if num_layers == 0 {
            candle_core::bail!("decoder MLP needs at least one layer")
        }
        let layers = (0..num_layers)
            .map(|i| {
                let fan_in = if i == 0 { input } else { hidden };
                let fan_out = if i + 1 == num_layers { output } else { hidden };
                linear(fan_in, fan_out, vb.pp(format!("layers.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self { layers })
    }

    /// ReLU between layers, none after the last.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let mut x = x.clone();
        for (i, layer) in self.layers.iter().enumerate() {
            x = layer.forward(&x)?;
            if i + 1 < self.layers.len() {
                x = x.relu()?;
            }
        }
        Ok(x)
    }
}

/// Generation of the mask decoder, which decides its keys and its extra heads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DecoderVariant {
    /// SAM 1 / MobileSAM / MedSAM: tokens `[iou, mask×K, prompts]`, raw IoU, plain upscaling.
    Sam1,
    /// SAM 2 / 2.1: tokens `[obj_score, iou, mask×K, prompts]`, `pred_obj_score_head`, sigmoid IoU,
    /// high-resolution skips in the upscaler and `mlp.layers.{0,1}` transformer keys.
    Sam2,
}

/// SAM 2's `dynamic_multimask_via_stability`: how single-mask calls choose their mask token.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct DynamicMultimask {
    /// Logit margin of the stability score (`dynamic_multimask_stability_delta`, 0.05).
    pub delta: f32,
    /// Stability at or above which token 0 is kept (`dynamic_multimask_stability_thresh`, 0.98).
    pub thresh: f32,
}

impl Default for DynamicMultimask {
    fn default() -> Self {
        Self {
            delta: 0.05,
            thresh: 0.98,
        }
    }
}

/// Everything the decoder computes for all mask tokens, before the multimask selection.
#[derive(Debug, Clone)]
pub struct DecoderOutput {
    /// Low-resolution mask logits of every mask token, [B, num_multimask_outputs+1, 256, 256].
    pub masks_all: Tensor,
    /// IoU predictions of every mask token, [B, num_multimask_outputs+1] (sigmoid for SAM 2).
    pub iou_all: Tensor,
    /// Transformer output states of all tokens, [B, n, D]: `[obj_score (SAM 2, or SAM 1 with an
    /// attached objectness token), iou, mask×K, prompts]`.
    pub tokens_out: Tensor,
    /// Object-score logits (`pred_obj_score_head` of the first token), [B, 1]; None for a SAM 1
    /// decoder without an attached objectness token.
    pub object_score_logits: Option<Tensor>,
    /// SAM 2 stability score of mask token 0, [B] f32 (not differentiable); None for SAM 1 or when
    /// the dynamic multimask choice is off.
    pub singlemask_stability: Option<Tensor>,
}

/// SAM 2's object-score token and its head (or the one attached to a SAM 1 decoder).
#[derive(Debug, Clone)]
struct ObjectScore {
    token: Embedding,
    head: Mlp,
}

/// SAM's mask decoder (SAM 1 or SAM 2 variant).
#[derive(Debug, Clone)]
pub struct MaskDecoder {
    variant: DecoderVariant,
    num_mask_tokens: usize,
    obj_score: Option<ObjectScore>,
    iou_token: Embedding,
    mask_tokens: Embedding,
    transformer: TwoWayTransformer,
    upscale_conv1: ConvTranspose2x2,
    upscale_norm: LayerNorm2d,
    upscale_conv2: ConvTranspose2x2,
    output_hypernetworks_mlps: Vec<Mlp>,
    iou_prediction_head: Mlp,
    dynamic_multimask: Option<DynamicMultimask>,
}

impl MaskDecoder {
    /// Loads the SAM 1 decoder (`vb` at `mask_decoder`) of width `transformer_dim`.
    pub fn new(cfg: &DecoderConfig, transformer_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_variant(cfg, transformer_dim, DecoderVariant::Sam1, vb)
    }

    /// Loads the SAM 2 decoder (`vb` at `sam_mask_decoder`) with the official dynamic multimask
    /// defaults. `conv_s0`/`conv_s1` are not loaded: the image encoder applies them.
    pub fn new_sam2(cfg: &DecoderConfig, transformer_dim: usize, vb: VarBuilder) -> Result<Self> {
        Self::with_variant(cfg, transformer_dim, DecoderVariant::Sam2, vb)
    }

    /// Loads the decoder of the given generation (`vb` at its `mask_decoder` prefix).
    pub fn with_variant(
        cfg: &DecoderConfig,
        transformer_dim: usize,
        variant: DecoderVariant,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = transformer_dim;
        if !d.is_multiple_of(8) {
            candle_core::bail!("mask decoder: transformer_dim {d} must be a multiple of 8")
        }
        let sam2 = variant == DecoderVariant::Sam2;
        let num_mask_tokens = cfg.num_multimask_outputs + 1;
        let transformer = TwoWayTransformer::new(
            cfg.depth,
            d,
            cfg.num_heads,
            cfg.mlp_dim,
            2,
            if sam2 {
                MlpNames::Layers
            } else {
                MlpNames::Lin
            },
            vb.pp("transformer"),
        )?;
        let up = vb.pp("output_upscaling");
        let output_hypernetworks_mlps = (0..num_mask_tokens)
            .map(|i| {
                Mlp::new(
                    d,
                    d,
                    d / 8,
                    3,
                    vb.pp(format!("output_hypernetworks_mlps.{i}")),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        let obj_score = if sam2 {
            Some(ObjectScore {
                token: embedding(1, d, vb.pp("obj_score_token"))?,
                head: Mlp::new(d, d, 1, 3, vb.pp("pred_obj_score_head"))?,
            })
        } else {
            None
        };
        Ok(Self {
            variant,
            num_mask_tokens,
            obj_score,
            iou_token: embedding(1, d, vb.pp("iou_token"))?,
            mask_tokens: embedding(num_mask_tokens, d, vb.pp("mask_tokens"))?,
            transformer,
            upscale_conv1: ConvTranspose2x2::new(d, d / 4, up.pp("0"))?,
            upscale_norm: LayerNorm2d::new(d / 4, LN2D_EPS, up.pp("1"))?,
            upscale_conv2: ConvTranspose2x2::new(d / 4, d / 8, up.pp("3"))?,
            output_hypernetworks_mlps,
            iou_prediction_head: Mlp::new(
                d,
                cfg.iou_head_hidden_dim,
                num_mask_tokens,
                cfg.iou_head_depth,
                vb.pp("iou_prediction_head"),
            )?,
            dynamic_multimask: sam2.then(DynamicMultimask::default),
        })
    }

    /// Attaches LoRA (rank `rank`, scale `alpha/rank`, B = 0) to q and v of every attention of the
    /// two-way transformer; keys under `vb` mirror the transformer's (`layers.0.self_attn.q.a`, …,
    /// `final_attn_token_to_image.v.b`).
    pub fn attach_lora(&mut self, rank: usize, alpha: f64, vb: VarBuilder) -> Result<()> {
        self.transformer.attach_lora(rank, alpha, vb)
    }

    /// Gives a SAM 1 decoder an object-score token and a 3-layer MLP head like SAM 2's (keys
    /// `token.weight` [1, D] and `head.layers.{0,1,2}` under `vb`), so its tokens become
    /// `[obj, iou, mask×K, prompts]` and it returns object-score logits. Fails on a decoder that
    /// already has one (SAM 2, or attached before).
    pub fn attach_objectness(&mut self, vb: VarBuilder) -> Result<()> {
        if self.obj_score.is_some() {
            candle_core::bail!(
                "mask decoder: the {:?} decoder already has an object-score token",
                self.variant
            )
        }
        let d = self.iou_token.embeddings().dim(1)?;
        self.obj_score = Some(ObjectScore {
            token: embedding(1, d, vb.pp("token"))?,
            head: Mlp::new(d, d, 1, 3, vb.pp("head"))?,
        });
        Ok(())
    }

    /// Whether the decoder has an object-score token (SAM 2, or SAM 1 after
    /// [`Self::attach_objectness`]).
    pub fn has_object_score(&self) -> bool {
        self.obj_score.is_some()
    }

    /// The decoder's generation.
    pub fn variant(&self) -> DecoderVariant {
        self.variant
    }

    /// Number of mask tokens (multimask outputs + the single-mask token).
    pub fn num_mask_tokens(&self) -> usize {
        self.num_mask_tokens
    }

    /// Index of the IoU token in [`DecoderOutput::tokens_out`] (the mask tokens follow it).
    pub fn iou_token_index(&self) -> usize {
        usize::from(self.obj_score.is_some())
    }

    /// The stability-based single-mask choice (Some by default for SAM 2, None for SAM 1).
    pub fn dynamic_multimask(&self) -> Option<DynamicMultimask> {
        self.dynamic_multimask
    }

    /// Sets or disables (None: always token 0) the stability-based single-mask choice.
    pub fn set_dynamic_multimask(&mut self, dynamic: Option<DynamicMultimask>) {
        self.dynamic_multimask = dynamic;
    }

    /// Runs the decoder for all mask tokens without high-resolution features (SAM 1).
    /// `image_embeddings` has batch 1 (shared by every prompt row, as the official predictor
    /// repeats it) or the prompt batch B.
    pub fn forward_full(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<DecoderOutput> {
        self.forward_full_high_res(image_embeddings, None, image_pe, sparse, dense)
    }

    /// Runs the decoder for all mask tokens. SAM 2 needs `high_res` = `(feat_s0 [1|B,D/8,4h,4w],
    /// feat_s1 [1|B,D/4,2h,2w])`, already projected by `conv_s0`/`conv_s1`; SAM 1 takes None.
    pub fn forward_full_high_res(
        &self,
        image_embeddings: &Tensor,
        high_res: Option<(&Tensor, &Tensor)>,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<DecoderOutput> {
        let sam2 = self.variant == DecoderVariant::Sam2;
        if sam2 != high_res.is_some() {
            candle_core::bail!(
                "mask decoder: the {:?} decoder {} high-resolution features",
                self.variant,
                if sam2 { "needs" } else { "takes no" }
            )
        }
        let (b, _, d) = sparse.dims3()?;
        let bi = image_embeddings.dim(0)?;
        if bi != b && bi != 1 {
            candle_core::bail!("mask decoder: image batch {bi} does not match prompt batch {b}")
        }
        let mut token_rows = Vec::with_capacity(3);
        if let Some(o) = &self.obj_score {
            token_rows.push(o.token.embeddings().clone());
        }
        token_rows.push(self.iou_token.embeddings().clone());
        token_rows.push(self.mask_tokens.embeddings().clone());
        let n_out = token_rows.iter().map(|t| t.dim(0)).sum::<Result<usize>>()?;
        let output_tokens = Tensor::cat(&token_rows, 0)?
            .unsqueeze(0)?
            .broadcast_as((b, n_out, d))?;
        let tokens = if sparse.dim(1)? == 0 {
            output_tokens.contiguous()?
        } else {
            Tensor::cat(&[&output_tokens, sparse], 1)?
        };
        let src = image_embeddings.broadcast_add(dense)?;
        let (_, c, h, w) = src.dims4()?;
        let src = if src.dim(0)? == b {
            src
        } else {
            src.broadcast_as((b, c, h, w))?.contiguous()?
        };
        let (hs, src) = self.transformer.forward(&src, image_pe, &tokens)?;
        let s = self.iou_token_index();
        let iou_token_out = hs.narrow(1, s, 1)?.squeeze(1)?;

        let src = src.transpose(1, 2)?.reshape((b, c, h, w))?;
        let up = self.upscale_conv1.forward(&src)?;
        let up = match high_res {
            None => {
                let up = ops::gelu(&self.upscale_norm.forward(&up)?)?;
                ops::gelu(&self.upscale_conv2.forward(&up)?)?
            }
            Some((feat_s0, feat_s1)) => {
                let up = ops::gelu(&self.upscale_norm.forward(&up.broadcast_add(feat_s1)?)?)?;
                ops::gelu(&self.upscale_conv2.forward(&up)?.broadcast_add(feat_s0)?)?
            }
        };
        let (_, uc, uh, uw) = up.dims4()?;

        let hyper_in = self
            .output_hypernetworks_mlps
            .iter()
            .enumerate()
            .map(|(i, mlp)| mlp.forward(&hs.narrow(1, s + 1 + i, 1)?))
            .collect::<Result<Vec<_>>>()?;
        let hyper_in = Tensor::cat(&hyper_in, 1)?;
        let masks_all = hyper_in.matmul(&up.reshape((b, uc, uh * uw))?)?.reshape((
            b,
            self.num_mask_tokens,
            uh,
            uw,
        ))?;
        let iou_all = self.iou_prediction_head.forward(&iou_token_out)?;
        let iou_all = if sam2 {
            ops::sigmoid(&iou_all)?
        } else {
            iou_all
        };
        let object_score_logits = match &self.obj_score {
            Some(o) => Some(o.head.forward(&hs.narrow(1, 0, 1)?.squeeze(1)?)?),
            None => None,
        };
        let singlemask_stability = match self.dynamic_multimask {
            Some(dm) => Some(stability_scores(&masks_all.narrow(1, 0, 1)?, dm.delta)?),
            None => None,
        };
        Ok(DecoderOutput {
            masks_all,
            iou_all,
            tokens_out: hs,
            object_score_logits,
            singlemask_stability,
        })
    }

    /// Picks the returned masks and IoUs `([B,K,256,256], [B,K])` from all tokens: tokens 1..
    /// when `multimask_output`; otherwise token 0, or with the dynamic choice, per row, token 0
    /// when its stability ≥ thresh and else the best-IoU token among 1...
    pub fn select(&self, out: &DecoderOutput, multimask_output: bool) -> Result<(Tensor, Tensor)> {
        if multimask_output {
            let k = self.num_mask_tokens - 1;
            return Ok((out.masks_all.narrow(1, 1, k)?, out.iou_all.narrow(1, 1, k)?));
        }
        let (Some(dm), Some(stability)) = (self.dynamic_multimask, &out.singlemask_stability)
        else {
            return Ok((out.masks_all.narrow(1, 0, 1)?, out.iou_all.narrow(1, 0, 1)?));
        };
        let chosen = dynamic_choice(&out.iou_all, stability, dm.thresh)?;
        let mut masks = Vec::with_capacity(chosen.len());
        let mut ious = Vec::with_capacity(chosen.len());
        for (row, &t) in chosen.iter().enumerate() {
            masks.push(out.masks_all.narrow(0, row, 1)?.narrow(1, t, 1)?);
            ious.push(out.iou_all.narrow(0, row, 1)?.narrow(1, t, 1)?);
        }
        Ok((Tensor::cat(&masks, 0)?, Tensor::cat(&ious, 0)?))
    }

    /// Returns `(masks [B,K,256,256], iou [B,K])` without high-resolution features (SAM 1); see
    /// [`Self::select`] for the choice of tokens.
    pub fn forward(
        &self,
        image_embeddings: &Tensor,
        image_pe: &Tensor,
        sparse: &Tensor,
        dense: &Tensor,
        multimask_output: bool,
    ) -> Result<(Tensor, Tensor)> {
        let out = self.forward_full(image_embeddings, image_pe, sparse, dense)?;
        self.select(&out, multimask_output)
    }
}

/// `_get_stability_scores` of mask logits [B,1,H,W]: `#(logit > δ) / #(logit > −δ)` per row in
/// f32, 1.0 when the denominator is 0. Returns [B] f32.
pub fn stability_scores(mask_logits: &Tensor, delta: f32) -> Result<Tensor> {
    let b = mask_logits.dim(0)?;
    let rows: Vec<Vec<f32>> = mask_logits
        .detach()
        .to_dtype(DType::F32)?
        .reshape((b, ()))?
        .to_vec2()?;
    let scores: Vec<f32> = rows
        .iter()
        .map(|row| {
            let inter = row.iter().filter(|&&v| v > delta).count() as f32;
            let union = row.iter().filter(|&&v| v > -delta).count() as f32;
            if union > 0.0 {
                inter / union
            } else {
                1.0
            }
        })
        .collect();
    Tensor::from_vec(scores, b, mask_logits.device())
}

/// The mask token each row keeps in a dynamic single-mask call: 0 when stable, else the first
/// argmax of the IoUs of tokens 1.. (as `torch.argmax`).
fn dynamic_choice(iou_all: &Tensor, stability: &Tensor, thresh: f32) -> Result<Vec<usize>> {
    let ious: Vec<Vec<f32>> = iou_all.detach().to_dtype(DType::F32)?.to_vec2()?;
    let stability: Vec<f32> = stability.to_dtype(DType::F32)?.to_vec1()?;
    if ious.len() != stability.len() {
        candle_core::bail!("mask decoder: IoU and stability batches differ")
    }
    Ok(ious
        .iter()
        .zip(&stability)
        .map(|(row, &score)| {
            if score >= thresh || row.len() < 2 {
                return 0;
            }
            let mut best = 1;
            for (i, &v) in row.iter().enumerate().skip(2) {
                if v > row[best] {
                    best = i;
                }
            }
            best
        })
        .collect())
}
