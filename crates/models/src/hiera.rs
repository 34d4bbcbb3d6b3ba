//! SAM 2 Hiera trunk (`sam2/modeling/backbones/hieradet.py`): a 7×7/4 patch embedding, a bicubic
//! background plus tiled window positional embedding, and `MultiScaleBlock`s with windowed or
//! global attention that pool q 2×2 at stage transitions. Returns the four stage outputs (NCHW).

use candle_core::{Module, Result, Tensor};
use candle_nn::{conv2d, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use sam2rad_nn::{ops, LayerNorm};

use crate::config::HieraConfig;

/// LayerNorm epsilon of every Hiera norm.
const LN_EPS: f64 = 1e-6;

/// Hyper-parameters of one `MultiScaleBlock`, resolved from a [`HieraConfig`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockSpec {
    /// Input width.
    pub dim: usize,
    /// Output width (twice `dim` on the first block of a stage).
    pub dim_out: usize,
    /// Attention heads.
    pub num_heads: usize,
    /// Attention window side; 0 means global attention.
    pub window_size: usize,
    /// Whether q (and the shortcut) are max-pooled 2×2 with stride 2.
    pub q_pool: bool,
}

/// The block schedule of a Hiera trunk, as the official constructor derives it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HieraSchedule {
    /// One entry per block.
    pub blocks: Vec<BlockSpec>,
    /// Index of the last block of each stage.
    pub stage_ends: Vec<usize>,
    /// Blocks that pool q (the first block of the first `q_pool` later stages).
    pub q_pool_blocks: Vec<usize>,
}

impl HieraSchedule {
    /// Resolves widths, heads, windows and pooling per block; fails on an unusable config.
    pub fn new(cfg: &HieraConfig) -> Result<Self> {
        let n = cfg.stages.len();
        if n == 0 || cfg.stages.contains(&0) || cfg.window_spec.len() != n {
            candle_core::bail!(
                "hiera: stages {:?} must be non-empty and positive, with one window_spec entry each (got {:?})",
                cfg.stages,
                cfg.window_spec
            )
        }
        if cfg.num_heads == 0 || !cfg.embed_dim.is_multiple_of(cfg.num_heads) {
            candle_core::bail!(
                "hiera: embed_dim {} must be divisible by num_heads {}",
                cfg.embed_dim,
                cfg.num_heads
            )
        }
        let stage_ends: Vec<usize> = (1..=n)
            .map(|i| cfg.stages[..i].iter().sum::<usize>() - 1)
            .collect();
        let q_pool_blocks: Vec<usize> = stage_ends[..n - 1]
            .iter()
            .map(|e| e + 1)
            .take(cfg.q_pool)
            .collect();
        let depth = stage_ends[n - 1] + 1;
        let (mut dim, mut heads, mut stage) = (cfg.embed_dim, cfg.num_heads, 0);
        let mut blocks = Vec::with_capacity(depth);
        for i in 0..depth {
            // The window is read before the stage advances: a stage's first block keeps the
            // previous stage's window (the official "lag").
            let window_size = if cfg.global_att_blocks.contains(&i) {
                0
            } else {
                cfg.window_spec[stage]
            };
            let mut dim_out = dim;
            if i > 0 && stage_ends.contains(&(i - 1)) {
                dim_out = 2 * dim;
                heads *= 2;
                stage += 1;
            }
            blocks.push(BlockSpec {
                dim,
                dim_out,
                num_heads: heads,
                window_size,
                q_pool: q_pool_blocks.contains(&i),
            });
            dim = dim_out;
        }
        if let Some(i) = blocks.iter().position(|b| b.q_pool && b.window_size == 1) {
            candle_core::bail!("hiera: block {i} pools q inside 1×1 windows (window_spec entry 1)")
        }
        Ok(Self {
            blocks,
            stage_ends,
            q_pool_blocks,
        })
    }
}

/// Init of the positional embeddings for random-init models (official: zeros + trunc-normal 0.02).
const POS_INIT: candle_nn::Init = candle_nn::Init::Randn {
    mean: 0.0,
    stdev: 0.02,
};

