//! The result of one recognition, serialisable as JSON (schema in README.md).

use serde::Serialize;

use super::grounding::Block;

/// Milliseconds spent in each stage.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Timings {
    pub preprocess: f64,
    pub encode: f64,
    pub prefill: f64,
    pub decode: f64,
    pub total: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct OcrResult {
    /// The model that read it: `deepseek-ocr` or `deepseek-ocr-2` (from the checkpoint's config).
    pub model: String,
    /// The decoded output with special tokens kept, the trailing EOS removed, trimmed.
    pub text: String,
    /// `text` cleaned as the reference's `result.mmd` (grounding tags removed, images as links).
    pub markdown: String,
    /// Layout elements with boxes in pixels of the original image (empty without grounding).
    pub blocks: Vec<Block>,
    /// Generated token ids (without the stop token).
    pub token_ids: Vec<u32>,
    /// Number of `<image>` placeholders (image vectors) in the prompt.
    pub image_token_count: usize,
    /// Prompt length in tokens (BOS, placeholders, text).
    pub prompt_token_count: usize,
    /// `stop` (EOS), `max_new_tokens`, `context_limit` or `cancelled`.
    pub finish_reason: String,
    /// True when generation did not end with EOS: the text may be cut or looping (spec §9.3).
    pub ended_without_eos: bool,
    /// Width and height of the input image after EXIF orientation.
    pub image_size: [u32; 2],
    /// Tiles across and down (`[1, 1]` when not tiled).
    pub tile_grid: [usize; 2],
    pub timings_ms: Timings,
}
