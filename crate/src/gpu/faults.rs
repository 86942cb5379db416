//! Faults a GPU reports on its own rather than in a call's result. wgpu hands an out-of-memory on
//! buffer creation, or an invalid operation, to the device's uncaptured-error handler, and the
//! call goes on with an invalid buffer: cubecl's handler panics on its own thread and the model
//! keeps computing, so a page recognized after an out-of-memory came back as confident garbage
//! (measured on lavapipe under an address-space limit: exit 0, other tokens). [`DeviceFaults`]
//! records the first such error instead; the engine checks it after loading, after each page's
//! prefill and after each decoding step, and from then on every recognition fails with
//! [`Error::Gpu`] (the device's memory may hold buffers that never existed, so it is not trusted
//! again in this process).

use std::sync::{Arc, Mutex};

use crate::error::{Error, Result};

/// The first fault a device reported, shared by the engine and the device's error handler. The
/// default watches nothing (CPU, the browser — where the package's worker listens to the device).
#[derive(Clone, Debug, Default)]
pub struct DeviceFaults {
    first: Arc<Mutex<Option<Fault>>>,
}

#[derive(Clone, Debug)]
struct Fault {
    out_of_memory: bool,
    message: String,
}

impl PartialEq for DeviceFaults {
    fn eq(&self, other: &Self) -> bool {
        Arc::ptr_eq(&self.first, &other.first)
    }
}

impl DeviceFaults {
    /// Records `device`'s uncaptured errors from now on (replacing cubecl's handler, which panics
    /// on a thread of its own and lets the computation go on). Call once the device is set up.
    #[cfg(all(feature = "wgpu", not(target_arch = "wasm32")))]
    pub fn watch(device: &burn::tensor::wgpu::wgpu::Device) -> Self {
        use burn::tensor::wgpu::wgpu;
        let faults = Self::default();
        let first = faults.first.clone();
        device.on_uncaptured_error(Arc::new(move |error: wgpu::Error| {
            let out_of_memory = matches!(error, wgpu::Error::OutOfMemory { .. });
            let message = error.to_string().lines().next().unwrap_or("").trim().to_string();
            let mut first = first.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            if first.is_none() {
                *first = Some(Fault { out_of_memory, message });
            }
        }));
        faults
    }

    /// Records a fault as the device's handler would (for tests of what follows one).
    pub fn record(&self, out_of_memory: bool, message: &str) {
        let mut first = self.first.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        first.get_or_insert_with(|| Fault { out_of_memory, message: message.to_string() });
    }

    /// `Err(Error::Gpu)` once the device has reported a fault.
    pub fn check(&self) -> Result<()> {
        self.error().map_or(Ok(()), Err)
    }

    /// The device's first fault as an [`Error::Gpu`], if it has reported one.
    pub fn error(&self) -> Option<Error> {
        let first = self.first.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        first.as_ref().map(|fault| Error::Gpu { out_of_memory: fault.out_of_memory, message: fault.message.clone() })
    }
}
