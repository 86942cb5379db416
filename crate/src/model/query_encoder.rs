//! DeepSeek-OCR-2's encoder after SAM: a Qwen2 body fed with SAM's compressed tokens followed by as many
//! learned queries (reference: `deepencoderv2.Qwen2Decoder2Encoder` over `CustomQwen2Decoder`,
//! checkpoint `model.qwen2_model.*`; spec §11).
//!
//! The attention mask is what makes it "visual causal flow": image tokens attend to every image token
//! and to no query; query `i` attends to every image token and to queries `0..=i`. Positions run
//! `0 .. 2n` over both (RoPE, θ = 10⁶). Only the queries' outputs leave the encoder.

use burn::module::{Module, Param};
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Bool, Device, Tensor, TensorData};

use super::decoder::{Rope, repeat_kv, rms_norm, rotate};
use super::moe::Mlp;
use super::ops::Norm;
use super::profile::span;
use crate::config::QueryEncoderConfig;
use crate::error::{Error, Result};
use crate::quant::QLinear;
use crate::weights::Loader;

#[derive(Module, Debug)]
pub struct QueryEncoder {
    layers: Vec<QueryLayer>,
    norm: Norm,
    /// Learned queries by view side (`query_768`, `query_1024`), one row per image token.
    queries: Vec<Param<Tensor<2>>>,
    #[module(skip)]
    query_sides: Vec<usize>,
    #[module(skip)]
    rope: Rope,
}

#[derive(Module, Debug)]
struct QueryLayer {
    input_layernorm: Norm,
    q_proj: QLinear,
    k_proj: QLinear,
    v_proj: QLinear,
    o_proj: QLinear,
    post_attention_layernorm: Norm,
    mlp: Mlp,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
}

/// Which tokens a position may attend to: `true` = masked (burn's convention).
/// Image tokens `0..n` see `0..n`; query `n + i` sees `0..n` and `n..=n + i`.
pub fn flow_mask(n: usize) -> Vec<bool> {
    (0..2 * n).flat_map(|i| (0..2 * n).map(move |j| if i < n { j >= n } else { j > i })).collect()
}

