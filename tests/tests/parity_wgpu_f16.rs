//! Half precision on the native GPU (wgpu with `shader-f16`; lavapipe has it): the model in f16 —
//! what the browser picks on adapters with `shader-f16` — stays close to the f32 reference.
//! A separate test binary because a device's float type is fixed at its first tensor.
#![cfg(feature = "wgpu")]

use dsocr_tests::Tolerance;
use dsocr_tests::parity::{encoder_parity, load_model, logits_parity};
use dsocr_tests::wgpu_device;

/// f16 keeps 11 significant bits (≈ 5e-4 relative per value); errors grow through the layers.
const TOLERANCE: Tolerance = Tolerance::RelativeToMax(3e-2);

#[test]
fn parity_wgpu_f16_encoder_and_logits_tiny_a() {
    let Some((device, max_tensor_bytes)) = wgpu_device(true) else { return };
    let model = load_model("tiny-a", &device, max_tensor_bytes);
    encoder_parity(&model, "tiny-a", "tiny", TOLERANCE);
    logits_parity(&model, "tiny-a", "tiny", TOLERANCE);
}
