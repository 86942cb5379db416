//! The packed int4/int8 matrix format: symmetric quantization with one scale per group of
//! consecutive input (K) values of a row, and the one quantize/dequantize pair everything uses.
//!
//! A matrix is PyTorch's `(out, in)` = `(rows, cols)`. Each row is cut into groups of `group`
//! consecutive columns (the last may be shorter). For a group with values `w` and `amax = max|w|`:
//! `scale = amax / qmax` rounded to the scale dtype (upwards when rounding would clip), `q =
//! round(w / scale)` (half away from zero) in `[-qmax, qmax]`, and `w ≈ scale · q`.
//! * `q8`: `qmax = 127`, one `i8` per value, the row's values in order.
//! * `q4`: `qmax = 7`, two values per byte stored as `q + 8` (`1..=15`; `8` pads). Within a group
//!   of `L` values, byte `i` holds value `i` in its low nibble and value `i + ⌈L/2⌉` in its high
//!   nibble (llama.cpp's Q4_0 order): unpacking a group is two contiguous runs, which vectorises.

use std::fmt;

use crate::error::{Error, Result};

/// Bits per quantized value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Bits {
    Q4,
    Q8,
}

impl Bits {
    pub fn count(self) -> u32 {
        match self {
            Bits::Q4 => 4,
            Bits::Q8 => 8,
        }
    }

    /// Largest |q|: the symmetric range is `[-qmax, qmax]`.
    pub fn qmax(self) -> f32 {
        match self {
            Bits::Q4 => 7.0,
            Bits::Q8 => 127.0,
        }
    }

    pub fn from_count(bits: u64) -> Result<Self> {
        match bits {
            4 => Ok(Bits::Q4),
            8 => Ok(Bits::Q8),
            other => Err(Error::Unsupported(format!("{other}-bit quantization (4 and 8 are supported)"))),
        }
    }
}

/// How the scales are stored in the checkpoint (in memory they are always f32).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ScaleDtype {
    F16,
    F32,
}

impl ScaleDtype {
    pub fn name(self) -> &'static str {
        match self {
            ScaleDtype::F16 => "float16",
            ScaleDtype::F32 => "float32",
        }
    }

    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "float16" => Ok(ScaleDtype::F16),
            "float32" => Ok(ScaleDtype::F32),
            other => Err(Error::Unsupported(format!("scale dtype {other:?} (float16 or float32)"))),
        }
    }

    /// `v` as this dtype would store it, rounded up in magnitude when plain rounding lands below `v`
    /// (so `scale · qmax ≥ amax` always holds and no value clips).
    fn round_up(self, v: f32) -> f32 {
        match self {
            ScaleDtype::F32 => v,
            ScaleDtype::F16 => {
                let h = half::f16::from_f32(v);
                if h.to_f32() >= v || !h.is_finite() { h.to_f32() } else { half::f16::from_bits(h.to_bits() + 1).to_f32() }
            }
        }
    }
}

/// One tensor's quantization: bits, group size along K, scale dtype.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct QuantSpec {
    pub bits: Bits,
    pub group: usize,
    pub scale: ScaleDtype,
}

/// Group sizes the format allows.
pub const GROUP_SIZES: [usize; 3] = [32, 64, 128];

impl QuantSpec {
    pub fn new(bits: Bits, group: usize, scale: ScaleDtype) -> Result<Self> {
        if !GROUP_SIZES.contains(&group) {
            return Err(Error::InvalidArgument(format!("group size {group} (one of 32, 64, 128)")));
        }
        Ok(Self { bits, group, scale })
    }

    /// Groups per row of `cols` values.
    pub fn groups(&self, cols: usize) -> usize {
        cols.div_ceil(self.group)
    }

    /// Packed bytes per row of `cols` values.
    pub fn row_bytes(&self, cols: usize) -> usize {
        match self.bits {
            Bits::Q8 => cols,
            Bits::Q4 => (cols / self.group) * (self.group / 2) + (cols % self.group).div_ceil(2),
        }
    }

