//! The few-rows product (a decoding step): int8 activations against the packed int4/int8 weights.
//!
//! Each input row is quantized to int8 per group of the weight's group size (symmetric, scale
//! `amax / 127`, as llama.cpp's `Q8_0` does for its CPU dot products), so that a group's product is
//! an exact integer dot product, then scaled by the two scales:
//!
//! `y[i][r] = Σ_g (s_w[r][g] · s_x[i][g]) · Σ_{j in g} q_w[r][j] · q_x[i][j]`
//!
//! q4 stores `q + 8`: its dot product is `Σ (q + 8) · x − 8 · Σ x`, with the sums of `x` computed
//! once per input. Each group's integer products go to [`LANES`] lanes by position (value `v` to
//! lane `(v mod 32) / 4`, the lanes of AVX2's `maddubs` + `madd` over 32 values) and each lane keeps
//! its own float sum, reduced once per output: integer sums are exact and the float operations are
//! the same, lane by lane, in every build, so the AVX2 path (32 products per instruction) and the
//! portable one give the same bits. Against float activations each input value is off by at most
//! half its group's step, so `|y − x · Wᵀ| ≤ Σ_j |w_j| · s_x(j) / 2` (the tests hold the kernels to
//! that bound). Unpacking nibbles into floats cost more than reading the bytes; this is what lets
//! int4 run at the speed of memory.

use std::ops::Range;

use super::scheme::{Bits, PackedMatrix, abs_max, round_to_level};

/// Lanes of a group's integer products and of the float sums.
const LANES: usize = 8;

/// The lane of a group's value `v`.
#[inline(always)]
fn lane(v: usize) -> usize {
    v % 32 / 4
}

/// Input rows quantized for [`few_rows`]: `(m, k)` int8 values with a scale and per-lane sums per group.
pub(super) struct QuantizedInput {
    m: usize,
    k: usize,
    group: usize,
    q: Vec<i8>,
    scales: Vec<f32>,
    sums: Vec<[i32; LANES]>,
}

impl QuantizedInput {
    /// Quantizes `x (m, k)` row-major in groups of `group` values along `k`.
    pub(super) fn new(x: &[f32], m: usize, k: usize, group: usize) -> Self {
        let groups = k.div_ceil(group);
        let mut input = Self { m, k, group, q: vec![0; m * k], scales: vec![0.0; m * groups], sums: vec![[0; LANES]; m * groups] };
        for i in 0..m {
            for g in 0..groups {
                let span = i * k + g * group..i * k + ((g + 1) * group).min(k);
                let scale = abs_max(&x[span.clone()]) / 127.0;
                let inverse = if scale > 0.0 && scale.is_finite() { 1.0 / scale } else { 0.0 };
                let mut sum = [0i32; LANES];
                for (v, (q, &value)) in input.q[span.clone()].iter_mut().zip(&x[span]).enumerate() {
                    *q = round_to_level(value * inverse, 127.0);
                    sum[lane(v)] += i32::from(*q);
                }
                input.scales[i * groups + g] = scale;
                input.sums[i * groups + g] = sum;
            }
        }
        input
    }

    /// The values as float again (`q · scale`): what the kernels multiply exactly.
    #[cfg(test)]
    pub(super) fn dequantize(&self) -> Vec<f32> {
        let groups = self.k.div_ceil(self.group);
        (0..self.m * self.k).map(|n| f32::from(self.q[n]) * self.scales[n / self.k * groups + n % self.k / self.group]).collect()
    }
}

/// Weight rows `rows` against every input row into `y`, `(m, rows.len())` row-major.
pub(super) fn few_rows(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    debug_assert!(x.k == w.cols && x.group == w.spec.group && y.len() == x.m * rows.len());
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        return unsafe { avx2::few_rows(w, x, rows, y) };
    }
    few_rows_portable(w, x, rows, y)
}

/// The plain build: every group through [`group_lanes`].
pub(super) fn few_rows_portable(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    let (k, g, groups, rb, width) = (w.cols, w.spec.group, w.groups(), w.row_bytes(), rows.len());
    for (j, r) in rows.enumerate() {
        let bytes = &w.data[r * rb..(r + 1) * rb];
        let scales = &w.scales[r * groups..(r + 1) * groups];
        for i in 0..x.m {
            let mut acc = [0f32; LANES];
            let mut offset = 0;
            for (gi, &s) in scales.iter().enumerate() {
                let xq = &x.q[i * k + gi * g..i * k + ((gi + 1) * g).min(k)];
                let (lanes, used) = group_lanes(w.spec.bits, &bytes[offset..], xq, &x.sums[i * groups + gi]);
                offset += used;
                add_scaled(&mut acc, &lanes, s * x.scales[i * groups + gi]);
            }
            y[i * width + j] = reduce(acc);
        }
    }
}

