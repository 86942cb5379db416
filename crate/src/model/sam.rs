//! SAM ViT-B image encoder with the neck and the two stride-2 compressor convs
//! (reference: `deepencoder.ImageEncoderViT`, checkpoint `model.sam_model.*`; spec §3).

use burn::module::Module;
use burn::nn::conv::Conv2d;
use burn::nn::LayerNorm;
use burn::tensor::activation::gelu;
use burn::tensor::module::attention;
use burn::tensor::ops::AttentionModuleOptions;
use burn::tensor::{Tensor, TensorData};

use super::grid_cache::GridCache;
use crate::config::SamConfig;
use crate::error::Result;
use crate::image::resample::{resize_bicubic_f32, resize_linear_rows_f32};
use super::ops;
use super::profile::span;
use super::rel_attention::{self, Grid};
use super::vmath;
use crate::quant::QLinear;
use crate::weights::Loader;

/// Largest attention score block (elements) materialised at once: global attention at 1280 px is
/// 6400 × 6400 per head; queries are chunked to stay under this (128 MiB in f32).
const MAX_SCORE_ELEMENTS: usize = 32 << 20;

/// Intermediate outputs of one SAM pass, named after the reference stages.
#[derive(Debug, Clone)]
pub struct SamOutput {
    /// Neck output `(B, out_chans, G, G)`.
    pub neck: Tensor<4>,
    /// `net_2` output `(B, c0, G/2, G/2)`.
    pub compressor_1: Tensor<4>,
    /// `net_3` output `(B, c1, G/4, G/4)`: the 16× compressed features.
    pub compressed: Tensor<4>,
}

#[derive(Module, Debug)]
pub struct Sam {
    patch_embed: Conv2d,
    blocks: Vec<SamBlock>,
    neck_conv1: Conv2d,
    neck_norm1: LayerNorm,
    neck_conv2: Conv2d,
    neck_norm2: LayerNorm,
    net_2: Conv2d,
    net_3: Conv2d,
    /// The absolute position table, kept on the host and resized per grid (anti-aliased bicubic).
    #[module(skip)]
    pos_embed: PositionTable,
}

#[derive(Debug, Clone)]
struct PositionTable {
    values: Vec<f32>,
    grid: usize,
    width: usize,
    resized: GridCache<Tensor<4>>,
}

#[derive(Module, Debug)]
struct SamBlock {
    norm1: LayerNorm,
    attn: SamAttention,
    norm2: LayerNorm,
    lin1: QLinear,
    lin2: QLinear,
    /// 0 for global attention, else the window side.
    window: usize,
    /// See [`Loader::with_threads`]: the MLP runs on that many blocks of rows side by side
    /// (GELU's erf is a third of the CPU backend's single-threaded work otherwise).
    threads: usize,
}

#[derive(Module, Debug)]
struct SamAttention {
    qkv: QLinear,
    proj: QLinear,
    heads: usize,
    /// Attention on the host ([`super::rel_attention`]; the CPU backend).
    host: bool,
    #[module(skip)]
    rel_pos: RelativePositions,
}

/// The decomposed relative-position tables of one block, on the host, plus their per-size gathers.
#[derive(Debug, Clone)]
struct RelativePositions {
    h: Vec<f32>,
    w: Vec<f32>,
    rows: usize,
    head_dim: usize,
    /// For a `(side)` grid: `Rh`, `Rw` as `[side, side, head_dim]` gathered tables.
    gathered: GridCache<(Tensor<3>, Tensor<3>)>,
}

