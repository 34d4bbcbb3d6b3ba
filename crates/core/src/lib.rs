//! sam2rad-core: the Sam2Rad prompt predictor, model assembly, losses, training, metrics and inference.