/// One group's integer products of stored weights `bytes` with `xq` (per-lane sums of `xq`:
/// `sums`), by lane; returns them and the bytes the group takes.
#[inline(always)]
fn group_lanes(bits: Bits, bytes: &[u8], xq: &[i8], sums: &[i32; LANES]) -> ([i32; LANES], usize) {
    let mut lanes = [0i32; LANES];
    match bits {
        Bits::Q8 => {
            for (v, (&b, &q)) in bytes.iter().zip(xq).enumerate() {
                lanes[lane(v)] += i32::from(b as i8) * i32::from(q);
            }
            (lanes, xq.len())
        }
        Bits::Q4 => {
            let half = xq.len().div_ceil(2);
            for (v, &q) in xq.iter().enumerate() {
                let nibble = if v < half { bytes[v] & 15 } else { bytes[v - half] >> 4 };
                lanes[lane(v)] += i32::from(nibble) * i32::from(q);
            }
            for (l, s) in lanes.iter_mut().zip(sums) {
                *l -= 8 * s;
            }
            (lanes, half)
        }
    }
}

/// `acc[l] += lanes[l] · scale`, lane by lane (what the AVX2 build does in one register).
#[inline(always)]
fn add_scaled(acc: &mut [f32; LANES], lanes: &[i32; LANES], scale: f32) {
    for (a, &l) in acc.iter_mut().zip(lanes) {
        *a += l as f32 * scale;
    }
}

/// The lanes' pairwise sum, 8 → 4 → 2 → 1, in one order for every build.
#[inline(always)]
fn reduce(mut lanes: [f32; LANES]) -> f32 {
    let mut n = LANES;
    while n > 1 {
        n /= 2;
        for l in 0..n {
            lanes[l] += lanes[l + n];
        }
    }
    lanes[0]
}

#[cfg(target_arch = "x86_64")]
mod avx2 {
    use std::arch::x86_64::*;
    use std::ops::Range;

    use super::{LANES, QuantizedInput, add_scaled, group_lanes, reduce};
    use crate::quant::scheme::{Bits, PackedMatrix};

    /// Full groups with `maddubs` (unsigned nibbles or |w| times signed inputs, pairs summed into
    /// i16 without overflow: at most 2·2·15·127 or 2·128·127), a ragged last group through the
    /// plain [`group_lanes`]; the same lane-wise float operations as the plain build. Four weight
    /// rows at a time share each input load and keep four independent sums in flight, while the
    /// rows two blocks ahead are prefetched (decoding q4 13 → 20 tokens/s).
    #[target_feature(enable = "avx2")]
    pub(super) unsafe fn few_rows(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
        let mut r = rows.start;
        while r + 4 <= rows.end {
            // SAFETY: the same CPU feature as this function.
            unsafe { block::<4>(w, x, r, r - rows.start, rows.len(), y) };
            r += 4;
        }
        while r < rows.end {
            // SAFETY: as above.
            unsafe { block::<1>(w, x, r, r - rows.start, rows.len(), y) };
            r += 1;
        }
    }

