//! DeepSeek-V2 mixture of experts: softmax gate, greedy top-k, routed experts run only on the tokens
//! routed to them, plus the shared experts (reference: `DeepseekV2MoE` / `MoEGate` in eval mode; spec §6.5).

use burn::module::{Module, Param};
use burn::nn::Linear;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};

use super::readback::read_i64;
use crate::config::DecoderConfig;
use crate::error::{Error, Result};
use super::ops;
use crate::gpu::DevicePacked;
use crate::quant::{PackedMatrix, QLinear};
use crate::weights::Loader;

/// `down(silu(gate(x)) ⊙ up(x))`, no biases (`DeepseekV2MLP`).
#[derive(Module, Debug)]
pub struct Mlp {
    gate_proj: QLinear,
    up_proj: QLinear,
    down_proj: QLinear,
    /// See [`Loader::with_threads`].
    threads: usize,
}

impl Mlp {
    pub async fn load(l: &Loader<'_, '_>, prefix: &str, hidden: usize, width: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: l.qlinear(&format!("{prefix}.gate_proj"), hidden, width, false).await?,
            up_proj: l.qlinear(&format!("{prefix}.up_proj"), hidden, width, false).await?,
            down_proj: l.qlinear(&format!("{prefix}.down_proj"), width, hidden, false).await?,
            threads: l.threads(),
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        self.forward_threads(x, self.threads)
    }

    /// `addend + mlp(x)` for rows `x` (a residual): on the GPU kernels' path added in the down
    /// projection's pass.
    pub fn forward_add(&self, x: Tensor<2>, addend: Tensor<2>) -> Tensor<2> {
        match (self.gate_proj.device_weight(), self.up_proj.device_weight(), self.down_proj.device_weight()) {
            (Some(g), Some(u), Some(d)) => d.linear_add(DevicePacked::glu(g, u, x), Some(addend)),
            _ => addend + self.forward(x),
        }
    }

    fn forward_threads<const D: usize>(&self, x: Tensor<D>, t: usize) -> Tensor<D> {
        if let (Some(g), Some(u), Some(d)) = (self.gate_proj.packed_weight(), self.up_proj.packed_weight(), self.down_proj.packed_weight()) {
            // All three packed (the CPU): one host pass, only the input and output are tensors.
            return ops::as_rows(x, |x| {
                let [m, k] = x.dims();
                let device = x.device();
                let values = ops::host_values(x);
                debug_assert_eq!(k, g.cols);
                Tensor::from_data(TensorData::new(PackedMatrix::mlp(g, u, d, &values, m, t), [m, d.rows]), &device)
            });
        }
        if let (Some(g), Some(u), Some(d)) = (self.gate_proj.device_weight(), self.up_proj.device_weight(), self.down_proj.device_weight()) {
            // All three packed on the GPU: gate and up in one pass, SiLU·mul fused.
            return ops::as_rows(x, |x| d.linear(DevicePacked::glu(g, u, x)));
        }
        let hidden = silu(self.gate_proj.forward_threads(x.clone(), t)) * self.up_proj.forward_threads(x, t);
        self.down_proj.forward_threads(hidden, t)
    }
}

#[derive(Module, Debug)]
pub struct Moe {
    /// Router `(hidden → experts)`, no bias.
    gate: Linear,
    /// The routed experts, one MLP each (CPU) …
    experts: Vec<Mlp>,
    /// … or stacked, for decoding without a host readback (GPU).
    stacked: Option<ExpertStack>,
    shared_experts: Option<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
    /// See [`Loader::with_threads`]; above 1 the experts of a step run side by side.
    threads: usize,
    /// The router as the GPU's one-dispatch kernel ([`crate::gpu::route`]).
    fused: bool,
}

/// The routed experts' weights stacked along a leading expert axis, in shards of whole experts that
/// each fit the device's binding limit: `gate`/`up` `(E_s, hidden, width)`, `down` `(E_s, width, hidden)`;
/// quantized, packed on the GPU instead (`packed`, and the float shards are empty).
#[derive(Module, Debug)]
struct ExpertStack {
    gate: Vec<Param<Tensor<3>>>,
    up: Vec<Param<Tensor<3>>>,
    down: Vec<Param<Tensor<3>>>,
    per_shard: usize,
    #[module(skip)]
    packed: Option<PackedStack>,
}

/// The experts' matrices stacked by rows, packed on the GPU: `gate`/`up` `(E · width, hidden)`,
/// `down` `(E · hidden, width)`, in shards of whole experts.
#[derive(Debug, Clone)]
struct PackedStack {
    gate: DevicePacked,
    up: DevicePacked,
    down: DevicePacked,
    count: usize,
    hidden: usize,
    width: usize,
}

