//! SAM 2 image path up to the decoder inputs: Hiera trunk, FPN neck, `no_mem_embed` and the
//! decoder's `conv_s0`/`conv_s1` high-resolution projections, as `SAM2Base.forward_image` plus
//! `SAM2ImagePredictor.set_image` compute them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};

use crate::config::{EncoderConfig, SamConfig};
use crate::fpn_neck::FpnNeck;
use crate::hiera::Hiera;

/// The image features a SAM 2 mask decoder consumes.
#[derive(Debug, Clone)]
pub struct Sam2Features {
    /// Stride-16 embedding with `no_mem_embed` added, `[B, d, S/16, S/16]`.
    pub image_embed: Tensor,
    /// `[conv_s0(level 0) [B, d/8, S/4, S/4], conv_s1(level 1) [B, d/4, S/8, S/8]]`.
    pub high_res: [Tensor; 2],
    /// The FPN levels before `conv_s0`/`conv_s1` and `no_mem_embed`, finest first (S/4, S/8, S/16).
    pub levels: Vec<Tensor>,
}

/// SAM 2 image encoder: trunk (`image_encoder.trunk`), neck (`image_encoder.neck`),
/// `sam_mask_decoder.conv_s0`/`conv_s1` and `no_mem_embed`.
#[derive(Debug, Clone)]
pub struct Sam2ImageEncoder {
    trunk: Hiera,
    neck: FpnNeck,
    conv_s0: Conv2d,
    conv_s1: Conv2d,
    no_mem_embed: Tensor,
    image_size: usize,
}

impl Sam2ImageEncoder {
    /// Builds the image path of a SAM 2 `cfg` from `vb` at the checkpoint root.
    pub fn new(cfg: &SamConfig, vb: VarBuilder) -> Result<Self> {
        let EncoderConfig::Hiera(h) = &cfg.encoder else {
            candle_core::bail!(
                "config `{}` has no Hiera encoder, so it is not a SAM 2 model",
                cfg.name
            )
        };
        let d = cfg.prompt_embed_dim;
        let trunk = Hiera::new(h, vb.pp("image_encoder").pp("trunk"))?;
        // The official ImageEncoder asserts the same: the neck reads the trunk stages coarsest first.
        let coarsest_first: Vec<usize> = trunk.channels().iter().rev().copied().collect();
        if coarsest_first != h.backbone_channel_list {
            candle_core::bail!(
                "config `{}`: backbone_channel_list {:?} does not match the trunk's stage widths {:?}",
                cfg.name,
                h.backbone_channel_list,
                coarsest_first
            )
        }
        if h.stages.len() < h.scalp + 3 {
            candle_core::bail!(
                "config `{}`: SAM 2 needs three FPN levels after scalp {}, the trunk has {} stages",
                cfg.name,
                h.scalp,
                h.stages.len()
            )
        }
        let neck = FpnNeck::new(
            d,
            &h.backbone_channel_list,
            &h.fpn_top_down_levels,
            h.scalp,
            vb.pp("image_encoder").pp("neck"),
        )?;
        let dec = vb.pp("sam_mask_decoder");
        let one = Conv2dConfig::default();
        Ok(Self {
            trunk,
            neck,
            conv_s0: conv2d(d, d / 8, 1, one, dec.pp("conv_s0"))?,
            conv_s1: conv2d(d, d / 4, 1, one, dec.pp("conv_s1"))?,
            no_mem_embed: vb.get_with_hints(
                (1, 1, d),
                "no_mem_embed",
                candle_nn::Init::Randn {
                    mean: 0.0,
                    stdev: 0.02,
                },
            )?,
            image_size: cfg.image_size,
        })
    }

    /// Encodes a preprocessed `[B, 3, S, S]` batch (S = the config's image size).
    pub fn forward(&self, x: &Tensor) -> Result<Sam2Features> {
        let (_, c, h, w) = x.dims4()?;
        let s = self.image_size;
        if (c, h, w) != (3, s, s) {
            candle_core::bail!(
                "SAM 2 encoder: expected a [B, 3, {s}, {s}] input, got {:?}",
                x.dims()
            )
        }
        let levels = self.neck.forward(&self.trunk.forward(x)?)?;
        let n = levels.len();
        let d = self.no_mem_embed.dim(2)?;
        // Single images have no memory: the predictor adds `no_mem_embed` to the coarsest kept level.
        let image_embed = levels[n - 1].broadcast_add(&self.no_mem_embed.reshape((1, d, 1, 1))?)?;
        let high_res = [
            self.conv_s0.forward(&levels[0])?,
            self.conv_s1.forward(&levels[1])?,
        ];
        Ok(Sam2Features {
            image_embed,
            high_res,
            levels,
        })
    }
}
