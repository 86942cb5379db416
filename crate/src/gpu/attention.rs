//! The decoder's key/value cache on the GPU and a decoding step's attention over it.
//!
//! burn's path concatenates each layer's cache with the new position every step (a copy of the
//! whole cache, four dispatches) and runs attention as matmul, softmax and matmul (about ten more).
//! Here a layer's keys and values live in buffers with room to grow, a new position's keys and
//! values are rotated and written in place with its queries rotated beside them
//! ([`DeviceKv::append`], one dispatch), and one workgroup per head runs
//! the step's attention straight over the cache ([`DeviceKv::attend`]): scores in workgroup memory
//! a chunk at a time, an online softmax across chunks (no scores tensor, no length limit).

use burn::tensor::Tensor;
use burn_cubecl::Cube;
use burn_cubecl::ops::numeric::empty_device_dtype;
use cubecl::prelude::*;

use super::launch::{UNITS, cube, reduce_max, reduce_sum, storage};
/// Positions whose scores a workgroup holds at a time (4 KiB of workgroup memory).
const CHUNK: usize = 1024;
/// Positions a cache grows by, at least (then it doubles).
const MIN_CAPACITY: usize = 256;

/// One layer's keys (after RoPE) and values on the GPU: `(kv_heads, capacity, head_dim)` each,
/// positions `0 .. len` written.
#[derive(Debug)]
pub struct DeviceKv {
    k: Tensor<3>,
    v: Tensor<3>,
    len: usize,
}

impl Clone for DeviceKv {
    /// A copy with buffers of its own: [`DeviceKv::append`] writes in place, so two caches must
    /// never share one.
    fn clone(&self) -> Self {
        Self { k: self.k.clone().add_scalar(0.0), v: self.v.clone().add_scalar(0.0), len: self.len }
    }
}

/// One unit per value of the projections' rows `qkv` `(S, (heads + 2·kv_heads) · head_dim)`
/// (queries, keys, values side by side, as one product gives them): queries and keys rotated
/// (rotate-half RoPE, `cos`/`sin` `(S, head_dim)` a row per position), queries written to
/// `q_out` `(S, heads · head_dim)`, keys and values into the cache at positions `start ..`.
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn rope_append_kernel<F: Float>(
    qkv: &[F],
    cos: &[F],
    sin: &[F],
    q_out: &mut [F],
    k: &mut [F],
    v: &mut [F],
    total: usize,
    heads: usize,
    kv_heads: usize,
    head_dim: usize,
    capacity: usize,
    start: usize,
    #[define(F)] _dtype: ElemType,
) {
    let at = ABSOLUTE_POS;
    if at >= total {
        terminate!();
    }
    let width = (heads + 2 * kv_heads) * head_dim;
    let (r, c) = (at / width, at % width);
    let d = c % head_dim;
    let (q_width, k_end) = (heads * head_dim, (heads + kv_heads) * head_dim);
    let value = f32::cast_from(qkv[at]);
    if c >= k_end {
        // A value: copied into the cache.
        let h = (c - k_end) / head_dim;
        v[(h * capacity + start + r) * head_dim + d] = F::cast_from(value);
    } else {
        // A query or key: x · cos + rotate_half(x) · sin, rotate_half([x₁, x₂]) = [−x₂, x₁].
        let half = head_dim / 2;
        let partner = select(d < half, at + half, at - half);
        let sign = select(d < half, -1.0f32, 1.0);
        let table = r * head_dim + d;
        let y = value * f32::cast_from(cos[table]) + sign * f32::cast_from(qkv[partner]) * f32::cast_from(sin[table]);
        if c < q_width {
            q_out[r * q_width + c] = F::cast_from(y);
        } else {
            let h = (c - q_width) / head_dim;
            k[(h * capacity + start + r) * head_dim + d] = F::cast_from(y);
        }
    }
}

