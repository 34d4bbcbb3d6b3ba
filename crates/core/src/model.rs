//! Sam2Rad assembly (SPEC §2.4–2.5, §3): the frozen base model, the prompt predictor, the
//! objectness head and the optional decoder adaptation, with their trainable variables split
//! into the two AdamW groups.

use std::collections::{BTreeMap, HashMap};

use candle_core::{Device, Result, Tensor, Var};
use sam2rad_models::checkpoint::{Source, WeightsBackend};
use sam2rad_models::config::{Family, SamConfig};
use sam2rad_models::mask_decoder::MaskDecoder;
use sam2rad_models::sam::AnySam;
use serde::{Deserialize, Serialize};

use crate::features::{level_channels, level_sides, Features, Rows};
pub use crate::ppn::{Phase, PpnVariant};
use crate::ppn::{PpnConfig, PromptPredictor};

/// Which mask-decoder parameters train (SPEC §3 `--decoder`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum DecoderMode {
    /// No decoder parameter trains (PPN and objectness only; the paper's ideal).
    Frozen,
    /// LoRA on q and v of all decoder attentions, plus mask tokens, output upscaling and the
    /// single-mask hypernetwork MLP (default).
    #[default]
    Lora,
    /// The whole decoder (see [`trainable_decoder_key`] for the parts no loss reaches).
    Full,
}

/// A Sam2Rad model description (serialised next to a run checkpoint).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sam2RadConfig {
    /// The frozen foundation model.
    pub base: SamConfig,
    /// Number of classes C.
    pub num_classes: usize,
    /// Learned tokens per class N (tokens 0–1 become the box).
    #[serde(default = "default_tokens")]
    pub num_tokens: usize,
    /// PPN variant.
    #[serde(default)]
    pub ppn: PpnVariant,
    /// Decoder adaptation.
    #[serde(default)]
    pub decoder: DecoderMode,
    /// LoRA rank r.
    #[serde(default = "default_rank")]
    pub lora_rank: usize,
    /// LoRA alpha (the update is scaled by alpha / r).
    #[serde(default = "default_alpha")]
    pub lora_alpha: f64,
    /// Dropout of the PPN mask head (training only).
    #[serde(default = "default_dropout")]
    pub dropout: f64,
}

fn default_tokens() -> usize {
    8
}
fn default_rank() -> usize {
    8
}
fn default_alpha() -> f64 {
    8.0
}
fn default_dropout() -> f64 {
    0.1
}

impl Sam2RadConfig {
    /// The defaults of SPEC §3 for `num_classes` classes on `base`.
    pub fn new(base: SamConfig, num_classes: usize) -> Self {
        Self {
            base,
            num_classes,
            num_tokens: default_tokens(),
            ppn: PpnVariant::default(),
            decoder: DecoderMode::default(),
            lora_rank: default_rank(),
            lora_alpha: default_alpha(),
            dropout: default_dropout(),
        }
    }

    /// Checks the invariants the model relies on; returns the first violation.
    pub fn validate(&self) -> std::result::Result<(), String> {
        self.base.validate()?;
        if self.num_classes == 0 {
            return Err("num_classes must be at least 1".into());
        }
        if self.num_tokens < 2 {
            return Err(format!(
                "num_tokens must be at least 2 (the box), got {}",
                self.num_tokens
            ));
        }
        if self.decoder == DecoderMode::Lora && self.lora_rank == 0 {
            return Err("lora_rank must be positive".into());
        }
        if !(0.0..1.0).contains(&self.dropout) {
            return Err(format!("dropout {} must lie in [0, 1)", self.dropout));
        }
        Ok(())
    }
}

/// Key prefix of the mask decoder in the base checkpoint of `family`.
fn decoder_prefix(family: Family) -> &'static str {
    match family {
        Family::Sam2 => "sam_mask_decoder.",
        _ => "mask_decoder.",
    }
}

