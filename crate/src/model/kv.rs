//! The decoder's key/value cache, and the attention of a decoding step over it on the host.
//!
//! On GPU backends a layer's keys and values are device tensors, extended by concatenation, or —
//! with the crate's GPU kernels — buffers written in place ([`crate::gpu::DeviceKv`]). On
//! the CPU backend (with the crate's host kernels) they live in host memory that grows in place:
//! a decoding step appends one row per head and its attention reads the cache where it lies.
//! Concatenating instead copies the whole cache every step (read and written once more, then made
//! contiguous again inside burn's attention): at a thousand cached positions that is as many bytes
//! as the step's q4 weights.

use burn::tensor::{Device, Tensor, TensorData};

use super::ops::{host_values, map_par};

/// Keys (after RoPE) and values of every layer for the tokens seen so far.
#[derive(Debug, Clone, Default)]
pub struct KvCache {
    pub(super) layers: Vec<Option<LayerKv>>,
    pub(super) len: usize,
}

impl KvCache {
    /// Number of cached positions (the position of the next token).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

/// One layer's keys and values.
#[derive(Debug, Clone)]
pub(super) enum LayerKv {
    /// `(1, kv_heads, T, head_dim)` each, on the device.
    Tensors(Tensor<4>, Tensor<4>),
    /// In host memory (the CPU backend).
    Host(HostKv),
    /// On the GPU, written in place and attended by the crate's kernels.
    Device(crate::gpu::DeviceKv),
}

impl LayerKv {
    /// The cache as `(1, kv_heads, T, head_dim)` tensors (for a chunk of several tokens).
    pub(super) fn tensors(self, device: &Device) -> (Tensor<4>, Tensor<4>) {
        match self {
            LayerKv::Tensors(k, v) => (k, v),
            LayerKv::Host(host) => host.tensors(device),
            LayerKv::Device(kv) => kv.prefix(),
        }
    }
}

/// Keys and values per KV head, `len × head_dim` floats each, position after position.
#[derive(Debug, Clone)]
pub(super) struct HostKv {
    head_dim: usize,
    len: usize,
    keys: Vec<Vec<f32>>,
    values: Vec<Vec<f32>>,
}

impl HostKv {
    /// From `(1, kv_heads, T, head_dim)` tensors (a prefill's keys and values).
    pub(super) fn from_tensors(k: Tensor<4>, v: Tensor<4>) -> Self {
        let [_, kv_heads, len, head_dim] = k.dims();
        let split = |t: Tensor<4>| -> Vec<Vec<f32>> { host_values(t).chunks_exact(len * head_dim).map(|head| head.to_vec()).collect() };
        let (keys, values) = (split(k), split(v));
        debug_assert_eq!(keys.len(), kv_heads);
        Self { head_dim, len, keys, values }
    }

    fn tensors(&self, device: &Device) -> (Tensor<4>, Tensor<4>) {
        let shape = [1, self.keys.len(), self.len, self.head_dim];
        let join = |heads: &[Vec<f32>]| Tensor::<4>::from_data(TensorData::new(heads.concat(), shape), device);
        (join(&self.keys), join(&self.values))
    }

    /// Appends one position: `k` and `v` are `kv_heads × head_dim` floats.
    pub(super) fn push(&mut self, k: &[f32], v: &[f32]) {
        for (head, (keys, values)) in self.keys.iter_mut().zip(self.values.iter_mut()).enumerate() {
            keys.extend_from_slice(&k[head * self.head_dim..(head + 1) * self.head_dim]);
            values.extend_from_slice(&v[head * self.head_dim..(head + 1) * self.head_dim]);
        }
        self.len += 1;
    }

    pub(super) fn kv_heads(&self) -> usize {
        self.keys.len()
    }

