//! The `#[cube]` kernels: one source, compiled to WGSL for native wgpu and the browser alike.
//!
//! They read the device layout of [`super::packed`], rows of little-endian `u32` words:
//! * quantized (`bits` 4 or 8): `groups` whole groups of `group · bits / 32` words (the last group
//!   padded with zeros), one f32 scale per group. Within a q4 group, word `j` holds columns
//!   `4j … 4j+3` in its low nibbles and `group/2 + 4j …` in its high ones (stored `q + 8`); a q8
//!   word holds four consecutive columns as two's-complement bytes. So `w = scale · q`.
//! * float (`bits` 16 or 32): the row's values in order, two f16 or one f32 per word (a float
//!   checkpoint's weights, read by the same kernels; no scales).
//!
//! Only what WebGPU guarantees is used: workgroups of [`CUBE_UNITS`] units, at most 16 KiB of
//! workgroup memory, no subgroup operations, f32 arithmetic whatever the activations' type.

use cubecl::prelude::*;

/// Units per workgroup of the few-rows kernel.
pub const CUBE_UNITS: u32 = 256;
/// Most units per output row: a row's team strides the row's words (neighbours read neighbouring
/// words, so a team's reads coalesce), then their partial sums are added in workgroup memory.
pub const MAX_TEAM: u32 = 32;

/// The team size for rows of `row_words` words: a power of two up to [`MAX_TEAM`] that leaves each
/// unit at least 4 words (narrow rows: fewer units per row, more rows per workgroup, fewer halving
/// steps).
pub fn team_for(row_words: usize) -> u32 {
    ((row_words / 4).max(1).next_power_of_two() as u32).min(MAX_TEAM)
}

/// Input column `col` of the row starting at `base` as f32. With `padded` rows (a ragged last
/// group, an odd f16 row) 0 past the row's `k` columns, the index clamped so the read stays inside
/// the row; without, the plain read (every column a word holds is real).
#[cube]
fn input<F: Float>(x: &[F], base: usize, col: usize, k: usize, #[comptime] padded: bool) -> f32 {
    if comptime![padded] {
        let at = base + clamp_max(col, k - 1);
        select(col < k, f32::cast_from(x[at]), 0.0)
    } else {
        f32::cast_from(x[base + col])
    }
}

/// An f16 value's bits (the low 16 of `h`) as f32: normal, subnormal, infinite and NaN.
#[cube]
fn half_to_f32(h: u32) -> f32 {
    let sign = (h >> 15) & 1;
    let exponent = (h >> 10) & 31;
    let mantissa = h & 1023;
    // Normal: the exponent rebiased from 15 to 127; all ones: infinity or NaN; zero: mantissa · 2⁻²⁴.
    let normal = f32::reinterpret((sign << 31) | ((exponent + 112) << 23) | (mantissa << 13));
    let special = f32::reinterpret((sign << 31) | 0x7f80_0000u32 | (mantissa << 13));
    let subnormal = (1.0 - 2.0 * f32::cast_from(sign)) * f32::cast_from(mantissa) * 5.960_464_5e-8;
    select(exponent == 0, subnormal, select(exponent == 31, special, normal))
}

/// Value `j` of a word (before a group's scale).
#[cube]
fn value_of(word: u32, #[comptime] j: u32, #[comptime] bits: u32) -> f32 {
    if comptime![bits == 4] {
        // Stored q + 8 (0..=15): the low nibbles first, then the high ones.
        let shift = comptime![if j < 4 { 8 * j } else { 8 * (j - 4) + 4 }];
        f32::cast_from((word >> shift) & 15) - 8.0
    } else if comptime![bits == 8] {
        // Branchless two's complement: a byte of 128 or more stands for byte − 256.
        let raw = (word >> comptime![8 * j]) & 255;
        f32::cast_from(raw) - select(raw >= 128, 256.0, 0.0)
    } else if comptime![bits == 16] {
        half_to_f32((word >> comptime![16 * j]) & 0xffff)
    } else {
        f32::reinterpret(word)
    }
}

/// Where value `j` of a word lies, counted from the word's first column.
fn value_offset(j: u32, bits: u32, group: usize) -> usize {
    if bits == 4 && j >= 4 { group / 2 + j as usize - 4 } else { j as usize }
}

/// `Σ w · x` over the values of one word (a group's scale not applied): `col` is the word's
/// first column within its row, `base` where the input row starts.
#[cube]
fn word_dot<F: Float>(word: u32, x: &[F], base: usize, col: usize, k: usize, #[comptime] bits: u32, #[comptime] group: usize, #[comptime] padded: bool) -> f32 {
    let mut sum = 0.0f32;
    #[unroll]
    for j in 0..comptime![32 / bits] {
        sum += value_of(word, j, bits) * input::<F>(x, base, col + comptime![value_offset(j, bits, group)], k, padded);
    }
    sum
}

