//! DeepSeek-OCR-2 against its official code (`tests/reference/generate_v2.py`; CPU backend, f32): the
//! hub config and the real checkpoint's tensor names, preprocessing (view hashes of 16 images in both
//! modes), every encoder stage (SAM at the 64×64 and 48×48 grids, both convs, the query encoder, the
//! projector), the assembled image sequence, the decoder's logits and the greedy tokens, for two tiny
//! v2 checkpoints. The query encoder's mask is checked to matter: a plain causal mask fails.

use std::collections::BTreeSet;

use burn::tensor::Device;
use dsocr::config::ModelVersion;
use dsocr::image::{DecodeLimits, PreprocessOptions, decode, make_views_for};
use dsocr::model::layout::image_tokens;
use dsocr::weights::{Checkpoint, expected_tensors};
use dsocr::{Config, Error, Mode};
use dsocr_tests::parity::{encoder_parity, greedy_parity, load_model, logits_parity};
use dsocr_tests::{CaseIndex, TINY_V2_CHECKPOINTS, Tolerance, assert_close, assert_views_match, checkpoint_dir, compare, fixtures_dir, hashed_cases, read_fixture, to_array, to_tensor, views_for};

const TOLERANCE: Tolerance = Tolerance::RelativeToMax(1e-4);

fn config_at(dir: &std::path::Path) -> Config {
    Config::from_json(&String::from_utf8(read_fixture(&dir.join("config.json"))).unwrap()).unwrap()
}

#[test]
fn hub_v2_config_resolves_and_expects_exactly_the_real_tensors() {
    let c = config_at(&fixtures_dir().join("hub-ocr2"));
    assert_eq!(c.version(), ModelVersion::Ocr2);
    // The hub file says 1024 for SAM's last conv; it outputs the query encoder's 896.
    assert_eq!(c.sam.downsample_channels, [512, 896]);
    let q = c.queries().unwrap();
    assert_eq!((q.hidden_size, q.layers, q.heads, q.kv_heads, q.head_dim, q.intermediate_size), (896, 24, 14, 2, 64, 4864));
    assert_eq!((q.rope_theta, q.query_sets), (1e6, [(768, 144), (1024, 256)]));
    assert_eq!((c.projector.input_dim, c.projector.n_embed), (896, 1280));
    assert!(c.clip().is_none());

    let expected = expected_tensors(&c);
    let index: serde_json::Value = serde_json::from_slice(&read_fixture(&fixtures_dir().join("hub-ocr2/model.safetensors.index.json"))).unwrap();
    let real: BTreeSet<&str> = index["weight_map"].as_object().unwrap().keys().map(String::as_str).collect();
    let ours: BTreeSet<&str> = expected.iter().map(|t| t.name.as_str()).collect();
    assert_eq!((real.len(), ours.len(), expected.len()), (2707, 2707, 2707));
    let missing: Vec<_> = real.difference(&ours).collect();
    let extra: Vec<_> = ours.difference(&real).collect();
    assert!(missing.is_empty() && extra.is_empty(), "not expected: {missing:?}; not in the checkpoint: {extra:?}");
    let params: usize = expected.iter().map(|t| t.shape.iter().product::<usize>()).sum();
    assert_eq!(params, 3_389_119_360);
    // The index's total_size is 1,010,688 bytes more than these parameters in bf16 (v1's index matches
    // exactly): some tensors are presumably stored wider; which ones only the shard headers would say.
    assert_eq!(index["metadata"]["total_size"].as_u64().unwrap() as usize, params * 2 + 1_010_688);
}

#[test]
fn tiny_v2_checkpoints_hold_exactly_the_expected_tensors() {
    for name in TINY_V2_CHECKPOINTS {
        let dir = checkpoint_dir(name);
        let config = config_at(&dir);
        assert_eq!(config.version(), ModelVersion::Ocr2, "{name}");
        let bytes = read_fixture(&dir.join("model.safetensors"));
        let checkpoint = Checkpoint::parse(&bytes).unwrap();
        let expected = expected_tensors(&config);
        assert!(checkpoint.check(&expected, None).unwrap().is_empty(), "{name}: unknown tensors");
        assert_eq!(checkpoint.names().len(), expected.len(), "{name}");
    }
    let a = config_at(&checkpoint_dir("ocr2/tiny-v2a"));
    let q = a.queries().unwrap();
    assert_eq!((q.hidden_size, q.layers, q.heads, q.kv_heads, q.intermediate_size), (40, 2, 4, 2, 64));
}

