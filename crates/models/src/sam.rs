//! Model assembly and a predictor with the official call semantics (original-pixel prompts), and
//! [`AnySam`], which holds a SAM 1-style model or a SAM 2 model behind one interface.

use candle_core::{DType, Result, Tensor};
use candle_nn::VarBuilder;
use sam2rad_nn::ops;

use crate::config::{Family, SamConfig};
use crate::encoder::ImageEncoder;
use crate::mask_decoder::{DecoderOutput, MaskDecoder};
use crate::postprocess::{apply_boxes, apply_coords, postprocess_masks};
use crate::preprocess::Preprocessed;
use crate::prompt_encoder::PromptEncoder;
use crate::sam2::{Sam2, SAM2_VIDEO_KEY_PREFIXES};
use crate::sam2_image_encoder::Sam2Features;

/// Prompts for one image, in original-image pixels.
#[derive(Debug, Clone, Default)]
pub struct Prompts {
    /// Clicks `(x, y, label)`; label 1 foreground, 0 background.
    pub points: Vec<(f32, f32, i64)>,
    /// One xyxy box.
    pub boxes: Option<[f32; 4]>,
    /// Low-resolution mask logits, 1×1×256×256 (or 1×256×256), e.g. a previous prediction.
    pub mask_input: Option<Tensor>,
}

/// What [`Sam::predict`] and [`Sam2::predict`] return (K = 3 with multimask output, else 1).
#[derive(Debug, Clone)]
pub struct Prediction {
    /// Decoder logits, [1, K, 256, 256] (not clamped, also for SAM 2).
    pub low_res_logits: Tensor,
    /// Predicted IoU of each mask, [1, K] (sigmoid already applied for SAM 2).
    pub iou_predictions: Tensor,
    /// Logits upscaled to the original image, [1, K, H, W]; the mask is `> 0`.
    pub masks_logits: Tensor,
    /// SAM 2 object-score logit, [1, 1] (> 0: an object is present); None for SAM 1.
    pub object_score_logits: Option<Tensor>,
}

/// Fails on empty original or input sizes.
pub(crate) fn check_sizes(original_size: (usize, usize), input_size: (usize, usize)) -> Result<()> {
    if original_size.0 == 0 || original_size.1 == 0 || input_size.0 == 0 || input_size.1 == 0 {
        candle_core::bail!("predict: empty image size {original_size:?} / {input_size:?}")
    }
    Ok(())
}

/// The mask prompt of `prompts` as f32 [1, 1, side, side] logits, checked for its size.
pub(crate) fn mask_prompt(prompts: &Prompts, side: usize) -> Result<Option<Tensor>> {
    Ok(match &prompts.mask_input {
        Some(m) if m.elem_count() == side * side => {
            Some(m.reshape((1, 1, side, side))?.to_dtype(DType::F32)?)
        }
        Some(m) => candle_core::bail!(
            "mask_input must be 1x1x{side}x{side} logits, got {:?}",
            m.dims()
        ),
        None => None,
    })
}

/// A Segment-Anything model: image encoder, prompt encoder and mask decoder.
#[derive(Debug, Clone)]
pub struct Sam {
    /// The architecture it was built from.
    pub config: SamConfig,
    /// Image encoder (keys `image_encoder.*`).
    pub image_encoder: ImageEncoder,
    /// Prompt encoder (keys `prompt_encoder.*`).
    pub prompt_encoder: PromptEncoder,
    /// Mask decoder (keys `mask_decoder.*`).
    pub mask_decoder: MaskDecoder,
}

