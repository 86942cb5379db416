//! Which tensor gets which quantization (the recipe), the `q4`/`q8` presets, and the
//! `quantization_config` block of a quantized checkpoint's `config.json` that records it.
//!
//! Tensors fall into roles by their original names; a recipe gives each role a [`QuantSpec`] or
//! keeps it in float. What no role covers — norms, biases, position tables, convolutions, the MoE
//! router, `image_newline`/`view_seperator`, CLIP's unused patch embedding — always stays float.

use serde::{Deserialize, Serialize};

use super::scheme::{Bits, QuantSpec, ScaleDtype};
use crate::error::{Error, Result};

/// Quantized tensors are stored as `<name minus "weight">weight_packed` (packed values: `U8` for
/// q4, `I8` for q8) and `…weight_scale` (`(rows, groups)` scales) in place of `….weight`.
pub const PACKED_SUFFIX: &str = "weight_packed";
pub const SCALE_SUFFIX: &str = "weight_scale";

/// `quant_method` of our checkpoints, and the format version this code reads and writes.
pub const QUANT_METHOD: &str = "dsocr";
pub const FORMAT_VERSION: u32 = 1;

/// The kinds of matrix a recipe can quantize.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Role {
    /// Attention projections, the dense MLP, routed and shared experts of the language model.
    Decoder,
    /// `model.embed_tokens.weight` (rows dequantized when gathered).
    Embedding,
    /// `lm_head.weight`.
    LmHead,
    /// SAM and CLIP linear layers and the projector.
    Vision,
}

impl Role {
    pub const ALL: [Role; 4] = [Role::Decoder, Role::Embedding, Role::LmHead, Role::Vision];

    pub fn key(self) -> &'static str {
        match self {
            Role::Decoder => "decoder",
            Role::Embedding => "embedding",
            Role::LmHead => "lm_head",
            Role::Vision => "vision",
        }
    }

    /// The role of a checkpoint tensor, by its original name (`None`: stays float).
    pub fn of(name: &str) -> Option<Role> {
        if name == "model.embed_tokens.weight" {
            return Some(Role::Embedding);
        }
        if name == "lm_head.weight" {
            return Some(Role::LmHead);
        }
        if name == "model.projector.layers.weight" {
            return Some(Role::Vision);
        }
        let stem = name.strip_suffix(".weight")?;
        let last = stem.rsplit('.').next()?;
        if let Some(rest) = stem.strip_prefix("model.layers.") {
            // Not the router (`mlp.gate`), not the norms.
            let projection = matches!(last, "q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj");
            return (projection && rest.contains('.')).then_some(Role::Decoder);
        }
        if stem.starts_with("model.sam_model.blocks.") {
            return matches!(last, "qkv" | "proj" | "lin1" | "lin2").then_some(Role::Vision);
        }
        if stem.starts_with("model.vision_model.transformer.layers.") {
            return matches!(last, "qkv_proj" | "out_proj" | "fc1" | "fc2").then_some(Role::Vision);
        }
        // DeepSeek-OCR-2's query encoder: its projections (not the norms, not the learned queries).
        if stem.starts_with("model.qwen2_model.model.model.layers.") {
            return matches!(last, "q_proj" | "k_proj" | "v_proj" | "o_proj" | "gate_proj" | "up_proj" | "down_proj").then_some(Role::Vision);
        }
        None
    }
}

/// Named recipes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Preset {
    Q4,
    Q8,
}

impl Preset {
    pub fn parse(name: &str) -> Result<Self> {
        match name {
            "q4" => Ok(Preset::Q4),
            "q8" => Ok(Preset::Q8),
            other => Err(Error::InvalidArgument(format!("quantization preset {other:?} (q4 or q8)"))),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Preset::Q4 => "q4",
            Preset::Q8 => "q8",
        }
    }
}

/// Group size of the presets (see README: accuracy and size per group size).
pub const DEFAULT_GROUP: usize = 64;

/// A spec per role; `None` keeps the role in float.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Recipe {
    pub preset: Option<Preset>,
    pub decoder: Option<QuantSpec>,
    pub embedding: Option<QuantSpec>,
    pub lm_head: Option<QuantSpec>,
    pub vision: Option<QuantSpec>,
}

impl Recipe {
    /// * `q4`: the language model's matrices (experts, shared experts, dense MLP, attention,
    ///   embedding, lm_head) in int4, the vision encoder's matrices in int8.
    /// * `q8`: all of them in int8.
    ///
    /// `group`: the group size of every quantized role (default [`DEFAULT_GROUP`]); scales in f16.
    pub fn preset(preset: Preset, group: Option<usize>) -> Result<Self> {
        let group = group.unwrap_or(DEFAULT_GROUP);
        let q = |bits| QuantSpec::new(bits, group, ScaleDtype::F16);
        let language = match preset {
            Preset::Q4 => Bits::Q4,
            Preset::Q8 => Bits::Q8,
        };
        Ok(Self {
            preset: Some(preset),
            decoder: Some(q(language)?),
            embedding: Some(q(language)?),
            lm_head: Some(q(language)?),
            vision: Some(q(Bits::Q8)?),
        })
    }

