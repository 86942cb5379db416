//! CPU products with a [`PackedMatrix`] that never dequantize the whole matrix:
//! `y (m, rows) = x (m, cols) · Wᵀ` with `W` the packed `(rows, cols)` weight.
//!
//! * Few input rows (a decoding step, ≤ [`FEW_ROWS`]): each weight row is read once, a group at a
//!   time, unpacked into registers/L1 and multiplied with every input row; the weight rows are split
//!   over threads. Decoding is bound by how many bytes of weights it reads, which is what int4 saves.
//! * Many rows (prefill, the encoder): each thread dequantizes blocks of weight rows into a reused
//!   buffer and multiplies them with `gemm` (the GEMM burn's CPU backend uses).
//!
//! The few-rows kernel is one portable body compiled several times: plain, and with AVX2+FMA or
//! AVX-512 enabled (chosen at run time on x86-64), so LLVM vectorises it for the CPU at hand. The
//! arithmetic is the same in every build (no fused multiply–add contraction in Rust), so results
//! do not depend on which one runs.

use super::scheme::{Bits, PackedMatrix, unpack_group};

/// Input rows up to which the matrix–vector kernel runs (above it, dequantized blocks + GEMM).
pub const FEW_ROWS: usize = 16;

/// Lanes of the accumulators: one AVX-512 register of f32, two AVX2 registers.
const LANES: usize = 16;

/// Floats of dequantized weight per GEMM block (1 MiB: stays in L2 next to the input's panel).
const BLOCK_FLOATS: usize = 1 << 18;

