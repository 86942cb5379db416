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
//! the same, lane by lane, in every build, so the AVX2 and AVX-512 VNNI paths ([`x86`]: 32 and 64
//! products per instruction) and the portable one give the same bits. Against float activations each input value is off by at most
//! half its group's step, so `|y − x · Wᵀ| ≤ Σ_j |w_j| · s_x(j) / 2` (the tests hold the kernels to
//! that bound). Unpacking nibbles into floats cost more than reading the bytes; this is what lets
//! int4 run at the speed of memory.

use std::ops::Range;

use super::scheme::{Bits, PackedMatrix, abs_max, round_to_level};

/// Lanes of a group's integer products and of the float sums.
pub(super) const LANES: usize = 8;

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

/// The builds of the kernel; each gives the same bits (see the module's documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[cfg_attr(not(target_arch = "x86_64"), allow(dead_code))]
pub(super) enum Simd {
    Portable,
    /// 32 products per `maddubs`.
    Avx2,
    /// AVX-512 VNNI: 64 products per `vpdpbusd` (q4's 64- and 128-value groups, every q8 group).
    Avx512Vnni,
}

impl Simd {
    /// The fastest build this CPU runs.
    pub(super) fn best() -> Simd {
        Simd::available().last().copied().unwrap_or(Simd::Portable)
    }

    /// Every build this CPU runs, slowest first.
    pub(super) fn available() -> &'static [Simd] {
        static AVAILABLE: std::sync::OnceLock<Vec<Simd>> = std::sync::OnceLock::new();
        AVAILABLE.get_or_init(|| {
            #[cfg_attr(not(target_arch = "x86_64"), allow(unused_mut))]
            let mut builds = vec![Simd::Portable];
            #[cfg(target_arch = "x86_64")]
            {
                if std::arch::is_x86_feature_detected!("avx2") {
                    builds.push(Simd::Avx2);
                    if ["avx512f", "avx512bw", "avx512vl", "avx512vnni"].iter().all(|f| x86::detected(f)) {
                        builds.push(Simd::Avx512Vnni);
                    }
                }
            }
            builds
        })
    }
}

/// Weight rows `rows` against every input row into `y`, `(m, rows.len())` row-major.
pub(super) fn few_rows(w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    few_rows_on(Simd::best(), w, x, rows, y)
}

/// [`few_rows`] through a given build (one of [`Simd::available`]).
pub(super) fn few_rows_on(simd: Simd, w: &PackedMatrix, x: &QuantizedInput, rows: Range<usize>, y: &mut [f32]) {
    debug_assert!(x.k == w.cols && x.group == w.spec.group && y.len() == x.m * rows.len());
    assert!(Simd::available().contains(&simd), "{simd:?} does not run on this CPU");
    match simd {
        Simd::Portable => few_rows_portable(w, x, rows, y),
        // SAFETY: the CPU has the features the functions are compiled for (asserted above).
        #[cfg(target_arch = "x86_64")]
        Simd::Avx2 => unsafe { x86::few_rows_avx2(w, x, rows, y) },
        #[cfg(target_arch = "x86_64")]
        Simd::Avx512Vnni => unsafe { x86::few_rows_vnni(w, x, rows, y) },
        #[cfg(not(target_arch = "x86_64"))]
        _ => few_rows_portable(w, x, rows, y),
    }
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
pub(super) fn group_lanes(bits: Bits, bytes: &[u8], xq: &[i8], sums: &[i32; LANES]) -> ([i32; LANES], usize) {
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
pub(super) fn add_scaled(acc: &mut [f32; LANES], lanes: &[i32; LANES], scale: f32) {
    for (a, &l) in acc.iter_mut().zip(lanes) {
        *a += l as f32 * scale;
    }
}

/// The lanes' pairwise sum, 8 → 4 → 2 → 1, in one order for every build.
#[inline(always)]
pub(super) fn reduce(mut lanes: [f32; LANES]) -> f32 {
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
mod x86;