    /// How the packed values are stored: `U8` (q4 nibble pairs) or `I8` (q8).
    pub fn value_dtype(&self) -> safetensors::Dtype {
        match self.bits {
            Bits::Q4 => safetensors::Dtype::U8,
            Bits::Q8 => safetensors::Dtype::I8,
        }
    }

    /// How the scales are stored.
    pub fn scale_dtype(&self) -> safetensors::Dtype {
        match self.scale {
            ScaleDtype::F16 => safetensors::Dtype::F16,
            ScaleDtype::F32 => safetensors::Dtype::F32,
        }
    }

    /// Bytes of a `(rows, cols)` matrix in the checkpoint: packed values plus scales.
    pub fn stored_bytes(&self, rows: usize, cols: usize) -> usize {
        let scale = match self.scale {
            ScaleDtype::F16 => 2,
            ScaleDtype::F32 => 4,
        };
        rows * (self.row_bytes(cols) + self.groups(cols) * scale)
    }
}

impl fmt::Display for QuantSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "q{} g{} {}", self.bits.count(), self.group, self.scale.name())
    }
}

/// A quantized `(rows, cols)` matrix held packed, scales widened to f32.
#[derive(Clone, PartialEq)]
pub struct PackedMatrix {
    pub spec: QuantSpec,
    pub rows: usize,
    pub cols: usize,
    /// `rows × spec.row_bytes(cols)` bytes (see the module docs).
    pub data: Vec<u8>,
    /// `rows × spec.groups(cols)` scales.
    pub scales: Vec<f32>,
}

impl fmt::Debug for PackedMatrix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PackedMatrix({}×{}, {})", self.rows, self.cols, self.spec)
    }
}

impl PackedMatrix {
    /// Quantizes row-major `(rows, cols)` values.
    pub fn quantize(values: &[f32], rows: usize, cols: usize, spec: QuantSpec) -> Self {
        debug_assert_eq!(values.len(), rows * cols);
        Self::quantize_rows(rows, cols, spec, |r, row| row.copy_from_slice(&values[r * cols..(r + 1) * cols]))
    }

    /// Quantizes the `(rows, cols)` matrix whose row `r` `fill(r, row)` writes (e.g. widened from
    /// stored bf16): blocks of rows on the CPU's threads, one row of f32 per thread in memory.
    pub fn quantize_rows(rows: usize, cols: usize, spec: QuantSpec, fill: impl Fn(usize, &mut [f32]) + Sync) -> Self {
        let (row_bytes, groups) = (spec.row_bytes(cols), spec.groups(cols));
        let mut data = vec![0u8; rows * row_bytes];
        let mut scales = vec![0f32; rows * groups];
        if rows > 0 && cols > 0 {
            let block = rows.div_ceil(QUANTIZE_PIECES).max(16);
            let pieces: Vec<_> = data.chunks_mut(block * row_bytes).zip(scales.chunks_mut(block * groups)).enumerate().collect();
            crate::model::ops::map_par(pieces, |(b, (data, scales))| quantize_block(b * block, data, scales, cols, spec, &fill));
        }
        Self { spec, rows, cols, data, scales }
    }

    /// Matrices of the same columns and spec stacked by rows.
    pub fn concat_rows(parts: Vec<Self>, cols: usize, spec: QuantSpec) -> Self {
        let mut parts = parts.into_iter();
        let mut out = parts.next().unwrap_or(Self { spec, rows: 0, cols, data: Vec::new(), scales: Vec::new() });
        for part in parts {
            debug_assert!(part.cols == cols && part.spec == spec);
            out.rows += part.rows;
            out.data.extend_from_slice(&part.data);
            out.scales.extend_from_slice(&part.scales);
        }
        out
    }