impl Sam {
    /// Builds the model of `cfg` from `vb` at the checkpoint root.
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let image_encoder = ImageEncoder::new(cfg, vb.clone())?;
        let prompt_encoder = PromptEncoder::from_config(cfg, vb.pp("prompt_encoder"))?;
        let mask_decoder =
            MaskDecoder::new(&cfg.decoder, cfg.prompt_embed_dim, vb.pp("mask_decoder"))?;
        Ok(Self {
            config: cfg.clone(),
            image_encoder,
            prompt_encoder,
            mask_decoder,
        })
    }

    /// Image embedding [1, D, 64, 64] of a preprocessed image.
    pub fn embed(&self, pre: &Preprocessed) -> Result<Tensor> {
        self.image_encoder.forward(&pre.input)
    }

    /// Decodes `prompts` (original pixels) against a precomputed `embedding`, like
    /// `SamPredictor.predict(..., return_logits=True)`.
    pub fn predict(
        &self,
        embedding: &Tensor,
        original_size: (usize, usize),
        input_size: (usize, usize),
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<Prediction> {
        check_sizes(original_size, input_size)?;
        let dev = embedding.device();
        let points = if prompts.points.is_empty() {
            None
        } else {
            let xy: Vec<[f32; 2]> = prompts.points.iter().map(|&(x, y, _)| [x, y]).collect();
            let n = xy.len();
            let coords: Vec<f32> = apply_coords(&xy, original_size, input_size)
                .into_iter()
                .flatten()
                .collect();
            let labels: Vec<i64> = prompts.points.iter().map(|p| p.2).collect();
            Some((
                Tensor::from_vec(coords, (1, n, 2), dev)?,
                Tensor::from_vec(labels, (1, n), dev)?,
            ))
        };
        let boxes = match prompts.boxes {
            Some(b) => {
                let b = apply_boxes(&[b], original_size, input_size);
                Some(Tensor::from_vec(b[0].to_vec(), (1, 4), dev)?)
            }
            None => None,
        };
        let mask = mask_prompt(prompts, 4 * self.prompt_encoder.image_embedding_size())?;
        let (sparse, dense) = self.prompt_encoder.forward(
            points.as_ref().map(|(c, l)| (c, l)),
            boxes.as_ref(),
            mask.as_ref(),
        )?;
        let (low_res_logits, iou_predictions) = self.mask_decoder.forward(
            embedding,
            &self.prompt_encoder.get_dense_pe()?,
            &sparse,
            &dense,
            multimask,
        )?;
        let masks_logits = match self.config.family {
            // MedSAM resizes the low-res output straight to the image (no padded 1024 frame).
            Family::MedSam => {
                ops::resize_bilinear(&low_res_logits, original_size.0, original_size.1)?
            }
            _ => postprocess_masks(
                &low_res_logits,
                input_size,
                original_size,
                self.config.image_size,
            )?,
        };
        Ok(Prediction {
            low_res_logits,
            iou_predictions,
            masks_logits,
            object_score_logits: None,
        })
    }
}

/// Image features of either generation, as [`AnySam::embed`] returns them.
#[derive(Debug, Clone)]
pub enum ImageEmbedding {
    /// SAM 1 / MobileSAM / MedSAM embedding, [1, D, 64, 64].
    Sam(Tensor),
    /// SAM 2 features: embedding with `no_mem_embed`, projected high-resolution maps, FPN levels.
    Sam2(Sam2Features),
}

impl ImageEmbedding {
    /// The stride-16 image embedding the decoder attends to, [B, D, 64, 64].
    pub fn image_embed(&self) -> &Tensor {
        match self {
            Self::Sam(t) => t,
            Self::Sam2(f) => &f.image_embed,
        }
    }

    /// SAM 2's `(feat_s0, feat_s1)` for the decoder's upscaler; None for SAM 1.
    pub fn high_res(&self) -> Option<(&Tensor, &Tensor)> {
        match self {
            Self::Sam(_) => None,
            Self::Sam2(f) => Some((&f.high_res[0], &f.high_res[1])),
        }
    }
}

/// A SAM 1-style model (SAM, MobileSAM, MedSAM) or a SAM 2 / 2.1 model.
#[derive(Debug, Clone)]
pub enum AnySam {
    /// SAM, MobileSAM or MedSAM.
    Sam(Sam),
    /// SAM 2 / SAM 2.1.
    Sam2(Sam2),
}

