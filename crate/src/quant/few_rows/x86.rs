//! The x86-64 builds of [`super::few_rows`]: AVX2 and AVX-512 VNNI. One block loop
//! ([`block`]) for both, generic over how a block's groups are multiplied ([`Groups`]); each entry
//! point is compiled for its CPU features, and everything below it is inlined into it.
//!
//! Both keep the plain build's eight lanes (value `v` of a group to lane `(v mod 32) / 4`): a
//! 512-bit `vpdpbusd` sums values `4L..4L + 3` of 64 into lane `L` of 16, so adding lane `L + 8` to
//! lane `L` (exact, in integers) gives the same eight integer lanes, and the float operations that
//! follow are the same instructions as in the AVX2 build.

use std::arch::x86_64::*;
use std::ops::Range;

use super::{LANES, QuantizedInput, add_scaled, group_lanes, reduce};
use crate::quant::scheme::{Bits, PackedMatrix};

/// Whether the CPU has `feature` (the names [`super::Simd::available`] asks about).
pub(super) fn detected(feature: &str) -> bool {
    match feature {
        "avx512f" => is_x86_feature_detected!("avx512f"),
        "avx512bw" => is_x86_feature_detected!("avx512bw"),
        "avx512vl" => is_x86_feature_detected!("avx512vl"),
        "avx512vnni" => is_x86_feature_detected!("avx512vnni"),
        _ => false,
    }
}

/// The AVX2 build: `maddubs` (unsigned nibbles or |w| times signed inputs, pairs summed into i16
/// without overflow: at most 2·15·127 or 2·127·127), then `madd` into i32.
#[target_feature(enable = "avx2")]
pub(super) unsafe fn few_rows_avx2(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    // SAFETY: the caller checked the CPU; `blocks` only adds the features of this function.
    unsafe { blocks::<Avx2>(w, x, rows, y) }
}

/// The AVX-512 VNNI build: `vpdpbusd` multiplies 64 unsigned bytes by 64 signed ones and sums
/// each four into i32 (q4: the nibbles as they are; q8: `w + 128`, with `128 · Σx` taken off,
/// as q4 takes off `8 · Σx`). q4 groups of 32 values (16 bytes) use its 256-bit form.
#[target_feature(enable = "avx2,avx512f,avx512bw,avx512vl,avx512vnni")]
pub(super) unsafe fn few_rows_vnni(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    // SAFETY: as above.
    unsafe { blocks::<Vnni>(w, x, rows, y) }
}

/// Four weight rows at a time share each input load and keep four independent sums in flight,
/// while the rows two blocks ahead are prefetched (decoding q4 13 → 20 tokens/s).
#[inline(always)]
unsafe fn blocks<K: Groups>(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    let mut r = rows.start;
    while r + 4 <= rows.end {
        // SAFETY: the CPU features of the caller, which this is inlined into.
        unsafe { block::<4, K>(w, x, r, r - rows.start, rows.len(), y) };
        r += 4;
    }
    while r < rows.end {
        // SAFETY: as above.
        unsafe { block::<1, K>(w, x, r, r - rows.start, rows.len(), y) };
        r += 1;
    }
}

