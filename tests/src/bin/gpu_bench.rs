//! GPU benchmark (native wgpu): one page through the whole pipeline per weight format, on the same
//! device in one run, so the figures compare as ratios.
//!
//! ```sh
//! cargo run --release -p dsocr-tests --bin gpu_bench -- tests/fixtures/tiny-a [tokens] [f32,q8,q4,f32-burn,q4-burn] [mode]
//! cargo run --release -p dsocr-tests --bin gpu_bench -- /work/full-ckpt 8 q4,q4-burn text   # decoding only
//! ```
//! Mode `text` skips the image: a 32-token text prompt, then decoding (for full-size weights on a
//! software adapter, where the encoder alone would take minutes).
//! Formats: `f32`, `f16` (the float checkpoint in that type; f16 in a run of its own: a device's
//! float type is set once), `q8`/`q4` (quantized at load, weights packed on the device and
//! multiplied by the crate's GPU kernels). A `-burn` suffix runs the same weights on burn's tensor
//! ops only, as the GPU path did before the crate's kernels (`EngineOptions::device_kernels` off:
//! quantized weights dequantized into float at load, no fused kernels, logits read back).
//!
//! Prints per format: load time, the warm-up's time (`Engine::warm_up`: the kernels this format
//! needs that the process has not compiled yet — for the first format, all of them), then for a
//! page: time to the first token (encoder + prefill), decode tokens/s (tokens after the first),
//! readbacks per decode step (counted in the crate), device memory (the allocator's bytes in use
//! after loading, and what it holds after the page), and — measured in a
//! child process with cubecl's execution log (it synchronises after every kernel, so it is
//! not timed) — GPU dispatches per decode step (the difference between a page of 2 and of
//! `tokens` tokens) and per page.

use std::ops::ControlFlow;
use std::path::{Path, PathBuf};
use std::time::Instant;

use burn::tensor::{Device, FloatDType};
use dsocr::generate::{GenerationOptions, RepeatGuard, generate};
use dsocr::model::readbacks;
use dsocr::quant::{Preset, Recipe};
use dsocr::text::Task;
use dsocr::{Engine, EngineOptions, Mode};
use dsocr_tests::quant::page;

/// Set in the child process that counts dispatches: the cubecl log file.
const COUNT_CHILD: &str = "DSOCR_GPU_BENCH_LOG";

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: gpu_bench <checkpoint dir> [tokens] [formats] [mode]"));
    let tokens: usize = args.next().map_or(16, |t| t.parse().expect("tokens"));
    let formats: Vec<String> = args.next().unwrap_or_else(|| "f32,q8,q4,f32-burn,q4-burn".into()).split(',').map(String::from).collect();
    let mode: Option<Mode> = match args.next().as_deref() {
        None => Some(Mode::Tiny),
        Some("text") => None,
        Some(m) => Some(m.parse().expect("mode (or `text`)")),
    };
    assert!(tokens >= 4, "at least 4 tokens (decode is measured after the first, dispatches between 2 and `tokens`)");

    let (mut device, setup) = pollster::block_on(Device::wgpu_options().init_with_setup_async()).expect("a wgpu adapter");
    let limit = dsocr::engine::wgpu_max_tensor_bytes(&setup);
    if let Ok(log) = std::env::var(COUNT_CHILD) {
        // The child: one format, pages of 2 and of `tokens` tokens, log lines counted between.
        count_dispatches(&dir, &formats[0], &mut device, limit, tokens, mode, Path::new(&log));
        return;
    }
    let what = mode.map_or("a text prompt, no image".to_string(), |m| format!("{m:?} mode"));
    println!("adapter: {} ({:?}); checkpoint {}; {what}, {tokens} tokens", setup.adapter.get_info().name, setup.backend, dir.display());
    println!(
        "{:<12} {:>7} {:>9} {:>7} {:>8} {:>10} {:>9} {:>9} {:>10} {:>8}",
        "format", "load s", "warm-up s", "first s", "tok/s", "reads/step", "disp/step", "disp/page", "weights MB", "held MB"
    );
    let mut base: Option<f64> = None;
    for format in &formats {
        let started = Instant::now();
        let engine = load(&dir, format, &mut device, limit);
        let load_s = started.elapsed().as_secs_f64();
        let weights_mb = device.memory_pool_usage().map_or(f64::NAN, |u| u.bytes_in_use as f64 / 1e6);
        let started = Instant::now();
        if mode.is_some() {
            pollster::block_on(engine.warm_up()).expect("warm-up");
        }
        let warm_s = started.elapsed().as_secs_f64();
        run(&engine, 2, mode); // this mode's shapes too (the warm-up ran the smallest mode)
        let (first, rate, reads) = run(&engine, tokens, mode);
        let held_mb = device.memory_pool_usage().map_or(f64::NAN, |u| u.bytes_reserved as f64 / 1e6);
        // Freed before the counting child loads its own copy.
        drop(engine);
        device.memory_cleanup();
        let (per_step, per_page) = dispatches(&dir, format, tokens, mode);
        let ratio = base.map_or(String::new(), |b| format!("  ({:.2}× {})", rate / b, formats[0]));
        base.get_or_insert(rate);
        println!("{format:<12} {load_s:>7.2} {warm_s:>9.2} {first:>7.2} {rate:>8.2} {reads:>10.2} {per_step:>9.1} {per_page:>9} {weights_mb:>10.1} {held_mb:>8.1}{ratio}");
    }
}

