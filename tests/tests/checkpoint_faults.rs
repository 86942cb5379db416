//! Broken checkpoint folders, loaded the way users load them (`Engine::load_dir`): truncated or
//! corrupt safetensors, a header claiming more bytes than the file has, wrong dtypes and shapes, a
//! missing tensor, a config that does not match the weights, another model's tokenizer, missing
//! files. Each is a typed error whose message names the file and, where there is one, the tensor.

use std::path::{Path, PathBuf};

use burn::tensor::Device;
use dsocr::{Engine, EngineOptions, Error};
use serde_json::Value;

fn tiny_a() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("fixtures/tiny-a")
}

/// A copy of tiny-a in a fresh folder, with `weights` as its safetensors file (None: left out).
fn folder(name: &str, weights: Option<&[u8]>, config: Option<&str>, tokenizer: Option<&[u8]>) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("dsocr-faults-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let original = |f: &str| std::fs::read(tiny_a().join(f)).unwrap();
    std::fs::write(dir.join("config.json"), config.map_or_else(|| original("config.json"), |c| c.as_bytes().to_vec())).unwrap();
    std::fs::write(dir.join("tokenizer.json"), tokenizer.map_or_else(|| original("tokenizer.json"), <[u8]>::to_vec)).unwrap();
    if let Some(weights) = weights {
        std::fs::write(dir.join("model.safetensors"), weights).unwrap();
    }
    dir
}

fn load(dir: &Path) -> Result<Engine, Error> {
    let result = pollster::block_on(Engine::load_dir(dir, &Device::flex(), EngineOptions::default(), None));
    let _ = std::fs::remove_dir_all(dir);
    result
}

fn weights() -> Vec<u8> {
    std::fs::read(tiny_a().join("model.safetensors")).unwrap()
}

/// The safetensors header (JSON) and the data after it.
fn split(file: &[u8]) -> (serde_json::Map<String, Value>, &[u8]) {
    let n = u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    (serde_json::from_slice(&file[8..8 + n]).unwrap(), &file[8 + n..])
}

/// A safetensors file from a header and data (the header padded to 8 bytes, as safetensors writes it).
fn join(header: &serde_json::Map<String, Value>, data: &[u8]) -> Vec<u8> {
    let mut json = serde_json::to_vec(header).unwrap();
    json.resize(json.len().div_ceil(8) * 8, b' ');
    let mut out = (json.len() as u64).to_le_bytes().to_vec();
    out.extend_from_slice(&json);
    out.extend_from_slice(data);
    out
}

/// tiny-a's weights with one tensor's header entry changed by `edit`.
fn edited(tensor: &str, edit: impl FnOnce(&mut serde_json::Map<String, Value>)) -> Vec<u8> {
    let file = weights();
    let (mut header, data) = split(&file);
    assert!(header.contains_key(tensor), "{tensor}");
    edit(&mut header);
    join(&header, data)
}

fn says(error: &Error, parts: &[&str]) {
    let message = error.to_string();
    for part in parts {
        assert!(message.contains(part), "{message:?} should name {part:?}");
    }
}

const TENSOR: &str = "model.sam_model.blocks.0.attn.qkv.weight";

#[test]
fn broken_safetensors_files_are_typed_errors_naming_the_file() {
    let file = weights();
    let header_len = 8 + u64::from_le_bytes(file[..8].try_into().unwrap()) as usize;
    // Cut inside the data, cut inside the header, a header that is not JSON, a header length larger
    // than the file, random bytes.
    let mut bad_json = file.clone();
    bad_json[8] = b'!';
    let mut long_header = file.clone();
    long_header[..8].copy_from_slice(&(file.len() as u64 * 2).to_le_bytes());
    for (name, bytes) in [
        ("cut-data", file[..header_len + 1000].to_vec()),
        ("cut-header", file[..header_len / 2].to_vec()),
        ("not-json", bad_json),
        ("long-header", long_header),
        ("tiny", b"\x01".to_vec()),
    ] {
        let error = load(&folder(name, Some(&bytes), None, None)).expect_err(name);
        assert!(matches!(&error, Error::InFile { source, .. } if matches!(**source, Error::Safetensors(_))), "{name}: {error:?}");
        says(&error, &["model.safetensors"]);
    }
    // The header promises more data than the file holds: its last tensor ends past the end.
    let (mut header, data) = split(&file);
    let (last, _) = header.iter().filter(|(k, _)| *k != "__metadata__").max_by_key(|(_, v)| v["data_offsets"][1].as_u64().unwrap()).map(|(k, v)| (k.clone(), v.clone())).unwrap();
    let end = header[&last]["data_offsets"][1].as_u64().unwrap();
    header.get_mut(&last).unwrap()["data_offsets"][1] = (end + 4096).into();
    let error = load(&folder("past-end", Some(&join(&header, data)), None, None)).expect_err("past the end");
    says(&error, &["model.safetensors"]);
}