    /// Builds a matrix from stored bytes and scales, checking their sizes.
    pub fn from_parts(spec: QuantSpec, rows: usize, cols: usize, data: Vec<u8>, scales: Vec<f32>) -> Result<Self> {
        if data.len() != rows * spec.row_bytes(cols) || scales.len() != rows * spec.groups(cols) {
            return Err(Error::InvalidArgument(format!(
                "packed {rows}×{cols} matrix ({spec}) needs {} bytes and {} scales, got {} and {}",
                rows * spec.row_bytes(cols),
                rows * spec.groups(cols),
                data.len(),
                scales.len()
            )));
        }
        Ok(Self { spec, rows, cols, data, scales })
    }

    pub fn row_bytes(&self) -> usize {
        self.spec.row_bytes(self.cols)
    }

    pub fn groups(&self) -> usize {
        self.spec.groups(self.cols)
    }

    /// Row `r` dequantized into `out` (`cols` values).
    pub fn dequantize_row(&self, r: usize, out: &mut [f32]) {
        let (rb, groups, g) = (self.row_bytes(), self.groups(), self.spec.group);
        let bytes = &self.data[r * rb..(r + 1) * rb];
        let scales = &self.scales[r * groups..(r + 1) * groups];
        let mut offset = 0;
        for (gi, chunk) in out[..self.cols].chunks_mut(g).enumerate() {
            offset += unpack_group(self.spec.bits, &bytes[offset..], chunk);
            let s = scales[gi];
            for v in chunk.iter_mut() {
                *v *= s;
            }
        }
    }

    /// The whole matrix dequantized, row-major.
    pub fn dequantize(&self) -> Vec<f32> {
        let mut out = vec![0f32; self.rows * self.cols];
        for (r, row) in out.chunks_mut(self.cols.max(1)).enumerate().take(self.rows) {
            self.dequantize_row(r, row);
        }
        out
    }

    /// Rows `rows` as their own matrix (same spec).
    pub fn slice_rows(&self, rows: std::ops::Range<usize>) -> Self {
        let (rb, groups) = (self.row_bytes(), self.groups());
        Self {
            spec: self.spec,
            rows: rows.len(),
            cols: self.cols,
            data: self.data[rows.start * rb..rows.end * rb].to_vec(),
            scales: self.scales[rows.start * groups..rows.end * groups].to_vec(),
        }
    }

    /// Bytes of one whole group (`group` values).
    pub fn group_bytes(&self) -> usize {
        self.spec.row_bytes(self.spec.group)
    }

    /// The packed values with every group whole: rows of `groups · group_bytes` bytes, a ragged
    /// last group padded with zeros and, in q4, laid out as a whole group is (value `i` beside
    /// value `i + group/2`). The GPU kernels' layout: each group starts on a word boundary, and
    /// a word's columns follow from its position alone.
    pub fn whole_groups(&self) -> Vec<u8> {
        let (g, gb, rb) = (self.spec.group, self.group_bytes(), self.row_bytes());
        let ragged = self.cols % g;
        if ragged == 0 {
            return self.data.clone();
        }
        let full = self.cols / g;
        let mut out = vec![0u8; self.rows * self.groups() * gb];
        let (mut values, mut q) = (vec![0f32; ragged], vec![0i8; g]);
        for (row, dst) in self.data.chunks(rb.max(1)).zip(out.chunks_mut(self.groups() * gb)).take(self.rows) {
            dst[..full * gb].copy_from_slice(&row[..full * gb]);
            unpack_group(self.spec.bits, &row[full * gb..], &mut values);
            for (q, &v) in q.iter_mut().zip(&values) {
                *q = v as i8;
            }
            q[ragged..].fill(0);
            pack_group(self.spec.bits, &q, &mut dst[full * gb..]);
        }
        out
    }

    /// Bytes held in memory.
    pub fn memory_bytes(&self) -> usize {
        self.data.len() + self.scales.len() * 4
    }
}

/// Blocks of rows [`PackedMatrix::quantize_rows`] hands out (a few per thread, so they balance).
const QUANTIZE_PIECES: usize = 64;