fn load(dir: &Path, format: &str, device: &mut Device, limit: usize) -> Engine {
    let (weights, device_kernels) = match format.strip_suffix("-burn") {
        Some(weights) => (weights, false),
        None => (format, true),
    };
    let quantize = match weights {
        "f32" => None,
        "f16" => {
            device.configure(FloatDType::F16).expect("f16 on this device (in a run of its own)");
            None
        }
        preset => Some(Recipe::preset(Preset::parse(preset).expect("a format"), None).unwrap()),
    };
    let options = EngineOptions { quantize, device_kernels, ..EngineOptions::gpu(limit) };
    pollster::block_on(Engine::load_dir(dir, device, options, None)).unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
}

/// One page (or, without a mode, a 32-token text prompt) of `tokens` greedy tokens: seconds to the
/// first token, decode tokens/s after it, readbacks per decode step.
fn run(engine: &Engine, tokens: usize, mode: Option<Mode>) -> (f64, f64, f64) {
    // Stop ids off: a random-weight model must not end early.
    let options = GenerationOptions { max_new_tokens: tokens, repeat_guard: RepeatGuard::hf(), stop_ids: Vec::new(), ..GenerationOptions::default() };
    let started = Instant::now();
    let mut marks: Vec<(Instant, u64)> = Vec::new();
    let on_token = |_: u32| {
        marks.push((Instant::now(), readbacks()));
        ControlFlow::Continue(())
    };
    match mode {
        Some(mode) => {
            let mut on_event = on_token;
            pollster::block_on(engine.recognize(&page(), &Task::Markdown, mode, &options, |e| on_event(e.id))).expect("recognize");
        }
        None => {
            let ids: Vec<u32> = (0..32).map(|i| 1000 + 37 * i).collect();
            let embeds = engine.decoder().embed(&ids, engine.device()).expect("embed");
            pollster::block_on(generate(engine.decoder(), embeds, &ids, &options, on_token)).expect("generate");
        }
    }
    assert_eq!(marks.len(), tokens, "every token generated");
    let (first, last) = (marks[0], marks[tokens - 1]);
    let steps = (tokens - 1) as f64;
    (first.0.duration_since(started).as_secs_f64(), steps / last.0.duration_since(first.0).as_secs_f64(), (last.1 - first.1) as f64 / steps)
}

/// Dispatches per decode step and per page of `tokens` tokens, counted in a child process.
fn dispatches(dir: &Path, format: &str, tokens: usize, mode: Option<Mode>) -> (f64, u64) {
    let log = std::env::temp_dir().join(format!("dsocr-gpu-bench-{}-{format}.log", std::process::id()));
    let _ = std::fs::remove_file(&log);
    let out = std::process::Command::new(std::env::current_exe().unwrap())
        .args([dir.to_str().unwrap(), &tokens.to_string(), format, &mode.map_or("text".into(), |m| format!("{m:?}").to_lowercase())])
        .env(COUNT_CHILD, &log)
        .env("CUBECL_DEBUG_LOG", &log)
        .env("CUBECL_DEBUG_OPTION", "profile-full")
        .output()
        .expect("run the counting child");
    assert!(out.status.success(), "counting child failed: {}", String::from_utf8_lossy(&out.stderr));
    let text = String::from_utf8_lossy(&out.stdout);
    let field = |name: &str| text.lines().find_map(|l| l.strip_prefix(name)).unwrap_or_else(|| panic!("child said no {name}: {text}")).trim().to_string();
    let _ = std::fs::remove_file(&log);
    (field("per_step=").parse().unwrap(), field("per_page=").parse().unwrap())
}

/// Kernel executions in cubecl's profiling log so far (lines `| <time> | <kernel> …`).
fn executions(log: &Path) -> u64 {
    std::fs::read_to_string(log).unwrap_or_default().lines().filter(|l| l.starts_with("| ")).count() as u64
}

fn count_dispatches(dir: &Path, format: &str, device: &mut Device, limit: usize, tokens: usize, mode: Option<Mode>, log: &Path) {
    let engine = load(dir, format, device, limit);
    run(&engine, tokens, mode); // compiled and allocated; the counts below are steady state
    let c0 = executions(log);
    run(&engine, 2, mode);
    let c1 = executions(log);
    run(&engine, tokens, mode);
    let c2 = executions(log);
    let (short, long) = (c1 - c0, c2 - c1);
    println!("per_step={}", (long - short) as f64 / (tokens - 2) as f64);
    println!("per_page={long}");
}
