//! DeepSeek-V2-style language model, MHA variant (reference: `DeepseekV2Model` / `DeepseekV2ForCausalLM`
//! with `use_mla = false`, i.e. transformers' `LlamaAttention`; checkpoint `model.embed_tokens`,
//! `model.layers.*`, `model.norm`, `lm_head`; spec §6).

use burn::module::Module;
use burn::nn::RmsNormConfig;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::kv::{HostKv, KvCache, LayerKv, attend};
use super::moe::{Mlp, Moe};
use super::ops::{Norm, host_values};
use super::vocab::{EmbeddingShards, LmHeadShards};
use crate::config::DecoderConfig;
use crate::error::{Error, Result};
use crate::gpu::DeviceKv;
use crate::quant::QLinear;
use crate::weights::Loader;

#[derive(Module, Debug)]
pub struct Decoder {
    embed_tokens: EmbeddingShards,
    layers: Vec<DecoderLayer>,
    norm: Norm,
    lm_head: LmHeadShards,
    #[module(skip)]
    rope: Rope,
    vocab_size: usize,
    max_positions: usize,
    /// Greedy choices on the device ([`crate::gpu::greedy`]): the crate's GPU kernels are on.
    picks_on_device: bool,
}

#[derive(Module, Debug)]
struct DecoderLayer {
    input_layernorm: Norm,
    self_attn: SelfAttention,
    post_attention_layernorm: Norm,
    /// Layers before `first_k_dense_replace` (and off `moe_layer_freq`) use a dense MLP …
    mlp: Option<Mlp>,
    /// … the others the mixture of experts.
    moe: Option<Moe>,
}

#[derive(Module, Debug)]
struct SelfAttention {
    /// The input projections, separate …
    q_proj: Option<QLinear>,
    k_proj: Option<QLinear>,
    v_proj: Option<QLinear>,
    /// … or, on the GPU kernels' path (`fused`), one product whose output rows hold the queries,
    /// keys and values side by side.
    qkv_proj: Option<QLinear>,
    o_proj: QLinear,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    /// Keys and values in host memory, decoding steps attending there ([`super::kv`]; the CPU backend).
    host_cache: bool,
    /// The GPU kernels' path: one projection for queries, keys and values, RoPE and the cache's
    /// writes in one dispatch and a decoding step's attention in another ([`DeviceKv`]).
    fused: bool,
}

/// Rotate-half ("NeoX") rotary embedding: `inv_freq[i] = θ^(−2i/d)` (spec §6.3).
#[derive(Debug, Clone)]
pub(super) struct Rope {
    inv_freq: Vec<f32>,
}

impl Decoder {
    pub async fn load(c: &DecoderConfig, l: &Loader<'_, '_>) -> Result<Self> {
        let h = c.hidden_size;
        let mut layers = Vec::with_capacity(c.num_hidden_layers);
        for n in 0..c.num_hidden_layers {
            let p = format!("model.layers.{n}");
            let (q_out, kv_out) = (c.num_attention_heads * c.head_dim, c.num_key_value_heads * c.head_dim);
            let projection = |name: &str| format!("{p}.self_attn.{name}");
            let (mut q_proj, mut k_proj, mut v_proj, mut qkv_proj) = (None, None, None, None);
            let names = [projection("q_proj"), projection("k_proj"), projection("v_proj")];
            // For the crate's kernels (GPU, or packed on the host) the three are one product: one
            // pass over the weights' launches or threads, one quantization of the input (the same
            // numbers: every output row is its own dot product).
            if l.stacks_for_kernels(&names) {
                qkv_proj = Some(l.qlinear_concat(&names, h, &[q_out, kv_out, kv_out]).await?);
            } else {
                q_proj = Some(l.qlinear(&projection("q_proj"), h, q_out, false).await?);
                k_proj = Some(l.qlinear(&projection("k_proj"), h, kv_out, false).await?);
                v_proj = Some(l.qlinear(&projection("v_proj"), h, kv_out, false).await?);
            }
            let (mlp, moe) = if c.is_moe_layer(n) {
                (None, Some(Moe::load(c, l, &format!("{p}.mlp")).await?))
            } else {
                (Some(Mlp::load(l, &format!("{p}.mlp"), h, c.intermediate_size).await?), None)
            };
            layers.push(DecoderLayer {
                input_layernorm: rms_norm(l, &format!("{p}.input_layernorm.weight"), h, c.rms_norm_eps).await?,
                self_attn: SelfAttention {
                    q_proj,
                    k_proj,
                    v_proj,
                    qkv_proj,
                    o_proj: l.qlinear(&format!("{p}.self_attn.o_proj"), q_out, h, false).await?,
                    heads: c.num_attention_heads,
                    kv_heads: c.num_key_value_heads,
                    head_dim: c.head_dim,
                    host_cache: l.host_kernels(),
                    fused: l.device_kernels(),
                },
                post_attention_layernorm: rms_norm(l, &format!("{p}.post_attention_layernorm.weight"), h, c.rms_norm_eps).await?,
                mlp,
                moe,
            });
        }
        let embed_tokens = EmbeddingShards::load(l, "model.embed_tokens.weight", [c.vocab_size, h]).await?;
        let lm_head_name = if c.tie_word_embeddings { "model.embed_tokens" } else { "lm_head" };
        Ok(Self {
            embed_tokens,
            layers,
            norm: rms_norm(l, "model.norm.weight", h, c.rms_norm_eps).await?,
            lm_head: LmHeadShards::load(l, &format!("{lm_head_name}.weight"), [c.vocab_size, h]).await?,
            rope: Rope::new(c.head_dim, c.rope_theta),
            vocab_size: c.vocab_size,
            max_positions: c.max_position_embeddings,
            picks_on_device: l.device_kernels(),
        })
    }

