//! What to ask the model, as the reference asks it (spec §8.2–8.4): the official prompt strings, the
//! `plain` conversation template (just the stripped text), and the ids with the image placeholders.

use super::Tokenizer;
use crate::error::{Error, Result};

/// The image placeholder in prompt text, and its id.
pub const IMAGE_TOKEN: &str = "<image>";
pub const IMAGE_TOKEN_ID: u32 = 128815;
/// `<｜begin▁of▁sentence｜>`: exactly one starts every prompt.
pub const BOS_ID: u32 = 0;
/// `<｜end▁of▁sentence｜>`.
pub const EOS_ID: u32 = 1;

/// The official tasks (model card and repository README).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Task {
    /// Document → markdown with layout boxes: `<|grounding|>Convert the document to markdown.`
    Markdown,
    /// Plain OCR without layout: `Free OCR.`
    FreeOcr,
    /// OCR with boxes for other images: `<|grounding|>OCR this image.`
    Ocr,
    /// Charts, geometry and other figures in documents: `Parse the figure.`
    ParseFigure,
    /// General description: `Describe this image in detail.`
    Describe,
    /// Find a text in the image: `Locate <|ref|>TEXT<|/ref|> in the image.`
    Locate(String),
    /// A prompt of your own; include `<image>` where the image goes.
    Raw(String),
}

impl Task {
    /// The prompt text (before the template strips it).
    pub fn prompt(&self) -> String {
        match self {
            Task::Markdown => "<image>\n<|grounding|>Convert the document to markdown.".into(),
            Task::FreeOcr => "<image>\nFree OCR.".into(),
            Task::Ocr => "<image>\n<|grounding|>OCR this image.".into(),
            Task::ParseFigure => "<image>\nParse the figure.".into(),
            Task::Describe => "<image>\nDescribe this image in detail.".into(),
            Task::Locate(text) => format!("<image>\nLocate <|ref|>{text}<|/ref|> in the image."),
            Task::Raw(prompt) => prompt.clone(),
        }
    }

    /// Whether the output carries `<|ref|>…<|det|>` grounding blocks.
    pub fn grounded(&self) -> bool {
        matches!(self, Task::Markdown | Task::Ocr | Task::Locate(_)) || matches!(self, Task::Raw(p) if p.contains("<|grounding|>"))
    }
}

/// `[BOS] + encode(piece₀) + [<image>]×n₀ + encode(piece₁) + …` for the prompt text split on `<image>`,
/// with `image_tokens[i]` placeholders for the i-th image (the `plain` template strips the text first).
pub fn prompt_ids(tokenizer: &Tokenizer, prompt: &str, image_tokens: &[usize]) -> Result<Vec<u32>> {
    let text = prompt.trim();
    let pieces: Vec<&str> = text.split(IMAGE_TOKEN).collect();
    if pieces.len() - 1 != image_tokens.len() {
        return Err(Error::InvalidArgument(format!(
            "the prompt has {} <image> tags but {} images were given",
            pieces.len() - 1,
            image_tokens.len()
        )));
    }
    let mut ids = vec![BOS_ID];
    for (i, piece) in pieces.iter().enumerate() {
        if !piece.is_empty() {
            ids.extend(tokenizer.encode(piece)?);
        }
        if let Some(&n) = image_tokens.get(i) {
            ids.extend(std::iter::repeat_n(IMAGE_TOKEN_ID, n));
        }
    }
    Ok(ids)
}
