//! TinyViT image encoder (MobileSAM): convolutional stem and MBConv stage, windowed attention
//! stages with learned attention biases, eval-mode batch norm, and SAM's neck.

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d_no_bias, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use sam2rad_nn::{ops, LayerNorm, LayerNorm2d};

use crate::config::TinyVitConfig;
use crate::image_encoder::{window_partition, window_unpartition};

/// BatchNorm2d eps (PyTorch default).
const BN_EPS: f64 = 1e-5;
/// LayerNorm eps inside the attention stages (PyTorch default).
const LN_EPS: f64 = 1e-5;
/// LayerNorm2d eps of the neck (SAM's `LayerNorm2d`).
const NECK_EPS: f64 = 1e-6;

/// `Conv2d_BN`: a bias-free conv followed by an eval-mode BatchNorm2d (keys `c.*`, `bn.*`).
#[derive(Debug, Clone)]
struct ConvBn {
    weight: Tensor,
    gamma: Tensor,
    beta: Tensor,
    mean: Tensor,
    var: Tensor,
    cfg: Conv2dConfig,
}

impl ConvBn {
    #[allow(clippy::too_many_arguments)]
    fn new(
        cin: usize,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        groups: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let bn = vb.pp("bn");
        Ok(Self {
            weight: vb.get((cout, cin / groups, k, k), "c.weight")?,
            gamma: bn.get(cout, "weight")?,
            beta: bn.get(cout, "bias")?,
            mean: bn.get(cout, "running_mean")?,
            var: bn.get(cout, "running_var")?,
            cfg: Conv2dConfig {
                padding: pad,
                stride,
                groups,
                ..Default::default()
            },
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        // BN is folded into the conv on each call (cheap: weight-sized), so parameters that a
        // trainer updates in place are never stale.
        let s = self.gamma.div(&(&self.var + BN_EPS)?.sqrt()?)?;
        let w = self.weight.broadcast_mul(&s.reshape((s.dim(0)?, 1, 1, 1))?)?;
        let b = (&self.beta - (&self.mean * &s)?)?;
        Conv2d::new(w, Some(b), self.cfg).forward(x)
    }
}

/// Inverted-residual block of stage 0; GELU comes after the residual sum.
#[derive(Debug, Clone)]
struct MbConv {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl MbConv {
    fn new(dim: usize, expand: f64, vb: VarBuilder) -> Result<Self> {
        let hid = (dim as f64 * expand) as usize;
        Ok(Self {
            conv1: ConvBn::new(dim, hid, 1, 1, 0, 1, vb.pp("conv1"))?,
            conv2: ConvBn::new(hid, hid, 3, 1, 1, hid, vb.pp("conv2"))?,
            conv3: ConvBn::new(hid, dim, 1, 1, 0, 1, vb.pp("conv3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::gelu(&self.conv1.forward(x)?)?;
        let y = ops::gelu(&self.conv2.forward(&y)?)?;
        ops::gelu(&(self.conv3.forward(&y)? + x)?)
    }
}

/// `PatchMerging` on NCHW maps; stride 1 for out_dim 320/448/576, as MobileSAM hard-codes.
#[derive(Debug, Clone)]
struct PatchMerging {
    conv1: ConvBn,
    conv2: ConvBn,
    conv3: ConvBn,
}

impl PatchMerging {
    fn new(dim: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        let stride = if matches!(out, 320 | 448 | 576) { 1 } else { 2 };
        Ok(Self {
            conv1: ConvBn::new(dim, out, 1, 1, 0, 1, vb.pp("conv1"))?,
            conv2: ConvBn::new(out, out, 3, stride, 1, out, vb.pp("conv2"))?,
            conv3: ConvBn::new(out, out, 1, 1, 0, 1, vb.pp("conv3"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let y = ops::gelu(&self.conv1.forward(x)?)?;
        let y = ops::gelu(&self.conv2.forward(&y)?)?;
        self.conv3.forward(&y)
    }
}

/// Window attention with its own LayerNorm, per-head interleaved qkv and learned biases.
#[derive(Debug, Clone)]
struct Attention {
    norm: LayerNorm,
    qkv: Linear,
    proj: Linear,
    biases: Tensor,
    /// `|Δy|·ws + |Δx|` for every pair of window positions, row-major.
    bias_index: Tensor,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, ws: usize, vb: VarBuilder) -> Result<Self> {
        let n = ws * ws;
        let index: Vec<u32> = (0..n)
            .flat_map(|p| {
                (0..n).map(move |r| ((p / ws).abs_diff(r / ws) * ws + (p % ws).abs_diff(r % ws)) as u32)
            })
            .collect();
        Ok(Self {
            norm: LayerNorm::new(dim, LN_EPS, vb.pp("norm"))?,
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            biases: vb.get((num_heads, n), "attention_biases")?,
            bias_index: Tensor::from_vec(index, n * n, vb.device())?,
            num_heads,
            scale: ((dim / num_heads) as f64).powf(-0.5),
        })
    }

    /// `x`: `[B, N, C]` with N = ws².
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, n, c) = x.dims3()?;
        let (nh, hd) = (self.num_heads, c / self.num_heads);
        // qkv is laid out per head as [q_h | k_h | v_h].
        let qkv = self
            .qkv
            .forward(&self.norm.forward(x)?)?
            .reshape((b, n, nh, 3 * hd))?;
        let part = |i: usize| qkv.narrow(3, i * hd, hd)?.transpose(1, 2)?.contiguous();
        let (q, k, v) = (part(0)?, part(1)?, part(2)?);
        let ab = self
            .biases
            .index_select(&self.bias_index, 1)?
            .reshape((nh, n, n))?;
        let attn = (q.matmul(&k.t()?)? * self.scale)?.broadcast_add(&ab)?;
        let out = ops::softmax_last_dim(&attn)?
            .matmul(&v)?
            .transpose(1, 2)?
            .reshape((b, n, c))?;
        self.proj.forward(&out)
    }
}

/// `TinyViTBlock` on a `[B, H, W, C]` map.
#[derive(Debug, Clone)]
struct TinyVitBlock {
    attn: Attention,
    local_conv: ConvBn,
    mlp_norm: LayerNorm,
    fc1: Linear,
    fc2: Linear,
    window: usize,
}

impl TinyVitBlock {
    fn new(cfg: &TinyVitConfig, stage: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dims[stage];
        let ws = cfg.window_sizes[stage];
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        let ks = cfg.local_conv_size;
        Ok(Self {
            attn: Attention::new(dim, cfg.num_heads[stage], ws, vb.pp("attn"))?,
            local_conv: ConvBn::new(dim, dim, ks, 1, ks / 2, dim, vb.pp("local_conv"))?,
            mlp_norm: LayerNorm::new(dim, LN_EPS, vb.pp("mlp.norm"))?,
            fc1: linear(dim, hidden, vb.pp("mlp.fc1"))?,
            fc2: linear(hidden, dim, vb.pp("mlp.fc2"))?,
            window: ws,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, c) = x.dims4()?;
        let ws = self.window;
        // Zero padding happens before the attention's LayerNorm, so pads become β there.
        let (win, padded) = window_partition(x, ws)?;
        let nw = win.dim(0)?;
        let a = self.attn.forward(&win.reshape((nw, ws * ws, c))?)?;
        let a = window_unpartition(&a.reshape((nw, ws, ws, c))?, ws, padded, (h, w))?;
        let x = (x + a)?;
        let x = self
            .local_conv
            .forward(&x.permute((0, 3, 1, 2))?.contiguous()?)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let m = self.fc1.forward(&self.mlp_norm.forward(&x)?)?;
        let m = self.fc2.forward(&ops::gelu(&m)?)?;
        x + m
    }
}

/// MobileSAM's TinyViT image encoder with official state-dict key names (`head`/`norm_head`
/// are not built).
#[derive(Debug, Clone)]
pub struct TinyViT {
    stem1: ConvBn,
    stem2: ConvBn,
    conv_blocks: Vec<MbConv>,
    /// `layers.{0,1,2}.downsample`.
    merges: Vec<PatchMerging>,
    /// `layers.{1,2,3}.blocks`.
    stages: Vec<Vec<TinyVitBlock>>,
    neck_conv1: Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: Conv2d,
    neck_ln2: LayerNorm2d,
    level_channels: Vec<usize>,
}

impl TinyViT {
    /// Builds the encoder for `img_size`² inputs with an `out_chans`-wide neck (256 in MobileSAM);
    /// `vb` is at the `image_encoder` prefix.
    pub fn new(cfg: &TinyVitConfig, img_size: usize, out_chans: usize, vb: VarBuilder) -> Result<Self> {
        let d = &cfg.embed_dims;
        let n = d.len();
        if n != 4 || cfg.depths.len() != n || cfg.num_heads.len() != n || cfg.window_sizes.len() != n {
            candle_core::bail!("tiny_vit: embed_dims, depths, num_heads and window_sizes need 4 entries")
        }
        if (1..n).any(|i| cfg.num_heads[i] == 0 || d[i] % cfg.num_heads[i] != 0)
            || cfg.window_sizes.contains(&0)
        {
            candle_core::bail!("tiny_vit: every attention width must divide by its heads, windows > 0")
        }
        if img_size % 4 != 0 {
            candle_core::bail!("tiny_vit: image size {img_size} is not a multiple of 4")
        }
        let stem = vb.pp("patch_embed.seq");
        let l0 = vb.pp("layers.0");
        let conv_blocks = (0..cfg.depths[0])
            .map(|i| MbConv::new(d[0], cfg.mbconv_expand_ratio, l0.pp(format!("blocks.{i}"))))
            .collect::<Result<Vec<_>>>()?;
        let merges = (0..3)
            .map(|i| PatchMerging::new(d[i], d[i + 1], vb.pp(format!("layers.{i}.downsample"))))
            .collect::<Result<Vec<_>>>()?;
        let stages = (1..4)
            .map(|s| {
                (0..cfg.depths[s])
                    .map(|i| TinyVitBlock::new(cfg, s, vb.pp(format!("layers.{s}.blocks.{i}"))))
                    .collect::<Result<Vec<_>>>()
            })
            .collect::<Result<Vec<_>>>()?;
        let widths: Vec<usize> = (1..4).flat_map(|s| vec![d[s]; cfg.depths[s]]).collect();
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            stem1: ConvBn::new(3, d[0] / 2, 3, 2, 1, 1, stem.pp("0"))?,
            stem2: ConvBn::new(d[0] / 2, d[0], 3, 2, 1, 1, stem.pp("2"))?,
            conv_blocks,
            merges,
            stages,
            neck_conv1: conv2d_no_bias(d[3], out_chans, 1, Default::default(), vb.pp("neck.0"))?,
            neck_ln1: LayerNorm2d::new(out_chans, NECK_EPS, vb.pp("neck.1"))?,
            neck_conv2: conv2d_no_bias(out_chans, out_chans, 3, pad1, vb.pp("neck.2"))?,
            neck_ln2: LayerNorm2d::new(out_chans, NECK_EPS, vb.pp("neck.3"))?,
            level_channels: widths[widths.len().saturating_sub(2)..].to_vec(),
        })
    }

    /// Channels of the two maps [`Self::forward_levels`] returns.
    pub fn level_channels(&self) -> Vec<usize> {
        self.level_channels.clone()
    }

    /// Image embedding `[B, out_chans, S/16, S/16]` of a preprocessed `[B, 3, S, S]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, false)?.0)
    }

    /// The embedding plus the outputs of the last two attention blocks as NCHW maps (earlier
    /// block first; for depths [2,2,6,2] these are `layers.3.blocks.{0,1}`).
    pub fn forward_levels(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, keep_levels: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = self.stem2.forward(&ops::gelu(&self.stem1.forward(x)?)?)?;
        for blk in &self.conv_blocks {
            x = blk.forward(&x)?;
        }
        x = self.merges[0].forward(&x)?;
        let total: usize = self.stages.iter().map(Vec::len).sum();
        let first_kept = total.saturating_sub(2);
        let mut seen = 0;
        let mut levels = Vec::new();
        for (s, stage) in self.stages.iter().enumerate() {
            let mut t = x.permute((0, 2, 3, 1))?.contiguous()?;
            for blk in stage {
                t = blk.forward(&t)?;
                if keep_levels && seen >= first_kept {
                    levels.push(t.permute((0, 3, 1, 2))?.contiguous()?);
                }
                seen += 1;
            }
            x = t.permute((0, 3, 1, 2))?.contiguous()?;
            if let Some(merge) = self.merges.get(s + 1) {
                x = merge.forward(&x)?;
            }
        }
        let x = self.neck_ln1.forward(&self.neck_conv1.forward(&x)?)?;
        let x = self.neck_ln2.forward(&self.neck_conv2.forward(&x)?)?;
        Ok((x, levels))
    }
}
