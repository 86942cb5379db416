//! Stored tensor bytes to the float type tensors are built in, on the host: widening or narrowing
//! bf16/f16/f32 (a half type stored as the device's own is copied as is) and transposing `(out, in)`
//! matrices to burn's `[in, out]`, split over the CPU's threads (loading the real checkpoint is
//! 3.3 B values: one core doing it alone was most of the load time) and in cache-sized tiles.

use safetensors::Dtype;

use crate::model::ops::map_par;

/// Values per piece of work handed to a thread (small tensors stay on the calling thread).
const PIECE: usize = 1 << 18;

/// Rows a transpose reads at a time, and the widest band of columns one thread writes: a tile of
/// f32 stays in L1/L2.
const TILE: usize = 32;
const BAND_MAX: usize = 512;

/// Bytes per stored value of a float dtype.
pub(crate) fn float_bytes(dtype: Dtype) -> Option<usize> {
    match dtype {
        Dtype::F32 => Some(4),
        Dtype::F16 | Dtype::BF16 => Some(2),
        _ => None,
    }
}

/// What stored values become: f32, or the bits of a half type (a device whose float type is f16 or
/// bf16 gets its tensors built so, instead of from f32 that burn then narrows on one thread).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Half {
    F16,
    BF16,
}

impl Half {
    /// The half type of the float tensors `device` makes by default (`None`: build f32).
    pub(crate) fn of(device: &burn::tensor::Device) -> Option<Self> {
        match device.settings().float_dtype {
            burn::tensor::FloatDType::F16 => Some(Half::F16),
            burn::tensor::FloatDType::BF16 => Some(Half::BF16),
            _ => None,
        }
    }

    pub(crate) fn dtype(self) -> burn::tensor::DType {
        match self {
            Half::F16 => burn::tensor::DType::F16,
            Half::BF16 => burn::tensor::DType::BF16,
        }
    }

    fn stored(self) -> Dtype {
        match self {
            Half::F16 => Dtype::F16,
            Half::BF16 => Dtype::BF16,
        }
    }

    /// `v` rounded to this type (round to nearest even, as burn's casts do).
    #[inline]
    fn from_f32(self, v: f32) -> u16 {
        match self {
            Half::F16 => half::f16::from_f32(v).to_bits(),
            Half::BF16 => half::bf16::from_f32(v).to_bits(),
        }
    }
}

/// `n` zeros for a tensor about to be written whole (`f32`, or `u16` for half bits). On Linux a
/// large one asks for transparent huge pages: the first write to each page is then one fault per
/// 2 MiB instead of per 4 KiB, and the faults (the kernel zeroing fresh memory) were most of a float
/// checkpoint's load time.
pub(crate) fn zeroed<T: Value>(n: usize) -> Vec<T> {
    // `vec![zero; n]` of a primitive is one zeroed allocation (fresh pages, not written here).
    let v = vec![T::default(); n];
    let bytes = n * size_of::<T>();
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    if bytes >= HUGE_PAGE {
        let start = (v.as_ptr() as usize).next_multiple_of(HUGE_PAGE);
        let end = (v.as_ptr() as usize + bytes) / HUGE_PAGE * HUGE_PAGE;
        if end > start {
            // SAFETY: advice on whole pages inside the vector's own allocation; it changes how
            // they are backed, never their contents (still zero, not yet touched).
            unsafe { libc::madvise(start as *mut libc::c_void, end - start, libc::MADV_HUGEPAGE) };
        }
    }
    #[cfg(not(all(target_os = "linux", target_env = "gnu")))]
    let _ = bytes;
    v
}

/// An element of a converted tensor: f32, or u16 holding a half type's bits.
pub(crate) trait Value: Copy + Default + Send + Sync + 'static {}
impl Value for f32 {}
impl Value for u16 {}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
const HUGE_PAGE: usize = 2 << 20;

/// Stored little-endian `dtype` values `bytes` widened into `out` (`bytes.len() / size` values;
/// bf16 and f16 widen exactly), on one thread. Non-float dtypes are the caller's to reject.
#[inline]
pub(crate) fn widen_into(dtype: Dtype, bytes: &[u8], out: &mut [f32]) {
    match dtype {
        Dtype::F32 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(4)) {
                *o = f32::from_le_bytes([b[0], b[1], b[2], b[3]]);
            }
        }
        // bf16 is the top half of an f32: a shift, which vectorises.
        Dtype::BF16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = f32::from_bits(u32::from(u16::from_le_bytes([b[0], b[1]])) << 16);
            }
        }
        Dtype::F16 => {
            for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
                *o = half::f16::from_le_bytes([b[0], b[1]]).to_f32();
            }
        }
        _ => {}
    }
}

