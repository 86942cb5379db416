//! The linear projector from fused `[CLIP ; SAM]` features to the decoder width
//! (reference: `deepencoder.MlpProjector` with `projector_type="linear"`, checkpoint `model.projector.layers.*`).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::Tensor;

use crate::config::ProjectorConfig;
use crate::error::Result;
use super::ops;
use crate::weights::Loader;

#[derive(Module, Debug)]
pub struct Projector {
    layers: Linear,
}

impl Projector {
    pub async fn load(c: &ProjectorConfig, l: &Loader<'_, '_>) -> Result<Self> {
        Ok(Self { layers: l.linear("model.projector.layers", c.input_dim, c.n_embed, true).await? })
    }

    pub fn forward(&self, fused: Tensor<3>) -> Tensor<3> {
        ops::linear(&self.layers, fused)
    }
}
