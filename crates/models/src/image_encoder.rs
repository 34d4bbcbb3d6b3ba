//! SAM ViT image encoder (`ImageEncoderViT`): patch embedding, windowed and global attention with
//! decomposed relative positions, and the convolutional neck.

use std::sync::OnceLock;

use candle_core::{CpuStorage, CustomOp3, DType, Layout, Module, Result, Shape, Tensor, D};
use candle_nn::{conv2d, conv2d_no_bias, linear, Conv2d, Conv2dConfig, Linear, VarBuilder};
use sam2rad_nn::{ops, LayerNorm, LayerNorm2d};

use crate::config::VitConfig;

/// LayerNorm eps of the encoder blocks and the neck.
const LN_EPS: f64 = 1e-6;

/// Upper bound on elements of the large temporaries (attention scores, MLP hidden activations)
/// materialised at once. Besides bounding memory (global attention has 16.8 M scores per head),
/// blocks of 16 MB stay under glibc's 32 MB mmap ceiling, so their memory is reused instead of
/// being mapped and page-faulted afresh for every op.
pub(crate) const MAX_TEMP_ELEMS: usize = 1 << 22;

/// One decomposed relative-position table (`rel_pos_h` or `rel_pos_w`) for a square grid.
#[derive(Debug, Clone)]
struct RelPos {
    table: Tensor,
    /// `(q − k) + (S − 1)` for every (q, k) pair, row-major.
    index: Tensor,
    size: usize,
}

impl RelPos {
    fn new(size: usize, head_dim: usize, name: &str, vb: &VarBuilder) -> Result<Self> {
        let table = vb.get((2 * size - 1, head_dim), name).map_err(|e| {
            e.context(format!(
                "`{name}` must be [2*{size}-1, {head_dim}]; resizing it (get_rel_pos \
                 interpolation) is not supported"
            ))
        })?;
        let index: Vec<u32> = (0..size)
            .flat_map(|q| (0..size).map(move |k| (q + size - 1 - k) as u32))
            .collect();
        Ok(Self {
            table,
            index: Tensor::from_vec(index, size * size, vb.device())?,
            size,
        })
    }

    /// `get_rel_pos` without interpolation, transposed for a batched matmul: `[S(q), hd, S(k)]`.
    fn gathered_t(&self) -> Result<Tensor> {
        let hd = self.table.dim(1)?;
        self.table
            .index_select(&self.index, 0)?
            .reshape((self.size, self.size, hd))?
            .transpose(1, 2)
    }
}

/// Multi-head attention with decomposed relative position embeddings on a `[B, H, W, C]` grid.
#[derive(Debug, Clone)]
struct Attention {
    qkv: Linear,
    proj: Linear,
    rel_h: RelPos,
    rel_w: RelPos,
    num_heads: usize,
    scale: f64,
}

