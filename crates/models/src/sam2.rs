//! SAM 2 / 2.1 image model (Hiera encoder, prompt encoder, SAM 2 mask decoder) and a predictor
//! with the call semantics of `SAM2ImagePredictor.predict(..., return_logits=True)`.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;
use sam2rad_nn::ops;

use crate::config::SamConfig;
use crate::mask_decoder::MaskDecoder;
use crate::postprocess::{apply_boxes, apply_coords, postprocess_masks};
use crate::prompt_encoder::PromptEncoder;
use crate::sam::{check_sizes, mask_prompt, Prediction, Prompts};
use crate::sam2_image_encoder::{Sam2Features, Sam2ImageEncoder};

/// Key prefixes of SAM 2 / 2.1 checkpoints that only the video path uses (memory, object
/// pointers); pass to [`crate::checkpoint::WeightsBackend::check_unexpected`].
pub const SAM2_VIDEO_KEY_PREFIXES: &[&str] = &[
    "memory_attention.",
    "memory_encoder.",
    "maskmem_tpos_enc",
    "no_mem_pos_enc",
    "no_obj_ptr",
    "obj_ptr_proj.",
    "mask_downsample.",
    "no_obj_embed_spatial",
    "obj_ptr_tpos_proj.",
];

/// Point label of a box's top-left corner when a box is passed as points.
const BOX_TOP_LEFT: i64 = 2;
/// Point label of a box's bottom-right corner.
const BOX_BOTTOM_RIGHT: i64 = 3;

/// The SAM 2 / 2.1 image model.
#[derive(Debug, Clone)]
pub struct Sam2 {
    /// The architecture it was built from.
    pub config: SamConfig,
    /// Trunk, neck, `no_mem_embed` and `conv_s0`/`conv_s1` (keys `image_encoder.*`, ...).
    pub image_encoder: Sam2ImageEncoder,
    /// Prompt encoder (keys `sam_prompt_encoder.*`).
    pub prompt_encoder: PromptEncoder,
    /// SAM 2 mask decoder (keys `sam_mask_decoder.*`).
    pub mask_decoder: MaskDecoder,
}

impl Sam2 {
    /// Builds the image path of `cfg` from `vb` at the checkpoint root (the video-only keys,
    /// [`SAM2_VIDEO_KEY_PREFIXES`], are not read).
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let image_encoder = Sam2ImageEncoder::new(cfg, vb.clone())?;
        let prompt_encoder = PromptEncoder::from_config(cfg, vb.pp("sam_prompt_encoder"))?;
        let mask_decoder = MaskDecoder::new_sam2(
            &cfg.decoder,
            cfg.prompt_embed_dim,
            vb.pp("sam_mask_decoder"),
        )?;
        Ok(Self {
            config: cfg.clone(),
            image_encoder,
            prompt_encoder,
            mask_decoder,
        })
    }

    /// Image features of a preprocessed `[1, 3, S, S]` input.
    pub fn embed(&self, input: &Tensor) -> Result<Sam2Features> {
        self.image_encoder.forward(input)
    }

    /// Decodes `prompts` (original pixels) against precomputed `features`, like
    /// `SAM2ImagePredictor.predict(..., normalize_coords=True, return_logits=True)`.
    ///
    /// With the official square input (`input_size` = S×S) coordinates become `x/w·S`, `y/h·S`
    /// in f32 and masks are resized straight from 256² to the original size. With a
    /// longest-side + pad input (`input_size` ≠ S×S) coordinates are scaled as SAM 1's
    /// `apply_coords` and masks are upscaled to S², cropped to `input_size`, then resized.
    /// A box becomes two points (labels 2, 3) placed before the clicks, and a padding point is
    /// always appended. `low_res_logits` are not clamped.
    pub fn predict(
        &self,
        features: &Sam2Features,
        original_size: (usize, usize),
        input_size: (usize, usize),
        prompts: &Prompts,
        multimask: bool,
    ) -> Result<Prediction> {
        check_sizes(original_size, input_size)?;
        let s = self.config.image_size;
        let square = input_size == (s, s);
        let (h, w) = original_size;
        let to_model = |xy: &[[f32; 2]]| -> Vec<[f32; 2]> {
            if square {
                let (wf, hf, sf) = (w as f32, h as f32, s as f32);
                xy.iter()
                    .map(|&[x, y]| [x / wf * sf, y / hf * sf])
                    .collect()
            } else {
                apply_coords(xy, original_size, input_size)
            }
        };
        let mut xy: Vec<[f32; 2]> = Vec::with_capacity(prompts.points.len() + 2);
        let mut labels: Vec<i64> = Vec::with_capacity(prompts.points.len() + 2);
        if let Some(b) = prompts.boxes {
            let corners = if square {
                to_model(&[[b[0], b[1]], [b[2], b[3]]])
            } else {
                let [x0, y0, x1, y1] = apply_boxes(&[b], original_size, input_size)[0];
                vec![[x0, y0], [x1, y1]]
            };
            xy.extend(corners);
            labels.extend([BOX_TOP_LEFT, BOX_BOTTOM_RIGHT]);
        }
        let clicks: Vec<[f32; 2]> = prompts.points.iter().map(|&(x, y, _)| [x, y]).collect();
        xy.extend(to_model(&clicks));
        labels.extend(prompts.points.iter().map(|p| p.2));

        let dev = features.image_embed.device();
        let points = if xy.is_empty() {
            None
        } else {
            let n = xy.len();
            let coords: Vec<f32> = xy.into_iter().flatten().collect();
            Some((
                Tensor::from_vec(coords, (1, n, 2), dev)?,
                Tensor::from_vec(labels, (1, n), dev)?,
            ))
        };
        let mask = mask_prompt(prompts, 4 * self.prompt_encoder.image_embedding_size())?;
        let (sparse, dense) = self.prompt_encoder.forward(
            points.as_ref().map(|(c, l)| (c, l)),
            None,
            mask.as_ref(),
        )?;
        let [feat_s0, feat_s1] = &features.high_res;
        let out = self.mask_decoder.forward_full_high_res(
            &features.image_embed,
            Some((feat_s0, feat_s1)),
            &self.prompt_encoder.get_dense_pe()?,
            &sparse,
            &dense,
        )?;
        let (low_res_logits, iou_predictions) = self.mask_decoder.select(&out, multimask)?;
        let masks_logits = if square {
            ops::resize_bilinear(&low_res_logits, h, w)?
        } else {
            postprocess_masks(&low_res_logits, input_size, original_size, s)?
        };
        Ok(Prediction {
            low_res_logits,
            iou_predictions,
            masks_logits,
            object_score_logits: out.object_score_logits,
        })
    }
}
