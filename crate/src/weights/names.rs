//! The tensor names and shapes of the original hub checkpoint, derived from its config (spec §7).
//!
//! Shapes are PyTorch's: Linear weights `(out, in)`, conv weights `(out, in, kh, kw)`.

use crate::config::{Config, ModelVersion, Tower};

/// One tensor the model expects, by its original checkpoint name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub shape: Vec<usize>,
}

/// Tensors that may appear in a checkpoint but are not needed: re-saved copies of the model carry
/// CLIP's `position_ids` buffer (int64), the original file does not.
pub const OPTIONAL_TENSORS: &[&str] = &["model.vision_model.embeddings.position_ids"];

/// Every tensor of the original checkpoint for `config`, in module order.
pub fn expected_tensors(config: &Config) -> Vec<TensorSpec> {
    let mut out = Vec::new();
    let mut push = |name: String, shape: &[usize]| out.push(TensorSpec { name, shape: shape.to_vec() });

    // SAM ViT-B, neck and compressor.
    let s = &config.sam;
    let (w, hd) = (s.width, s.head_dim());
    let p = "model.sam_model";
    push(format!("{p}.patch_embed.proj.weight"), &[w, 3, s.patch_size, s.patch_size]);
    push(format!("{p}.patch_embed.proj.bias"), &[w]);
    push(format!("{p}.pos_embed"), &[1, s.pretrain_grid, s.pretrain_grid, w]);
    for b in 0..s.layers {
        let q = format!("{p}.blocks.{b}");
        let rel = 2 * s.rel_pos_side(b) - 1;
        push(format!("{q}.norm1.weight"), &[w]);
        push(format!("{q}.norm1.bias"), &[w]);
        push(format!("{q}.attn.qkv.weight"), &[3 * w, w]);
        push(format!("{q}.attn.qkv.bias"), &[3 * w]);
        push(format!("{q}.attn.proj.weight"), &[w, w]);
        push(format!("{q}.attn.proj.bias"), &[w]);
        push(format!("{q}.attn.rel_pos_h"), &[rel, hd]);
        push(format!("{q}.attn.rel_pos_w"), &[rel, hd]);
        push(format!("{q}.norm2.weight"), &[w]);
        push(format!("{q}.norm2.bias"), &[w]);
        push(format!("{q}.mlp.lin1.weight"), &[s.mlp_dim(), w]);
        push(format!("{q}.mlp.lin1.bias"), &[s.mlp_dim()]);
        push(format!("{q}.mlp.lin2.weight"), &[w, s.mlp_dim()]);
        push(format!("{q}.mlp.lin2.bias"), &[w]);
    }
    let o = s.out_chans;
    push(format!("{p}.neck.0.weight"), &[o, w, 1, 1]);
    push(format!("{p}.neck.1.weight"), &[o]);
    push(format!("{p}.neck.1.bias"), &[o]);
    push(format!("{p}.neck.2.weight"), &[o, o, 3, 3]);
    push(format!("{p}.neck.3.weight"), &[o]);
    push(format!("{p}.neck.3.bias"), &[o]);
    let [d0, d1] = s.downsample_channels;
    push(format!("{p}.net_2.weight"), &[d0, o, 3, 3]);
    push(format!("{p}.net_3.weight"), &[d1, d0, 3, 3]);

    match &config.tower {
        Tower::Clip(c) => {
            // CLIP-L body.
            let (cw, f) = (c.width, c.ffn_hidden_size);
            let p = "model.vision_model";
            push(format!("{p}.embeddings.class_embedding"), &[cw]);
            push(format!("{p}.embeddings.patch_embedding.weight"), &[cw, 3, c.patch_size, c.patch_size]);
            push(format!("{p}.embeddings.position_embedding.weight"), &[c.num_positions(), cw]);
            push(format!("{p}.pre_layrnorm.weight"), &[cw]);
            push(format!("{p}.pre_layrnorm.bias"), &[cw]);
            for l in 0..c.layers {
                let q = format!("{p}.transformer.layers.{l}");
                push(format!("{q}.layer_norm1.weight"), &[cw]);
                push(format!("{q}.layer_norm1.bias"), &[cw]);
                push(format!("{q}.self_attn.qkv_proj.weight"), &[3 * cw, cw]);
                push(format!("{q}.self_attn.qkv_proj.bias"), &[3 * cw]);
                push(format!("{q}.self_attn.out_proj.weight"), &[cw, cw]);
                push(format!("{q}.self_attn.out_proj.bias"), &[cw]);
                push(format!("{q}.layer_norm2.weight"), &[cw]);
                push(format!("{q}.layer_norm2.bias"), &[cw]);
                push(format!("{q}.mlp.fc1.weight"), &[f, cw]);
                push(format!("{q}.mlp.fc1.bias"), &[f]);
                push(format!("{q}.mlp.fc2.weight"), &[cw, f]);
                push(format!("{q}.mlp.fc2.bias"), &[cw]);
            }
        }
        Tower::Queries(q) => {
            // DeepSeek-OCR-2's Qwen2 encoder (no token embedding) and its two learned query sets.
            let (w, f) = (q.hidden_size, q.intermediate_size);
            let (q_out, kv_out) = (q.heads * q.head_dim, q.kv_heads * q.head_dim);
            let p = "model.qwen2_model.model.model";
            for l in 0..q.layers {
                let n = format!("{p}.layers.{l}");
                push(format!("{n}.input_layernorm.weight"), &[w]);
                push(format!("{n}.self_attn.q_proj.weight"), &[q_out, w]);
                push(format!("{n}.self_attn.q_proj.bias"), &[q_out]);
                push(format!("{n}.self_attn.k_proj.weight"), &[kv_out, w]);
                push(format!("{n}.self_attn.k_proj.bias"), &[kv_out]);
                push(format!("{n}.self_attn.v_proj.weight"), &[kv_out, w]);
                push(format!("{n}.self_attn.v_proj.bias"), &[kv_out]);
                push(format!("{n}.self_attn.o_proj.weight"), &[w, q_out]);
                push(format!("{n}.post_attention_layernorm.weight"), &[w]);
                push(format!("{n}.mlp.gate_proj.weight"), &[f, w]);
                push(format!("{n}.mlp.up_proj.weight"), &[f, w]);
                push(format!("{n}.mlp.down_proj.weight"), &[w, f]);
            }
            push(format!("{p}.norm.weight"), &[w]);
            for (side, count) in q.query_sets {
                push(format!("model.qwen2_model.query_{side}.weight"), &[count, w]);
            }
        }
    }

    // Projector and the learned layout vectors.
    let pr = &config.projector;
    push("model.projector.layers.weight".into(), &[pr.n_embed, pr.input_dim]);
    push("model.projector.layers.bias".into(), &[pr.n_embed]);
    if config.version() == ModelVersion::Ocr1 {
        push("model.image_newline".into(), &[pr.n_embed]);
    }
    push("model.view_seperator".into(), &[pr.n_embed]);

    // Decoder.
    let d = &config.decoder;
    let h = d.hidden_size;
    let (q_out, kv_out) = (d.num_attention_heads * d.head_dim, d.num_key_value_heads * d.head_dim);
    push("model.embed_tokens.weight".into(), &[d.vocab_size, h]);
    let mlp = |push: &mut dyn FnMut(String, &[usize]), q: &str, width: usize| {
        push(format!("{q}.gate_proj.weight"), &[width, h]);
        push(format!("{q}.up_proj.weight"), &[width, h]);
        push(format!("{q}.down_proj.weight"), &[h, width]);
    };
    for n in 0..d.num_hidden_layers {
        let q = format!("model.layers.{n}");
        push(format!("{q}.input_layernorm.weight"), &[h]);
        push(format!("{q}.self_attn.q_proj.weight"), &[q_out, h]);
        push(format!("{q}.self_attn.k_proj.weight"), &[kv_out, h]);
        push(format!("{q}.self_attn.v_proj.weight"), &[kv_out, h]);
        push(format!("{q}.self_attn.o_proj.weight"), &[h, q_out]);
        push(format!("{q}.post_attention_layernorm.weight"), &[h]);
        if d.is_moe_layer(n) {
            push(format!("{q}.mlp.gate.weight"), &[d.n_routed_experts, h]);
            for e in 0..d.n_routed_experts {
                mlp(&mut push, &format!("{q}.mlp.experts.{e}"), d.moe_intermediate_size);
            }
            if d.n_shared_experts > 0 {
                mlp(&mut push, &format!("{q}.mlp.shared_experts"), d.shared_intermediate_size());
            }
        } else {
            mlp(&mut push, &format!("{q}.mlp"), d.intermediate_size);
        }
    }
    push("model.norm.weight".into(), &[h]);
    if !d.tie_word_embeddings {
        push("lm_head.weight".into(), &[d.vocab_size, h]);
    }
    out
}