/// `softmax(q · Kᵀ · scale) · V` for one query token: workgroup `h` is query head `h`, reading KV
/// head `h / group` of the cache (grouped-query attention without repeating the cache).
#[cube(launch_unchecked)]
#[allow(clippy::too_many_arguments)]
fn attend_kernel<F: Float>(q: &[F], k: &[F], v: &[F], out: &mut [F], len: usize, capacity: usize, head_dim: usize, group: usize, scale: f32, #[define(F)] _dtype: ElemType) {
    let head = CUBE_POS_X as usize;
    let unit = UNIT_POS as usize;
    let q_base = head * head_dim;
    let cache_base = (head / group) * capacity * head_dim;
    let mut scores = Shared::<[f32]>::new_slice(CHUNK);
    let mut partial = Shared::<[f32]>::new_slice(UNITS as usize);
    // Running maximum and sum of the softmax, the same in every unit; unit j < head_dim keeps
    // output dimension j. A finite start (not −∞) keeps the first rescaling free of ∞ − ∞.
    let mut max = f32::new(-3.0e38f32);
    let mut sum = 0.0f32;
    let mut acc = 0.0f32;
    let mut chunk = 0usize;
    while chunk < len {
        let n = clamp_max(len - chunk, CHUNK);
        let mut local = f32::new(-3.0e38f32);
        let mut t = unit;
        while t < n {
            let key = cache_base + (chunk + t) * head_dim;
            let mut s = 0.0f32;
            for d in 0..head_dim {
                s += f32::cast_from(q[q_base + d]) * f32::cast_from(k[key + d]);
            }
            s *= scale;
            scores[t] = s;
            local = f32::max(local, s);
            t += UNITS as usize;
        }
        partial[unit] = local;
        sync_cube();
        reduce_max(&mut partial, unit);
        let new_max = f32::max(max, partial[0]);
        sync_cube();
        let mut local_sum = 0.0f32;
        let mut t = unit;
        while t < n {
            let p = f32::exp(scores[t] - new_max);
            scores[t] = p;
            local_sum += p;
            t += UNITS as usize;
        }
        partial[unit] = local_sum;
        sync_cube();
        reduce_sum(&mut partial, unit);
        let correction = f32::exp(max - new_max);
        sum = sum * correction + partial[0];
        if unit < head_dim {
            let mut a = acc * correction;
            for t in 0..n {
                a += scores[t] * f32::cast_from(v[cache_base + (chunk + t) * head_dim + unit]);
            }
            acc = a;
        }
        max = new_max;
        // The next chunk overwrites the scores and partial sums.
        sync_cube();
        chunk += CHUNK;
    }
    if unit < head_dim {
        out[q_base + unit] = F::cast_from(acc / sum);
    }
}

impl DeviceKv {
    /// An empty cache for `kv_heads` heads of `head_dim`, room for `capacity` positions, on the
    /// device and in the float type of `like`.
    fn with_capacity(kv_heads: usize, head_dim: usize, capacity: usize, like: &Tensor<2>) -> Self {
        let zeros = || Tensor::<3>::zeros([kv_heads, capacity, head_dim], (&like.device(), like.dtype()));
        Self { k: zeros(), v: zeros(), len: 0 }
    }

