//! One typed error for everything a user can get wrong (bad files, bad inputs). No panics on user input.

use thiserror::Error;

#[derive(Debug, Error)]
pub enum Error {
    /// Downloading the checkpoint failed (network, HTTP status, corrupted data).
    #[error("download failed: {0}")]
    Download(String),
    /// A file could not be read (native loading).
    #[error("{0}")]
    Io(String),
    /// `config.json` is not valid JSON or lacks/contradicts a required value.
    #[error("invalid config.json: {0}")]
    Config(String),
    /// The checkpoint model uses a feature this port does not implement (e.g. MLA attention).
    #[error("unsupported checkpoint: {0}")]
    Unsupported(String),
    /// A caller passed a value outside what the API accepts (unknown mode name, …).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The safetensors container itself is malformed (bad header, truncated data).
    #[error("invalid safetensors data: {0}")]
    Safetensors(String),
    /// A file of a sharded checkpoint is missing, truncated, corrupt or disagrees with the index.
    #[error("{file}: {message}")]
    Shard { file: String, message: String },
    /// An error about a tensor, with the checkpoint file that holds it.
    #[error("{file}: {source}")]
    InFile { file: String, source: Box<Error> },
    #[error("tensor `{name}` is missing from the checkpoint")]
    MissingTensor { name: String },
    #[error("tensor `{name}` has shape {found:?}, expected {expected:?}")]
    ShapeMismatch { name: String, expected: Vec<usize>, found: Vec<usize> },
    #[error("tensor `{name}` has dtype {dtype}, expected a floating-point dtype (f32, f16 or bf16)")]
    UnsupportedDtype { name: String, dtype: String },
    /// The input is not an image in a supported format (PNG, JPEG, WebP, GIF, BMP, TIFF).
    #[error("unsupported image: {0}")]
    ImageFormat(String),
    /// The image is malformed or truncated.
    #[error("cannot decode image: {0}")]
    ImageDecode(String),
    /// The image has more pixels than allowed (decompression-bomb guard).
    #[error("image is {width}×{height}, more than the limit of {max_pixels} pixels")]
    ImageTooLarge { width: u32, height: u32, max_pixels: u64 },
    /// The encoded input (image file, request body) is larger than allowed.
    #[error("the input is {bytes} bytes, more than the limit of {max_bytes}")]
    InputTooLarge { bytes: u64, max_bytes: u64 },
    /// `tokenizer.json` is invalid, or encoding/decoding failed.
    #[error("tokenizer: {0}")]
    Tokenizer(String),
    /// The compute backend failed (device lost, readback error) or returned something impossible.
    #[error("backend error: {0}")]
    Backend(String),
    /// The GPU reported a fault of its own (out of memory when a buffer was made, an invalid
    /// operation): what was computed since is not trusted, and neither is the device.
    #[error("{}: {message}", if *out_of_memory { "the GPU ran out of memory" } else { "the GPU reported an error" })]
    Gpu { out_of_memory: bool, message: String },
    /// The number of `<image>` placeholders in the prompt differs from the image vectors supplied.
    #[error("the prompt has {placeholders} <image> placeholders but the images give {vectors} vectors")]
    ImageTokenMismatch { placeholders: usize, vectors: usize },
    /// A token id outside the model's vocabulary.
    #[error("token id {id} is outside the vocabulary (size {vocab_size})")]
    TokenOutOfRange { id: u32, vocab_size: usize },
    /// The sequence would exceed the context the model or the caller allows.
    #[error("sequence of {length} tokens exceeds the context limit of {limit}")]
    ContextOverflow { length: usize, limit: usize },
}

impl Error {
    /// `error`, naming the checkpoint file it concerns (kept as is when the name is empty: a
    /// single-file checkpoint opened from memory has none).
    pub fn in_file(file: &str, error: Error) -> Error {
        if file.is_empty() { error } else { Error::InFile { file: file.into(), source: Box::new(error) } }
    }
}

pub type Result<T> = std::result::Result<T, Error>;