/// The first column of word `w` of a row. Quantized: word `j` of a group starts at column `4j` of
/// it (q8: four bytes; q4: the four low nibbles, the high ones half a group later); float: `w`
/// times the values a word holds.
#[cube]
fn word_column(w: usize, #[comptime] bits: u32, #[comptime] group: usize) -> usize {
    if comptime![bits >= 16] {
        w * comptime![32 / bits as usize]
    } else {
        let words_per_group = comptime![group * bits as usize / 32];
        (w / words_per_group) * group + (w % words_per_group) * 4
    }
}

/// The factor of word `w`'s values in row `row`: `factor` times its group's scale (quantized) or
/// `factor` (float: no scales).
#[cube]
fn word_scale(scales: &[f32], row: usize, w: usize, groups: usize, factor: f32, #[comptime] bits: u32, #[comptime] group: usize) -> f32 {
    if comptime![bits >= 16] { factor } else { factor * scales[row * groups + w / comptime![group * bits as usize / 32]] }
}

/// Adds `factor ·` one weight row's products with `m` input rows (from `x_first` on) to the
/// accumulators, this unit's words only: `acc[i] += factor · Σ w · x[x_first + i]`; with `up`,
/// `acc[m + i]` gets the same of the second matrix's row.
#[cube]
#[allow(clippy::too_many_arguments)]
fn accumulate<F: Float>(
    acc: &mut Array<f32>,
    x: &[F],
    words: &[u32],
    scales: &[f32],
    up_words: ComptimeOption<&[u32]>,
    up_scales: ComptimeOption<&[f32]>,
    weight_row: usize,
    x_first: usize,
    factor: f32,
    lane: usize,
    k: usize,
    row_words: usize,
    groups: usize,
    #[comptime] m: usize,
    #[comptime] bits: u32,
    #[comptime] group: usize,
    #[comptime] team: u32,
    #[comptime] padded: bool,
) {
    let mut w = lane;
    while w < row_words {
        let at = weight_row * row_words + w;
        let col = word_column(w, bits, group);
        let word = words[at];
        let scale = word_scale(scales, weight_row, w, groups, factor, bits, group);
        #[unroll]
        for i in 0..m {
            acc[i] += scale * word_dot::<F>(word, x, (x_first + i) * k, col, k, bits, group, padded);
        }
        #[comptime]
        match (up_words, up_scales) {
            (ComptimeOption::Some(up_words), ComptimeOption::Some(up_scales)) => {
                let up_word = up_words[at];
                let up_scale = word_scale(up_scales, weight_row, w, groups, factor, bits, group);
                #[unroll]
                for i in 0..m {
                    acc[m + i] += up_scale * word_dot::<F>(up_word, x, (x_first + i) * k, col, k, bits, group, padded);
                }
            }
            _ => {}
        }
        w += team as usize;
    }
}

