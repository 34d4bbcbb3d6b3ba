//! sam2rad-core: the Sam2Rad prompt predictor, model assembly, losses, training, metrics and inference.

pub mod cache;
pub mod clicks;
pub mod conv;
pub mod eval;
pub mod features;
pub mod infer;
pub mod input;
pub mod loss;
pub mod metrics;
pub mod model;
pub mod plot;
pub mod ppn;
pub mod run;
pub mod train;

pub use features::{extract, Features, Rows};
pub use loss::{bbox_of_mask, sam2rad_loss, LossConfig, LossParts};
pub use model::{
    trainable_decoder_key, DecoderMode, RowPrompts, Sam2Rad, Sam2RadConfig, Sam2RadOutput,
    TrainableVars,
};
pub use ppn::{Phase, PpnConfig, PpnOutput, PpnVariant, PromptPredictor};
