//! Text: the DeepSeek tokenizer and the reference's prompts.

pub mod prompt;
pub mod tokenizer;

pub use prompt::{Task, prompt_ids};
pub use tokenizer::Tokenizer;