    /// How many row shards the embedding and lm_head were split into (1 and 1 without a binding limit).
    pub fn vocab_shards(&self) -> (usize, usize) {
        (self.embed_tokens.shard_count(), self.lm_head.shard_count())
    }

    pub fn vocab_size(&self) -> usize {
        self.vocab_size
    }

    /// Whether a greedy decoding loop should choose tokens on the device ([`crate::gpu::greedy`]:
    /// a step then reads back its choice, not the vocabulary's logits).
    pub fn picks_on_device(&self) -> bool {
        self.picks_on_device
    }

    /// Positions the model has (`max_position_embeddings`).
    pub fn max_positions(&self) -> usize {
        self.max_positions
    }

    /// Token embeddings `(S, hidden)`; ids outside the vocabulary are an error.
    pub fn embed(&self, ids: &[u32], device: &Device) -> Result<Tensor<2>> {
        if let Some(&id) = ids.iter().find(|&&id| id as usize >= self.vocab_size) {
            return Err(Error::TokenOutOfRange { id, vocab_size: self.vocab_size });
        }
        Ok(self.embed_tokens.rows(ids, device))
    }

    /// Embeddings of a prompt with the image vectors `(N, hidden)` written, in order, over the
    /// positions holding `image_token` (the reference's masked scatter). The counts must agree.
    pub fn embed_prompt(&self, ids: &[u32], image_token: u32, images: Option<Tensor<2>>, device: &Device) -> Result<Tensor<2>> {
        let embeds = self.embed(ids, device)?;
        let placeholders = ids.iter().filter(|&&t| t == image_token).count();
        let vectors = images.as_ref().map_or(0, |t| t.dims()[0]);
        if placeholders != vectors {
            return Err(Error::ImageTokenMismatch { placeholders, vectors });
        }
        let Some(images) = images else { return Ok(embeds) };
        let d = embeds.dims()[1];
        let mut embeds = embeds;
        let mut next = 0;
        let mut i = 0;
        while i < ids.len() {
            if ids[i] != image_token {
                i += 1;
                continue;
            }
            let start = i;
            while i < ids.len() && ids[i] == image_token {
                i += 1;
            }
            let run = i - start;
            embeds = embeds.slice_assign([start..i, 0..d], images.clone().slice([next..next + run, 0..d]));
            next += run;
        }
        Ok(embeds)
    }

    /// Runs `x` `(S, hidden)` at positions `cache.len() ..` through every layer, appending to the
    /// cache; returns the final-normed hidden states `(S, hidden)`.
    pub async fn forward(&self, x: Tensor<2>, cache: &mut KvCache) -> Result<Tensor<2>> {
        let [s, d] = x.dims();
        let start = cache.len;
        if start + s > self.max_positions {
            return Err(Error::ContextOverflow { length: start + s, limit: self.max_positions });
        }
        if cache.layers.len() != self.layers.len() {
            cache.layers = vec![None; self.layers.len()];
        }
        let device = x.device();
        let (cos, sin) = self.rope.cos_sin(start, s, &device);
        let positions = Positions { cos, sin, start };
        let mut x = x.reshape([1, s, d]);
        for (layer, entry) in self.layers.iter().zip(cache.layers.iter_mut()) {
            x = layer.forward(x, &positions, entry).await?;
        }
        cache.len = start + s;
        Ok(self.norm.forward(x).reshape([s, d]))
    }