    /// Positions cached.
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// `cache` (a new one when `None`) with `S` more positions from the projections' rows `qkv`
    /// `(S, (heads + 2·kv_heads) · head_dim)` (queries, keys, values side by side): queries and
    /// keys rotated by RoPE (`cos`/`sin` `(S, head_dim)`, a row per position), keys and values
    /// written into the cache in place — one dispatch. Returns the cache and the rotated queries
    /// `(S, heads · head_dim)`. A full cache grows by doubling (a copy of what it holds).
    #[allow(clippy::too_many_arguments)]
    pub fn append(cache: Option<Self>, qkv: Tensor<2>, cos: Tensor<2>, sin: Tensor<2>, heads: usize, kv_heads: usize, head_dim: usize) -> (Self, Tensor<2>) {
        let [s, width] = qkv.dims();
        assert_eq!(width, (heads + 2 * kv_heads) * head_dim, "queries, keys and values side by side");
        let mut kv = cache.unwrap_or_else(|| Self::with_capacity(kv_heads, head_dim, (s + 1).max(MIN_CAPACITY), &qkv));
        let capacity = kv.k.dims()[1];
        if kv.len + s > capacity {
            let mut grown = Self::with_capacity(kv_heads, head_dim, (2 * capacity).max(kv.len + s), &qkv);
            let held = [0..kv_heads, 0..kv.len, 0..head_dim];
            grown.k = grown.k.slice_assign(held.clone(), kv.k.slice(held.clone()));
            grown.v = grown.v.slice_assign(held.clone(), kv.v.slice(held));
            grown.len = kv.len;
            kv = grown;
        }
        let capacity = kv.k.dims()[1];
        let (qkv, cos, sin) = (cube(qkv), cube(cos), cube(sin));
        let q = empty_device_dtype(qkv.client.clone(), qkv.device.clone(), [s, heads * head_dim].into(), qkv.dtype);
        let (k_cache, v_cache) = (cube(kv.k.clone()), cube(kv.v.clone()));
        let client = qkv.client.clone();
        let float = storage(qkv.dtype);
        let total = s * width;
        // SAFETY: units past `total` stop; a unit reads its value, its RoPE partner within the same
        // head and its row's table entry; writes land in its query or at positions `len .. len + S`
        // of the cache, within its capacity (grown above); the cache's buffers are this cache's own.
        unsafe {
            rope_append_kernel::launch_unchecked(
                &client,
                CubeCount::Static(total.div_ceil(UNITS as usize).max(1) as u32, 1, 1),
                CubeDim::new_1d(UNITS),
                qkv.into_buffer_arg(),
                cos.into_buffer_arg(),
                sin.into_buffer_arg(),
                q.clone().into_buffer_arg(),
                k_cache.into_buffer_arg(),
                v_cache.into_buffer_arg(),
                total,
                heads,
                kv_heads,
                head_dim,
                capacity,
                kv.len,
                float,
            );
        }
        kv.len += s;
        (kv, Tensor::from_primitive::<Cube>(q))
    }

    /// Keys and values of positions `0 .. len` as `(1, kv_heads, len, head_dim)` (for a prefill chunk).
    pub fn prefix(&self) -> (Tensor<4>, Tensor<4>) {
        let [kv_heads, _, head_dim] = self.k.dims();
        let part = |t: &Tensor<3>| t.clone().slice([0..kv_heads, 0..self.len, 0..head_dim]).reshape([1, kv_heads, self.len, head_dim]);
        (part(&self.k), part(&self.v))
    }

    /// One query token's attention over the cache: `q` `(1, heads · head_dim)` after RoPE, scaled by
    /// `1/√head_dim`: `(1, heads · head_dim)`.
    pub fn attend(&self, q: Tensor<2>, heads: usize) -> Tensor<2> {
        let [kv_heads, capacity, head_dim] = self.k.dims();
        assert!(head_dim <= UNITS as usize, "head_dim {head_dim}: the attention kernel keeps one output dimension per unit");
        let q = cube(q);
        let out = empty_device_dtype(q.client.clone(), q.device.clone(), [1, heads * head_dim].into(), q.dtype);
        let client = q.client.clone();
        let float = storage(q.dtype);
        let (k, v) = (cube(self.k.clone()), cube(self.v.clone()));
        // SAFETY: one workgroup per query head; it reads its KV head's positions below `len`.
        unsafe {
            attend_kernel::launch_unchecked(
                &client,
                CubeCount::Static(heads as u32, 1, 1),
                CubeDim::new_1d(UNITS),
                q.into_buffer_arg(),
                k.into_buffer_arg(),
                v.into_buffer_arg(),
                out.clone().into_buffer_arg(),
                self.len,
                capacity,
                head_dim,
                heads / kv_heads,
                1.0 / (head_dim as f32).sqrt(),
                float,
            );
        }
        Tensor::from_primitive::<Cube>(out)
    }
}