#[test]
fn a_v2_config_whose_last_conv_disagrees_with_its_tensors_is_a_typed_error() {
    // The query width in config.json says 48, the checkpoint's tensors are 40 wide: the load names the tensor.
    let dir = checkpoint_dir("ocr2/tiny-v2a");
    let mut cfg: serde_json::Value = serde_json::from_slice(&read_fixture(&dir.join("config.json"))).unwrap();
    cfg["vision_config"]["width"]["qwen2-0-5b"]["dim"] = 48.into();
    cfg["projector_config"]["input_dim"] = 48.into();
    let config = Config::from_json(&cfg.to_string()).unwrap();
    let bytes = read_fixture(&dir.join("model.safetensors"));
    let err = Checkpoint::parse(&bytes).unwrap().check(&expected_tensors(&config), None).unwrap_err();
    assert!(matches!(err, Error::ShapeMismatch { .. }), "{err}");
    assert!(err.to_string().contains("model.sam_model.net_3.weight"), "{err}");
}

#[test]
fn v2_has_base_and_gundam_only() {
    assert_eq!(Mode::available(ModelVersion::Ocr2), &[Mode::Base, Mode::Gundam]);
    for mode in [Mode::Tiny, Mode::Small, Mode::Large] {
        let err = mode.geometry(ModelVersion::Ocr2).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)) && err.to_string().contains("base or gundam"), "{err}");
    }
    let g = Mode::Gundam.geometry(ModelVersion::Ocr2).unwrap();
    assert_eq!((g.global, g.squash, g.tile, g.default_max_tiles), (1024, false, Some(768), 6));
}

#[test]
fn v2_preprocessing_equals_the_official_infer() {
    let cases = hashed_cases(&fixtures_dir().join("ocr2/preprocess.json"));
    assert_eq!(cases.len(), 32);
    for (key, case) in &cases {
        let bytes = read_fixture(&fixtures_dir().join("images").join(format!("{}.png", case.image)));
        let source = decode(&bytes, &DecodeLimits::default()).unwrap();
        let geometry = case.mode.parse::<Mode>().unwrap().geometry(ModelVersion::Ocr2).unwrap();
        let views = make_views_for(&source, &geometry, &PreprocessOptions::default()).unwrap();
        assert_eq!(image_tokens(ModelVersion::Ocr2, &geometry, views.grid), case.image_tokens, "{key}: <image> count");
        assert_views_match(key, &views, case);
    }
}

macro_rules! v2_parity {
    ($($encoder:ident, $logits:ident, $greedy:ident: $checkpoint:literal, $mode:literal;)*) => {$(
        #[test]
        fn $encoder() {
            encoder_parity(&load_model($checkpoint, &Device::flex(), usize::MAX), $checkpoint, $mode, TOLERANCE);
        }
        #[test]
        fn $logits() {
            logits_parity(&load_model($checkpoint, &Device::flex(), usize::MAX), $checkpoint, $mode, TOLERANCE);
        }
        #[test]
        fn $greedy() {
            greedy_parity(&load_model($checkpoint, &Device::flex(), usize::MAX), $checkpoint, $mode, None);
        }
    )*};
}

v2_parity! {
    parity_v2_encoder_a_base, parity_v2_logits_a_base, parity_v2_greedy_a_base: "ocr2/tiny-v2a", "base";
    parity_v2_encoder_a_gundam, parity_v2_logits_a_gundam, parity_v2_greedy_a_gundam: "ocr2/tiny-v2a", "gundam";
    parity_v2_encoder_b_base, parity_v2_logits_b_base, parity_v2_greedy_b_base: "ocr2/tiny-v2b", "base";
    parity_v2_encoder_b_gundam, parity_v2_logits_b_gundam, parity_v2_greedy_b_gundam: "ocr2/tiny-v2b", "gundam";
}

#[test]
fn the_query_mask_matters_a_plain_causal_mask_fails_parity() {
    let checkpoint = "ocr2/tiny-v2a";
    let device = Device::flex();
    let model = load_model(checkpoint, &device, usize::MAX);
    let case = CaseIndex::load(checkpoint).cases.into_iter().find(|c| c.image == "page" && c.mode == "base").unwrap();
    let fixture = case.fixture(checkpoint);
    let views = views_for(checkpoint, "page", "base");
    let features = model.encoder.encode_views(to_tensor(&views.global, &device)).unwrap();
    let reference = fixture.f32("global.queries");
    assert_close("official mask", &to_array(features.tower.clone()), &reference, TOLERANCE);
    let causal = model.encoder.query_encoder().unwrap().forward_causal(features.sam.compressed.clone()).unwrap();
    let c = compare(&to_array(causal), &reference, TOLERANCE).unwrap();
    assert!(!c.passed, "a causal mask matched the reference (max error {}): the mask test cannot tell them apart", c.max_abs_err);
    eprintln!("causal mask: max error {} (relative {})", c.max_abs_err, c.max_rel_err);
}
