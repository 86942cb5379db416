//! CPU products with a [`PackedMatrix`] that never dequantize the whole matrix:
//! `y (m, rows) = x (m, cols) · Wᵀ` with `W` the packed `(rows, cols)` weight.
//!
//! * Few input rows (a decoding step, ≤ [`FEW_ROWS`]): the input is quantized to int8 per group and
//!   each weight row is read once, a group at a time, as integer dot products (see
//!   [`super::few_rows`]); the weight rows are split over threads. Decoding is bound by how many
//!   bytes of weights it reads, which is what int4 saves.
//! * Many rows (prefill, the encoder): each thread dequantizes blocks of weight rows into a reused
//!   buffer and multiplies them with `gemm` (the GEMM burn's CPU backend uses), in float.

use super::few_rows::{QuantizedInput, few_rows};
use super::scheme::PackedMatrix;

/// Input rows up to which the matrix–vector kernel runs (above it, dequantized blocks + GEMM).
pub const FEW_ROWS: usize = 16;

/// Floats of dequantized weight per GEMM block (1 MiB: stays in L2 next to the input's panel).
const BLOCK_FLOATS: usize = 1 << 18;

impl PackedMatrix {
    /// `x (m, cols)` row-major times the transposed matrix: `(m, rows)` row-major. Spread over
    /// `threads` threads (1 = the calling thread only).
    pub fn matmul(&self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        let input = (m <= FEW_ROWS).then(|| QuantizedInput::new(x, m, self.cols, self.spec.group));
        self.matmul_with(x, input.as_ref(), m, threads)
    }

