//! Pillow's BICUBIC resampling (spec §2.3), the one filter the reference uses everywhere: `Image.resize`
//! on 8-bit images and PyTorch's `interpolate(mode="bicubic", antialias=True, align_corners=False)` on the
//! SAM and CLIP position tables, which is the same algorithm in floating point.
//!
//! Separable; per axis the filter support widens with the downscale factor (anti-aliasing), the window is
//! clipped at the edges and the weights renormalised over it.

/// Keys' cubic convolution kernel with `a = −0.5` (Pillow's and PyTorch's anti-aliased bicubic).
fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

/// The source window and normalised weights of every output position along one axis.
#[derive(Debug, Clone)]
pub struct AxisWeights {
    /// First source index of each output position's window.
    pub start: Vec<usize>,
    /// Weights over `start[i] .. start[i] + weights[i].len()`, summing to 1.
    pub weights: Vec<Vec<f64>>,
}

impl AxisWeights {
    /// Pillow's `precompute_coeffs` for BICUBIC from `in_size` to `out_size` samples.
    pub fn bicubic(in_size: usize, out_size: usize) -> Self {
        assert!(in_size > 0 && out_size > 0, "resampling needs non-empty axes");
        const SUPPORT: f64 = 2.0;
        let scale = in_size as f64 / out_size as f64;
        let filter_scale = scale.max(1.0);
        let support = SUPPORT * filter_scale;
        let mut start = Vec::with_capacity(out_size);
        let mut weights = Vec::with_capacity(out_size);
        // Pillow multiplies by the reciprocal; the last bit matters for the 8-bit rounding below.
        let inv_filter_scale = 1.0 / filter_scale;
        for i in 0..out_size {
            let center = (i as f64 + 0.5) * scale;
            // C casts truncate toward zero; the window is clipped to the image.
            let lo = ((center - support + 0.5) as i64).max(0) as usize;
            let hi = ((center + support + 0.5) as i64).min(in_size as i64) as usize;
            let mut w: Vec<f64> =
                (lo..hi).map(|x| bicubic((x as f64 - center + 0.5) * inv_filter_scale)).collect();
            let total: f64 = w.iter().sum();
            if total != 0.0 {
                w.iter_mut().for_each(|v| *v /= total);
            }
            start.push(lo);
            weights.push(w);
        }
        Self { start, weights }
    }
}

/// Fixed-point fraction bits of Pillow's 8-bit resampling (`PRECISION_BITS = 32 − 8 − 2`).
const PRECISION_BITS: u32 = 22;

impl AxisWeights {
    /// The weights as Pillow's 8-bit path uses them: rounded half away from zero to 22 fraction bits.
    fn fixed_point(&self) -> Vec<Vec<i32>> {
        let one = (1u32 << PRECISION_BITS) as f64;
        self.weights
            .iter()
            .map(|ws| ws.iter().map(|&w| if w < 0.0 { (-0.5 + w * one) as i32 } else { (0.5 + w * one) as i32 }).collect())
            .collect()
    }
}

/// Pillow's `clip8`: round (the accumulator starts at one half) and clamp to 0..=255.
fn clip8(acc: i32) -> u8 {
    if acc >= (1 << PRECISION_BITS << 8) {
        255
    } else if acc <= 0 {
        0
    } else {
        (acc >> PRECISION_BITS) as u8
    }
}

/// `Image.resize((out_w, out_h), BICUBIC)` of an 8-bit RGB image (`data` row-major, 3 bytes per pixel),
/// bit-exact with Pillow: horizontal pass, 8-bit intermediate, vertical pass; a same-size resize is a copy.
pub fn resize_rgb8(data: &[u8], [w, h]: [usize; 2], [out_w, out_h]: [usize; 2]) -> Vec<u8> {
    assert_eq!(data.len(), w * h * 3, "image size mismatch");
    let mut current = std::borrow::Cow::Borrowed(data);
    let mut width = w;
    if out_w != w {
        let axis = AxisWeights::bicubic(w, out_w);
        let kk = axis.fixed_point();
        let mut out = vec![0u8; out_w * h * 3];
        for y in 0..h {
            let row = &current[y * width * 3..][..width * 3];
            for (x, (&x0, k)) in axis.start.iter().zip(&kk).enumerate() {
                for c in 0..3 {
                    let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                    for (i, &wt) in k.iter().enumerate() {
                        acc += row[(x0 + i) * 3 + c] as i32 * wt;
                    }
                    out[(y * out_w + x) * 3 + c] = clip8(acc);
                }
            }
        }
        current = std::borrow::Cow::Owned(out);
        width = out_w;
    }
    if out_h != h {
        let axis = AxisWeights::bicubic(h, out_h);
        let kk = axis.fixed_point();
        let stride = width * 3;
        let mut out = vec![0u8; out_h * stride];
        for (y, (&y0, k)) in axis.start.iter().zip(&kk).enumerate() {
            for i in 0..stride {
                let mut acc: i32 = 1 << (PRECISION_BITS - 1);
                for (j, &wt) in k.iter().enumerate() {
                    acc += current[(y0 + j) * stride + i] as i32 * wt;
                }
                out[y * stride + i] = clip8(acc);
            }
        }
        current = std::borrow::Cow::Owned(out);
    }
    current.into_owned()
}