/// PyTorch's cubic-convolution interpolation matrix (out × in) for `align_corners=False`,
/// A = −0.75, with f32 coordinates and border-clamped taps as in `upsample_bicubic2d` on CPU.
fn cubic_weights(in_size: usize, out_size: usize) -> Vec<f32> {
    const A: f32 = -0.75;
    // Kernel for |x| ≤ 1 and for 1 < |x| < 2.
    let near = |x: f32| ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0;
    let far = |x: f32| ((A * x - 5.0 * A) * x + 8.0 * A) * x - 4.0 * A;
    let scale = in_size as f32 / out_size as f32;
    let last = in_size as i64 - 1;
    let mut m = vec![0f32; out_size * in_size];
    for o in 0..out_size {
        // Cubic source indices are not clamped at 0 (unlike linear).
        let src = scale * (o as f32 + 0.5) - 0.5;
        let i0 = (src.floor() as i64).min(last);
        let t = (src - i0 as f32).clamp(0.0, 1.0);
        let u = 1.0 - t;
        let coeffs = [far(t + 1.0), near(t), near(u), far(u + 1.0)];
        for (k, c) in coeffs.iter().enumerate() {
            let i = (i0 - 1 + k as i64).clamp(0, last) as usize;
            m[o * in_size + i] += c;
        }
    }
    m
}

/// Bicubic resize of an N·C·H·W tensor to `(h, w)` like `F.interpolate(mode="bicubic",
/// align_corners=False)`; two matmuls (width first, as PyTorch's inner loop), so it is
/// differentiable.
pub fn resize_bicubic(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    let (dev, dt) = (x.device(), x.dtype());
    let ww = Tensor::from_vec(cubic_weights(iw, w), (w, iw), dev)?.to_dtype(dt)?;
    let wh = Tensor::from_vec(cubic_weights(ih, h), (h, ih), dev)?.to_dtype(dt)?;
    let y = x
        .contiguous()?
        .reshape((n * c * ih, iw))?
        .matmul(&ww.t()?)?;
    let y = wh.broadcast_matmul(&y.reshape((n * c, ih, w))?)?;
    y.reshape((n, c, h, w))
}

/// 2×2 stride-2 max pool over the spatial dims of a B·H·W·C tensor (floor mode, like
/// `nn.MaxPool2d(2, 2)`). Two element-wise maxima of strided views: no layout copies and much
/// faster than reducing over middle dims.
fn max_pool_2x2_bhwc(x: &Tensor) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let (oh, ow) = (h / 2, w / 2);
    let x = if 2 * oh != h || 2 * ow != w {
        x.narrow(1, 0, 2 * oh)?.narrow(2, 0, 2 * ow)?
    } else {
        x.clone()
    };
    // Rows: [b, oh, 2, ow·2c]; then columns: [b, oh, ow, 2, c].
    let x = x.reshape((b, oh, 2, 2 * ow * c))?;
    let x = x.narrow(2, 0, 1)?.maximum(&x.narrow(2, 1, 1)?)?;
    let x = x.reshape((b, oh, ow, 2, c))?;
    x.narrow(3, 0, 1)?
        .maximum(&x.narrow(3, 1, 1)?)?
        .reshape((b, oh, ow, c))
}

/// Splits B·H·W·C into `[B·nH·nW, ws, ws, C]` windows after zero-padding H and W up to multiples
/// of `ws`; also returns the padded size.
fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let mut x = x.clone();
    if ph > 0 {
        x = x.pad_with_zeros(1, 0, ph)?;
    }
    if pw > 0 {
        x = x.pad_with_zeros(2, 0, pw)?;
    }
    let (hp, wp) = (h + ph, w + pw);
    let windows = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((windows, (hp, wp)))
}

/// Inverse of [`window_partition`]: reassembles `[B·nH·nW, ws, ws, C]` windows into the padded
/// `pad_hw` map and crops it to `hw`.
fn window_unpartition(
    windows: &Tensor,
    ws: usize,
    pad_hw: (usize, usize),
    hw: (usize, usize),
) -> Result<Tensor> {
    let (hp, wp) = pad_hw;
    let c = windows.dim(3)?;
    let b = windows.dim(0)? / ((hp / ws) * (wp / ws));
    let x = windows
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .reshape((b, hp, wp, c))?;
    if (hp, wp) == hw {
        Ok(x)
    } else {
        x.narrow(1, 0, hw.0)?.narrow(2, 0, hw.1)
    }
}

/// Score-matrix elements computed at once (16 MB of f32): global attention runs over query
/// chunks of this size, which stay in the allocator's reused memory instead of page-faulting
/// in hundreds of MB per block.
const ATTN_CHUNK: usize = 1 << 22;