impl Sam {
    pub async fn load(c: &SamConfig, l: &Loader<'_, '_>) -> Result<Self> {
        let p = "model.sam_model";
        let w = c.width;
        let hd = c.head_dim();
        let mut blocks = Vec::with_capacity(c.layers);
        for b in 0..c.layers {
            let q = format!("{p}.blocks.{b}");
            let rows = 2 * c.rel_pos_side(b) - 1;
            blocks.push(SamBlock {
                norm1: l.layer_norm(&format!("{q}.norm1"), w, c.layer_norm_eps).await?,
                attn: SamAttention {
                    qkv: l.qlinear(&format!("{q}.attn.qkv"), w, 3 * w, true).await?,
                    proj: l.qlinear(&format!("{q}.attn.proj"), w, w, true).await?,
                    heads: c.heads,
                    host: l.host_kernels(),
                    rel_pos: RelativePositions {
                        h: l.host(&format!("{q}.attn.rel_pos_h"), &[rows, hd]).await?,
                        w: l.host(&format!("{q}.attn.rel_pos_w"), &[rows, hd]).await?,
                        rows,
                        head_dim: hd,
                        gathered: GridCache::default(),
                    },
                },
                norm2: l.layer_norm(&format!("{q}.norm2"), w, c.layer_norm_eps).await?,
                lin1: l.qlinear(&format!("{q}.mlp.lin1"), w, c.mlp_dim(), true).await?,
                lin2: l.qlinear(&format!("{q}.mlp.lin2"), c.mlp_dim(), w, true).await?,
                window: if c.is_global_block(b) { 0 } else { c.window_size },
                threads: l.threads(),
            });
        }
        let g = c.pretrain_grid;
        let o = c.out_chans;
        let [d0, d1] = c.downsample_channels;
        Ok(Self {
            patch_embed: l.conv2d(&format!("{p}.patch_embed.proj"), [3, w], c.patch_size, c.patch_size, 0, true).await?,
            blocks,
            neck_conv1: l.conv2d(&format!("{p}.neck.0"), [w, o], 1, 1, 0, false).await?,
            neck_norm1: l.layer_norm(&format!("{p}.neck.1"), o, c.layer_norm_eps).await?,
            neck_conv2: l.conv2d(&format!("{p}.neck.2"), [o, o], 3, 1, 1, false).await?,
            neck_norm2: l.layer_norm(&format!("{p}.neck.3"), o, c.layer_norm_eps).await?,
            net_2: l.conv2d(&format!("{p}.net_2"), [o, d0], 3, 2, 1, false).await?,
            net_3: l.conv2d(&format!("{p}.net_3"), [d0, d1], 3, 2, 1, false).await?,
            pos_embed: PositionTable {
                values: l.host(&format!("{p}.pos_embed"), &[1, g, g, w]).await?,
                grid: g,
                width: w,
                resized: GridCache::default(),
            },
        })
    }

    /// Encodes views `(B, 3, S, S)` (normalised pixels) into SAM's stage outputs.
    pub fn forward(&self, pixels: Tensor<4>) -> SamOutput {
        // Patch embedding, then NHWC like the reference.
        let mut x = span("SAM patch embed", || {
            let x = self.patch_embed.forward(pixels).permute([0, 2, 3, 1]);
            let [_, grid, _, _] = x.dims();
            let pos = self.pos_embed.for_grid(grid, &x.device());
            x + pos
        });
        for block in &self.blocks {
            x = block.forward(x);
        }
        // Neck in NCHW; its LayerNorm2d normalises over channels, i.e. the last axis in NHWC.
        let neck = span("SAM neck", || {
            let x = self.neck_conv1.forward(x.permute([0, 3, 1, 2]));
            let x = self.neck_norm1.forward(x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2]);
            let x = self.neck_conv2.forward(x);
            self.neck_norm2.forward(x.permute([0, 2, 3, 1])).permute([0, 3, 1, 2])
        });
        let compressor_1 = span("compressor convs", || self.net_2.forward(neck.clone()));
        let compressed = span("compressor convs", || self.net_3.forward(compressor_1.clone()));
        SamOutput { neck, compressor_1, compressed }
    }
}

impl PositionTable {
    /// `(1, G, G, width)`: the table resized from the pretraining grid (computed once per grid).
    fn for_grid(&self, grid: usize, device: &burn::tensor::Device) -> Tensor<4> {
        self.resized.get_or_insert(grid, || {
            let values = resize_bicubic_f32(&self.values, [self.grid, self.grid, self.width], [grid, grid]);
            Tensor::from_data(TensorData::new(values, [1, grid, grid, self.width]), device)
        })
    }
}

/// Rows of an encoder MLP run at once on the host: 256 × 3,072 hidden floats = 3 MiB (CLIP's 4,096: 4 MiB).
pub(super) const MLP_BLOCK_ROWS: usize = 256;

