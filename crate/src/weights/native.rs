//! Checkpoint files on disk (native): memory-mapped, checked against the index, their pages dropped
//! as tensors are read so that loading never holds the files and the loaded weights at once.

use std::path::Path;

use memmap2::Mmap;

use super::checkpoint::{Checkpoint, INDEX_FILE, ShardIndex};
use super::shard::Shard;
use crate::error::{Error, Result};

/// The single file of the original upload, or of re-saved copies.
const SINGLE_FILES: [&str; 2] = ["model-00001-of-000001.safetensors", "model.safetensors"];

/// A checkpoint folder's weight files, mapped.
pub struct MappedCheckpoint {
    index: Option<ShardIndex>,
    files: Vec<(String, Mmap)>,
}

/// Maps the weights of checkpoint folder `dir`: the shards of `model.safetensors.index.json` (sizes
/// and sha256 checked against the index, in parallel) or the single safetensors file.
pub fn map_checkpoint(dir: &Path) -> Result<MappedCheckpoint> {
    let index_path = dir.join(INDEX_FILE);
    if index_path.is_file() {
        let text = std::fs::read_to_string(&index_path).map_err(|e| Error::Io(format!("{}: {e}", index_path.display())))?;
        let index = ShardIndex::parse(&text)?;
        let files = index
            .files()
            .into_iter()
            .map(|file| {
                let map = map(&dir.join(&file)).map_err(|message| Error::Shard { file: file.clone(), message })?;
                Ok((file, map))
            })
            .collect::<Result<Vec<_>>>()?;
        let checks = crate::model::ops::map_par(files.iter().collect(), |(file, map)| {
            let result = index.verify(file, map);
            release(map, 0, map.len());
            result
        });
        checks.into_iter().collect::<Result<Vec<()>>>()?;
        return Ok(MappedCheckpoint { index: Some(index), files });
    }
    for name in SINGLE_FILES {
        let path = dir.join(name);
        if path.is_file() {
            let map = map(&path).map_err(Error::Io)?;
            // Named, so that every error about its contents names the file too.
            return Ok(MappedCheckpoint { index: None, files: vec![(name.to_string(), map)] });
        }
    }
    Err(Error::Io(format!("{}: no {INDEX_FILE}, model-00001-of-000001.safetensors or model.safetensors", dir.display())))
}

impl MappedCheckpoint {
    /// The mapped files as one checkpoint.
    pub fn checkpoint(&self) -> Result<Checkpoint<'_>> {
        let mut shards = Vec::with_capacity(self.files.len());
        for (file, map) in &self.files {
            let shard = Shard::parse(map).map_err(|e| Error::in_file(file, e))?;
            shards.push((file.clone(), shard.with_release(Box::new(move |offset, len| release(map, offset, len)))));
        }
        match &self.index {
            Some(index) => Checkpoint::from_index(shards, index),
            None => Checkpoint::from_shards(shards),
        }
    }

    /// Bytes of all weight files.
    pub fn bytes(&self) -> u64 {
        self.files.iter().map(|(_, m)| m.len() as u64).sum()
    }
}

fn map(path: &Path) -> std::result::Result<Mmap, String> {
    let file = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    // SAFETY: the file is opened read-only and only read during loading; a concurrent truncation
    // by another process is the one hazard, as with any memory map.
    unsafe { Mmap::map(&file) }.map_err(|e| format!("{}: {e}", path.display()))
}

/// Drops mapped pages once read: peak memory is then the loaded weights, not those plus the files.
fn release(map: &Mmap, offset: usize, len: usize) {
    #[cfg(unix)]
    {
        // SAFETY: the map is read-only and backed by an unchanging file: a dropped page is read
        // again from the file if it is touched later (the rounding to page boundaries may cover
        // a neighbour's bytes; they come back the same way).
        let _ = unsafe { map.unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, offset, len) };
    }
    #[cfg(not(unix))]
    let _ = (map, offset, len);
}
