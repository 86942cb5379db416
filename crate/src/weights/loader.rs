//! Builds burn modules from checkpoint tensors by their original names, converting PyTorch layouts.

use burn::module::Param;
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{LayerNorm, LayerNormConfig, Linear, LinearConfig, PaddingConfig2d};
use burn::tensor::{Device, Tensor, TensorData};

use super::Checkpoint;
use crate::error::Result;

/// Reads named tensors from a checkpoint onto a device.
pub struct Loader<'c, 'b> {
    checkpoint: &'c Checkpoint<'b>,
    device: Device,
}

impl<'c, 'b> Loader<'c, 'b> {
    pub fn new(checkpoint: &'c Checkpoint<'b>, device: &Device) -> Self {
        Self { checkpoint, device: device.clone() }
    }

    pub fn device(&self) -> &Device {
        &self.device
    }

    /// Host copy of a tensor's values (f32), shape-checked.
    pub fn host(&self, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
        self.checkpoint.f32_values(name, shape)
    }

    pub fn tensor<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Tensor<D>> {
        self.checkpoint.tensor(name, shape, &self.device)
    }

    pub fn param<const D: usize>(&self, name: &str, shape: [usize; D]) -> Result<Param<Tensor<D>>> {
        Ok(Param::from_tensor(self.tensor(name, shape)?))
    }

    /// `prefix.weight` (PyTorch `(out, in)`, stored transposed as burn's `[in, out]`) and optional `prefix.bias`.
    pub fn linear(&self, prefix: &str, d_in: usize, d_out: usize, bias: bool) -> Result<Linear> {
        let w = self.host(&format!("{prefix}.weight"), &[d_out, d_in])?;
        let mut t = vec![0.0f32; w.len()];
        for o in 0..d_out {
            for i in 0..d_in {
                t[i * d_out + o] = w[o * d_in + i];
            }
        }
        let mut linear = LinearConfig::new(d_in, d_out).with_bias(bias).init(&self.device);
        linear.weight = Param::from_tensor(Tensor::from_data(TensorData::new(t, [d_in, d_out]), &self.device));
        if bias {
            linear.bias = Some(self.param(&format!("{prefix}.bias"), [d_out])?);
        }
        Ok(linear)
    }

    /// LayerNorm over the last axis from `prefix.weight` / `prefix.bias`.
    pub fn layer_norm(&self, prefix: &str, d: usize, eps: f64) -> Result<LayerNorm> {
        let mut norm = LayerNormConfig::new(d).with_epsilon(eps).init(&self.device);
        norm.gamma = self.param(&format!("{prefix}.weight"), [d])?;
        norm.beta = Some(self.param(&format!("{prefix}.bias"), [d])?);
        Ok(norm)
    }

    /// A square-kernel Conv2d with symmetric padding from `prefix.weight` (`(out, in, k, k)`) and optional bias.
    pub fn conv2d(&self, prefix: &str, [c_in, c_out]: [usize; 2], kernel: usize, stride: usize, padding: usize, bias: bool) -> Result<Conv2d> {
        let mut conv = Conv2dConfig::new([c_in, c_out], [kernel, kernel])
            .with_stride([stride, stride])
            .with_padding(PaddingConfig2d::Explicit(padding, padding, padding, padding))
            .with_bias(bias)
            .init(&self.device);
        conv.weight = self.param(&format!("{prefix}.weight"), [c_out, c_in, kernel, kernel])?;
        conv.bias = if bias { Some(self.param(&format!("{prefix}.bias"), [c_out])?) } else { None };
        Ok(conv)
    }
}
