//! A matrix on the GPU as rows of 32-bit words, and the launches of the kernels that read it.
//!
//! Quantized, it stays in its quantized size: per row shard, the packed values as `u32` words with
//! every group whole (see [`PackedMatrix::whole_groups`]) and one f32 scale per group. A float
//! checkpoint's decoder weights are uploaded the same way as raw f16 or f32 words (no scales), so
//! the same kernels serve them. Shards of whole rows keep each buffer within the device's binding
//! limit (WebGPU grants 128 MiB by default; the real model's lm_head is 165 MB in q8).

use burn::tensor::{DType, Device, Int, Tensor, TensorData};
use burn_cubecl::Cube;
use burn_cubecl::ops::numeric::empty_device_dtype;
use burn_cubecl::tensor::CubeTensor;
use cubecl::prelude::*;

use super::kernels::{CUBE_UNITS, dequantize_kernel, few_rows_kernel, team_for};
use super::launch::{cube, cube_int, storage};
use super::{FEW_ROWS, FEW_ROWS_GLU};
use crate::quant::PackedMatrix;

/// Largest float block a many-rows product dequantizes at a time (bytes).
const DEQUANTIZED_BLOCK_BYTES: usize = 64 << 20;

/// A `(rows, cols)` matrix on the GPU as rows of words (see the module docs).
#[derive(Debug, Clone)]
pub struct DevicePacked {
    pub rows: usize,
    pub cols: usize,
    /// Bits per value: 4 or 8 (quantized, with scales), 16 or 32 (float).
    bits: u32,
    /// Values per scale (quantized); for float words the values of one word.
    group: usize,
    /// Scales per row (0 for float words).
    groups: usize,
    /// Words per row.
    row_words: usize,
    shards: Vec<Shard>,
}

/// Rows `first .. first + rows` of a [`DevicePacked`].
#[derive(Debug, Clone)]
struct Shard {
    first: usize,
    rows: usize,
    /// `rows × row_words` words.
    words: Tensor<1, Int>,
    /// `rows × groups` scales (one unused value for float words).
    scales: Tensor<1>,
}

impl DevicePacked {
    /// Uploads `m` in row shards of at most `max_bytes` of words each (at least one row).
    pub fn upload(m: &PackedMatrix, device: &Device, max_bytes: usize) -> Self {
        let row_bytes = m.groups() * m.group_bytes();
        Self::upload_in_shards(m, device, (max_bytes / row_bytes.max(1)).max(1))
    }

    /// Uploads `m` in shards of `rows_per_shard` rows (an expert stack: whole experts per shard).
    pub fn upload_in_shards(m: &PackedMatrix, device: &Device, rows_per_shard: usize) -> Self {
        let groups = m.groups();
        let row_words = groups * m.group_bytes() / 4;
        let words = words_of(&m.whole_groups());
        let shards = shards(m.rows, rows_per_shard, |first, rows| {
            let scales = m.scales[first * groups..(first + rows) * groups].to_vec();
            (words[first * row_words..(first + rows) * row_words].to_vec(), scales)
        }, device);
        Self { rows: m.rows, cols: m.cols, bits: m.spec.bits.count(), group: m.spec.group, groups, row_words, shards }
    }

    /// Uploads the float `(rows, cols)` matrix `values` (row-major, PyTorch's `(out, in)`) as f16
    /// words (`half`: two per word, a row of odd width padded with a zero) or f32 words, in row
    /// shards of at most `max_bytes` each, or of `rows_per_shard` rows when given.
    pub fn upload_float(values: &[f32], rows: usize, cols: usize, half: bool, device: &Device, max_bytes: usize, rows_per_shard: Option<usize>) -> Self {
        let row_words = if half { cols.div_ceil(2) } else { cols };
        let words: Vec<u32> = if half {
            values.chunks(cols.max(1)).take(rows).flat_map(|row| row.chunks(2).map(|p| u32::from(half::f16::from_f32(p[0]).to_bits()) | u32::from(p.get(1).map_or(0, |&v| half::f16::from_f32(v).to_bits())) << 16)).collect()
        } else {
            values.iter().map(|v| v.to_bits()).collect()
        };
        let per_shard = rows_per_shard.unwrap_or((max_bytes / (4 * row_words).max(1)).max(1));
        let shards = shards(rows, per_shard, |first, rows| (words[first * row_words..(first + rows) * row_words].to_vec(), vec![0.0]), device);
        let bits = if half { 16 } else { 32 };
        // A float row has no groups; the kernels take one word as its "group".
        Self { rows, cols, bits, group: (32 / bits) as usize, groups: 0, row_words, shards }
    }

    /// Row shards (1 when the matrix fits one binding).
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// `x (m, cols) · Wᵀ`: `(m, rows)` in `x`'s float type.
    pub fn linear(&self, x: Tensor<2>) -> Tensor<2> {
        self.linear_add(x, None)
    }

