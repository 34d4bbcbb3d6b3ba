//! Official preprocessing: Pillow-exact uint8 bilinear resize, normalisation and padding; MedSAM scaling.
