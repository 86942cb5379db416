//! The model, one module per part of the reference: the DeepEncoder (`sam` → compressor → `clip`,
//! `projector`, `layout`) and the MoE language model (`decoder`, `moe`).

mod grid_cache;
mod kv;
pub(crate) mod ops;
mod readback;
mod rel_attention;
mod vmath;
pub mod clip;
pub mod decoder;
pub mod layout;
pub mod moe;
pub mod profile;
pub mod projector;
pub mod sam;
pub mod vocab;

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::config::Config;
use crate::error::Result;
use crate::weights::Loader;

pub use clip::Clip;
pub use decoder::Decoder;
pub use kv::KvCache;
pub use readback::{read_f32, read_i64};
pub use projector::Projector;
pub use sam::{Sam, SamOutput};

/// Every stage's output for a batch of views (the reference's intermediate tensors).
#[derive(Debug, Clone)]
pub struct ViewFeatures {
    pub sam: SamOutput,
    /// CLIP output with the class token, `(B, g²+1, C)`.
    pub clip: Tensor<3>,
    /// Projected features `(B, g², hidden)`: `projector([CLIP without class ; SAM tokens])`.
    pub projected: Tensor<3>,
}

/// DeepEncoder: SAM + compressor + CLIP + projector, and the learned layout vectors.
#[derive(Module, Debug)]
pub struct VisionEncoder {
    sam: Sam,
    clip: Clip,
    projector: Projector,
    image_newline: Param<Tensor<1>>,
    view_seperator: Param<Tensor<1>>,
}

impl VisionEncoder {
    pub async fn load(config: &Config, l: &Loader<'_, '_>) -> Result<Self> {
        let d = config.projector.n_embed;
        Ok(Self {
            sam: Sam::load(&config.sam, l).await?,
            clip: Clip::load(&config.clip, l).await?,
            projector: Projector::load(&config.projector, l).await?,
            image_newline: l.param("model.image_newline", [d]).await?,
            view_seperator: l.param("model.view_seperator", [d]).await?,
        })
    }

    /// Runs square views `(B, 3, S, S)` of normalised pixels through every encoder stage.
    pub fn encode_views(&self, pixels: Tensor<4>) -> ViewFeatures {
        let sam = self.sam.forward(pixels);
        let clip = self.clip.forward(sam.compressed.clone());
        let [b, c, g, _] = sam.compressed.dims();
        let [_, _, clip_width] = clip.dims();
        let sam_tokens = sam.compressed.clone().reshape([b, c, g * g]).swap_dims(1, 2);
        let clip_tokens = clip.clone().slice([0..b, 1..g * g + 1, 0..clip_width]);
        // CLIP first, SAM second (spec §4.1).
        let projected = profile::span("projector", || self.projector.forward(Tensor::cat(vec![clip_tokens, sam_tokens], 2)));
        ViewFeatures { sam, clip, projected }
    }

    /// The image-embedding sequence `(N, hidden)` for one image: a global view `(1, 3, S, S)` and,
    /// when tiled, its tiles `(across·down, 3, T, T)` in row-major order with the grid `[across, down]`.
    pub fn embed_image(&self, global: Tensor<4>, tiles: Option<(Tensor<4>, [usize; 2])>) -> Tensor<2> {
        // The reference encodes the tiles first; the order does not change the result.
        let local = tiles.map(|(pixels, grid)| (self.encode_views(pixels).projected, grid));
        self.assemble(self.encode_views(global).projected, local)
    }

    /// Lays projected view features out as the image sequence (see [`layout::image_sequence`]).
    pub fn assemble(&self, global: Tensor<3>, local: Option<(Tensor<3>, [usize; 2])>) -> Tensor<2> {
        layout::image_sequence(global, local, self.image_newline.val(), self.view_seperator.val())
    }
}