/// Decode steps route at most this many (token, slot) pairs; above it (prefill) the experts run
/// grouped, which needs the routing on the host but reads each expert's weights once.
const GATHER_MAX_PAIRS: usize = 32;

/// With the experts packed on the GPU, chunks of up to this many pairs run gathered too: each pair
/// reads its expert's packed rows (weight traffic grows with the pairs, from cache for repeats),
/// but the layer needs no readback and three launches instead of a few per expert used. 1,024
/// covers the prompts of Tiny and Small (the browser's modes: 83 and 110 tokens, 6 experts each);
/// Base and Gundam prompts (≥ 273 tokens) stay grouped, where reading each expert once wins.
const GATHER_MAX_PAIRS_PACKED: usize = 1024;

impl Moe {
    pub async fn load(c: &DecoderConfig, l: &Loader<'_, '_>, prefix: &str) -> Result<Self> {
        let h = c.hidden_size;
        let (mut experts, mut stacked) = (Vec::new(), None);
        if l.stacked_experts() {
            stacked = Some(ExpertStack::load(l, prefix, c.n_routed_experts, h, c.moe_intermediate_size).await?);
        } else {
            for e in 0..c.n_routed_experts {
                experts.push(Mlp::load(l, &format!("{prefix}.experts.{e}"), h, c.moe_intermediate_size).await?);
            }
        }
        let shared_experts = if c.n_shared_experts > 0 {
            Some(Mlp::load(l, &format!("{prefix}.shared_experts"), h, c.shared_intermediate_size()).await?)
        } else {
            None
        };
        Ok(Self {
            gate: l.linear(&format!("{prefix}.gate"), h, c.n_routed_experts, false).await?,
            experts,
            stacked,
            shared_experts,
            top_k: c.num_experts_per_tok,
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor,
            threads: l.threads(),
            fused: l.device_kernels(),
        })
    }

    /// `residual + moe(x)` (see [`Moe::forward`]). With the experts packed on the GPU and few
    /// tokens (a decoding step; a Tiny or Small prompt, [`GATHER_MAX_PAIRS_PACKED`]), everything
    /// after the router is three launches and no readback: the experts' gate/up pair by index,
    /// their down projection summed per token with the routing weights, and the shared experts,
    /// the residual added inside the last two.
    pub async fn forward_add(&self, x: Tensor<2>, residual: Tensor<2>) -> Result<Tensor<2>> {
        let [tokens, _] = x.dims();
        let k = self.top_k;
        let packed = self.stacked.as_ref().and_then(|s| s.packed.as_ref());
        let Some(stack) = packed.filter(|_| self.fused && tokens * k <= GATHER_MAX_PAIRS_PACKED) else {
            return Ok(residual + self.forward(x).await?);
        };
        let (weights, experts) = crate::gpu::route(x.clone(), self.gate.weight.val(), k, k > 1 && self.norm_topk_prob, self.routed_scaling_factor);
        let experts = experts.reshape([tokens * k]);
        // Pair r reads token r / k.
        let hidden = stack.gate.gathered(Some(&stack.up), x.clone(), experts.clone(), k, stack.width);
        let base = match &self.shared_experts {
            Some(shared) => shared.forward_add(x, residual),
            None => residual,
        };
        Ok(stack.down.gathered_sum(hidden, experts, weights, stack.hidden, Some(base)))
    }

