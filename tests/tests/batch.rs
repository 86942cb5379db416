//! Batched decoding (`Engine::recognize_batch`, `PageBatch`, `generate_batch`, `Decoder::step_batch`):
//! pages of different images, modes, tasks and lengths decoded together give exactly what each
//! gives alone, also when they join a batch that is already decoding (caches of different lengths);
//! a bad page fails alone; cancelling one page leaves the others going. On the CPU with both MoE
//! paths (experts grouped per token as on the CPU, stacked and gathered as on GPUs).

use std::ops::ControlFlow;
use std::path::Path;

use burn::tensor::Device;
use dsocr::{Engine, EngineOptions, GenerationOptions, Mode, PageBatch, RepeatGuard, Task};

fn engine(options: EngineOptions) -> Engine {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-a");
    pollster::block_on(Engine::load_dir(&dir, &Device::flex(), options, None)).unwrap()
}

fn image(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join(format!("fixtures/images/{name}.png"))).unwrap()
}

fn tokens(n: usize) -> GenerationOptions {
    GenerationOptions { max_new_tokens: n, repeat_guard: RepeatGuard::hf(), ..GenerationOptions::default() }
}

#[test]
fn a_batch_gives_what_each_page_gives_alone() {
    let (page, note, photo, junk) = (image("page"), image("note"), image("photo"), b"not an image".to_vec());
    let (free, markdown) = (Task::FreeOcr, Task::Markdown);
    let (g3, g6, g9) = (tokens(3), tokens(6), tokens(9));
    let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = vec![
        (&page, &free, Mode::Tiny, &g9),
        (&note, &markdown, Mode::Small, &g3),
        (&junk, &free, Mode::Tiny, &g3),
        (&photo, &free, Mode::Tiny, &g6),
        (&page, &markdown, Mode::Gundam, &g6),
    ];
    for (label, options) in [("grouped experts", EngineOptions::default()), ("stacked experts", EngineOptions { stacked_experts: true, ..EngineOptions::default() })] {
        let engine = engine(options);
        let alone: Vec<_> = pages
            .iter()
            .map(|&(bytes, task, mode, generation)| pollster::block_on(engine.recognize(bytes, task, mode, generation, |_| ControlFlow::Continue(()))))
            .collect();
        let mut streamed = vec![Vec::new(); pages.len()];
        let batch = pollster::block_on(engine.recognize_batch(&pages, |page, event| {
            streamed[page].push(event.id);
            assert_eq!(event.index, streamed[page].len());
            ControlFlow::Continue(())
        }));
        assert_eq!(batch.len(), pages.len());
        for (i, (a, b)) in alone.iter().zip(&batch).enumerate() {
            match (a, b) {
                (Ok(a), Ok(b)) => {
                    assert_eq!(b.token_ids, a.token_ids, "{label}: page {i}");
                    assert_eq!(b.text, a.text, "{label}: page {i}");
                    assert_eq!(b.finish_reason, a.finish_reason, "{label}: page {i}");
                    assert_eq!((b.image_token_count, b.prompt_token_count, b.tile_grid), (a.image_token_count, a.prompt_token_count, a.tile_grid));
                    assert_eq!(streamed[i], b.token_ids, "{label}: page {i} streamed");
                }
                (Err(a), Err(b)) => assert_eq!(a.to_string(), b.to_string()),
                _ => panic!("{label}: page {i}: alone {a:?}, in the batch {b:?}"),
            }
        }
        assert!(batch[2].is_err(), "the junk page fails alone");
        assert_eq!(batch[0].as_ref().unwrap().token_ids.len(), 9);
    }
}