/// Rows `first..` into a block's `data` and `scales`: `fill`, then [`quantize_row`], row by row.
/// Compiled for AVX2 too and picked at run time (SSE2 has no integer maximum or float rounding to
/// vectorise with); the numbers are the same either way.
fn quantize_block(first: usize, data: &mut [u8], scales: &mut [f32], cols: usize, spec: QuantSpec, fill: &(impl Fn(usize, &mut [f32]) + Sync)) {
    #[cfg(target_arch = "x86_64")]
    if std::arch::is_x86_feature_detected!("avx2") {
        // SAFETY: the CPU has the feature the function is compiled for (checked above).
        return unsafe { quantize_block_avx2(first, data, scales, cols, spec, fill) };
    }
    quantize_block_body(first, data, scales, cols, spec, fill)
}

#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx2")]
unsafe fn quantize_block_avx2(first: usize, data: &mut [u8], scales: &mut [f32], cols: usize, spec: QuantSpec, fill: &(impl Fn(usize, &mut [f32]) + Sync)) {
    quantize_block_body(first, data, scales, cols, spec, fill)
}

#[inline(always)]
fn quantize_block_body(first: usize, data: &mut [u8], scales: &mut [f32], cols: usize, spec: QuantSpec, fill: &(impl Fn(usize, &mut [f32]) + Sync)) {
    let (row_bytes, groups) = (spec.row_bytes(cols), spec.groups(cols));
    let (mut row, mut q) = (vec![0f32; cols], vec![0i8; spec.group]);
    for (i, (out, scales)) in data.chunks_mut(row_bytes).zip(scales.chunks_mut(groups)).enumerate() {
        fill(first + i, &mut row);
        quantize_row(&row, spec, &mut q, out, scales);
    }
}

/// Quantizes one row (see the module docs): `q` is a group's scratch, `out` the row's packed bytes,
/// `scales` its groups' scales.
#[inline(always)]
fn quantize_row(row: &[f32], spec: QuantSpec, q: &mut [i8], out: &mut [u8], scales: &mut [f32]) {
    let qmax = spec.bits.qmax();
    let mut offset = 0;
    for (chunk, slot) in row.chunks(spec.group).zip(scales) {
        let scale = spec.scale.round_up(abs_max(chunk) / qmax);
        *slot = scale;
        let inverse = if scale > 0.0 && scale.is_finite() { 1.0 / scale } else { 0.0 };
        for (qi, &v) in q.iter_mut().zip(chunk) {
            // Multiply by the reciprocal: the same op in every path (converter, load time).
            *qi = round_to_level(v * inverse, qmax);
        }
        offset += pack_group(spec.bits, &q[..chunk.len()], &mut out[offset..]);
    }
}

/// `max |v|`, NaN counted as 0 (as `f32::max` skips it), on the bits: non-negative floats order as
/// their bit patterns do, and an integer maximum vectorises where a float one does not.
#[inline(always)]
pub(super) fn abs_max(values: &[f32]) -> f32 {
    const INFINITY_BITS: u32 = 0x7f80_0000;
    let magnitude = |v: &f32| {
        let a = v.to_bits() & 0x7fff_ffff;
        if a > INFINITY_BITS { 0 } else { a }
    };
    // Eight running maxima side by side: the shape the vectoriser recognises.
    let mut lanes = [0u32; 8];
    let mut chunks = values.chunks_exact(8);
    for chunk in &mut chunks {
        for (m, v) in lanes.iter_mut().zip(chunk) {
            *m = (*m).max(magnitude(v));
        }
    }
    let bits = chunks.remainder().iter().map(magnitude).chain(lanes).max().unwrap_or(0);
    f32::from_bits(bits)
}

/// `x.round().clamp(-qmax, qmax) as i8` (half away from zero; NaN gives 0), written so that it
/// vectorises on any x86-64 (`round` and `trunc` are libm calls below SSE4.1): clamped first (the
/// same, as `qmax` is whole), then truncated by the integer conversion, whose fraction is exact.
#[inline(always)]
pub(super) fn round_to_level(x: f32, qmax: f32) -> i8 {
    let x = x.clamp(-qmax, qmax);
    let t = x as i32;
    let d = x - t as f32;
    (t + i32::from(d >= 0.5) - i32::from(d <= -0.5)) as i8
}

