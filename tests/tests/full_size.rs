//! Full-size checks (ignored by default: they need a 6.7 GB checkpoint and ~16 GB of RAM).
//!
//! ```sh
//! python tests/reference/generate.py --ref-code CODE --full /work/full-ckpt
//! python tests/reference/generate.py --ref-code CODE --full-reference /work/full-ckpt   # reference.safetensors
//! DSOCR_FULL_CHECKPOINT=/work/full-ckpt cargo test --release -p dsocr-tests --test full_size -- --ignored --nocapture
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;

use burn::tensor::Device;
use dsocr::generate::{GenerationOptions, RepeatGuard, generate};
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views, normalize};
use dsocr::model::{Decoder, KvCache, VisionEncoder};
use dsocr::weights::{Checkpoint, Loader, expected_tensors};
use dsocr::{Config, Mode};
use dsocr_tests::{Array, Fixture, Tolerance, assert_close, fixtures_dir, read_fixture, to_array};

fn checkpoint_dir() -> PathBuf {
    PathBuf::from(std::env::var("DSOCR_FULL_CHECKPOINT").unwrap_or_else(|_| "/work/full-ckpt".into()))
}

#[test]
#[ignore = "needs the full-size random checkpoint (see the module docs)"]
fn full_size_checkpoint_matches_the_reference_at_tiny_and_small() {
    let dir = checkpoint_dir();
    let config = Config::from_json(std::str::from_utf8(&read_fixture(&dir.join("config.json"))).unwrap()).unwrap();
    let file = std::fs::File::open(dir.join("model-00001-of-000001.safetensors")).unwrap();
    let bytes = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let weights = Checkpoint::parse(&bytes).unwrap();
    let unknown = weights.check(&expected_tensors(&config), None).unwrap();
    assert!(unknown.is_empty(), "{unknown:?}");
    assert_eq!(weights.names().len(), 2710);

    let device = Device::flex();
    // The CPU settings the engine uses by default (threads split products, experts and SAM rows).
    let loader = Loader::new(&weights, &device).with_threads(dsocr::engine::cpu_threads());
    let encoder = pollster::block_on(VisionEncoder::load(&config, &loader)).unwrap();
    let decoder = pollster::block_on(Decoder::load(&config.decoder, &loader)).unwrap();
    let reference = Fixture::open(dir.join("reference.safetensors"));
    let page = decode(&read_fixture(&fixtures_dir().join("images/page.png")), &DecodeLimits::default()).unwrap();
    let tolerance = Tolerance::RelativeToMax(1e-4);
    for (name, mode) in [("tiny", Mode::Tiny), ("small", Mode::Small)] {
        let views = make_views(&page, mode, &PreprocessOptions::default()).unwrap();
        let (values, shape) = normalize(&[&views.global], true);
        let pixels = burn::tensor::Tensor::from_data(burn::tensor::TensorData::new(values, shape), &device);
        let features = encoder.encode_views(pixels).unwrap();
        let stages: [(&str, Array); 4] = [
            ("global.sam", to_array(features.sam.neck.clone())),
            ("global.compressor", to_array(features.sam.compressed.clone())),
            ("global.clip", to_array(features.tower.clone())),
            ("global.projector", to_array(features.projected.clone())),
        ];
        for (stage, ours) in stages {
            let c = assert_close(&format!("{name} {stage}"), &ours, &reference.f32(&format!("{name}.{stage}")), tolerance);
            eprintln!("full {name} {stage}: {c}");
        }
        let images = encoder.assemble(features.projected, None);
        let c = assert_close(&format!("{name} image_embeds"), &to_array(images.clone()), &reference.f32(&format!("{name}.image_embeds")), tolerance);
        eprintln!("full {name} image_embeds: {c}");

        let ids: Vec<u32> = reference.i64(&format!("{name}.input_ids")).into_iter().map(|t| t as u32).collect();
        let embeds = decoder.embed_prompt(&ids, 128815, Some(images), &device).unwrap();
        let hidden = pollster::block_on(decoder.forward(embeds.clone(), &mut KvCache::default())).unwrap();
        let [s, d] = hidden.dims();
        let last = to_array(decoder.logits(hidden.slice([s - 1..s, 0..d])));
        let last = Array::new(vec![last.data.len()], last.data);
        let c = assert_close(&format!("{name} first-step logits"), &last, &reference.f32(&format!("{name}.last_logits")), tolerance);
        eprintln!("full {name} first-step logits: {c}");

        let options = GenerationOptions { max_new_tokens: 16, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
        let out = pollster::block_on(generate(&decoder, embeds, &ids, &options, |_| ControlFlow::Continue(()))).unwrap();
        let expected: Vec<u32> = reference.i64(&format!("{name}.greedy_tokens")).into_iter().map(|t| t as u32).collect();
        let n = out.tokens.len().min(expected.len());
        eprintln!("full {name} greedy: ours {:?} reference {:?}", out.tokens, expected);
        assert_eq!(out.tokens[..n], expected[..n], "{name}: greedy tokens");
    }
}