impl AnySam {
    /// Builds the model of `cfg` (SAM 2 when `cfg.family` is [`Family::Sam2`]) from `vb` at the
    /// checkpoint root.
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        Ok(match cfg.family {
            Family::Sam2 => Self::Sam2(Sam2::new(cfg, vb)?),
            Family::Sam | Family::MobileSam | Family::MedSam => Self::Sam(Sam::new(cfg, vb)?),
        })
    }

    /// The architecture the model was built from.
    pub fn config(&self) -> &SamConfig {
        match self {
            Self::Sam(m) => &m.config,
            Self::Sam2(m) => &m.config,
        }
    }

    /// Checkpoint key prefixes the model does not read on purpose (for
    /// [`crate::checkpoint::WeightsBackend::check_unexpected`]).
    pub fn unexpected_allowed_prefixes(&self) -> &'static [&'static str] {
        match self {
            Self::Sam(_) => &[],
            Self::Sam2(_) => SAM2_VIDEO_KEY_PREFIXES,
        }
    }

    /// The prompt encoder.
    pub fn prompt_encoder(&self) -> &PromptEncoder {
        match self {
            Self::Sam(m) => &m.prompt_encoder,
            Self::Sam2(m) => &m.prompt_encoder,
        }
    }

    /// The mask decoder.
    pub fn mask_decoder(&self) -> &MaskDecoder {
        match self {
            Self::Sam(m) => &m.mask_decoder,
            Self::Sam2(m) => &m.mask_decoder,
        }
    }

    /// Encodes a preprocessed `[1, 3, S, S]` input (see the family's preprocessing).
    pub fn embed(&self, input: &Tensor) -> Result<ImageEmbedding> {
        Ok(match self {
            Self::Sam(m) => ImageEmbedding::Sam(m.image_encoder.forward(input)?),
            Self::Sam2(m) => ImageEmbedding::Sam2(m.embed(input)?),
        })
    }

    /// Runs the mask decoder for all tokens on prompt embeddings (no postprocessing), e.g. for
    /// benchmarks; pick the returned masks with [`MaskDecoder::select`].
    pub fn decode_full(
        &self,
        embedding: &ImageEmbedding,
        sparse: &Tensor,
        dense: &Tensor,
    ) -> Result<DecoderOutput> {
        self.check_embedding(embedding)?;
        self.mask_decoder().forward_full_high_res(
            embedding.image_embed(),
            embedding.high_res(),
            &self.prompt_encoder().get_dense_pe()?,
            sparse,
            dense,
        )
    }

    /// Decodes `prompts` (original pixels) with the predictor semantics of the model's family.
    pub fn predict(
        &self,
        embedding: &ImageEmbedding,
        original_size: (usize, usize),
        input_size: (usize, usize),
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<Prediction> {
        match (self, embedding) {
            (Self::Sam(m), ImageEmbedding::Sam(e)) => {
                m.predict(e, original_size, input_size, prompts, multimask)
            }
            (Self::Sam2(m), ImageEmbedding::Sam2(f)) => {
                m.predict(f, original_size, input_size, prompts, multimask)
            }
            _ => generation_mismatch(),
        }
    }

    /// Fails when `embedding` comes from the other generation.
    fn check_embedding(&self, embedding: &ImageEmbedding) -> Result<()> {
        match (self, embedding) {
            (Self::Sam(_), ImageEmbedding::Sam(_)) | (Self::Sam2(_), ImageEmbedding::Sam2(_)) => {
                Ok(())
            }
            _ => generation_mismatch(),
        }
    }
}

/// The error for a SAM 1 embedding given to a SAM 2 model or the reverse.
fn generation_mismatch<T>() -> Result<T> {
    candle_core::bail!("the image embedding comes from the other model generation (SAM 1 vs SAM 2)")
}
