//! Accuracy and size of the quantization recipes on one checkpoint: for each preset and group size,
//! the checkpoint's size, and against float on `page.png` per mode: encoder output error, first-step
//! logit error (max and mean, relative) and greedy-token agreement. The README's figures.
//!
//! ```sh
//! cargo run --release -p dsocr-tests --bin quant_report -- tests/fixtures/tiny-a [tokens] [modes] [groups]
//! cargo run --release -p dsocr-tests --bin quant_report -- /work/full-ckpt 64 tiny,small,base,gundam 32,64,128
//! ```

use std::path::PathBuf;

use dsocr::Mode;
use dsocr::quant::{Preset, Recipe};
use dsocr::weights::expected_tensors;
use dsocr_tests::fixtures_dir;
use dsocr_tests::quant::{gap, load, run_page};

fn mode(name: &str) -> Mode {
    match name {
        "tiny" => Mode::Tiny,
        "small" => Mode::Small,
        "base" => Mode::Base,
        "large" => Mode::Large,
        "gundam" => Mode::Gundam,
        other => panic!("unknown mode {other}"),
    }
}

fn main() {
    let mut args = std::env::args().skip(1);
    let dir = PathBuf::from(args.next().expect("usage: quant_report <checkpoint dir> [tokens] [modes] [groups]"));
    let tokens: usize = args.next().map_or(64, |t| t.parse().expect("tokens"));
    let modes: Vec<String> = args.next().unwrap_or_else(|| "tiny,small,base,gundam".into()).split(',').map(String::from).collect();
    let groups: Vec<usize> = args.next().unwrap_or_else(|| "32,64,128".into()).split(',').map(|g| g.parse().expect("group")).collect();
    dsocr::engine::tune_allocator();
    let threads = dsocr::engine::cpu_threads();
    let page = std::fs::read(fixtures_dir().join("images/page.png")).unwrap();
    let config = dsocr::Config::from_json(&std::fs::read_to_string(dir.join("config.json")).unwrap()).unwrap();

    for preset in [Preset::Q4, Preset::Q8] {
        for group in dsocr::quant::GROUP_SIZES {
            let bytes = Recipe::preset(preset, Some(group)).unwrap().stored_bytes(&config);
            println!("size {} g{group}: {bytes} bytes ({:.3} GB)", preset.name(), bytes as f64 / 1e9);
        }
    }
    let float_engine = load(&dir, None, threads);
    let float: Vec<_> = modes.iter().map(|m| run_page(&float_engine, &page, mode(m), tokens)).collect();
    drop(float_engine);
    let float_bytes: u64 = expected_tensors(&config).iter().map(|t| 2 * t.shape.iter().product::<usize>() as u64).sum();
    println!("{}: bf16 {:.1} MB, {tokens} greedy tokens per page", dir.display(), float_bytes as f64 / 1e6);
    for preset in [Preset::Q8, Preset::Q4] {
        for &group in &groups {
            let recipe = Recipe::preset(preset, Some(group)).unwrap();
            let bytes = recipe.stored_bytes(&config);
            let engine = load(&dir, Some(recipe), threads);
            for (m, float) in modes.iter().zip(&float) {
                let g = gap(float, &run_page(&engine, &page, mode(m), tokens));
                println!("{} g{group} ({:.1} MB): {m:<6} {g}", preset.name(), bytes as f64 / 1e6);
            }
        }
    }
}
