//! Weights: the original checkpoint's tensor names and shapes, and reading them from safetensors.

mod checkpoint;
mod loader;
mod names;

pub use checkpoint::{Checkpoint, DEFAULT_WINDOW_BYTES, LocalBoxFuture, RangeFetch};
pub use loader::{LoadProgress, Loader};
pub use names::{TensorSpec, expected_tensors, OPTIONAL_TENSORS};
