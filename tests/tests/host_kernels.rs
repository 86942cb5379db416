//! The CPU host kernels (SAM's attention and GELU, `model/rel_attention.rs` and `model/vmath.rs`; the
//! decoder's KV cache in host memory, `model/kv.rs`) against burn's own ops on the same CPU device
//! (`host_kernels` off), under thread pools of 1, 2 and 3 threads: the encoder's stages close to
//! burn's path in every mode (odd grids: Tiny's 32², Small's 40², Gundam's tiles) at every thread
//! count, and the same greedy tokens.

use std::ops::ControlFlow;

use burn::tensor::{Device, Tensor, TensorData};
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views, normalize};
use dsocr::{Engine, EngineOptions, GenerationOptions, Mode, RepeatGuard, Task};
use dsocr_tests::{Tolerance, assert_close, checkpoint_dir, fixtures_dir, to_array};

fn engine(host_kernels: bool) -> Engine {
    let options = EngineOptions { host_kernels, ..EngineOptions::default() };
    pollster::block_on(Engine::load_dir(&checkpoint_dir("tiny-a"), &Device::flex(), options, None)).unwrap()
}

#[test]
fn host_kernels_match_burns_ops_at_any_thread_count() {
    let bytes = std::fs::read(fixtures_dir().join("images/page.png")).unwrap();
    let page = decode(&bytes, &DecodeLimits::default()).unwrap();
    let plain = engine(false);
    let generation = GenerationOptions { max_new_tokens: 12, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() };
    let recognize = |e: &Engine| pollster::block_on(e.recognize(&bytes, &Task::Markdown, Mode::Tiny, &generation, |_| ControlFlow::Continue(()))).unwrap().token_ids;
    let expected_tokens = recognize(&plain);
    for mode in [Mode::Tiny, Mode::Small, Mode::Gundam] {
        let views = make_views(&page, mode, &PreprocessOptions::default()).unwrap();
        let inputs = if views.tiles.is_empty() { vec![views.global.clone()] } else { views.tiles.clone() };
        let (values, shape) = normalize(&inputs.iter().collect::<Vec<_>>(), true);
        let encode = |e: &Engine| {
            let features = e.encoder().encode_views(Tensor::<4>::from_data(TensorData::new(values.clone(), shape), &Device::flex())).unwrap();
            (to_array(features.sam.compressed), to_array(features.projected))
        };
        let (burn_sam, burn_projected) = encode(&plain);
        for threads in [1, 2, 3] {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
            let (sam, projected, tokens) = pool.install(|| {
                let host = engine(true);
                let (sam, projected) = encode(&host);
                (sam, projected, recognize(&host))
            });
            let label = format!("{mode:?}, {threads} threads");
            assert_close(&format!("{label}: SAM + compressor"), &sam, &burn_sam, Tolerance::RelativeToMax(1e-5));
            assert_close(&format!("{label}: projected"), &projected, &burn_projected, Tolerance::RelativeToMax(1e-5));
            assert_eq!(tokens, expected_tokens, "{label}: greedy tokens");
        }
    }
}
