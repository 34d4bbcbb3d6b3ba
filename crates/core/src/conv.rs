//! Channels-last (NHWC) 3×3 and 1×1 convolutions written as one matmul each (im2col), so they are
//! exact, differentiable through candle primitives only, and fast on CPU: candle's `conv2d`
//! backward goes through a direct (non-GEMM) `conv_transpose2d`, which is slow at 64²–256² maps.

use candle_core::{Result, Tensor};
use candle_nn::{Init, VarBuilder};

/// A stride-1 "same" convolution (kernel 1 or 3, zero padding `k/2`) on `[B, H, W, C]` maps, with
/// PyTorch-layout keys `weight` [out, in, k, k] and `bias` [out].
#[derive(Debug, Clone)]
pub struct ConvNhwc {
    /// PyTorch layout [out, in, k, k]; re-laid out at every forward, because an optimiser updates
    /// a variable in place and a copy made at construction would go stale.
    weight: Tensor,
    bias: Tensor,
    k: usize,
    out: usize,
}

impl ConvNhwc {
    /// Loads a `k`×`k` convolution `inp → out` (`k` is 1 or 3) with Kaiming-normal weights and a
    /// uniform ±1/√fan_in bias as init hints.
    pub fn new(inp: usize, out: usize, k: usize, vb: VarBuilder) -> Result<Self> {
        if k != 1 && k != 3 {
            candle_core::bail!("ConvNhwc supports kernel 1 or 3, got {k}")
        }
        let weight = vb.get_with_hints(
            (out, inp, k, k),
            "weight",
            candle_nn::init::DEFAULT_KAIMING_NORMAL,
        )?;
        let bound = 1.0 / ((inp * k * k) as f64).sqrt();
        let bias = vb.get_with_hints(
            out,
            "bias",
            Init::Uniform {
                lo: -bound,
                up: bound,
            },
        )?;
        Ok(Self {
            weight,
            bias,
            k,
            out,
        })
    }

    /// `[B, H, W, in]` → `[B, H, W, out]`.
    pub fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (b, h, w, c) = x.dims4()?;
        let cols = if self.k == 1 {
            x.contiguous()?.reshape((b * h * w, c))?
        } else {
            let p = x.pad_with_zeros(1, 1, 1)?.pad_with_zeros(2, 1, 1)?;
            let mut taps = Vec::with_capacity(9);
            for dy in 0..3 {
                for dx in 0..3 {
                    taps.push(p.narrow(1, dy, h)?.narrow(2, dx, w)?);
                }
            }
            // [B, H, W, 9, C] → one row of 9·C values per output pixel.
            Tensor::stack(&taps, 3)?.reshape((b * h * w, 9 * c))?
        };
        // [out, in, ky, kx] → [ky, kx, in, out] → [k·k·in, out], rows ordered like the columns.
        let kernel = self
            .weight
            .permute((2, 3, 1, 0))?
            .contiguous()?
            .reshape((self.k * self.k * c, self.out))?;
        sam2rad_nn::ops::add_last(&cols.matmul(&kernel)?, &self.bias)?.reshape((b, h, w, self.out))
    }
}
