//! A linear layer whose weight is a float burn `Linear` (unquantized checkpoints), a
//! [`PackedMatrix`] kept on the host and multiplied by the CPU kernels ([`super::kernels`]), or a
//! packed matrix on the GPU multiplied by the crate's GPU kernels ([`DevicePacked`]).

use std::sync::Arc;

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::{Tensor, TensorData};

use super::scheme::PackedMatrix;
use crate::gpu::DevicePacked;

#[derive(Module, Debug)]
pub struct QLinear {
    dense: Option<Linear>,
    /// PyTorch-layout `(out, in)` packed weight; shared, never copied.
    #[module(skip)]
    packed: Option<Arc<PackedMatrix>>,
    /// Packed on the GPU.
    #[module(skip)]
    on_gpu: Option<DevicePacked>,
    bias: Option<Param<Tensor<1>>>,
    /// Threads of the packed kernels (see `Loader::with_threads`).
    threads: usize,
}

impl QLinear {
    pub fn dense(linear: Linear, threads: usize) -> Self {
        Self { dense: Some(linear), packed: None, on_gpu: None, bias: None, threads }
    }

    pub fn packed(weight: PackedMatrix, bias: Option<Tensor<1>>, threads: usize) -> Self {
        Self { dense: None, packed: Some(Arc::new(weight)), on_gpu: None, bias: bias.map(Param::from_tensor), threads }
    }

    pub fn on_device(weight: DevicePacked, bias: Option<Tensor<1>>) -> Self {
        Self { dense: None, packed: None, on_gpu: Some(weight), bias: bias.map(Param::from_tensor), threads: 1 }
    }

    /// The bias, if the layer has one.
    pub fn bias(&self) -> Option<Tensor<1>> {
        match &self.dense {
            Some(linear) => linear.bias.as_ref().map(|b| b.val()),
            None => self.bias.as_ref().map(|b| b.val()),
        }
    }

    pub fn is_packed(&self) -> bool {
        self.packed.is_some()
    }

    /// The packed weight, when the layer multiplies on the host (no bias).
    pub fn packed_weight(&self) -> Option<&PackedMatrix> {
        self.packed.as_deref().filter(|_| self.bias.is_none())
    }

    /// The packed weight, when the layer multiplies on the GPU (no bias).
    pub fn device_weight(&self) -> Option<&DevicePacked> {
        self.on_gpu.as_ref().filter(|_| self.bias.is_none())
    }

    /// `x · Wᵀ + b` over the last axis, all leading dimensions as rows of one product (see
    /// `model::ops::linear`), on the layer's threads.
    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_threads(x, self.threads)
    }

    /// [`QLinear::forward`] on `threads` threads (1 inside work already spread over threads).
    pub fn forward_threads<const D: usize>(&self, x: Tensor<D>, threads: usize) -> Tensor<D> {
        match (&self.dense, &self.packed, &self.on_gpu) {
            (Some(linear), _, _) => crate::model::ops::linear_par(linear, x, threads),
            (None, Some(packed), _) => crate::model::ops::as_rows(x, |x| self.with_bias(self.packed_product(packed, x, threads))),
            (None, None, Some(device)) => crate::model::ops::as_rows(x, |x| self.with_bias(device.linear(x))),
            (None, None, None) => unreachable!("a QLinear is built dense or packed"),
        }
    }

    /// `addend + x · Wᵀ + b` (a residual): on the GPU kernels' path added in the product's pass.
    pub fn forward_add<const D: usize>(&self, x: Tensor<D>, addend: Tensor<D>) -> Tensor<D> {
        match (&self.on_gpu, &self.bias) {
            (Some(device), None) => {
                let dims = addend.dims();
                let rows: usize = dims[..D - 1].iter().product();
                let addend = addend.reshape([rows, dims[D - 1]]);
                crate::model::ops::as_rows(x, |x| device.linear_add(x, Some(addend)))
            }
            _ => addend + self.forward(x),
        }
    }

    fn with_bias(&self, y: Tensor<2>) -> Tensor<2> {
        match &self.bias {
            Some(bias) => y + bias.val().unsqueeze_dim(0),
            None => y,
        }
    }

    /// The packed product on the host: only the activations travel (this path runs on the CPU
    /// backend, where reading a tensor is a copy).
    fn packed_product(&self, w: &PackedMatrix, x: Tensor<2>, threads: usize) -> Tensor<2> {
        let [m, k] = x.dims();
        debug_assert_eq!(k, w.cols);
        let device = x.device();
        let values = crate::model::ops::host_values(x);
        Tensor::<2>::from_data(TensorData::new(w.matmul(&values, m, threads), [m, w.rows]), &device)
    }
}