#[test]
fn a_wrong_dtype_shape_or_name_is_an_error_naming_file_and_tensor() {
    // BF16 → I16 (same size, so the file stays consistent): not a float.
    let dtype = edited(TENSOR, |h| h.get_mut(TENSOR).unwrap()["dtype"] = "I16".into());
    let error = load(&folder("dtype", Some(&dtype), None, None)).expect_err("dtype");
    assert!(matches!(&error, Error::InFile { source, .. } if matches!(**source, Error::UnsupportedDtype { .. })), "{error:?}");
    says(&error, &["model.safetensors", TENSOR, "I16"]);
    // The same elements in another shape.
    let shape = edited(TENSOR, |h| {
        let s: Vec<u64> = h[TENSOR]["shape"].as_array().unwrap().iter().map(|v| v.as_u64().unwrap()).collect();
        h.get_mut(TENSOR).unwrap()["shape"] = serde_json::json!([s[1], s[0]]);
    });
    let error = load(&folder("shape", Some(&shape), None, None)).expect_err("shape");
    assert!(matches!(&error, Error::InFile { source, .. } if matches!(**source, Error::ShapeMismatch { .. })), "{error:?}");
    says(&error, &["model.safetensors", TENSOR]);
    // The tensor under another name: the model's name is missing.
    let renamed = edited(TENSOR, |h| {
        let entry = h.remove(TENSOR).unwrap();
        h.insert(format!("{TENSOR}_renamed"), entry);
    });
    let error = load(&folder("missing", Some(&renamed), None, None)).expect_err("missing");
    assert!(matches!(&error, Error::InFile { source, .. } if matches!(**source, Error::MissingTensor { .. })), "{error:?}");
    says(&error, &["model.safetensors", TENSOR, "missing"]);
}

#[test]
fn a_config_or_tokenizer_from_elsewhere_is_an_error() {
    // The config of another size (tiny-b's) over tiny-a's weights: the first tensor that differs.
    let b_config = std::fs::read_to_string(tiny_a().join("../tiny-b/config.json")).unwrap();
    let error = load(&folder("config-b", Some(&weights()), Some(&b_config), None)).expect_err("config");
    assert!(matches!(&error, Error::InFile { source, .. } if matches!(**source, Error::ShapeMismatch { .. })), "{error:?}");
    says(&error, &["model.safetensors", "model.sam_model.patch_embed.proj.weight", "expected [48"]);
    // Not JSON; valid JSON that is not a config.
    for (name, text) in [("not-json", "{ hidden_size: 48"), ("not-config", "{\"hello\": 1}")] {
        let error = load(&folder(name, Some(&weights()), Some(text), None)).expect_err(name);
        assert!(matches!(error, Error::Config(_)), "{name}: {error:?}");
    }
    // Another model's tokenizer (a word-level one without DeepSeek's special tokens), and garbage.
    let other = serde_json::json!({
        "version": "1.0", "truncation": null, "padding": null, "added_tokens": [], "normalizer": null,
        "pre_tokenizer": { "type": "Whitespace" }, "post_processor": null, "decoder": null,
        "model": { "type": "WordLevel", "vocab": { "[UNK]": 0, "hello": 1, "world": 2 }, "unk_token": "[UNK]" }
    });
    let error = load(&folder("tokenizer", Some(&weights()), None, Some(other.to_string().as_bytes()))).expect_err("tokenizer");
    assert!(matches!(error, Error::Tokenizer(_)), "{error:?}");
    says(&error, &["tokenizer.json does not belong to this model", "no `<image>` token"]);
    let error = load(&folder("tokenizer-junk", Some(&weights()), None, Some(b"[1, 2"))).expect_err("junk");
    assert!(matches!(error, Error::Tokenizer(_)), "{error:?}");
    // Files missing.
    let error = load(&folder("no-weights", None, None, None)).expect_err("no weights");
    assert!(matches!(error, Error::Io(_)), "{error:?}");
    says(&error, &["model.safetensors"]);
    let dir = folder("no-tokenizer", Some(&weights()), None, None);
    std::fs::remove_file(dir.join("tokenizer.json")).unwrap();
    let error = load(&dir).expect_err("no tokenizer");
    says(&error, &["tokenizer.json"]);
}