impl QueryEncoder {
    pub async fn load(c: &QueryEncoderConfig, l: &Loader<'_, '_>) -> Result<Self> {
        let p = "model.qwen2_model.model.model";
        let (w, eps) = (c.hidden_size, c.rms_norm_eps);
        let (q_out, kv_out) = (c.heads * c.head_dim, c.kv_heads * c.head_dim);
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let n = format!("{p}.layers.{i}");
            layers.push(QueryLayer {
                input_layernorm: rms_norm(l, &format!("{n}.input_layernorm.weight"), w, eps).await?,
                q_proj: l.qlinear(&format!("{n}.self_attn.q_proj"), w, q_out, true).await?,
                k_proj: l.qlinear(&format!("{n}.self_attn.k_proj"), w, kv_out, true).await?,
                v_proj: l.qlinear(&format!("{n}.self_attn.v_proj"), w, kv_out, true).await?,
                o_proj: l.qlinear(&format!("{n}.self_attn.o_proj"), q_out, w, false).await?,
                post_attention_layernorm: rms_norm(l, &format!("{n}.post_attention_layernorm.weight"), w, eps).await?,
                mlp: Mlp::load(l, &format!("{n}.mlp"), w, c.intermediate_size).await?,
                heads: c.heads,
                kv_heads: c.kv_heads,
                head_dim: c.head_dim,
            });
        }
        let mut queries = Vec::new();
        for (side, count) in c.query_sets {
            queries.push(l.param(&format!("model.qwen2_model.query_{side}.weight"), [count, w]).await?);
        }
        Ok(Self {
            layers,
            norm: rms_norm(l, &format!("{p}.norm.weight"), w, eps).await?,
            queries,
            query_sides: c.query_sets.iter().map(|&(side, _)| side).collect(),
            rope: Rope::new(c.head_dim, c.rope_theta),
        })
    }

    /// `(B, C, g, g)` compressed SAM features → the query outputs `(B, g², C)`. A grid with no
    /// learned query set (the official code has 144 = 12² for 768 views and 256 = 16² for 1024) is
    /// an error.
    pub fn forward(&self, compressed: Tensor<4>) -> Result<Tensor<3>> {
        self.run(compressed, flow_mask)
    }

    /// The same forward with a plain causal mask instead of the official one: what ports that lose
    /// the mask compute (for the test that shows the mask matters).
    #[doc(hidden)]
    pub fn forward_causal(&self, compressed: Tensor<4>) -> Result<Tensor<3>> {
        self.run(compressed, |n| (0..2 * n).flat_map(|i| (0..2 * n).map(move |j| j > i)).collect())
    }

    fn run(&self, compressed: Tensor<4>, mask: impl Fn(usize) -> Vec<bool>) -> Result<Tensor<3>> {
        let [b, c, gh, gw] = compressed.dims();
        let n = gh * gw;
        let Some(set) = self.queries.iter().position(|q| q.dims()[0] == n) else {
            let known: Vec<String> = self.query_sides.iter().zip(&self.queries).map(|(s, q)| format!("{} for {s}-pixel views", q.dims()[0])).collect();
            return Err(Error::Unsupported(format!("DeepSeek-OCR-2 has no learned queries for {n} image tokens (it has {})", known.join(", "))));
        };
        let device: Device = compressed.device();
        let tokens = compressed.reshape([b, c, n]).swap_dims(1, 2);
        let queries = self.queries[set].val().unsqueeze_dim::<3>(0).expand([b, n, c]);
        let mut x = Tensor::cat(vec![tokens, queries], 1);
        let (cos, sin) = self.rope.cos_sin(0, 2 * n, &device);
        let d = cos.dims()[1];
        let (cos, sin) = (cos.reshape([1, 1, 2 * n, d]), sin.reshape([1, 1, 2 * n, d]));
        let mask = Tensor::<2, Bool>::from_data(TensorData::new(mask(n), [2 * n, 2 * n]), &device);
        for layer in &self.layers {
            x = layer.forward(x, &cos, &sin, &mask);
        }
        let x = span("Qwen2 norm", || self.norm.forward(x));
        Ok(x.slice([0..b, n..2 * n, 0..c]))
    }
}

impl QueryLayer {
    fn forward(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<2, Bool>) -> Tensor<3> {
        let u = self.input_layernorm.forward(x.clone());
        let h = x + span("Qwen2 attention", || self.attention(u, cos, sin, mask));
        let u = self.post_attention_layernorm.forward(h.clone());
        h + span("Qwen2 MLP", || self.mlp.forward(u))
    }

    fn attention(&self, x: Tensor<3>, cos: &Tensor<4>, sin: &Tensor<4>, mask: &Tensor<2, Bool>) -> Tensor<3> {
        let [b, s, _] = x.dims();
        let hd = self.head_dim;
        let split = |t: Tensor<3>, heads: usize| t.reshape([b, s, heads, hd]).swap_dims(1, 2);
        let q = rotate(split(self.q_proj.forward(x.clone()), self.heads), cos, sin);
        let k = rotate(split(self.k_proj.forward(x.clone()), self.kv_heads), cos, sin);
        let v = split(self.v_proj.forward(x), self.kv_heads);
        let (k, v) = (repeat_kv(k, self.heads), repeat_kv(v, self.heads));
        let mask = mask.clone().reshape([1, 1, s, s]).expand([b, self.heads, s, s]);
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        let out = attention(q, k, v, Some(mask), None, options);
        self.o_proj.forward(out.swap_dims(1, 2).reshape([b, s, self.heads * hd]))
    }
}

#[cfg(test)]
mod tests {
    use super::flow_mask;

    #[test]
    fn the_flow_mask_is_the_official_one() {
        let n = 3;
        let m = flow_mask(n);
        let sees = |i: usize, j: usize| !m[i * 2 * n + j];
        for i in 0..n {
            assert!((0..n).all(|j| sees(i, j)), "image tokens see every image token");
            assert!((n..2 * n).all(|j| !sees(i, j)), "image tokens see no query");
        }
        for i in n..2 * n {
            assert!((0..n).all(|j| sees(i, j)), "queries see every image token");
            assert!((n..2 * n).all(|j| sees(i, j) == (j <= i)), "queries are causal among themselves");
        }
    }
}
