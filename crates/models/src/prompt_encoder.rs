//! Prompt encoder: random-Fourier positional encoding of points and boxes, and the mask-prompt downscaler.
