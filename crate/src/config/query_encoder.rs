//! DeepSeek-OCR-2's query encoder config: the hub file gives only its width
//! (`vision_config.width["qwen2-0-5b"].dim`); the official builder hard-codes the rest.

use super::{RawOverrides, bad};
use crate::error::Result;

// `build_qwen2_decoder_as_encoder`'s defaults and the Qwen2Config it builds.
const QWEN2_LAYERS: usize = 24;
const QWEN2_HEADS: usize = 14;
const QWEN2_KV_HEADS: usize = 2;
const QWEN2_INTERMEDIATE: usize = 4864;
const QWEN2_ROPE_THETA: f64 = 1_000_000.0;
const QWEN2_RMS_NORM_EPS: f64 = 1e-6;

/// DeepSeek-OCR-2's Qwen2-0.5B-shaped encoder (reference `deepencoderv2.Qwen2Decoder2Encoder`):
/// SAM's tokens followed by as many learned queries, image tokens attending to each other, queries to
/// every image token and causally among themselves; the query outputs go to the projector.
#[derive(Debug, Clone, PartialEq)]
pub struct QueryEncoderConfig {
    pub hidden_size: usize,
    pub layers: usize,
    pub heads: usize,
    pub kv_heads: usize,
    pub head_dim: usize,
    pub intermediate_size: usize,
    pub rope_theta: f64,
    pub rms_norm_eps: f64,
    /// The learned query sets by view side: `(768, 144)` is `query_768`, `(1024, 256)` `query_1024`.
    pub query_sets: [(usize, usize); 2],
}

pub(super) fn query_encoder_config(dim: usize, overrides: &RawOverrides) -> Result<QueryEncoderConfig> {
    let heads = overrides.qwen2_heads.unwrap_or(QWEN2_HEADS);
    let kv_heads = overrides.qwen2_kv_heads.unwrap_or(QWEN2_KV_HEADS);
    if heads == 0 || dim % heads != 0 || (dim / heads) % 2 != 0 {
        return Err(bad(format!("qwen2 dim {dim} must split into {heads} heads of an even size")));
    }
    if kv_heads == 0 || heads % kv_heads != 0 {
        return Err(bad(format!("qwen2 heads {heads} must be a multiple of its KV heads {kv_heads}")));
    }
    Ok(QueryEncoderConfig {
        hidden_size: dim,
        layers: overrides.qwen2_layers.unwrap_or(QWEN2_LAYERS),
        heads,
        kv_heads,
        head_dim: dim / heads,
        intermediate_size: overrides.qwen2_intermediate_size.unwrap_or(QWEN2_INTERMEDIATE),
        rope_theta: QWEN2_ROPE_THETA,
        rms_norm_eps: QWEN2_RMS_NORM_EPS,
        query_sets: [(768, 144), (1024, 256)],
    })
}
