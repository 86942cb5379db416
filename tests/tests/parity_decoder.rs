//! Decoder and generation parity with the official code (CPU backend, f32): prompt logits, KV-cached
//! incremental logits against full recomputation, and the reference's 16 greedy tokens for both tiny
//! checkpoints in every mode (full pipeline: our encoder's image sequence into our decoder).

use std::ops::ControlFlow;

use burn::tensor::Device;
use dsocr::Config;
use dsocr::generate::{FinishReason, GenerationOptions, RepeatGuard, Sampling, generate};
use dsocr::model::{Decoder, KvCache, VisionEncoder};
use dsocr::weights::{Checkpoint, Loader};
use dsocr_tests::{Array, Case, CaseIndex, Tolerance, assert_close, checkpoint_dir, load_views, read_fixture, to_array, to_tensor};

const IMAGE_TOKEN: u32 = 128815;
const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

struct Model {
    encoder: VisionEncoder,
    decoder: Decoder,
    device: Device,
}

fn load(checkpoint: &str) -> Model {
    let device = Device::flex();
    let dir = checkpoint_dir(checkpoint);
    let config = Config::from_json(std::str::from_utf8(&read_fixture(&dir.join("config.json"))).unwrap()).unwrap();
    let bytes = read_fixture(&dir.join("model.safetensors"));
    let weights = Checkpoint::parse(&bytes).unwrap();
    let loader = Loader::new(&weights, &device);
    Model {
        encoder: VisionEncoder::load(&config, &loader).unwrap(),
        decoder: Decoder::load(&config.decoder, &loader).unwrap(),
        device,
    }
}

fn prompt_ids(case: &Case, checkpoint: &str) -> Vec<u32> {
    case.fixture(checkpoint).i64("input_ids").into_iter().map(|t| t as u32).collect()
}

/// Logits at every prompt position (for the recorded columns) and at the last position (all columns),
/// with the reference's image sequence spliced in: the decoder alone.
fn logits_parity(checkpoint: &str, mode: &str) {
    let m = load(checkpoint);
    let index = CaseIndex::load(checkpoint);
    let case = index.cases.iter().find(|c| c.mode == mode && c.has_logits_columns).expect("a case with logits");
    let fixture = case.fixture(checkpoint);
    let ids = prompt_ids(case, checkpoint);
    let images = to_tensor::<2>(&fixture.f32("image_embeds"), &m.device);
    let embeds = m.decoder.embed_prompt(&ids, IMAGE_TOKEN, Some(images), &m.device).unwrap();
    let hidden = pollster::block_on(m.decoder.forward(embeds, &mut KvCache::default())).unwrap();
    let logits = to_array(m.decoder.logits(hidden));
    let [s, v] = [logits.shape[0], logits.shape[1]];
    assert_eq!(s, ids.len());
    let columns: Vec<usize> = index.logit_columns.iter().map(|&c| c as usize).collect();
    let picked = Array::new(
        vec![s, columns.len()],
        (0..s).flat_map(|r| columns.iter().map(|&c| logits.data[r * v + c]).collect::<Vec<_>>()).collect(),
    );
    let label = format!("{checkpoint} {} {mode}", case.image);
    let c = assert_close(&format!("{label} logits (all positions)"), &picked, &fixture.f32("logits_columns"), TOLERANCE);
    eprintln!("{label} logits_columns: {c}");
    let last = Array::new(vec![v], logits.data[(s - 1) * v..].to_vec());
    let c = assert_close(&format!("{label} last-position logits"), &last, &fixture.f32("last_logits"), TOLERANCE);
    eprintln!("{label} last_logits: {c}");
}

/// The full pipeline: our encoder → our decoder → greedy with the hub code's rule (no-repeat 20).
fn greedy_parity(checkpoint: &str, mode: &str) {
    let m = load(checkpoint);
    let index = CaseIndex::load(checkpoint);
    for case in index.cases.iter().filter(|c| c.mode == mode) {
        let label = format!("{checkpoint} {} {mode}", case.image);
        let views = load_views(&case.image, mode);
        let tiles = views.tiles.as_ref().map(|(p, g)| (to_tensor(p, &m.device), *g));
        let images = m.encoder.embed_image(to_tensor(&views.global, &m.device), tiles);
        let ids = prompt_ids(case, checkpoint);
        let embeds = m.decoder.embed_prompt(&ids, IMAGE_TOKEN, Some(images), &m.device).unwrap();
        let options = GenerationOptions {
            max_new_tokens: index.greedy_tokens,
            repeat_guard: RepeatGuard::hf(),
            sampling: Sampling::Greedy,
            ..GenerationOptions::default()
        };
        let mut streamed = Vec::new();
        let out = pollster::block_on(generate(&m.decoder, embeds, &ids, &options, |t| {
            streamed.push(t);
            ControlFlow::Continue(())
        }))
        .unwrap();
        assert_eq!(streamed, out.tokens, "{label}: streamed tokens");
        let mut ours = out.tokens.clone();
        if let FinishReason::Stop(t) = out.finish {
            ours.push(t); // the reference's output includes the EOS it stopped on
        }
        assert_eq!(ours, case.greedy_tokens, "{label}: greedy tokens (smallest reference gap {})", case.min_greedy_gap);
    }
}

