//! Two-way transformer of the mask decoder (token and image cross-attention).
