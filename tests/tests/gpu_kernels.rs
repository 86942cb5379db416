//! The crate's GPU kernels for packed int4/int8 weights (`dsocr::gpu`) on the native wgpu device
//! (lavapipe in CI), against the same products computed on the host from the dequantized
//! weights: few rows (1, 3, 8) and many rows (9, 20), fused gate/up, experts picked on the device
//! by index, embedding rows, every group size, both widths, ragged last groups (odd widths), and
//! shards under a lowered binding limit. Without a GPU adapter (and without
//! `DSOCR_REQUIRE_WGPU`) each test says so and passes.
#![cfg(feature = "wgpu")]

use burn::tensor::{Device, Int, Tensor, TensorData};
use dsocr::gpu::DevicePacked;
use dsocr::quant::{Bits, GROUP_SIZES, PackedMatrix, QuantSpec, ScaleDtype};
use dsocr_tests::wgpu_device;

/// Deterministic values in [-1, 1) with an outlier now and then (what sets a group's scale).
fn values(n: usize, seed: u64) -> Vec<f32> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15).wrapping_add(1);
    (0..n)
        .map(|i| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let v = (x >> 40) as f32 / (1u64 << 24) as f32 * 2.0 - 1.0;
            if i % 89 == 0 { v * 8.0 } else { v }
        })
        .collect()
}

fn quantized(rows: usize, cols: usize, bits: Bits, group: usize, seed: u64) -> PackedMatrix {
    let spec = QuantSpec::new(bits, group, ScaleDtype::F16).unwrap();
    PackedMatrix::quantize(&values(rows * cols, seed), rows, cols, spec)
}

/// `x (m, k) · Wᵀ` on the host in f64 from the dequantized weight: `(m, rows)`.
fn reference(x: &[f32], m: usize, w: &PackedMatrix) -> Vec<f32> {
    let dense = w.dequantize();
    let k = w.cols;
    let mut y = vec![0f32; m * w.rows];
    for i in 0..m {
        for r in 0..w.rows {
            y[i * w.rows + r] = (0..k).map(|c| x[i * k + c] as f64 * dense[r * k + c] as f64).sum::<f64>() as f32;
        }
    }
    y
}

fn silu(v: f32) -> f32 {
    v / (1.0 + (-v).exp())
}

fn tensor(values: &[f32], shape: [usize; 2], device: &Device) -> Tensor<2> {
    Tensor::from_data(TensorData::new(values.to_vec(), shape), device)
}

fn read(t: Tensor<2>) -> Vec<f32> {
    t.into_data().convert::<f32>().try_to_vec::<f32>().unwrap()
}

/// Largest difference, relative to the largest reference value (sums run in another order).
fn assert_close(label: &str, got: &[f32], want: &[f32]) {
    assert_eq!(got.len(), want.len(), "{label}: length");
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    let (at, err) = got.iter().zip(want).map(|(a, b)| (a - b).abs()).enumerate().fold((0, 0f32), |best, (i, e)| if e > best.1 || e.is_nan() { (i, e) } else { best });
    assert!(err <= 2e-5 * scale, "{label}: max error {err} at {at} (got {}, want {}; max |ref| {scale})", got[at], want[at]);
}

/// Shapes: a single row and column, odd widths (ragged last groups), more rows than one workgroup.
const SHAPES: [(usize, usize); 5] = [(1, 7), (37, 101), (17, 256), (300, 200), (8, 1000)];

#[test]
fn gpu_linear_equals_the_dequantized_product() {
    let Some((device, _)) = wgpu_device(false) else { return };
    for bits in [Bits::Q4, Bits::Q8] {
        for group in GROUP_SIZES {
            for (s, &(rows, cols)) in SHAPES.iter().enumerate() {
                let w = quantized(rows, cols, bits, group, s as u64);
                // Whole, and in shards of 5 rows (a lowered binding limit).
                let row_bytes = w.groups() * w.group_bytes();
                for (shards, limit) in [("one shard", usize::MAX), ("5-row shards", 5 * row_bytes)] {
                    let d = DevicePacked::upload(&w, &device, limit);
                    for m in [1, 3, 8, 9, 20] {
                        let x = values(m * cols, 100 + m as u64);
                        let want = reference(&x, m, &w);
                        let got = read(d.linear(tensor(&x, [m, cols], &device)));
                        assert_close(&format!("{bits:?} g{group} {rows}×{cols} m={m} {shards}"), &got, &want);
                        // With a residual added in the same pass.
                        let residual = values(m * rows, 7 * m as u64);
                        let got = read(d.linear_add(tensor(&x, [m, cols], &device), Some(tensor(&residual, [m, rows], &device))));
                        let want: Vec<f32> = want.iter().zip(&residual).map(|(a, b)| a + b).collect();
                        assert_close(&format!("{bits:?} g{group} {rows}×{cols} m={m} {shards} + residual"), &got, &want);
                    }
                }
            }
        }
    }
}