#[test]
fn cancelling_one_page_leaves_the_others_going() {
    let engine = engine(EngineOptions::default());
    let (page, note) = (image("page"), image("note"));
    let (free, g8) = (Task::FreeOcr, tokens(8));
    let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = vec![(&page, &free, Mode::Tiny, &g8), (&note, &free, Mode::Tiny, &g8)];
    let batch = pollster::block_on(engine.recognize_batch(&pages, |page, event| {
        if page == 0 && event.index == 2 { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
    }));
    let first = batch[0].as_ref().unwrap();
    assert_eq!((first.finish_reason.as_str(), first.token_ids.len()), ("cancelled", 2));
    let alone = pollster::block_on(engine.recognize(&note, &free, Mode::Tiny, &g8, |_| ControlFlow::Continue(()))).unwrap();
    assert_eq!(batch[1].as_ref().unwrap().token_ids, alone.token_ids);
}

#[test]
fn pages_that_join_a_running_batch_give_what_they_give_alone() {
    let (page, note, photo) = (image("page"), image("note"), image("photo"));
    let (free, markdown) = (Task::FreeOcr, Task::Markdown);
    let (g4, g7, g10) = (tokens(4), tokens(7), tokens(10));
    // (key, bytes, task, mode, options, the step before which it joins)
    let plan: Vec<(char, &[u8], &Task, Mode, &GenerationOptions, usize)> = vec![
        ('a', &page, &free, Mode::Tiny, &g10, 0),
        ('b', &note, &markdown, Mode::Small, &g4, 3),
        ('c', &photo, &free, Mode::Tiny, &g7, 3),
        ('d', &page, &markdown, Mode::Tiny, &g4, 6),
        ('e', &note, &free, Mode::Tiny, &g4, 9), // after 'b' and 'd' left
    ];
    for (label, options) in [("grouped experts", EngineOptions::default()), ("stacked experts", EngineOptions { stacked_experts: true, ..EngineOptions::default() })] {
        let engine = engine(options);
        let mut batch = PageBatch::new(&engine);
        let mut streamed: Vec<(char, Vec<u32>)> = plan.iter().map(|p| (p.0, Vec::new())).collect();
        let mut results = Vec::new();
        let mut sizes = Vec::new();
        for step in 0.. {
            for &(key, bytes, task, mode, generation, at) in &plan {
                if at == step {
                    pollster::block_on(batch.join(key, bytes, task, mode, generation)).unwrap();
                }
            }
            if batch.is_empty() {
                break;
            }
            sizes.push(batch.len());
            results.extend(pollster::block_on(batch.step(|key, event| {
                let (_, ids) = streamed.iter_mut().find(|(k, _)| *k == key).unwrap();
                ids.push(event.id);
                assert_eq!(event.index, ids.len());
                ControlFlow::Continue(())
            })));
        }
        assert_eq!(results.len(), plan.len(), "{label}");
        assert!(sizes.iter().any(|&n| n >= 3), "{label}: pages decoded together ({sizes:?})");
        for &(key, bytes, task, mode, generation, _) in &plan {
            let alone = pollster::block_on(engine.recognize(bytes, task, mode, generation, |_| ControlFlow::Continue(()))).unwrap();
            let (_, joined) = results.iter().find(|(k, _)| *k == key).unwrap();
            let joined = joined.as_ref().unwrap();
            assert_eq!(joined.token_ids, alone.token_ids, "{label}: page {key}");
            assert_eq!(joined.finish_reason, alone.finish_reason, "{label}: page {key}");
            assert_eq!(streamed.iter().find(|(k, _)| *k == key).unwrap().1, joined.token_ids, "{label}: page {key} streamed");
        }
    }
}

#[test]
fn a_page_that_cannot_join_leaves_the_batch_as_it_was() {
    let engine = engine(EngineOptions::default());
    let (page, free, g5) = (image("page"), Task::FreeOcr, tokens(5));
    let mut batch = PageBatch::new(&engine);
    pollster::block_on(batch.join(1, &page, &free, Mode::Tiny, &g5)).unwrap();
    let junk = pollster::block_on(batch.join(2, b"not an image", &free, Mode::Tiny, &g5));
    assert!(matches!(junk, Err(dsocr::Error::ImageFormat(_)) | Err(dsocr::Error::ImageDecode(_))), "{junk:?}");
    let twice = pollster::block_on(batch.join(1, &page, &free, Mode::Tiny, &g5));
    assert!(matches!(twice, Err(dsocr::Error::InvalidArgument(_))), "{twice:?}");
    assert_eq!(batch.len(), 1);
    let ended = pollster::block_on(batch.run(|_, _| ControlFlow::Continue(())));
    let alone = pollster::block_on(engine.recognize(&page, &free, Mode::Tiny, &g5, |_| ControlFlow::Continue(()))).unwrap();
    assert_eq!(ended.len(), 1);
    assert_eq!(ended[0].1.as_ref().unwrap().token_ids, alone.token_ids);
}

#[test]
fn a_page_that_reaches_the_models_positions_ends_alone() {
    // tiny-a with room for the Small page's prompt and 2 more positions only.
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-a");
    let read = |name: &str| std::fs::read(dir.join(name)).unwrap();
    let (note, page, free) = (image("note"), image("page"), Task::FreeOcr);
    let full = engine(EngineOptions::default());
    let prompt = |mode| pollster::block_on(full.recognize(&note, &free, mode, &tokens(1), |_| ControlFlow::Continue(()))).unwrap().prompt_token_count;
    let (small_prompt, tiny_prompt) = (prompt(Mode::Small), prompt(Mode::Tiny));
    assert!(tiny_prompt + 8 < small_prompt + 2, "the Tiny page has room for its 8 tokens");
    let mut config: serde_json::Value = serde_json::from_slice(&read("config.json")).unwrap();
    let positions = small_prompt + 2;
    let set = |v: &mut serde_json::Value| {
        if let Some(p) = v.get_mut("max_position_embeddings") {
            *p = positions.into();
        }
    };
    set(&mut config);
    for key in ["language_config", "text_config"] {
        if let Some(c) = config.get_mut(key) {
            set(c);
        }
    }
    let device = Device::flex();
    let engine = pollster::block_on(Engine::from_parts(&config.to_string(), &read("model.safetensors"), &read("tokenizer.json"), &device, EngineOptions::default())).unwrap();
    assert_eq!(engine.decoder().max_positions(), positions);
    let (g20, g8) = (tokens(20), tokens(8));
    let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = vec![(&note, &free, Mode::Small, &g20), (&page, &free, Mode::Tiny, &g8)];
    let batch = pollster::block_on(engine.recognize_batch(&pages, |_, _| ControlFlow::Continue(())));
    let small = batch[0].as_ref().unwrap();
    assert_eq!((small.finish_reason.as_str(), small.token_ids.len()), ("context_limit", 2));
    let alone = pollster::block_on(full.recognize(&page, &free, Mode::Tiny, &g8, |_| ControlFlow::Continue(()))).unwrap();
    assert_eq!(batch[1].as_ref().unwrap().token_ids, alone.token_ids, "the other page goes on as alone");
}

/// On the GPU (wgpu; lavapipe in CI) with the crate's kernels, float and q4: a batch of pages gives
/// what each gives alone (each sequence's step appends to its own in-place cache and attends
/// there; the weights' products run once for the batch's rows). Skipped without an adapter
/// unless `DSOCR_REQUIRE_WGPU` is set.
#[cfg(feature = "wgpu")]
#[test]
fn a_batch_on_the_gpu_gives_what_each_page_gives_alone() {
    let Some((device, limit)) = dsocr_tests::wgpu_device(false) else { return };
    let (page, note, photo) = (image("page"), image("note"), image("photo"));
    let (free, markdown) = (Task::FreeOcr, Task::Markdown);
    let (g3, g5, g6) = (tokens(3), tokens(5), tokens(6));
    let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> =
        vec![(&page, &free, Mode::Tiny, &g6), (&note, &markdown, Mode::Tiny, &g3), (&photo, &free, Mode::Tiny, &g5)];
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-a");
    for quantize in [None, Some(dsocr::quant::Recipe::preset(dsocr::quant::Preset::Q4, None).unwrap())] {
        let label = if quantize.is_some() { "q4" } else { "f32" };
        let options = EngineOptions { quantize, ..EngineOptions::gpu(limit) };
        let engine = pollster::block_on(Engine::load_dir(&dir, &device, options, None)).unwrap();
        let alone: Vec<Vec<u32>> = pages
            .iter()
            .map(|&(bytes, task, mode, generation)| pollster::block_on(engine.recognize(bytes, task, mode, generation, |_| ControlFlow::Continue(()))).unwrap().token_ids)
            .collect();
        let batch = pollster::block_on(engine.recognize_batch(&pages, |_, _| ControlFlow::Continue(())));
        for (i, (a, b)) in alone.iter().zip(&batch).enumerate() {
            assert_eq!(&b.as_ref().unwrap().token_ids, a, "{label}: page {i}");
        }
    }
}

/// A fault the device reports on its own (a GPU's out-of-memory, recorded by
/// `gpu::DeviceFaults`) ends every page of the batch with `Error::Gpu` at the next step — the pages
/// decoding and the one whose token reported it — and every later page fails at once with it.
#[test]
fn a_device_fault_ends_every_page_and_the_next() {
    let faults = dsocr::gpu::DeviceFaults::default();
    let engine = engine(EngineOptions { device_faults: faults.clone(), ..EngineOptions::default() });
    let (page, note) = (image("page"), image("note"));
    let g8 = tokens(8);
    let pages: Vec<(&[u8], &Task, Mode, &GenerationOptions)> = vec![(&page, &Task::FreeOcr, Mode::Tiny, &g8), (&note, &Task::FreeOcr, Mode::Tiny, &g8)];
    let mut seen = 0;
    let results = pollster::block_on(engine.recognize_batch(&pages, |_, event| {
        seen += 1;
        if event.index == 3 {
            faults.record(true, "Out of Memory");
        }
        ControlFlow::Continue(())
    }));
    assert!(seen < 8, "the pages went on after the fault");
    for result in &results {
        match result {
            Err(dsocr::Error::Gpu { out_of_memory: true, message }) => assert_eq!(message, "Out of Memory"),
            other => panic!("expected the device's fault, got {other:?}"),
        }
    }
    let later = pollster::block_on(engine.recognize(&note, &Task::FreeOcr, Mode::Tiny, &g8, |_| ControlFlow::Continue(())));
    assert!(matches!(later, Err(dsocr::Error::Gpu { .. })), "{later:?}");
    assert!(later.unwrap_err().to_string().starts_with("the GPU ran out of memory"));
}
