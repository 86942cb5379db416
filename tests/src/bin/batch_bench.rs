//! Throughput of batched decoding on the CPU: N copies of `page.png` (Tiny mode, `tokens` each, no
//! stop id, no repeat guard, so every page generates exactly `tokens`) recognised one after another
//! (`Engine::recognize`, what one client at a time gets) and as one batch (`Engine::recognize_batch`,
//! what `dsocr serve --max-batch N` does with N concurrent clients). Prints pages/s, decode tokens/s
//! and their ratio, measured in one run.
//!
//! ```sh
//! cargo run --release -p dsocr-tests --bin batch_bench -- /work/full-ckpt 32 1,4,8 [q4|q8]
//! ```

use std::ops::ControlFlow;
use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::Device;
use dsocr::quant::{Preset, Recipe};
use dsocr::{Engine, EngineOptions, GenerationOptions, Mode, RepeatGuard, Task};
use dsocr_tests::fixtures_dir;

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: batch_bench <checkpoint dir> [tokens] [batch sizes] [q4|q8]"));
    let tokens: usize = args.next().map_or(16, |t| t.parse().expect("tokens"));
    let sizes: Vec<usize> = args.next().unwrap_or_else(|| "1,4,8".into()).split(',').map(|n| n.parse().expect("batch size")).collect();
    let quantize = args.next().map(|s| Recipe::preset(Preset::parse(&s).expect("q4 or q8"), None).expect("recipe"));
    dsocr::engine::tune_allocator();
    let options = EngineOptions { quantize, ..EngineOptions::default() };
    let started = Instant::now();
    let engine = pollster::block_on(Engine::load_dir(&dir, &Device::flex(), options, None)).expect("load");
    println!("loaded {} in {:.1} s; {tokens} tokens a page, Tiny", dir.display(), started.elapsed().as_secs_f64());
    let page = std::fs::read(fixtures_dir().join("images/page.png")).unwrap();
    let generation = GenerationOptions { max_new_tokens: tokens, repeat_guard: RepeatGuard::Off, stop_ids: Vec::new(), ..GenerationOptions::default() };
    let task = Task::FreeOcr;
    // Warm-up: allocator pools, caches.
    pollster::block_on(engine.recognize(&page, &task, Mode::Tiny, &generation, |_| ControlFlow::Continue(()))).unwrap();
    println!("| pages | one at a time: s, pages/s, decode tok/s | batched: s, pages/s, decode tok/s | throughput ratio (pages/s) | decode ratio |");
    println!("|---|---|---|---|---|");
    for &n in &sizes {
        let t = Instant::now();
        let mut decode_ms = 0.0;
        for _ in 0..n {
            let r = pollster::block_on(engine.recognize(&page, &task, Mode::Tiny, &generation, |_| ControlFlow::Continue(()))).unwrap();
            assert_eq!(r.token_ids.len(), tokens);
            decode_ms += r.timings_ms.decode;
        }
        let alone = t.elapsed().as_secs_f64();
        let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = (0..n).map(|_| (page.as_slice(), &task, Mode::Tiny, &generation)).collect();
        let t = Instant::now();
        let results = pollster::block_on(engine.recognize_batch(&pages, |_, _| ControlFlow::Continue(())));
        let batched = t.elapsed().as_secs_f64();
        let batch_decode_ms = results[0].as_ref().unwrap().timings_ms.decode;
        assert!(results.iter().all(|r| r.as_ref().unwrap().token_ids.len() == tokens));
        // Decode tokens/s: tokens after the first of each page over the time spent decoding them.
        let steps = (n * (tokens - 1)) as f64;
        let (rate_alone, rate_batched) = (steps / (decode_ms / 1000.0), steps / (batch_decode_ms / 1000.0));
        println!(
            "| {n} | {alone:.1}, {:.2}, {rate_alone:.1} | {batched:.1}, {:.2}, {rate_batched:.1} | {:.2}× | {:.2}× |",
            n as f64 / alone,
            n as f64 / batched,
            alone / batched,
            rate_batched / rate_alone
        );
    }
}
