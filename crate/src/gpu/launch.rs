//! What the kernels share: the workgroup size of the one-row-per-workgroup kernels and their
//! halving reductions in workgroup memory, and burn tensors as kernel buffers.

use burn::tensor::{DType, Int, Tensor};
use burn_cubecl::Cube;
use burn_cubecl::kernel::into_contiguous;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

/// Units per workgroup (WebGPU guarantees 256).
pub(super) const UNITS: u32 = 256;
/// `log2(UNITS)`.
pub(super) const UNIT_STEPS: u32 = 8;

/// Sum of `partial[0 .. UNITS]` into `partial[0]` (halving; every unit takes part).
#[cube]
pub(super) fn reduce_sum(partial: &mut [f32], unit: usize) {
    #[unroll]
    for step in 0..UNIT_STEPS {
        let stride = comptime![(UNITS >> (step + 1)) as usize];
        if unit < stride {
            partial[unit] += partial[unit + stride];
        }
        sync_cube();
    }
}

/// Max of `partial[0 .. UNITS]` into `partial[0]` (halving; every unit takes part).
#[cube]
pub(super) fn reduce_max(partial: &mut [f32], unit: usize) {
    #[unroll]
    for step in 0..UNIT_STEPS {
        let stride = comptime![(UNITS >> (step + 1)) as usize];
        if unit < stride {
            partial[unit] = f32::max(partial[unit], partial[unit + stride]);
        }
        sync_cube();
    }
}

/// `t`'s CubeCL tensor, contiguous (the kernels index it as a flat row-major buffer).
pub(super) fn cube<const D: usize>(t: Tensor<D>) -> CubeTensor {
    into_contiguous(t.try_into_primitive::<Cube>().expect("a GPU kernel's input lives on a CubeCL device"))
}

/// [`cube`] for an int tensor.
pub(super) fn cube_int<const D: usize>(t: Tensor<D, Int>) -> CubeTensor {
    into_contiguous(t.try_into_primitive::<Cube>().expect("a GPU kernel's input lives on a CubeCL device"))
}

/// The kernel-side element type of a burn dtype.
pub(super) fn storage(dtype: DType) -> cubecl::ir::ElemType {
    burn::backend::cubecl::dtype_to_storage_type(dtype)
}
