//! `exp`, `erf`, GELU and CLIP's quick GELU on `f32` slices for the host kernels, in operations the compiler
//! vectorises (no library call per value), with AVX-512 chosen at run time where a loop is hot.

/// `eᵡ` for `x ≤ 0` (Cephes' `expf`: 2ⁿ · e^r with |r| ≤ ln2/2 and a degree-6 polynomial, about 1 ulp),
/// in operations the compiler vectorises (no library call); below −87 it is 0.
#[inline]
pub(super) fn exp(x: f32) -> f32 {
    const LOG2E: f32 = std::f32::consts::LOG2_E;
    const ROUND: f32 = 12_582_912.0; // 1.5 · 2²³: adding and subtracting it rounds to an integer
    let x = x.max(-87.0);
    let n = (x * LOG2E + ROUND) - ROUND;
    let r = x - n * 0.693_359_4 - n * -2.121_944_4e-4;
    let mut p = 1.987_569_1e-4_f32;
    p = p * r + 1.398_199_9e-3;
    p = p * r + 8.333_452e-3;
    p = p * r + 4.166_579_6e-2;
    p = p * r + 1.666_666_5e-1;
    p = p * r + 5.000_000_1e-1;
    let y = p * r * r + r + 1.0;
    y * f32::from_bits(((n as i32 + 127) << 23) as u32)
}

/// `erf(x)` (Abramowitz & Stegun 7.1.26: `1 − poly(t)·e^(−x²)`, `t = 1/(1 + p|x|)`), within 2e-7 of
/// the exact value everywhere.
#[inline(always)]
fn erf(x: f32) -> f32 {
    let a = x.abs();
    let t = 1.0 / (1.0 + 0.327_591_1 * a);
    let poly = t * (0.254_829_6 + t * (-0.284_496_74 + t * (1.421_413_8 + t * (-1.453_152_1 + t * 1.061_405_4))));
    let y = 1.0 - poly * exp(-a * a);
    if x < 0.0 { -y } else { y }
}

/// `$name(values)` in place: `$plain` over the slice, also built for AVX-512 (`$fast`) and chosen
/// at run time.
macro_rules! in_place {
    ($(#[$doc:meta])* $name:ident, $fast:ident, $plain:ident) => {
        $(#[$doc])*
        pub(super) fn $name(values: &mut [f32]) {
            #[cfg(target_arch = "x86_64")]
            if std::arch::is_x86_feature_detected!("avx512f") {
                // SAFETY: the CPU has AVX-512F (checked above).
                return unsafe { $fast(values) };
            }
            $plain(values)
        }

        #[cfg(target_arch = "x86_64")]
        #[target_feature(enable = "avx512f")]
        unsafe fn $fast(values: &mut [f32]) {
            $plain(values)
        }
    };
}

in_place!(
    /// GELU (`x · ½(1 + erf(x/√2))`, burn's and PyTorch's exact form) in place.
    gelu_in_place, gelu_avx512, gelu_values
);

in_place!(
    /// CLIP's quick GELU (`x · σ(1.702 x)`) in place.
    quick_gelu_in_place, quick_gelu_avx512, quick_gelu_values
);

#[inline(always)]
fn quick_gelu_values(values: &mut [f32]) {
    for x in values.iter_mut() {
        // σ(z) from e^(−|z|) ≤ 1 (no overflow): 1/(1+e) for z ≥ 0, e/(1+e) below.
        let z = *x * 1.702;
        let e = exp(-z.abs());
        let s = if z >= 0.0 { 1.0 } else { e } / (1.0 + e);
        *x *= s;
    }
}

#[inline(always)]
fn gelu_values(values: &mut [f32]) {
    for x in values.iter_mut() {
        *x = *x * 0.5 * (1.0 + erf(*x * std::f32::consts::FRAC_1_SQRT_2));
    }
}

#[cfg(test)]
mod tests {
    use super::{erf, exp, gelu_in_place};

    #[test]
    fn exp_is_within_two_ulps_of_std() {
        let mut x = -87.0f32;
        while x <= 0.0 {
            let (got, want) = (exp(x), x.exp());
            assert!((got - want).abs() <= 2.0 * f32::EPSILON * want, "exp({x}) = {got}, std {want}");
            x += 0.001_3;
        }
        assert_eq!(exp(0.0), 1.0);
        assert_eq!(exp(-1000.0), exp(-87.0));
    }

    /// `ours` against `burn`'s op on `count` values from `from` in steps of 0.001: within
    /// `tolerance · max(|x|, 1)` everywhere.
    #[cfg(feature = "flex")]
    fn close_to_burns(name: &str, from: f32, count: usize, tolerance: f32, burn: impl Fn(burn::tensor::Tensor<1>) -> burn::tensor::Tensor<1>, ours: fn(&mut [f32])) {
        use burn::tensor::{Device, Tensor, TensorData};
        let values: Vec<f32> = (0..count).map(|i| from + i as f32 * 0.001).collect();
        let x = Tensor::<1>::from_data(TensorData::new(values.clone(), [count]), &Device::flex());
        let theirs = burn(x).into_data().convert::<f32>().try_into_vec::<f32>().unwrap();
        let mut mine = values.clone();
        ours(&mut mine);
        for ((x, a), b) in values.iter().zip(&mine).zip(&theirs) {
            assert!((a - b).abs() <= tolerance * x.abs().max(1.0), "{name}({x}) = {a}, burn {b}");
        }
    }

    /// Against burn's `x · sigmoid(1.702 x)`, which this one replaces on the CPU.
    #[cfg(feature = "flex")]
    #[test]
    fn quick_gelu_is_close_to_burns() {
        close_to_burns("quick_gelu", -20.0, 40_000, 4e-7, |x| x.clone() * burn::tensor::activation::sigmoid(x * 1.702), super::quick_gelu_in_place);
    }

    /// Against burn's GELU (libm's `erff`, about 1 ulp), which this one replaces on the CPU.
    #[cfg(feature = "flex")]
    #[test]
    fn gelu_is_close_to_burns() {
        close_to_burns("gelu", -12.0, 24_000, 3e-7, burn::tensor::activation::gelu, gelu_in_place);
        assert!(erf(0.0).abs() <= 2e-7);
        assert!((erf(3.0) - 0.999_977_9).abs() < 1e-7 && (erf(-0.5) + 0.520_499_9).abs() < 2e-7);
    }
}