/// Stored little-endian `dtype` values `bytes` as `target` bits into `out`, on one thread: copied
/// when stored so, else rounded from their (exact) f32 value.
#[inline]
pub(crate) fn narrow_into(dtype: Dtype, target: Half, bytes: &[u8], out: &mut [u16]) {
    if dtype == target.stored() {
        for (o, b) in out.iter_mut().zip(bytes.chunks_exact(2)) {
            *o = u16::from_le_bytes([b[0], b[1]]);
        }
        return;
    }
    let size = float_bytes(dtype).unwrap_or(4);
    let mut wide = [0f32; 64];
    for (out, bytes) in out.chunks_mut(64).zip(bytes.chunks(64 * size)) {
        let wide = &mut wide[..out.len()];
        widen_into(dtype, bytes, wide);
        for (o, &v) in out.iter_mut().zip(wide.iter()) {
            *o = target.from_f32(v);
        }
    }
}

/// Stored `dtype` values into `out` (`bytes.len() / size` of them) by `convert`, split over the
/// CPU's threads for large tensors.
pub(crate) fn convert_par<T: Value>(dtype: Dtype, bytes: &[u8], out: &mut [T], convert: impl Fn(&[u8], &mut [T]) + Sync) {
    let Some(size) = float_bytes(dtype) else { return };
    if out.len() <= PIECE {
        return convert(bytes, out);
    }
    let pieces: Vec<_> = bytes.chunks(PIECE * size).zip(out.chunks_mut(PIECE)).collect();
    map_par(pieces, |(bytes, out)| convert(bytes, out));
}

/// Stored `dtype` values as a new f32 vector.
pub(crate) fn widen(dtype: Dtype, bytes: &[u8]) -> Vec<f32> {
    let mut out = zeroed(float_bytes(dtype).map_or(0, |size| bytes.len() / size));
    convert_par(dtype, bytes, &mut out, |bytes, out| widen_into(dtype, bytes, out));
    out
}

/// `(rows, cols)` row-major → `(cols, rows)` row-major.
pub(crate) fn transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    debug_assert_eq!(values.len(), rows * cols);
    let mut t = zeroed(values.len());
    transpose_into(cols, &mut t, rows, 0, rows, |r, c, out| out.copy_from_slice(&values[r * cols + c.start..r * cols + c.end]));
    t
}

/// Stored `dtype` rows `bytes` (`(rows, cols)` row-major) converted by `convert` and transposed in
/// one pass into columns `at..at + rows` of `out`, a `(cols, out_rows)` row-major matrix.
pub(crate) fn convert_transposed_into<T: Value>(
    dtype: Dtype,
    bytes: &[u8],
    cols: usize,
    out: &mut [T],
    out_rows: usize,
    at: usize,
    convert: impl Fn(&[u8], &mut [T]) + Sync,
) {
    let Some(size) = float_bytes(dtype) else { return };
    let rows = bytes.len() / (size * cols).max(1);
    transpose_into(cols, out, out_rows, at, rows, |r, c, out| convert(&bytes[(r * cols + c.start) * size..(r * cols + c.end) * size], out));
}