/// Resizes a channels-last float grid `[h, w, c]` to `[out_h, out_w, c]` (anti-aliased bicubic, no
/// rounding): PyTorch's `interpolate(bicubic, antialias=True, align_corners=False)` on the table.
pub fn resize_bicubic_f32(src: &[f32], [h, w, c]: [usize; 3], [out_h, out_w]: [usize; 2]) -> Vec<f32> {
    assert_eq!(src.len(), h * w * c, "grid size mismatch");
    if (h, w) == (out_h, out_w) {
        return src.to_vec();
    }
    // Horizontal pass over every source row, then vertical.
    let horizontal = AxisWeights::bicubic(w, out_w);
    let mut tmp = vec![0.0f64; h * out_w * c];
    for y in 0..h {
        for (x, (&x0, ws)) in horizontal.start.iter().zip(&horizontal.weights).enumerate() {
            let out = &mut tmp[(y * out_w + x) * c..][..c];
            for (k, &wt) in ws.iter().enumerate() {
                let row = &src[(y * w + x0 + k) * c..][..c];
                out.iter_mut().zip(row).for_each(|(o, &v)| *o += wt * v as f64);
            }
        }
    }
    let vertical = AxisWeights::bicubic(h, out_h);
    let mut dst = vec![0.0f32; out_h * out_w * c];
    let mut acc = vec![0.0f64; c];
    for (y, (&y0, ws)) in vertical.start.iter().zip(&vertical.weights).enumerate() {
        for x in 0..out_w {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for (k, &wt) in ws.iter().enumerate() {
                let row = &tmp[((y0 + k) * out_w + x) * c..][..c];
                acc.iter_mut().zip(row).for_each(|(a, &v)| *a += wt * v);
            }
            dst[(y * out_w + x) * c..][..c].iter_mut().zip(&acc).for_each(|(d, &a)| *d = a as f32);
        }
    }
    dst
}

/// 1-D linear interpolation of the rows of a `[len, c]` table to `out_len` rows, `align_corners=False`
/// (PyTorch `interpolate(mode="linear")`, used for SAM's relative-position tables).
pub fn resize_linear_rows_f32(src: &[f32], [len, c]: [usize; 2], out_len: usize) -> Vec<f32> {
    assert_eq!(src.len(), len * c, "table size mismatch");
    if len == out_len {
        return src.to_vec();
    }
    let scale = len as f32 / out_len as f32;
    let mut dst = vec![0.0f32; out_len * c];
    for i in 0..out_len {
        let pos = ((i as f32 + 0.5) * scale - 0.5).max(0.0);
        let i0 = pos as usize;
        let i1 = if i0 < len - 1 { i0 + 1 } else { i0 };
        let l1 = pos - i0 as f32;
        let l0 = 1.0 - l1;
        for ch in 0..c {
            dst[i * c + ch] = l0 * src[i0 * c + ch] + l1 * src[i1 * c + ch];
        }
    }
    dst
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn weights_are_normalised_and_clipped() {
        for (i, o) in [(64, 32), (64, 40), (64, 80), (16, 8), (16, 20), (1190, 640), (3, 7)] {
            let a = AxisWeights::bicubic(i, o);
            for (s, w) in a.start.iter().zip(&a.weights) {
                assert!(s + w.len() <= i);
                assert!((w.iter().sum::<f64>() - 1.0).abs() < 1e-12);
            }
        }
    }

    #[test]
    fn constant_grid_stays_constant_and_identity_is_a_copy() {
        let src = vec![0.25f32; 8 * 8 * 3];
        let out = resize_bicubic_f32(&src, [8, 8, 3], [5, 11]);
        assert!(out.iter().all(|v| (v - 0.25).abs() < 1e-6));
        let ramp: Vec<f32> = (0..16).map(|v| v as f32).collect();
        assert_eq!(resize_bicubic_f32(&ramp, [4, 4, 1], [4, 4]), ramp);
    }

    #[test]
    fn linear_rows_match_align_corners_false() {
        // 2 rows → 4 rows: sources −0.25 (clamped to 0), 0.25, 0.75, 1.25 (right neighbour clamped).
        let out = resize_linear_rows_f32(&[0.0, 4.0], [2, 1], 4);
        assert_eq!(out, vec![0.0, 1.0, 3.0, 4.0]);
    }
}
