//! The linear projector from fused `[CLIP ; SAM]` features to the decoder width
//! (reference: `deepencoder.MlpProjector` with `projector_type="linear"`, checkpoint `model.projector.layers.*`).

use burn::module::Module;
use burn::tensor::Tensor;

use crate::config::ProjectorConfig;
use crate::error::Result;
use crate::quant::QLinear;
use crate::weights::Loader;

#[derive(Module, Debug)]
pub struct Projector {
    layers: QLinear,
}

impl Projector {
    pub async fn load(c: &ProjectorConfig, l: &Loader<'_, '_>) -> Result<Self> {
        Ok(Self { layers: l.qlinear("model.projector.layers", c.input_dim, c.n_embed, true).await? })
    }

    pub fn forward(&self, fused: Tensor<3>) -> Tensor<3> {
        self.layers.forward(fused)
    }
}
