//! Small shared tensor helpers.

use burn::module::Module;
use burn::nn::{Linear, RmsNorm};
use burn::tensor::{Tensor, TensorData};

/// RMSNorm over the last axis: burn's, or the GPU's one-dispatch kernel ([`crate::gpu::rms_norm`])
/// where the loader found the crate's kernels (`fused`).
#[derive(Module, Debug)]
pub struct Norm {
    inner: RmsNorm,
    fused: bool,
}

impl Norm {
    pub fn new(inner: RmsNorm, fused: bool) -> Self {
        Self { inner, fused }
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        if self.fused {
            return as_rows(x, |x| crate::gpu::rms_norm(x, self.inner.gamma.val(), self.inner.epsilon));
        }
        self.inner.forward(x)
    }
}

/// `linear.forward(x)` computed as one 2-D matmul over all leading dimensions: burn runs a rank-3/4
/// input as many small batched matmuls, several times slower on the CPU (measured 2× on SAM's MLP).
pub fn linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    as_rows(x, |x| linear.forward(x))
}

/// Products with at most this many rows (a decoding step's) cost what reading the weights costs,
/// and are split by columns.
const MATVEC_MAX_ROWS: usize = 16;

/// [`linear`], with an input of few rows (see [`MATVEC_MAX_ROWS`]) split over `threads` threads by
/// output columns. Why: burn's CPU backend runs such a product on one thread, and reading the
/// weights is the whole cost; one core reads memory at about half the machine's bandwidth (measured
/// here: 13 GB/s for one core, 26 for two). Other inputs, and `threads <= 1`, go to [`linear`].
pub fn linear_par<const D: usize>(linear: &Linear, x: Tensor<D>, threads: usize) -> Tensor<D> {
    as_rows(x, |x| {
        if threads <= 1 || x.dims()[0] > MATVEC_MAX_ROWS {
            return linear.forward(x);
        }
        let y = matmul_par(x, linear.weight.val(), threads);
        match &linear.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        }
    })
}

/// `x · w` for `x` `(rows, k)` and `w` `(k, n)`: each thread multiplies by its own block of `w`'s
/// columns (a strided view, no copy); the blocks' results are put side by side.
pub fn matmul_par(x: Tensor<2>, w: Tensor<2>, threads: usize) -> Tensor<2> {
    let [k, n] = w.dims();
    // Blocks of whole 16-float vectors; no split for a matrix too narrow to share.
    let block = n.div_ceil(threads.max(1)).next_multiple_of(16);
    if x.dims()[0] > MATVEC_MAX_ROWS || block >= n {
        return x.matmul(w);
    }
    Tensor::cat(map_par(blocks(n, block), |cols| x.clone().matmul(w.clone().slice([0..k, cols]))), 1)
}

/// `f` (row-wise: each output row depends on its input row only) over `x`'s rows, in `threads`
/// blocks of rows side by side. Why: burn's CPU backend runs elementwise ops (GELU's erf) on one thread.
pub fn rows_par<const D: usize>(x: Tensor<D>, threads: usize, f: impl Fn(Tensor<2>) -> Tensor<2> + Sync) -> Tensor<D> {
    as_rows(x, |x| {
        let rows = x.dims()[0];
        let block = rows.div_ceil(threads.max(1));
        if threads <= 1 || block >= rows {
            return f(x);
        }
        Tensor::cat(map_par(blocks(rows, block), |r| f(x.clone().slice([r]))), 0)
    })
}

/// `f` (row-wise) over blocks of at most `rows` rows of `x` in turn, results stacked: what `f`
/// makes in between (an MLP's hidden activations) stays in cache instead of going through memory.
pub fn in_row_blocks(x: Tensor<2>, rows: usize, f: impl Fn(Tensor<2>) -> Tensor<2>) -> Tensor<2> {
    let total = x.dims()[0];
    if total <= rows {
        return f(x);
    }
    Tensor::cat(blocks(total, rows).into_iter().map(|r| f(x.clone().slice([r]))).collect(), 0)
}