    /// One new token for each of B sequences: row i of `x` `(B, hidden)` is the embedding of sequence
    /// i's next token, at position `caches[i].len()`. The projections, MLPs and experts run once over
    /// all B rows (each weight is read once for the batch: decoding is bound by those reads); attention
    /// runs per sequence on its own cache. Returns the final-normed hidden states `(B, hidden)`, what B
    /// separate [`Decoder::forward`] calls give.
    pub async fn step_batch(&self, x: Tensor<2>, caches: &mut [&mut KvCache]) -> Result<Tensor<2>> {
        let [b, d] = x.dims();
        if b != caches.len() || b == 0 {
            return Err(Error::InvalidArgument(format!("{b} token rows for {} caches", caches.len())));
        }
        for cache in caches.iter_mut() {
            if cache.len + 1 > self.max_positions {
                return Err(Error::ContextOverflow { length: cache.len + 1, limit: self.max_positions });
            }
            if cache.layers.len() != self.layers.len() {
                cache.layers = vec![None; self.layers.len()];
            }
        }
        let positions: Vec<usize> = caches.iter().map(|c| c.len).collect();
        let (cos, sin) = self.rope.table(positions.iter().copied(), &x.device());
        let mut x = x.reshape([b, 1, d]);
        for (l, layer) in self.layers.iter().enumerate() {
            let mut entries: Vec<&mut Option<LayerKv>> = caches.iter_mut().map(|c| &mut c.layers[l]).collect();
            let h = layer.self_attn.forward_rows(layer.input_layernorm.forward(x.clone()), x, &cos, &sin, &mut entries);
            x = layer.mlp_residual(h).await?;
        }
        for cache in caches.iter_mut() {
            cache.len += 1;
        }
        Ok(self.norm.forward(x).reshape([b, d]))
    }

    /// Logits `(S, vocab)` of final hidden states (f32).
    pub fn logits(&self, hidden: Tensor<2>) -> Tensor<2> {
        self.lm_head.logits(hidden)
    }
}

pub(super) async fn rms_norm(l: &Loader<'_, '_>, name: &str, d: usize, eps: f64) -> Result<Norm> {
    let mut norm = RmsNormConfig::new(d).with_epsilon(eps).init(l.device());
    norm.gamma = l.param(name, [d]).await?;
    Ok(Norm::new(norm, l.device_kernels()))
}

/// Where a forward chunk sits: its first position and the RoPE tables of its positions.
struct Positions {
    cos: Tensor<2>,
    sin: Tensor<2>,
    start: usize,
}

impl DecoderLayer {
    async fn forward(&self, x: Tensor<3>, positions: &Positions, cache: &mut Option<LayerKv>) -> Result<Tensor<3>> {
        let h = self.self_attn.forward(self.input_layernorm.forward(x.clone()), x, positions, cache);
        self.mlp_residual(h).await
    }

    /// `h + mlp(norm(h))`: the layer's second half (dense MLP or experts), row by row.
    async fn mlp_residual(&self, h: Tensor<3>) -> Result<Tensor<3>> {
        let u = self.post_attention_layernorm.forward(h.clone());
        let [b, s, d] = u.dims();
        let rows = |t: Tensor<3>| t.reshape([b * s, d]);
        let y = match (&self.mlp, &self.moe) {
            (Some(mlp), _) => mlp.forward_add(rows(u), rows(h)),
            (None, Some(moe)) => moe.forward_add(rows(u), rows(h)).await?,
            (None, None) => unreachable!("every layer is built with a dense MLP or a MoE"),
        };
        Ok(y.reshape([b, s, d]))
    }
}

