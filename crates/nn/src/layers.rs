//! Small layers (norms, the 2×2 transposed conv) whose forward passes use only `ops`.

use candle_core::{Module, Result, Tensor};
use candle_nn::VarBuilder;

use crate::ops;

/// LayerNorm over the last dimension with an explicit eps (keys `weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm {
    /// Loads `weight` and `bias` of length `dim`.
    pub fn new(dim: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(dim, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get(dim, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm(x, &self.weight, &self.bias, self.eps)
    }
}

/// LayerNorm over channels of an NCHW map (SAM's `LayerNorm2d`, keys `weight`, `bias`).
#[derive(Debug, Clone)]
pub struct LayerNorm2d {
    weight: Tensor,
    bias: Tensor,
    eps: f64,
}

impl LayerNorm2d {
    /// Loads `weight` and `bias` of length `channels`.
    pub fn new(channels: usize, eps: f64, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            weight: vb.get_with_hints(channels, "weight", candle_nn::Init::Const(1.0))?,
            bias: vb.get(channels, "bias")?,
            eps,
        })
    }
}

impl Module for LayerNorm2d {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        ops::layer_norm2d(x, &self.weight, &self.bias, self.eps)
    }
}

/// A linear layer (candle's, same keys and init) whose bias gradient is a matmul
/// ([`ops::add_last`]) when the bias is trained.
#[derive(Debug, Clone)]
pub struct Linear {
    inner: candle_nn::Linear,
}

impl Linear {
    /// A linear layer from `weight` [out, in] and an optional `bias` [out].
    pub fn new(weight: Tensor, bias: Option<Tensor>) -> Self {
        Self {
            inner: candle_nn::Linear::new(weight, bias),
        }
    }

    /// The weight [out, in].
    pub fn weight(&self) -> &Tensor {
        self.inner.weight()
    }

    /// The bias [out], if any.
    pub fn bias(&self) -> Option<&Tensor> {
        self.inner.bias()
    }
}

impl Module for Linear {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        match self.inner.bias() {
            Some(b) if b.track_op() => {
                let w = self.inner.weight();
                let (out, k) = w.dims2()?;
                let rows = x.elem_count() / k.max(1);
                let mut shape = x.dims().to_vec();
                if let Some(last) = shape.last_mut() {
                    *last = out;
                }
                let y = x.contiguous()?.reshape((rows, k))?.matmul(&w.t()?)?;
                ops::add_last(&y, b)?.reshape(shape)
            }
            _ => self.inner.forward(x),
        }
    }
}

/// Loads a linear layer `in → out` with bias (keys `weight`, `bias`), like `candle_nn::linear`.
pub fn linear(inp: usize, out: usize, vb: VarBuilder) -> Result<Linear> {
    Ok(Linear {
        inner: candle_nn::linear(inp, out, vb)?,
    })
}

/// U(−1/√fan_in, 1/√fan_in), PyTorch's default init for (transposed) convolutions.
fn uniform(fan_in: usize) -> candle_nn::Init {
    let bound = 1.0 / (fan_in.max(1) as f64).sqrt();
    candle_nn::Init::Uniform {
        lo: -bound,
        up: bound,
    }
}

/// `ConvTranspose2d(kernel 2, stride 2)` written as one matmul plus a pixel shuffle: exact, fast on
/// CPU and differentiable (keys `weight` [in, out, 2, 2] and `bias` [out], PyTorch layout).
#[derive(Debug, Clone)]
pub struct ConvTranspose2x2 {
    weight: Tensor,
    bias: Tensor,
    out: usize,
}

impl ConvTranspose2x2 {
    /// Loads a `ConvTranspose2d(inp, out, kernel_size=2, stride=2)`.
    pub fn new(inp: usize, out: usize, vb: VarBuilder) -> Result<Self> {
        Ok(Self {
            // PyTorch's default for ConvTranspose2d: U(±1/√fan_in), fan_in = out·k² here.
            weight: vb.get_with_hints((inp, out, 2, 2), "weight", uniform(out * 4))?,
            bias: vb.get_with_hints(out, "bias", uniform(out * 4))?,
            out,
        })
    }
}

impl Module for ConvTranspose2x2 {
    fn forward(&self, x: &Tensor) -> Result<Tensor> {
        let (n, c, h, w) = x.dims4()?;
        let o = self.out;
        // [n·h·w, c] @ [c, o·4] -> [n, h, w, o, 2, 2] -> [n, o, h, 2, w, 2]
        let tokens = x
            .flatten_from(2)?
            .transpose(1, 2)?
            .contiguous()?
            .reshape((n * h * w, c))?;
        let kernel = self.weight.reshape((c, o * 4))?;
        let y = tokens.matmul(&kernel)?;
        let y = y
            .reshape((n, h, w, o, 2, 2))?
            .permute((0, 3, 1, 4, 2, 5))?
            .reshape((n, o, 2 * h, 2 * w))?;
        ops::add_channels(&y, &self.bias)
    }
}
