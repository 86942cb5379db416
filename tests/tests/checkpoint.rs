//! Tensor names and shapes: the model's expectation of the original checkpoint, checked against the real
//! hub index (every name of the 6.7 GB file) and against the tiny checkpoints' safetensors.

use std::cell::RefCell;
use std::collections::BTreeSet;
use std::rc::Rc;

use burn::tensor::Device;
use dsocr::weights::{Checkpoint, LocalBoxFuture, RangeFetch, expected_tensors};
use pollster::block_on;
use dsocr::{Config, Error};
use dsocr_tests::{TINY_CHECKPOINTS, checkpoint_dir, fixtures_dir, read_fixture};

fn load_config(dir: &std::path::Path) -> Config {
    Config::from_json(&String::from_utf8(read_fixture(&dir.join("config.json"))).unwrap()).unwrap()
}

#[test]
fn hub_config_expects_exactly_the_tensors_of_the_real_checkpoint() {
    let config = load_config(&fixtures_dir().join("hub"));
    let expected = expected_tensors(&config);
    let index: serde_json::Value = serde_json::from_slice(&read_fixture(&fixtures_dir().join("hub/model.safetensors.index.json"))).unwrap();
    let real: BTreeSet<&str> = index["weight_map"].as_object().unwrap().keys().map(String::as_str).collect();
    let ours: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    assert_eq!(ours.len(), expected.len(), "duplicate names");
    assert_eq!(real.len(), 2710);
    let missing: Vec<_> = real.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&real).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not expected: {missing:?}; not in the checkpoint: {extra:?}");

    // Shapes: the parameter count (and the bf16 byte total of the index) of the real model (spec App. B).
    let params: usize = expected.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    assert_eq!(params, 3_336_106_240);
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap() as usize, params * 2);
}

#[test]
fn every_tensor_of_the_tiny_checkpoints_reads_by_name_with_its_shape() {
    let device = Device::flex();
    for name in TINY_CHECKPOINTS {
        let dir = checkpoint_dir(name);
        let config = load_config(&dir);
        let bytes = read_fixture(&dir.join("model.safetensors"));
        let checkpoint = Checkpoint::parse(&bytes).unwrap();
        let expected = expected_tensors(&config);
        let unknown = checkpoint.check(&expected, None).unwrap();
        assert!(unknown.is_empty(), "{name}: tensors the model does not know: {unknown:?}");
        assert_eq!(checkpoint.names().len(), expected.len(), "{name}");
        for spec in &expected {
            // Stored as bf16 like the real checkpoint; widen and upload each one.
            let values = block_on(checkpoint.f32_values(&spec.name, &spec.shape)).unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}: {} has non-finite values", spec.name);
            assert!(values.iter().any(|&v| v != 0.0), "{name}: {} is all zeros", spec.name);
            let dims = match spec.shape.len() {
                1 => block_on(checkpoint.tensor::<1>(&spec.name, [spec.shape[0]], &device)).unwrap().dims().to_vec(),
                2 => block_on(checkpoint.tensor::<2>(&spec.name, [spec.shape[0], spec.shape[1]], &device)).unwrap().dims().to_vec(),
                4 => block_on(checkpoint.tensor::<4>(&spec.name, spec.shape.clone().try_into().unwrap(), &device)).unwrap().dims().to_vec(),
                n => panic!("{}: unexpected rank {n}", spec.name),
            };
            assert_eq!(dims, spec.shape, "{name}: {}", spec.name);
        }
    }
}