    /// [`DevicePacked::linear`] plus `addend` `(m, rows)` (a residual), added in the same pass
    /// where the product runs as one launch.
    pub fn linear_add(&self, x: Tensor<2>, addend: Option<Tensor<2>>) -> Tensor<2> {
        let m = x.dims()[0];
        let y = if m > FEW_ROWS {
            self.many_rows(x)
        } else if let ([shard], Some(addend)) = (self.shards.as_slice(), &addend) {
            return self.launch(shard, Launch { addend: Some(addend.clone()), ..Launch::plain(x, m) });
        } else {
            cat_columns(self.shards.iter().map(|shard| self.launch(shard, Launch::plain(x.clone(), m))).collect())
        };
        match addend {
            Some(addend) => y + addend,
            None => y,
        }
    }

    /// `silu(x · Gᵀ) ⊙ (x · Uᵀ)` of an MLP's gate and up matrices (same shape and sharding).
    pub fn glu(gate: &Self, up: &Self, x: Tensor<2>) -> Tensor<2> {
        let m = x.dims()[0];
        if m > FEW_ROWS_GLU || !gate.same_layout(up) {
            return burn::tensor::activation::silu(gate.linear(x.clone())) * up.linear(x);
        }
        let parts = gate.shards.iter().zip(&up.shards).map(|(g, u)| gate.launch(g, Launch { up: Some(u), ..Launch::plain(x.clone(), m) })).collect();
        cat_columns(parts)
    }

    /// A stack of experts of `per_expert` rows each: pair `s` gets `x[s / x_div] · W_eᵀ` with
    /// `e = experts[s]`, chosen on the device: `(pairs, per_expert)`. With `up`, the gate/up pair:
    /// `silu(x · G_eᵀ) ⊙ (x · U_eᵀ)`.
    pub fn gathered(&self, up: Option<&Self>, x: Tensor<2>, experts: Tensor<1, Int>, x_div: usize, per_expert: usize) -> Tensor<2> {
        let pairs = experts.dims()[0];
        let gathered = Gathered { ids: experts, per_expert, x_div, combine: None };
        self.per_shard_sum(None, |i| Launch { up: up.map(|u| &u.shards[i]), rows: pairs, gathered: Some(gathered.clone()), ..Launch::plain(x.clone(), 1) })
    }

    /// The experts' outputs summed per token with their routing weights, plus `addend`: for each
    /// token `t` of `weights` `(tokens, k)`, `addend[t] + Σ_j weights[t, j] · x[t·k + j] · W_eᵀ`
    /// with `e = experts[t·k + j]` (`x` is `(tokens · k, cols)`, the pairs' inputs): `(tokens,
    /// per_expert)`.
    pub fn gathered_sum(&self, x: Tensor<2>, experts: Tensor<1, Int>, weights: Tensor<2>, per_expert: usize, addend: Option<Tensor<2>>) -> Tensor<2> {
        let [tokens, k] = weights.dims();
        let gathered = Gathered { ids: experts, per_expert, x_div: 1, combine: Some((weights.reshape([tokens * k]), k)) };
        self.per_shard_sum(addend, |_| Launch { rows: tokens, gathered: Some(gathered.clone()), ..Launch::plain(x.clone(), 1) })
    }

