//! CLIP-L body fed with SAM's compressed features as patch embeddings
//! (reference: `deepencoder.VitModel`, checkpoint `model.vision_model.*`; spec §4).

use burn::module::{Module, Param};
use burn::nn::LayerNorm;
use burn::tensor::activation::sigmoid;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Device, Tensor, TensorData};

use super::grid_cache::GridCache;
use super::{ops, vmath};
use super::profile::span;
use crate::config::ClipConfig;
use crate::error::Result;
use crate::image::resample::resize_bicubic_f32;
use crate::quant::QLinear;
use crate::weights::Loader;

#[derive(Module, Debug)]
pub struct Clip {
    class_embedding: Param<Tensor<1>>,
    pre_layrnorm: LayerNorm,
    layers: Vec<ClipLayer>,
    #[module(skip)]
    positions: ClipPositions,
}

/// `position_embedding.weight` on the host: row 0 for the class token, then a square grid.
#[derive(Debug, Clone)]
struct ClipPositions {
    values: Vec<f32>,
    grid: usize,
    width: usize,
    resized: GridCache<Tensor<2>>,
}

#[derive(Module, Debug)]
struct ClipLayer {
    layer_norm1: LayerNorm,
    qkv_proj: QLinear,
    out_proj: QLinear,
    layer_norm2: LayerNorm,
    fc1: QLinear,
    fc2: QLinear,
    heads: usize,
    /// On the CPU backend the MLP runs on blocks of rows side by side, with the host's quick GELU
    /// (burn's is three single-threaded passes over the 4×-wide hidden activations).
    host: bool,
    threads: usize,
}

impl Clip {
    pub async fn load(c: &ClipConfig, l: &Loader<'_, '_>) -> Result<Self> {
        let p = "model.vision_model";
        let w = c.width;
        let eps = c.layer_norm_eps;
        let mut layers = Vec::with_capacity(c.layers);
        for i in 0..c.layers {
            let q = format!("{p}.transformer.layers.{i}");
            layers.push(ClipLayer {
                layer_norm1: l.layer_norm(&format!("{q}.layer_norm1"), w, eps).await?,
                qkv_proj: l.qlinear(&format!("{q}.self_attn.qkv_proj"), w, 3 * w, true).await?,
                out_proj: l.qlinear(&format!("{q}.self_attn.out_proj"), w, w, true).await?,
                layer_norm2: l.layer_norm(&format!("{q}.layer_norm2"), w, eps).await?,
                fc1: l.qlinear(&format!("{q}.mlp.fc1"), w, c.ffn_hidden_size, true).await?,
                fc2: l.qlinear(&format!("{q}.mlp.fc2"), c.ffn_hidden_size, w, true).await?,
                heads: c.heads,
                host: l.host_kernels(),
                threads: l.threads(),
            });
        }
        // `embeddings.patch_embedding.weight` exists in the checkpoint but is unused: SAM supplies patches.
        Ok(Self {
            class_embedding: l.param(&format!("{p}.embeddings.class_embedding"), [w]).await?,
            pre_layrnorm: l.layer_norm(&format!("{p}.pre_layrnorm"), w, eps).await?,
            layers,
            positions: ClipPositions {
                values: l.host(&format!("{p}.embeddings.position_embedding.weight"), &[c.num_positions(), w]).await?,
                grid: c.pretrain_grid(),
                width: w,
                resized: GridCache::default(),
            },
        })
    }

    /// `(B, C, g, g)` compressed SAM features → `(B, g²+1, C)` hidden states (class token first).
    pub fn forward(&self, patches: Tensor<4>) -> Tensor<3> {
        let [b, c, gh, gw] = patches.dims();
        debug_assert_eq!(gh, gw, "views are square");
        let tokens = patches.reshape([b, c, gh * gw]).swap_dims(1, 2);
        let class = self.class_embedding.val().reshape([1, 1, c]).expand([b, 1, c]);
        let x = Tensor::cat(vec![class, tokens], 1);
        let x = span("CLIP embeddings", || x + self.positions.for_grid(gh, &self.class_embedding.val().device()).unsqueeze_dim::<3>(0));
        let mut x = span("CLIP layer norm", || self.pre_layrnorm.forward(x));
        for layer in &self.layers {
            x = layer.forward(x);
        }
        x // no post-layernorm (spec §4.6)
    }
}

impl ClipPositions {
    /// `(g²+1, C)`: the class row unchanged, the grid rows resized to `g × g` (anti-aliased bicubic).
    fn for_grid(&self, g: usize, device: &Device) -> Tensor<2> {
        self.resized.get_or_insert(g, || {
            let (class_row, grid_rows) = self.values.split_at(self.width);
            let grid = resize_bicubic_f32(grid_rows, [self.grid, self.grid, self.width], [g, g]);
            let mut values = class_row.to_vec();
            values.extend_from_slice(&grid);
            Tensor::from_data(TensorData::new(values, [g * g + 1, self.width]), device)
        })
    }
}

impl ClipLayer {
    fn forward(&self, x: Tensor<3>) -> Tensor<3> {
        let u = span("CLIP layer norm", || self.layer_norm1.forward(x.clone()));
        let h = x + self.attention(u);
        let u = span("CLIP layer norm", || self.layer_norm2.forward(h.clone()));
        if !self.host {
            return h + span("CLIP MLP + GELU", || self.fc2.forward(quick_gelu(self.fc1.forward(u))));
        }
        let mlp = |x: Tensor<2>| self.fc2.forward_threads(ops::on_host_values(self.fc1.forward_threads(x, 1), vmath::quick_gelu_in_place), 1);
        h + span("CLIP MLP + GELU", || ops::rows_par(u, self.threads, |x| ops::in_row_blocks(x, super::sam::MLP_BLOCK_ROWS, mlp)))
    }

    /// Full bidirectional attention; `qkv_proj` output is `[q | k | v]`, each head-major.
    fn attention(&self, x: Tensor<3>) -> Tensor<3> {
        let [b, n, c] = x.dims();
        let hd = c / self.heads;
        let qkv = span("CLIP qkv", || self.qkv_proj.forward(x)).reshape([b, n, 3, self.heads, hd]).permute([2, 0, 3, 1, 4]);
        let take = |i: usize| qkv.clone().slice([i..i + 1]).reshape([b, self.heads, n, hd]);
        let out = span("CLIP attention core", || attention(take(0), take(1), take(2), None, None, AttentionModuleOptions::default()));
        span("CLIP out proj", || self.out_proj.forward(out.swap_dims(1, 2).reshape([b, n, c])))
    }
}

/// CLIP's `x · σ(1.702 x)`.
fn quick_gelu(x: Tensor<3>) -> Tensor<3> {
    x.clone() * sigmoid(x * 1.702)
}