/// A float checkpoint's weights as f16 or f32 words through the same kernels: products (few rows,
/// many rows, residual), rows and a gathered expert equal the float products of the same values
/// (f16: rounded to f16 first), shards included.
#[test]
fn gpu_float_words_equal_the_float_product() {
    let Some((device, _)) = wgpu_device(false) else { return };
    for half in [false, true] {
        for &(rows, cols) in &[(1usize, 7usize), (37, 101), (300, 200)] {
            let mut w = values(rows * cols, 3 + rows as u64);
            if half {
                w.iter_mut().for_each(|v| *v = half::f16::from_f32(*v).to_f32());
            }
            // The reference: the float product of the same values.
            let w = &w;
            let dense = |x: &[f32], m: usize| -> Vec<f32> {
                let mut y = Vec::with_capacity(m * rows);
                for i in 0..m {
                    y.extend((0..rows).map(|r| (0..cols).map(|c| x[i * cols + c] as f64 * w[r * cols + c] as f64).sum::<f64>() as f32));
                }
                y
            };
            for (shards, limit) in [("one shard", usize::MAX), ("3-row shards", 3 * 4 * cols)] {
                let d = DevicePacked::upload_float(&w, rows, cols, half, &device, limit, None);
                for m in [1, 4, 12] {
                    let x = values(m * cols, 50 + m as u64);
                    let got = read(d.linear(tensor(&x, [m, cols], &device)));
                    assert_close(&format!("{} {rows}×{cols} m={m} {shards}", if half { "f16" } else { "f32" }), &got, &dense(&x, m));
                }
                let ids: Vec<i64> = vec![0, (rows - 1) as i64, (rows / 2) as i64];
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [3]), &device);
                let want: Vec<f32> = ids.iter().flat_map(|&i| w[i as usize * cols..(i as usize + 1) * cols].to_vec()).collect();
                assert_eq!(read(d.rows_of(index)), want, "rows of {rows}×{cols} {shards}");
            }
        }
    }
}

#[test]
fn gpu_gate_up_fused_equals_silu_times_up() {
    let Some((device, _)) = wgpu_device(false) else { return };
    for bits in [Bits::Q4, Bits::Q8] {
        for (rows, cols) in [(37, 101), (64, 128), (5, 300)] {
            let (g, u) = (quantized(rows, cols, bits, 64, 1), quantized(rows, cols, bits, 64, 2));
            let limit = 3 * g.groups() * g.group_bytes();
            for (shards, limit) in [("one shard", usize::MAX), ("3-row shards", limit)] {
                let (dg, du) = (DevicePacked::upload(&g, &device, limit), DevicePacked::upload(&u, &device, limit));
                for m in [1, 4, 5, 12] {
                    let x = values(m * cols, 7 + m as u64);
                    let got = read(DevicePacked::glu(&dg, &du, tensor(&x, [m, cols], &device)));
                    let want: Vec<f32> = reference(&x, m, &g).into_iter().zip(reference(&x, m, &u)).map(|(a, b)| silu(a) * b).collect();
                    assert_close(&format!("{bits:?} {rows}×{cols} m={m} {shards}"), &got, &want);
                }
            }
        }
    }
}