    /// One launch per shard of a gathered product (`launch(shard index)`), summed: each shard adds
    /// only its experts' pairs (zeros for the others'); `addend` goes with the first.
    fn per_shard_sum<'a>(&self, addend: Option<Tensor<2>>, launch: impl Fn(usize) -> Launch<'a>) -> Tensor<2> {
        let mut addend = addend;
        sum(self.shards.iter().enumerate().map(|(i, shard)| self.launch(shard, Launch { addend: addend.take(), ..launch(i) })))
    }

    /// Expert `e` of a stack of experts of `per_expert` rows each on all of `x`'s rows (the tokens
    /// routed to it): `x · W_eᵀ`, or with `up` `silu(x · G_eᵀ) ⊙ (x · U_eᵀ)`. Few rows run the
    /// gathered kernel with every pair on `e`; more dequantize the expert and use burn's matmul.
    pub fn expert(&self, up: Option<&Self>, x: Tensor<2>, e: usize, per_expert: usize) -> Tensor<2> {
        let m = x.dims()[0];
        if m <= FEW_ROWS {
            let ids = Tensor::<1, Int>::from_data(TensorData::new(vec![e as i64; m], [m]), &x.device());
            return self.gathered(up, x, ids, 1, per_expert);
        }
        let float = x.dtype();
        let product = |w: &Self, x: Tensor<2>| x.matmul(w.transposed_block(e * per_expert, per_expert, float));
        match up {
            Some(up) => burn::tensor::activation::silu(product(self, x.clone())) * product(up, x),
            None => product(self, x),
        }
    }

    /// Rows `ids` dequantized: `(ids, cols)` in the device's float type (an embedding lookup).
    pub fn rows_of(&self, ids: Tensor<1, Int>) -> Tensor<2> {
        let count = ids.dims()[0];
        let float = ids.device().settings().float_dtype.into();
        // Each shard writes its own rows and zeros for the others'.
        sum(self.shards.iter().map(|shard| self.dequantize(shard, Some(cube_int(ids.clone())), 0, count, float, false, [count, self.cols])))
    }

    /// Rows `first .. first + count` (within one shard) dequantized and transposed: `(cols, count)`.
    pub fn transposed_block(&self, first: usize, count: usize, float: DType) -> Tensor<2> {
        let shard = self.shards.iter().find(|s| first >= s.first && first + count <= s.first + s.rows).expect("a block within one shard");
        self.dequantize(shard, None, first - shard.first, count, float, true, [self.cols, count])
    }

    /// The many-rows product: blocks of weight rows dequantized (each within
    /// [`DEQUANTIZED_BLOCK_BYTES`] and one shard), multiplied by burn's matmul, side by side.
    fn many_rows(&self, x: Tensor<2>) -> Tensor<2> {
        let float = x.dtype();
        let per_block = (DEQUANTIZED_BLOCK_BYTES / (self.cols * float.size()).max(1)).max(1);
        let mut parts = Vec::new();
        for shard in &self.shards {
            let mut first = shard.first;
            while first < shard.first + shard.rows {
                let count = per_block.min(shard.first + shard.rows - first);
                parts.push(x.clone().matmul(self.transposed_block(first, count, float)));
                first += count;
            }
        }
        cat_columns(parts)
    }

    fn same_layout(&self, other: &Self) -> bool {
        (self.rows, self.cols, self.bits, self.group) == (other.rows, other.cols, other.bits, other.group)
            && self.shards.iter().zip(&other.shards).all(|(a, b)| (a.first, a.rows) == (b.first, b.rows))
    }

    /// Launches [`few_rows_kernel`] on one shard (see [`Launch`]).
    fn launch(&self, shard: &Shard, l: Launch<'_>) -> Tensor<2> {
        let x = cube(l.x);
        let (n, out_rows) = match &l.gathered {
            Some(g) => (g.per_expert, l.rows),
            None => (shard.rows, l.m),
        };
        let (first_expert, experts) = l.gathered.as_ref().map_or((0, 0), |g| (shard.first / g.per_expert, shard.rows / g.per_expert));
        let x_div = l.gathered.as_ref().map_or(1, |g| g.x_div);
        let out = empty_device_dtype(x.client.clone(), x.device.clone(), [out_rows, n].into(), x.dtype);
        let (ids, combine) = match l.gathered {
            Some(g) => (Some(cube_int(g.ids)), g.combine.map(|(w, slots)| (cube(w), slots))),
            None => (None, None),
        };
        let slots = combine.as_ref().map_or(1, |c| c.1);
        let index_dtype = ids.as_ref().map_or(storage(DType::U32), |ids| storage(ids.dtype));
        let (words, scales) = (cube_int(shard.words.clone()), cube(shard.scales.clone()));
        let up = l.up.map(|u| (cube_int(u.words.clone()), cube(u.scales.clone())));
        let client = x.client.clone();
        let team = team_for(self.row_words);
        // Gathered: a row of workgroups per pair (or token); plain: one, all `m` rows in it.
        let across = if ids.is_some() { out_rows } else { 1 };
        let cube_count = CubeCount::Static(n.div_ceil((CUBE_UNITS / team) as usize) as u32, across as u32, 1);
        let float = storage(x.dtype);
        // SAFETY: every index the kernel computes stays within the buffers bound here: weight rows
        // below `n` (gathered: within the shard's experts), input rows below `m` (gathered: the
        // pairs' `p / x_div`), columns clamped below `k`, outputs and addend `(out_rows, n)`.
        unsafe {
            few_rows_kernel::launch_unchecked(
                &client,
                cube_count,
                CubeDim::new_1d(CUBE_UNITS),
                x.into_buffer_arg(),
                words.into_buffer_arg(),
                scales.into_buffer_arg(),
                up.as_ref().map(|(w, _)| w.clone().into_buffer_arg()).into(),
                up.map(|(_, s)| s.into_buffer_arg()).into(),
                ids.map(|ids| ids.into_buffer_arg()).into(),
                combine.map(|(w, _)| w.into_buffer_arg()).into(),
                l.addend.map(|a| cube(a).into_buffer_arg()).into(),
                out.clone().into_buffer_arg(),
                self.cols,
                n,
                self.row_words,
                self.groups,
                x_div,
                first_expert,
                experts,
                l.m,
                slots,
                self.bits,
                self.group,
                team,
                // Columns the words hold past the row's own: a ragged group, an odd f16 row.
                self.row_words * (32 / self.bits as usize) > self.cols,
                [float, index_dtype],
            );
        }
        Tensor::from_primitive::<Cube>(out)
    }

    /// Launches [`dequantize_kernel`] on one shard.
    #[allow(clippy::too_many_arguments)]
    fn dequantize(&self, shard: &Shard, ids: Option<CubeTensor>, first: usize, count: usize, float: DType, transposed: bool, shape: [usize; 2]) -> Tensor<2> {
        let (words, scales) = (cube_int(shard.words.clone()), cube(shard.scales.clone()));
        let client = words.client.clone();
        let out = empty_device_dtype(client.clone(), words.device.clone(), shape.into(), float);
        let units = count * self.row_words;
        let cube_count = CubeCount::Static(units.div_ceil(CUBE_UNITS as usize).max(1) as u32, 1, 1);
        let index_dtype = ids.as_ref().map_or(storage(DType::U32), |ids| storage(ids.dtype));
        // Gathered ids are global rows: the shard's own first row tells which are its.
        let first = if ids.is_some() { shard.first } else { first };
        // SAFETY: units past `count` rows stop at once; source rows stay below the shard's rows
        // (gathered ids outside it read row 0 and write zeros); columns past `k` are not written.
        unsafe {
            dequantize_kernel::launch_unchecked(
                &client,
                cube_count,
                CubeDim::new_1d(CUBE_UNITS),
                words.into_buffer_arg(),
                scales.into_buffer_arg(),
                ids.map(|ids| ids.into_buffer_arg()).into(),
                out.clone().into_buffer_arg(),
                self.cols,
                self.row_words,
                self.groups,
                count,
                first,
                shard.rows,
                self.bits,
                self.group,
                transposed,
                [storage(float), index_dtype],
            );
        }
        Tensor::from_primitive::<Cube>(out)
    }
}

