//! SAM's attention with decomposed relative positions, on the host (the CPU backend):
//! `softmax(q·kᵀ/√d + rel_h[q, ky] + rel_w[q, kx])·v` over a `h × w` grid, one block of queries at a
//! time. Each block's scores (at most [`BLOCK_SCORES`] floats: they stay in the core's cache) are one
//! GEMM, the position terms are added from their two small factors (the dense `n × n` bias is never
//! built), then softmax and a second GEMM. burn's attention, given the dense bias, writes and reads it
//! and the scores several times through memory: at 1024 px (4096 tokens, 12 heads) that is most of a
//! global block's time.

use super::ops::map_par;
use super::vmath::exp;

/// Score floats per block of queries (4 MiB).
const BLOCK_SCORES: usize = 1 << 20;

/// Shapes of one call: `bh` (batch × heads) independent attentions over `h × w` tokens of `hd` values.
#[derive(Debug, Clone, Copy)]
pub(super) struct Grid {
    pub bh: usize,
    pub h: usize,
    pub w: usize,
    pub hd: usize,
}

/// `q`, `k`, `v`: `(bh, n, hd)` row-major with `n = h·w`; `rel_h`: `(bh, n, h)`, `rel_w`: `(bh, n, w)`.
/// Returns `(bh, n, hd)`. Blocks of queries run on rayon's threads; each result row depends on its
/// own query only, so any thread count gives the same bits.
pub(super) fn attend(g: Grid, q: &[f32], k: &[f32], v: &[f32], rel_h: &[f32], rel_w: &[f32]) -> Vec<f32> {
    let Grid { bh, h, w, hd } = g;
    let n = h * w;
    debug_assert!(q.len() == bh * n * hd && k.len() == q.len() && v.len() == q.len());
    debug_assert!(rel_h.len() == bh * n * h && rel_w.len() == bh * n * w);
    let rows = (BLOCK_SCORES / n.max(1)).clamp(1, n.max(1));
    let tasks: Vec<(usize, usize)> = (0..bh).flat_map(|i| (0..n).step_by(rows).map(move |r| (i, r))).collect();
    let scale = 1.0 / (hd as f32).sqrt();
    let blocks = map_par(tasks, |(i, start)| {
        let len = rows.min(n - start);
        let at = |t: &[f32], width: usize| t[(i * n + start) * width..(i * n + start + len) * width].as_ptr();
        let (keys, values) = (&k[i * n * hd..(i + 1) * n * hd], &v[i * n * hd..(i + 1) * n * hd]);
        let mut scores = vec![0f32; len * n];
        // SAFETY (both products): every pointer/stride pair addresses inside its slice. Scores
        // `(len, n)` row-major = scale · q block `(len, hd)` row-major × keys `(n, hd)` read as their
        // `(hd, n)` transpose; out `(len, hd)` row-major = scores × values `(n, hd)` row-major.
        unsafe {
            gemm::gemm(len, n, hd, scores.as_mut_ptr(), 1, n as isize, false, at(q, hd), 1, hd as isize, keys.as_ptr(), hd as isize, 1, 0.0, scale, false, false, false, gemm::Parallelism::None);
        }
        let (rh, rw) = (&rel_h[(i * n + start) * h..(i * n + start + len) * h], &rel_w[(i * n + start) * w..(i * n + start + len) * w]);
        positions_softmax(&mut scores, rh, rw, h, w);
        let mut out = vec![0f32; len * hd];
        unsafe {
            gemm::gemm(len, hd, n, out.as_mut_ptr(), 1, hd as isize, false, scores.as_ptr(), 1, n as isize, values.as_ptr(), 1, hd as isize, 0.0, 1.0, false, false, false, gemm::Parallelism::None);
        }
        out
    });
    blocks.concat()
}

/// Adds the position terms to each row of `scores` (`rh` `h` and `rw` `w` values a row), then a
/// softmax per row: with AVX-512 where the CPU has it (chosen at run time; the same operations in
/// the same order, so the same bits), else the portable build.
fn positions_softmax(scores: &mut [f32], rh: &[f32], rw: &[f32], h: usize, w: usize) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F (checked above).
        return unsafe { positions_softmax_avx512(scores, rh, rw, h, w) };
    }
    positions_softmax_rows(scores, rh, rw, h, w)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
