//! Prompt encoder: random-Fourier positional encoding of points and boxes, and the mask-prompt downscaler.

use candle_core::{DType, Module, Result, Tensor, D};
use candle_nn::{conv2d, embedding, Conv2d, Conv2dConfig, Embedding, VarBuilder};
use sam2rad_nn::{ops, LayerNorm2d};

use crate::config::SamConfig;

/// Channels of the mask-prompt downscaler (hard-coded by the official builders).
const MASK_IN_CHANS: usize = 16;

/// LayerNorm2d eps of the mask downscaler.
const LN2D_EPS: f64 = 1e-6;

/// Encodes clicks, boxes and mask prompts into sparse tokens and a dense map (`PromptEncoder`).
#[derive(Debug, Clone)]
pub struct PromptEncoder {
    embed_dim: usize,
    image_embedding_size: usize,
    input_image_size: usize,
    /// `pe_layer.positional_encoding_gaussian_matrix` [2, embed_dim/2].
    pe_gaussian: Tensor,
    /// Negative click, positive click, box top-left, box bottom-right.
    point_embeddings: Vec<Embedding>,
    not_a_point_embed: Embedding,
    no_mask_embed: Embedding,
    mask_conv1: Conv2d,
    mask_norm1: LayerNorm2d,
    mask_conv2: Conv2d,
    mask_norm2: LayerNorm2d,
    mask_conv3: Conv2d,
}

impl PromptEncoder {
    /// The prompt encoder of a model configuration (embedding grid and input size from `cfg`,
    /// the official 16 mask-prompt channels), built from `vb` at its prefix.
    pub fn from_config(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        Self::new(
            cfg.prompt_embed_dim,
            cfg.embedding_size(),
            cfg.image_size,
            MASK_IN_CHANS,
            vb,
        )
    }

