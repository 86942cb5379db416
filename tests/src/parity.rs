//! The parity checks against the reference fixtures, written once and run on any device: the CPU
//! (`parity_encoder`, `parity_decoder`) and the native GPU through wgpu (`parity_wgpu*`).

use std::ops::ControlFlow;

use burn::tensor::Device;
use dsocr::Config;
use dsocr::generate::{FinishReason, GenerationOptions, RepeatGuard, Sampling, generate};
use dsocr::model::{Decoder, KvCache, ViewFeatures, VisionEncoder};
use dsocr::weights::{Checkpoint, Loader};

use crate::{Array, Case, CaseIndex, Fixture, Tolerance, assert_close, checkpoint_dir, read_fixture, to_array, to_tensor, views_for};

pub const IMAGE_TOKEN: u32 = 128815;

/// A tiny checkpoint's encoder and decoder on one device.
pub struct Model {
    pub encoder: VisionEncoder,
    pub decoder: Decoder,
    pub device: Device,
}

/// Loads a tiny checkpoint with the CPU's settings; `max_tensor_bytes` caps one weight as a device's
/// binding limit would. One-row products are split in two (`model::ops::linear_par`) whatever the
/// machine's core count, so that path is always what the CPU tests check.
pub fn load_model(checkpoint: &str, device: &Device, max_tensor_bytes: usize) -> Model {
    load_model_with(checkpoint, device, max_tensor_bytes, false, 2)
}

/// [`load_model`], with the routed experts stacked (decoding picks them on the device) if
/// `stacked_experts`, and one-row products split over `threads` (a GPU's setting is 1).
pub fn load_model_with(checkpoint: &str, device: &Device, max_tensor_bytes: usize, stacked_experts: bool, threads: usize) -> Model {
    let dir = checkpoint_dir(checkpoint);
    let config = Config::from_json(std::str::from_utf8(&read_fixture(&dir.join("config.json"))).unwrap()).unwrap();
    let bytes = read_fixture(&dir.join("model.safetensors"));
    let weights = Checkpoint::parse(&bytes).unwrap();
    // The crate's GPU kernels where the device runs them (as the engine loads on a GPU).
    let loader = Loader::new(&weights, device).with_max_tensor_bytes(max_tensor_bytes).with_stacked_experts(stacked_experts)
        .with_threads(threads).with_device_kernels(true);
    Model {
        encoder: pollster::block_on(VisionEncoder::load(&config, &loader)).unwrap(),
        decoder: pollster::block_on(Decoder::load(&config.decoder, &loader)).unwrap(),
        device: device.clone(),
    }
}

fn check_stages(label: &str, view: &str, ours: &ViewFeatures, fixture: &Fixture, tolerance: Tolerance) {
    // The stage after SAM: CLIP (v1) or the query encoder (v2, recorded as `queries`).
    let tower = if fixture.contains(&format!("{view}.queries")) { "queries" } else { "clip" };
    let stages: [(&str, Array); 5] = [
        ("sam", to_array(ours.sam.neck.clone())),
        ("compressor_1", to_array(ours.sam.compressor_1.clone())),
        ("compressor", to_array(ours.sam.compressed.clone())),
        (tower, to_array(ours.tower.clone())),
        ("projector", to_array(ours.projected.clone())),
    ];
    for (stage, actual) in stages {
        let name = format!("{view}.{stage}");
        let c = assert_close(&format!("{label} {name}"), &actual, &fixture.f32(&name), tolerance);
        eprintln!("{label} {name}: {c}");
    }
}

/// Every encoder stage of every recorded image in `mode`, and the assembled image sequence.
pub fn encoder_parity(m: &Model, checkpoint: &str, mode: &str, tolerance: Tolerance) {
    let index = CaseIndex::load(checkpoint);
    let cases: Vec<_> = index.cases.iter().filter(|c| c.mode == mode).collect();
    assert!(cases.len() >= 3, "three images per mode (DeepSeek-OCR-2's Gundam: two more, with 2 and 4 tiles)");
    for case in cases {
        let label = format!("{checkpoint} {} {mode}", case.image);
        let fixture = case.fixture(checkpoint);
        let views = views_for(checkpoint, &case.image, mode);
        let global = m.encoder.encode_views(to_tensor(&views.global, &m.device)).unwrap();
        check_stages(&label, "global", &global, &fixture, tolerance);
        let local = views.tiles.as_ref().map(|(pixels, grid)| {
            let features = m.encoder.encode_views(to_tensor(pixels, &m.device)).unwrap();
            check_stages(&label, "local", &features, &fixture, tolerance);
            (features.projected, *grid)
        });
        assert_eq!(local.is_some(), fixture.contains("local.sam"), "{label}: tiling differs from the reference");
        let sequence = to_array(m.encoder.assemble(global.projected, local));
        assert_eq!(sequence.shape[0], case.image_tokens, "{label}: one vector per <image> placeholder");
        assert_close(&format!("{label} image_embeds"), &sequence, &fixture.f32("image_embeds"), tolerance);
    }
}

fn prompt_ids(case: &Case, checkpoint: &str) -> Vec<u32> {
    case.fixture(checkpoint).i64("input_ids").into_iter().map(|t| t as u32).collect()
}

/// Logits at every prompt position (for the recorded columns) and at the last position (all columns),
/// with the reference's image sequence spliced in: the decoder alone.
pub fn logits_parity(m: &Model, checkpoint: &str, mode: &str, tolerance: Tolerance) {
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
    let c = assert_close(&format!("{label} logits (all positions)"), &picked, &fixture.f32("logits_columns"), tolerance);
    eprintln!("{label} logits_columns: {c}");
    let last = Array::new(vec![v], logits.data[(s - 1) * v..].to_vec());
    let c = assert_close(&format!("{label} last-position logits"), &last, &fixture.f32("last_logits"), tolerance);
    eprintln!("{label} last_logits: {c}");
}

/// The full pipeline: our encoder → our decoder → greedy with the hub code's rule (no-repeat 20),
/// for every recorded image in `mode` (or just `only_image`).
pub fn greedy_parity(m: &Model, checkpoint: &str, mode: &str, only_image: Option<&str>) {
    let index = CaseIndex::load(checkpoint);
    for case in index.cases.iter().filter(|c| c.mode == mode && only_image.is_none_or(|i| c.image == i)) {
        let label = format!("{checkpoint} {} {mode}", case.image);
        let views = views_for(checkpoint, &case.image, mode);
        let tiles = views.tiles.as_ref().map(|(p, g)| (to_tensor(p, &m.device), *g));
        let images = m.encoder.embed_image(to_tensor(&views.global, &m.device), tiles).unwrap();
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

/// Prefill + one token at a time through the KV cache gives the logits of one full pass.
pub fn incremental_equals_full(m: &Model, checkpoint: &str, tolerance: Tolerance) {
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
        assert_close(&format!("{checkpoint} cached logits at {pos}"), &ours, &reference, tolerance);
        pos += step;
    }
    assert_eq!(cache.len(), ids.len());
}
