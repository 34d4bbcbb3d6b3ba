//! Differentiable tensor ops with PyTorch semantics, built from candle primitives with a backward.

use candle_core::{bail, Result, Tensor, D};

/// Softmax over the last dimension (max-shifted for stability; the shift carries no gradient).
/// When nothing tracks a gradient (frozen inference) candle's fused kernel is used: same maths,
/// one pass, multi-threaded.
pub fn softmax_last_dim(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return candle_nn::ops::softmax_last_dim(x);
    }
    let max = x.max_keepdim(D::Minus1)?.detach();
    let e = x.broadcast_sub(&max)?.exp()?;
    e.broadcast_div(&e.sum_keepdim(D::Minus1)?)
}

/// LayerNorm over the last dimension: `w·(x−μ)/sqrt(σ²+eps)+b`, biased variance, like PyTorch.
pub fn layer_norm(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(D::Minus1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(D::Minus1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    add_last(&mul_last(&xn, w)?, b)
}

/// LayerNorm over the channel dimension of an NCHW tensor (SAM's `LayerNorm2d`).
pub fn layer_norm2d(x: &Tensor, w: &Tensor, b: &Tensor, eps: f64) -> Result<Tensor> {
    let mu = x.mean_keepdim(1)?;
    let xc = x.broadcast_sub(&mu)?;
    let var = xc.sqr()?.mean_keepdim(1)?;
    let xn = xc.broadcast_div(&(var + eps)?.sqrt()?)?;
    add_channels(&mul_channels(&xn, w)?, b)
}

/// `p` ([D]) spread over the shape of `x` along its last dimension. A trained `p` is tiled as
/// `ones[rows, 1] @ p[1, D]` so that its gradient is one matmul: candle reduces a broadcast's
/// gradient over leading dims with a per-element divide loop, which dominated the training step.
fn spread_last(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    if !p.track_op() {
        return p.broadcast_as(x.shape());
    }
    let d = p.elem_count();
    let ones = Tensor::ones((x.elem_count() / d.max(1), 1), p.dtype(), p.device())?;
    ones.matmul(&p.reshape((1, d))?)?.reshape(x.shape())
}

/// `p` ([C]) spread over the shape of an NCHW (or NC…) `x` along its channels; a trained `p` is
/// tiled with a matmul, as in [`spread_last`].
fn spread_channels(p: &Tensor, x: &Tensor) -> Result<Tensor> {
    let (n, c) = (x.dim(0)?, p.elem_count());
    if !p.track_op() {
        let mut shape = vec![1; x.rank()];
        shape[1] = c;
        return p.reshape(shape)?.broadcast_as(x.shape());
    }
    let col = p.reshape((1, c))?.repeat((n, 1))?.reshape((n * c, 1))?;
    let ones = Tensor::ones((1, x.elem_count() / (n * c).max(1)), p.dtype(), p.device())?;
    col.matmul(&ones)?.reshape(x.shape())
}

/// `x + b` with `b` ([D]) broadcast over the last dimension of `x`.
pub fn add_last(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.add(&spread_last(b, x)?)
}

/// `x · w` with `w` ([D]) broadcast over the last dimension of `x`.
pub fn mul_last(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.mul(&spread_last(w, x)?)
}

/// `x + b` with `b` ([C]) broadcast over the channels of an NCHW (or NC…) tensor `x`.
pub fn add_channels(x: &Tensor, b: &Tensor) -> Result<Tensor> {
    x.add(&spread_channels(b, x)?)
}

/// `x · w` with `w` ([C]) broadcast over the channels of an NCHW (or NC…) tensor `x`.
pub fn mul_channels(x: &Tensor, w: &Tensor) -> Result<Tensor> {
    x.mul(&spread_channels(w, x)?)
}

/// Exact (erf) GELU, `x·½·(1+erf(x/√2))`, as PyTorch's `nn.GELU()` default. Without gradient
/// tracking candle's single-pass kernel computes the same formula; with it, the composite below
/// keeps an exact backward (candle's own GELU backward uses a rounded 1/√(2π)).
pub fn gelu(x: &Tensor) -> Result<Tensor> {
    if !x.track_op() {
        return x.gelu_erf();
    }
    let e = x.affine(std::f64::consts::FRAC_1_SQRT_2, 0.)?.erf()?;
    (x * 0.5)?.mul(&(e + 1.)?)
}

/// Logistic sigmoid (candle's op, which has a correct backward).
pub fn sigmoid(x: &Tensor) -> Result<Tensor> {
    candle_nn::ops::sigmoid(x)
}

/// PyTorch's linear interpolation matrix (out × in) for `align_corners=False`, source coordinates
/// computed in f32 exactly as PyTorch does for float tensors.
fn linear_weights(in_size: usize, out_size: usize) -> Vec<f32> {
    let mut m = vec![0f32; out_size * in_size];
    let scale = in_size as f32 / out_size as f32;
    for o in 0..out_size {
        let src = (scale * (o as f32 + 0.5) - 0.5).max(0.0);
        let i0 = (src as usize).min(in_size - 1);
        let l1 = (src - i0 as f32).clamp(0.0, 1.0);
        let l0 = 1.0 - l1;
        let i1 = if i0 < in_size - 1 { i0 + 1 } else { i0 };
        m[o * in_size + i0] += l0;
        m[o * in_size + i1] += l1;
    }
    m
}

/// Bilinear resize of an N·C·H·W tensor to `(h, w)`, `align_corners=False`, no antialias —
/// PyTorch's `F.interpolate(mode="bilinear")`. Written as two matmuls so gradients flow.
pub fn resize_bilinear(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (n, c, ih, iw) = x.dims4()?;
    if (ih == 0 && h != 0) || (iw == 0 && w != 0) {
        bail!("resize_bilinear: cannot resize an empty {ih}x{iw} map to {h}x{w}");
    }
    let dev = x.device();
    let dt = x.dtype();
    let mut y = x.clone();
    if iw != w {
        let ww = Tensor::from_vec(linear_weights(iw, w), (w, iw), dev)?.to_dtype(dt)?;
        y = y.reshape((n * c * ih, iw))?.matmul(&ww.t()?)?;
        y = y.reshape((n, c, ih, w))?;
    }
    if ih != h {
        let wh = Tensor::from_vec(linear_weights(ih, h), (h, ih), dev)?.to_dtype(dt)?;
        y = wh.broadcast_matmul(&y.reshape((n * c, ih, w))?.contiguous()?)?;
        y = y.reshape((n, c, h, w))?;
    }
    Ok(y)
}

/// PyTorch `mode="nearest"` source index for every output position.
fn nearest_index(in_size: usize, out_size: usize) -> Vec<u32> {
    let scale = in_size as f32 / out_size as f32;
    (0..out_size)
        .map(|o| {
            if in_size == out_size {
                o as u32
            } else if out_size == 2 * in_size {
                (o >> 1) as u32
            } else {
                ((o as f32 * scale).floor() as usize).min(in_size - 1) as u32
            }
        })
        .collect()
}

/// Nearest resize of an N·C·H·W tensor to `(h, w)` (PyTorch `mode="nearest"`); the backward
/// accumulates every output's gradient into its source pixel.
pub fn resize_nearest(x: &Tensor, h: usize, w: usize) -> Result<Tensor> {
    let (_, _, ih, iw) = x.dims4()?;
    if (ih == 0 && h != 0) || (iw == 0 && w != 0) {
        bail!("resize_nearest: cannot resize an empty {ih}x{iw} map to {h}x{w}");
    }
    let dev = x.device();
    let mut y = x.clone();
    if ih != h {
        let idx = Tensor::new(nearest_index(ih, h), dev)?;
        y = y.index_select(&idx, 2)?;
    }
    if iw != w {
        let idx = Tensor::new(nearest_index(iw, w), dev)?;
        y = y.index_select(&idx, 3)?;
    }
    Ok(y)
}

/// Max-pool with kernel = stride = `k` over the last two dims of N·C·H·W (floor mode: trailing
/// rows/columns that do not fill a window are dropped, as PyTorch's default).
pub fn max_pool2d(x: &Tensor, k: usize) -> Result<Tensor> {
    let (n, c, h, w) = x.dims4()?;
    if k == 0 {
        bail!("max_pool2d: kernel size must be positive");
    }
    let (oh, ow) = (h / k, w / k);
    let x = if oh * k != h || ow * k != w {
        x.narrow(2, 0, oh * k)?.narrow(3, 0, ow * k)?
    } else {
        x.clone()
    };
    x.contiguous()?
        .reshape((n, c, oh, k, ow, k))?
        .max(5)?
        .max(3)
}
