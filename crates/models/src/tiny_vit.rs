//! TinyViT image encoder (MobileSAM): convolutional stem and MBConv stage, windowed attention
//! stages with learned attention biases, eval-mode batch norm, and SAM's neck.

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor};
use candle_nn::{conv2d_no_bias, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use sam2rad_nn::{ops, LayerNorm, LayerNorm2d};

use crate::config::TinyVitConfig;
use crate::image_encoder::{
    contiguous_f32, par_rows, token_mlp, window_partition, window_unpartition, MAX_TEMP_ELEMS,
};

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
            weight: vb.get_with_hints(
                (cout, cin / groups, k, k),
                "c.weight",
                candle_nn::init::DEFAULT_KAIMING_NORMAL,
            )?,
            gamma: bn.get_with_hints(cout, "weight", candle_nn::init::ONE)?,
            beta: bn.get(cout, "bias")?,
            mean: bn.get(cout, "running_mean")?,
            var: bn.get_with_hints(cout, "running_var", candle_nn::init::ONE)?,
            cfg: Conv2dConfig {
                padding: pad,
                stride,
                groups,
                ..Default::default()
            },
        })
    }

    /// The conv weight and bias with the BN folded in. Folded on each call (cheap: weight-sized)
    /// so that parameters a trainer updates in place are never stale.
    fn folded(&self) -> Result<(Tensor, Tensor)> {
        let s = self.gamma.div(&(&self.var + BN_EPS)?.sqrt()?)?;
        let w = self
            .weight
            .broadcast_mul(&s.reshape((s.dim(0)?, 1, 1, 1))?)?;
        let b = (&self.beta - (&self.mean * &s)?)?;
        Ok((w, b))
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (w, b) = self.folded()?;
        conv(x, &w, Some(&b), self.cfg)
    }
}

/// A convolution; depthwise ones on CPU/f32 go through [`DepthwiseConv`].
fn conv(x: &Tensor, w: &Tensor, b: Option<&Tensor>, cfg: Conv2dConfig) -> Result<Tensor> {
    let depthwise = cfg.groups > 1 && cfg.groups == x.dim(1)?;
    if let (true, Some(b)) = (depthwise, b) {
        if x.device().is_cpu() && x.dtype() == DType::F32 {
            let op = DepthwiseConv {
                stride: cfg.stride,
                pad: cfg.padding,
            };
            return x.contiguous()?.apply_op3(&w.contiguous()?, b, op);
        }
    }
    Conv2d::new(w.contiguous()?, b.cloned(), cfg).forward(x)
}

/// `last(gelu(mid(gelu(first(x)))))` (`mid` depthwise, optional), evaluated over slices of
/// `first`'s output channels and summing `last`'s partial results. This keeps TinyViT's widest
/// maps (256 channels at 256×256 in MBConv) in blocks of at most [`MAX_TEMP_ELEMS`].
fn conv_chain(x: &Tensor, first: &ConvBn, mid: Option<&ConvBn>, last: &ConvBn) -> Result<Tensor> {
    let (w1, b1) = first.folded()?;
    let (w3, b3) = last.folded()?;
    let (n, _, h, w) = x.dims4()?;
    let (hid, k) = (w1.dim(0)?, w1.dim(2)?);
    let mid = match mid {
        // Slicing channels is only valid for a per-channel (depthwise) middle conv.
        Some(m) if m.cfg.groups != hid => {
            candle_core::bail!("tiny_vit: the middle conv of a chain must be depthwise")
        }
        Some(m) => Some((m.folded()?, m.cfg)),
        None => None,
    };
    let (s, p) = (first.cfg.stride, first.cfg.padding);
    let plane = n * ((h + 2 * p - k) / s + 1) * ((w + 2 * p - k) / s + 1);
    let step = (MAX_TEMP_ELEMS / plane.max(1)).clamp(1, hid);
    let mut acc: Option<Tensor> = None;
    for c0 in (0..hid).step_by(step) {
        let cn = step.min(hid - c0);
        let (wc, bc) = (w1.narrow(0, c0, cn)?, b1.narrow(0, c0, cn)?);
        let mut y = ops::gelu(&conv(x, &wc, Some(&bc), first.cfg)?)?;
        if let Some(((w2, b2), cfg)) = &mid {
            let (wc, bc) = (w2.narrow(0, c0, cn)?, b2.narrow(0, c0, cn)?);
            let cfg = Conv2dConfig { groups: cn, ..*cfg };
            y = ops::gelu(&conv(&y, &wc, Some(&bc), cfg)?)?;
        }
        let part = conv(&y, &w3.narrow(1, c0, cn)?, None, last.cfg)?;
        acc = Some(match acc {
            None => part,
            Some(a) => (a + part)?,
        });
    }
    match acc {
        Some(a) => a.broadcast_add(&b3.reshape((1, b3.dim(0)?, 1, 1))?),
        None => candle_core::bail!("tiny_vit: conv chain without channels"),
    }
}

