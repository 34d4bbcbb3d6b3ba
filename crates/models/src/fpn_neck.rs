//! SAM 2 FPN neck (`sam2/modeling/backbones/image_encoder.py::FpnNeck`): 1×1 lateral convs,
//! a nearest-2× top-down path summed into the configured levels, and scalp. The sine position
//! encodings are not built: the single-image path never uses them.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, Conv2d, Conv2dConfig, VarBuilder};
use sam2rad_nn::ops;

/// The FPN neck (keys under `image_encoder.neck`).
#[derive(Debug, Clone)]
pub struct FpnNeck {
    /// Lateral convs; `convs[0]` belongs to the coarsest trunk stage.
    convs: Vec<Conv2d>,
    fpn_top_down_levels: Vec<usize>,
    scalp: usize,
}

impl FpnNeck {
    /// Builds `convs.{i}.conv` (1×1, `backbone_channel_list[i]` → `d_model`) from `vb` at
    /// `image_encoder.neck`; `backbone_channel_list` is coarsest first, as in the official config.
    pub fn new(
        d_model: usize,
        backbone_channel_list: &[usize],
        fpn_top_down_levels: &[usize],
        scalp: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        if scalp >= backbone_channel_list.len() {
            candle_core::bail!(
                "fpn neck: scalp {scalp} would drop all {} levels",
                backbone_channel_list.len()
            )
        }
        let convs = backbone_channel_list
            .iter()
            .enumerate()
            .map(|(i, &c)| {
                conv2d(
                    c,
                    d_model,
                    1,
                    Conv2dConfig::default(),
                    vb.pp("convs").pp(i).pp("conv"),
                )
            })
            .collect::<Result<Vec<_>>>()?;
        Ok(Self {
            convs,
            fpn_top_down_levels: fpn_top_down_levels.to_vec(),
            scalp,
        })
    }

    /// FPN levels of the trunk's stage outputs (`xs` finest first), finest first, with the
    /// `scalp` coarsest levels dropped.
    pub fn forward(&self, xs: &[Tensor]) -> Result<Vec<Tensor>> {
        let n = self.convs.len();
        if xs.len() != n {
            candle_core::bail!("fpn neck: expected {n} trunk stages, got {}", xs.len())
        }
        let mut out: Vec<Tensor> = Vec::with_capacity(n);
        // Top-down from the coarsest stage; a level outside `fpn_top_down_levels` restarts the
        // path from its own lateral features.
        let mut prev: Option<Tensor> = None;
        for i in (0..n).rev() {
            let lateral = self.convs[n - 1 - i].forward(&xs[i])?;
            let level = match prev {
                Some(p) if self.fpn_top_down_levels.contains(&i) => {
                    let (_, _, h, w) = p.dims4()?;
                    (lateral + ops::resize_nearest(&p, 2 * h, 2 * w)?)?
                }
                _ => lateral,
            };
            prev = Some(level.clone());
            out.push(level);
        }
        out.reverse();
        out.truncate(n - self.scalp);
        Ok(out)
    }
}
