//! sam2rad-nn: the differentiable op layer, layers, losses and optimiser that sam2rad trains with.
//!
//! candle's fused softmax / layer-norm kernels have no backward pass and some of its resize and
//! pooling backward passes are wrong, so every op here is composed only of candle primitives whose
//! gradients are correct, and each one is checked against finite differences in f64.

pub mod layers;
pub mod loss;
pub mod ops;
pub mod optim;

pub use layers::{linear, ConvTranspose2x2, LayerNorm, LayerNorm2d, Linear};