/// `y = x · Wᵀ` for few input rows, `W` packed `(n, k)`; optionally `silu(x · Wᵀ) ⊙ (x · Uᵀ)`
/// with a second matrix `U` of the same shape (`up`: the gate/up pair of an MLP in one pass), and
/// `y + addend` (a residual; `addend` shaped as `out`).
///
/// * Plain (`ids` none): `x` is `(m, k)`, `out` `(m, n)`; every weight row is read once for the
///   `m` rows (a decoding step of `m` sequences).
/// * Gathered (`ids` some, `m = 1`): cube row `s` (`CUBE_POS_Y`) is one (token, expert) pair —
///   input row `s / x_div`, weight rows `(ids[s] − first) · n …` of a stack of experts `n` rows
///   each, `out` row `s` — or, with `combine` (the routing weights of `slots` pairs per token),
///   one token: `out` row `s` is `Σ_j combine[p] · x[p / x_div] · W_{ids[p]}ᵀ` over its pairs
///   `p = s · slots + j`. A pair whose expert is not in `first .. first + experts` (another
///   shard's) adds nothing. The router's choice never leaves the device.
///
/// Workgroups of [`CUBE_UNITS`] units, `CUBE_UNITS / team` output rows each ([`team_for`]).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn few_rows_kernel<F: Float, I: Int>(
    x: &[F],
    words: &[u32],
    scales: &[f32],
    up_words: ComptimeOption<&[u32]>,
    up_scales: ComptimeOption<&[f32]>,
    ids: ComptimeOption<&[I]>,
    combine: ComptimeOption<&[F]>,
    addend: ComptimeOption<&[F]>,
    out: &mut [F],
    k: usize,
    n: usize,
    row_words: usize,
    groups: usize,
    x_div: usize,
    first: usize,
    experts: usize,
    #[comptime] m: usize,
    #[comptime] slots: usize,
    #[comptime] bits: u32,
    #[comptime] group: usize,
    #[comptime] team: u32,
    #[comptime] padded: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let glu = comptime![up_words.is_some()];
    let gathered = comptime![ids.is_some()];
    let accumulators = comptime![if glu { 2 * m } else { m }];
    let lane = (UNIT_POS % team) as usize;
    let row = CUBE_POS_X as usize * comptime![(CUBE_UNITS / team) as usize] + (UNIT_POS / team) as usize;
    let slot = CUBE_POS_Y as usize;

    let mut acc = Array::<f32>::new(accumulators);
    #[unroll]
    for a in 0..accumulators {
        acc[a] = 0.0;
    }
    // Whether anything was added (a gathered pair of another shard's expert: nothing).
    let mut valid = row < n;
    if row < n {
        #[comptime]
        match ids {
            ComptimeOption::Some(ids) => {
                valid = false;
                #[unroll]
                for j in 0..slots {
                    let pair = slot * slots + j;
                    let expert = usize::cast_from(ids[pair]);
                    if expert >= first && expert < first + experts {
                        valid = true;
                        let mut factor = 1.0f32;
                        #[comptime]
                        match combine {
                            ComptimeOption::Some(weights) => factor = f32::cast_from(weights[pair]),
                            ComptimeOption::None => {}
                        }
                        accumulate::<F>(&mut acc, x, words, scales, up_words, up_scales, (expert - first) * n + row, pair / x_div, factor, lane, k, row_words, groups, m, bits, group, team, padded);
                    }
                }
            }
            ComptimeOption::None => {
                accumulate::<F>(&mut acc, x, words, scales, up_words, up_scales, row, 0, 1.0f32, lane, k, row_words, groups, m, bits, group, team, padded);
            }
        }
    }

    // The team's partial sums, halved log2(team) times in workgroup memory.
    let mut partial = Shared::<[f32]>::new_slice(comptime![CUBE_UNITS as usize * accumulators]);
    let unit = UNIT_POS as usize;
    #[unroll]
    for a in 0..accumulators {
        partial[a * CUBE_UNITS as usize + unit] = acc[a];
    }
    sync_cube();
    #[unroll]
    for step in 0..comptime![team.trailing_zeros()] {
        let stride = comptime![(team >> (step + 1)) as usize];
        if lane < stride {
            #[unroll]
            for a in 0..accumulators {
                let at = a * CUBE_UNITS as usize + unit;
                partial[at] += partial[at + stride];
            }
        }
        sync_cube();
    }

    if lane == 0 && row < n {
        #[unroll]
        for i in 0..m {
            let mut y = partial[i * CUBE_UNITS as usize + unit];
            if comptime![glu] {
                // silu(g) · u, as burn's silu computes it: g · sigmoid(g).
                let u = partial[(m + i) * CUBE_UNITS as usize + unit];
                y = y / (1.0 + f32::exp(-y)) * u;
            }
            y = select(valid, y, 0.0);
            let at = select(gathered, slot, i) * n + row;
            #[comptime]
            match addend {
                ComptimeOption::Some(addend) => y += f32::cast_from(addend[at]),
                ComptimeOption::None => {}
            }
            out[at] = F::cast_from(y);
        }
    }
}

/// Dequantizes weight rows into floats (float words: converts them), one unit per word.
///
/// * Rows `first .. first + count` (`ids` none); `transposed`: `out` is `(k, count)` — the layout
///   of a burn `Linear` weight, ready for a many-rows product — else `(count, k)`.
/// * Gathered (`ids` some, `count` ids): `out` row `i` is weight row `ids[i] − first` (an
///   embedding lookup), zeros for an id outside this shard's `first .. first + shard_rows`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
pub fn dequantize_kernel<F: Float, I: Int>(
    words: &[u32],
    scales: &[f32],
    ids: ComptimeOption<&[I]>,
    out: &mut [F],
    k: usize,
    row_words: usize,
    groups: usize,
    count: usize,
    first: usize,
    shard_rows: usize,
    #[comptime] bits: u32,
    #[comptime] group: usize,
    #[comptime] transposed: bool,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let i = ABSOLUTE_POS / row_words;
    let w = ABSOLUTE_POS % row_words;
    if i >= count {
        terminate!();
    }
    let mut source = first + i;
    let mut valid = true;
    #[comptime]
    match ids {
        ComptimeOption::Some(ids) => {
            let id = usize::cast_from(ids[i]);
            valid = id >= first && id < first + shard_rows;
            source = select(valid, id - first, 0);
        }
        ComptimeOption::None => {}
    }
    let word = words[source * row_words + w];
    let scale = select(valid, word_scale(scales, source, w, groups, 1.0f32, bits, group), 0.0);
    let col = word_column(w, bits, group);
    #[unroll]
    for j in 0..comptime![32 / bits] {
        write_value::<F>(out, scale * value_of(word, j, bits), i, col + comptime![value_offset(j, bits, group)], k, count, transposed);
    }
}

/// Writes value `(row i, column col)` of a `(count, k)` block (transposed: `(k, count)`), unless
/// the column is the padding past `k`.
#[cube]
fn write_value<F: Float>(out: &mut [F], value: f32, i: usize, col: usize, k: usize, count: usize, #[comptime] transposed: bool) {
    if col < k {
        let at = if comptime![transposed] { col * count + i } else { i * k + col };
        out[at] = F::cast_from(value);
    }
}
