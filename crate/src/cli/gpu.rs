//! GPU faults in the CLI (native wgpu): a device lost during a run (driver reset, GPU removed,
//! timeout) or out of memory ends the batch with a message saying what ran and exit code 2, as the
//! browser package reports `DEVICE_LOST` / `OUT_OF_MEMORY`. What a fault looks like from here varies
//! (cubecl's "DevicePoisoned" once wgpu has reported the loss; before that, errors the device
//! reports on its own — recorded by [`crate::gpu::DeviceFaults`], which the engine turns into
//! `Error::Gpu` — and readbacks whose bytes "were never written"), so after a recognition fails on
//! a GPU the device is probed with a one-value computation: if that fails too, the device is gone.
//!
//! Fault injection for the tests: `DSOCR_FAULT_DESTROY_GPU_AFTER_TOKENS=N` destroys the wgpu device
//! (`wgpu::Device::destroy`, what a lost device looks like to wgpu) once token N is generated.

use std::any::Any;
use std::sync::OnceLock;

/// What stopped a recognition on the GPU, as the message the batch ends with.
pub(crate) enum Fault {
    Lost(String),
    OutOfMemory(String),
    /// An error the device reported on its own (`Error::Gpu` other than out of memory).
    Failed(String),
}

impl Fault {
    /// The error of a recognition (or the message of a panic in it), when its words say GPU fault.
    fn of_error(message: &str) -> Option<Self> {
        let lower = message.to_lowercase();
        if lower.contains("out of memory") || lower.contains("outofmemory") {
            return Some(Fault::OutOfMemory(message.to_string()));
        }
        if message.contains("DevicePoison") || message.contains("device was lost") || message.contains("Device lost") {
            return Some(Fault::Lost(message.to_string()));
        }
        None
    }

    /// After a failed recognition on `device`: the fault, if the run is on a GPU and the error
    /// says so or a one-value computation no longer works (on the CPU: none, the input was bad).
    pub(crate) fn probe(device: &burn::tensor::Device, failure: &str) -> Option<Self> {
        if !on_gpu() {
            return None;
        }
        if let Some(fault) = Self::of_error(failure) {
            return Some(fault);
        }
        let works = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let t = burn::tensor::Tensor::<1>::from_floats([1.0], device) + 1.0;
            pollster::block_on(crate::model::read_f32(t)).ok() == Some(vec![2.0])
        }));
        if !matches!(works, Ok(true)) {
            return Some(Fault::Lost(format!("a recognition failed ({}), and the device no longer computes", Self::first_line(failure))));
        }
        // The device still computes, but the engine no longer trusts it (`Error::Gpu`).
        failure.contains("the GPU reported an error").then(|| Fault::Failed(failure.to_string()))
    }

    /// An error of loading or warming up (`doing`) as the CLI prints it: a fault the device reported
    /// (`Error::Gpu`) with its code, anything else as it is.
    pub(crate) fn describe(error: &crate::Error, doing: &str) -> String {
        match error {
            crate::Error::Gpu { out_of_memory: true, message } => {
                format!("OUT_OF_MEMORY: the GPU ran out of memory while {doing} ({message}); try --quantize q4, --dtype f16 or --device cpu")
            }
            crate::Error::Gpu { message, .. } => format!("GPU_ERROR: the GPU failed while {doing} ({message}); run again, or use --device cpu"),
            other => other.to_string(),
        }
    }

    /// The message of a panic's payload.
    pub(crate) fn of_panic(payload: &(dyn Any + Send)) -> String {
        payload.downcast_ref::<String>().cloned().or_else(|| payload.downcast_ref::<&str>().map(|s| s.to_string())).unwrap_or_else(|| "unknown panic".into())
    }

    fn first_line(text: &str) -> &str {
        text.lines().next().unwrap_or(text)
    }

    /// The batch's last words (exit code 2).
    pub(crate) fn message(&self, doing: &str) -> String {
        match self {
            Fault::Lost(why) => format!("DEVICE_LOST: the GPU device was lost while {doing} ({}); the remaining inputs were not read — run again, or use --device cpu", Self::first_line(why)),
            Fault::OutOfMemory(why) => format!("OUT_OF_MEMORY: the GPU ran out of memory while {doing} ({}); try a smaller --mode, --quantize q4, --dtype f16 or --device cpu", Self::first_line(why)),
            Fault::Failed(why) => format!("GPU_ERROR: the GPU failed while {doing} ({}); the remaining inputs were not read — run again, or use --device cpu", Self::first_line(why)),
        }
    }
}

#[cfg(feature = "wgpu")]
static DEVICE: OnceLock<burn::tensor::wgpu::wgpu::Device> = OnceLock::new();

/// Keeps the wgpu device the CLI runs on (that it runs on a GPU, and for fault injection).
#[cfg(feature = "wgpu")]
pub(crate) fn remember(device: &burn::tensor::wgpu::wgpu::Device) {
    let _ = DEVICE.set(device.clone());
}

/// Whether the CLI runs on a GPU (a wgpu device was set up).
fn on_gpu() -> bool {
    #[cfg(feature = "wgpu")]
    return DEVICE.get().is_some();
    #[cfg(not(feature = "wgpu"))]
    return false;
}

static DESTROY_AFTER: OnceLock<Option<usize>> = OnceLock::new();

/// Called after each generated token (`index`: tokens so far): destroys the device when the fault
/// injection variable says so.
pub(crate) fn after_token(index: usize) {
    let after = *DESTROY_AFTER.get_or_init(|| std::env::var("DSOCR_FAULT_DESTROY_GPU_AFTER_TOKENS").ok().and_then(|v| v.parse().ok()));
    if after == Some(index) {
        #[cfg(feature = "wgpu")]
        if let Some(device) = DEVICE.get() {
            eprintln!("dsocr: fault injection: destroying the GPU device after token {index}");
            device.destroy();
        }
    }
}
