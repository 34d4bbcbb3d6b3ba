//! sam2rad-data: ultrasound phantoms, data set layouts and augmentation.
