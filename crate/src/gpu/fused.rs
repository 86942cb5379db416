//! Fused kernels for the decoder's small operations: each is one dispatch where burn's tensor ops
//! take several (burn's fusion is off in this build; a decoding step is bound by how many
//! dispatches it makes long before the GPU is busy). Arithmetic in f32 whatever the activations'
//! type; WebGPU's guaranteed limits only.
//!
//! * [`rms_norm`]: `x / sqrt(mean(x²) + ε) · γ` per row (burn: 6 dispatches).
//! * [`route`]: the MoE router — gate logits, softmax, top-k, the weights' normalisation and
//!   scaling (burn: 11) — writing each token's expert ids and weights for the experts' kernels.
//! * [`greedy`]: each row's arg-max, maximum and first NaN, so a greedy decoding step reads back
//!   three numbers per sequence instead of the vocabulary's logits.

use burn::tensor::{DType, Tensor};
use burn_cubecl::Cube;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::*;

use super::launch::{UNIT_STEPS, UNITS, cube, reduce_sum, storage};

#[cube(launch_unchecked)]
fn rms_norm_kernel<F: Float>(x: &[F], gamma: &[F], out: &mut [F], d: usize, eps: f32, #[define(F)] _dtype: ElemType) {
    let row = CUBE_POS_X as usize;
    let unit = UNIT_POS as usize;
    let base = row * d;
    let mut sum = 0.0f32;
    let mut c = unit;
    while c < d {
        let v = f32::cast_from(x[base + c]);
        sum += v * v;
        c += UNITS as usize;
    }
    let mut partial = Shared::<[f32]>::new_slice(UNITS as usize);
    partial[unit] = sum;
    sync_cube();
    reduce_sum(&mut partial, unit);
    let inverse = 1.0 / f32::sqrt(partial[0] / f32::cast_from(d) + eps);
    let mut c = unit;
    while c < d {
        out[base + c] = F::cast_from(f32::cast_from(x[base + c]) * inverse * f32::cast_from(gamma[c]));
        c += UNITS as usize;
    }
}

/// RMSNorm of each row of `x` `(rows, d)` with weights `gamma` `(d)`: `(rows, d)`.
pub fn rms_norm(x: Tensor<2>, gamma: Tensor<1>, eps: f64) -> Tensor<2> {
    let [rows, d] = x.dims();
    let (x, gamma) = (cube(x), cube(gamma));
    let out = empty_device_dtype(x.client.clone(), x.device.clone(), [rows, d].into(), x.dtype);
    let client = x.client.clone();
    let float = storage(x.dtype);
    // SAFETY: one workgroup per row; units read and write columns below `d` of their row only.
    unsafe {
        rms_norm_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            x.into_buffer_arg(),
            gamma.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            d,
            eps as f32,
            float,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}

#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn route_kernel<F: Float, I: Int>(
    x: &[F],
    gate: &[F],
    weights: &mut [F],
    ids: &mut [I],
    hidden: usize,
    experts: usize,
    normalise: u32,
    scale: f32,
    #[comptime] k: usize,
    #[define(F, I)] _dtypes: [ElemType; 2],
) {
    let token = CUBE_POS_X as usize;
    let unit = UNIT_POS as usize;
    // Logits: unit e owns expert e (`gate` is burn's `(hidden, experts)` Linear weight).
    let mut logits = Shared::<[f32]>::new_slice(UNITS as usize);
    if unit < experts {
        let mut sum = 0.0f32;
        for i in 0..hidden {
            sum += f32::cast_from(x[token * hidden + i]) * f32::cast_from(gate[i * experts + unit]);
        }
        logits[unit] = sum;
    }
    sync_cube();
    if unit == 0 {
        // Softmax, then the k largest probabilities in descending order (ties: the lower id,
        // as a stable descending sort gives).
        let mut max = logits[0];
        for e in 1..experts {
            max = f32::max(max, logits[e]);
        }
        let mut total = 0.0f32;
        for e in 0..experts {
            let p = f32::exp(logits[e] - max);
            logits[e] = p;
            total += p;
        }
        let mut top = Array::<f32>::new(k);
        let mut chosen = Array::<u32>::new(k);
        let mut sum_top = 0.0f32;
        #[unroll]
        for slot in 0..k {
            let mut best = u32::new(0);
            let mut best_p = f32::new(-1.0f32);
            for e in 0..experts {
                let p = logits[e] / total;
                let taken = p < 0.0f32;
                if !taken && p > best_p {
                    best_p = p;
                    best = u32::cast_from(e);
                }
            }
            // Mark it taken (probabilities are never negative).
            logits[usize::cast_from(best)] = -1.0f32;
            top[slot] = best_p;
            chosen[slot] = best;
            sum_top += best_p;
        }
        let denominator = select(normalise == 1, sum_top + 1e-20f32, 1.0f32);
        #[unroll]
        for slot in 0..k {
            weights[token * k + slot] = F::cast_from(top[slot] / denominator * scale);
            ids[token * k + slot] = I::cast_from(chosen[slot]);
        }
    }
}

