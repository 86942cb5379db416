//! The checkpoint's `config.json` in the original hub format, resolved into typed configs, and the
//! inference modes (Tiny … Gundam, [`mode`]).
//!
//! The hub file does not express every size: the official code hard-codes SAM's window, neck width
//! and MLP ratio, CLIP's FFN width and DeepSeek-OCR-2's Qwen2 encoder sizes. Those are the constants
//! below; test checkpoints of other sizes override them with a top-level `dsocr_test_overrides`
//! object (spec, Appendix A).
//!
//! Both model versions say `model_type: deepseek_vl_v2`; DeepSeek-OCR-2 is told apart by
//! `vision_config.model_name == "deepencoderv2"`. Its hub config also misstates SAM's last conv
//! (`downsample_channels` ends in 1024; the conv outputs the query encoder's width, 896): that
//! entry is not used for v2, and the checkpoint's tensor shapes are checked against the width.

mod mode;
mod query_encoder;

use serde::Deserialize;

pub use mode::{Geometry, Mode};
pub use query_encoder::QueryEncoderConfig;
use query_encoder::query_encoder_config;

use crate::error::{Error, Result};

/// Everything the model needs to know about a checkpoint.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    pub decoder: DecoderConfig,
    pub sam: SamConfig,
    /// What reads SAM's compressed features: CLIP-L (v1) or the Qwen2 query encoder (v2).
    pub tower: Tower,
    pub projector: ProjectorConfig,
}

/// Which DeepSeek-OCR a checkpoint is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum ModelVersion {
    /// DeepSeek-OCR: SAM + CLIP-L, newline vectors, five modes.
    Ocr1,
    /// DeepSeek-OCR-2: SAM + a Qwen2 encoder with learned queries ("visual causal flow").
    Ocr2,
}

impl ModelVersion {
    /// The name results carry (`model` in the JSON output).
    pub fn name(self) -> &'static str {
        match self {
            ModelVersion::Ocr1 => "deepseek-ocr",
            ModelVersion::Ocr2 => "deepseek-ocr-2",
        }
    }

    pub fn display_name(self) -> &'static str {
        match self {
            ModelVersion::Ocr1 => "DeepSeek-OCR",
            ModelVersion::Ocr2 => "DeepSeek-OCR-2",
        }
    }
}

/// The encoder stage after SAM.
#[derive(Debug, Clone, PartialEq)]
pub enum Tower {
    Clip(ClipConfig),
    Queries(QueryEncoderConfig),
}

impl Config {
    pub fn version(&self) -> ModelVersion {
        match self.tower {
            Tower::Clip(_) => ModelVersion::Ocr1,
            Tower::Queries(_) => ModelVersion::Ocr2,
        }
    }

    /// CLIP's config (DeepSeek-OCR checkpoints).
    pub fn clip(&self) -> Option<&ClipConfig> {
        match &self.tower {
            Tower::Clip(c) => Some(c),
            Tower::Queries(_) => None,
        }
    }

    /// The query encoder's config (DeepSeek-OCR-2 checkpoints).
    pub fn queries(&self) -> Option<&QueryEncoderConfig> {
        match &self.tower {
            Tower::Queries(q) => Some(q),
            Tower::Clip(_) => None,
        }
    }
}

/// DeepSeek-V2-style language model (MHA variant, `use_mla = false`).
#[derive(Debug, Clone, PartialEq)]
pub struct DecoderConfig {
    pub vocab_size: usize,
    pub hidden_size: usize,
    pub num_hidden_layers: usize,
    pub num_attention_heads: usize,
    pub num_key_value_heads: usize,
    pub head_dim: usize,
    /// Width of the dense MLP in the first `first_k_dense_replace` layers.
    pub intermediate_size: usize,
    /// Width of one routed expert.
    pub moe_intermediate_size: usize,
    pub n_routed_experts: usize,
    /// Shared experts are one MLP of width `n_shared_experts · moe_intermediate_size` (0 = none).
    pub n_shared_experts: usize,
    pub num_experts_per_tok: usize,
    pub first_k_dense_replace: usize,
    pub moe_layer_freq: usize,
    pub norm_topk_prob: bool,
    pub routed_scaling_factor: f64,
    pub rms_norm_eps: f64,
    pub rope_theta: f64,
    pub max_position_embeddings: usize,
    pub tie_word_embeddings: bool,
    pub bos_token_id: u32,
    pub eos_token_id: u32,
}

