//! `dsocr`: DeepSeek-OCR from the command line (feature `cli`, native only): `dsocr ocr` recognises
//! images and PDFs, `dsocr quantize` writes a quantized sharded checkpoint, `dsocr serve` (feature
//! `serve`) answers HTTP requests.
//!
//! Exit codes: 0 every input recognised; 1 some inputs failed (each reported, the batch went on);
//! 2 bad arguments, the model could not be loaded, or the GPU failed (device lost, out of memory:
//! the batch stops there).

mod gpu;
pub(crate) mod model;
pub(crate) mod ocr;
pub(crate) mod pdf;
mod progress;
mod quantize;

use std::process::ExitCode;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(name = "dsocr", version, about = "DeepSeek-OCR on burn: OCR of images, natively")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Recognise images (files or directories, searched recursively in name order).
    Ocr(ocr::OcrArgs),
    /// Write a quantized copy of a float checkpoint (sharded safetensors, int4/int8 weights).
    Quantize(quantize::QuantizeArgs),
    /// Serve OCR over HTTP: REST and OpenAI-compatible endpoints, streaming, auth, limits, metrics.
    #[cfg(feature = "serve")]
    Serve(crate::serve::ServeArgs),
}

/// The `dsocr` binary.
pub fn main() -> ExitCode {
    crate::engine::tune_allocator();
    let outcome = match Cli::parse().command {
        Command::Ocr(args) => ocr::run(&args),
        Command::Quantize(args) => quantize::run(&args).map(|()| true),
        #[cfg(feature = "serve")]
        Command::Serve(args) => crate::serve::run(args).map(|()| true),
    };
    match outcome {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(message) => {
            eprintln!("dsocr: {message}");
            ExitCode::from(2)
        }
    }
}
