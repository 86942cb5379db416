//! CPU benchmark of the full-size model against the official code on the same machine.
//!
//! ```sh
//! python tests/reference/generate.py --ref-code CODE --full-reference /work/full-ckpt --bench --threads 2
//! cargo run --release -p dsocr-tests --bin bench -- /work/full-ckpt [tokens]
//! ```
//! Prints encoder forward time at Tiny/Small/Base, time to first token (encoder + prefill) and decode
//! tokens/s at Tiny/Small, each beside the reference's (`reference_timings.json`) as a ratio
//! (reference / ours: above 1 means dsocr is faster).

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use dsocr::generate::{GenerationOptions, RepeatGuard, generate};
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views, normalize};
use dsocr::model::layout::image_token_count;
use dsocr::model::{Decoder, VisionEncoder};
use dsocr::text::{Task, Tokenizer, prompt_ids};
use dsocr::weights::{Checkpoint, Loader};
use dsocr::{Config, Mode};
use dsocr_tests::fixtures_dir;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: bench <full checkpoint dir> [tokens]"));
    let tokens: usize = args.next().map_or(16, |t| t.parse().expect("tokens"));
    let reference: serde_json::Value = std::fs::read(dir.join("reference_timings.json"))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_default();

    dsocr::engine::tune_allocator(); // as the CLI does
    let t = Instant::now();
    let config = Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();
    let file = std::fs::File::open(dir.join("model-00001-of-000001.safetensors")).unwrap();
    let bytes = unsafe { memmap2::Mmap::map(&file) }.unwrap();
    let weights = Checkpoint::parse(&bytes).unwrap();
    let device = Device::flex();
    let loader = Loader::new(&weights, &device).with_threads(dsocr::engine::cpu_threads());
    let encoder = pollster::block_on(VisionEncoder::load(&config, &loader)).unwrap();
    let decoder = pollster::block_on(Decoder::load(&config.decoder, &loader)).unwrap();
    let tokenizer = Tokenizer::from_json(&std::fs::read(dir.join("tokenizer.json")).unwrap()).unwrap();
    println!("load: {:.1} s (f32 weights on flex, {} threads)", t.elapsed().as_secs_f64(), rayon_threads());

    let page = decode(&std::fs::read(fixtures_dir().join("images/page.png")).unwrap(), &DecodeLimits::default()).unwrap();
    println!("{:<28} {:>10} {:>12} {:>8}", "measure", "dsocr", "reference", "ratio");
    let row = |label: String, ours: f64, key: &str, higher_is_better: bool| {
        let theirs = reference.get(key).and_then(|v| v.as_f64());
        let ratio = theirs.map(|r| if higher_is_better { ours / r } else { r / ours });
        println!(
            "{label:<28} {ours:>10.3} {:>12} {:>8}",
            theirs.map_or("-".into(), |v| format!("{v:.3}")),
            ratio.map_or("-".into(), |v| format!("{v:.2}x"))
        );
    };
    for (name, mode) in [("tiny", Mode::Tiny), ("small", Mode::Small), ("base", Mode::Base)] {
        let views = make_views(&page, mode, &PreprocessOptions::default()).unwrap();
        let (values, shape) = normalize(&[&views.global], true);
        let pixels = || Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &device);
        let _ = dsocr_tests::to_array(encoder.encode_views(pixels()).projected); // warm-up
        let t = Instant::now();
        let _ = dsocr_tests::to_array(encoder.encode_views(pixels()).projected);
        row(format!("{name} encode (s)"), t.elapsed().as_secs_f64(), &format!("{name}.encode_s"), false);
        if mode == Mode::Base {
            continue;
        }
        let count = image_token_count(mode.image_size(), 0, [1, 1]);
        let ids = prompt_ids(&tokenizer, &Task::Markdown.prompt(), &[count]).unwrap();
        let run = |n: usize| {
            let images = encoder.embed_image(pixels(), None);
            let embeds = decoder.embed_prompt(&ids, 128815, Some(images), &device).unwrap();
            let options = GenerationOptions { max_new_tokens: n, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
            pollster::block_on(generate(&decoder, embeds, &ids, &options, |_| ControlFlow::Continue(()))).unwrap()
        };
        let t = Instant::now();
        let _ = run(1);
        let first = t.elapsed().as_secs_f64();
        row(format!("{name} encode+prefill (s)"), first, &format!("{name}.prefill_s"), false);
        let t = Instant::now();
        let out = run(tokens);
        let decode_s = t.elapsed().as_secs_f64() - first;
        let rate = (out.tokens.len().saturating_sub(1)) as f64 / decode_s.max(1e-9);
        row(format!("{name} decode (tokens/s)"), rate, &format!("{name}.decode_tokens_per_s"), true);
    }
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("VmHWM"))
    {
        println!("peak memory: {}", line.trim_start_matches("VmHWM:").trim());
    }
}

fn rayon_threads() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}
