//! Where the CPU vision encoder spends its time: wall time per stage (`dsocr::model::profile` spans:
//! SAM's projections, attention cores, MLPs, norms, neck and compressor; CLIP's; the projector) for
//! `page.png` in Tiny, Small, Base and Gundam (the 1024 global view and its 640 tiles), f32, second of
//! two runs. The official code's breakdown in the same categories:
//! `python tests/reference/generate.py --ref-code CODE --profile-encoder /work/full-ckpt --threads 2`.
//!
//! ```sh
//! cargo run --release -p dsocr-tests --bin encoder_profile -- /work/full-ckpt
//! ```

use std::path::PathBuf;
use std::time::Instant;

use burn::tensor::{Device, Tensor, TensorData};
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views, normalize};
use dsocr::model::profile;
use dsocr::{Engine, EngineOptions, Mode};
use dsocr_tests::fixtures_dir;

fn main() {
    let dir = PathBuf::from(std::env::args().nth(1).expect("usage: encoder_profile <full checkpoint dir>"));
    dsocr::engine::tune_allocator();
    let device = Device::flex();
    let engine = pollster::block_on(Engine::load_dir(&dir, &device, EngineOptions::default(), None)).expect("load");
    let encoder = engine.encoder();
    let page = decode(&std::fs::read(fixtures_dir().join("images/page.png")).unwrap(), &DecodeLimits::default()).unwrap();
    for (name, mode) in [("tiny", Mode::Tiny), ("small", Mode::Small), ("base", Mode::Base), ("gundam", Mode::Gundam)] {
        let views = make_views(&page, mode, &PreprocessOptions::default()).unwrap();
        let mut batches = vec![normalize(&[&views.global], true)];
        if !views.tiles.is_empty() {
            batches.push(normalize(&views.tiles.iter().collect::<Vec<_>>(), true));
        }
        let mut total = 0.0;
        for run in 0..2 {
            if run == 1 {
                profile::start();
            }
            let t = Instant::now();
            for (values, shape) in &batches {
                let pixels = Tensor::<4>::from_data(TensorData::new(values.clone(), shape.clone()), &device);
                let _ = dsocr_tests::to_array(encoder.encode_views(pixels).unwrap().projected);
            }
            total = t.elapsed().as_secs_f64();
        }
        let mut stages = profile::stop();
        let timed: f64 = stages.iter().map(|(_, s)| s).sum();
        stages.push(("other", total - timed));
        stages.sort_by(|a, b| b.1.total_cmp(&a.1));
        let shapes: Vec<String> = batches.iter().map(|(_, s)| s.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x")).collect();
        println!("== {name} ({}): encoder {total:.3} s", shapes.join(" + "));
        for (stage, seconds) in stages {
            println!("  {stage:34} {seconds:8.3} s {:5.1} %", 100.0 * seconds / total);
        }
    }
}
