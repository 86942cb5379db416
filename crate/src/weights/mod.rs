//! Weights: the original checkpoint's tensor names and shapes, and reading them from one safetensors
//! file or a sharded (possibly quantized) checkpoint.

mod checkpoint;
mod loader;
mod names;
mod packer;
#[cfg(not(target_arch = "wasm32"))]
pub mod native;
mod shard;
mod values;
#[cfg(not(target_arch = "wasm32"))]
mod writer;

pub use checkpoint::{Checkpoint, INDEX_FILE, IndexMetadata, ROWS_MARK, ShardIndex, ShardMeta, hex, rows_name, sha256_hex};
pub use loader::{LoadProgress, Loader, Matrix};
pub use names::{TensorSpec, expected_tensors, OPTIONAL_TENSORS};
pub use shard::{DEFAULT_WINDOW_BYTES, LocalBoxFuture, RangeFetch, Shard};
pub use packer::{DEFAULT_SHARD_BYTES, PackedShard, ShardPacker, hub_shard_name};
#[cfg(not(target_arch = "wasm32"))]
pub use writer::{ShardWriter, write_atomic};