/// True for SAM 2's pretrained object-score token and head (trained in every mode, with the
/// prompt-side learning rate, like the objectness head Sam2Rad adds to SAM 1).
fn is_sam2_objectness_key(family: Family, key: &str) -> bool {
    family == Family::Sam2
        && key.strip_prefix(decoder_prefix(family)).is_some_and(|k| {
            k.starts_with("obj_score_token.") || k.starts_with("pred_obj_score_head.")
        })
}

/// Whether official base key `key` is a trainable tensor under `mode`.
///
/// Never trainable: everything outside the decoder; SAM 2's `conv_s0`/`conv_s1` (applied before
/// the feature cache); the IoU head (no loss term reaches it) and the hypernetwork MLPs of mask
/// tokens 1.. (only the single-mask token 0 is used, so they would get zero gradients).
pub fn trainable_decoder_key(family: Family, mode: DecoderMode, key: &str) -> bool {
    if is_sam2_objectness_key(family, key) {
        return true;
    }
    let Some(k) = key.strip_prefix(decoder_prefix(family)) else {
        return false;
    };
    let never = ["conv_s0.", "conv_s1.", "iou_prediction_head."];
    if never.iter().any(|p| k.starts_with(p))
        || (k.starts_with("output_hypernetworks_mlps.")
            && !k.starts_with("output_hypernetworks_mlps.0."))
    {
        return false;
    }
    match mode {
        DecoderMode::Frozen => false,
        DecoderMode::Full => true,
        DecoderMode::Lora => [
            "mask_tokens.",
            "output_upscaling.",
            "output_hypernetworks_mlps.",
        ]
        .iter()
        .any(|p| k.starts_with(p)),
    }
}

/// User prompts of a batch of R rows, in the padded input frame (pixels of `image_size`).
#[derive(Debug, Clone)]
pub struct RowPrompts {
    /// Use the PPN's learned prompts (autonomous / semi-autonomous); false = manual mode.
    pub learned: bool,
    /// One xyxy box per row, `[R, 4]`.
    pub boxes: Option<Tensor>,
    /// Clicks `[R, n, 2]` (x, y) with labels `[R, n]` (1 positive, 0 negative, −1 padding).
    pub points: Option<(Tensor, Tensor)>,
    /// Mask-prompt logits `[R, 1, 4h, 4w]`; replaces the learned dense prompt.
    pub mask: Option<Tensor>,
}

impl RowPrompts {
    /// Learned prompts only (autonomous mode).
    pub fn learned() -> Self {
        Self {
            learned: true,
            boxes: None,
            points: None,
            mask: None,
        }
    }
}

/// What [`Sam2Rad::forward`] returns for R rows.
#[derive(Debug, Clone)]
pub struct Sam2RadOutput {
    /// Single-mask (token 0) low-resolution logits `[R, 1, 4h, 4w]` (256² for a 1024 input).
    pub mask_logits: Tensor,
    /// Predicted IoU of that mask `[R]` (raw for SAM 1, sigmoid for SAM 2).
    pub iou: Tensor,
    /// Objectness logits `[R]` (> 0: the class is present).
    pub object_logits: Tensor,
    /// The PPN's mask-prompt logits `[R, 1, 4h, 4w]` (None in manual mode).
    pub mask_prompt_logits: Option<Tensor>,
    /// The PPN's normalised xyxy boxes `[R, 4]` (None in manual mode).
    pub boxes: Option<Tensor>,
}

/// Trainable variables by AdamW group.
#[derive(Debug, Clone, Default)]
pub struct TrainableVars {
    /// Queries, PPN and objectness token/head (lr 1e-4).
    pub prompt: Vec<(String, Var)>,
    /// LoRA factors and trainable decoder tensors (lr 1e-5).
    pub decoder: Vec<(String, Var)>,
}