impl DecoderConfig {
    /// Whether decoder layer `layer` uses the MoE block (else the dense MLP), as the reference decides it.
    pub fn is_moe_layer(&self, layer: usize) -> bool {
        self.n_routed_experts > 0
            && layer >= self.first_k_dense_replace
            && layer % self.moe_layer_freq == 0
    }

    /// Width of the merged shared-expert MLP.
    pub fn shared_intermediate_size(&self) -> usize {
        self.n_shared_experts * self.moe_intermediate_size
    }
}

/// SAM ViT image encoder plus the neck and the two stride-2 compressor convs.
#[derive(Debug, Clone, PartialEq)]
pub struct SamConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub global_attn_indexes: Vec<usize>,
    /// Output channels of `net_2` and `net_3`.
    pub downsample_channels: [usize; 2],
    pub patch_size: usize,
    /// Side of the grid the absolute position table was trained on (1024 / 16).
    pub pretrain_grid: usize,
    pub window_size: usize,
    pub out_chans: usize,
    pub mlp_ratio: f64,
    pub layer_norm_eps: f64,
}

impl SamConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    pub fn mlp_dim(&self) -> usize {
        // The reference computes `int(dim * mlp_ratio)`.
        (self.width as f64 * self.mlp_ratio) as usize
    }
    pub fn is_global_block(&self, block: usize) -> bool {
        self.global_attn_indexes.contains(&block)
    }
    /// Side length `L` of the stored relative-position tables (`2L − 1` rows) of a block.
    pub fn rel_pos_side(&self, block: usize) -> usize {
        if self.is_global_block(block) { self.pretrain_grid } else { self.window_size }
    }
}

/// CLIP-L body fed with SAM features.
#[derive(Debug, Clone, PartialEq)]
pub struct ClipConfig {
    pub width: usize,
    pub layers: usize,
    pub heads: usize,
    pub ffn_hidden_size: usize,
    pub patch_size: usize,
    pub image_size: usize,
    pub layer_norm_eps: f64,
}

impl ClipConfig {
    pub fn head_dim(&self) -> usize {
        self.width / self.heads
    }
    /// Side of the position grid the checkpoint stores (224 / 14 = 16).
    pub fn pretrain_grid(&self) -> usize {
        self.image_size / self.patch_size
    }
    /// Rows of `position_embedding.weight`: the class position plus the grid.
    pub fn num_positions(&self) -> usize {
        self.pretrain_grid() * self.pretrain_grid() + 1
    }
}

/// The linear projector from `[CLIP ; SAM]` features to the decoder width.
#[derive(Debug, Clone, PartialEq)]
pub struct ProjectorConfig {
    pub input_dim: usize,
    pub n_embed: usize,
}

// Constants of the official code that the hub config cannot express (spec §3, §4, Appendix A).
const SAM_PATCH_SIZE: usize = 16;
const SAM_PRETRAIN_IMAGE: usize = 1024;
const SAM_WINDOW_SIZE: usize = 14;
const SAM_OUT_CHANS: usize = 256;
const SAM_MLP_RATIO: f64 = 4.0;
const SAM_LAYER_NORM_EPS: f64 = 1e-6;
const CLIP_FFN_HIDDEN_SIZE: usize = 4096;
const CLIP_LAYER_NORM_EPS: f64 = 1e-5;
const CLIP_KEY: &str = "clip-l-14-224";
const SAM_KEY: &str = "sam_vit_b";
const QWEN2_KEY: &str = "qwen2-0-5b";
const OCR2_ENCODER_NAME: &str = "deepencoderv2";

// ---- raw JSON shapes -------------------------------------------------------------------------

