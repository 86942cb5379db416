//! What a decoding step reads back from the GPU (wgpu; lavapipe in CI): one read per step, of the
//! greedy choice (three numbers), not the vocabulary's logits — also with the repeat guard banning
//! tokens (they are set to −∞ on the device); with packed experts, none during a Tiny prefill. Alone in its test binary: the crate counts reads per
//! process. Skipped without an adapter unless `DSOCR_REQUIRE_WGPU` is set.
#![cfg(feature = "wgpu")]

use std::ops::ControlFlow;

use dsocr::generate::{GenerationOptions, RepeatGuard};
use dsocr::model::readbacks;
use dsocr::quant::{Preset, Recipe};
use dsocr::text::Task;
use dsocr::{Engine, EngineOptions, Mode};
use dsocr_tests::quant::page;
use dsocr_tests::{checkpoint_dir, wgpu_device};

#[test]
fn a_decoding_step_reads_back_once() {
    let Some((device, limit)) = wgpu_device(false) else { return };
    let tokens = 12;
    // tiny-b on page.png repeats a bigram within a dozen tokens unguarded; an n-gram size of 2 bans
    // the token that would repeat the last bigram.
    let guards = [RepeatGuard::Off, RepeatGuard::Windowed { ngram: 2, window: 90, whitelist: Vec::new() }];
    for quantize in [None, Some(Recipe::preset(Preset::Q4, None).unwrap())] {
        let options = EngineOptions { quantize: quantize.clone(), ..EngineOptions::gpu(limit) };
        let engine = pollster::block_on(Engine::load_dir(&checkpoint_dir("tiny-b"), &device, options, None)).unwrap();
        for guard in &guards {
            let generation = GenerationOptions { max_new_tokens: tokens, repeat_guard: guard.clone(), stop_ids: Vec::new(), ..GenerationOptions::default() };
            let mut reads = Vec::new();
            let before = readbacks();
            let result = pollster::block_on(engine.recognize(&page(), &Task::Markdown, Mode::Tiny, &generation, |_| {
                reads.push(readbacks());
                ControlFlow::Continue(())
            }))
            .unwrap();
            assert_eq!(result.token_ids.len(), tokens);
            if quantize.is_some() {
                // The whole page: one read per token (the prefill's choice included); the MoE
                // layers of a Tiny prompt route on the device, with no read of their own.
                assert_eq!(readbacks() - before, tokens as u64, "{guard:?}: reads in the page");
            }
            let per_step: Vec<u64> = reads.windows(2).map(|w| w[1] - w[0]).collect();
            assert!(per_step.iter().all(|&r| r == 1), "{quantize:?} {guard:?}: reads per step {per_step:?}");
            let ids = &result.token_ids;
            let repeats = ids.len() - 1 - ids.windows(2).collect::<std::collections::HashSet<_>>().len();
            match guard {
                RepeatGuard::Off => assert!(repeats > 0, "{quantize:?}: unguarded, some bigram repeats in {ids:?}"),
                // The guard, applied on the device, leaves none.
                _ => assert_eq!(repeats, 0, "{quantize:?}: a bigram repeats in {ids:?}"),
            }
        }
    }
}
