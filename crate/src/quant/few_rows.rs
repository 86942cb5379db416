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
        assert!(w.data.len() >= (r + N) * rb && w.scales.len() >= (r + N) * groups && x.q.len() >= x.m * k && x.sums.len() >= x.m * groups);
        // The next block's bytes, fetched a few lines per group: a matrix is short runs of rows
        // (an expert's is 0.6 MB), too short for the hardware prefetcher to ramp up on.
        let next = w.data.as_ptr().wrapping_add((r + 2 * N) * rb);
        let ahead = (N * rb).div_ceil(full.max(1)).next_multiple_of(64);
        let rows = Rows { data: w.data[r * rb..].as_ptr(), row_bytes: rb, scales: w.scales[r * groups..].as_ptr(), groups, full, next, ahead };
        for i in 0..x.m {
            let input = Input { q: x.q[i * k..].as_ptr(), sums: x.sums[i * groups..].as_ptr(), scales: x.scales[i * groups..].as_ptr(), prefetch: i == 0 };
            // SAFETY: the asserts above cover every full group of rows r..r + N and of input row i;
            // the same CPU feature as this function.
            let acc: [__m256; N] = unsafe {
                match (w.spec.bits, g) {
                    (Bits::Q4, 32) => q4_groups::<N, 16>(&rows, &input),
                    (Bits::Q4, 64) => q4_groups::<N, 32>(&rows, &input),
                    (Bits::Q4, _) => q4_groups::<N, 64>(&rows, &input), // 128 (QuantSpec allows 32, 64, 128)
                    (Bits::Q8, 32) => q8_groups::<N, 32>(&rows, &input),
                    (Bits::Q8, 64) => q8_groups::<N, 64>(&rows, &input),
                    (Bits::Q8, _) => q8_groups::<N, 128>(&rows, &input),
                }
            };
            let xrow = &x.q[i * k..(i + 1) * k];
            let sums = &x.sums[i * groups..(i + 1) * groups];
            let xscales = &x.scales[i * groups..(i + 1) * groups];
            for t in 0..N {
                let mut out = [0f32; LANES];
                // SAFETY: `out` holds eight f32.
                unsafe { _mm256_storeu_ps(out.as_mut_ptr(), acc[t]) };
                if full < groups {
                    let bytes = &w.data[(r + t) * rb..(r + t + 1) * rb];
                    let (lanes, _) = group_lanes(w.spec.bits, &bytes[full * group_bytes..], &xrow[full * g..], &sums[full]);
                    add_scaled(&mut out, &lanes, w.scales[(r + t) * groups + full] * xscales[full]);
                }
                y[i * width + column + t] = reduce(out);
            }
        }
    }

    /// A block of weight rows: their packed bytes and scales, and what to prefetch.
    struct Rows {
        data: *const u8,
        row_bytes: usize,
        scales: *const f32,
        groups: usize,
        full: usize,
        next: *const u8,
        ahead: usize,
    }

    /// One input row: int8 values, per-lane sums and scales per group.
    struct Input {
        q: *const i8,
        sums: *const [i32; LANES],
        scales: *const f32,
        prefetch: bool,
    }

    impl Rows {
        #[inline(always)]
        fn prefetch(&self, gi: usize) {
            for line in (0..self.ahead).step_by(64) {
                // A hint only: prefetching never faults, past the end of the data included.
                unsafe { _mm_prefetch::<_MM_HINT_T0>(self.next.wrapping_add(gi * self.ahead + line) as *const i8) };
            }
        }
    }

    /// Lane sums of the full q4 groups (`2 · HALF` values in `HALF` bytes: byte `j` holds value
    /// `j` low and `j + HALF` high) of `N` rows against one input row, scaled and summed per lane
    /// in the order of [`super::add_scaled`]. Input loads are shared by the rows, all pointers are
    /// raw (bounds checked once by the caller), the group size is a constant (loops unrolled).
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q4_groups<const N: usize, const HALF: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        let mask = _mm256_set1_epi8(15);
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for gi in 0..rows.full {
            if x.prefetch {
                rows.prefetch(gi);
            }
            // SAFETY (loads): group `gi < full` of each row and of the input is inside the data the
            // caller checked.
            unsafe {
                let sum8 = _mm256_slli_epi32(_mm256_loadu_si256(x.sums.add(gi) as *const __m256i), 3);
                let xscale = *x.scales.add(gi);
                let xg = x.q.add(gi * 2 * HALF);
                for t in 0..N {
                    let wg = rows.data.add(t * rows.row_bytes + gi * HALF);
                    let lanes = if HALF == 16 {
                        let m = _mm_set1_epi8(15);
                        let v = _mm_loadu_si128(wg as *const __m128i);
                        let nibbles = _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m));
                        _mm256_madd_epi16(_mm256_maddubs_epi16(nibbles, _mm256_loadu_si256(xg as *const __m256i)), ones)
                    } else {
                        let mut lanes = _mm256_setzero_si256();
                        for c in (0..HALF).step_by(32) {
                            let v = _mm256_loadu_si256(wg.add(c) as *const __m256i);
                            let low = _mm256_maddubs_epi16(_mm256_and_si256(v, mask), _mm256_loadu_si256(xg.add(c) as *const __m256i));
                            let high = _mm256_maddubs_epi16(_mm256_and_si256(_mm256_srli_epi16(v, 4), mask), _mm256_loadu_si256(xg.add(HALF + c) as *const __m256i));
                            lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(_mm256_add_epi16(low, high), ones));
                        }
                        lanes
                    };
                    let scale = _mm256_set1_ps(*rows.scales.add(t * rows.groups + gi) * xscale);
                    acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(_mm256_sub_epi32(lanes, sum8)), scale));
                }
            }
        }
        acc
    }

    /// [`q4_groups`] for q8 groups of `G` values: `|w| · (x with w's sign)`.
    #[target_feature(enable = "avx2")]
    #[inline]
    unsafe fn q8_groups<const N: usize, const G: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        let ones = _mm256_set1_epi16(1);
        let mut acc = [_mm256_setzero_ps(); N];
        for gi in 0..rows.full {
            if x.prefetch {
                rows.prefetch(gi);
            }
            // SAFETY (loads): as in `q4_groups`.
            unsafe {
                let xscale = *x.scales.add(gi);
                let xg = x.q.add(gi * G);
                for t in 0..N {
                    let wg = rows.data.add(t * rows.row_bytes + gi * G);
                    let mut lanes = _mm256_setzero_si256();
                    for c in (0..G).step_by(32) {
                        let w = _mm256_loadu_si256(wg.add(c) as *const __m256i);
                        let xv = _mm256_loadu_si256(xg.add(c) as *const __m256i);
                        let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
                        lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(p, ones));
                    }
                    let scale = _mm256_set1_ps(*rows.scales.add(t * rows.groups + gi) * xscale);
                    acc[t] = _mm256_add_ps(acc[t], _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), scale));
                }
            }
        }
        acc
    }
}
