//! Model output → what users want: the text, cleaned markdown, and layout blocks with pixel boxes.

pub mod grounding;
pub mod result;

pub use grounding::{Block, GroundingMatch, clean_markdown, parse_grounding, strip_eos};
pub use result::{OcrResult, Timings};