/// Top-level keys the remote `DeepseekV2Config` reads, with its defaults for absent keys.
#[derive(Debug, Deserialize)]
struct RawHub {
    vocab_size: Option<usize>,
    hidden_size: Option<usize>,
    intermediate_size: Option<usize>,
    moe_intermediate_size: Option<usize>,
    num_hidden_layers: Option<usize>,
    num_attention_heads: Option<usize>,
    num_key_value_heads: Option<usize>,
    n_shared_experts: Option<usize>,
    n_routed_experts: Option<usize>,
    routed_scaling_factor: Option<f64>,
    topk_method: Option<String>,
    num_experts_per_tok: Option<usize>,
    moe_layer_freq: Option<usize>,
    first_k_dense_replace: Option<usize>,
    norm_topk_prob: Option<bool>,
    scoring_func: Option<String>,
    hidden_act: Option<String>,
    max_position_embeddings: Option<usize>,
    rms_norm_eps: Option<f64>,
    bos_token_id: Option<u32>,
    eos_token_id: Option<u32>,
    tie_word_embeddings: Option<bool>,
    rope_theta: Option<f64>,
    rope_scaling: Option<serde_json::Value>,
    attention_bias: Option<bool>,
    use_mla: Option<bool>,
    vision_config: RawVision,
    projector_config: RawProjector,
    #[serde(default)]
    dsocr_test_overrides: RawOverrides,
}

#[derive(Debug, Deserialize)]
struct RawVision {
    model_name: Option<String>,
    width: std::collections::BTreeMap<String, serde_json::Value>,
}

#[derive(Debug, Deserialize)]
struct RawQwen2 {
    dim: usize,
}

#[derive(Debug, Deserialize)]
struct RawSam {
    width: usize,
    layers: usize,
    heads: usize,
    global_attn_indexes: Vec<usize>,
    downsample_channels: Vec<usize>,
}

#[derive(Debug, Deserialize)]
struct RawClip {
    width: usize,
    layers: usize,
    heads: usize,
    patch_size: Option<usize>,
    image_size: Option<usize>,
}

