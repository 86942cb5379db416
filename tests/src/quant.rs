//! Quantized against float on the same checkpoint and page: encoder output error, first-step logit
//! error and greedy-token agreement (used by `tests/quantized.rs` and the `quant_report` binary).

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use dsocr::generate::{GenerationOptions, RepeatGuard, generate};
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views_for, normalize};
use dsocr::model::layout::image_tokens;
use dsocr::model::read_f32;
use dsocr::quant::convert::convert_dir;
use dsocr::quant::{Preset, Recipe};
use dsocr::text::{Task, prompt_ids};
use dsocr::{Engine, EngineOptions, Mode};

/// What one model computes for one page.
#[derive(Debug, Clone, PartialEq)]
pub struct PageRun {
    /// The image embedding sequence `(N, hidden)` (encoder + projector + layout).
    pub image: Vec<f32>,
    /// Logits of the last prompt position.
    pub logits: Vec<f32>,
    /// Greedy tokens (hf no-repeat rule), EOS included when it stops.
    pub tokens: Vec<u32>,
}

/// Small shards, so the tiny checkpoints span several and the embedding is split into row slices.
pub const SHARD_BYTES: usize = 1 << 20;

/// A fresh scratch folder under the temporary directory (removed first if it exists).
pub fn scratch(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsocr-quantized-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Fixture checkpoint `checkpoint` converted by `preset` (and `group`) into scratch folder `name`.
pub fn convert(checkpoint: &str, preset: Preset, group: Option<usize>, name: &str) -> PathBuf {
    let out = scratch(name);
    let recipe = Recipe::preset(preset, group).unwrap();
    convert_dir(&crate::checkpoint_dir(checkpoint), &out, &recipe, SHARD_BYTES, &mut |_, _| {}).unwrap();
    out
}

/// The bundled sample page (PNG bytes).
pub fn page() -> Vec<u8> {
    crate::read_fixture(&crate::fixtures_dir().join("images/page.png"))
}

/// Loads checkpoint folder `dir` on the CPU (2 threads, like the parity tests), quantized at load
/// time by `quantize` if given.
pub fn load(dir: &Path, quantize: Option<Recipe>, threads: usize) -> Engine {
    let options = EngineOptions { quantize, threads, ..EngineOptions::default() };
    pollster::block_on(Engine::load_dir(dir, &Device::flex(), options, None)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// Encoder output, first-step logits and `tokens` greedy tokens for `image` (bytes) in `mode`.
pub fn run_page(engine: &Engine, image: &[u8], mode: Mode, tokens: usize) -> PageRun {
    let device = engine.device().clone();
    let page = decode(image, &DecodeLimits::default()).unwrap();
    let version = engine.config().version();
    let geometry = mode.geometry(version).unwrap();
    let views = make_views_for(&page, &geometry, &PreprocessOptions::default()).unwrap();
    let pixels = |v: &[&image::RgbImage]| {
        let (values, shape) = normalize(v, true);
        Tensor::<4>::from_data(TensorData::new(values, shape), &device)
    };
    let count = image_tokens(version, &geometry, views.grid);
    let ids = prompt_ids(engine.tokenizer(), &Task::Markdown.prompt(), &[count]).unwrap();
    let tiles = (!views.tiles.is_empty()).then(|| (pixels(&views.tiles.iter().collect::<Vec<_>>()), views.grid));
    let images = engine.encoder().embed_image(pixels(&[&views.global]), tiles).unwrap();
    let image_values = pollster::block_on(read_f32(images.clone())).unwrap();
    let decoder = engine.decoder();
    let embeds = decoder.embed_prompt(&ids, 128815, Some(images), &device).unwrap();
    let mut cache = Default::default();
    let hidden = pollster::block_on(decoder.forward(embeds.clone(), &mut cache)).unwrap();
    let [s, d] = hidden.dims();
    let logits = pollster::block_on(read_f32(decoder.logits(hidden.slice([s - 1..s, 0..d])))).unwrap();
    let options = GenerationOptions { max_new_tokens: tokens, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
    let out = pollster::block_on(generate(decoder, embeds, &ids, &options, |_| ControlFlow::Continue(()))).unwrap();
    let mut generated = out.tokens.clone();
    if let dsocr::generate::FinishReason::Stop(t) = out.finish {
        generated.push(t);
    }
    PageRun { image: image_values, logits, tokens: generated }
}

/// How far a quantized run is from the float run.
#[derive(Debug, Clone, Copy)]
pub struct Gap {
    /// max |Δ| / max |float| of the encoder output.
    pub encoder_max: f32,
    /// max |Δ| / max |float| and mean |Δ| / mean |float| of the first-step logits.
    pub logits_max: f32,
    pub logits_mean: f32,
    /// Greedy tokens equal before the first difference, and the float run's length.
    pub agree: usize,
    pub of: usize,
    /// Whether the first-step argmax is the same.
    pub same_first: bool,
}

pub fn gap(float: &PageRun, quant: &PageRun) -> Gap {
    let rel_max = |a: &[f32], b: &[f32]| {
        let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
        diff / a.iter().fold(0f32, |m, x| m.max(x.abs())).max(1e-30)
    };
    let mean = |v: &mut dyn Iterator<Item = f32>, n: usize| v.sum::<f32>() / n.max(1) as f32;
    let n = float.logits.len();
    let logits_mean = mean(&mut float.logits.iter().zip(&quant.logits).map(|(x, y)| (x - y).abs()), n)
        / mean(&mut float.logits.iter().map(|x| x.abs()), n).max(1e-30);
    let agree = float.tokens.iter().zip(&quant.tokens).take_while(|(a, b)| a == b).count();
    let argmax = |v: &[f32]| v.iter().enumerate().fold((0, f32::MIN), |best, (i, &x)| if x > best.1 { (i, x) } else { best }).0;
    Gap {
        encoder_max: rel_max(&float.image, &quant.image),
        logits_max: rel_max(&float.logits, &quant.logits),
        logits_mean,
        agree,
        of: float.tokens.len(),
        same_first: argmax(&float.logits) == argmax(&quant.logits),
    }
}

impl std::fmt::Display for Gap {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "encoder max {:.2e}, logits max {:.2e} mean {:.2e}, greedy {}/{} tokens agree, first argmax {}",
            self.encoder_max,
            self.logits_max,
            self.logits_mean,
            self.agree,
            self.of,
            if self.same_first { "same" } else { "differs" }
        )
    }
}