/// The Sam2Rad model.
#[derive(Clone)]
pub struct Sam2Rad {
    config: Sam2RadConfig,
    base: AnySam,
    ppn: PromptPredictor,
    /// The prompt encoder's dense PE `[1, D, h, w]`, computed once and broadcast over rows.
    dense_pe: Tensor,
    /// Official-key tensors of the base; trainable decoder keys are variables.
    base_backend: WeightsBackend,
    /// PPN (`ppn.*`), objectness (`objectness.*`) and LoRA (`lora.*`) tensors, all variables.
    trained_backend: WeightsBackend,
}

impl std::fmt::Debug for Sam2Rad {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sam2Rad")
            .field("config", &self.config)
            .field("base_vars", &self.base_backend.vars().len())
            .field("trained_vars", &self.trained_backend.vars().len())
            .finish_non_exhaustive()
    }
}

impl Sam2Rad {
    /// Builds the model: the base from `base` (an official checkpoint, or `Init`/`Random` for
    /// tests and the mini demo) with the decoder keys of `cfg.decoder` as variables under their
    /// official names, and the new parts from `trained` — `Source::Init { seed }` for a fresh run
    /// or `Source::File` of a run checkpoint (every trained tensor, including official-name
    /// decoder ones, is then loaded from it; see [`Self::load_trained`]).
    pub fn new(
        cfg: &Sam2RadConfig,
        base: Source,
        trained: Source,
        device: &Device,
    ) -> Result<Self> {
        cfg.validate()
            .map_err(|e| candle_core::Error::Msg(format!("Sam2Rad config: {e}")))?;
        let family = cfg.base.family;
        let mode = cfg.decoder;
        let base_backend =
            WeightsBackend::new(base, move |k| trainable_decoder_key(family, mode, k));
        let mut model = AnySam::new(&cfg.base, base_backend.var_builder(device))?;
        base_backend
            .check_unexpected(model.unexpected_allowed_prefixes())
            .map_err(|e| candle_core::Error::Msg(e.to_string()))?;

        let run_file = match &trained {
            Source::File(ckpt) => Some(ckpt.clone()),
            _ => None,
        };
        // A run file is read through `load_trained` (it also holds official-name decoder keys),
        // so the new parts are first built from a fixed init of the right shapes.
        let trained_backend = WeightsBackend::new(
            if run_file.is_some() {
                Source::Zeros
            } else {
                trained
            },
            |_| true,
        );
        let tvb = trained_backend.var_builder(device);
        let decoder = decoder_mut(&mut model);
        // We always read mask token 0; the stability choice would only cost a host sync.
        decoder.set_dynamic_multimask(None);
        if !decoder.has_object_score() {
            decoder.attach_objectness(tvb.pp("objectness"))?;
        }
        if mode == DecoderMode::Lora {
            decoder.attach_lora(cfg.lora_rank, cfg.lora_alpha, tvb.pp("lora"))?;
        }
        let ppn_cfg = PpnConfig {
            dim: cfg.base.prompt_embed_dim,
            num_heads: cfg.base.decoder.num_heads,
            mlp_dim: cfg.base.decoder.mlp_dim,
            num_classes: cfg.num_classes,
            num_tokens: cfg.num_tokens,
            variant: cfg.ppn,
            dropout: cfg.dropout,
            level_channels: level_channels(&model)?,
            level_sides: level_sides(&cfg.base),
            mask_side: 4 * cfg.base.embedding_size(),
            image_size: cfg.base.image_size,
        };
        let ppn = PromptPredictor::new(&ppn_cfg, tvb.pp("ppn"))?;
        let dense_pe = model.prompt_encoder().get_dense_pe()?;
        let out = Self {
            config: cfg.clone(),
            base: model,
            ppn,
            dense_pe,
            base_backend,
            trained_backend,
        };
        if let Some(ckpt) = run_file {
            out.load_trained(&ckpt.tensors)?;
        }
        Ok(out)
    }

    /// The configuration.
    pub fn config(&self) -> &Sam2RadConfig {
        &self.config
    }

    /// The (frozen) base model, e.g. for [`crate::features::extract`].
    pub fn base(&self) -> &AnySam {
        &self.base
    }