/// Packs one group's values `q` into `out`; returns the bytes written.
#[inline(always)]
fn pack_group(bits: Bits, q: &[i8], out: &mut [u8]) -> usize {
    match bits {
        Bits::Q8 => {
            for (o, &v) in out.iter_mut().zip(q) {
                *o = v as u8;
            }
            q.len()
        }
        Bits::Q4 => {
            let half = q.len().div_ceil(2);
            let (low, high) = q.split_at(half);
            for ((o, &lo), &hi) in out.iter_mut().zip(low).zip(high) {
                *o = (lo + 8) as u8 | (((hi + 8) as u8) << 4);
            }
            if low.len() > high.len() {
                out[half - 1] = (low[half - 1] + 8) as u8 | (8 << 4); // odd group: the last high nibble pads
            }
            half
        }
    }
}

/// Unpacks one group of `out.len()` values (unscaled, as f32) from `bytes`; returns the bytes read.
#[inline(always)]
pub(crate) fn unpack_group(bits: Bits, bytes: &[u8], out: &mut [f32]) -> usize {
    match bits {
        Bits::Q8 => {
            for (o, &b) in out.iter_mut().zip(bytes) {
                *o = b as i8 as f32;
            }
            out.len()
        }
        Bits::Q4 => {
            let half = out.len().div_ceil(2);
            let (lo, hi) = out.split_at_mut(half);
            let bytes = &bytes[..half];
            for (o, &b) in lo.iter_mut().zip(bytes) {
                *o = (b & 15) as f32 - 8.0;
            }
            for (o, &b) in hi.iter_mut().zip(bytes) {
                *o = (b >> 4) as f32 - 8.0;
            }
            half
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn values(n: usize, seed: u32) -> Vec<f32> {
        // A small deterministic generator with outliers now and then.
        let mut x = seed.wrapping_mul(2654435761).wrapping_add(1);
        (0..n)
            .map(|i| {
                x ^= x << 13;
                x ^= x >> 17;
                x ^= x << 5;
                let v = (x as f32 / u32::MAX as f32) * 2.0 - 1.0;
                if i % 97 == 0 { v * 20.0 } else { v }
            })
            .collect()
    }

    /// The vectorisable rounding and maximum are `f32::round` + clamp and `f32::max` exactly:
    /// halves, values beyond the range, infinities and NaN included.
    #[test]
    fn rounding_and_maximum_match_std() {
        let mut values: Vec<f32> = (-600..=600).map(|i| i as f32 * 0.25).collect();
        values.extend([0.49999997, -0.49999997, 0.50000006, 7.5, -7.5, 6.5, 126.5, -126.5, 127.49, -0.0, 1e-30, 8388607.5, 1e7, -3e9]);
        values.extend([f32::INFINITY, f32::NEG_INFINITY, f32::NAN, -f32::NAN]);
        for qmax in [Bits::Q4.qmax(), Bits::Q8.qmax()] {
            for &v in &values {
                assert_eq!(round_to_level(v, qmax), v.round().clamp(-qmax, qmax) as i8, "{v}");
            }
        }
        for chunk in values.chunks(7).chain([&values[values.len() - 3..], &[f32::NAN][..], &[][..]]) {
            let want = chunk.iter().fold(0f32, |m, v| m.max(v.abs()));
            assert_eq!(abs_max(chunk).to_bits(), want.to_bits(), "{chunk:?}");
        }
    }

    /// Every value comes back within half a step of its group's scale, for both widths, every
    /// group size, both scale dtypes, and columns that leave a ragged (odd) last group.
    #[test]
    fn round_trip_within_half_a_step() {
        for bits in [Bits::Q4, Bits::Q8] {
            for group in GROUP_SIZES {
                for scale in [ScaleDtype::F16, ScaleDtype::F32] {
                    for (rows, cols) in [(3, 48), (5, 101), (2, 256), (1, 7), (4, 130)] {
                        let spec = QuantSpec::new(bits, group, scale).unwrap();
                        let v = values(rows * cols, (rows * cols + group) as u32);
                        let p = PackedMatrix::quantize(&v, rows, cols, spec);
                        assert_eq!(p.data.len(), rows * spec.row_bytes(cols));
                        let back = p.dequantize();
                        for r in 0..rows {
                            for c in 0..cols {
                                let s = p.scales[r * p.groups() + c / group];
                                let err = (back[r * cols + c] - v[r * cols + c]).abs();
                                assert!(err <= s * 0.5 * (1.0 + 1e-5), "{spec} {rows}×{cols} ({r},{c}): error {err} > scale/2 = {}", s / 2.0);
                            }
                        }
                    }
                }
            }
        }
    }

    /// The group's largest value is representable (scale rounded up, never clipped), and zero rows
    /// stay zero.
    #[test]
    fn extremes() {
        let spec = QuantSpec::new(Bits::Q4, 32, ScaleDtype::F16).unwrap();
        let mut v = vec![0.0f32; 64];
        v[3] = 0.123_456;
        v[40] = -1.0e-3;
        let p = PackedMatrix::quantize(&v, 1, 64, spec);
        let back = p.dequantize();
        assert!((back[3] - v[3]).abs() <= p.scales[0] / 2.0);
        assert!(p.scales[0] * 7.0 >= 0.123_456);
        assert_eq!(back[0], 0.0);
        let zeros = PackedMatrix::quantize(&[0.0; 40], 1, 40, spec);
        assert!(zeros.dequantize().iter().all(|&x| x == 0.0));
    }

    /// Whole groups: a ragged last group comes back padded with zeros in the whole group's
    /// layout, the values unchanged; whole rows are the stored bytes as they are.
    #[test]
    fn whole_groups_pad_the_last_group() {
        for bits in [Bits::Q4, Bits::Q8] {
            for (cols, group) in [(35, 32), (101, 64), (256, 128), (7, 32)] {
                let spec = QuantSpec::new(bits, group, ScaleDtype::F32).unwrap();
                let v = values(3 * cols, cols as u32);
                let p = PackedMatrix::quantize(&v, 3, cols, spec);
                let padded = p.whole_groups();
                let groups = p.groups();
                assert_eq!(padded.len(), 3 * groups * p.group_bytes());
                let wide = PackedMatrix { cols: groups * group, data: padded, ..p.clone() };
                let (narrow, back) = (p.dequantize(), wide.dequantize());
                for r in 0..3 {
                    assert_eq!(back[r * wide.cols..r * wide.cols + cols], narrow[r * cols..(r + 1) * cols], "{spec} {cols}");
                    assert!(back[r * wide.cols + cols..(r + 1) * wide.cols].iter().all(|&x| x == 0.0));
                }
            }
        }
    }

    /// Byte layout: q4 group byte i = value i (low nibble) and value i + ⌈L/2⌉ (high), offset by 8.
    #[test]
    fn q4_layout() {
        let spec = QuantSpec::new(Bits::Q4, 32, ScaleDtype::F32).unwrap();
        // 35 columns: one group of 32 (16 bytes) and a tail of 3 (2 bytes, last high nibble padded).
        let mut v: Vec<f32> = (0..35).map(|i| ((i % 15) as f32 - 7.0) / 7.0).collect();
        v[0] = 1.0; // amax 1 in both groups → scale 1/7
        v[32] = 1.0;
        let p = PackedMatrix::quantize(&v, 1, 35, spec);
        assert_eq!(p.data.len(), 18);
        let q = |i: usize| ((v[i] * 7.0).round() as i8 + 8) as u8;
        assert_eq!(p.data[1], q(1) | (q(17) << 4));
        assert_eq!(p.data[16], q(32) | (q(34) << 4));
        assert_eq!(p.data[17], q(33) | (8 << 4));
    }
}
