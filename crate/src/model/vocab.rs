//! Vocabulary-sized matrices (token embedding, lm_head) kept as row shards, each within the device's
//! largest binding: the real model's 129,280 × 1,280 tables are 632 MiB in f32, far beyond WebGPU's
//! default 128 MiB `maxStorageBufferBindingSize`. With no limit each is a single shard.

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::ops;
use crate::error::Result;
use crate::weights::Loader;

/// Token embedding table `(vocab, hidden)` as row shards; a lookup gathers rows shard by shard.
#[derive(Module, Debug)]
pub struct EmbeddingShards {
    shards: Vec<Param<Tensor<2>>>,
    rows_per_shard: usize,
}

impl EmbeddingShards {
    pub async fn load(l: &Loader<'_, '_>, name: &str, [vocab, hidden]: [usize; 2]) -> Result<Self> {
        let shards = l.row_shards(name, [vocab, hidden], false).await?;
        let rows_per_shard = shards[0].dims()[0];
        Ok(Self { shards: shards.into_iter().map(Param::from_tensor).collect(), rows_per_shard })
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// The rows of `ids` (all below the vocabulary size), in order: `(ids.len(), hidden)`.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        let index = |rows: Vec<i64>| {
            let n = rows.len();
            Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), device)
        };
        if self.shards.len() == 1 {
            return self.shards[0].val().select(0, index(ids.iter().map(|&i| i as i64).collect()));
        }
        // Gather per shard, then put the rows back in the ids' order.
        let mut parts = Vec::new();
        let mut order = vec![0i64; ids.len()];
        let mut next = 0;
        for (s, shard) in self.shards.iter().enumerate() {
            let mut local = Vec::new();
            for (position, &id) in ids.iter().enumerate() {
                if id as usize / self.rows_per_shard == s {
                    local.push((id as usize % self.rows_per_shard) as i64);
                    order[position] = next;
                    next += 1;
                }
            }
            if !local.is_empty() {
                parts.push(shard.val().select(0, index(local)));
            }
        }
        let gathered = Tensor::cat(parts, 0);
        if order.iter().enumerate().all(|(i, &o)| o == i as i64) { gathered } else { gathered.select(0, index(order)) }
    }
}

/// Output projection `hidden → vocab` as vocabulary shards stored `(hidden, shard rows)`; the logits
/// are the shards' products side by side.
#[derive(Module, Debug)]
pub struct LmHeadShards {
    shards: Vec<Param<Tensor<2>>>,
    /// See [`Loader::with_threads`].
    threads: usize,
}

impl LmHeadShards {
    /// From the PyTorch weight `name` `(vocab, hidden)`.
    pub async fn load(l: &Loader<'_, '_>, name: &str, [vocab, hidden]: [usize; 2]) -> Result<Self> {
        let shards = l.row_shards(name, [vocab, hidden], true).await?;
        Ok(Self { shards: shards.into_iter().map(Param::from_tensor).collect(), threads: l.threads() })
    }

    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// `(S, hidden)` → `(S, vocab)`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        let parts: Vec<Tensor<2>> = self.shards.iter().map(|w| ops::matmul_par(hidden.clone(), w.val(), self.threads)).collect();
        if parts.len() == 1 { parts.into_iter().next().expect("one shard") } else { Tensor::cat(parts, 1) }
    }
}
