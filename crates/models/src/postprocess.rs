//! Postprocessing: low-res logits back to the original image size exactly as the official predictor.
