//! Weights: the original checkpoint's tensor names and shapes, and reading them from safetensors.

mod checkpoint;
mod names;

pub use checkpoint::Checkpoint;
pub use names::{TensorSpec, expected_tensors, OPTIONAL_TENSORS};