/// A stack of 5 experts of 24 rows: each (token, slot) pair's expert chosen by an index tensor on
/// the device, within one shard and across shards of 2 experts (pairs of other shards get zeros
/// from each and are summed).
#[test]
fn gpu_gathered_experts_equal_each_experts_product() {
    let Some((device, _)) = wgpu_device(false) else { return };
    let (experts, per_expert, cols, k) = (5, 24, 72, 3);
    for bits in [Bits::Q4, Bits::Q8] {
        let gate = quantized(experts * per_expert, cols, bits, 32, 3);
        let up = quantized(experts * per_expert, cols, bits, 32, 4);
        let expert_rows = |w: &PackedMatrix, e: usize| w.slice_rows(e * per_expert..(e + 1) * per_expert);
        for per_shard in [experts, 2] {
            let upload = |w: &PackedMatrix| DevicePacked::upload_in_shards(w, &device, per_shard * per_expert);
            let (dg, du) = (upload(&gate), upload(&up));
            for tokens in [1, 2] {
                let x = values(tokens * cols, 11 + tokens as u64);
                let ids: Vec<i64> = (0..tokens * k).map(|p| ((p * 3 + tokens) % experts) as i64).collect();
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [ids.len()]), &device);
                let plain = read(dg.gathered(None, tensor(&x, [tokens, cols], &device), index.clone(), k, per_expert));
                let fused = read(dg.gathered(Some(&du), tensor(&x, [tokens, cols], &device), index, k, per_expert));
                let (mut want_plain, mut want_fused) = (Vec::new(), Vec::new());
                for (p, &e) in ids.iter().enumerate() {
                    let row = &x[(p / k) * cols..(p / k + 1) * cols];
                    let g = reference(row, 1, &expert_rows(&gate, e as usize));
                    let u = reference(row, 1, &expert_rows(&up, e as usize));
                    want_fused.extend(g.iter().zip(&u).map(|(a, b)| silu(*a) * b));
                    want_plain.extend(g);
                }
                let label = format!("{bits:?} {tokens} tokens, {per_shard} experts per shard");
                assert_close(&format!("{label}, gate"), &plain, &want_plain);
                assert_close(&format!("{label}, gate/up"), &fused, &want_fused);
                // Summed per token with routing weights, plus a residual: Σ_j w[t, j] · x_p · W_eᵀ
                // over the token's k pairs (each pair's own input row).
                let pair_inputs = values(tokens * k * cols, 13);
                let weights = values(tokens * k, 17);
                let residual = values(tokens * per_expert, 19);
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [ids.len()]), &device);
                let got = read(dg.gathered_sum(
                    tensor(&pair_inputs, [tokens * k, cols], &device),
                    index,
                    tensor(&weights, [tokens, k], &device),
                    per_expert,
                    Some(tensor(&residual, [tokens, per_expert], &device)),
                ));
                let mut want = residual.clone();
                for (p, &e) in ids.iter().enumerate() {
                    let y = reference(&pair_inputs[p * cols..(p + 1) * cols], 1, &expert_rows(&gate, e as usize));
                    for (r, v) in y.iter().enumerate() {
                        want[(p / k) * per_expert + r] += weights[p] * v;
                    }
                }
                assert_close(&format!("{label}, weighted sum per token + residual"), &got, &want);
                // One expert on all rows, few (the gathered kernel) and many (dequantized + matmul).
                for m in [2, 11] {
                    let x = values(m * cols, 5 + m as u64);
                    let got = read(dg.expert(Some(&du), tensor(&x, [m, cols], &device), 3, per_expert));
                    let g = reference(&x, m, &expert_rows(&gate, 3));
                    let u = reference(&x, m, &expert_rows(&up, 3));
                    let want: Vec<f32> = g.iter().zip(&u).map(|(a, b)| silu(*a) * b).collect();
                    assert_close(&format!("{label}, expert 3 on {m} rows"), &got, &want);
                }
            }
        }
    }
}

/// Embedding rows: exactly the dequantized rows, in the ids' order, repeats and shards included.
#[test]
fn gpu_rows_are_the_dequantized_rows() {
    let Some((device, _)) = wgpu_device(false) else { return };
    for bits in [Bits::Q4, Bits::Q8] {
        for group in GROUP_SIZES {
            let table = quantized(50, 75, bits, group, 9);
            let dense = table.dequantize();
            for limit in [usize::MAX, 7 * table.groups() * table.group_bytes()] {
                let d = DevicePacked::upload(&table, &device, limit);
                let ids: Vec<i64> = vec![0, 49, 3, 3, 17, 48, 21];
                let index = Tensor::<1, Int>::from_data(TensorData::new(ids.clone(), [ids.len()]), &device);
                let got = read(d.rows_of(index));
                let want: Vec<f32> = ids.iter().flat_map(|&i| dense[i as usize * 75..(i as usize + 1) * 75].to_vec()).collect();
                assert_eq!(got, want, "{bits:?} g{group} limit {limit}");
            }
        }
    }
}