impl PackedMatrix {
    /// `x (m, cols)` row-major times the transposed matrix: `(m, rows)` row-major. Spread over
    /// `threads` threads (1 = the calling thread only).
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        if m == 0 || self.rows == 0 {
            return vec![0.0; m * self.rows];
        }
        let threads = threads.max(1);
        // Blocks of weight rows, one per thread (whole multiples of 8 rows).
        let block = self.rows.div_ceil(threads).next_multiple_of(8).min(self.rows);
        let ranges: Vec<std::ops::Range<usize>> = (0..self.rows).step_by(block).map(|s| s..(s + block).min(self.rows)).collect();
        let parts = crate::model::ops::map_par(ranges.clone(), |rows| {
            if m <= FEW_ROWS { self.few_rows(x, m, rows) } else { self.many_rows(x, m, rows) }
        });
        // Each part is `(m, its rows)`: put the column blocks side by side.
        if parts.len() == 1 {
            return parts.into_iter().next().unwrap_or_default();
        }
        let mut y = vec![0f32; m * self.rows];
        for (rows, part) in ranges.iter().zip(&parts) {
            let width = rows.len();
            for i in 0..m {
                y[i * self.rows + rows.start..i * self.rows + rows.end].copy_from_slice(&part[i * width..(i + 1) * width]);
            }
        }
        y
    }

    /// Weight rows `rows` against every input row: `(m, rows.len())`.
    fn few_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
        let mut y = vec![0f32; m * rows.len()];
        #[cfg(target_arch = "x86_64")]
        {
            if std::arch::is_x86_feature_detected!("avx512f") && std::arch::is_x86_feature_detected!("avx512bw") {
                // SAFETY: the CPU has the features the function is compiled for (checked above).
                unsafe { few_rows_avx512(self, x, m, rows, &mut y) };
                return y;
            }
            if std::arch::is_x86_feature_detected!("avx2") && std::arch::is_x86_feature_detected!("fma") {
                // SAFETY: as above.
                unsafe { few_rows_avx2(self, x, m, rows, &mut y) };
                return y;
            }
        }
        few_rows_body(self, x, m, rows, &mut y);
        y
    }

    /// Weight rows `rows` dequantized a block at a time, each block multiplied by GEMM: `(m, rows.len())`.
    fn many_rows(&self, x: &[f32], m: usize, rows: std::ops::Range<usize>) -> Vec<f32> {
        let (k, width) = (self.cols, rows.len());
        let mut y = vec![0f32; m * width];
        let per_block = (BLOCK_FLOATS / k.max(1)).clamp(8, width.max(8));
        let mut buffer = vec![0f32; per_block.min(width) * k];
        let mut start = rows.start;
        while start < rows.end {
            let end = (start + per_block).min(rows.end);
            let n = end - start;
            for (i, r) in (start..end).enumerate() {
                self.dequantize_row(r, &mut buffer[i * k..(i + 1) * k]);
            }
            let column = start - rows.start;
            // SAFETY: every pointer/stride pair addresses inside its slice: dst is `(m, n)` at column
            // `column` of the `(m, width)` output (row stride `width`), lhs is `x` `(m, k)` row-major,
            // rhs is the block `(n, k)` row-major read as its `(k, n)` transpose.
            unsafe {
                gemm::gemm(
                    m,
                    n,
                    k,
                    y.as_mut_ptr().add(column),
                    1,
                    width as isize,
                    false,
                    x.as_ptr(),
                    1,
                    k as isize,
                    buffer.as_ptr(),
                    k as isize,
                    1,
                    0.0,
                    1.0,
                    false,
                    false,
                    false,
                    gemm::Parallelism::None,
                );
            }
            start = end;
        }
        y
    }
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f,avx512bw,avx512vl,avx2,fma")]
unsafe fn few_rows_avx512(w: &PackedMatrix, x: &[f32], m: usize, rows: std::ops::Range<usize>, y: &mut [f32]) {
    few_rows_body(w, x, m, rows, y)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2,fma")]
unsafe fn few_rows_avx2(w: &PackedMatrix, x: &[f32], m: usize, rows: std::ops::Range<usize>, y: &mut [f32]) {
    few_rows_body(w, x, m, rows, y)
}

/// For each weight row: its full groups through [`full_groups`] (sizes known at compile time, so the
/// unpacking and the products vectorise), a ragged last group through the generic [`dot`].
#[inline(always)]
fn few_rows_body(w: &PackedMatrix, x: &[f32], m: usize, rows: std::ops::Range<usize>, y: &mut [f32]) {
    match (w.spec.bits, w.spec.group) {
        (Bits::Q4, 32) => rows_with::<32, 16>(w, x, m, rows, y, unpack_q4),
        (Bits::Q4, 64) => rows_with::<64, 32>(w, x, m, rows, y, unpack_q4),
        (Bits::Q4, 128) => rows_with::<128, 64>(w, x, m, rows, y, unpack_q4),
        (Bits::Q8, 32) => rows_with::<32, 32>(w, x, m, rows, y, unpack_q8),
        (Bits::Q8, 64) => rows_with::<64, 64>(w, x, m, rows, y, unpack_q8),
        (Bits::Q8, 128) => rows_with::<128, 128>(w, x, m, rows, y, unpack_q8),
        _ => unreachable!("QuantSpec::new admits groups of 32, 64 and 128 only"),
    }
}

/// `G` values per group stored in `B` bytes; `unpack` turns one group's bytes into its values.
#[inline(always)]
fn rows_with<const G: usize, const B: usize>(
    w: &PackedMatrix,
    x: &[f32],
    m: usize,
    rows: std::ops::Range<usize>,
    y: &mut [f32],
    unpack: impl Fn(&[u8; B], &mut [f32; G]),
) {
    let (k, groups, rb) = (w.cols, w.groups(), w.row_bytes());
    let (full, width) = (k / G, rows.len());
    let mut q = [0f32; G];
    let mut tail = [0f32; G];
    // Lane-wise sums per input row, two of them (even and odd groups) so consecutive groups do not
    // wait on each other's additions; reduced once per row.
    let mut acc = [[[0f32; LANES]; 2]; FEW_ROWS];
    for (j, r) in rows.enumerate() {
        let bytes = &w.data[r * rb..(r + 1) * rb];
        let scales = &w.scales[r * groups..(r + 1) * groups];
        for a in &mut acc[..m] {
            *a = [[0.0; LANES]; 2];
        }
        for (gi, &s) in scales[..full].iter().enumerate() {
            let packed: &[u8; B] = bytes[gi * B..(gi + 1) * B].try_into().expect("B bytes");
            unpack(packed, &mut q);
            for (i, a) in acc[..m].iter_mut().enumerate() {
                let xs: &[f32; G] = x[i * k + gi * G..i * k + (gi + 1) * G].try_into().expect("G values");
                // Four independent partial sums over the group's chunks of LANES values.
                let mut parts = [[0f32; LANES]; 4];
                for c in 0..G / LANES {
                    for l in 0..LANES {
                        parts[c % 4][l] += xs[c * LANES + l] * q[c * LANES + l];
                    }
                }
                let a = &mut a[gi % 2];
                for l in 0..LANES {
                    a[l] += s * ((parts[0][l] + parts[1][l]) + (parts[2][l] + parts[3][l]));
                }
            }
        }
        let rest = k - full * G;
        if rest > 0 {
            let t = &mut tail[..rest];
            unpack_group(w.spec.bits, &bytes[full * B..], t);
            let s = scales[full];
            for (i, a) in acc[..m].iter_mut().enumerate() {
                a[0][0] += s * dot(&x[i * k + full * G..(i + 1) * k], t);
            }
        }
        for i in 0..m {
            let [even, odd] = acc[i];
            y[i * width + j] = reduce(std::array::from_fn(|l| even[l] + odd[l]));
        }
    }
}

/// A full q4 group: byte i holds value i (low nibble) and value i + G/2 (high), each `q + 8`.
#[inline(always)]
fn unpack_q4<const G: usize, const B: usize>(bytes: &[u8; B], out: &mut [f32; G]) {
    for i in 0..B {
        out[i] = (bytes[i] & 15) as f32 - 8.0;
        out[i + B] = (bytes[i] >> 4) as f32 - 8.0;
    }
}

/// A full q8 group: one `i8` per value.
#[inline(always)]
fn unpack_q8<const G: usize, const B: usize>(bytes: &[u8; B], out: &mut [f32; G]) {
    for i in 0..B {
        out[i] = bytes[i] as i8 as f32;
    }
}

/// Pairwise sum of the lanes: 16 → 8 → 4 → 2 → 1.
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

/// `Σ a·b` with [`LANES`] independent accumulators (vectorisable without reordering a single sum).
#[inline(always)]
fn dot(a: &[f32], b: &[f32]) -> f32 {
    let mut lanes = [0f32; LANES];
    let (a_chunks, a_tail) = a.split_at(a.len() / LANES * LANES);
    let (b_chunks, b_tail) = b.split_at(a_chunks.len());
    for (ca, cb) in a_chunks.chunks_exact(LANES).zip(b_chunks.chunks_exact(LANES)) {
        for l in 0..LANES {
            lanes[l] += ca[l] * cb[l];
        }
    }
    for (l, (&va, &vb)) in a_tail.iter().zip(b_tail).enumerate() {
        lanes[l] += va * vb;
    }
    reduce(lanes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::scheme::{GROUP_SIZES, QuantSpec, ScaleDtype};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// `x · dequantize(W)ᵀ` in f64: what the kernels must compute.
    fn reference(w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f32> {
        let dense = w.dequantize();
        let mut y = vec![0f32; m * w.rows];
        for i in 0..m {
            for r in 0..w.rows {
                let s: f64 = (0..w.cols).map(|c| x[i * w.cols + c] as f64 * dense[r * w.cols + c] as f64).sum();
                y[i * w.rows + r] = s as f32;
            }
        }
        y
    }

    /// Both kernels (m = 1, a few rows, and above FEW_ROWS), odd widths, every group size and
    /// thread count, against the dequantized product. Tolerance: f32 summation error of K terms,
    /// 1e-5 of the sum of |terms| scale (K ≤ 300 here).
    #[test]
    fn packed_products_equal_dequantized_reference() {
        for bits in [Bits::Q4, Bits::Q8] {
            for group in GROUP_SIZES {
                for (rows, cols) in [(1, 32), (17, 101), (40, 64), (9, 300), (64, 129)] {
                    let spec = QuantSpec::new(bits, group, ScaleDtype::F16).unwrap();
                    let w = PackedMatrix::quantize(&values(rows * cols, (rows + cols) as u64), rows, cols, spec);
                    for m in [1, 3, 16, 17, 40] {
                        let x = values(m * cols, m as u64);
                        let expected = reference(&w, &x, m);
                        for threads in [1, 2, 3] {
                            let y = w.matmul(&x, m, threads);
                            assert_eq!(y.len(), m * rows);
                            let scale = cols as f32; // |x|, |w| ≤ 1 → |Σ| ≤ cols
                            for (i, (a, b)) in y.iter().zip(&expected).enumerate() {
                                assert!((a - b).abs() <= 1e-5 * scale, "{spec} {rows}×{cols} m {m} threads {threads} at {i}: {a} vs {b}");
                            }
                        }
                    }
                }
            }
        }
    }

    /// The SIMD builds and the plain one give the same bits.
    #[test]
    fn simd_builds_agree_bit_for_bit() {
        let spec = QuantSpec::new(Bits::Q4, 64, ScaleDtype::F16).unwrap();
        let (rows, cols, m) = (24, 200, 3);
        let w = PackedMatrix::quantize(&values(rows * cols, 7), rows, cols, spec);
        let x = values(m * cols, 8);
        let mut plain = vec![0f32; m * rows];
        few_rows_body(&w, &x, m, 0..rows, &mut plain);
        assert_eq!(w.few_rows(&x, m, 0..rows), plain);
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::quant::scheme::{QuantSpec, ScaleDtype};

    /// Weights read per second by the decode kernel (a timing, not a check: run with --ignored).
    #[test]
    #[ignore = "timing"]
    fn few_rows_throughput() {
        for bits in [Bits::Q4, Bits::Q8] {
            let (rows, cols) = (8 * 1280, 896);
            let values: Vec<f32> = (0..rows * cols).map(|i| ((i * 7919 % 1000) as f32 / 500.0) - 1.0).collect();
            let w = PackedMatrix::quantize(&values, rows, cols, QuantSpec::new(bits, 64, ScaleDtype::F16).unwrap());
            let x = vec![0.5f32; cols];
            for threads in [1, 2] {
                let t = std::time::Instant::now();
                let reps = 50;
                for _ in 0..reps {
                    std::hint::black_box(w.matmul(&x, 1, threads));
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!("{bits:?} threads {threads}: {:.2} G weights/s, {:.1} GB/s", (rows * cols) as f64 / s / 1e9, w.memory_bytes() as f64 / s / 1e9);
            }
        }
    }
}