#[test]
fn a_checkpoint_for_another_config_is_rejected_naming_the_tensor() {
    let a = read_fixture(&checkpoint_dir("tiny-a").join("model.safetensors"));
    let b_config = load_config(&checkpoint_dir("tiny-b"));
    let checkpoint = Checkpoint::parse(&a).unwrap();
    match checkpoint.check(&expected_tensors(&b_config), None) {
        Err(Error::ShapeMismatch { name, expected, found }) => {
            assert_eq!(name, "model.sam_model.patch_embed.proj.weight");
            assert_eq!((expected[0], found[0]), (48, 32));
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(matches!(
        block_on(checkpoint.f32_values("model.no_such.weight", &[1])),
        Err(Error::MissingTensor { name }) if name == "model.no_such.weight"
    ));
    assert!(matches!(Checkpoint::parse(&a[..100]), Err(Error::Safetensors(_))));
    assert!(matches!(Checkpoint::parse(b"garbage"), Err(Error::Safetensors(_))));
}

/// A file served by byte ranges from memory, recording every request (what the browser's HTTP Range
/// reader does over the network).
struct RecordedRanges {
    file: Rc<Vec<u8>>,
    requests: Rc<RefCell<Vec<(u64, u64)>>>,
}

impl RangeFetch for RecordedRanges {
    fn fetch(&self, start: u64, end: u64) -> LocalBoxFuture<'_, dsocr::Result<Vec<u8>>> {
        self.requests.borrow_mut().push((start, end));
        let bytes = self.file.get(start as usize..end as usize).map(<[u8]>::to_vec);
        Box::pin(async move { bytes.ok_or_else(|| Error::Download(format!("bytes {start}..{end} beyond the file"))) })
    }
}

fn ranged(file: Vec<u8>, window: usize) -> (dsocr::Result<Checkpoint<'static>>, Rc<RefCell<Vec<(u64, u64)>>>) {
    let requests = Rc::new(RefCell::new(Vec::new()));
    let fetch = RecordedRanges { file: Rc::new(file), requests: requests.clone() };
    (block_on(Checkpoint::open(Box::new(fetch), window)), requests)
}

/// Through byte ranges every tensor reads exactly as from the whole file; no request is larger than
/// the read-ahead window or the tensor asked for, so memory never holds more than that.
#[test]
fn a_ranged_checkpoint_reads_every_tensor_as_the_whole_file_does() {
    let dir = checkpoint_dir("tiny-a");
    let config = load_config(&dir);
    let bytes = read_fixture(&dir.join("model.safetensors"));
    let whole = Checkpoint::parse(&bytes).unwrap();
    const WINDOW: usize = 256 << 10;
    let (opened, requests) = ranged(bytes.clone(), WINDOW);
    let ranged = opened.unwrap();
    let expected = expected_tensors(&config);
    assert!(ranged.check(&expected, None).unwrap().is_empty());
    let mut largest = 0;
    for spec in &expected {
        let a = block_on(whole.f32_values(&spec.name, &spec.shape)).unwrap();
        let b = block_on(ranged.f32_values(&spec.name, &spec.shape)).unwrap();
        assert!(a == b, "{} differs", spec.name);
        largest = largest.max(a.len() * 2);
        // Rows read alone touch only their own bytes.
        if spec.shape.len() == 2 && spec.shape[0] > 3 {
            let rows = block_on(ranged.f32_rows(&spec.name, &spec.shape, 1..3)).unwrap();
            assert_eq!(rows, a[spec.shape[1]..3 * spec.shape[1]], "{} rows 1..3", spec.name);
        }
    }
    let requests = requests.borrow();
    assert_eq!(requests[..2], [(0, 8), (8, 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()))], "header first");
    let biggest_request = requests.iter().map(|(s, e)| (e - s) as usize).max().unwrap();
    assert!(biggest_request <= WINDOW.max(largest), "a request of {biggest_request} bytes");
    eprintln!("{} requests for {} bytes, largest {biggest_request}", requests.len(), bytes.len());
}

/// The whole model loads through ranges (as in the browser) and gives the reference's greedy tokens.
#[test]
fn a_model_loaded_through_byte_ranges_gives_the_reference_tokens() {
    let dir = checkpoint_dir("tiny-b");
    let (opened, requests) = ranged(read_fixture(&dir.join("model.safetensors")), 1 << 20);
    let checkpoint = opened.unwrap();
    let config = String::from_utf8(read_fixture(&dir.join("config.json"))).unwrap();
    let tokenizer = read_fixture(&dir.join("tokenizer.json"));
    let progress = RefCell::new(Vec::new());
    let report = |loaded: u64, total: u64| progress.borrow_mut().push((loaded, total));
    let engine = block_on(dsocr::Engine::from_checkpoint(
        &config,
        &checkpoint,
        &tokenizer,
        &Device::flex(),
        dsocr::EngineOptions::default(),
        Some(&report),
    ))
    .unwrap();
    let progress = progress.into_inner();
    assert!(progress.windows(2).all(|w| w[0].0 <= w[1].0), "progress never goes back");
    let &(loaded, total) = progress.last().unwrap();
    assert_eq!((loaded, total), (checkpoint.data_len() as u64, checkpoint.data_len() as u64), "progress ends at 100%");
    assert!(requests.borrow().len() < 100, "{} requests", requests.borrow().len());

    let case = dsocr_tests::CaseIndex::load("tiny-b").cases.into_iter().find(|c| c.image == "page" && c.mode == "tiny").unwrap();
    assert!(case.prompt.contains("Convert the document to markdown"));
    let image = read_fixture(&fixtures_dir().join("images/page.png"));
    let generation = dsocr::GenerationOptions {
        max_new_tokens: 16,
        repeat_guard: dsocr::RepeatGuard::hf(),
        ..dsocr::GenerationOptions::default()
    };
    let result = block_on(engine.recognize(&image, &dsocr::Task::Markdown, dsocr::Mode::Tiny, &generation, |_| std::ops::ControlFlow::Continue(()))).unwrap();
    let mut ids = result.token_ids.clone();
    if result.finish_reason == "stop" {
        ids.push(1);
    }
    assert_eq!(ids, case.greedy_tokens);
}

/// Truncated, garbage and lying files fail with typed errors through ranges too (no panic).
#[test]
fn a_bad_file_read_through_ranges_is_a_typed_error() {
    let bytes = read_fixture(&checkpoint_dir("tiny-a").join("model.safetensors"));
    assert!(matches!(ranged(b"garbage".to_vec(), 1024).0, Err(Error::Download(_))));
    assert!(matches!(ranged(b"\xff\xff\xff\xff\xff\xff\xff\x7fxyz".to_vec(), 1024).0, Err(Error::Safetensors(_))));
    let header_end = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    let mut bad_header = bytes[..header_end].to_vec();
    bad_header[9] = b'!';
    assert!(matches!(ranged(bad_header, 1024).0, Err(Error::Safetensors(_))));
    // The header is intact but the data stops early: the first tensor read past the end fails.
    let (opened, _) = ranged(bytes[..header_end + 1000].to_vec(), 1 << 20);
    let truncated = opened.unwrap();
    let config = load_config(&checkpoint_dir("tiny-a"));
    let last = expected_tensors(&config).into_iter().last().unwrap();
    assert!(matches!(block_on(truncated.f32_values(&last.name, &last.shape)), Err(Error::Download(_))));
}