/// Weight rows `r..r + N` into columns `column..column + N` of `y` (`(m, width)`): full groups by
/// `K`, a ragged last group through the plain [`group_lanes`], the same lane-wise float
/// operations as the plain build.
#[inline(always)]
unsafe fn block<const N: usize, K: Groups>(w: &PackedMatrix, x: &QuantizedInput, r: usize, column: usize, width: usize, y: &mut [f32]) {
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
        // the CPU features of the caller.
        let acc: [__m256; N] = unsafe {
            match (w.spec.bits, g) {
                (Bits::Q4, 32) => K::q4::<N, 16>(&rows, &input),
                (Bits::Q4, 64) => K::q4::<N, 32>(&rows, &input),
                (Bits::Q4, _) => K::q4::<N, 64>(&rows, &input), // 128 (QuantSpec allows 32, 64, 128)
                (Bits::Q8, 32) => K::q8::<N, 32>(&rows, &input),
                (Bits::Q8, 64) => K::q8::<N, 64>(&rows, &input),
                (Bits::Q8, _) => K::q8::<N, 128>(&rows, &input),
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

/// How one build multiplies the full groups of `N` rows with one input row: the eight integer
/// lanes of each group, scaled and summed per lane in the order of [`super::add_scaled`]. Input
/// loads are shared by the rows, all pointers are raw (bounds checked once by [`block`]), the group
/// size is a constant (loops unrolled). Inlined into an entry point compiled for the build's CPU.
trait Groups {
    /// q4 groups of `2 · HALF` values in `HALF` bytes: byte `j` holds value `j` low and `j + HALF` high.
    unsafe fn q4<const N: usize, const HALF: usize>(rows: &Rows, x: &Input) -> [__m256; N];
    /// q8 groups of `G` values.
    unsafe fn q8<const N: usize, const G: usize>(rows: &Rows, x: &Input) -> [__m256; N];
}

/// The loop every build shares: for each full group (prefetching ahead), each row `t`'s integer
/// lanes from `lanes(row's group bytes, input's group values)`, less `Σx << SHIFT` (q4's `8 · Σx`,
/// q8-with-VNNI's `128 · Σx`; nothing when `SHIFT` is 0), times `s_w · s_x`, added to `acc[t]`.
#[inline(always)]
unsafe fn over_groups<const N: usize, const SHIFT: i32>(
    rows: &Rows,
    x: &Input,
    group_bytes: usize,
    group_values: usize,
    lanes: impl Fn(*const u8, *const i8) -> __m256i,
) -> [__m256; N] {
    let mut acc = [unsafe { _mm256_setzero_ps() }; N];
    for gi in 0..rows.full {
        if x.prefetch {
            rows.prefetch(gi);
        }
        // SAFETY (loads): group `gi < full` of each row and of the input is inside the data
        // `block` checked; the CPU features of the entry point this is inlined into.
        unsafe {
            let sums = _mm256_loadu_si256(x.sums.add(gi) as *const __m256i);
            let offset = if SHIFT > 0 { _mm256_slli_epi32::<SHIFT>(sums) } else { _mm256_setzero_si256() };
            let xscale = *x.scales.add(gi);
            let xg = x.q.add(gi * group_values);
            for (t, acc) in acc.iter_mut().enumerate() {
                let lanes = _mm256_sub_epi32(lanes(rows.data.add(t * rows.row_bytes + gi * group_bytes), xg), offset);
                let scale = _mm256_set1_ps(*rows.scales.add(t * rows.groups + gi) * xscale);
                *acc = _mm256_add_ps(*acc, _mm256_mul_ps(_mm256_cvtepi32_ps(lanes), scale));
            }
        }
    }
    acc
}

/// The 32 values of a q4 group of 32 (16 bytes): low nibbles (values 0..16) then high ones (16..32).
#[inline(always)]
unsafe fn nibbles_of_16_bytes(wg: *const u8) -> __m256i {
    // SAFETY: the caller's group of 16 bytes; the CPU features of the entry point.
    unsafe {
        let m = _mm_set1_epi8(15);
        let v = _mm_loadu_si128(wg as *const __m128i);
        _mm256_set_m128i(_mm_and_si128(_mm_srli_epi16(v, 4), m), _mm_and_si128(v, m))
    }
}

struct Avx2;

impl Groups for Avx2 {
    #[inline(always)]
    unsafe fn q4<const N: usize, const HALF: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        // SAFETY (all below): loads of one group, as `over_groups` says.
        unsafe {
            let mask = _mm256_set1_epi8(15);
            let ones = _mm256_set1_epi16(1);
            over_groups::<N, 3>(rows, x, HALF, 2 * HALF, |wg, xg| {
                if HALF == 16 {
                    let nibbles = nibbles_of_16_bytes(wg);
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
                }
            })
        }
    }

    /// `|w| · (x with w's sign)`.
    #[inline(always)]
    unsafe fn q8<const N: usize, const G: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        // SAFETY: as in `q4`.
        unsafe {
            let ones = _mm256_set1_epi16(1);
            over_groups::<N, 0>(rows, x, G, G, |wg, xg| {
                let mut lanes = _mm256_setzero_si256();
                for c in (0..G).step_by(32) {
                    let w = _mm256_loadu_si256(wg.add(c) as *const __m256i);
                    let xv = _mm256_loadu_si256(xg.add(c) as *const __m256i);
                    let p = _mm256_maddubs_epi16(_mm256_abs_epi8(w), _mm256_sign_epi8(xv, w));
                    lanes = _mm256_add_epi32(lanes, _mm256_madd_epi16(p, ones));
                }
                lanes
            })
        }
    }
}

struct Vnni;

/// The 16 lanes of a 512-bit `vpdpbusd` folded into the eight of a group (`L + 8` onto `L`).
#[inline(always)]
unsafe fn fold(lanes: __m512i) -> __m256i {
    unsafe { _mm256_add_epi32(_mm512_castsi512_si256(lanes), _mm512_extracti64x4_epi64::<1>(lanes)) }
}

impl Groups for Vnni {
    #[inline(always)]
    unsafe fn q4<const N: usize, const HALF: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        // SAFETY: as in the AVX2 build.
        unsafe {
            let mask = _mm512_set1_epi8(15);
            over_groups::<N, 3>(rows, x, HALF, 2 * HALF, |wg, xg| {
                if HALF == 16 {
                    let nibbles = nibbles_of_16_bytes(wg);
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), nibbles, _mm256_loadu_si256(xg as *const __m256i))
                } else if HALF == 32 {
                    // Values 0..32 (low nibbles) then 32..64 (high): one register of 64.
                    let v = _mm256_loadu_si256(wg as *const __m256i);
                    let both = _mm512_inserti64x4::<1>(_mm512_castsi256_si512(v), _mm256_srli_epi16(v, 4));
                    fold(_mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(both, mask), _mm512_loadu_si512(xg as *const __m512i)))
                } else {
                    // HALF = 64: low nibbles are values 0..64, high ones 64..128.
                    let v = _mm512_loadu_si512(wg as *const __m512i);
                    let low = _mm512_dpbusd_epi32(_mm512_setzero_si512(), _mm512_and_si512(v, mask), _mm512_loadu_si512(xg as *const __m512i));
                    let high = _mm512_and_si512(_mm512_srli_epi16(v, 4), mask);
                    fold(_mm512_dpbusd_epi32(low, high, _mm512_loadu_si512(xg.add(64) as *const __m512i)))
                }
            })
        }
    }

    #[inline(always)]
    unsafe fn q8<const N: usize, const G: usize>(rows: &Rows, x: &Input) -> [__m256; N] {
        // SAFETY: as in the AVX2 build.
        unsafe {
            let flip = _mm512_set1_epi8(-128);
            over_groups::<N, 7>(rows, x, G, G, |wg, xg| {
                if G == 32 {
                    let w = _mm256_xor_si256(_mm256_loadu_si256(wg as *const __m256i), _mm512_castsi512_si256(flip));
                    _mm256_dpbusd_epi32(_mm256_setzero_si256(), w, _mm256_loadu_si256(xg as *const __m256i))
                } else {
                    let mut lanes = _mm512_setzero_si512();
                    for c in (0..G).step_by(64) {
                        let w = _mm512_xor_si512(_mm512_loadu_si512(wg.add(c) as *const __m512i), flip);
                        lanes = _mm512_dpbusd_epi32(lanes, w, _mm512_loadu_si512(xg.add(c) as *const __m512i));
                    }
                    fold(lanes)
                }
            })
        }
    }
}