impl SelfAttention {
    /// `residual + attention(x)` (`x` the normalised hidden states, `residual` the layer's input).
    fn forward(&self, x: Tensor<3>, residual: Tensor<3>, positions: &Positions, cache: &mut Option<LayerKv>) -> Tensor<3> {
        if self.fused {
            return self.forward_fused(x, residual, positions, cache);
        }
        let Positions { cos, sin, start } = positions;
        let start = *start;
        let [b, s, _] = x.dims();
        let hd = self.head_dim;
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, hd]).swap_dims(1, 2);
        // One table row per position (B = 1).
        let (q, k, v) = self.separate(x);
        let (q, k, v) = (self.rotated(q, self.heads, cos, sin), self.rotated(k, self.kv_heads, cos, sin), split(v, self.kv_heads));
        if let (1, Some(LayerKv::Host(host))) = (s, cache.as_mut()) {
            return residual + self.attend_on_host(q, k, v, &mut [host]);
        }
        let (k, v) = self.extend(cache, k, v);
        let out = self.attend_chunk(q, k, v, start);
        residual + self.o_proj.forward(out.swap_dims(1, 2).reshape([b, s, self.heads * hd]))
    }

    /// burn's attention of a chunk of queries `q` `(B, heads, S, head_dim)` at positions `start ..`
    /// over all keys and values so far `(B, kv_heads, start + S, head_dim)`, causal within the chunk.
    fn attend_chunk(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, start: usize) -> Tensor<4> {
        let [b, _, s, _] = q.dims();
        let total = start + s;
        let (k, v) = (repeat_kv(k, self.heads), repeat_kv(v, self.heads));
        let (mask, is_causal) = match (s, start) {
            (1, _) => (None, false),
            (_, 0) => (None, true),
            // A chunk after cached tokens: query i (position start + i) sees keys 0 ..= start + i.
            _ => (Some(causal_mask(s, start, total, b, self.heads, &q.device())), false),
        };
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal };
        attention(q, k, v, mask, None, options)
    }

    /// The GPU kernels' path of [`SelfAttention::forward`] (`x` `(1, S, hidden)`): RoPE on the
    /// projections' rows, the new keys and values written into the layer's [`DeviceKv`], one token
    /// attending there in one dispatch; a prefill chunk runs burn's attention (over the cache when
    /// it follows cached tokens).
    fn forward_fused(&self, x: Tensor<3>, residual: Tensor<3>, positions: &Positions, cache: &mut Option<LayerKv>) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let width = self.heads * self.head_dim;
        let (kv, q) = self.append(cache, self.qkv_rows(x), positions.cos.clone(), positions.sin.clone());
        let out = if s == 1 {
            kv.attend(q, self.heads)
        } else {
            // A prefill chunk: burn's attention over every position so far (from the cache).
            let (k, v) = kv.prefix();
            let q = q.reshape([1, s, self.heads, self.head_dim]).swap_dims(1, 2);
            self.attend_chunk(q, k, v, positions.start).swap_dims(1, 2).reshape([s, width])
        };
        *cache = Some(LayerKv::Device(kv));
        self.o_proj.forward_add(out.reshape([b, s, width]), residual)
    }

    /// [`SelfAttention::forward_rows`] on the GPU kernels' path: each sequence's row appended to
    /// its cache and attending there.
    fn forward_rows_fused(&self, x: Tensor<3>, residual: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>, caches: &mut [&mut Option<LayerKv>]) -> Tensor<3> {
        let [b, _, _] = x.dims();
        let qkv = self.qkv_rows(x);
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let row = |t: &Tensor<2>| t.clone().narrow(0, i, 1);
            let (kv, q) = self.append(cache, row(&qkv), row(cos), row(sin));
            outs.push(kv.attend(q, self.heads));
            **cache = Some(LayerKv::Device(kv));
        }
        self.o_proj.forward_add(Tensor::cat(outs, 0).reshape([b, 1, self.heads * self.head_dim]), residual)
    }

    /// The fused projection of `x` `(B, S, hidden)` as rows `(B · S, (heads + 2·kv_heads) · head_dim)`.
    fn qkv_rows(&self, x: Tensor<3>) -> Tensor<2> {
        let [b, s, _] = x.dims();
        let qkv = self.qkv_proj.as_ref().expect("the fused path has the fused projection").forward(x);
        let width = qkv.dims()[2];
        qkv.reshape([b * s, width])
    }

    /// The separate projections of `x` (queries, keys, values).
    fn separate(&self, x: Tensor<3>) -> (Tensor<3>, Tensor<3>, Tensor<3>) {
        if let Some(qkv) = &self.qkv_proj {
            let y = qkv.forward(x);
            let [b, s, _] = y.dims();
            let (q, kv) = (self.heads * self.head_dim, self.kv_heads * self.head_dim);
            let part = |cols: std::ops::Range<usize>| y.clone().slice([0..b, 0..s, cols]);
            return (part(0..q), part(q..q + kv), part(q + kv..q + 2 * kv));
        }
        match (&self.q_proj, &self.k_proj, &self.v_proj) {
            (Some(q), Some(k), Some(v)) => (q.forward(x.clone()), k.forward(x.clone()), v.forward(x)),
            _ => unreachable!("separate projections unless the fused path was loaded"),
        }
    }

    /// A layer's [`DeviceKv`] (`None` before its first chunk) with the rows `qkv` appended (keys
    /// rotated by RoPE, `cos`/`sin` a row per position), and the rotated queries.
    fn append(&self, cache: &mut Option<LayerKv>, qkv: Tensor<2>, cos: Tensor<2>, sin: Tensor<2>) -> (DeviceKv, Tensor<2>) {
        let held = match cache.take() {
            Some(LayerKv::Device(kv)) => Some(kv),
            None => None,
            Some(_) => unreachable!("a layer's cache is filled by one path, fixed when the model is loaded"),
        };
        DeviceKv::append(held, qkv, cos, sin, self.heads, self.kv_heads, self.head_dim)
    }
}