/// The KV cache written in place and a step's attention over it equal burn's attention over the
/// concatenated keys and values: positions appended in a prefill chunk and then one at a time
/// (the cache grows past its first 256 positions), scores past one 1024-position chunk of
/// workgroup memory, grouped KV heads. The append rotates queries and keys (RoPE) on the way:
/// the queries it returns and the keys it stores equal a host rotation.
#[test]
fn gpu_cache_attention_equals_burn_attention() {
    use burn::tensor::module::attention;
    use burn::tensor::ops::AttentionModuleOptions;
    use dsocr::gpu::DeviceKv;
    let Some((device, _)) = wgpu_device(false) else { return };
    let (heads, kv_heads, hd) = (6, 3, 20);
    let (q_width, kv_width) = (heads * hd, kv_heads * hd);
    let width = q_width + 2 * kv_width;
    // x · cos + rotate_half(x) · sin per head, with a row's table.
    let rotate = |x: &[f32], cos: &[f32], sin: &[f32]| -> Vec<f32> {
        x.chunks(hd)
            .flat_map(|head| (0..hd).map(move |d| if d < hd / 2 { head[d] * cos[d] - head[d + hd / 2] * sin[d] } else { head[d] * cos[d] + head[d - hd / 2] * sin[d] }))
            .collect()
    };
    let mut cache: Option<DeviceKv> = None;
    let (mut keys, mut vals) = (Vec::new(), Vec::new());
    let mut appended = 0;
    for (step, chunk) in [200usize, 1, 1, 60, 1, 900, 1].into_iter().enumerate() {
        let qkv = values(chunk * width, 40 + step as u64);
        let angles = values(chunk * hd, 60 + step as u64);
        let (cos, sin): (Vec<f32>, Vec<f32>) = angles.iter().map(|a| (a.cos(), a.sin())).unzip();
        let (kv, q) = DeviceKv::append(cache.take(), tensor(&qkv, [chunk, width], &device), tensor(&cos, [chunk, hd], &device), tensor(&sin, [chunk, hd], &device), heads, kv_heads, hd);
        let mut want_q = Vec::new();
        for r in 0..chunk {
            let (row, c, s) = (&qkv[r * width..(r + 1) * width], &cos[r * hd..(r + 1) * hd], &sin[r * hd..(r + 1) * hd]);
            want_q.extend(rotate(&row[..q_width], c, s));
            keys.extend(rotate(&row[q_width..q_width + kv_width], c, s));
            vals.extend_from_slice(&row[q_width + kv_width..]);
        }
        assert_close(&format!("step {step}: rotated queries"), &read(q), &want_q);
        appended += chunk;
        assert_eq!(kv.len(), appended);
        let t = appended;
        // The cache's keys, (1, kv_heads, T, hd), against the rotated keys as rows (T, kv_heads · hd).
        let (cached_keys, _) = kv.prefix();
        let rows = |v: &[f32]| Tensor::<2>::from_data(TensorData::new(v.to_vec(), [t, kv_width]), &device).reshape([1, t, kv_heads, hd]).swap_dims(1, 2);
        assert_close(&format!("step {step}: cached keys"), &read(cached_keys.reshape([kv_heads * t, hd])), &read(rows(&keys).reshape([kv_heads * t, hd])));
        let query = values(q_width, 120 + step as u64);
        let got = read(kv.attend(tensor(&query, [1, q_width], &device), heads));
        // burn: (1, heads, 1, hd) over (1, heads, T, hd), each KV head repeated for its query heads.
        let repeat = |v: &[f32]| rows(v).reshape([1, kv_heads, 1, t, hd]).expand([1, kv_heads, heads / kv_heads, t, hd]).reshape([1, heads, t, hd]);
        let q = Tensor::<2>::from_data(TensorData::new(query, [1, q_width]), &device).reshape([1, 1, heads, hd]).swap_dims(1, 2);
        let options = AttentionModuleOptions { scale: None, softcap: None, is_causal: false };
        let want = read(attention(q, repeat(&keys), repeat(&vals), None, None, options).reshape([1, q_width]));
        assert_close(&format!("{t} positions"), &got, &want);
        cache = Some(kv);
    }
}
