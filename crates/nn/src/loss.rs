//! Losses (stable BCE-with-logits, sigmoid focal, soft Dice, L1, GIoU) built from differentiable ops.