impl SelfAttention {
    /// A projection's output `(B, S, heads · head_dim)` split into heads `(B, heads, S, head_dim)`
    /// and rotated; `cos`/`sin` `(B · S, head_dim)` hold each row's position (B = 1 or S = 1).
    fn rotated(&self, t: Tensor<3>, heads: usize, cos: &Tensor<2>, sin: &Tensor<2>) -> Tensor<4> {
        let [b, s, _] = t.dims();
        let hd = self.head_dim;
        // The tables broadcast over heads: (1, 1, S, d) for one sequence, (B, 1, 1, d) for B rows.
        let table = |t: &Tensor<2>| if b == 1 { t.clone().reshape([1, 1, s, hd]) } else { t.clone().reshape([b, 1, 1, hd]) };
        rotate(t.reshape([b, s, heads, hd]).swap_dims(1, 2), &table(cos), &table(sin))
    }

    /// [`SelfAttention::forward`] (with its residual) for B sequences of one new token each: `x` `(B, 1, hidden)`, row i
    /// at the position whose RoPE row is `cos[i]`/`sin[i]`, attending over `caches[i]` (extended).
    fn forward_rows(&self, x: Tensor<3>, residual: Tensor<3>, cos: &Tensor<2>, sin: &Tensor<2>, caches: &mut [&mut Option<LayerKv>]) -> Tensor<3> {
        if self.fused {
            return self.forward_rows_fused(x, residual, cos, sin, caches);
        }
        let [b, _, _] = x.dims();
        let hd = self.head_dim;
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, 1, heads, hd]).swap_dims(1, 2);
        // One RoPE row per sequence.
        let (q, k, v) = self.separate(x);
        let (q, k, v) = (self.rotated(q, self.heads, cos, sin), self.rotated(k, self.kv_heads, cos, sin), split(v, self.kv_heads));
        let hosts: Option<Vec<&mut HostKv>> = caches
            .iter_mut()
            .map(|c| match &mut **c {
                Some(LayerKv::Host(host)) => Some(host),
                _ => None,
            })
            .collect();
        if let Some(mut hosts) = hosts {
            return residual + self.attend_on_host(q, k, v, &mut hosts);
        }
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        let mut outs = Vec::with_capacity(b);
        for (i, cache) in caches.iter_mut().enumerate() {
            let (ki, vi) = self.extend(cache, k.clone().narrow(0, i, 1), v.clone().narrow(0, i, 1));
            let (ki, vi) = (repeat_kv(ki, self.heads), repeat_kv(vi, self.heads));
            outs.push(attention(q.clone().narrow(0, i, 1), ki, vi, None, None, options));
        }
        let out = Tensor::cat(outs, 0);
        residual + self.o_proj.forward(out.swap_dims(1, 2).reshape([b, 1, self.heads * hd]))
    }

    /// Appends `k`, `v` `(1, kv_heads, S, head_dim)` to a layer's cache as tensors (the cache keeps
    /// them on the host with `host_cache`); returns all the layer's keys and values so far.
    fn extend(&self, cache: &mut Option<LayerKv>, k: Tensor<4>, v: Tensor<4>) -> (Tensor<4>, Tensor<4>) {
        let (k, v) = match cache.take() {
            Some(cached) => {
                let (pk, pv) = cached.tensors(&k.device());
                (Tensor::cat(vec![pk, k], 2), Tensor::cat(vec![pv, v], 2))
            }
            None => (k, v),
        };
        *cache = Some(if self.host_cache { LayerKv::Host(HostKv::from_tensors(k.clone(), v.clone())) } else { LayerKv::Tensors(k.clone(), v.clone()) });
        (k, v)
    }

    /// One token per sequence on the host: `q` `(B, heads, 1, d)`, `k`/`v` `(B, kv_heads, 1, d)` are
    /// appended to `caches[i]`, attention runs there ([`attend`]), then `o_proj`: `(B, 1, hidden)`.
    fn attend_on_host(&self, q: Tensor<4>, k: Tensor<4>, v: Tensor<4>, caches: &mut [&mut HostKv]) -> Tensor<3> {
        let b = caches.len();
        let device = q.device();
        let (q, k, v) = (host_values(q), host_values(k), host_values(v));
        let row = self.kv_heads * self.head_dim;
        for (i, cache) in caches.iter_mut().enumerate() {
            cache.push(&k[i * row..(i + 1) * row], &v[i * row..(i + 1) * row]);
        }
        let caches: Vec<&HostKv> = caches.iter().map(|c| &**c).collect();
        let out = attend(&caches, &q, self.heads);
        self.o_proj.forward(Tensor::<3>::from_data(TensorData::new(out, [b, 1, self.heads * self.head_dim]), &device))
    }
}