    /// Attention of one query head `q` (`head_dim` floats) over KV head `kv`: `softmax(q·Kᵀ/√d)·V`.
    fn attend_head(&self, q: &[f32], kv: usize) -> Vec<f32> {
        let d = self.head_dim;
        let scale = 1.0 / (d as f32).sqrt();
        let mut scores: Vec<f32> = self.keys[kv].chunks_exact(d).map(|k| dot(q, k) * scale).collect();
        let max = scores.iter().copied().fold(f32::NEG_INFINITY, f32::max);
        let mut sum = 0.0;
        for s in &mut scores {
            *s = (*s - max).exp();
            sum += *s;
        }
        let mut out = vec![0f32; d];
        for (p, v) in scores.iter().zip(self.values[kv].chunks_exact(d)) {
            let p = p / sum;
            for (o, v) in out.iter_mut().zip(v) {
                *o += p * v;
            }
        }
        out
    }
}

/// A decoding step's attention for B sequences: `q` is `B × heads × head_dim` floats (row i one
/// query token of sequence i, after RoPE), `caches[i]` that sequence's cache with the token's own
/// key and value appended. Returns `B × heads × head_dim` floats; query head h reads KV head
/// `h / (heads / kv_heads)` (transformers' `repeat_kv`). The B × heads products run on rayon's
/// threads (in order, so any thread count gives the same bits).
pub(super) fn attend(caches: &[&HostKv], q: &[f32], heads: usize) -> Vec<f32> {
    let d = caches.first().map_or(0, |c| c.head_dim);
    let pairs: Vec<(usize, usize)> = (0..caches.len()).flat_map(|b| (0..heads).map(move |h| (b, h))).collect();
    let outs = map_par(pairs, |(b, h)| {
        let cache = caches[b];
        let group = heads / cache.kv_heads();
        let at = (b * heads + h) * d;
        cache.attend_head(&q[at..at + d], h / group)
    });
    outs.concat()
}

/// `a · b` over 16 partial sums (so the compiler keeps them in SIMD lanes).
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut acc = [0f32; 16];
    let (ca, cb) = (a.chunks_exact(16), b.chunks_exact(16));
    let tail: f32 = ca.remainder().iter().zip(cb.remainder()).map(|(x, y)| x * y).sum();
    for (x, y) in ca.zip(cb) {
        for i in 0..16 {
            acc[i] += x[i] * y[i];
        }
    }
    acc.iter().sum::<f32>() + tail
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use burn::tensor::{Device, Distribution, Tensor};

    use super::{HostKv, attend};

    /// burn's attention of one query token over `(1, kv, T, d)` keys and values, KV heads repeated.
    fn reference(q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, heads: usize) -> Vec<f32> {
        let [_, kv, t, d] = k.dims();
        let repeat = |x: Tensor<4>| x.reshape([1, kv, 1, t, d]).expand([1, kv, heads / kv, t, d]).reshape([1, heads, t, d]);
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        attention(q, repeat(k), repeat(v), None, None, options).into_data().try_into_vec::<f32>().unwrap()
    }

    /// A cache built from a prefill and grown a row at a time attends like burn's attention over the
    /// concatenated tensors: any length (1 … 300), head size, grouped KV heads, several sequences.
    #[test]
    fn host_attention_equals_burn_attention() {
        let device = Device::flex();
        for (heads, kv, d, lengths) in [(4, 4, 16, vec![1, 7]), (10, 10, 128, vec![300, 3]), (6, 2, 24, vec![33, 1, 64]), (3, 1, 5, vec![2])] {
            let mut caches = Vec::new();
            let mut expected = Vec::new();
            let mut queries = Vec::new();
            let mut keys = Vec::new();
            for &len in &lengths {
                // A prefill of len − 1 positions, then the step's own key and value appended.
                let k = Tensor::<4>::random([1, kv, len, d], Distribution::Default, &device);
                let v = Tensor::<4>::random([1, kv, len, d], Distribution::Default, &device);
                let q = Tensor::<4>::random([1, heads, 1, d], Distribution::Default, &device);
                let mut cache = if len > 1 {
                    HostKv::from_tensors(k.clone().narrow(2, 0, len - 1), v.clone().narrow(2, 0, len - 1))
                } else {
                    HostKv { head_dim: d, len: 0, keys: vec![Vec::new(); kv], values: vec![Vec::new(); kv] }
                };
                let last = |t: &Tensor<4>| t.clone().narrow(2, len - 1, 1).into_data().try_into_vec::<f32>().unwrap();
                cache.push(&last(&k), &last(&v));
                assert_eq!(cache.len, len);
                expected.extend(reference(q.clone(), k.clone(), v, heads));
                keys.push(k);
                queries.extend(q.into_data().try_into_vec::<f32>().unwrap());
                caches.push(cache);
            }
            let refs: Vec<&HostKv> = caches.iter().collect();
            let got = attend(&refs, &queries, heads);
            assert_eq!(got.len(), expected.len());
            let err = got.iter().zip(&expected).map(|(a, b)| (a - b).abs()).fold(0f32, f32::max);
            assert!(err <= 2e-6, "heads {heads} kv {kv} d {d} lengths {lengths:?}: max error {err}");
            // Back to tensors: each cache holds exactly the keys put in.
            for (cache, k) in caches.iter().zip(keys) {
                assert_eq!(cache.tensors(&device).0.into_data(), k.into_data());
            }
        }
    }
}