/// Depthwise conv2d with bias on CPU (`[B,C,H,W]`, kernel `[C,1,k,k]`, bias `[C]`, zero padding).
///
/// candle runs grouped convolutions as one convolution per channel, which made the 256-channel
/// 256×256 MBConv maps of TinyViT-5M take about 0.35 s each; these direct loops take a few ms.
/// (candle's conv2d backward also fails for stride 2 when `(H + 2p − k)` is odd, as in the stem.)
struct DepthwiseConv {
    stride: usize,
    pad: usize,
}

/// Sizes of one depthwise convolution.
#[derive(Clone, Copy)]
struct Geom {
    h: usize,
    w: usize,
    oh: usize,
    ow: usize,
    k: usize,
    s: usize,
    p: usize,
}

impl Geom {
    /// Calls `f(oy, iy, i, j, lo, hi)` for every output row `oy` and kernel tap `(i, j)` whose
    /// source row `iy = oy·s + i − p` is inside the image, with `lo..hi` the output columns whose
    /// source column `ox·s + j − p` is inside too (taps in the zero padding contribute nothing).
    fn for_each_tap(&self, mut f: impl FnMut(usize, usize, usize, usize, usize, usize)) {
        let Geom {
            h,
            w,
            oh,
            ow,
            k,
            s,
            p,
        } = *self;
        for oy in 0..oh {
            for i in 0..k {
                let Some(iy) = (oy * s + i).checked_sub(p).filter(|&iy| iy < h) else {
                    continue;
                };
                for j in 0..k {
                    let Some(span) = (w + p).checked_sub(j + 1) else {
                        continue;
                    };
                    let (lo, hi) = (p.saturating_sub(j).div_ceil(s), (span / s + 1).min(ow));
                    if lo < hi {
                        f(oy, iy, i, j, lo, hi);
                    }
                }
            }
        }
    }
}

impl DepthwiseConv {
    fn geom(&self, l1: &Layout, l2: &Layout) -> Result<(usize, usize, Geom)> {
        let (b, c, h, w) = l1.shape().dims4()?;
        let (kc, one, k, k2) = l2.shape().dims4()?;
        let (s, p) = (self.stride, self.pad);
        if kc != c || one != 1 || k != k2 || s == 0 || h.min(w) + 2 * p < k {
            candle_core::bail!(
                "depthwise conv: input {:?}, kernel {:?}",
                l1.dims(),
                l2.dims()
            )
        }
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        Ok((
            b,
            c,
            Geom {
                h,
                w,
                oh,
                ow,
                k,
                s,
                p,
            },
        ))
    }
}