#[derive(Debug, Deserialize)]
struct RawProjector {
    projector_type: String,
    input_dim: usize,
    n_embed: usize,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOverrides {
    sam_window_size: Option<usize>,
    sam_out_chans: Option<usize>,
    sam_mlp_ratio: Option<f64>,
    clip_ffn_hidden_size: Option<usize>,
    qwen2_layers: Option<usize>,
    qwen2_heads: Option<usize>,
    qwen2_kv_heads: Option<usize>,
    qwen2_intermediate_size: Option<usize>,
}

fn bad(msg: impl Into<String>) -> Error {
    Error::Config(msg.into())
}

fn unsupported(msg: impl Into<String>) -> Error {
    Error::Unsupported(msg.into())
}

/// Ceilings on the sizes a `config.json` may declare: ten to a hundred times DeepSeek-OCR's (and
/// above DeepSeek-V3's 61 layers, 256 experts, hidden size 7168), low enough that the tensor list a
/// config implies (checked before any weight is read) stays a few megabytes — a hostile or corrupt
/// config gets a typed error instead of an allocation that kills the process.
const CEILINGS: [(&str, usize); 9] = [
    ("num_hidden_layers", 256),
    ("n_routed_experts", 1024),
    ("n_shared_experts", 64),
    ("hidden_size", 65_536),
    ("num_attention_heads", 1024),
    ("vocab_size", 4_194_304),
    ("vision_config layers (SAM)", 256),
    ("vision_config layers (CLIP / Qwen2 encoder)", 256),
    ("SAM global_attn_indexes", 256),
];

impl Config {
    fn check_ceilings(&self) -> Result<()> {
        let d = &self.decoder;
        let tower_layers = match &self.tower {
            Tower::Clip(c) => c.layers,
            Tower::Queries(q) => q.layers,
        };
        let values = [
            d.num_hidden_layers,
            d.n_routed_experts,
            d.n_shared_experts,
            d.hidden_size,
            d.num_attention_heads,
            d.vocab_size,
            self.sam.layers,
            tower_layers,
            self.sam.global_attn_indexes.len(),
        ];
        for ((name, limit), value) in CEILINGS.iter().zip(values) {
            if value > *limit {
                return Err(bad(format!("{name} = {value} is over the supported maximum of {limit}")));
            }
        }
        // Widths and sizes: at least 1 (several are divisors), at most 2^20 (no product of two of
        // them overflows, no table they size is unbounded).
        let sam = &self.sam;
        let mut sizes = vec![
            ("hidden_size", d.hidden_size),
            ("SAM width", sam.width),
            ("SAM patch_size", sam.patch_size),
            ("SAM pretrain grid", sam.pretrain_grid),
            ("SAM window_size", sam.window_size),
            ("SAM out_chans", sam.out_chans),
            ("SAM downsample_channels[0]", sam.downsample_channels[0]),
            ("SAM downsample_channels[1]", sam.downsample_channels[1]),
            ("projector n_embed", self.projector.n_embed),
        ];
        let mut widths = vec![
            ("intermediate_size", d.intermediate_size),
            ("moe_intermediate_size", d.moe_intermediate_size),
            ("max_position_embeddings", d.max_position_embeddings),
        ];
        match &self.tower {
            Tower::Clip(clip) => {
                sizes.extend([("CLIP width", clip.width), ("CLIP patch_size", clip.patch_size), ("CLIP image_size", clip.image_size)]);
                widths.push(("CLIP ffn_hidden_size", clip.ffn_hidden_size));
            }
            Tower::Queries(q) => {
                sizes.extend([("qwen2 dim", q.hidden_size), ("qwen2 heads", q.heads)]);
                widths.push(("qwen2 intermediate_size", q.intermediate_size));
            }
        }
        const MAX_SIZE: usize = 1 << 20;
        for (name, value) in sizes {
            if !(1..=MAX_SIZE).contains(&value) {
                return Err(bad(format!("{name} = {value} is outside the supported 1..={MAX_SIZE}")));
            }
        }
        for (name, value) in widths {
            if value > MAX_SIZE {
                return Err(bad(format!("{name} = {value} is over the supported maximum of {MAX_SIZE}")));
            }
        }
        if !(sam.mlp_ratio > 0.0 && sam.mlp_ratio <= 64.0) {
            return Err(bad(format!("SAM mlp_ratio = {} is outside the supported (0, 64]", sam.mlp_ratio)));
        }
        Ok(())
    }

    /// Parses the checkpoint's `config.json` text (the hub file unchanged, or a test checkpoint's).
    pub fn from_json(text: &str) -> Result<Self> {
        let raw: RawHub = serde_json::from_str(text).map_err(|e| bad(e.to_string()))?;
        Self::from_raw(raw)
    }