/// `f` on `x` seen as a matrix `(rows, last axis)`; its result keeps `x`'s leading dimensions.
pub fn as_rows<const D: usize>(x: Tensor<D>, f: impl FnOnce(Tensor<2>) -> Tensor<2>) -> Tensor<D> {
    let dims = x.dims();
    let rows: usize = dims[..D - 1].iter().product();
    let y = f(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}

/// `x` with `f` applied to its values on the host, in place (the CPU backend's host kernels:
/// vectorised elementwise work where burn's runs on one thread).
pub fn on_host_values(x: Tensor<2>, f: impl FnOnce(&mut [f32])) -> Tensor<2> {
    let (shape, device) = (x.dims(), x.device());
    let mut values = host_values(x);
    f(&mut values);
    Tensor::from_data(TensorData::new(values, shape), &device)
}

/// A tensor's values as f32, in row-major order, on the host (synchronous: for the CPU backend's
/// host kernels, where reading a tensor is a copy).
pub fn host_values<const D: usize>(t: Tensor<D>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_into_vec::<f32>().expect("converted to f32")
}

/// `0..len` cut into consecutive ranges of `block` (the last may be shorter).
fn blocks(len: usize, block: usize) -> Vec<std::ops::Range<usize>> {
    (0..len).step_by(block.max(1)).map(|start| start..(start + block).min(len)).collect()
}

/// `f` over `items`, results in order: on rayon's threads natively, one after another in wasm32.
pub fn map_par<T: Send, R: Send>(items: Vec<T>, f: impl Fn(T) -> R + Sync + Send) -> Vec<R> {
    #[cfg(not(target_arch = "wasm32"))]
    {
        use rayon::prelude::*;
        items.into_par_iter().map(f).collect()
    }
    #[cfg(target_arch = "wasm32")]
    items.into_iter().map(f).collect()
}

#[cfg(all(test, feature = "flex"))]
mod tests {
    use burn::tensor::{Device, Distribution, Tensor};

    /// Column blocks put side by side give the unsplit product, whatever the width and thread count.
    #[test]
    fn matmul_par_equals_matmul() {
        let device = Device::flex();
        for (k, n) in [(48, 48), (32, 100), (64, 17), (7, 3), (40, 1000)] {
            let x = Tensor::<2>::random([1, k], Distribution::Default, &device);
            let w = Tensor::<2>::random([k, n], Distribution::Default, &device);
            let expected = x.clone().matmul(w.clone());
            for threads in [1, 2, 3, 8] {
                let got = super::matmul_par(x.clone(), w.clone(), threads);
                assert_eq!(got.dims(), [1, n]);
                let err: f32 = (got - expected.clone()).abs().max().into_scalar();
                assert!(err <= 1e-5, "k {k} n {n} threads {threads}: max error {err}");
            }
        }
    }

    /// Row blocks put back in order give the whole-tensor result, for any row count and thread count.
    #[test]
    fn rows_par_equals_whole() {
        let device = Device::flex();
        let linear = burn::nn::LinearConfig::new(24, 40).init(&device);
        let f = |x: Tensor<2>| burn::tensor::activation::gelu(linear.forward(x));
        for rows in [1, 2, 7, 64] {
            let x = Tensor::<3>::random([1, rows, 24], Distribution::Default, &device);
            let expected = f(x.clone().reshape([rows, 24]));
            for threads in [1, 2, 3, 8] {
                let got = super::rows_par(x.clone(), threads, f);
                assert_eq!(got.dims(), [1, rows, 40]);
                let err: f32 = (got.reshape([rows, 40]) - expected.clone()).abs().max().into_scalar();
                assert!(err <= 1e-6, "rows {rows} threads {threads}: max error {err}");
            }
        }
    }

    /// The split path keeps the bias and the input's leading dimensions.
    #[test]
    fn linear_par_equals_forward() {
        let device = Device::flex();
        let linear = burn::nn::LinearConfig::new(40, 70).init(&device);
        let x = Tensor::<3>::random([1, 1, 40], Distribution::Default, &device);
        let expected = linear.forward(x.clone());
        let got = super::linear_par(&linear, x, 2);
        assert_eq!(got.dims(), [1, 1, 70]);
        let err: f32 = (got - expected).abs().max().into_scalar();
        assert!(err <= 1e-5, "max error {err}");
    }
}