    pub fn spec(&self, role: Role) -> Option<QuantSpec> {
        match role {
            Role::Decoder => self.decoder,
            Role::Embedding => self.embedding,
            Role::LmHead => self.lm_head,
            Role::Vision => self.vision,
        }
    }

    /// The spec a checkpoint stored quantized by `recipe` (its `quantization_config`) gives `name`,
    /// whose packed tensors it holds: an error when the config gives it none.
    pub fn stored_spec(recipe: Option<&Recipe>, name: &str) -> Result<QuantSpec> {
        recipe.and_then(|r| r.spec_for(name)).ok_or_else(|| {
            Error::Unsupported(format!("`{name}` is stored quantized but config.json's quantization_config gives it no scheme"))
        })
    }

    /// The spec of checkpoint tensor `name` (`None`: float).
    pub fn spec_for(&self, name: &str) -> Option<QuantSpec> {
        Role::of(name).and_then(|role| self.spec(role))
    }

    /// Bytes of tensor data of `config`'s checkpoint quantized by this recipe (float tensors in
    /// bf16, as the original stores them).
    pub fn stored_bytes(&self, config: &crate::config::Config) -> u64 {
        crate::weights::expected_tensors(config)
            .iter()
            .map(|t| match (self.spec_for(&t.name), t.shape.as_slice()) {
                (Some(spec), &[rows, cols]) => spec.stored_bytes(rows, cols) as u64,
                _ => 2 * t.shape.iter().product::<usize>() as u64,
            })
            .sum()
    }

    /// The `quantization_config` block recording this recipe.
    pub fn to_config(&self) -> QuantizationConfig {
        let groups = Role::ALL
            .iter()
            .filter_map(|&role| {
                self.spec(role).map(|s| {
                    (role.key().to_string(), GroupConfig { bits: s.bits.count(), group_size: s.group, scale_dtype: s.scale.name().into() })
                })
            })
            .collect();
        QuantizationConfig {
            quant_method: QUANT_METHOD.into(),
            format_version: FORMAT_VERSION,
            preset: self.preset.map(|p| p.name().to_string()),
            sym: true,
            packing: PACKING.into(),
            tensors: TensorNames { values: PACKED_SUFFIX.into(), scales: SCALE_SUFFIX.into() },
            groups,
            quantizer: format!("dsocr {}", env!("CARGO_PKG_VERSION")),
        }
    }

    /// Reads a `quantization_config` block, rejecting what this version does not understand.
    pub fn from_config(config: &QuantizationConfig) -> Result<Self> {
        let bad = |what: String| Error::Unsupported(format!("quantization_config: {what}"));
        if config.quant_method != QUANT_METHOD {
            return Err(bad(format!("quant_method {:?} (this reads {QUANT_METHOD:?})", config.quant_method)));
        }
        if config.format_version != FORMAT_VERSION {
            return Err(bad(format!("format_version {} (this reads {FORMAT_VERSION})", config.format_version)));
        }
        if !config.sym || config.packing != PACKING {
            return Err(bad(format!("packing {:?}, sym {} (this reads {PACKING:?}, symmetric)", config.packing, config.sym)));
        }
        if config.tensors.values != PACKED_SUFFIX || config.tensors.scales != SCALE_SUFFIX {
            return Err(bad(format!("tensor names {:?}", config.tensors)));
        }
        let mut recipe = Self { preset: config.preset.as_deref().map(Preset::parse).transpose()?, decoder: None, embedding: None, lm_head: None, vision: None };
        for (key, group) in &config.groups {
            let role = Role::ALL.into_iter().find(|r| r.key() == key).ok_or_else(|| bad(format!("unknown role {key:?}")))?;
            let spec = QuantSpec::new(Bits::from_count(group.bits as u64)?, group.group_size, ScaleDtype::parse(&group.scale_dtype)?)
                .map_err(|e| bad(format!("{key}: {e}")))?;
            match role {
                Role::Decoder => recipe.decoder = Some(spec),
                Role::Embedding => recipe.embedding = Some(spec),
                Role::LmHead => recipe.lm_head = Some(spec),
                Role::Vision => recipe.vision = Some(spec),
            }
        }
        Ok(recipe)
    }