    /// Weight rows `r..r + N` into columns `column..column + N` of `y` (`(m, width)`).
    #[target_feature(enable = "avx2")]
    unsafe fn block<const N: usize>(w: &PackedMatrix, x: &QuantizedInput, r: usize, column: usize, width: usize, y: &mut [f32]) {
        let (k, g, groups, rb) = (w.cols, w.spec.group, w.groups(), w.row_bytes());
        let full = k / g;
        let group_bytes = w.spec.row_bytes(g);
        let bytes: [&[u8]; N] = std::array::from_fn(|t| &w.data[(r + t) * rb..(r + t + 1) * rb]);
        // The next block's bytes, fetched a few lines per group: a matrix is short runs of rows
        // (an expert's is 0.6 MB), too short for the hardware prefetcher to ramp up on.
        let next = w.data.as_ptr().wrapping_add((r + 2 * N) * rb);
        let ahead = (N * rb).div_ceil(full.max(1)).next_multiple_of(64);
        let scales: [&[f32]; N] = std::array::from_fn(|t| &w.scales[(r + t) * groups..(r + t + 1) * groups]);
        for i in 0..x.m {
            let xrow = &x.q[i * k..(i + 1) * k];
            let sums = &x.sums[i * groups..(i + 1) * groups];
            let xscales = &x.scales[i * groups..(i + 1) * groups];
            let mut acc = [_mm256_setzero_ps(); N];
            for gi in 0..full {
                let xq = &xrow[gi * g..(gi + 1) * g];
                if i == 0 {
                    for line in (0..ahead).step_by(64) {
                        // A hint only: prefetching never faults, past the end of the data included.
                        _mm_prefetch::<_MM_HINT_T0>(next.wrapping_add(gi * ahead + line) as *const i8);
                    }
                }
                for t in 0..N {
                    let wb = &bytes[t][gi * group_bytes..(gi + 1) * group_bytes];
                    // SAFETY: `wb` and `xq` hold exactly one full group, `sums[gi]` eight i32.
                    let lanes = unsafe {
                        match w.spec.bits {
                            Bits::Q4 => {
                                let sum = _mm256_loadu_si256(sums[gi].as_ptr() as *const __m256i);
                                _mm256_sub_epi32(lanes_q4(wb, xq), _mm256_slli_epi32(sum, 3))
                            }
                            Bits::Q8 => lanes_q8(wb, xq),
                        }
                    };
                    let scale = _mm256_set1_ps(scales[t][gi] * xscales[gi]);
                    acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), scale));
                }
            }
            for t in 0..N {
                let mut out = [0f32; LANES];
                // SAFETY: `out` holds eight f32.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc[t]) };
                if full < groups {
                    let (lanes, _) = group_lanes(w.spec.bits, &bytes[t][full * group_bytes..], &xrow[full * g..], &sums[full]);
                    add_scaled(&mut out, &lanes, scales[t][full] * xscales[full]);
                }
                y[i * width + column + t] = reduce(out);
            }
        }
    }

    /// `Σ nibble · x` by lane of one full q4 group (`xq.len()` = 32, 64 or 128 values in
    /// `xq.len() / 2` bytes: byte `i` holds value `i` low and value `i + len/2` high).
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_q4(wb: &[u8], xq: &[i8]) -> __m256i {
        let half = wb.len();
        debug_assert!(xq.len() == 2 * half && half % 16 == 0);
        let (wp, xp) = (wb.as_ptr(), xq.as_ptr());
        let ones = _mm256_set1_epi16(1);
        // SAFETY (loads): every offset + width stays inside `wb` / `xq` (lengths asserted above).
        unsafe {
            if half == 16 {
                let mask = _mm_set1_epi8(15);
                let v = _mm_loadu_si128(wp as *const __m128i);
                let nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), mask), _mm_and_si128(v, mask));
                let x = _mm256_loadu_si256(xp as *const __m256i);
                return _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, x), ones);
            }
            let mask = _mm256_set1_epi8(15);
            let mut acc = _mm256_setzero_si256();
            for c in (0..half).step_by(32) {
                let v = _mm256_loadu_si256(wp.add(c) as *const __m256i);
                let low = _mm256_maddubs_epi16(_mm256_and_si256(v, mask), _mm256_loadu_si256(xp.add(c) as *const __m256i));
                let high = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), _mm256_loadu_si256(xp.add(half + c) as *const __m256i));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(_mm256_add_epi16(low, high), ones));
            }
            acc
        }
    }

    /// `Σ w · x` by lane of one full q8 group (32, 64 or 128 values): `|w| · (x with w's sign)`.
    #[target_feature(enable = "avx2")]
    unsafe fn lanes_q8(wb: &[u8], xq: &[i8]) -> __m256i {
        debug_assert!(wb.len() == xq.len() && wb.len() % 32 == 0);
        let ones = _mm256_set1_epi16(1);
        let mut acc = _mm256_setzero_si256();
        for c in (0..wb.len()).step_by(32) {
            // SAFETY: `c + 32 ≤ len` for both slices (asserted above).
            unsafe {
                let w = _mm256_loadu_si256(wb.as_ptr().add(c) as *const __m256i);
                let x = _mm256_loadu_si256(xq.as_ptr().add(c) as *const __m256i);
                let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(x, w));
                acc = _mm256_add_epi32(acc, _mm256_madd_epi16(p, ones));
            }
        }
        acc
    }
}
