//! Small shared tensor helpers.

use burn::nn::Linear;
use burn::tensor::Tensor;

/// `linear.forward(x)` computed as one 2-D matmul over all leading dimensions: burn runs a rank-3/4
/// input as many small batched matmuls, several times slower on the CPU (measured 2× on SAM's MLP).
pub fn linear<const D: usize>(linear: &Linear, x: Tensor<D>) -> Tensor<D> {
    let dims = x.dims();
    if D <= 2 {
        return linear.forward(x);
    }
    let rows: usize = dims[..D - 1].iter().product();
    let y = linear.forward(x.reshape([rows, dims[D - 1]]));
    let mut out = dims;
    out[D - 1] = y.dims()[1];
    y.reshape(out)
}
