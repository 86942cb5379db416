//! Quantized weights: the packed int4/int8 format ([`scheme`]), which tensor gets what
//! ([`recipe`]), CPU kernels that multiply with packed weights directly ([`kernels`]; a decoding step's int8
//! dot products in `few_rows`), the layer
//! the model uses in place of a float `Linear` ([`linear`]) and the converter that writes a quantized
//! sharded checkpoint ([`convert`]: into files natively, into the browser's cache in wasm32).
//!
//! On the CPU the weights stay packed in memory and the kernels read them; on GPUs they are, for
//! now, dequantized to the device's float type when loaded (same numbers, float memory).

mod few_rows;
pub mod kernels;
pub mod linear;
pub mod recipe;
pub mod scheme;
pub mod convert;

pub use linear::QLinear;
pub use recipe::{DEFAULT_GROUP, Preset, QuantizationConfig, Recipe, Role, packed_names};
pub use scheme::{Bits, GROUP_SIZES, PackedMatrix, QuantSpec, ScaleDtype};
