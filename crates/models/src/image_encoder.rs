//! SAM ViT image encoder (ImageEncoderViT): windowed/global attention with decomposed relative positions, and the neck.
