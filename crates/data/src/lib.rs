//! sam2rad-data: ultrasound phantoms, data set layouts and augmentation.

pub mod augment;
mod detmath;
pub mod fsutil;
pub mod layout;
mod mask;
pub mod phantom;

use thiserror::Error;

/// Errors of data set reading and phantom generation; every message names the file at fault.
#[derive(Debug, Error)]
pub enum DataError {
    /// A file or folder could not be read or written.
    #[error("{path}: {source}")]
    Io {
        /// File or folder name.
        path: String,
        /// Underlying I/O error.
        source: std::io::Error,
    },
    /// An image file could not be decoded.
    #[error("cannot read image {path}: {reason}")]
    Image {
        /// File name.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A mask file could not be decoded or has an unsupported pixel format.
    #[error("cannot read mask {path}: {reason}")]
    Mask {
        /// File name.
        path: String,
        /// What went wrong.
        reason: String,
    },
    /// A mask's size differs from its image's size.
    #[error(
        "mask {mask} is {mask_width}x{mask_height} pixels but its image {image} is \
         {image_width}x{image_height}"
    )]
    SizeMismatch {
        /// Image file name.
        image: String,
        /// Mask file name.
        mask: String,
        /// Image width.
        image_width: usize,
        /// Image height.
        image_height: usize,
        /// Mask width.
        mask_width: usize,
        /// Mask height.
        mask_height: usize,
    },
    /// A mask holds a label value outside `0..=num_classes` (and is not a 0/255 binary mask).
    #[error(
        "mask {path} contains label value {value}, but only 0..={num_classes} \
         (or a 0/255 binary mask) are allowed for {num_classes} class(es)"
    )]
    UnknownLabel {
        /// Mask file name.
        path: String,
        /// The offending value.
        value: u32,
        /// Number of foreground classes expected.
        num_classes: usize,
    },
    /// An image has no mask although its split has a mask folder.
    #[error("image {image} has no mask (looked for {expected})")]
    MissingMask {
        /// Image file name.
        image: String,
        /// Mask file name that was expected.
        expected: String,
    },
    /// A data set folder does not follow a known layout, or its metadata is invalid.
    #[error("data set {path}: {reason}")]
    Layout {
        /// Folder or metadata file name.
        path: String,
        /// What is wrong.
        reason: String,
    },
    /// An invalid phantom or augmentation setting.
    #[error("invalid setting: {0}")]
    Config(String),
}

/// Result alias of this crate.
pub type Result<T> = std::result::Result<T, DataError>;