/// Unmasked softmax attention of pre-scaled `q` `[B, h, Nq, hd]` over `k`, `v` `[B, h, N, hd]`.
fn attention(q: &Tensor, k: &Tensor, v: &Tensor) -> Result<Tensor> {
    let (b, heads, nq, _) = q.dims4()?;
    let kt = k.t()?;
    let rows = (ATTN_CHUNK / (b * heads * k.dim(2)?).max(1)).max(1);
    if rows >= nq {
        return ops::softmax_last_dim(&q.matmul(&kt)?)?.matmul(v);
    }
    let chunks = (0..nq)
        .step_by(rows)
        .map(|start| {
            ops::softmax_last_dim(&q.narrow(2, start, rows.min(nq - start))?.matmul(&kt)?)?
                .matmul(v)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&chunks, 2)
}

/// `MultiScaleAttention`: fused qkv laid out [3][heads][hd], optional 2×2 q pooling on the
/// window grid, unmasked softmax attention, output projection.
#[derive(Debug, Clone)]
struct MultiScaleAttention {
    qkv: Linear,
    proj: Linear,
    num_heads: usize,
    dim_out: usize,
    q_pool: bool,
}

impl MultiScaleAttention {
    fn new(spec: &BlockSpec, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            qkv: linear(spec.dim, 3 * spec.dim_out, vb.pp("qkv"))?,
            proj: linear(spec.dim_out, spec.dim_out, vb.pp("proj"))?,
            num_heads: spec.num_heads,
            dim_out: spec.dim_out,
            q_pool: spec.q_pool,
        })
    }

    /// `x`: `[B, H, W, dim]` (windows or the whole map) → `[B, H', W', dim_out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, _) = x.dims4()?;
        let (heads, c) = (self.num_heads, self.dim_out);
        let hd = c / heads;
        let qkv = self.qkv.forward(x)?.reshape((b, h * w, 3, heads, hd))?;
        let part = |i: usize| qkv.narrow(2, i, 1)?.squeeze(2);
        let (q, hq, wq) = if self.q_pool {
            let q = max_pool_2x2_bhwc(&part(0)?.reshape((b, h, w, c))?)?;
            let (_, hq, wq, _) = q.dims4()?;
            (q.reshape((b, hq * wq, heads, hd))?, hq, wq)
        } else {
            (part(0)?, h, w)
        };
        // Scaling q before the product is SDPA's math up to rounding and touches fewer values.
        let q = (q.transpose(1, 2)?.contiguous()? * (1.0 / (hd as f64).sqrt()))?;
        let k = part(1)?.transpose(1, 2)?.contiguous()?;
        let v = part(2)?.transpose(1, 2)?.contiguous()?;
        let out = attention(&q, &k, &v)?
            .transpose(1, 2)?
            .reshape((b, hq, wq, c))?;
        self.proj.forward(&out)
    }
}

/// Hiera's two-layer MLP (`layers.0` → exact GELU → `layers.1`).
#[derive(Debug, Clone)]
struct Mlp {
    fc1: Linear,
    fc2: Linear,
}

impl Mlp {
    fn new(dim: usize, hidden: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            fc1: linear(dim, hidden, vb.pp("layers.0"))?,
            fc2: linear(hidden, dim, vb.pp("layers.1"))?,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        self.fc2.forward(&ops::gelu(&self.fc1.forward(x)?)?)
    }
}

/// `MultiScaleBlock`: pre-norm windowed attention with an optional width change and q pooling,
/// then a pre-norm MLP, both residual.
#[derive(Debug, Clone)]
struct MultiScaleBlock {
    norm1: LayerNorm,
    attn: MultiScaleAttention,
    norm2: LayerNorm,
    mlp: Mlp,
    proj: Option<Linear>,
    window_size: usize,
    q_pool: bool,
}

impl MultiScaleBlock {
    fn new(spec: &BlockSpec, mlp_ratio: f64, vb: VarBuilder) -> Result<Self> {
        let proj = if spec.dim != spec.dim_out {
            Some(linear(spec.dim, spec.dim_out, vb.pp("proj"))?)
        } else {
            None
        };
        Ok(Self {
            norm1: LayerNorm::new(spec.dim, LN_EPS, vb.pp("norm1"))?,
            attn: MultiScaleAttention::new(spec, vb.pp("attn"))?,
            norm2: LayerNorm::new(spec.dim_out, LN_EPS, vb.pp("norm2"))?,
            mlp: Mlp::new(
                spec.dim_out,
                (spec.dim_out as f64 * mlp_ratio) as usize,
                vb.pp("mlp"),
            )?,
            proj,
            window_size: spec.window_size,
            q_pool: spec.q_pool,
        })
    }

