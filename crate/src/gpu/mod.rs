//! The crate's own GPU kernels (cubecl `#[cube]`, one source for native wgpu and WebGPU in the
//! browser), for the packed int4/int8 weights of `quant/`: they read the packed words directly,
//! so quantized weights keep their quantized size on the device.
//!
//! * `kernels`: few-row products (a decoding step, the MoE's experts picked on the device by the
//!   router's indices, an MLP's gate/up pair with SiLU·mul fused) and dequantization of rows (an
//!   embedding lookup; weight blocks for many-row products through burn's matmul).
//! * `packed`: [`DevicePacked`], a packed matrix on the device in row shards within the binding
//!   limit, and the launches.
//! * `fused`: one dispatch each for what burn's tensor ops do in several: [`rms_norm`], the MoE
//!   router ([`route`]) and a greedy step's choice ([`greedy`]).
//! * `attention`: the decoder's KV cache, RoPE and the cache's writes in one dispatch, a decoding
//!   step's attention over the cache in another ([`DeviceKv`]).
//!
//! * `faults`: [`DeviceFaults`], what a device reports outside any call's result (out of memory),
//!   recorded so that the engine fails the recognition instead of returning garbage.
//!
//! Built with the `gpu` feature (implied by `wgpu` and `webgpu`); without it [`DevicePacked`] is
//! a type with no values (`absent`), so the model's code reads the same either way.

#[cfg(feature = "gpu")]
mod attention;
mod faults;
#[cfg(feature = "gpu")]
mod fused;
#[cfg(feature = "gpu")]
mod kernels;
#[cfg(feature = "gpu")]
mod launch;
#[cfg(feature = "gpu")]
mod packed;
#[cfg(not(feature = "gpu"))]
mod absent;

#[cfg(not(feature = "gpu"))]
pub use absent::{DeviceKv, DevicePacked, greedy, rms_norm, route};
#[cfg(feature = "gpu")]
pub use attention::DeviceKv;
pub use faults::DeviceFaults;
#[cfg(feature = "gpu")]
pub use fused::{greedy, rms_norm, route};
#[cfg(feature = "gpu")]
pub use packed::DevicePacked;

/// Input rows up to which products run the few-rows kernel (each weight row read once for all of
/// them); above it blocks of the weight are dequantized and multiplied by burn's matmul.
pub const FEW_ROWS: usize = 8;

/// Input rows up to which the gate/up pair of an MLP runs as one fused kernel (two accumulators
/// per row: 2 · 4 · 256 floats of workgroup memory, half of WebGPU's 16 KiB).
pub const FEW_ROWS_GLU: usize = 4;

/// Whether `device` runs the CubeCL backend (wgpu, WebGPU) and this build has the kernels.
pub fn available(device: &burn::tensor::Device) -> bool {
    #[cfg(feature = "gpu")]
    return matches!(device.as_dispatch(), burn::backend::DispatchDevice::Cube(_));
    #[cfg(not(feature = "gpu"))]
    {
        let _ = device;
        false
    }
}
