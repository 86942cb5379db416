//! Writes a sharded checkpoint (native): `model-0000i-of-0000N.safetensors` files of at most a given
//! size ([`ShardPacker`]) and `model.safetensors.index.json` with each shard's size and sha256.
//! Files are written under temporary names and renamed when complete, the index last, so a reader
//! never sees a half-written checkpoint.

use std::path::{Path, PathBuf};

use safetensors::Dtype;

use super::checkpoint::{INDEX_FILE, ShardIndex};
use super::packer::{PackedShard, ShardPacker, hub_shard_name};
use crate::error::{Error, Result};

pub struct ShardWriter {
    dir: PathBuf,
    packer: ShardPacker,
    /// Temporary paths of the shards written so far, in order.
    written: Vec<PathBuf>,
}

impl ShardWriter {
    /// Shards of at most `max_bytes` bytes each (header included) in `dir` (created if needed).
    pub fn new(dir: &Path, max_bytes: usize) -> Result<Self> {
        std::fs::create_dir_all(dir).map_err(|e| io(dir, e))?;
        Ok(Self { dir: dir.to_path_buf(), packer: ShardPacker::new(max_bytes)?, written: Vec::new() })
    }

    /// Adds a tensor (row-major `bytes` of `shape` and `dtype`); split into row slices if larger
    /// than a shard.
    pub fn add(&mut self, name: &str, dtype: Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<()> {
        for shard in self.packer.add(name, dtype, shape, bytes)? {
            self.write(shard)?;
        }
        Ok(())
    }

    fn write(&mut self, shard: PackedShard) -> Result<()> {
        let path = self.dir.join(format!(".shard-{:05}.tmp", shard.number));
        std::fs::write(&path, &shard.bytes).map_err(|e| io(&path, e))?;
        self.written.push(path);
        Ok(())
    }

    /// Writes the last shard, names the files `model-0000i-of-0000N.safetensors` and writes the
    /// index (each shard's size and sha256 in its metadata). Returns the index.
    pub fn finish(mut self) -> Result<ShardIndex> {
        let packer = std::mem::replace(&mut self.packer, ShardPacker::new(usize::MAX)?);
        let (last, index) = packer.finish(hub_shard_name)?;
        if let Some(shard) = last {
            self.write(shard)?;
        }
        let count = self.written.len();
        for (i, temp) in self.written.iter().enumerate() {
            let target = self.dir.join(hub_shard_name(i + 1, count));
            std::fs::rename(temp, &target).map_err(|e| io(&target, e))?;
        }
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
