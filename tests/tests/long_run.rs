//! A long run in one process: 200 recognitions on the CPU (tiny checkpoint, Tiny mode, all three
//! test images in turn). Every result equals the first one for its image, and resident memory stays
//! flat once warm (measured from /proc, asserted with a margin).

use std::path::Path;
use std::time::Instant;

use burn::tensor::Device;
use dsocr::{Engine, EngineOptions, GenerationOptions, Mode, RepeatGuard, Task};

const RUNS: usize = 200;
const WARM_UP: usize = 20;

/// Resident set size of this process, in bytes (Linux `/proc/self/statm`).
fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").expect("/proc/self/statm");
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

#[test]
fn two_hundred_recognitions_same_results_flat_memory() {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures");
    let engine = pollster::block_on(Engine::load_dir(&fixtures.join("tiny-a"), &Device::flex(), EngineOptions::default(), None)).unwrap();
    let images: Vec<Vec<u8>> = ["page", "note", "photo"].iter().map(|n| std::fs::read(fixtures.join(format!("images/{n}.png"))).unwrap()).collect();
    let options = GenerationOptions { max_new_tokens: 3, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
    let mut first: Vec<Option<(Vec<u32>, String)>> = vec![None; images.len()];
    let (mut warm_rss, mut peak_after_warm) = (0, 0);
    let started = Instant::now();
    for run in 0..RUNS {
        let i = run % images.len();
        let result = pollster::block_on(engine.recognize(&images[i], &Task::FreeOcr, Mode::Tiny, &options, |_| std::ops::ControlFlow::Continue(()))).unwrap();
        let got = (result.token_ids.clone(), result.text.clone());
        match &first[i] {
            None => first[i] = Some(got),
            Some(expected) => assert_eq!(&got, expected, "run {run}: the same image gives the same result"),
        }
        if run + 1 == WARM_UP {
            warm_rss = rss_bytes();
        } else if run + 1 > WARM_UP {
            peak_after_warm = peak_after_warm.max(rss_bytes());
        }
    }
    let mib = |b: u64| b as f64 / (1 << 20) as f64;
    eprintln!(
        "{RUNS} recognitions in {:.1} s; RSS after {WARM_UP}: {:.1} MiB, highest after: {:.1} MiB, at the end: {:.1} MiB",
        started.elapsed().as_secs_f64(),
        mib(warm_rss),
        mib(peak_after_warm),
        mib(rss_bytes())
    );
    // Flat: no growth with the number of calls beyond allocator noise (5% or 16 MiB).
    let margin = (warm_rss / 20).max(16 << 20);
    assert!(peak_after_warm <= warm_rss + margin, "memory grew from {:.1} to {:.1} MiB", mib(warm_rss), mib(peak_after_warm));
}