impl Attention {
    fn new(dim: usize, num_heads: usize, size: usize, vb: VarBuilder) -> Result<Self> {
        let head_dim = dim / num_heads;
        Ok(Self {
            qkv: linear(dim, 3 * dim, vb.pp("qkv"))?,
            proj: linear(dim, dim, vb.pp("proj"))?,
            rel_h: RelPos::new(size, head_dim, "rel_pos_h", &vb)?,
            rel_w: RelPos::new(size, head_dim, "rel_pos_w", &vb)?,
            num_heads,
            scale: (head_dim as f64).powf(-0.5),
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        if h != self.rel_h.size || w != self.rel_w.size {
            candle_core::bail!(
                "attention grid {h}x{w} does not match its rel-pos tables ({}x{})",
                self.rel_h.size,
                self.rel_w.size
            )
        }
        let (nh, n) = (self.num_heads, h * w);
        let hd = c / nh;
        let bs = nh * b;
        // q, k and v from row slices of the fused qkv weight ([q | k | v], each split into
        // heads): three [tokens, C] outputs stay small, unlike one [tokens, 3C], and each is
        // permuted straight into a contiguous [heads·B, N, hd] batch.
        let (wqkv, bqkv) = (self.qkv.weight(), self.qkv.bias());
        let project = |i: usize| -> Result<Tensor> {
            let bias = bqkv.map(|t| t.narrow(0, i * c, c)).transpose()?;
            Linear::new(wqkv.narrow(0, i * c, c)?, bias)
                .forward(x)?
                .reshape((b, n, nh, hd))?
                .permute((2, 0, 1, 3))?
                .contiguous()?
                .reshape((bs, n, hd))
        };
        let (q, k, v) = (project(0)?, project(1)?, project(2)?);
        // Decomposed rel-pos terms use the unscaled q, as the official code does.
        // rel_h[b,y,x,ky] = Σc q[b,y,x,c]·Rh[y,ky,c]: one matmul per query row y.
        let qg = q.reshape((bs, h, w, hd))?;
        let rel_h = qg
            .transpose(0, 1)?
            .contiguous()?
            .reshape((h, bs * w, hd))?
            .matmul(&self.rel_h.gathered_t()?)?
            .reshape((h, bs, w, h))?
            .transpose(0, 1)?
            .contiguous()?
            .reshape((bs, n, h))?;
        // rel_w[b,y,x,kx] = Σc q[b,y,x,c]·Rw[x,kx,c]: one matmul per query column x.
        let rel_w = qg
            .permute((2, 0, 1, 3))?
            .contiguous()?
            .reshape((w, bs * h, hd))?
            .matmul(&self.rel_w.gathered_t()?)?
            .reshape((w, bs, h, w))?
            .permute((1, 2, 0, 3))?
            .contiguous()?
            .reshape((bs, n, w))?;
        // Scores are built in blocks of whole (head, window) items, or of query rows when one
        // item is too large (global attention), so no block exceeds MAX_TEMP_ELEMS.
        let rows = (MAX_TEMP_ELEMS / n).max(1);
        let blocks: Vec<(usize, usize, usize, usize)> = if rows >= n {
            let items = rows / n;
            (0..bs)
                .step_by(items)
                .map(|i| (i, items.min(bs - i), 0, n))
                .collect()
        } else {
            (0..bs)
                .flat_map(|i| {
                    (0..n)
                        .step_by(rows)
                        .map(move |r| (i, 1, r, rows.min(n - r)))
                })
                .collect()
        };
        let outs = blocks
            .into_iter()
            .map(|(i, ni, r, nr)| {
                let q = q.narrow(0, i, ni)?.narrow(1, r, nr)?;
                let attn = (q * self.scale)?.matmul(&k.narrow(0, i, ni)?.t()?)?;
                let rh = rel_h.narrow(0, i, ni)?.narrow(1, r, nr)?;
                let rw = rel_w.narrow(0, i, ni)?.narrow(1, r, nr)?;
                rel_pos_softmax(&attn, &rh, &rw)?
                    .matmul(&v.narrow(0, i, ni)?)?
                    .reshape((ni * nr, hd))
            })
            .collect::<Result<Vec<_>>>()?;
        // Blocks are in (item, row) order: [heads·B·N, hd] -> [B, H, W, heads·hd]
        let out = Tensor::cat(&outs, 0)?
            .reshape((nh, b, n, hd))?
            .permute((1, 2, 0, 3))?
            .reshape((b, h, w, c))?;
        self.proj.forward(&out)
    }
}

/// `softmax(attn + rel_h[..., :, None] + rel_w[..., None, :])` over the keys, for scores
/// `attn` `[B, R, kh·kw]` and rel-pos terms `rel_h` `[B, R, kh]`, `rel_w` `[B, R, kw]`.
///
/// On CPU in f32 this is one fused pass ([`RelPosSoftmax`]); the composed form streams the scores
/// through memory about eight times, which dominated global attention.
fn rel_pos_softmax(attn: &Tensor, rel_h: &Tensor, rel_w: &Tensor) -> Result<Tensor> {
    let (b, r, m) = attn.dims3()?;
    let (kh, kw) = (rel_h.dim(2)?, rel_w.dim(2)?);
    if attn.device().is_cpu() && attn.dtype() == DType::F32 {
        let rh = rel_h.contiguous()?.reshape((b * r, kh))?;
        let rw = rel_w.contiguous()?.reshape((b * r, kw))?;
        return attn
            .contiguous()?
            .reshape((b * r, m))?
            .apply_op3(&rh, &rw, RelPosSoftmax)?
            .reshape((b, r, m));
    }
    rel_pos_softmax_composed(attn, rel_h, rel_w)
}

/// [`rel_pos_softmax`] from generic ops (any device and dtype).
fn rel_pos_softmax_composed(attn: &Tensor, rel_h: &Tensor, rel_w: &Tensor) -> Result<Tensor> {
    let (b, r, m) = attn.dims3()?;
    let (kh, kw) = (rel_h.dim(2)?, rel_w.dim(2)?);
    let logits = attn
        .reshape((b, r, kh, kw))?
        .broadcast_add(&rel_h.unsqueeze(3)?)?
        .broadcast_add(&rel_w.unsqueeze(2)?)?
        .reshape((b, r, m))?;
    ops::softmax_last_dim(&logits)
}

/// Fused CPU op: rows of `attn` `[R, kh·kw]` plus `rel_h` `[R, kh]` (per key row) and `rel_w`
/// `[R, kw]` (per key column), then a softmax over each row. Differentiable in all three inputs.
struct RelPosSoftmax;

impl CustomOp3 for RelPosSoftmax {
    fn name(&self) -> &'static str {
        "rel-pos-softmax"
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
        let (rows, cols) = l1.shape().dims2()?;
        let (r2, kh) = l2.shape().dims2()?;
        let (r3, kw) = l3.shape().dims2()?;
        if r2 != rows || r3 != rows || kh * kw != cols {
            candle_core::bail!(
                "rel-pos softmax: shapes {:?} {:?} {:?}",
                l1.dims(),
                l2.dims(),
                l3.dims()
            )
        }
        let attn = contiguous_f32(s1, l1)?;
        let rel_h = contiguous_f32(s2, l2)?;
        let rel_w = contiguous_f32(s3, l3)?;
        let mut out = vec![0f32; rows * cols];
        par_rows(&mut out, cols, |r, row| {
            softmax_row(
                &attn[r * cols..(r + 1) * cols],
                &rel_h[r * kh..(r + 1) * kh],
                &rel_w[r * kw..(r + 1) * kw],
                row,
            )
        });
        Ok((CpuStorage::F32(out), l1.shape().clone()))
    }

    fn bwd(
        &self,
        _attn: &Tensor,
        rel_h: &Tensor,
        rel_w: &Tensor,
        res: &Tensor,
        grad_res: &Tensor,
    ) -> Result<(Option<Tensor>, Option<Tensor>, Option<Tensor>)> {
        // Softmax backward y·(g − Σ g·y); the rel terms were broadcast, so their grads are sums.
        let gy = (grad_res * res)?;
        let gl = (&gy - res.broadcast_mul(&gy.sum_keepdim(D::Minus1)?)?)?;
        let (rows, kh) = rel_h.dims2()?;
        let g3 = gl.reshape((rows, kh, rel_w.dim(1)?))?;
        let (gh, gw) = (g3.sum(2)?, g3.sum(1)?);
        Ok((Some(gl), Some(gh), Some(gw)))
    }
}

/// The f32 data of a contiguous CPU tensor (fused ops only take contiguous inputs).
pub(crate) fn contiguous_f32<'a>(s: &'a CpuStorage, l: &Layout) -> Result<&'a [f32]> {
    let data = s.as_slice::<f32>()?;
    match l.contiguous_offsets() {
        Some((start, end)) => Ok(&data[start..end]),
        None => candle_core::bail!("fused CPU op needs contiguous inputs"),
    }
}