    /// `x`: `(T, hidden)` normalised hidden states of T tokens.
    ///
    /// Few tokens (decoding) with stacked experts: each token's k experts' weights are gathered on
    /// the device by the router's indices and applied as one batched matmul — no host round trip.
    /// Otherwise the routing decision is read back (asynchronously: this runs in the browser too)
    /// to group the tokens per expert; each selected expert runs once on its tokens only.
    /// Either way every token's k outputs are summed with their weights in slot order.
    pub async fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let [tokens, d] = x.dims();
        let k = self.top_k;
        let (weights, experts) = if self.fused {
            crate::gpu::route(x.clone(), self.gate.weight.val(), k, k > 1 && self.norm_topk_prob, self.routed_scaling_factor)
        } else {
            let (top, experts) = softmax(ops::linear(&self.gate, x.clone()), 1).topk_with_indices(k, 1);
            (routing_weights(top, k, self.norm_topk_prob, self.routed_scaling_factor), experts)
        };
        let (gathered, shared) = match &self.stacked {
            Some(stack) if tokens * k <= GATHER_MAX_PAIRS => {
                (stack.forward_gathered(x.clone(), experts, k), self.shared_experts.as_ref().map(|s| s.forward(x)))
            }
            _ => self.forward_grouped(x, experts).await?,
        };
        let w = weights.reshape([tokens, k, 1]);
        let out = (gathered.reshape([tokens, k, d]) * w).sum_dim(1).reshape([tokens, d]);
        Ok(match shared {
            Some(shared) => out + shared,
            None => out,
        })
    }

    /// Every (token, slot) pair's expert output `(T·k, hidden)`, experts run on their tokens only,
    /// and the shared experts' output `(T, hidden)`.
    async fn forward_grouped(&self, x: Tensor<2>, experts: Tensor<2, Int>) -> Result<(Tensor<2>, Option<Tensor<2>>)> {
        let [tokens, _] = x.dims();
        let k = self.top_k;
        // Only the expert choice comes back to the host; the weights stay on the device.
        let experts = read_i64(experts).await?;
        let count = self.stacked.as_ref().map_or(self.experts.len(), ExpertStack::count);

        // Group the (token, slot) pairs by expert, in token order; remember where each pair's output lands.
        let mut routed: Vec<Vec<usize>> = vec![Vec::new(); count];
        for (pair, &e) in experts.iter().enumerate() {
            routed
                .get_mut(e as usize)
                .ok_or_else(|| Error::Backend(format!("router chose expert {e}")))?
                .push(pair);
        }
        let device = x.device();
        // The shared experts (all tokens) first: the largest job.
        let mut jobs = Vec::new();
        if self.shared_experts.is_some() {
            jobs.push((None, x.clone()));
        }
        let mut row_of_pair = vec![0i64; tokens * k];
        let mut next_row = 0;
        for (expert, pairs) in routed.iter().enumerate() {
            if pairs.is_empty() {
                continue;
            }
            let rows: Vec<i64> = pairs.iter().map(|&pair| (pair / k) as i64).collect();
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [pairs.len()]), &device);
            jobs.push((Some(expert), x.clone().select(0, index)));
            for &pair in pairs {
                row_of_pair[pair] = next_row;
                next_row += 1;
            }
        }
        let mut outputs = self.run_experts(jobs);
        let shared = self.shared_experts.as_ref().map(|_| outputs.remove(0));
        // Gather each pair's output back (no scatter: no float atomics on WebGPU).
        let all = Tensor::cat(outputs, 0);
        let pairs = all.select(0, Tensor::<1, Int>::from_data(TensorData::new(row_of_pair, [tokens * k]), &device));
        Ok((pairs, shared))
    }

    /// Each `(routed expert or None for the shared experts, its tokens)` through that expert, outputs
    /// in job order. On the CPU (`threads > 1`) the experts run side by side, one per thread:
    /// each reads its own weights (reading them is the cost of a few tokens), with one
    /// synchronisation per layer instead of one per product.
    fn run_experts(&self, jobs: Vec<(Option<usize>, Tensor<2>)>) -> Vec<Tensor<2>> {
        let one = |(expert, input): (Option<usize>, Tensor<2>), threads: usize| match (expert, &self.stacked) {
            (None, _) => self.shared_experts.as_ref().expect("a shared-experts job only with shared experts").forward_threads(input, threads),
            (Some(e), Some(stack)) => stack.forward_one(e, input),
            (Some(e), None) => self.experts[e].forward_threads(input, threads),
        };
        if self.threads > 1 && jobs.len() > 1 {
            ops::map_par(jobs, |job| one(job, 1))
        } else {
            jobs.into_iter().map(|job| one(job, self.threads)).collect()
        }
    }
}

impl ExpertStack {
    async fn load(l: &Loader<'_, '_>, prefix: &str, count: usize, hidden: usize, width: usize) -> Result<Self> {
        if l.device_kernels() {
            return Self::load_packed(l, prefix, count, hidden, width).await;
        }
        let per_shard = (l.max_tensor_bytes() / (hidden * width * std::mem::size_of::<f32>())).clamp(1, count);
        let (mut gate, mut up, mut down) = (Vec::new(), Vec::new(), Vec::new());
        for first in (0..count).step_by(per_shard) {
            let n = per_shard.min(count - first);
            let names = |proj: &str| (first..first + n).map(|e| format!("{prefix}.experts.{e}.{proj}.weight")).collect::<Vec<_>>();
            let upload = |data: TensorData| Param::from_tensor(Tensor::from_data(data, l.device()));
            gate.push(upload(l.stacked_transposed(&names("gate_proj"), [width, hidden]).await?));
            up.push(upload(l.stacked_transposed(&names("up_proj"), [width, hidden]).await?));
            down.push(upload(l.stacked_transposed(&names("down_proj"), [hidden, width]).await?));
        }
        Ok(Self { gate, up, down, per_shard, packed: None })
    }