impl SamBlock {
    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let shortcut = x.clone();
        let x = span("SAM layer norm", || self.norm1.forward(x));
        let x = if self.window > 0 {
            // The reference pads the normalised grid with zeros, then runs qkv → attention → proj per
            // window. A zero token's qkv is the qkv bias, and proj is per token, so qkv runs on the
            // real tokens only (padding with the bias) and proj after the padding is cut off: the same
            // numbers, with up to 42% fewer tokens through both projections (512 px: 32² of 42²).
            let [b, h, w, c] = x.dims();
            let qkv = span("SAM qkv", || self.attn.qkv.forward(x));
            let (windows, padded) = window_partition(qkv, self.window, self.attn.qkv.bias());
            let y = span("SAM attention core (windowed)", || self.attn.attend(windows));
            let y = window_unpartition(y, self.window, padded, [b, h, w, c]);
            span("SAM proj", || self.attn.proj.forward(y))
        } else {
            let qkv = span("SAM qkv", || self.attn.qkv.forward(x));
            let y = span("SAM attention core (global)", || self.attn.attend(qkv));
            span("SAM proj", || self.attn.proj.forward(y))
        };
        let x = shortcut + x;
        let u = span("SAM layer norm", || self.norm2.forward(x.clone()));
        let mlp = |x: Tensor<2>| self.lin2.forward_threads(self.gelu(self.lin1.forward_threads(x, 1)), 1);
        // On the host, a block of rows at a time: its hidden activations (4× the width) stay in cache.
        let block = if self.attn.host { MLP_BLOCK_ROWS } else { usize::MAX };
        let y = span("SAM MLP + GELU", || ops::rows_par(u, self.threads, |x| ops::in_row_blocks(x, block, mlp)));
        x + y
    }

    /// burn's GELU, or on the CPU backend the host one ([`super::vmath`]: vectorised, where burn's
    /// calls libm's `erff` per value; within 3e-7 of it).
    fn gelu(&self, x: Tensor<2>) -> Tensor<2> {
        if !self.attn.host {
            return gelu(x);
        }
        ops::on_host_values(x, vmath::gelu_in_place)
    }
}

/// Pads `(B, H, W, C)` at the bottom/right to multiples of `ws` with `fill` (zeros when `None`) and
/// cuts `(B·nH·nW, ws, ws, C)` windows. Padded tokens are not masked, as in the reference.
fn window_partition(x: Tensor<4>, ws: usize, fill: Option<Tensor<1>>) -> (Tensor<4>, [usize; 2]) {
    let [b, h, w, c] = x.dims();
    let (hp, wp) = (h.div_ceil(ws) * ws, w.div_ceil(ws) * ws);
    let x = if (hp, wp) != (h, w) {
        let background = match fill {
            Some(fill) => fill.reshape([1, 1, 1, c]).expand([b, hp, wp, c]),
            None => Tensor::zeros([b, hp, wp, c], &x.device()),
        };
        background.slice_assign([0..b, 0..h, 0..w, 0..c], x)
    } else {
        x
    };
    let windows = x
        .reshape([b, hp / ws, ws, wp / ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b * (hp / ws) * (wp / ws), ws, ws, c]);
    (windows, [hp, wp])
}

fn window_unpartition(windows: Tensor<4>, ws: usize, [hp, wp]: [usize; 2], [b, h, w, c]: [usize; 4]) -> Tensor<4> {
    let x = windows
        .reshape([b, hp / ws, wp / ws, ws, ws, c])
        .permute([0, 1, 3, 2, 4, 5])
        .reshape([b, hp, wp, c]);
    if (hp, wp) != (h, w) { x.slice([0..b, 0..h, 0..w, 0..c]) } else { x }
}