/// Worker threads for the fused op (candle's count, which honours `RAYON_NUM_THREADS`), read
/// once: candle's lookup parses /proc/cpuinfo on every call.
pub(crate) fn num_threads() -> usize {
    static N: OnceLock<usize> = OnceLock::new();
    *N.get_or_init(candle_core::utils::get_num_threads)
}

/// Runs `f(row_index, row)` over the `row_len`-long rows of `out`, split across threads (the
/// calling thread takes the first share).
pub(crate) fn par_rows(out: &mut [f32], row_len: usize, f: impl Fn(usize, &mut [f32]) + Sync) {
    if row_len == 0 || out.is_empty() {
        return;
    }
    let rows = out.len() / row_len;
    let per = rows.div_ceil(num_threads().clamp(1, rows.max(1))).max(1);
    let run = |i: usize, chunk: &mut [f32]| {
        for (j, row) in chunk.chunks_mut(row_len).enumerate() {
            f(i * per + j, row)
        }
    };
    let run = &run;
    std::thread::scope(|s| {
        let mut chunks = out.chunks_mut(per * row_len).enumerate();
        let first = chunks.next();
        for (i, chunk) in chunks {
            s.spawn(move || run(i, chunk));
        }
        if let Some((i, chunk)) = first {
            run(i, chunk);
        }
    });
}