    /// The experts as rows of words on the GPU (packed, or a float checkpoint's values), each
    /// projection stacked by rows and uploaded in shards of whole experts within the binding limit.
    async fn load_packed(l: &Loader<'_, '_>, prefix: &str, count: usize, hidden: usize, width: usize) -> Result<Self> {
        let names = |proj: &str| (0..count).map(|e| format!("{prefix}.experts.{e}.{proj}.weight")).collect::<Vec<_>>();
        let packed = PackedStack {
            gate: l.device_stack(&names("gate_proj"), [width, hidden]).await?,
            up: l.device_stack(&names("up_proj"), [width, hidden]).await?,
            down: l.device_stack(&names("down_proj"), [hidden, width]).await?,
            count,
            hidden,
            width,
        };
        Ok(Self { gate: Vec::new(), up: Vec::new(), down: Vec::new(), per_shard: count, packed: Some(packed) })
    }

    fn count(&self) -> usize {
        match &self.packed {
            Some(p) => p.count,
            None => self.gate.iter().map(|g| g.dims()[0]).sum(),
        }
    }

    /// Expert `e` on its tokens `(n, hidden)`.
    fn forward_one(&self, e: usize, x: Tensor<2>) -> Tensor<2> {
        if let Some(p) = &self.packed {
            return p.down.expert(None, p.gate.expert(Some(&p.up), x, e, p.width), e, p.hidden);
        }
        let (shard, i) = (e / self.per_shard, e % self.per_shard);
        let take = |w: &Param<Tensor<3>>, rows: usize, cols: usize| w.val().slice([i..i + 1]).reshape([rows, cols]);
        let [_, h, w] = self.gate[shard].dims();
        let g = x.clone().matmul(take(&self.gate[shard], h, w));
        let u = x.matmul(take(&self.up[shard], h, w));
        (silu(g) * u).matmul(take(&self.down[shard], w, h))
    }

    /// Each (token, slot) pair through its expert, chosen on the device: `(T·k, hidden)` in pair order.
    fn forward_gathered(&self, x: Tensor<2>, experts: Tensor<2, Int>, k: usize) -> Tensor<2> {
        let [tokens, d] = x.dims();
        let pairs = tokens * k;
        if let Some(p) = &self.packed {
            // Pair r reads token r / k; the router's choice stays on the device.
            let experts = experts.reshape([pairs]);
            let hidden = p.gate.gathered(Some(&p.up), x, experts.clone(), k, p.width);
            return p.down.gathered(None, hidden, experts, 1, p.hidden);
        }
        // Row r of `x_pairs` is token r / k.
        let x_pairs = x.reshape([tokens, 1, d]).expand([tokens, k, d]).reshape([pairs, 1, d]);
        let experts = experts.reshape([pairs]);
        let mut total: Option<Tensor<3>> = None;
        for shard in 0..self.gate.len() {
            let first = (shard * self.per_shard) as i64;
            let n = self.gate[shard].dims()[0] as i64;
            // Pairs whose expert lives in another shard use row 0 here and are masked out below.
            let local = experts.clone().sub_scalar(first).clamp(0, n - 1);
            let g = x_pairs.clone().matmul(self.gate[shard].val().select(0, local.clone()));
            let u = x_pairs.clone().matmul(self.up[shard].val().select(0, local.clone()));
            let mut y = (silu(g) * u).matmul(self.down[shard].val().select(0, local));
            if self.gate.len() > 1 {
                let inside = experts.clone().greater_equal_elem(first).bool_and(experts.clone().lower_elem(first + n));
                y = y * inside.float().reshape([pairs, 1, 1]);
            }
            total = Some(match total {
                Some(t) => t + y,
                None => y,
            });
        }
        total.expect("at least one shard").reshape([pairs, d])
    }
}

/// Top-k probabilities → expert weights: optionally renormalised, then scaled (`MoEGate.forward`).
fn routing_weights(top: Tensor<2>, k: usize, normalise: bool, scale: f64) -> Tensor<2> {
    if k > 1 && normalise {
        let denominator = top.clone().sum_dim(1) + 1e-20;
        top / denominator * scale
    } else {
        top * scale
    }
}
