//! Mask decoder: output tokens, two-way transformer, upscaling and hypernetwork heads.