/// One row of [`RelPosSoftmax`]; 8 independent lanes keep the reductions vectorisable.
fn softmax_row(attn: &[f32], rel_h: &[f32], rel_w: &[f32], out: &mut [f32]) {
    let kw = rel_w.len();
    for ((o, a), &bh) in out
        .chunks_exact_mut(kw)
        .zip(attn.chunks_exact(kw))
        .zip(rel_h)
    {
        for ((o, &a), &bw) in o.iter_mut().zip(a).zip(rel_w) {
            // Same association as PyTorch: (attn + rel_h) + rel_w.
            *o = a + bh + bw;
        }
    }
    let mut lanes = [f32::NEG_INFINITY; 8];
    let mut chunks = out.chunks_exact(8);
    for c in &mut chunks {
        for (m, &v) in lanes.iter_mut().zip(c) {
            *m = if v > *m { v } else { *m };
        }
    }
    let max = chunks
        .remainder()
        .iter()
        .chain(&lanes)
        .fold(f32::NEG_INFINITY, |m, &v| m.max(v));
    let mut lanes = [0f32; 8];
    let mut chunks = out.chunks_exact_mut(8);
    for c in &mut chunks {
        for (s, v) in lanes.iter_mut().zip(c) {
            *v = exp_nonpos(*v - max);
            *s += *v;
        }
    }
    let mut sum: f32 = lanes.iter().sum();
    for v in chunks.into_remainder() {
        *v = exp_nonpos(*v - max);
        sum += *v;
    }
    let inv = 1.0 / sum;
    for v in out.iter_mut() {
        *v *= inv;
    }
}

/// `e^x` for `x ≤ 0` to about 1 ulp, branch-free so that loops over it vectorise (libm's `expf`
/// does not). Inputs below −87 are clamped (the result is < 2e-38 either way).
#[inline(always)]
fn exp_nonpos(x: f32) -> f32 {
    const ROUND: f32 = 12_582_912.0; // 1.5·2^23: adding and subtracting rounds to an integer
    const LN2_HI: f32 = 0.693_359_4; // ln 2 split so that n·LN2_HI is exact
    const LN2_LO: f32 = -2.121_944_4e-4;
    let x = x.max(-87.0);
    let n = (x * std::f32::consts::LOG2_E + ROUND) - ROUND;
    let r = (x - n * LN2_HI) - n * LN2_LO;
    // Taylor series to r^7: the remainder is < 1e-8 relative for |r| ≤ ln2/2.
    let p = 1.0 / 5040.0;
    let p = p * r + 1.0 / 720.0;
    let p = p * r + 1.0 / 120.0;
    let p = p * r + 1.0 / 24.0;
    let p = p * r + 1.0 / 6.0;
    let p = p * r + 0.5;
    let p = p * r + 1.0;
    let p = p * r + 1.0;
    p * f32::from_bits(((n as i32 + 127) as u32) << 23)
}

/// Zero-pads a `[B, H, W, C]` map to multiples of `ws` and splits it into `[B·nW, ws, ws, C]`
/// windows; returns the windows and the padded size.
pub(crate) fn window_partition(x: &Tensor, ws: usize) -> Result<(Tensor, (usize, usize))> {
    let (b, h, w, c) = x.dims4()?;
    let (ph, pw) = ((ws - h % ws) % ws, (ws - w % ws) % ws);
    let x = if ph > 0 || pw > 0 {
        x.pad_with_zeros(1, 0, ph)?.pad_with_zeros(2, 0, pw)?
    } else {
        x.clone()
    };
    let (hp, wp) = (h + ph, w + pw);
    let win = x
        .reshape((b, hp / ws, ws, wp / ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b * (hp / ws) * (wp / ws), ws, ws, c))?;
    Ok((win, (hp, wp)))
}

/// Inverse of [`window_partition`]: reassembles the windows and crops the padding away.
pub(crate) fn window_unpartition(
    win: &Tensor,
    ws: usize,
    (hp, wp): (usize, usize),
    (h, w): (usize, usize),
) -> Result<Tensor> {
    let c = win.dim(3)?;
    let b = win.dim(0)? / ((hp / ws) * (wp / ws));
    let x = win
        .reshape((b, hp / ws, wp / ws, ws, ws, c))?
        .permute((0, 1, 3, 2, 4, 5))?
        .contiguous()?
        .reshape((b, hp, wp, c))?;
    if hp > h || wp > w {
        x.narrow(1, 0, h)?.narrow(2, 0, w)?.contiguous()
    } else {
        Ok(x)
    }
}

/// Pre-norm transformer block with windowed (`window > 0`) or global attention.
#[derive(Debug, Clone)]
struct Block {
    norm1: LayerNorm,
    attn: Attention,
    norm2: LayerNorm,
    lin1: Linear,
    lin2: Linear,
    window: usize,
}