    /// Loads the prompt encoder (`vb` at `prompt_encoder`); sizes are square (64, 1024 officially).
    pub fn new(
        embed_dim: usize,
        image_embedding_size: usize,
        input_image_size: usize,
        mask_in_chans: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if !embed_dim.is_multiple_of(2) || !mask_in_chans.is_multiple_of(4) || mask_in_chans == 0 {
            candle_core::bail!(
                "prompt encoder: embed_dim {embed_dim} must be even and mask_in_chans {mask_in_chans} a positive multiple of 4"
            )
        }
        let s2 = Conv2dConfig {
            stride: 2,
            ..Default::default()
        };
        let point_embeddings = (0..4)
            .map(|i| embedding(1, embed_dim, vb.pp(format!("point_embeddings.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let md = vb.pp("mask_downscaling");
        let quarter = mask_in_chans / 4;
        Ok(Self {
            embed_dim,
            image_embedding_size,
            input_image_size,
            // Official init: scale (1.0) × randn; only matters for random-init models.
            pe_gaussian: vb.get_with_hints(
                (2, embed_dim / 2),
                "pe_layer.positional_encoding_gaussian_matrix",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 1.0,
                },
            )?,
            point_embeddings,
            not_a_point_embed: embedding(1, embed_dim, vb.pp("not_a_point_embed"))?,
            no_mask_embed: embedding(1, embed_dim, vb.pp("no_mask_embed"))?,
            mask_conv1: conv2d(1, quarter, 2, s2, md.pp("0"))?,
            mask_norm1: LayerNorm2d::new(quarter, LN2D_EPS, md.pp("1"))?,
            mask_conv2: conv2d(quarter, mask_in_chans, 2, s2, md.pp("3"))?,
            mask_norm2: LayerNorm2d::new(mask_in_chans, LN2D_EPS, md.pp("4"))?,
            mask_conv3: conv2d(mask_in_chans, embed_dim, 1, Default::default(), md.pp("6"))?,
        })
    }

    /// Width of the prompt embeddings.
    pub fn embed_dim(&self) -> usize {
        self.embed_dim
    }

    /// Side of the dense embedding grid (64 officially).
    pub fn image_embedding_size(&self) -> usize {
        self.image_embedding_size
    }

    /// Random-Fourier features `[sin, cos]` of coordinates already normalised to [0, 1], [..., 2].
    fn pe_encoding(&self, coords: &Tensor) -> Result<Tensor> {
        let c = coords.affine(2.0, -1.0)?;
        let c = c.broadcast_matmul(&self.pe_gaussian)?;
        let c = c.affine(2.0 * std::f64::consts::PI, 0.0)?;
        Tensor::cat(&[c.sin()?, c.cos()?], D::Minus1)
    }

    /// PE of pixel-centre coordinates [B,N,2] in the input frame (the +0.5 shift is done here).
    fn pe_with_coords(&self, coords: &Tensor) -> Result<Tensor> {
        let size = self.input_image_size as f32;
        let denom = Tensor::new(&[size, size], coords.device())?.to_dtype(coords.dtype())?;
        let c = (coords + 0.5)?.broadcast_div(&denom)?;
        self.pe_encoding(&c)
    }

    /// Dense positional encoding of the embedding grid, [1, D, 64, 64].
    pub fn get_dense_pe(&self) -> Result<Tensor> {
        let n = self.image_embedding_size;
        let dev = self.pe_gaussian.device();
        let mut grid = Vec::with_capacity(n * n * 2);
        for y in 0..n {
            for x in 0..n {
                grid.push((x as f32 + 0.5) / n as f32);
                grid.push((y as f32 + 0.5) / n as f32);
            }
        }
        let grid = Tensor::from_vec(grid, (n * n, 2), dev)?.to_dtype(self.pe_gaussian.dtype())?;
        self.pe_encoding(&grid)?
            .t()?
            .reshape((1, self.embed_dim, n, n))
    }

    /// Embeds clicks `points` [B,N,2] (input frame) with `labels` [B,N] (any numeric dtype):
    /// −1 padding, 0 negative, 1 positive, 2/3 box corners. `pad` appends a (0,0)/−1 point.
    pub fn embed_points(&self, points: &Tensor, labels: &Tensor, pad: bool) -> Result<Tensor> {
        let (b, n, two) = points.dims3()?;
        if two != 2 || labels.dims() != [b, n] {
            candle_core::bail!(
                "prompt encoder: points must be [B,N,2] and labels [B,N], got {:?} and {:?}",
                points.dims(),
                labels.dims()
            )
        }
        let mut labels: Vec<Vec<i64>> = labels.to_dtype(DType::I64)?.to_vec2()?;
        let points = if pad {
            labels.iter_mut().for_each(|row| row.push(-1));
            let zero = Tensor::zeros((b, 1, 2), points.dtype(), points.device())?;
            Tensor::cat(&[points, &zero], 1)?
        } else {
            points.clone()
        };
        let n = n + usize::from(pad);
        let mut index = Vec::with_capacity(b * n);
        let mut keep = Vec::with_capacity(b * n);
        for &l in labels.iter().flatten() {
            if !(-1..=3).contains(&l) {
                candle_core::bail!("prompt encoder: point label {l} is not one of -1, 0, 1, 2, 3")
            }
            index.push((l + 1) as u32);
            keep.push(if l == -1 { 0f32 } else { 1f32 });
        }
        let dev = points.device();
        // Row 0 is `not_a_point_embed`, row l+1 the embedding of label l.
        let mut rows = vec![self.not_a_point_embed.embeddings()];
        rows.extend(self.point_embeddings.iter().map(|e| e.embeddings()));
        let table = Tensor::cat(&rows, 0)?;
        let added = table
            .index_select(&Tensor::from_vec(index, b * n, dev)?, 0)?
            .reshape((b, n, self.embed_dim))?;
        // Padding tokens are exactly `not_a_point_embed`: their PE is zeroed, not kept.
        let keep = Tensor::from_vec(keep, (b, n, 1), dev)?.to_dtype(points.dtype())?;
        self.pe_with_coords(&points)?.broadcast_mul(&keep)? + added
    }

    /// Embeds boxes [B,4] (or [B,1,4]) xyxy in the input frame as two corner tokens, [B,2,D].
    pub fn embed_boxes(&self, boxes: &Tensor) -> Result<Tensor> {
        let b = boxes.dim(0)?;
        if boxes.elem_count() != 4 * b {
            candle_core::bail!(
                "prompt encoder: boxes must be [B,4], got {:?}",
                boxes.dims()
            )
        }
        let corners = self.pe_with_coords(&boxes.reshape((b, 2, 2))?)?;
        let corner_embed = Tensor::cat(
            &[
                self.point_embeddings[2].embeddings(),
                self.point_embeddings[3].embeddings(),
            ],
            0,
        )?;
        corners.broadcast_add(&corner_embed)
    }

    /// Downscales mask logits [B,1,4·64,4·64] to a dense embedding [B,D,64,64].
    pub fn embed_masks(&self, masks: &Tensor) -> Result<Tensor> {
        let side = 4 * self.image_embedding_size;
        let (_, c, h, w) = masks.dims4()?;
        if c != 1 || h != side || w != side {
            candle_core::bail!(
                "prompt encoder: mask prompt must be [B,1,{side},{side}], got {:?}",
                masks.dims()
            )
        }
        let x = self.mask_conv1.forward(masks)?;
        let x = ops::gelu(&self.mask_norm1.forward(&x)?)?;
        let x = self.mask_conv2.forward(&x)?;
        let x = ops::gelu(&self.mask_norm2.forward(&x)?)?;
        self.mask_conv3.forward(&x)
    }

    /// The dense embedding used when no mask is given: `no_mask_embed` broadcast to [B,D,64,64].
    pub fn no_mask_dense(&self, batch: usize) -> Result<Tensor> {
        let n = self.image_embedding_size;
        self.no_mask_embed
            .embeddings()
            .reshape((1, self.embed_dim, 1, 1))?
            .broadcast_as((batch, self.embed_dim, n, n))
    }

    /// Returns `(sparse [B,n,D], dense [B,D,64,64])` in SAM 1 token order: clicks, a padding
    /// point when there is no box, box corners. Points are in the 1024 input frame.
    pub fn forward(
        &self,
        points: Option<(&Tensor, &Tensor)>,
        boxes: Option<&Tensor>,
        masks: Option<&Tensor>,
    ) -> Result<(Tensor, Tensor)> {
        let batch = match (points, boxes, masks) {
            (Some((p, _)), _, _) => p.dim(0)?,
            (None, Some(b), _) => b.dim(0)?,
            (None, None, Some(m)) => m.dim(0)?,
            (None, None, None) => 1,
        };
        let mut tokens = Vec::with_capacity(2);
        if let Some((coords, labels)) = points {
            tokens.push(self.embed_points(coords, labels, boxes.is_none())?);
        }
        if let Some(boxes) = boxes {
            tokens.push(self.embed_boxes(boxes)?);
        }
        let sparse = if tokens.is_empty() {
            Tensor::zeros(
                (batch, 0, self.embed_dim),
                self.pe_gaussian.dtype(),
                self.pe_gaussian.device(),
            )?
        } else {
            Tensor::cat(&tokens, 1)?
        };
        let dense = match masks {
            Some(m) => self.embed_masks(m)?,
            None => self.no_mask_dense(batch)?,
        };
        if sparse.dim(0)? != batch || dense.dim(0)? != batch {
            candle_core::bail!("prompt encoder: points, boxes and masks have different batch sizes")
        }
        Ok((sparse, dense))
    }
}
