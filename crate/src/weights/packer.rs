//! Packs tensors into safetensors shards of at most a given size, in memory, for any target: the
//! native [`super::ShardWriter`] writes each finished shard to a file, the browser hands it to its
//! cache. Deterministic: the same tensors added in the same order give the same shards. A tensor
//! larger than a shard is split into row slices (`NAME.rows.START-END`).

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::checkpoint::{IndexMetadata, ShardIndex, ShardMeta, rows_name, sha256_hex};
use crate::error::{Error, Result};

/// The shard size browsers cache comfortably as whole files.
pub const DEFAULT_SHARD_BYTES: usize = 64 << 20;

/// Room left in a shard for its JSON header.
const HEADER_ROOM: usize = 256 << 10;

struct Pending {
    name: String,
    dtype: Dtype,
    shape: Vec<usize>,
    bytes: Vec<u8>,
}

/// A finished shard: its number (1-based, in order), serialised bytes, size and sha256.
pub struct PackedShard {
    pub number: usize,
    pub bytes: Vec<u8>,
    pub meta: ShardMeta,
}

pub struct ShardPacker {
    max_bytes: usize,
    current: Vec<Pending>,
    current_bytes: usize,
    /// Tensor names and size/hash of the shards finished so far.
    done: Vec<(Vec<String>, ShardMeta)>,
}

impl ShardPacker {
    /// Shards of at most `max_bytes` bytes each, header included.
    pub fn new(max_bytes: usize) -> Result<Self> {
        if max_bytes <= HEADER_ROOM * 2 {
            return Err(Error::InvalidArgument(format!("shard size {max_bytes} bytes is too small")));
        }
        Ok(Self { max_bytes, current: Vec::new(), current_bytes: 0, done: Vec::new() })
    }

    fn budget(&self) -> usize {
        self.max_bytes - HEADER_ROOM
    }

    /// Adds a tensor (row-major `bytes` of `shape` and `dtype`), split into row slices if larger
    /// than a shard; returns the shards this completed.
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<Vec<PackedShard>> {
        let mut finished = Vec::new();
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = bytes.len() / rows;
        if bytes.len() <= self.budget() || shape.is_empty() || row_bytes == 0 {
            self.push(Pending { name: name.into(), dtype, shape: shape.to_vec(), bytes }, &mut finished)?;
            return Ok(finished);
        }
        let per_part = (self.budget() / row_bytes).max(1);
        let mut start = 0;
        while start < rows {
            let end = (start + per_part).min(rows);
            let mut part_shape = shape.to_vec();
            part_shape[0] = end - start;
            let part = bytes[start * row_bytes..end * row_bytes].to_vec();
            self.push(Pending { name: rows_name(name, &(start..end)), dtype, shape: part_shape, bytes: part }, &mut finished)?;
            start = end;
        }
        Ok(finished)
    }

    fn push(&mut self, tensor: Pending, finished: &mut Vec<PackedShard>) -> Result<()> {
        if !self.current.is_empty() && self.current_bytes + tensor.bytes.len() > self.budget() {
            finished.extend(self.flush()?);
        }
        self.current_bytes += tensor.bytes.len();
        self.current.push(tensor);
        Ok(())
    }

    fn flush(&mut self) -> Result<Option<PackedShard>> {
        if self.current.is_empty() {
            return Ok(None);
        }
        let tensors = std::mem::take(&mut self.current);
        self.current_bytes = 0;
        let views = tensors
            .iter()
            .map(|t| TensorView::new(t.dtype, t.shape.clone(), &t.bytes).map(|v| (t.name.clone(), v)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Safetensors(e.to_string()))?;
        let metadata = Some(std::collections::HashMap::from([("format".to_string(), "pt".to_string())]));
        let bytes = safetensors::tensor::serialize(views, metadata).map_err(|e| Error::Safetensors(e.to_string()))?;
        let meta = ShardMeta { size: bytes.len() as u64, sha256: sha256_hex(&bytes) };
        self.done.push((tensors.into_iter().map(|t| t.name).collect(), meta.clone()));
        Ok(Some(PackedShard { number: self.done.len(), bytes, meta }))
    }

    /// The last shard (if any tensors are pending) and the index, with shard `i` of `n` (1-based)
    /// named `file_name(i, n)` and each shard's size and sha256 in its metadata.
    pub fn finish(mut self, file_name: impl Fn(usize, usize) -> String) -> Result<(Option<PackedShard>, ShardIndex)> {
        let last = self.flush()?;
        let count = self.done.len();
        let mut index = ShardIndex { metadata: IndexMetadata { total_size: Some(0), shards: Default::default() }, weight_map: Default::default() };
        let mut data = 0u64;
        for (i, (names, meta)) in self.done.iter().enumerate() {
            let file = file_name(i + 1, count);
            data += meta.size;
            index.metadata.shards.insert(file.clone(), meta.clone());
            for name in names {
                index.weight_map.insert(name.clone(), file.clone());
            }
        }
        index.metadata.total_size = Some(data);
        Ok((last, index))
    }
}

/// The hub's shard names: `model-0000i-of-0000N.safetensors`.
pub fn hub_shard_name(i: usize, n: usize) -> String {
    format!("model-{i:05}-of-{n:05}.safetensors")
}
