//! AdamW with parameter groups, gradient-norm clipping and a cosine schedule with warm-up.