    /// `x`: `[B, H, W, dim]` → `[B, H', W', dim_out]`.
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let xn = self.norm1.forward(x)?;
        // The width-changing shortcut projects the *normed* input, then pools like q.
        let shortcut = match &self.proj {
            Some(proj) if self.q_pool => max_pool_2x2_bhwc(&proj.forward(&xn)?)?,
            Some(proj) => proj.forward(&xn)?,
            None => x.clone(),
        };
        let ws = self.window_size;
        let y = if ws > 0 {
            // Pads are zeros after the norm and are not masked in the attention.
            let (windows, pad_hw) = window_partition(&xn, ws)?;
            let y = self.attn.forward(&windows)?;
            if self.q_pool {
                // Pooled windows are ws/2 wide; the padding is recomputed from the pooled size.
                let (ws, hw) = (ws / 2, (shortcut.dim(1)?, shortcut.dim(2)?));
                let pad_hw = (hw.0.div_ceil(ws) * ws, hw.1.div_ceil(ws) * ws);
                window_unpartition(&y, ws, pad_hw, hw)?
            } else {
                window_unpartition(&y, ws, pad_hw, (h, w))?
            }
        } else {
            self.attn.forward(&xn)?
        };
        let x = (shortcut + y)?;
        let m = self.mlp.forward(&self.norm2.forward(&x)?)?;
        x + m
    }
}

/// The Hiera trunk (keys under `image_encoder.trunk`).
#[derive(Debug, Clone)]
pub struct Hiera {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    pos_embed_window: Tensor,
    blocks: Vec<MultiScaleBlock>,
    stage_ends: Vec<usize>,
    channels: Vec<usize>,
}

impl Hiera {
    /// Builds the trunk of `cfg` from `vb` at `image_encoder.trunk`.
    pub fn new(cfg: &HieraConfig, vb: VarBuilder) -> Result<Self> {
        let schedule = HieraSchedule::new(cfg)?;
        let c = cfg.embed_dim;
        let conv_cfg = Conv2dConfig {
            padding: 3,
            stride: 4,
            ..Default::default()
        };
        let patch_embed = conv2d(3, c, 7, conv_cfg, vb.pp("patch_embed").pp("proj"))?;
        let [bh, bw] = cfg.window_pos_embed_bkg_spatial_size;
        let pos_embed = vb.get_with_hints((1, c, bh, bw), "pos_embed", POS_INIT)?;
        let ws = cfg.window_spec[0];
        let pos_embed_window = vb.get_with_hints((1, c, ws, ws), "pos_embed_window", POS_INIT)?;
        let blocks = schedule
            .blocks
            .iter()
            .enumerate()
            .map(|(i, spec)| MultiScaleBlock::new(spec, cfg.mlp_ratio, vb.pp("blocks").pp(i)))
            .collect::<Result<Vec<_>>>()?;
        let channels = schedule
            .stage_ends
            .iter()
            .map(|&e| schedule.blocks[e].dim_out)
            .collect();
        Ok(Self {
            patch_embed,
            pos_embed,
            pos_embed_window,
            blocks,
            stage_ends: schedule.stage_ends,
            channels,
        })
    }

    /// Channels of the stage outputs, finest first (the official `channel_list` reversed).
    pub fn channels(&self) -> &[usize] {
        &self.channels
    }

    /// Background embedding interpolated to `(h, w)` plus the tiled window embedding, `[1, h, w, C]`.
    fn pos_embed(&self, h: usize, w: usize) -> Result<Tensor> {
        let (_, c, ws, _) = self.pos_embed_window.dims4()?;
        if !h.is_multiple_of(ws) || !w.is_multiple_of(ws) {
            candle_core::bail!(
                "hiera: the {h}x{w} patch grid is not a multiple of the {ws}x{ws} window embedding"
            )
        }
        let tiled = self
            .pos_embed_window
            .reshape((1, c, 1, ws, 1, ws))?
            .broadcast_as((1, c, h / ws, ws, w / ws, ws))?
            .reshape((1, c, h, w))?;
        (resize_bicubic(&self.pos_embed, h, w)? + tiled)?
            .permute((0, 2, 3, 1))?
            .contiguous()
    }

    /// Stage outputs `[B, C_i, H_i, W_i]` of a `[B, 3, S, S]` input, finest (S/4) first. They
    /// are NCHW views of the BHWC activations (not contiguous), which saves a copy per stage.
    pub fn forward(&self, x: &Tensor) -> Result<Vec<Tensor>> {
        let x = self
            .patch_embed
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .contiguous()?;
        let (_, h, w, _) = x.dims4()?;
        let mut x = x.broadcast_add(&self.pos_embed(h, w)?)?;
        let mut outs = Vec::with_capacity(self.stage_ends.len());
        for (i, block) in self.blocks.iter().enumerate() {
            x = block.forward(&x)?;
            if self.stage_ends.contains(&i) {
                outs.push(x.permute((0, 3, 1, 2))?);
            }
        }
        Ok(outs)
    }
}
