//! Writes a sharded checkpoint (native): `model-0000i-of-0000N.safetensors` files of at most a given
//! size and `model.safetensors.index.json` with each shard's size and sha256. Deterministic: the
//! same tensors added in the same order give the same bytes. A tensor larger than a shard is split
//! into row slices (`NAME.rows.START-END`). Files are written under temporary names and renamed
//! when complete, the index last, so a reader never sees a half-written checkpoint.

use std::path::{Path, PathBuf};

use safetensors::Dtype;
use safetensors::tensor::TensorView;

use super::checkpoint::{INDEX_FILE, IndexMetadata, ShardIndex, ShardMeta, rows_name, sha256_hex};
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

pub struct ShardWriter {
    dir: PathBuf,
    max_bytes: usize,
    current: Vec<Pending>,
    current_bytes: usize,
    /// The finished shards: temporary path, tensor names, size and sha256.
    written: Vec<(PathBuf, Vec<String>, ShardMeta)>,
}

impl ShardWriter {
    /// Shards of at most `max_bytes` bytes each (header included) in `dir` (created if needed).
    pub fn new(dir: &Path, max_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        if max_bytes <= HEADER_ROOM * 2 {
            return Err(Error::InvalidArgument(format!("shard size {max_bytes} bytes is too small")));
        }
        Ok(Self { dir: dir.to_path_buf(), max_bytes, current: Vec::new(), current_bytes: 0, written: Vec::new() })
    }

    fn budget(&self) -> usize {
        self.max_bytes - HEADER_ROOM
    }

    /// Adds a tensor (row-major `bytes` of `shape` and `dtype`); split into row slices if larger
    /// than a shard.
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<()> {
        let rows = shape.first().copied().unwrap_or(1).max(1);
        let row_bytes = bytes.len() / rows;
        if bytes.len() <= self.budget() || shape.is_empty() || row_bytes == 0 {
            return self.push(Pending { name: name.into(), dtype, shape: shape.to_vec(), bytes });
        }
        let per_part = (self.budget() / row_bytes).max(1);
        let mut start = 0;
        while start < rows {
            let end = (start + per_part).min(rows);
            let mut part_shape = shape.to_vec();
            part_shape[0] = end - start;
            let part = bytes[start * row_bytes..end * row_bytes].to_vec();
            self.push(Pending { name: rows_name(name, &(start..end)), dtype, shape: part_shape, bytes: part })?;
            start = end;
        }
        Ok(())
    }

    fn push(&mut self, tensor: Pending) -> Result<()> {
        if !self.current.is_empty() && self.current_bytes + tensor.bytes.len() > self.budget() {
            self.flush()?;
        }
        self.current_bytes += tensor.bytes.len();
        self.current.push(tensor);
        Ok(())
    }

    fn flush(&mut self) -> Result<()> {
        if self.current.is_empty() {
            return Ok(());
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
        let path = self.dir.join(format!(".shard-{:05}.tmp", self.written.len() + 1));
        std::fs::write(&path, &bytes).map_err(|e| io(&path, e))?;
        let meta = ShardMeta { size: bytes.len() as u64, sha256: sha256_hex(&bytes) };
        self.written.push((path, tensors.into_iter().map(|t| t.name).collect(), meta));
        Ok(())
    }

    /// Writes the last shard, names the files `model-0000i-of-0000N.safetensors` and writes the
    /// index (each shard's size and sha256 in its metadata). Returns the index.
    pub fn finish(mut self) -> Result<ShardIndex> {
        self.flush()?;
        let count = self.written.len();
        let mut index = ShardIndex { metadata: IndexMetadata { total_size: Some(0), shards: Default::default() }, weight_map: Default::default() };
        let mut data = 0u64;
        for (i, (temp, names, meta)) in self.written.iter().enumerate() {
            let file = format!("model-{:05}-of-{count:05}.safetensors", i + 1);
            data += meta.size;
            index.metadata.shards.insert(file.clone(), meta.clone());
            for name in names {
                index.weight_map.insert(name.clone(), file.clone());
            }
            let target = self.dir.join(&file);
            std::fs::rename(temp, &target).map_err(|e| io(&target, e))?;
        }
        index.metadata.total_size = Some(data);
        let json = serde_json::to_string_pretty(&index).map_err(|e| Error::Io(e.to_string()))?;
        write_atomic(&self.dir.join(INDEX_FILE), json.as_bytes())?;
        Ok(index)
    }
}

/// Writes `bytes` to `path` through a sibling temporary file and a rename.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("file");
    let temp = path.with_file_name(format!(".{name}.tmp"));
    std::fs::write(&temp, bytes).map_err(|e| io(&temp, e))?;
    std::fs::rename(&temp, path).map_err(|e| io(path, e))
}

fn io(path: &Path, e: std::io::Error) -> Error {
    Error::Io(format!("{}: {e}", path.display()))
}
