//! DeepSeek-V2 mixture of experts: softmax gate, greedy top-k, routed experts run only on the tokens
//! routed to them, plus the shared experts (reference: `DeepseekV2MoE` / `MoEGate` in eval mode; spec §6.5).

use burn::module::Module;
use burn::nn::Linear;
use burn::tensor::activation::{silu, softmax};
use burn::tensor::{Int, Tensor, TensorData};

use super::readback::{read_f32, read_i64};
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
    pub fn load(l: &Loader, prefix: &str, hidden: usize, width: usize) -> Result<Self> {
        Ok(Self {
            gate_proj: l.linear(&format!("{prefix}.gate_proj"), hidden, width, false)?,
            up_proj: l.linear(&format!("{prefix}.up_proj"), hidden, width, false)?,
            down_proj: l.linear(&format!("{prefix}.down_proj"), width, hidden, false)?,
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
    pub fn load(c: &DecoderConfig, l: &Loader, prefix: &str) -> Result<Self> {
        let h = c.hidden_size;
        let experts = (0..c.n_routed_experts)
            .map(|e| Mlp::load(l, &format!("{prefix}.experts.{e}"), h, c.moe_intermediate_size))
            .collect::<Result<Vec<_>>>()?;
        let shared_experts = if c.n_shared_experts > 0 {
            Some(Mlp::load(l, &format!("{prefix}.shared_experts"), h, c.shared_intermediate_size())?)
        } else {
            None
        };
        Ok(Self {
            gate: l.linear(&format!("{prefix}.gate"), h, c.n_routed_experts, false)?,
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
    /// tokens per expert; each selected expert runs once on its tokens, and the weighted outputs are
    /// scatter-added back.
    pub async fn forward(&self, x: Tensor<2>) -> Result<Tensor<2>> {
        let [tokens, _] = x.dims();
        let scores = softmax(ops::linear(&self.gate, x.clone()), 1);
        let (weights, experts) = scores.topk_with_indices(self.top_k, 1);
        let weights = routing_weights(weights, self.top_k, self.norm_topk_prob, self.routed_scaling_factor);
        let weights = read_f32(weights).await?;
        let experts = read_i64(experts).await?;

        // Group (token, weight) pairs by expert, in token order.
        let mut routed: Vec<(Vec<i64>, Vec<f32>)> = vec![(Vec::new(), Vec::new()); self.experts.len()];
        for t in 0..tokens {
            for slot in 0..self.top_k {
                let e = experts[t * self.top_k + slot] as usize;
                let group = routed.get_mut(e).ok_or_else(|| Error::Backend(format!("router chose expert {e}")))?;
                group.0.push(t as i64);
                group.1.push(weights[t * self.top_k + slot]);
            }
        }
        let device = x.device();
        let mut out = Tensor::<2>::zeros(x.dims(), &device);
        for (expert, (rows, w)) in self.experts.iter().zip(routed) {
            if rows.is_empty() {
                continue;
            }
            let n = rows.len();
            let index = Tensor::<1, Int>::from_data(TensorData::new(rows, [n]), &device);
            let y = expert.forward(x.clone().select(0, index.clone()));
            let y = y * Tensor::<2>::from_data(TensorData::new(w, [n, 1]), &device);
            out = out.select_assign(0, index, y, burn::tensor::IndexingUpdateOp::Add);
        }
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