    /// The prompt predictor.
    pub fn ppn(&self) -> &PromptPredictor {
        &self.ppn
    }

    /// Trainable variables split into the prompt-side and decoder-side AdamW groups, each sorted
    /// by key.
    pub fn trainable_vars(&self) -> TrainableVars {
        let family = self.config.base.family;
        let mut out = TrainableVars::default();
        for (k, v) in self.trained_backend.vars() {
            if k.starts_with("lora.") {
                out.decoder.push((k, v));
            } else {
                out.prompt.push((k, v));
            }
        }
        for (k, v) in self.base_backend.vars() {
            if is_sam2_objectness_key(family, &k) {
                out.prompt.push((k, v));
            } else {
                out.decoder.push((k, v));
            }
        }
        out.prompt.sort_by(|a, b| a.0.cmp(&b.0));
        out.decoder.sort_by(|a, b| a.0.cmp(&b.0));
        out
    }

    /// Every trained tensor by key (what a run checkpoint stores), sorted by key.
    pub fn trained_tensors(&self) -> BTreeMap<String, Tensor> {
        let vars = self.trainable_vars();
        vars.prompt
            .into_iter()
            .chain(vars.decoder)
            .map(|(k, v)| (k, v.as_tensor().detach()))
            .collect()
    }

    /// Sets every trainable variable from `tensors` (a run checkpoint): each must be present with
    /// its shape, and the map may hold no other key.
    pub fn load_trained(&self, tensors: &HashMap<String, Tensor>) -> Result<()> {
        let vars = self.trainable_vars();
        let all: Vec<(String, Var)> = vars.prompt.into_iter().chain(vars.decoder).collect();
        for (k, var) in &all {
            let Some(t) = tensors.get(k) else {
                candle_core::bail!("run checkpoint lacks `{k}` (shape {:?})", var.dims())
            };
            if t.dims() != var.dims() {
                candle_core::bail!(
                    "run checkpoint `{k}` has shape {:?}, the model expects {:?}",
                    t.dims(),
                    var.dims()
                )
            }
            var.set(&t.to_dtype(var.dtype())?.to_device(var.device())?)?;
        }
        let mut extra: Vec<&String> = tensors
            .keys()
            .filter(|k| !all.iter().any(|(n, _)| n == *k))
            .collect();
        extra.sort();
        if let Some(k) = extra.first() {
            candle_core::bail!(
                "run checkpoint has `{k}`, which this model configuration does not train"
            )
        }
        Ok(())
    }