macro_rules! decoder_tests {
    ($($logits:ident, $greedy:ident: $checkpoint:literal, $mode:literal;)*) => {$(
        #[test]
        fn $logits() {
            logits_parity($checkpoint, $mode);
        }
        #[test]
        fn $greedy() {
            greedy_parity($checkpoint, $mode);
        }
    )*};
}

decoder_tests! {
    parity_decoder_logits_tiny_a_tiny, parity_decoder_greedy_tiny_a_tiny: "tiny-a", "tiny";
    parity_decoder_logits_tiny_a_small, parity_decoder_greedy_tiny_a_small: "tiny-a", "small";
    parity_decoder_logits_tiny_a_base, parity_decoder_greedy_tiny_a_base: "tiny-a", "base";
    parity_decoder_logits_tiny_a_large, parity_decoder_greedy_tiny_a_large: "tiny-a", "large";
    parity_decoder_logits_tiny_a_gundam, parity_decoder_greedy_tiny_a_gundam: "tiny-a", "gundam";
    parity_decoder_logits_tiny_b_tiny, parity_decoder_greedy_tiny_b_tiny: "tiny-b", "tiny";
    parity_decoder_logits_tiny_b_small, parity_decoder_greedy_tiny_b_small: "tiny-b", "small";
    parity_decoder_logits_tiny_b_base, parity_decoder_greedy_tiny_b_base: "tiny-b", "base";
    parity_decoder_logits_tiny_b_large, parity_decoder_greedy_tiny_b_large: "tiny-b", "large";
    parity_decoder_logits_tiny_b_gundam, parity_decoder_greedy_tiny_b_gundam: "tiny-b", "gundam";
}

/// Prefill + one token at a time through the KV cache gives the logits of one full pass.
fn incremental_equals_full(checkpoint: &str) {
    let m = load(checkpoint);
    let case = CaseIndex::load(checkpoint).cases.into_iter().find(|c| c.image == "note" && c.mode == "tiny").unwrap();
    let fixture = case.fixture(checkpoint);
    let mut ids = prompt_ids(&case, checkpoint);
    let prompt_len = ids.len();
    ids.extend(case.greedy_tokens.iter().take(8));
    let images = || Some(to_tensor::<2>(&fixture.f32("image_embeds"), &m.device));

    let full = m.decoder.embed_prompt(&ids, IMAGE_TOKEN, images(), &m.device).unwrap();
    let hidden = pollster::block_on(m.decoder.forward(full, &mut KvCache::default())).unwrap();
    let full_logits = to_array(m.decoder.logits(hidden));
    let v = full_logits.shape[1];

    let mut cache = KvCache::default();
    let prompt = m.decoder.embed_prompt(&ids[..prompt_len], IMAGE_TOKEN, images(), &m.device).unwrap();
    pollster::block_on(m.decoder.forward(prompt, &mut cache)).unwrap();
    // A two-token chunk exercises the masked (non-square) causal path, then single tokens.
    let mut pos = prompt_len;
    for step in [2, 1, 1, 1, 1, 1, 1] {
        let x = m.decoder.embed(&ids[pos..pos + step], &m.device).unwrap();
        let hidden = pollster::block_on(m.decoder.forward(x, &mut cache)).unwrap();
        let ours = to_array(m.decoder.logits(hidden));
        let reference = Array::new(vec![step, v], full_logits.data[pos * v..(pos + step) * v].to_vec());
        assert_close(&format!("{checkpoint} cached logits at {pos}"), &ours, &reference, TOLERANCE);
        pos += step;
    }
    assert_eq!(cache.len(), ids.len());
}

#[test]
fn parity_decoder_kv_cache_equals_full_recomputation_tiny_a() {
    incremental_equals_full("tiny-a");
}

#[test]
fn parity_decoder_kv_cache_equals_full_recomputation_tiny_b() {
    incremental_equals_full("tiny-b");
}
