//! The CLI's `--dtype f16` / `--dtype bf16` on the CPU: the whole model in half precision (weights
//! and activations; half the memory) stays close to the f32 reference. Each runs in a child process
//! because a device's float type is fixed at its first tensor.

use burn::tensor::{Device, FloatDType};
use dsocr_tests::parity::{encoder_parity, load_model, logits_parity};
use dsocr_tests::{Tolerance, in_child_process};

const CHILD: &str = "DSOCR_HALF_CHILD";

fn half_parity(dtype: FloatDType, tolerance: Tolerance) {
    let mut device = Device::flex();
    device.configure(dtype).unwrap();
    let model = load_model("tiny-a", &device, usize::MAX);
    encoder_parity(&model, "tiny-a", "tiny", tolerance);
    logits_parity(&model, "tiny-a", "tiny", tolerance);
}

/// f16: 11 significant bits, 5e-4 relative per value.
#[test]
fn parity_cpu_f16_encoder_and_logits_tiny_a() {
    if !in_child_process("parity_cpu_f16_encoder_and_logits_tiny_a", (CHILD, "f16")) {
        half_parity(FloatDType::F16, Tolerance::RelativeToMax(3e-2));
    }
}

/// bf16: 8 significant bits, 4e-3 relative per value (the precision the reference runs in on GPU).
#[test]
fn parity_cpu_bf16_encoder_and_logits_tiny_a() {
    if !in_child_process("parity_cpu_bf16_encoder_and_logits_tiny_a", (CHILD, "bf16")) {
        half_parity(FloatDType::BF16, Tolerance::RelativeToMax(5e-2));
    }
}
