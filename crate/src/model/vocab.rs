//! Vocabulary-sized matrices (token embedding, lm_head) kept as row shards, each within the device's
//! largest binding: the real model's 129,280 × 1,280 tables are 632 MiB in f32, far beyond WebGPU's
//! default 128 MiB `maxStorageBufferBindingSize`. With no limit each is a single shard.
//! Quantized, each is one packed matrix instead (on the host for the CPU kernels, on the GPU for
//! the crate's GPU kernels): the embedding dequantizes only the rows it gathers, lm_head runs the
//! packed kernels.

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::tensor::{Device, Int, Tensor, TensorData};

use super::ops;
use crate::error::Result;
use crate::gpu::DevicePacked;
use crate::quant::PackedMatrix;
use crate::weights::Loader;

/// Token embedding table `(vocab, hidden)` as row shards; a lookup gathers rows shard by shard.
#[derive(Module, Debug)]
pub struct EmbeddingShards {
    shards: Vec<Param<Tensor<2>>>,
    rows_per_shard: usize,
    /// The table packed on the host (then `shards` is empty).
    #[module(skip)]
    packed: Option<Arc<PackedMatrix>>,
    /// The table packed on the GPU (then `shards` is empty).
    #[module(skip)]
    on_gpu: Option<DevicePacked>,
}

impl EmbeddingShards {
    pub async fn load(l: &Loader<'_, '_>, name: &str, [vocab, hidden]: [usize; 2]) -> Result<Self> {
        let packed = Self { shards: Vec::new(), rows_per_shard: vocab, packed: None, on_gpu: None };
        if let Some(table) = l.packed_on_host(name, [vocab, hidden]).await? {
            return Ok(Self { packed: Some(Arc::new(table)), ..packed });
        }
        if let Some(table) = l.packed_on_device(name, [vocab, hidden]).await? {
            return Ok(Self { on_gpu: Some(table), ..packed });
        }
        let shards = l.row_shards(name, [vocab, hidden], false).await?;
        let rows_per_shard = shards[0].dims()[0];
        Ok(Self { shards: shards.into_iter().map(Param::from_tensor).collect(), rows_per_shard, packed: None, on_gpu: None })
    }

    pub fn shard_count(&self) -> usize {
        self.on_gpu.as_ref().map_or(self.shards.len().max(1), DevicePacked::shard_count)
    }

    /// The rows of `ids` (all below the vocabulary size), in order: `(ids.len(), hidden)`.
    pub fn rows(&self, ids: &[u32], device: &Device) -> Tensor<2> {
        if let Some(packed) = &self.packed {
            let cols = packed.cols;
            let mut values = vec![0f32; ids.len() * cols];
            for (row, &id) in values.chunks_mut(cols).zip(ids) {
                packed.dequantize_row(id as usize, row);
            }
            return Tensor::from_data(TensorData::new(values, [ids.len(), cols]), device);
        }
        let index = |rows: Vec<i64>| {
            let n = rows.len();
            Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), device)
        };
        if let Some(table) = &self.on_gpu {
            return table.rows_of(index(ids.iter().map(|&i| i as i64).collect()));
        }
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
    /// The projection packed on the host or the GPU (then `shards` is empty).
    packed: Option<crate::quant::QLinear>,
}

impl LmHeadShards {
    /// From the PyTorch weight `name` `(vocab, hidden)`.
    pub async fn load(l: &Loader<'_, '_>, name: &str, [vocab, hidden]: [usize; 2]) -> Result<Self> {
        if let Some(packed) = l.packed_on_host(name, [vocab, hidden]).await? {
            let head = crate::quant::QLinear::packed(packed, None, l.threads());
            return Ok(Self { shards: Vec::new(), threads: l.threads(), packed: Some(head) });
        }
        if let Some(packed) = l.packed_on_device(name, [vocab, hidden]).await? {
            return Ok(Self { shards: Vec::new(), threads: 1, packed: Some(crate::quant::QLinear::on_device(packed, None)) });
        }
        let shards = l.row_shards(name, [vocab, hidden], true).await?;
        Ok(Self { shards: shards.into_iter().map(Param::from_tensor).collect(), threads: l.threads(), packed: None })
    }

    pub fn shard_count(&self) -> usize {
        self.packed.as_ref().and_then(|head| head.device_weight()).map_or(self.shards.len().max(1), DevicePacked::shard_count)
    }

    /// `(S, hidden)` → `(S, vocab)`.
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        if let Some(head) = &self.packed {
            return head.forward(hidden);
        }
        let parts: Vec<Tensor<2>> = self.shards.iter().map(|w| ops::matmul_par(hidden.clone(), w.val(), self.threads)).collect();
        if parts.len() == 1 { parts.into_iter().next().expect("one shard") } else { Tensor::cat(parts, 1) }
    }
}
