//! [`DevicePacked`] in a build without the GPU kernels: a type with no values. The loader never
//! builds one (no device runs the kernels: [`super::available`] is false), so every method is
//! the empty match.

use burn::tensor::{Device, Int, Tensor};

use crate::quant::PackedMatrix;

#[derive(Debug, Clone)]
pub enum DevicePacked {}

impl DevicePacked {
    pub fn upload(_: &PackedMatrix, _: &Device, _: usize) -> Self {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn upload_in_shards(_: &PackedMatrix, _: &Device, _: usize) -> Self {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn upload_float(_: &[f32], _: usize, _: usize, _: bool, _: &Device, _: usize, _: Option<usize>) -> Self {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn shard_count(&self) -> usize {
        match *self {}
    }

    pub fn linear(&self, _: Tensor<2>) -> Tensor<2> {
        match *self {}
    }

    pub fn linear_add(&self, _: Tensor<2>, _: Option<Tensor<2>>) -> Tensor<2> {
        match *self {}
    }

    pub fn gathered_sum(&self, _: Tensor<2>, _: Tensor<1, Int>, _: Tensor<2>, _: usize, _: Option<Tensor<2>>) -> Tensor<2> {
        match *self {}
    }

    pub fn glu(gate: &Self, _: &Self, _: Tensor<2>) -> Tensor<2> {
        match *gate {}
    }

    pub fn gathered(&self, _: Option<&Self>, _: Tensor<2>, _: Tensor<1, Int>, _: usize, _: usize) -> Tensor<2> {
        match *self {}
    }

    pub fn rows_of(&self, _: Tensor<1, Int>) -> Tensor<2> {
        match *self {}
    }

    pub fn expert(&self, _: Option<&Self>, _: Tensor<2>, _: usize, _: usize) -> Tensor<2> {
        match *self {}
    }
}

// The fused kernels: the model calls them only where the loader found the kernels available.

pub fn rms_norm(_: Tensor<2>, _: Tensor<1>, _: f64) -> Tensor<2> {
    unreachable!("no GPU kernels in this build (feature `gpu`)")
}

pub fn route(_: Tensor<2>, _: Tensor<2>, _: usize, _: bool, _: f64) -> (Tensor<2>, Tensor<2, Int>) {
    unreachable!("no GPU kernels in this build (feature `gpu`)")
}

/// Never built (no device runs the kernels). Not an empty enum, unlike [`DevicePacked`]: the
/// decoder's code after `append`, which returns one, would read as unreachable.
#[derive(Debug, Clone)]
pub struct DeviceKv {
    _never: (),
}

impl DeviceKv {
    pub fn len(&self) -> usize {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn is_empty(&self) -> bool {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    #[allow(clippy::too_many_arguments)]
    pub fn append(_: Option<Self>, _: Tensor<2>, _: Tensor<2>, _: Tensor<2>, _: usize, _: usize, _: usize) -> (Self, Tensor<2>) {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn prefix(&self) -> (Tensor<4>, Tensor<4>) {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }

    pub fn attend(&self, _: Tensor<2>, _: usize) -> Tensor<2> {
        unreachable!("no GPU kernels in this build (feature `gpu`)")
    }
}

pub fn greedy(_: Tensor<2>) -> Tensor<2> {
    unreachable!("no GPU kernels in this build (feature `gpu`)")
}
