//! The parity checks on the native GPU through wgpu (Vulkan; Mesa's lavapipe in CI, where `.ci/run`
//! sets `DSOCR_REQUIRE_WGPU=1`), so the GPU kernels are checked outside the browser too: tiny-a's
//! encoder stages, prompt logits, KV-cached logits and greedy tokens in f32 (and DeepSeek-OCR-2's
//! tiny-v2a), and the model in f16
//! (what the browser picks on adapters with `shader-f16`; lavapipe has it) close to the reference.
//! Without a GPU adapter (and without `DSOCR_REQUIRE_WGPU`) each test says so and passes.
#![cfg(feature = "wgpu")]

use dsocr_tests::Tolerance;
use dsocr_tests::parity::{encoder_parity, greedy_parity, incremental_equals_full, load_model_with, logits_parity};
use dsocr_tests::{in_child_process, wgpu_device};

/// GPU reductions and matmuls sum in another order than the CPU; still far inside 1e-4 here.
const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

/// f16 keeps 11 significant bits (5e-4 relative per value; the reference itself runs in bf16 with 8);
/// measured on lavapipe: encoder stages ≤ 1.2e-2 × max|ref|, logits ≤ 1.2e-3.
const F16_TOLERANCE: Tolerance = Tolerance::RelativeToMax(3e-2);

/// Set in the child process that runs the f16 test.
const F16_CHILD: &str = "DSOCR_WGPU_F16_CHILD";

#[test]
fn parity_wgpu_encoder_tiny_a_tiny() {
    let Some((device, _)) = wgpu_device(false) else { return };
    encoder_parity(&load_model_with("tiny-a", &device, usize::MAX, false, 1), "tiny-a", "tiny", TOLERANCE);
}

#[test]
fn parity_wgpu_encoder_tiny_a_gundam() {
    let Some((device, _)) = wgpu_device(false) else { return };
    encoder_parity(&load_model_with("tiny-a", &device, usize::MAX, false, 1), "tiny-a", "gundam", TOLERANCE);
}

#[test]
fn parity_wgpu_decoder_tiny_a() {
    let Some((device, max_tensor_bytes)) = wgpu_device(false) else { return };
    // Stacked experts, as the CLI and the browser load them on a GPU: decode steps pick experts on the device.
    let model = load_model_with("tiny-a", &device, max_tensor_bytes, true, 1);
    logits_parity(&model, "tiny-a", "tiny", TOLERANCE);
    incremental_equals_full(&model, "tiny-a", TOLERANCE);
}

/// The whole pipeline on the GPU with the vocabulary split as under WebGPU's 128 MiB limit
/// (scaled down to the tiny model: 3 MiB shards).
#[test]
fn parity_wgpu_greedy_tiny_a_small_with_vocabulary_shards() {
    let Some((device, max_tensor_bytes)) = wgpu_device(false) else { return };
    let model = load_model_with("tiny-a", &device, max_tensor_bytes.min(3 << 20), true, 1);
    assert!(model.decoder.vocab_shards().0 > 2);
    greedy_parity(&model, "tiny-a", "small", None);
}

/// DeepSeek-OCR-2 on the GPU: every encoder stage with tiles (the query encoder's masked attention
/// included) and the greedy tokens of the whole pipeline with stacked experts (a 1131-token prompt;
/// all-position logits of it would be a 585 MB buffer, more than lavapipe allocates).
#[test]
fn parity_wgpu_ocr2_tiny_v2a_gundam() {
    let Some((device, max_tensor_bytes)) = wgpu_device(false) else { return };
    let model = load_model_with("ocr2/tiny-v2a", &device, max_tensor_bytes, true, 1);
    encoder_parity(&model, "ocr2/tiny-v2a", "gundam", TOLERANCE);
    greedy_parity(&model, "ocr2/tiny-v2a", "gundam", Some("page"));
}

/// A device's float type is fixed at its first tensor, so f16 runs in a child process of this test
/// binary with only this test selected.
#[test]
fn parity_wgpu_f16_encoder_and_logits_tiny_a() {
    if in_child_process("parity_wgpu_f16_encoder_and_logits_tiny_a", (F16_CHILD, "1")) {
        return;
    }
    let Some((device, max_tensor_bytes)) = wgpu_device(true) else { return };
    let model = load_model_with("tiny-a", &device, max_tensor_bytes, false, 1);
    encoder_parity(&model, "tiny-a", "tiny", F16_TOLERANCE);
    logits_parity(&model, "tiny-a", "tiny", F16_TOLERANCE);
}