impl Block {
    fn new(cfg: &VitConfig, grid: usize, window: usize, vb: VarBuilder) -> Result<Self> {
        let dim = cfg.embed_dim;
        let hidden = (dim as f64 * cfg.mlp_ratio) as usize;
        let size = if window > 0 { window } else { grid };
        Ok(Self {
            norm1: LayerNorm::new(dim, LN_EPS, vb.pp("norm1"))?,
            attn: Attention::new(dim, cfg.num_heads, size, vb.pp("attn"))?,
            norm2: LayerNorm::new(dim, LN_EPS, vb.pp("norm2"))?,
            lin1: linear(dim, hidden, vb.pp("mlp.lin1"))?,
            lin2: linear(hidden, dim, vb.pp("mlp.lin2"))?,
            window,
        })
    }

    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (_, h, w, _) = x.dims4()?;
        let xn = self.norm1.forward(x)?;
        // Padding comes after norm1, so padded tokens are exact zeros (and are not masked).
        let a = if self.window > 0 {
            let (win, padded) = window_partition(&xn, self.window)?;
            window_unpartition(&self.attn.forward(&win)?, self.window, padded, (h, w))?
        } else {
            self.attn.forward(&xn)?
        };
        let x = (x + a)?;
        let m = self.mlp(&x)?;
        x + m
    }

    /// `lin2(gelu(lin1(norm2(x))))`, over blocks of tokens to keep the hidden activations small.
    fn mlp(&self, x: &Tensor) -> Result<Tensor> {
        token_mlp(x, &self.norm2, &self.lin1, &self.lin2)
    }
}

/// `fc2(gelu(fc1(norm(x))))` on a BHWC map, applied to blocks of tokens so the hidden activations
/// never exceed [`MAX_TEMP_ELEMS`] (wide fresh buffers page-fault on every call).
pub(crate) fn token_mlp(
    x: &Tensor,
    norm: &impl Module,
    fc1: &Linear,
    fc2: &Linear,
) -> Result<Tensor> {
    let (b, h, w, c) = x.dims4()?;
    let n = b * h * w;
    let tokens = x.reshape((n, c))?;
    let step = (MAX_TEMP_ELEMS / fc1.weight().dim(0)?).max(1);
    let outs = (0..n)
        .step_by(step)
        .map(|t| {
            let xt = tokens.narrow(0, t, step.min(n - t))?;
            fc2.forward(&ops::gelu(&fc1.forward(&norm.forward(&xt)?)?)?)
        })
        .collect::<Result<Vec<_>>>()?;
    Tensor::cat(&outs, 0)?.reshape((b, h, w, c))
}

/// SAM's ViT image encoder (`ImageEncoderViT`), official state-dict key names.
#[derive(Debug, Clone)]
pub struct ImageEncoderViT {
    patch_embed: Conv2d,
    pos_embed: Tensor,
    blocks: Vec<Block>,
    neck_conv1: Conv2d,
    neck_ln1: LayerNorm2d,
    neck_conv2: Conv2d,
    neck_ln2: LayerNorm2d,
    embed_dim: usize,
}

impl ImageEncoderViT {
    /// Builds the encoder for `img_size`² inputs and an `out_chans`-wide neck; `vb` is at the
    /// `image_encoder` prefix.
    pub fn new(cfg: &VitConfig, img_size: usize, out_chans: usize, vb: VarBuilder) -> Result<Self> {
        let (dim, p) = (cfg.embed_dim, cfg.patch_size);
        if cfg.num_heads == 0
            || !dim.is_multiple_of(cfg.num_heads)
            || p == 0
            || !img_size.is_multiple_of(p)
        {
            candle_core::bail!(
                "vit: embed_dim {dim} / num_heads {} / patch {p} / image size {img_size} are \
                 inconsistent",
                cfg.num_heads
            )
        }
        let grid = img_size / p;
        let patch_cfg = Conv2dConfig {
            stride: p,
            ..Default::default()
        };
        let blocks = (0..cfg.depth)
            .map(|i| {
                let window = if cfg.global_attn_indexes.contains(&i) {
                    0
                } else {
                    cfg.window_size
                };
                Block::new(cfg, grid, window, vb.pp(format!("blocks.{i}")))
            })
            .collect::<Result<Vec<_>>>()?;
        let pad1 = Conv2dConfig {
            padding: 1,
            ..Default::default()
        };
        Ok(Self {
            patch_embed: conv2d(3, dim, p, patch_cfg, vb.pp("patch_embed.proj"))?,
            pos_embed: vb.get((1, grid, grid, dim), "pos_embed")?,
            blocks,
            neck_conv1: conv2d_no_bias(dim, out_chans, 1, Default::default(), vb.pp("neck.0"))?,
            neck_ln1: LayerNorm2d::new(out_chans, LN_EPS, vb.pp("neck.1"))?,
            neck_conv2: conv2d_no_bias(out_chans, out_chans, 3, pad1, vb.pp("neck.2"))?,
            neck_ln2: LayerNorm2d::new(out_chans, LN_EPS, vb.pp("neck.3"))?,
            embed_dim: dim,
        })
    }

