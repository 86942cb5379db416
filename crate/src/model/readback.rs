//! Device → host reads. Always asynchronous: WebGPU cannot block on a readback, and natively the
//! future resolves at once. Every read the model and the decode loop make goes through here, and
//! is counted ([`readbacks`]): on a GPU each is a round trip the device waits for.

use std::sync::atomic::{AtomicU64, Ordering};

use burn::tensor::{Int, Tensor, TensorData};

use crate::error::{Error, Result};

static READBACKS: AtomicU64 = AtomicU64::new(0);

/// Reads from the device so far in this process (for benchmarks and the tests that bound them).
pub fn readbacks() -> u64 {
    READBACKS.load(Ordering::Relaxed)
}

fn backend(e: impl std::fmt::Debug) -> Error {
    Error::Backend(format!("{e:?}"))
}

async fn read<E: std::fmt::Debug>(data: impl std::future::Future<Output = std::result::Result<TensorData, E>>) -> Result<TensorData> {
    READBACKS.fetch_add(1, Ordering::Relaxed);
    data.await.map_err(backend)
}

pub async fn read_f32<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>> {
    // `try_`: a device that failed leaves bytes that cannot be materialised (an error, not a panic).
    read(t.into_data_async()).await?.try_into_vec_as::<f32>().map_err(backend)
}

pub async fn read_i64<const D: usize>(t: Tensor<D, Int>) -> Result<Vec<i64>> {
    read(t.into_data_async()).await?.try_into_vec_as::<i64>().map_err(backend)
}
