//! sam2rad-models: the Segment-Anything family (SAM ViT-B/L/H, MobileSAM, MedSAM) on candle, with
//! official checkpoint loading and PyTorch-exact pre- and postprocessing.

pub mod checkpoint;
pub mod config;
pub mod detect;
pub mod encoder;
pub mod error;
pub mod fpn_neck;
pub mod hiera;
pub mod image_encoder;
pub mod mask_decoder;
pub mod postprocess;
pub mod preprocess;
pub mod preprocess_sam2;
pub mod prompt_encoder;
pub mod sam;
pub mod sam2;
pub mod sam2_image_encoder;
pub mod tiny_vit;
pub mod transformer;