    /// Runs the PPN (unless manual) and the decoder for `rows` of the images in `feats`.
    ///
    /// Sparse tokens are `[learned (N), user]`, user tokens in the base family's order (SAM 1:
    /// clicks, a padding point when there is no box, box corners; SAM 2: box corners, clicks,
    /// padding point). The dense prompt is the user mask, else the learned one, else
    /// `no_mask_embed`. The decoder reads `E + dense` (and SAM 2's skips); mask token 0 only.
    pub fn forward(
        &self,
        feats: &Features,
        rows: &Rows,
        prompts: &RowPrompts,
        phase: Phase,
    ) -> Result<Sam2RadOutput> {
        let r = rows.len();
        if r == 0 {
            candle_core::bail!("Sam2Rad: no rows to predict")
        }
        let b = feats.batch()?;
        if let Some(&i) = rows.image().iter().find(|&&i| i >= b) {
            candle_core::bail!("Sam2Rad: a row refers to image {i}, the batch has {b}")
        }
        let pe = self.base.prompt_encoder();
        let d = pe.embed_dim();
        let learned = if prompts.learned {
            Some(self.ppn.forward(feats, rows, pe, phase)?)
        } else {
            None
        };
        let mut sparse_parts = Vec::with_capacity(2);
        if let Some(l) = &learned {
            sparse_parts.push(l.sparse.clone());
        }
        if let Some(user) = self.user_sparse(prompts, r)? {
            sparse_parts.push(user);
        }
        let sparse = match sparse_parts.len() {
            0 => Tensor::zeros((r, 0, d), feats.embed.dtype(), feats.embed.device())?,
            1 => sparse_parts.remove(0),
            _ => Tensor::cat(&sparse_parts, 1)?,
        };
        let dense = match (&prompts.mask, &learned) {
            (Some(m), _) => {
                check_rows("mask prompt", m, r)?;
                pe.embed_masks(m)?
            }
            (None, Some(l)) => l.dense.clone(),
            (None, None) => pe.no_mask_dense(r)?,
        };
        // A single image is broadcast by the decoder; otherwise pick each row's image.
        let feats = if b == 1 {
            feats.clone()
        } else {
            feats.rows(rows.image())?
        };
        let high_res = feats.high_res.as_ref().map(|[s0, s1]| (s0, s1));
        let out = self.base.mask_decoder().forward_full_high_res(
            &feats.embed,
            high_res,
            &self.dense_pe,
            &sparse,
            &dense,
        )?;
        let Some(object_logits) = out.object_score_logits else {
            candle_core::bail!("Sam2Rad: the decoder has no objectness head")
        };
        Ok(Sam2RadOutput {
            mask_logits: out.masks_all.narrow(1, 0, 1)?.contiguous()?,
            iou: out.iou_all.narrow(1, 0, 1)?.squeeze(1)?,
            object_logits: object_logits.squeeze(1)?,
            mask_prompt_logits: learned.as_ref().map(|l| l.mask_prompt_logits.clone()),
            boxes: learned.map(|l| l.boxes),
        })
    }

    /// The user's clicks and box through the frozen prompt encoder, `[R, k, D]` (None if none).
    fn user_sparse(&self, prompts: &RowPrompts, r: usize) -> Result<Option<Tensor>> {
        let pe = self.base.prompt_encoder();
        if let Some(b) = &prompts.boxes {
            check_rows("box prompt", b, r)?;
        }
        if let Some((c, _)) = &prompts.points {
            check_rows("point prompt", c, r)?;
        }
        let boxes = prompts
            .boxes
            .as_ref()
            .map(|b| pe.embed_boxes(b))
            .transpose()?;
        let parts = match &self.base {
            AnySam::Sam(_) => {
                let points = match &prompts.points {
                    Some((c, l)) => Some(pe.embed_points(c, l, boxes.is_none())?),
                    None => None,
                };
                [points, boxes]
            }
            AnySam::Sam2(_) => {
                // The SAM 2 predictor passes the box as two points, so a padding point always
                // follows the clicks (or the box alone).
                let points = match (&prompts.points, &boxes) {
                    (Some((c, l)), _) => Some(pe.embed_points(c, l, true)?),
                    (None, Some(b)) => {
                        let xy = Tensor::zeros((r, 1, 2), b.dtype(), b.device())?;
                        let pad = Tensor::full(-1i64, (r, 1), b.device())?;
                        Some(pe.embed_points(&xy, &pad, false)?)
                    }
                    (None, None) => None,
                };
                [boxes, points]
            }
        };
        let parts: Vec<Tensor> = parts.into_iter().flatten().collect();
        Ok(match parts.len() {
            0 => None,
            1 => parts.into_iter().next(),
            _ => Some(Tensor::cat(&parts, 1)?),
        })
    }
}

/// Fails unless `t` has `r` rows.
fn check_rows(what: &str, t: &Tensor, r: usize) -> Result<()> {
    if t.dims().first() != Some(&r) {
        candle_core::bail!(
            "Sam2Rad: {what} has shape {:?}, expected {r} rows",
            t.dims()
        )
    }
    Ok(())
}

/// The mask decoder of `model`, mutably (to attach LoRA and objectness).
fn decoder_mut(model: &mut AnySam) -> &mut MaskDecoder {
    match model {
        AnySam::Sam(m) => &mut m.mask_decoder,
        AnySam::Sam2(m) => &mut m.mask_decoder,
    }
}
