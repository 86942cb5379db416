//! Weights: the original checkpoint's tensor names and shapes, and reading them from safetensors.

mod checkpoint;
mod loader;
mod names;

pub use checkpoint::Checkpoint;
pub use loader::Loader;
pub use names::{TensorSpec, expected_tensors, OPTIONAL_TENSORS};
