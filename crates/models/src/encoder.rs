//! The image encoder of a configuration, whichever variant it is.
