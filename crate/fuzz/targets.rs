//! The bodies of the fuzz targets, shared by `fuzz_targets/*.rs` (libFuzzer) and the stable test that
//! replays the committed corpus (`tests/tests/fuzz_corpus.rs`). Each takes arbitrary bytes and must
//! return (a value or a typed error) without panicking, hanging or allocating without bound.

use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views};
use dsocr::output::{clean_markdown, parse_grounding, strip_eos};
use dsocr::quant::Recipe;
use dsocr::text::{Task, Tokenizer, prompt_ids};
use dsocr::weights::{Checkpoint, ShardIndex, expected_tensors};
use dsocr::{Config, Mode};

/// The targets by name (the corpus folders' names).
pub const TARGETS: [(&str, fn(&[u8])); 5] =
    [("image", image), ("grounding", grounding), ("config", config), ("checkpoint", checkpoint), ("prompt", prompt)];

/// Image bytes → decoded RGB → the views of one mode, chosen by the input's length so that the
/// corpus covers every mode (limits lowered so that a declared size cannot exhaust the fuzzer's
/// memory; the defaults are the same code with larger numbers).
pub fn image(data: &[u8]) {
    let limits = DecodeLimits { max_bytes: 64 << 20, max_pixels: 4_000_000, max_alloc: 256 << 20 };
    let Ok(image) = decode(data, &limits) else { return };
    let _ = make_views(&image, Mode::ALL[data.len() % Mode::ALL.len()], &PreprocessOptions::default());
}

/// Model output text → grounding blocks (with an image size from the first bytes) and markdown.
pub fn grounding(data: &[u8]) {
    let (size, text) = data.split_at(data.len().min(4));
    let w = u32::from(*size.first().unwrap_or(&1)) * 16 + u32::from(*size.get(1).unwrap_or(&0));
    let h = u32::from(*size.get(2).unwrap_or(&1)) * 16 + u32::from(*size.get(3).unwrap_or(&0));
    let text = String::from_utf8_lossy(text);
    let text = strip_eos(&text);
    let _ = parse_grounding(text, [w, h]);
    let _ = clean_markdown(text);
}

/// `config.json` text → typed configs, the tensor list they imply, and `quantization_config`.
pub fn config(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else { return };
    if let Ok(config) = Config::from_json(text) {
        // What loading does first: the configs' ceilings keep this list small.
        let _ = expected_tensors(&config);
    }
    let _ = Recipe::from_config_json(text);
    let _ = ShardIndex::parse(text);
}

/// A safetensors file (single-file checkpoint) → header, tensors, and the check against the tiny
/// test model's expected names and shapes.
pub fn checkpoint(data: &[u8]) {
    static EXPECTED: std::sync::OnceLock<Vec<dsocr::weights::TensorSpec>> = std::sync::OnceLock::new();
    let expected = EXPECTED.get_or_init(|| {
        let config = Config::from_json(include_str!("../../tests/fixtures/tiny-a/config.json")).expect("tiny-a's config");
        expected_tensors(&config)
    });
    let Ok(checkpoint) = Checkpoint::parse(data) else { return };
    for name in checkpoint.names() {
        let _ = (checkpoint.shape(&name), checkpoint.dtype(&name), checkpoint.element_bytes(&name));
    }
    let _ = checkpoint.check(expected, None);
}

/// Prompt text (a `locate=` target or a raw prompt, chosen by the first byte) → prompt ids with
/// the real tokenizer, for a placeholder count from the second byte.
pub fn prompt(data: &[u8]) {
    static TOKENIZER: std::sync::OnceLock<Tokenizer> = std::sync::OnceLock::new();
    let tokenizer = TOKENIZER.get_or_init(|| Tokenizer::from_json(include_bytes!("../../tests/fixtures/tiny-a/tokenizer.json")).expect("tokenizer"));
    let Some((&kind, rest)) = data.split_first() else { return };
    let Some((&count, text)) = rest.split_first() else { return };
    let text = String::from_utf8_lossy(text).into_owned();
    let task = if kind % 2 == 0 { Task::Locate(text) } else { Task::Raw(text) };
    let placeholders = usize::from(count) * 4;
    let images = task.prompt().matches("<image>").count();
    let _ = prompt_ids(tokenizer, &task.prompt(), &vec![placeholders; images]);
}