/// `x · cos + rotate_half(x) · sin` with `rotate_half([x₁, x₂]) = [−x₂, x₁]`; `x` is `(B, H, S, d)`,
/// `cos` and `sin` broadcast to it (`(1, 1, S, d)`: one table for the batch; `(B, 1, 1, d)`: a row each).
pub(super) fn rotate(x: Tensor<4>, cos: &Tensor<4>, sin: &Tensor<4>) -> Tensor<4> {
    let [b, h, s, d] = x.dims();
    let half = d / 2;
    let x1 = x.clone().slice([0..b, 0..h, 0..s, 0..half]);
    let x2 = x.clone().slice([0..b, 0..h, 0..s, half..d]);
    let rotated = Tensor::cat(vec![x2.neg(), x1], 3);
    x * cos.clone() + rotated * sin.clone()
}

/// Repeats each of the KV heads `heads / kv_heads` times (transformers' `repeat_kv`).
pub(super) fn repeat_kv(x: Tensor<4>, heads: usize) -> Tensor<4> {
    let [b, kv, t, d] = x.dims();
    if kv == heads {
        return x;
    }
    let rep = heads / kv;
    x.reshape([b, kv, 1, t, d]).expand([b, kv, rep, t, d]).reshape([b, heads, t, d])
}

fn causal_mask(s: usize, start: usize, total: usize, b: usize, heads: usize, device: &Device) -> Tensor<4, Bool> {
    let values: Vec<bool> = (0..s).flat_map(|i| (0..total).map(move |j| j > start + i)).collect();
    Tensor::<2, Bool>::from_data(TensorData::new(values, [s, total]), device)
        .reshape([1, 1, s, total])
        .expand([b, heads, s, total])
}

impl Rope {
    /// `inv_freq[i] = θ^(−2i/d)` for a head size `d`.
    pub(super) fn new(head_dim: usize, theta: f64) -> Self {
        Self { inv_freq: (0..head_dim / 2).map(|i| (1.0 / theta.powf((2 * i) as f64 / head_dim as f64)) as f32).collect() }
    }

    /// `cos`, `sin` of `(S, d)` for positions `start .. start + S` (angles in f32 like the reference).
    pub(super) fn cos_sin(&self, start: usize, len: usize, device: &Device) -> (Tensor<2>, Tensor<2>) {
        self.table(start..start + len, device)
    }

    /// `cos`, `sin` of `(N, d)`, one row per position given.
    fn table(&self, positions: impl ExactSizeIterator<Item = usize>, device: &Device) -> (Tensor<2>, Tensor<2>) {
        let half = self.inv_freq.len();
        let d = 2 * half;
        let len = positions.len();
        let mut cos = Vec::with_capacity(len * d);
        let mut sin = Vec::with_capacity(len * d);
        for pos in positions {
            let angles: Vec<f32> = self.inv_freq.iter().map(|&f| pos as f32 * f).collect();
            for _ in 0..2 {
                cos.extend(angles.iter().map(|&a| (a as f64).cos() as f32));
                sin.extend(angles.iter().map(|&a| (a as f64).sin() as f32));
            }
        }
        (
            Tensor::from_data(TensorData::new(cos, [len, d]), device),
            Tensor::from_data(TensorData::new(sin, [len, d]), device),
        )
    }
}