/// Writes the transpose of a `(rows, cols)` matrix into columns `at..at + rows` of `out`, a `(cols,
/// out_rows)` row-major matrix; `row(r, columns, values)` gives row `r`'s values at `columns`.
/// Bands of output rows (input columns) go to the CPU's threads; each reads TILE input rows at a
/// time into a buffer that stays in cache (sequential reads of the source), then writes them out.
fn transpose_into<T: Value>(
    cols: usize,
    out: &mut [T],
    out_rows: usize,
    at: usize,
    rows: usize,
    row: impl Fn(usize, std::ops::Range<usize>, &mut [T]) + Sync,
) {
    if rows == 0 || cols == 0 {
        return;
    }
    debug_assert!(out.len() == cols * out_rows && at + rows <= out_rows);
    let band = (PIECE / out_rows).clamp(TILE, BAND_MAX).min(cols);
    let bands: Vec<_> = out.chunks_mut(band * out_rows).enumerate().collect();
    map_par(bands, |(b, out)| {
        let columns = b * band..((b + 1) * band).min(cols);
        let width = columns.len();
        let mut tile = vec![T::default(); TILE * width];
        for r0 in (0..rows).step_by(TILE) {
            let n = TILE.min(rows - r0);
            for (i, line) in tile.chunks_mut(width).take(n).enumerate() {
                row(r0 + i, columns.clone(), line);
            }
            for c in 0..width {
                let line = &mut out[c * out_rows + at + r0..][..n];
                for (i, o) in line.iter_mut().enumerate() {
                    *o = tile[i * width + c];
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn naive_transpose(values: &[f32], rows: usize, cols: usize) -> Vec<f32> {
        let mut t = vec![0f32; values.len()];
        for r in 0..rows {
            for c in 0..cols {
                t[c * rows + r] = values[r * cols + c];
            }
        }
        t
    }

    /// Tiles, ragged edges and thread bands give the plain transpose.
    #[test]
    fn transpose_matches_naive() {
        for (rows, cols) in [(1, 1), (1, 70), (70, 1), (33, 65), (300, 1000), (2000, 300), (9000, 40)] {
            let values: Vec<f32> = (0..rows * cols).map(|i| i as f32).collect();
            assert_eq!(transpose(&values, rows, cols), naive_transpose(&values, rows, cols), "{rows}x{cols}");
        }
    }

    /// Widening and transposing stored rows in parts (as a sharded tensor is read) is widening,
    /// then transposing.
    #[test]
    fn widen_transposed_matches_widen_then_transpose() {
        let (rows, cols) = (700, 45);
        let values: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
        for dtype in [Dtype::BF16, Dtype::F16, Dtype::F32] {
            let bytes: Vec<u8> = match dtype {
                Dtype::BF16 => values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect(),
                Dtype::F16 => values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect(),
                _ => values.iter().flat_map(|&v| v.to_le_bytes()).collect(),
            };
            let want = naive_transpose(&widen(dtype, &bytes), rows, cols);
            let mut out = vec![0f32; rows * cols];
            let row_bytes = bytes.len() / rows;
            for (start, end) in [(0, 33), (33, 400), (400, 700)] {
                convert_transposed_into(dtype, &bytes[start * row_bytes..end * row_bytes], cols, &mut out, rows, start, |b, o| widen_into(dtype, b, o));
            }
            assert_eq!(out, want, "{dtype:?}");
        }
    }

    /// Narrowing to a half type gives burn's own cast of the exact f32 values (what the loader did
    /// before building half tensors directly), and a half type stored as the target is copied.
    #[test]
    fn narrow_matches_burn_cast() {
        use burn::tensor::{DType, TensorData};
        let values: Vec<f32> = (0..5000).map(|i| ((i as f32 - 2500.0) * 0.0137).sinh() * 3.1e-3).chain([0.0, -0.0, 7e4, -1e9, 1e-8, f32::MAX]).collect();
        let stored: [(Dtype, Vec<u8>); 3] = [
            (Dtype::BF16, values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect()),
            (Dtype::F16, values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect()),
            (Dtype::F32, values.iter().flat_map(|&v| v.to_le_bytes()).collect()),
        ];
        for (dtype, bytes) in &stored {
            for target in [Half::F16, Half::BF16] {
                let mut bits = vec![0u16; values.len()];
                narrow_into(*dtype, target, bytes, &mut bits);
                let cast = TensorData::new(widen(*dtype, bytes), [values.len()]).convert_dtype(target.dtype());
                let want: Vec<u16> = match target.dtype() {
                    DType::F16 => cast.try_to_vec::<half::f16>().unwrap().iter().map(|v| v.to_bits()).collect(),
                    _ => cast.try_to_vec::<half::bf16>().unwrap().iter().map(|v| v.to_bits()).collect(),
                };
                assert_eq!(bits, want, "{dtype:?} -> {target:?}");
            }
        }
    }

    /// Each dtype widens exactly, across piece boundaries.
    #[test]
    fn widen_is_exact() {
        let values: Vec<f32> = (0..PIECE * 2 + 37).map(|i| (i as f32 - 1000.0) * 0.375).collect();
        let bf16: Vec<u8> = values.iter().flat_map(|&v| half::bf16::from_f32(v).to_le_bytes()).collect();
        let f16: Vec<u8> = values.iter().flat_map(|&v| half::f16::from_f32(v).to_le_bytes()).collect();
        let f32: Vec<u8> = values.iter().flat_map(|&v| v.to_le_bytes()).collect();
        let want_bf16: Vec<f32> = values.iter().map(|&v| half::bf16::from_f32(v).to_f32()).collect();
        let want_f16: Vec<f32> = values.iter().map(|&v| half::f16::from_f32(v).to_f32()).collect();
        assert_eq!(widen(Dtype::BF16, &bf16), want_bf16);
        assert_eq!(widen(Dtype::F16, &f16), want_f16);
        assert_eq!(widen(Dtype::F32, &f32), values);
        assert!(widen(Dtype::I8, &[1, 2, 3]).is_empty());
    }
}