    /// Channels of the two maps [`Self::forward_levels`] returns.
    pub fn level_channels(&self) -> Vec<usize> {
        vec![self.embed_dim; self.blocks.len().min(2)]
    }

    /// Image embedding `[B, out_chans, S/16, S/16]` of a preprocessed `[B, 3, S, S]` batch.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        Ok(self.run(x, false)?.0)
    }

    /// The embedding plus the outputs of the last two transformer blocks as NCHW
    /// `[B, embed_dim, S/16, S/16]` (earlier block first).
    pub fn forward_levels(&self, x: &Tensor) -> Result<(Tensor, Vec<Tensor>)> {
        self.run(x, true)
    }

    fn run(&self, x: &Tensor, keep_levels: bool) -> Result<(Tensor, Vec<Tensor>)> {
        let mut x = self
            .patch_embed
            .forward(x)?
            .permute((0, 2, 3, 1))?
            .contiguous()?
            .broadcast_add(&self.pos_embed)?;
        let mut levels = Vec::new();
        let first_kept = self.blocks.len().saturating_sub(2);
        for (i, blk) in self.blocks.iter().enumerate() {
            x = blk.forward(&x)?;
            if keep_levels && i >= first_kept {
                levels.push(x.permute((0, 3, 1, 2))?.contiguous()?);
            }
        }
        let x = x.permute((0, 3, 1, 2))?.contiguous()?;
        let x = self.neck_ln1.forward(&self.neck_conv1.forward(&x)?)?;
        let x = self.neck_ln2.forward(&self.neck_conv2.forward(&x)?)?;
        Ok((x, levels))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::{Device, Var};

    #[test]
    fn exp_nonpos_is_accurate() {
        let mut worst = 0f64;
        for i in 0..=200_000 {
            let x = -87.0 * i as f32 / 200_000.0;
            let want = (x as f64).exp();
            worst = worst.max(((exp_nonpos(x) as f64) - want).abs() / want);
        }
        assert!(worst < 3e-7, "max relative error {worst}");
        assert_eq!(exp_nonpos(0.0), 1.0);
    }

    #[test]
    fn fused_rel_pos_softmax_matches_composed() -> Result<()> {
        let dev = Device::Cpu;
        let (bs, n, kh, kw) = (3, 10, 4, 3);
        let m = kh * kw;
        // Non-square key grids and n != m are not used by the encoder but exercise the indexing.
        let attn = Var::from_tensor(&Tensor::randn(0f32, 2.0, (bs, n, m), &dev)?)?;
        let rh = Var::from_tensor(&Tensor::randn(0f32, 1.0, (bs, n, kh), &dev)?)?;
        let rw = Var::from_tensor(&Tensor::randn(0f32, 1.0, (bs, n, kw), &dev)?)?;
        let weights = Tensor::randn(0f32, 1.0, (bs, n, m), &dev)?;
        let run = |fused: bool| -> Result<Vec<Tensor>> {
            let (a, h, w) = (attn.as_tensor(), rh.as_tensor(), rw.as_tensor());
            let y = if fused {
                rel_pos_softmax(a, h, w)?
            } else {
                rel_pos_softmax_composed(a, h, w)?
            };
            let grads = (&y * &weights)?.sum_all()?.backward()?;
            let mut out = vec![y];
            for v in [&attn, &rh, &rw] {
                out.push(
                    grads
                        .get(v.as_tensor())
                        .cloned()
                        .ok_or_else(|| candle_core::Error::Msg("missing gradient".into()))?,
                );
            }
            Ok(out)
        };
        for (a, b) in run(true)?.iter().zip(run(false)?) {
            let err = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
            assert!(err < 1e-6, "fused vs composed: {err}");
        }
        Ok(())
    }
}