/// One launch of the few-rows kernel: `m` rows of `x` through one shard (plain), or `rows`
/// gathered (token, expert) pairs — or tokens, with `combine` — through the experts in it.
struct Launch<'a> {
    x: Tensor<2>,
    m: usize,
    /// The gate/up pair's second matrix: `silu(x · Wᵀ) ⊙ (x · Uᵀ)`.
    up: Option<&'a Shard>,
    /// Output rows of a gathered launch.
    rows: usize,
    gathered: Option<Gathered>,
    addend: Option<Tensor<2>>,
}

impl Launch<'_> {
    fn plain(x: Tensor<2>, m: usize) -> Self {
        Self { x, m, up: None, rows: 0, gathered: None, addend: None }
    }
}

/// Experts picked on the device: pair `p` reads input row `p / x_div` through expert `ids[p]`
/// (`per_expert` rows each); `combine`: the pairs' routing weights and pairs per token.
#[derive(Clone)]
struct Gathered {
    ids: Tensor<1, Int>,
    per_expert: usize,
    x_div: usize,
    combine: Option<(Tensor<1>, usize)>,
}

/// Little-endian `u32` words of `bytes` (a whole number of words).
fn words_of(bytes: &[u8]) -> Vec<u32> {
    bytes.chunks_exact(4).map(|b| u32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()
}

/// Shards of `rows_per_shard` rows of a `rows`-row matrix, `part(first, rows)` giving a shard's
/// words and scales, uploaded to `device`.
fn shards(rows: usize, rows_per_shard: usize, part: impl Fn(usize, usize) -> (Vec<u32>, Vec<f32>), device: &Device) -> Vec<Shard> {
    let mut shards = Vec::new();
    let mut first = 0;
    while first < rows {
        let count = rows_per_shard.max(1).min(rows - first);
        let (words, scales) = part(first, count);
        let (n_words, n_scales) = (words.len(), scales.len());
        shards.push(Shard {
            first,
            rows: count,
            words: Tensor::from_data(TensorData::new(words, [n_words]), (device, DType::U32)),
            scales: Tensor::from_data(TensorData::new(scales, [n_scales]), (device, DType::F32)),
        });
        first += count;
    }
    shards
}

/// The shards' outputs added up.
fn sum(parts: impl Iterator<Item = Tensor<2>>) -> Tensor<2> {
    parts.reduce(|total, y| total + y).expect("a matrix on the device has at least one shard")
}

/// Products of column blocks side by side (one block: as it is).
fn cat_columns(parts: Vec<Tensor<2>>) -> Tensor<2> {
    if parts.len() == 1 { parts.into_iter().next().expect("one part") } else { Tensor::cat(parts, 1) }
}
