//! The model, one module per part of the reference: the DeepEncoder (`sam` → compressor → `clip`,
//! `projector`, `layout`; DeepSeek-OCR-2: `sam` → `query_encoder` → `projector`) and the MoE language
//! model (`decoder`, `moe`).

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
pub mod query_encoder;
pub mod sam;
pub mod vocab;

use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::config::{Config, Tower};
use crate::error::Result;
use crate::weights::Loader;

pub use clip::Clip;
pub use decoder::Decoder;
pub use kv::KvCache;
pub use readback::{read_f32, read_i64, readbacks};
pub use projector::Projector;
pub use query_encoder::QueryEncoder;
pub use sam::{Sam, SamOutput};

/// Every stage's output for a batch of views (the reference's intermediate tensors).
#[derive(Debug, Clone)]
pub struct ViewFeatures {
    pub sam: SamOutput,
    /// What the stage after SAM returns: CLIP's output with the class token, `(B, g²+1, C)` (v1), or
    /// the query encoder's query outputs, `(B, g², C)` (v2).
    pub tower: Tensor<3>,
    /// Projected features `(B, g², hidden)`: `projector([CLIP without class ; SAM tokens])` (v1),
    /// `projector(queries)` (v2).
    pub projected: Tensor<3>,
}

/// The stage after SAM.
#[derive(Module, Debug)]
enum TowerModule {
    Clip(Clip),
    Queries(QueryEncoder),
}

/// DeepEncoder: SAM + compressor + CLIP (v1) or the query encoder (v2) + projector, and the learned
/// layout vectors (v2 has no newline).
#[derive(Module, Debug)]
pub struct VisionEncoder {
    sam: Sam,
    tower: TowerModule,
    projector: Projector,
    image_newline: Option<Param<Tensor<1>>>,
    view_seperator: Param<Tensor<1>>,
}

impl VisionEncoder {
    pub async fn load(config: &Config, l: &Loader<'_, '_>) -> Result<Self> {
        let d = config.projector.n_embed;
        let sam = Sam::load(&config.sam, l).await?;
        let (tower, image_newline) = match &config.tower {
            Tower::Clip(c) => (TowerModule::Clip(Clip::load(c, l).await?), Some(l.param("model.image_newline", [d]).await?)),
            Tower::Queries(q) => (TowerModule::Queries(QueryEncoder::load(q, l).await?), None),
        };
        Ok(Self {
            sam,
            tower,
            projector: Projector::load(&config.projector, l).await?,
            image_newline,
            view_seperator: l.param("model.view_seperator", [d]).await?,
        })
    }

    /// The query encoder (DeepSeek-OCR-2 checkpoints).
    pub fn query_encoder(&self) -> Option<&QueryEncoder> {
        match &self.tower {
            TowerModule::Queries(q) => Some(q),
            TowerModule::Clip(_) => None,
        }
    }

    /// Runs square views `(B, 3, S, S)` of normalised pixels through every encoder stage.
    pub fn encode_views(&self, pixels: Tensor<4>) -> Result<ViewFeatures> {
        let sam = self.sam.forward(pixels);
        let (tower, fused) = match &self.tower {
            TowerModule::Clip(clip) => {
                let out = clip.forward(sam.compressed.clone());
                let [b, c, g, _] = sam.compressed.dims();
                let [_, _, clip_width] = out.dims();
                let sam_tokens = sam.compressed.clone().reshape([b, c, g * g]).swap_dims(1, 2);
                let clip_tokens = out.clone().slice([0..b, 1..g * g + 1, 0..clip_width]);
                // CLIP first, SAM second (spec §4.1).
                (out, Tensor::cat(vec![clip_tokens, sam_tokens], 2))
            }
            TowerModule::Queries(queries) => {
                let out = queries.forward(sam.compressed.clone())?;
                (out.clone(), out)
            }
        };
        let projected = profile::span("projector", || self.projector.forward(fused));
        Ok(ViewFeatures { sam, tower, projected })
    }

    /// The image-embedding sequence `(N, hidden)` for one image: a global view `(1, 3, S, S)` and,
    /// when tiled, its tiles `(across·down, 3, T, T)` in row-major order with the grid `[across, down]`.
    pub fn embed_image(&self, global: Tensor<4>, tiles: Option<(Tensor<4>, [usize; 2])>) -> Result<Tensor<2>> {
        // The reference encodes the tiles first; the order does not change the result.
        let local = match tiles {
            Some((pixels, grid)) => Some((self.encode_views(pixels)?.projected, grid)),
            None => None,
        };
        Ok(self.assemble(self.encode_views(global)?.projected, local))
    }

    /// Lays projected view features out as the image sequence (see [`layout::image_sequence`] and,
    /// for DeepSeek-OCR-2, [`layout::image_sequence_v2`]).
    pub fn assemble(&self, global: Tensor<3>, local: Option<(Tensor<3>, [usize; 2])>) -> Tensor<2> {
        match &self.image_newline {
            Some(newline) => layout::image_sequence(global, local, newline.val(), self.view_seperator.val()),
            None => layout::image_sequence_v2(global, local.map(|(tiles, _)| tiles), self.view_seperator.val()),
        }
    }
}
