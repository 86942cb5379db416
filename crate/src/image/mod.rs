//! Images: resampling shared by preprocessing and the encoder's position tables.

pub mod resample;
