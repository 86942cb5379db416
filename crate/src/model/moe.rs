//! DeepSeek-V2 mixture of experts: softmax gate, greedy top-k, routed experts run only on the tokens
//! routed to them, plus the shared experts (reference: `DeepseekV2MoE` / `MoEGate` in eval mode; spec §6.5).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};

use super::readback::read_i64;
use crate::config::DecoderConfig;
use crate::error::{Error, Result};
use super::ops;
use crate::weights::Loader;

/// `down(silu(gate(x)) ⊙ up(x))`, no biases (`DeepseekV2MLP`).
#[derive(Module, Debug)]
pub struct Mlp {
    gate_proj: Linear,
    up_proj: Linear,
    down_proj: Linear,
}

impl Mlp {
    pub async fn load(l: &Loader<'_, '_>, prefix: &str, hidden: usize, width: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: l.linear(&format!("{prefix}.gate_proj"), hidden, width, false).await?,
            up_proj: l.linear(&format!("{prefix}.up_proj"), hidden, width, false).await?,
            down_proj: l.linear(&format!("{prefix}.down_proj"), width, hidden, false).await?,
        })
    }

    pub fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        ops::linear(&self.down_proj, silu(ops::linear(&self.gate_proj, x.clone())) * ops::linear(&self.up_proj, x))
    }
}

#[derive(Module, Debug)]
pub struct Moe {
    /// Router `(hidden → experts)`, no bias.
    gate: Linear,
    experts: Vec<Mlp>,
    shared_experts: Option<Mlp>,
    top_k: usize,
    norm_topk_prob: bool,
    routed_scaling_factor: f64,
}

impl Moe {
    pub async fn load(c: &DecoderConfig, l: &Loader<'_, '_>, prefix: &str) -> Result<Self> {
        let h = c.hidden_size;
        let mut experts = Vec::with_capacity(c.n_routed_experts);
        for e in 0..c.n_routed_experts {
            experts.push(Mlp::load(l, &format!("{prefix}.experts.{e}"), h, c.moe_intermediate_size).await?);
        }
        let shared_experts = if c.n_shared_experts > 0 {
            Some(Mlp::load(l, &format!("{prefix}.shared_experts"), h, c.shared_intermediate_size()).await?)
        } else {
            None
        };
        Ok(Self {
            gate: l.linear(&format!("{prefix}.gate"), h, c.n_routed_experts, false).await?,
            experts,
            shared_experts,
            top_k: c.num_experts_per_tok,
            norm_topk_prob: c.norm_topk_prob,
            routed_scaling_factor: c.routed_scaling_factor,
        })
    }

    /// `x`: `(T, hidden)` normalised hidden states of T tokens.
    ///
    /// The routing decision is read back (asynchronously: this runs in the browser too) to group the
    /// tokens per expert; each selected expert runs once on its tokens only, and every token's k
    /// outputs are gathered back and summed with their weights.
    pub async fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let [tokens, _] = x.dims();
        let scores = softmax(ops::linear(&self.gate, x.clone()), 1);
        let (weights, experts) = scores.topk_with_indices(self.top_k, 1);
        let weights = routing_weights(weights, self.top_k, self.norm_topk_prob, self.routed_scaling_factor);
        // Only the expert choice comes back to the host; the weights stay on the device.
        let experts = read_i64(experts).await?;

        // Group the (token, slot) pairs by expert, in token order; remember where each pair's output lands.
        let k = self.top_k;
        let mut routed: Vec<Vec<usize>> = vec![Vec::new(); self.experts.len()];
        for (pair, &e) in experts.iter().enumerate() {
            routed
                .get_mut(e as usize)
                .ok_or_else(|| Error::Backend(format!("router chose expert {e}")))?
                .push(pair);
        }
        let device = x.device();
        let mut outputs = Vec::new();
        let mut row_of_pair = vec![0i64; tokens * k];
        let mut next_row = 0;
        for (expert, pairs) in self.experts.iter().zip(&routed) {
            if pairs.is_empty() {
                continue;
            }
            let rows: Vec<i64> = pairs.iter().map(|&pair| (pair / k) as i64).collect();
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [pairs.len()]), &device);
            outputs.push(expert.forward(x.clone().select(0, index)));
            for &pair in pairs {
                row_of_pair[pair] = next_row;
                next_row += 1;
            }
        }
        // Gather each token's k outputs back (no scatter: no float atomics on WebGPU) and sum them
        // weighted, in slot order like the reference.
        let d = x.dims()[1];
        let all = Tensor::cat(outputs, 0);
        let gathered = all.select(0, Tensor::<1, Int>::from_data(TensorData::new(row_of_pair, [tokens * k]), &device));
        let w = weights.reshape([tokens, k, 1]);
        let mut out = (gathered.reshape([tokens, k, d]) * w).sum_dim(1).reshape([tokens, d]);
        if let Some(shared) = &self.shared_experts {
            out = out + shared.forward(x);
        }
        Ok(out)
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
