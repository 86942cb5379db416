//! Tensor names and shapes: the model's expectation of the original checkpoint, checked against the real
//! hub index (every name of the 6.7 GB file) and against the tiny checkpoints' safetensors.

use std::collections::BTreeSet;

use burn::tensor::Device;
use dsocr::weights::{Checkpoint, expected_tensors};
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
        let unknown = checkpoint.check(&expected).unwrap();
        assert!(unknown.is_empty(), "{name}: tensors the model does not know: {unknown:?}");
        assert_eq!(checkpoint.names().len(), expected.len(), "{name}");
        for spec in &expected {
            // Stored as bf16 like the real checkpoint; widen and upload each one.
            let values = checkpoint.f32_values(&spec.name, &spec.shape).unwrap();
            assert!(values.iter().all(|v| v.is_finite()), "{name}: {} has non-finite values", spec.name);
            assert!(values.iter().any(|&v| v != 0.0), "{name}: {} is all zeros", spec.name);
            let dims = match spec.shape.len() {
                1 => checkpoint.tensor::<1>(&spec.name, [spec.shape[0]], &device).unwrap().dims().to_vec(),
                2 => checkpoint.tensor::<2>(&spec.name, [spec.shape[0], spec.shape[1]], &device).unwrap().dims().to_vec(),
                4 => checkpoint
                    .tensor::<4>(&spec.name, spec.shape.clone().try_into().unwrap(), &device)
                    .unwrap()
                    .dims()
                    .to_vec(),
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
    match checkpoint.check(&expected_tensors(&b_config)) {
        Err(Error::ShapeMismatch { name, expected, found }) => {
            assert_eq!(name, "model.sam_model.patch_embed.proj.weight");
            assert_eq!((expected[0], found[0]), (48, 32));
        }
        other => panic!("expected a shape mismatch, got {other:?}"),
    }
    assert!(matches!(
        checkpoint.f32_values("model.no_such.weight", &[1]),
        Err(Error::MissingTensor { name }) if name == "model.no_such.weight"
    ));
    assert!(matches!(Checkpoint::parse(&a[..100]), Err(Error::Safetensors(_))));
    assert!(matches!(Checkpoint::parse(b"garbage"), Err(Error::Safetensors(_))));
}