unsafe fn positions_softmax_avx512(scores: &mut [f32], rh: &[f32], rw: &[f32], h: usize, w: usize) {
    positions_softmax_rows(scores, rh, rw, h, w)
}

#[inline(always)]
fn positions_softmax_rows(scores: &mut [f32], rh: &[f32], rw: &[f32], h: usize, w: usize) {
    for ((row, rh), rw) in scores.chunks_exact_mut(h * w).zip(rh.chunks_exact(h)).zip(rw.chunks_exact(w)) {
        for (cells, &y) in row.chunks_exact_mut(w).zip(rh) {
            for (s, &x) in cells.iter_mut().zip(rw) {
                *s += y + x;
            }
        }
        softmax(row);
    }
}

/// In place, with the maximum subtracted; the exponential is [`exp`] (vectorised). Maximum and sum run in 16
/// lanes (so they vectorise); the lanes then fold in a fixed order.
#[inline(always)]
fn softmax(row: &mut [f32]) {
    let mut lanes = [f32::NEG_INFINITY; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for i in 0..16 {
            lanes[i] = lanes[i].max(chunk[i]);
        }
    }
    let max = chunks.remainder().iter().chain(&lanes).copied().fold(f32::NEG_INFINITY, f32::max);
    for x in row.iter_mut() {
        *x = exp(*x - max);
    }
    let mut lanes = [0f32; 16];
    let mut chunks = row.chunks_exact(16);
    for chunk in &mut chunks {
        for i in 0..16 {
            lanes[i] += chunk[i];
        }
    }
    let sum: f32 = lanes.iter().chain(chunks.remainder()).sum();
    let inv = 1.0 / sum;
    for x in row.iter_mut() {
        *x *= inv;
    }
}

#[cfg(test)]
mod tests {
    use super::{Grid, attend};

    /// Against a plain softmax over the dense bias, in f64: grids 1×1 … 9×7 (several query blocks
    /// for 64×64), head sizes 1 … 64.
    #[test]
    fn host_attention_equals_the_dense_definition() {
        let mut seed = 7u64;
        let mut next = move || {
            seed = seed.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1_442_695_040_888_963_407);
            ((seed >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
        };
        for g in [Grid { bh: 1, h: 1, w: 1, hd: 1 }, Grid { bh: 3, h: 9, w: 7, hd: 16 }, Grid { bh: 2, h: 64, w: 64, hd: 8 }, Grid { bh: 2, h: 5, w: 5, hd: 64 }] {
            let n = g.h * g.w;
            let mut fill = |len: usize| (0..len).map(|_| next()).collect::<Vec<f32>>();
            let (q, k, v) = (fill(g.bh * n * g.hd), fill(g.bh * n * g.hd), fill(g.bh * n * g.hd));
            let (rh, rw) = (fill(g.bh * n * g.h), fill(g.bh * n * g.w));
            let got = attend(g, &q, &k, &v, &rh, &rw);
            let scale = 1.0 / (g.hd as f64).sqrt();
            let mut err = 0f64;
            for i in 0..g.bh {
                for a in 0..n {
                    fn row(t: &[f32], at: usize, hd: usize) -> &[f32] {
                        &t[at * hd..(at + 1) * hd]
                    }
                    let row = |t, j: usize| row(t, i * n + j, g.hd);
                    let scores: Vec<f64> = (0..n)
                        .map(|b| {
                            let dot: f64 = row(&q, a).iter().zip(row(&k, b)).map(|(x, y)| *x as f64 * *y as f64).sum();
                            dot * scale + rh[(i * n + a) * g.h + b / g.w] as f64 + rw[(i * n + a) * g.w + b % g.w] as f64
                        })
                        .collect();
                    let max = scores.iter().copied().fold(f64::NEG_INFINITY, f64::max);
                    let sum: f64 = scores.iter().map(|s| (s - max).exp()).sum();
                    for c in 0..g.hd {
                        let want: f64 = (0..n).map(|b| (scores[b] - max).exp() / sum * row(&v, b)[c] as f64).sum();
                        err = err.max((got[(i * n + a) * g.hd + c] as f64 - want).abs());
                    }
                }
            }
            assert!(err <= 2e-6, "{g:?}: max error {err}");
        }
    }
}