    fn from_raw(raw: RawHub) -> Result<Self> {
        // Defaults are those of the remote `DeepseekV2Config.__init__` (spec §6.1).
        if raw.use_mla.unwrap_or(true) {
            return Err(unsupported("multi-latent attention (use_mla = true); DeepSeek-OCR uses use_mla = false"));
        }
        if raw.attention_bias.unwrap_or(false) {
            return Err(unsupported("attention_bias = true"));
        }
        if let Some(scaling) = &raw.rope_scaling
            && !scaling.is_null()
        {
            return Err(unsupported(format!("rope_scaling = {scaling}")));
        }
        if let Some(act) = &raw.hidden_act
            && act != "silu"
        {
            return Err(unsupported(format!("hidden_act = {act:?}")));
        }
        let scoring = raw.scoring_func.as_deref().unwrap_or("softmax");
        if scoring != "softmax" {
            return Err(unsupported(format!("scoring_func = {scoring:?}")));
        }
        let n_routed_experts = raw.n_routed_experts.unwrap_or(0);
        let topk_method = raw.topk_method.as_deref().unwrap_or("gready");
        if n_routed_experts > 0 && topk_method != "greedy" {
            return Err(unsupported(format!("topk_method = {topk_method:?} (only \"greedy\")")));
        }

        let hidden_size = raw.hidden_size.unwrap_or(4096);
        let num_attention_heads = raw.num_attention_heads.unwrap_or(32);
        let num_key_value_heads = raw.num_key_value_heads.unwrap_or(num_attention_heads);
        if num_attention_heads == 0 || hidden_size % num_attention_heads != 0 {
            return Err(bad(format!(
                "hidden_size {hidden_size} is not divisible by num_attention_heads {num_attention_heads}"
            )));
        }
        if num_key_value_heads == 0 || num_attention_heads % num_key_value_heads != 0 {
            return Err(bad(format!(
                "num_attention_heads {num_attention_heads} is not a multiple of num_key_value_heads {num_key_value_heads}"
            )));
        }
        let head_dim = hidden_size / num_attention_heads;
        if head_dim % 2 != 0 {
            return Err(bad(format!("head dim {head_dim} is odd; rotary embedding needs an even one")));
        }
        let num_experts_per_tok = raw.num_experts_per_tok.unwrap_or(0);
        if n_routed_experts > 0 && !(1..=n_routed_experts).contains(&num_experts_per_tok) {
            return Err(bad(format!(
                "num_experts_per_tok {num_experts_per_tok} must be in 1..={n_routed_experts}"
            )));
        }
        let moe_layer_freq = raw.moe_layer_freq.unwrap_or(1);
        if moe_layer_freq == 0 {
            return Err(bad("moe_layer_freq must be at least 1"));
        }
        let decoder = DecoderConfig {
            vocab_size: raw.vocab_size.unwrap_or(102400),
            hidden_size,
            num_hidden_layers: raw.num_hidden_layers.unwrap_or(30),
            num_attention_heads,
            num_key_value_heads,
            head_dim,
            intermediate_size: raw.intermediate_size.unwrap_or(11008),
            moe_intermediate_size: raw.moe_intermediate_size.unwrap_or(1407),
            n_routed_experts,
            n_shared_experts: raw.n_shared_experts.unwrap_or(0),
            num_experts_per_tok,
            first_k_dense_replace: raw.first_k_dense_replace.unwrap_or(0),
            moe_layer_freq,
            norm_topk_prob: raw.norm_topk_prob.unwrap_or(false),
            routed_scaling_factor: raw.routed_scaling_factor.unwrap_or(1.0),
            rms_norm_eps: raw.rms_norm_eps.unwrap_or(1e-6),
            rope_theta: raw.rope_theta.unwrap_or(10000.0),
            max_position_embeddings: raw.max_position_embeddings.unwrap_or(2048),
            tie_word_embeddings: raw.tie_word_embeddings.unwrap_or(false),
            bos_token_id: raw.bos_token_id.unwrap_or(100000),
            eos_token_id: raw.eos_token_id.unwrap_or(100001),
        };

        let overrides = raw.dsocr_test_overrides;
        // v1's hub file says "deeplip_b_l"; anything but v2's name is read as v1 (CLIP's entry is then required).
        let ocr2 = raw.vision_config.model_name.as_deref() == Some(OCR2_ENCODER_NAME);
        let sam_raw: RawSam = vision_entry(&raw.vision_config, SAM_KEY)?;
        let [d0, d1] = <[usize; 2]>::try_from(sam_raw.downsample_channels.as_slice())
            .map_err(|_| bad("vision_config.width.sam_vit_b.downsample_channels must have two entries"))?;
        // v2: the last conv outputs the query encoder's width (the hub file says 1024 there; see above).
        let qwen2_dim = if ocr2 { Some(vision_entry::<RawQwen2>(&raw.vision_config, QWEN2_KEY)?.dim) } else { None };
        let sam = SamConfig {
            width: sam_raw.width,
            layers: sam_raw.layers,
            heads: sam_raw.heads,
            global_attn_indexes: sam_raw.global_attn_indexes,
            downsample_channels: [d0, qwen2_dim.unwrap_or(d1)],
            patch_size: SAM_PATCH_SIZE,
            pretrain_grid: SAM_PRETRAIN_IMAGE / SAM_PATCH_SIZE,
            window_size: overrides.sam_window_size.unwrap_or(SAM_WINDOW_SIZE),
            out_chans: overrides.sam_out_chans.unwrap_or(SAM_OUT_CHANS),
            mlp_ratio: overrides.sam_mlp_ratio.unwrap_or(SAM_MLP_RATIO),
            layer_norm_eps: SAM_LAYER_NORM_EPS,
        };
        if sam.heads == 0 || sam.width % sam.heads != 0 {
            return Err(bad(format!("SAM width {} is not divisible by heads {}", sam.width, sam.heads)));
        }
        if let Some(&b) = sam.global_attn_indexes.iter().find(|&&b| b >= sam.layers) {
            return Err(bad(format!("SAM global_attn_indexes names block {b} of {}", sam.layers)));
        }
        if sam.window_size == 0 {
            return Err(bad("sam_window_size must be at least 1"));
        }

        let tower = match qwen2_dim {
            Some(dim) => Tower::Queries(query_encoder_config(dim, &overrides)?),
            None => Tower::Clip(clip_config(&raw.vision_config, &overrides, &sam)?),
        };
        let tower_width = match &tower {
            Tower::Clip(clip) => clip.width + sam.downsample_channels[1],
            Tower::Queries(q) => q.hidden_size,
        };

        if raw.projector_config.projector_type != "linear" {
            return Err(unsupported(format!(
                "projector_type {:?} (only \"linear\")",
                raw.projector_config.projector_type
            )));
        }
        let projector = ProjectorConfig {
            input_dim: raw.projector_config.input_dim,
            n_embed: raw.projector_config.n_embed,
        };
        if projector.input_dim != tower_width {
            let what = if ocr2 { "the query encoder's width" } else { "CLIP width + SAM channels" };
            return Err(bad(format!("projector input_dim {} must equal {what} ({tower_width})", projector.input_dim)));
        }
        if projector.n_embed != decoder.hidden_size {
            return Err(bad(format!(
                "projector n_embed {} must equal the decoder hidden_size {}",
                projector.n_embed, decoder.hidden_size
            )));
        }
        let config = Config { decoder, sam, tower, projector };
        config.check_ceilings()?;
        Ok(config)
    }
}

fn clip_config(vision: &RawVision, overrides: &RawOverrides, sam: &SamConfig) -> Result<ClipConfig> {
    let clip_raw: RawClip = vision_entry(vision, CLIP_KEY)?;
    let clip = ClipConfig {
        width: clip_raw.width,
        layers: clip_raw.layers,
        heads: clip_raw.heads,
        ffn_hidden_size: overrides.clip_ffn_hidden_size.unwrap_or(CLIP_FFN_HIDDEN_SIZE),
        patch_size: clip_raw.patch_size.unwrap_or(14),
        image_size: clip_raw.image_size.unwrap_or(224),
        layer_norm_eps: CLIP_LAYER_NORM_EPS,
    };
    if clip.heads == 0 || clip.width % clip.heads != 0 {
        return Err(bad(format!("CLIP width {} is not divisible by heads {}", clip.width, clip.heads)));
    }
    if clip.patch_size == 0 || clip.image_size % clip.patch_size != 0 {
        return Err(bad("CLIP image_size must be a multiple of patch_size"));
    }
    // CLIP takes the compressor's output as its patch embeddings.
    if clip.width != sam.downsample_channels[1] {
        return Err(bad(format!(
            "CLIP width {} must equal SAM's last downsample channel count {}",
            clip.width, sam.downsample_channels[1]
        )));
    }
    Ok(clip)
}

fn vision_entry<T: serde::de::DeserializeOwned>(vision: &RawVision, key: &str) -> Result<T> {
    let value = vision
        .width
        .get(key)
        .ok_or_else(|| bad(format!("vision_config.width has no {key:?} entry")))?;
    serde_json::from_value(value.clone()).map_err(|e| bad(format!("vision_config.width.{key}: {e}")))
}
