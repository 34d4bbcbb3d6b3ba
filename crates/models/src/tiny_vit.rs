//! TinyViT image encoder (MobileSAM) with eval-mode batch norm.
