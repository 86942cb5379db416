//! Images: decoding user input, the reference's preprocessing into views, and the Pillow-exact
//! resampling shared with the encoder's position tables.

pub mod decode;
pub mod preprocess;
pub mod resample;

pub use decode::{DecodeLimits, decode};
pub use preprocess::{PreprocessOptions, Views, make_views, make_views_for, normalize};