impl CustomOp3 for DepthwiseConv {
    fn name(&self) -> &'static str {
        "depthwise-conv2d"
    }

    fn cpu_fwd(
        &self,
        s1: &CpuStorage,
        l1: &Layout,
        s2: &CpuStorage,
        l2: &Layout,
        s3: &CpuStorage,
        l3: &Layout,
    ) -> Result<(CpuStorage, Shape)> {
        let (b, c, g) = self.geom(l1, l2)?;
        if l3.shape().dims1()? != c {
            candle_core::bail!("depthwise conv: bias {:?} for {c} channels", l3.dims())
        }
        let (x, kern, bias) = (
            contiguous_f32(s1, l1)?,
            contiguous_f32(s2, l2)?,
            contiguous_f32(s3, l3)?,
        );
        let (hw, kk) = (g.h * g.w, g.k * g.k);
        let mut out = vec![0f32; b * c * g.oh * g.ow];
        par_rows(&mut out, g.oh * g.ow, |plane, dst| {
            let ch = plane % c;
            let src = &x[plane * hw..(plane + 1) * hw];
            let kern = &kern[ch * kk..(ch + 1) * kk];
            dst.fill(bias[ch]);
            g.for_each_tap(|oy, iy, i, j, lo, hi| {
                let wv = kern[i * g.k + j];
                let row = &mut dst[oy * g.ow + lo..oy * g.ow + hi];
                let srow = &src[iy * g.w..(iy + 1) * g.w];
                if g.s == 1 {
                    // Contiguous source: this loop vectorises.
                    for (o, &v) in row.iter_mut().zip(&srow[lo + j - g.p..hi + j - g.p]) {
                        *o += wv * v;
                    }
                } else {
                    for (n, o) in row.iter_mut().enumerate() {
                        *o += wv * srow[(lo + n) * g.s + j - g.p];
                    }
                }
            });
        });
        Ok((CpuStorage::F32(out), Shape::from((b, c, g.oh, g.ow))))
    }

    fn bwd(
        &self,
        x: &Tensor,
        kernel: &Tensor,
        _bias: &Tensor,
        _res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        let (b, c, g) = self.geom(x.layout(), kernel.layout())?;
        let (hw, kk, ohw) = (g.h * g.w, g.k * g.k, g.oh * g.ow);
        let xs = x.flatten_all()?.to_vec1::<f32>()?;
        let ks = kernel.flatten_all()?.to_vec1::<f32>()?;
        let gs = grad_res.flatten_all()?.to_vec1::<f32>()?;
        // dL/dx scatters every output gradient back through the taps that read each pixel.
        let mut gx = vec![0f32; b * c * hw];
        par_rows(&mut gx, hw, |plane, dst| {
            let kern = &ks[(plane % c) * kk..(plane % c + 1) * kk];
            let grow = &gs[plane * ohw..(plane + 1) * ohw];
            g.for_each_tap(|oy, iy, i, j, lo, hi| {
                let wv = kern[i * g.k + j];
                for ox in lo..hi {
                    dst[iy * g.w + ox * g.s + j - g.p] += wv * grow[oy * g.ow + ox];
                }
            });
        });
        // dL/dw per (batch, channel) plane, then summed over the batch.
        let mut gw_planes = vec![0f32; b * c * kk];
        par_rows(&mut gw_planes, kk, |plane, acc| {
            let src = &xs[plane * hw..(plane + 1) * hw];
            let grow = &gs[plane * ohw..(plane + 1) * ohw];
            g.for_each_tap(|oy, iy, i, j, lo, hi| {
                acc[i * g.k + j] += (lo..hi)
                    .map(|ox| grow[oy * g.ow + ox] * src[iy * g.w + ox * g.s + j - g.p])
                    .sum::<f32>();
            });
        });
        let dev = x.device();
        let gw = Tensor::from_vec(gw_planes, (b, c, 1, g.k, g.k), dev)?.sum(0)?;
        let gx = Tensor::from_vec(gx, x.shape(), dev)?;
        let gb = grad_res.sum((0, 2, 3))?;
        Ok((Some(gx), Some(gw), Some(gb)))
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
        let y = conv_chain(x, &self.conv1, Some(&self.conv2), &self.conv3)?;
        ops::gelu(&(y + x)?)
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
        conv_chain(x, &self.conv1, Some(&self.conv2), &self.conv3)
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
                (0..n).map(move |r| {
                    ((p / ws).abs_diff(r / ws) * ws + (p % ws).abs_diff(r % ws)) as u32
                })
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
        let m = self.mlp(&x)?;
        x + m
    }

    /// `fc2(gelu(fc1(norm(x))))`, over blocks of tokens to keep the hidden activations small.
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        token_mlp(x, &self.mlp_norm, &self.fc1, &self.fc2)
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
    pub fn new(
        cfg: &TinyVitConfig,
        img_size: usize,
        out_chans: usize,
        vb: VarBuilder,
    ) -> Result<Self> {
        let d = &cfg.embed_dims;
        let n = d.len();
        if n != 4
            || cfg.depths.len() != n
            || cfg.num_heads.len() != n
            || cfg.window_sizes.len() != n
        {
            candle_core::bail!(
                "tiny_vit: embed_dims, depths, num_heads and window_sizes need 4 entries"
            )
        }
        if (1..n).any(|i| cfg.num_heads[i] == 0 || !d[i].is_multiple_of(cfg.num_heads[i]))
            || cfg.window_sizes.contains(&0)
        {
            candle_core::bail!(
                "tiny_vit: every attention width must divide by its heads, windows > 0"
            )
        }
        if !img_size.is_multiple_of(4) {
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
        let mut x = conv_chain(x, &self.stem1, None, &self.stem2)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    /// Depthwise conv from differentiable primitives: a sum over taps of shifted, strided views
    /// of the padded input (candle's own conv2d backward is wrong for some stride-2 sizes).
    fn reference_depthwise(x: &Tensor, kern: &Tensor, s: usize, p: usize) -> Result<Tensor> {
        let (b, c, h, w) = x.dims4()?;
        let k = kern.dim(2)?;
        let (oh, ow) = ((h + 2 * p - k) / s + 1, (w + 2 * p - k) / s + 1);
        let xp = x.pad_with_zeros(2, p, p + s)?.pad_with_zeros(3, p, p + s)?;
        let mut acc = Tensor::zeros((b, c, oh, ow), DType::F32, x.device())?;
        for i in 0..k {
            for j in 0..k {
                // Rows i, i+s, ..., via a reshape that puts the stride in its own axis.
                let v = xp.narrow(2, i, oh * s)?.narrow(3, j, ow * s)?;
                let v = v.reshape((b, c, oh, s, ow * s))?.narrow(3, 0, 1)?;
                let v = v
                    .reshape((b, c, oh, ow, s))?
                    .narrow(4, 0, 1)?
                    .reshape((b, c, oh, ow))?;
                let tap = kern
                    .narrow(2, i, 1)?
                    .narrow(3, j, 1)?
                    .reshape((1, c, 1, 1))?;
                acc = (acc + v.broadcast_mul(&tap)?)?;
            }
        }
        Ok(acc)
    }

    #[test]
    fn depthwise_conv_matches_reference() -> Result<()> {
        let dev = Device::Cpu;
        for (stride, pad, k, h, w) in [
            (1, 1, 3, 9, 7),
            (2, 1, 3, 9, 8),
            (1, 2, 5, 6, 11),
            (2, 0, 3, 7, 7),
        ] {
            let c = 5;
            let x = Var::from_tensor(&Tensor::randn(0f32, 1.0, (2, c, h, w), &dev)?)?;
            let kern = Var::from_tensor(&Tensor::randn(0f32, 1.0, (c, 1, k, k), &dev)?)?;
            let bias = Var::from_tensor(&Tensor::randn(0f32, 1.0, c, &dev)?)?;
            let fused = x.as_tensor().apply_op3(
                kern.as_tensor(),
                bias.as_tensor(),
                DepthwiseConv { stride, pad },
            )?;
            let reference = reference_depthwise(x.as_tensor(), kern.as_tensor(), stride, pad)?
                .broadcast_add(&bias.as_tensor().reshape((1, c, 1, 1))?)?;
            assert_eq!(fused.dims(), reference.dims());
            let weights = Tensor::randn(0f32, 1.0, fused.shape(), &dev)?;
            let g1 = (&fused * &weights)?.sum_all()?.backward()?;
            let g2 = (&reference * &weights)?.sum_all()?.backward()?;
            let mut pairs = vec![(fused.clone(), reference.clone())];
            for v in [&x, &kern, &bias] {
                let (a, b) = (g1.get(v.as_tensor()), g2.get(v.as_tensor()));
                let (Some(a), Some(b)) = (a, b) else {
                    candle_core::bail!("missing gradient")
                };
                pairs.push((a.clone(), b.clone()));
            }
            for (a, b) in pairs {
                let scale = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?.max(1.0);
                let err = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
                assert!(
                    err <= 1e-5 * scale,
                    "stride {stride} pad {pad} k {k}: {err} (scale {scale})"
                );
            }
            if stride == 1 {
                // Forward also agrees with candle's grouped conv.
                let candle = x.as_tensor().conv2d(kern.as_tensor(), pad, 1, 1, c)?;
                let candle = candle.broadcast_add(&bias.as_tensor().reshape((1, c, 1, 1))?)?;
                let err = (candle - &fused)?
                    .abs()?
                    .flatten_all()?
                    .max(0)?
                    .to_scalar::<f32>()?;
                assert!(err < 1e-5, "vs candle conv2d: {err}");
            }
        }
        Ok(())
    }
}
