//! Model assembly and a predictor with the official call semantics (original-pixel prompts).