impl SamAttention {
    /// Multi-head attention over a `(B, h, w, C)` grid with decomposed relative positions, between
    /// the projections: `(B, h, w, 3C)` qkv → `(B, h, w, C)` before `proj`.
    fn attend(&self, qkv: Tensor<4>) -> Tensor<4> {
        let [b, h, w, c3] = qkv.dims();
        let c = c3 / 3;
        let heads = self.heads;
        let hd = c / heads;
        let n = h * w;
        // qkv channels are [q | k | v], each head-major.
        let qkv = qkv.reshape([b, n, 3, heads, hd]).permute([2, 0, 3, 1, 4]);
        let take = |i: usize| qkv.clone().slice([i..i + 1]).reshape([b, heads, n, hd]);
        let (q, k, v) = (take(0), take(1), take(2));

        // Relative-position terms from the unscaled queries (spec §3.4).
        let device = q.device();
        let (rh, rw) = self.rel_pos.for_grid(h, w, &device);
        let bh = b * heads;
        let q4 = q.clone().reshape([bh, h, w, hd]);
        // rel_h[n, y, x, ky] = Σ_c q[n, y, x, c] · Rh[y, ky, c]: a batched matmul over y.
        let rel_h = q4
            .clone()
            .permute([1, 0, 2, 3])
            .reshape([h, bh * w, hd])
            .matmul(rh.swap_dims(1, 2))
            .reshape([h, bh, w, h])
            .permute([1, 0, 2, 3])
            .reshape([bh, n, h]);
        // rel_w[n, y, x, kx] = Σ_c q[n, y, x, c] · Rw[x, kx, c]: a batched matmul over x.
        let rel_w = q4
            .permute([2, 0, 1, 3])
            .reshape([w, bh * h, hd])
            .matmul(rw.swap_dims(1, 2))
            .reshape([w, bh, h, w])
            .permute([1, 2, 0, 3])
            .reshape([bh, n, w]);

        if self.host {
            let (q, k, v) = (ops::host_values(q), ops::host_values(k), ops::host_values(v));
            let out = rel_attention::attend(Grid { bh, h, w, hd }, &q, &k, &v, &ops::host_values(rel_h), &ops::host_values(rel_w));
            let out = Tensor::<4>::from_data(TensorData::new(out, [b, heads, n, hd]), &device);
            return out.reshape([b, heads, h, w, hd]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, c]);
        }
        // The dense bias (n × n per head) is built per chunk of queries to bound memory.
        let chunk = (MAX_SCORE_ELEMENTS / (bh * n).max(1)).clamp(1, n);
        let mut outputs = Vec::with_capacity(n.div_ceil(chunk));
        for start in (0..n).step_by(chunk) {
            let end = (start + chunk).min(n);
            let len = end - start;
            let bias = rel_h.clone().slice([0..bh, start..end, 0..h]).reshape([bh, len, h, 1])
                + rel_w.clone().slice([0..bh, start..end, 0..w]).reshape([bh, len, 1, w]);
            let bias = bias.reshape([b, heads, len, n]);
            let q_chunk = q.clone().slice([0..b, 0..heads, start..end, 0..hd]);
            outputs.push(attention(q_chunk, k.clone(), v.clone(), None, Some(bias), AttentionModuleOptions::default()));
        }
        let out = if outputs.len() == 1 { outputs.pop().unwrap() } else { Tensor::cat(outputs, 2) };
        out.reshape([b, heads, h, w, hd]).permute([0, 2, 3, 1, 4]).reshape([b, h, w, c])
    }
}

impl RelativePositions {
    /// `Rh[i, j] = table_h[i − j + side − 1]` (and `Rw`) for a square grid, resizing the tables by 1-D
    /// linear interpolation when the stored length differs from `2·side − 1` (global blocks off 1024 px).
    fn for_grid(&self, h: usize, w: usize, device: &burn::tensor::Device) -> (Tensor<3>, Tensor<3>) {
        debug_assert_eq!(h, w, "SAM grids are square");
        self.gathered.get_or_insert(h, || {
            let gather = |table: &[f32]| {
                let needed = 2 * h - 1;
                let table = resize_linear_rows_f32(table, [self.rows, self.head_dim], needed);
                let mut out = Vec::with_capacity(h * h * self.head_dim);
                for i in 0..h {
                    for j in 0..h {
                        let row = i + h - 1 - j;
                        out.extend_from_slice(&table[row * self.head_dim..][..self.head_dim]);
                    }
                }
                Tensor::from_data(TensorData::new(out, [h, h, self.head_dim]), device)
            };
            (gather(&self.h), gather(&self.w))
        })
    }
}
