//! dsocr — DeepSeek-OCR on burn, one crate for the browser (WebGPU) and native (CPU / wgpu).
//!
//! The pipeline, in the order data flows through it:
//! image → preprocess → tokens/prompt → encoder → decoder/generate → text → grounding blocks.
//! Weights come from the original hub checkpoint (`config.json` + safetensors) unchanged.
//!
//! This crate compiles for `wasm32-unknown-unknown`: shared code does no file I/O, spawns no
//! threads and never blocks on GPU readback; file access lives at the edges (tests, CLI).

#[cfg(all(feature = "cli", not(target_arch = "wasm32")))]
pub mod cli;
pub mod config;
pub mod engine;
pub mod error;
pub mod generate;
pub mod gpu;
#[cfg(all(feature = "hub", not(target_arch = "wasm32")))]
pub mod hub;
pub mod image;
pub mod model;
pub mod output;
pub mod quant;
#[cfg(all(feature = "serve", not(target_arch = "wasm32")))]
pub mod serve;
pub mod text;
#[cfg(all(target_arch = "wasm32", feature = "webgpu"))]
pub mod web;
pub mod weights;

pub use config::{Config, Mode};
pub use engine::{Engine, EngineOptions, PageBatch, TokenEvent};
#[cfg(all(feature = "hub", not(target_arch = "wasm32")))]
pub use engine::LoadOptions;
pub use generate::{GenerationOptions, RepeatGuard, Sampling};
pub use output::OcrResult;
pub use text::Task;
pub use error::{Error, Result};
