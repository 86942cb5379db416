//! Reading tensors by their original names from a safetensors container held in memory
//! (a memory map natively, fetched bytes in the browser): no file I/O here.

use burn::tensor::{Device, Tensor, TensorData};
use safetensors::{Dtype, SafeTensors};

use super::names::{OPTIONAL_TENSORS, TensorSpec};
use crate::error::{Error, Result};

/// A parsed safetensors container.
pub struct Checkpoint<'a> {
    tensors: SafeTensors<'a>,
}

impl<'a> Checkpoint<'a> {
    /// Parses the header; tensor data is read lazily by name.
    pub fn parse(bytes: &'a [u8]) -> Result<Self> {
        let tensors = SafeTensors::deserialize(bytes).map_err(|e| Error::Safetensors(e.to_string()))?;
        Ok(Self { tensors })
    }

    /// Names of all tensors in the file (unordered).
    pub fn names(&self) -> Vec<&str> {
        self.tensors.names()
    }

    pub fn contains(&self, name: &str) -> bool {
        self.tensors.tensor(name).is_ok()
    }

    /// The stored shape of `name`.
    pub fn shape(&self, name: &str) -> Result<Vec<usize>> {
        let view = self.view(name)?;
        Ok(view.shape().to_vec())
    }

    /// Checks that every expected tensor is present with its shape, and returns the names in the
    /// file that the model does not know (besides [`OPTIONAL_TENSORS`]).
    pub fn check(&self, expected: &[TensorSpec]) -> Result<Vec<String>> {
        for spec in expected {
            let found = self.shape(&spec.name)?;
            if found != spec.shape {
                return Err(Error::ShapeMismatch { name: spec.name.clone(), expected: spec.shape.clone(), found });
            }
        }
        let known: std::collections::HashSet<&str> = expected.iter().map(|s| s.name.as_str()).collect();
        let mut unknown: Vec<String> = self
            .names()
            .into_iter()
            .filter(|n| !known.contains(n) && !OPTIONAL_TENSORS.contains(n))
            .map(str::to_owned)
            .collect();
        unknown.sort();
        Ok(unknown)
    }

    /// The values of a floating-point tensor as f32 (bf16 and f16 widen exactly), after checking
    /// that its shape is `shape`.
    pub fn f32_values(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        let view = self.view(name)?;
        if view.shape() != shape {
            return Err(Error::ShapeMismatch { name: name.into(), expected: shape.to_vec(), found: view.shape().to_vec() });
        }
        let bytes = view.data();
        let values = match view.dtype() {
            Dtype::F32 => bytes.chunks_exact(4).map(|b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect(),
            Dtype::BF16 => {
                bytes.chunks_exact(2).map(|b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()).collect()
            }
            Dtype::F16 => bytes.chunks_exact(2).map(|b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()).collect(),
            other => return Err(Error::UnsupportedDtype { name: name.into(), dtype: format!("{other:?}") }),
        };
        Ok(values)
    }

    /// Loads `name` as an f32 tensor of rank `D` on `device`, checking its shape.
    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D], device: &Device) -> Result<Tensor<D>> {
        let values = self.f32_values(name, &shape)?;
        Ok(Tensor::from_data(TensorData::new(values, shape), device))
    }

    fn view(&self, name: &str) -> Result<safetensors::tensor::TensorView<'_>> {
        self.tensors.tensor(name).map_err(|_| Error::MissingTensor { name: name.into() })
    }
}
