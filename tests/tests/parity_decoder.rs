//! Decoder and generation parity with the official code (CPU backend, f32): prompt logits, KV-cached
//! incremental logits against full recomputation, and the reference's 16 greedy tokens for both tiny
//! checkpoints in every mode (full pipeline: our encoder's image sequence into our decoder). Also the
//! split path for devices with a small binding limit: embedding and lm_head in vocabulary shards.

use burn::tensor::Device;
use dsocr_tests::Tolerance;
use dsocr_tests::parity::{greedy_parity, incremental_equals_full, load_model, load_model_with, logits_parity};

const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

macro_rules! decoder_tests {
    ($($logits:ident, $greedy:ident: $checkpoint:literal, $mode:literal;)*) => {$(
        #[test]
        fn $logits() {
            logits_parity(&load_model($checkpoint, &Device::flex(), usize::MAX), $checkpoint, $mode, TOLERANCE);
        }
        #[test]
        fn $greedy() {
            greedy_parity(&load_model($checkpoint, &Device::flex(), usize::MAX), $checkpoint, $mode, None);
        }
    )*};
}

decoder_tests! {
    parity_decoder_logits_tiny_a_tiny, parity_decoder_greedy_tiny_a_tiny: "tiny-a", "tiny";
    parity_decoder_logits_tiny_a_small, parity_decoder_greedy_tiny_a_small: "tiny-a", "small";
    parity_decoder_logits_tiny_a_base, parity_decoder_greedy_tiny_a_base: "tiny-a", "base";
    parity_decoder_logits_tiny_a_large, parity_decoder_greedy_tiny_a_large: "tiny-a", "large";
    parity_decoder_logits_tiny_a_gundam, parity_decoder_greedy_tiny_a_gundam: "tiny-a", "gundam";
    parity_decoder_logits_tiny_b_tiny, parity_decoder_greedy_tiny_b_tiny: "tiny-b", "tiny";
    parity_decoder_logits_tiny_b_small, parity_decoder_greedy_tiny_b_small: "tiny-b", "small";
    parity_decoder_logits_tiny_b_base, parity_decoder_greedy_tiny_b_base: "tiny-b", "base";
    parity_decoder_logits_tiny_b_large, parity_decoder_greedy_tiny_b_large: "tiny-b", "large";
    parity_decoder_logits_tiny_b_gundam, parity_decoder_greedy_tiny_b_gundam: "tiny-b", "gundam";
}

#[test]
fn parity_decoder_kv_cache_equals_full_recomputation_tiny_a() {
    incremental_equals_full(&load_model("tiny-a", &Device::flex(), usize::MAX), "tiny-a", TOLERANCE);
}

#[test]
fn parity_decoder_kv_cache_equals_full_recomputation_tiny_b() {
    incremental_equals_full(&load_model("tiny-b", &Device::flex(), usize::MAX), "tiny-b", TOLERANCE);
}

/// A binding limit far below the vocabulary tables (as WebGPU's 128 MiB is below the real model's
/// 632 MiB): embedding and lm_head load as row shards, with a shard boundary inside the vocabulary
/// (129,280 rows is not a multiple of the shard), and logits, cached decoding and greedy tokens are
/// unchanged.
#[test]
fn parity_decoder_vocabulary_shards_under_a_small_binding_limit() {
    const LIMIT: usize = 3 << 20;
    let model = load_model("tiny-a", &Device::flex(), LIMIT);
    let (embedding, lm_head) = model.decoder.vocab_shards();
    assert!(embedding > 2 && lm_head > 2, "expected several shards, got {embedding} and {lm_head}");
    logits_parity(&model, "tiny-a", "tiny", TOLERANCE);
    incremental_equals_full(&model, "tiny-a", TOLERANCE);
    greedy_parity(&model, "tiny-a", "small", None);
}

/// With the routed experts stacked (what GPUs use), decode steps pick each token's experts on the
/// device by the router's indices (no host readback) while prefill runs them grouped: cached logits
/// equal a full pass, and the greedy tokens are the reference's — also with the experts split in
/// shards of three under a binding limit.
#[test]
fn parity_decoder_stacked_experts_picked_on_the_device() {
    let model = load_model_with("tiny-a", &Device::flex(), usize::MAX, true, 2);
    incremental_equals_full(&model, "tiny-a", TOLERANCE);
    greedy_parity(&model, "tiny-a", "tiny", None);
    let three_experts = 3 * 48 * 32 * std::mem::size_of::<f32>();
    let model = load_model_with("tiny-a", &Device::flex(), three_experts, true, 2);
    incremental_equals_full(&model, "tiny-a", TOLERANCE);
    greedy_parity(&model, "tiny-a", "small", Some("page"));
}