    /// The recipe recorded in a checkpoint's `config.json`, if it has a `quantization_config`.
    pub fn from_config_json(text: &str) -> Result<Option<Self>> {
        let value: serde_json::Value = serde_json::from_str(text).map_err(|e| Error::Config(e.to_string()))?;
        match value.get("quantization_config") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(block) => {
                let config: QuantizationConfig =
                    serde_json::from_value(block.clone()).map_err(|e| Error::Unsupported(format!("quantization_config: {e}")))?;
                Self::from_config(&config).map(Some)
            }
        }
    }
}

/// How values are packed (recorded so a reader can refuse a layout it does not know).
pub const PACKING: &str = "symmetric per-group; q8: int8 in row order; q4: uint8 holding q+8, byte i of a group of L values = value i (low nibble) | value i+ceil(L/2) (high nibble)";

/// `config.json`'s `quantization_config` (in the spirit of GPTQ/AWQ blocks: method, bits, group size).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizationConfig {
    pub quant_method: String,
    pub format_version: u32,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub preset: Option<String>,
    pub sym: bool,
    pub packing: String,
    pub tensors: TensorNames,
    /// Role (`decoder`, `embedding`, `lm_head`, `vision`) → its quantization; absent roles are float.
    pub groups: std::collections::BTreeMap<String, GroupConfig>,
    pub quantizer: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TensorNames {
    pub values: String,
    pub scales: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub bits: u32,
    pub group_size: usize,
    pub scale_dtype: String,
}

/// `(packed values, scales)` names standing in for weight `name` (`….weight`).
pub fn packed_names(name: &str) -> Option<(String, String)> {
    let stem = name.strip_suffix("weight")?;
    Some((format!("{stem}{PACKED_SUFFIX}"), format!("{stem}{SCALE_SUFFIX}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn roles_by_name() {
        for (name, role) in [
            ("model.layers.0.mlp.gate_proj.weight", Some(Role::Decoder)),
            ("model.layers.3.mlp.experts.17.down_proj.weight", Some(Role::Decoder)),
            ("model.layers.3.mlp.shared_experts.up_proj.weight", Some(Role::Decoder)),
            ("model.layers.3.self_attn.o_proj.weight", Some(Role::Decoder)),
            ("model.layers.3.mlp.gate.weight", None),
            ("model.layers.3.input_layernorm.weight", None),
            ("model.embed_tokens.weight", Some(Role::Embedding)),
            ("lm_head.weight", Some(Role::LmHead)),
            ("model.sam_model.blocks.4.attn.qkv.weight", Some(Role::Vision)),
            ("model.sam_model.blocks.4.attn.qkv.bias", None),
            ("model.sam_model.blocks.4.attn.rel_pos_h", None),
            ("model.sam_model.neck.0.weight", None),
            ("model.vision_model.transformer.layers.1.mlp.fc2.weight", Some(Role::Vision)),
            ("model.vision_model.embeddings.patch_embedding.weight", None),
            ("model.projector.layers.weight", Some(Role::Vision)),
            ("model.norm.weight", None),
            ("model.qwen2_model.model.model.layers.5.self_attn.k_proj.weight", Some(Role::Vision)),
            ("model.qwen2_model.model.model.layers.5.mlp.down_proj.weight", Some(Role::Vision)),
            ("model.qwen2_model.model.model.layers.5.self_attn.k_proj.bias", None),
            ("model.qwen2_model.model.model.layers.5.input_layernorm.weight", None),
            ("model.qwen2_model.model.model.norm.weight", None),
            ("model.qwen2_model.query_768.weight", None),
        ] {
            assert_eq!(Role::of(name), role, "{name}");
        }
    }

    #[test]
    fn config_round_trip_and_rejections() {
        let recipe = Recipe::preset(Preset::Q4, Some(32)).unwrap();
        let config = recipe.to_config();
        assert_eq!(Recipe::from_config(&config).unwrap(), recipe);
        let json = serde_json::json!({ "quantization_config": config }).to_string();
        assert_eq!(Recipe::from_config_json(&json).unwrap(), Some(recipe));
        assert_eq!(Recipe::from_config_json("{}").unwrap(), None);
        let mut other = config.clone();
        other.quant_method = "gptq".into();
        assert!(matches!(Recipe::from_config(&other), Err(Error::Unsupported(_))));
        let mut other = config.clone();
        other.format_version = 2;
        assert!(Recipe::from_config(&other).is_err());
        let mut other = config.clone();
        other.groups.get_mut("decoder").unwrap().bits = 3;
        assert!(Recipe::from_config(&other).is_err());
        let mut other = config;
        other.groups.get_mut("decoder").unwrap().group_size = 48;
        assert!(Recipe::from_config(&other).is_err());
        let unknown = r#"{"quantization_config": {"quant_method": "dsocr", "bits": 4}}"#;
        assert!(matches!(Recipe::from_config_json(unknown), Err(Error::Unsupported(_))));
    }
}