    /// [`PackedMatrix::matmul`] with `x` already quantized for the few-rows kernel (`None`: the
    /// many-rows path).
    fn matmul_with(&self, x: &[f32], input: Option<&QuantizedInput>, m: usize, threads: usize) -> Vec<f32> {
        debug_assert_eq!(x.len(), m * self.cols);
        if m == 0 || self.rows == 0 {
            return vec![0.0; m * self.rows];
        }
        let threads = threads.max(1);
        // Blocks of weight rows, one per thread (whole multiples of 8 rows).
        let block = self.rows.div_ceil(threads).next_multiple_of(8).min(self.rows);
        let ranges: Vec<std::ops::Range<usize>> = (0..self.rows).step_by(block).map(|s| s..(s + block).min(self.rows)).collect();
        let parts = crate::model::ops::map_par(ranges.clone(), |rows| match input {
            Some(input) => {
                let mut y = vec![0f32; m * rows.len()];
                few_rows(self, input, rows, &mut y);
                y
            }
            None => self.many_rows(x, m, rows),
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

    /// `down(silu(gate(x)) ⊙ up(x))` (`DeepseekV2MLP`) for `x (m, cols)` with the three packed
    /// weights, on the host: `(m, down.rows)`. Gate and up share one quantization of `x`, and the
    /// hidden values never become tensors (a decoding step runs 77 of these on the CPU). Same
    /// numbers as the three products with burn's `silu` and product between them.
    pub fn mlp(gate: &Self, up: &Self, down: &Self, x: &[f32], m: usize, threads: usize) -> Vec<f32> {
        let shared = (m <= FEW_ROWS && gate.spec.group == up.spec.group).then(|| QuantizedInput::new(x, m, gate.cols, gate.spec.group));
        let product = |w: &Self| match &shared {
            Some(input) => w.matmul_with(x, Some(input), m, threads),
            None => w.matmul(x, m, threads),
        };
        let mut hidden = product(gate);
        for (h, u) in hidden.iter_mut().zip(product(up)) {
            *h = *h * sigmoid(*h) * u;
        }
        down.matmul(&hidden, m, threads)
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

/// burn's CPU `sigmoid` (so that [`PackedMatrix::mlp`] gives its `silu`'s bits).
#[inline]
fn sigmoid(x: f32) -> f32 {
    if x >= 0.0 {
        1.0 / (1.0 + (-x).exp())
    } else {
        let e = x.exp();
        e / (1.0 + e)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::quant::few_rows::{Simd, few_rows_on};
    use crate::quant::scheme::{Bits, GROUP_SIZES, QuantSpec, ScaleDtype};

    fn values(n: usize, seed: u64) -> Vec<f32> {
        let mut s = seed.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        (0..n)
            .map(|_| {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                ((s >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
            })
            .collect()
    }

    /// The host MLP gives the bits of its three products with silu between them (shared input
    /// quantization included), for a decoding step and a prefill, on one and two threads.
    #[test]
    fn mlp_equals_its_products() {
        let (hidden, width) = (96, 160);
        for bits in [Bits::Q4, Bits::Q8] {
            let spec = QuantSpec::new(bits, 32, ScaleDtype::F16).unwrap();
            let gate = PackedMatrix::quantize(&values(width * hidden, 1), width, hidden, spec);
            let up = PackedMatrix::quantize(&values(width * hidden, 2), width, hidden, spec);
            let down = PackedMatrix::quantize(&values(hidden * width, 3), hidden, width, spec);
            for (m, threads) in [(1, 1), (3, 2), (FEW_ROWS + 4, 2)] {
                let x = values(m * hidden, 4 + m as u64);
                let h: Vec<f32> = gate.matmul(&x, m, threads).iter().zip(up.matmul(&x, m, threads)).map(|(&g, u)| g * sigmoid(g) * u).collect();
                assert_eq!(PackedMatrix::mlp(&gate, &up, &down, &x, m, threads), down.matmul(&h, m, threads), "{bits:?} m={m}");
            }
        }
    }

    /// `x · dequantize(W)ᵀ` in f64.
    fn reference(w: &PackedMatrix, x: &[f32], m: usize) -> Vec<f64> {
        let dense = w.dequantize();
        let mut y = vec![0f64; m * w.rows];
        for i in 0..m {
            for r in 0..w.rows {
                y[i * w.rows + r] = (0..w.cols).map(|c| x[i * w.cols + c] as f64 * dense[r * w.cols + c] as f64).sum();
            }
        }
        y
    }

    /// Both kernels (m = 1, a few rows, and above FEW_ROWS), odd widths, every group size and
    /// thread count. Above FEW_ROWS (float input): within f32 summation error of the dequantized
    /// product, 1e-5 of the sum of |terms| (K ≤ 300 here). Up to FEW_ROWS (int8 input): within f32
    /// summation error of the product with the quantized input, and off the float input's product
    /// by no more than its quantization allows, `Σ_j |w_j| · s_x(j) / 2`.
    #[test]
    fn packed_products_equal_dequantized_reference() {
        for bits in [Bits::Q4, Bits::Q8] {
            for group in GROUP_SIZES {
                for (rows, cols) in [(1, 32), (17, 101), (40, 64), (9, 300), (64, 129)] {
                    let spec = QuantSpec::new(bits, group, ScaleDtype::F16).unwrap();
                    let w = PackedMatrix::quantize(&values(rows * cols, (rows + cols) as u64), rows, cols, spec);
                    let dense = w.dequantize();
                    for m in [1, 3, 16, 17, 40] {
                        let x = values(m * cols, m as u64);
                        let float = reference(&w, &x, m);
                        let (expected, bound) = if m <= FEW_ROWS {
                            let input = QuantizedInput::new(&x, m, cols, group);
                            let xq = input.dequantize();
                            let bound: Vec<f64> = (0..m * rows)
                                .map(|n| {
                                    let (i, r) = (n / rows, n % rows);
                                    (0..cols).map(|c| (dense[r * cols + c].abs() * (x[i * cols + c] - xq[i * cols + c]).abs()) as f64).sum::<f64>()
                                })
                                .collect();
                            let exact = reference(&w, &xq, m);
                            for (n, (b, (f, e))) in bound.iter().zip(float.iter().zip(&exact)).enumerate() {
                                assert!((f - e).abs() <= b + 1e-9, "quantized input at {n}");
                            }
                            (exact, bound)
                        } else {
                            (float.clone(), vec![0.0; m * rows])
                        };
                        for threads in [1, 2, 3] {
                            let y = w.matmul(&x, m, threads);
                            assert_eq!(y.len(), m * rows);
                            let scale = cols as f64; // |x|, |w| ≤ 1 → |Σ| ≤ cols
                            for (n, &a) in y.iter().enumerate() {
                                let a = a as f64;
                                assert!((a - expected[n]).abs() <= 1e-5 * scale, "{spec} {rows}×{cols} m {m} threads {threads} at {n}: {a} vs {}", expected[n]);
                                assert!((a - float[n]).abs() <= bound[n] + 1e-5 * scale, "{spec} {rows}×{cols} m {m} at {n}: beyond the input's quantization");
                            }
                        }
                    }
                }
            }
        }
    }

    /// Each input value is within half a step of its group's scale (`amax / 127`).
    #[test]
    fn input_quantization_within_half_a_step() {
        let (m, k) = (3, 150);
        let x = values(m * k, 5);
        for group in GROUP_SIZES {
            let xq = QuantizedInput::new(&x, m, k, group).dequantize();
            for (n, (a, b)) in x.iter().zip(&xq).enumerate() {
                let span = n / k * k + n % k / group * group..(n / k * k + (n % k / group + 1) * group).min((n / k + 1) * k);
                let step = x[span].iter().fold(0f32, |a, v| a.max(v.abs())) / 127.0;
                assert!((a - b).abs() <= step * 0.5 * (1.0 + 1e-5), "group {group} at {n}: {a} vs {b}");
            }
        }
    }

    /// Every SIMD build this CPU runs and the plain one give the same bits, for both widths, every
    /// group size and a ragged last group.
    #[test]
    fn simd_builds_agree_bit_for_bit() {
        for bits in [Bits::Q4, Bits::Q8] {
            for group in GROUP_SIZES {
                let spec = QuantSpec::new(bits, group, ScaleDtype::F16).unwrap();
                let (rows, cols, m) = (24, 200 + group / 2 + 1, 3);
                let w = PackedMatrix::quantize(&values(rows * cols, 7), rows, cols, spec);
                let input = QuantizedInput::new(&values(m * cols, 8), m, cols, group);
                let mut plain = vec![0f32; m * rows];
                crate::quant::few_rows::few_rows_portable(&w, &input, 0..rows, &mut plain);
                for &simd in Simd::available() {
                    let mut built = vec![0f32; m * rows];
                    few_rows_on(simd, &w, &input, 0..rows, &mut built);
                    assert_eq!(built, plain, "{spec} {simd:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod speed {
    use super::*;
    use crate::quant::few_rows::{Simd, few_rows_on};
    use crate::quant::scheme::{Bits, QuantSpec, ScaleDtype};

    /// Weights read per second by the decode kernel (a timing, not a check: run with --ignored).
    #[test]
    #[ignore = "timing"]
    fn few_rows_throughput() {
        // A matrix that stays in cache, and one eight times larger that streams from memory.
        for (bits, rows) in [(Bits::Q4, 8 * 1280), (Bits::Q8, 8 * 1280), (Bits::Q4, 64 * 1280), (Bits::Q8, 64 * 1280)] {
            let cols = 896;
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
                eprintln!("{bits:?} {rows}x{cols} threads {threads}: {:.2} G weights/s, {:.1} GB/s", (rows * cols) as f64 / s / 1e9, w.memory_bytes() as f64 / s / 1e9);
            }
            let input = QuantizedInput::new(&x, 1, cols, 64);
            for &simd in Simd::available() {
                let mut y = vec![0f32; rows];
                let t = std::time::Instant::now();
                let reps = 20;
                for _ in 0..reps {
                    few_rows_on(simd, &w, &input, 0..rows, &mut y);
                    std::hint::black_box(&y);
                }
                let s = t.elapsed().as_secs_f64() / reps as f64;
                eprintln!("  {simd:?}, one thread: {:.2} G weights/s", (rows * cols) as f64 / s / 1e9);
            }
        }
    }
}
