//! The image encoder of a configuration, whichever variant it is.

use candle_core::{Result, Tensor};
use candle_nn::VarBuilder;

use crate::config::{EncoderConfig, SamConfig};
use crate::image_encoder::ImageEncoderViT;
use crate::tiny_vit::TinyViT;

/// An image encoder: SAM's ViT (SAM, MedSAM) or MobileSAM's TinyViT.
#[derive(Debug, Clone)]
pub enum ImageEncoder {
    /// SAM ViT-B/L/H.
    Vit(ImageEncoderViT),
    /// MobileSAM TinyViT.
    TinyVit(TinyViT),
}

impl ImageEncoder {
    /// Builds the encoder of `cfg` from `vb` at the model root (keys under `image_encoder.`).
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let vb = vb.pp("image_encoder");
        Ok(match &cfg.encoder {
            EncoderConfig::Vit(v) => Self::Vit(ImageEncoderViT::new(
                v,
                cfg.image_size,
                cfg.prompt_embed_dim,
                vb,
            )?),
            EncoderConfig::TinyVit(t) => {
                Self::TinyVit(TinyViT::new(t, cfg.image_size, cfg.prompt_embed_dim, vb)?)
            }
            EncoderConfig::Hiera(_) => {
                candle_core::bail!(
                    "model `{}`: the SAM 2 Hiera encoder is not an ImageEncoder variant",
                    cfg.name
                )
            }
        })
    }

    /// Image embedding `[B, prompt_embed_dim, S/16, S/16]` of a preprocessed `[B, 3, S, S]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self {
            Self::Vit(e) => e.forward(x),
            Self::TinyVit(e) => e.forward(x),
        }
    }

    /// The embedding plus the outputs of the encoder's last two blocks as NCHW maps.
    pub fn forward_levels(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        match self {
            Self::Vit(e) => e.forward_levels(x),
            Self::TinyVit(e) => e.forward_levels(x),
        }
    }

    /// Channels of the maps [`Self::forward_levels`] returns, in the same order.
    pub fn level_channels(&self) -> Vec<usize> {
        match self {
            Self::Vit(e) => e.level_channels(),
            Self::TinyVit(e) => e.level_channels(),
        }
    }
}