/// The MoE router for `x` `(tokens, hidden)` with burn's gate weight `(hidden, experts)` (at most
/// [`UNITS`] experts): each token's `k` expert ids `(tokens, k)` (the device's int type) and
/// weights `(tokens, k)` (softmax probabilities, renormalised over the k when `normalise`, then
/// times `scale`) — `MoEGate.forward` in eval mode.
pub fn route(x: Tensor<2>, gate: Tensor<2>, k: usize, normalise: bool, scale: f64) -> (Tensor<2>, Tensor<2, burn::tensor::Int>) {
    let [tokens, hidden] = x.dims();
    let experts = gate.dims()[1];
    assert!(experts <= UNITS as usize && k <= experts, "{experts} experts, top {k}: the router kernel takes at most {UNITS}");
    let int: DType = x.device().settings().int_dtype.into();
    let (x, gate) = (cube(x), cube(gate));
    let weights = empty_device_dtype(x.client.clone(), x.device.clone(), [tokens, k].into(), x.dtype);
    let ids = empty_device_dtype(x.client.clone(), x.device.clone(), [tokens, k].into(), int);
    let client = x.client.clone();
    let (float, index) = (storage(x.dtype), storage(int));
    // SAFETY: one workgroup per token; reads within its row of `x` and the gate, writes its own k
    // slots.
    unsafe {
        route_kernel::launch_unchecked(
            &client,
            CubeCount::Static(tokens as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            x.into_buffer_arg(),
            gate.into_buffer_arg(),
            weights.clone().into_buffer_arg(),
            ids.clone().into_buffer_arg(),
            hidden,
            experts,
            u32::from(normalise),
            scale as f32,
            k,
            [float, index],
        );
    }
    (Tensor::from_primitive::<Cube>(weights), Tensor::<2, burn::tensor::Int>::from_primitive::<Cube>(ids))
}

#[cube(launch_unchecked)]
fn greedy_kernel<F: Float>(logits: &[F], out: &mut [f32], vocab: usize, #[define(F)] _dtype: ElemType) {
    let row = CUBE_POS_X as usize;
    let unit = UNIT_POS as usize;
    let base = row * vocab;
    // Per unit: the largest value (the lowest index among equals: a unit scans upwards) and the
    // first NaN (`vocab` for none).
    let mut best = f32::new(-3.4e38f32);
    let mut best_at = vocab;
    let mut nan_at = vocab;
    let mut i = unit;
    while i < vocab {
        let v = f32::cast_from(logits[base + i]);
        if f32::is_nan(v) {
            nan_at = clamp_max(nan_at, i);
        } else if v > best || (best_at == vocab && v == best) {
            best = v;
            best_at = i;
        }
        i += UNITS as usize;
    }
    let mut value = Shared::<[f32]>::new_slice(UNITS as usize);
    let mut at = Shared::<[u32]>::new_slice(UNITS as usize);
    let mut nan = Shared::<[u32]>::new_slice(UNITS as usize);
    value[unit] = best;
    at[unit] = u32::cast_from(best_at);
    nan[unit] = u32::cast_from(nan_at);
    sync_cube();
    #[unroll]
    for step in 0..UNIT_STEPS {
        let stride = comptime![(UNITS >> (step + 1)) as usize];
        if unit < stride {
            let (a, b) = (unit, unit + stride);
            // The larger value; on a tie the lower index (an unset `vocab` index loses).
            let take = value[b] > value[a] || (value[b] == value[a] && at[b] < at[a]);
            if take {
                value[a] = value[b];
                at[a] = at[b];
            }
            nan[a] = clamp_max(nan[a], nan[b]);
        }
        sync_cube();
    }
    if unit == 0 {
        out[row * 3] = f32::cast_from(at[0]);
        out[row * 3 + 1] = value[0];
        out[row * 3 + 2] = f32::cast_from(nan[0]);
    }
}

/// Per row of `logits` `(rows, vocab)` (banned tokens already at −∞): `[arg-max, maximum, first
/// NaN]` as f32 `(rows, 3)` — the arg-max the lowest index among equal maxima (`torch.argmax`),
/// the NaN index `vocab` when there is none, the arg-max `vocab` when every value is −∞ or NaN.
/// Indices below 2²⁴ are exact in f32.
pub fn greedy(logits: Tensor<2>) -> Tensor<2> {
    let [rows, vocab] = logits.dims();
    assert!(vocab < 1 << 24, "a vocabulary of {vocab}: indices are returned as f32");
    let logits = cube(logits);
    let out = empty_device_dtype(logits.client.clone(), logits.device.clone(), [rows, 3].into(), DType::F32);
    let client = logits.client.clone();
    let float = storage(logits.dtype);
    // SAFETY: one workgroup per row, reading that row; unit 0 writes the row's three values.
    unsafe {
        greedy_kernel::launch_unchecked(
            &client,
            CubeCount::Static(rows as u32, 1, 1),
            CubeDim::new_1d(UNITS),
            logits.into_buffer_arg(),
            out.clone().into_buffer_arg(),
            vocab,
            float,
        );
    }
    Tensor::from_primitive::<Cube>(out)
}
