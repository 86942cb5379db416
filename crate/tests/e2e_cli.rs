//! The `dsocr` command on the tiny checkpoints: the reference's greedy tokens in every mode (through
//! decode, preprocessing, tokenizer, prompt, encoder and decoder), the JSON schema, batches with bad inputs.
//! (Here rather than in `tests/` because cargo builds the binary only for its own package's tests.)

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use serde_json::Value;

const TINY_CHECKPOINTS: [&str; 2] = ["tiny-a", "tiny-b"];

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn checkpoint_dir(name: &str) -> PathBuf {
    fixtures_dir().join(name)
}

/// The greedy cases the reference recorded for a checkpoint (`cases/index.json`).
fn cases(checkpoint: &str) -> Vec<Value> {
    let index: Value = serde_json::from_slice(&std::fs::read(checkpoint_dir(checkpoint).join("cases/index.json")).unwrap()).unwrap();
    index["cases"].as_array().unwrap().clone()
}

fn run(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_dsocr")).args(args).output().unwrap()
}

fn json(out: &Output) -> Value {
    serde_json::from_slice(&out.stdout).unwrap_or_else(|e| panic!("stdout is not JSON ({e}): {}", String::from_utf8_lossy(&out.stdout)))
}

fn image(name: &str) -> String {
    fixtures_dir().join("images").join(format!("{name}.png")).display().to_string()
}

#[test]
fn e2e_cli_reference_greedy_tokens_in_every_mode() {
    for checkpoint in TINY_CHECKPOINTS {
        let model = checkpoint_dir(checkpoint).display().to_string();
        for case in cases(checkpoint).iter().filter(|c| c["image"] == "page") {
            let mode = case["mode"].as_str().unwrap();
            let out = run(&[
                "ocr", &image("page"), "--model", &model, "--mode", mode, "--task", "markdown",
                "--max-new-tokens", "16", "--repeat-guard", "hf", "--format", "json",
            ]);
            assert!(out.status.success(), "{checkpoint} {mode}: {}", String::from_utf8_lossy(&out.stderr));
            let result = &json(&out)["results"][0];
            let mut expected = case["greedy_tokens"].as_array().unwrap().clone();
            if expected.last() == Some(&Value::from(1)) {
                expected.pop(); // EOS is not part of token_ids
            }
            assert_eq!(result["token_ids"].as_array().unwrap(), &expected, "{checkpoint} page {mode}");
            assert_eq!(result["image_token_count"], case["image_tokens"]);
            assert_eq!(result["prompt_token_count"], case["prompt_tokens"]);
        }
    }
}

#[test]
fn e2e_cli_json_follows_the_documented_schema() {
    let model = checkpoint_dir("tiny-b").display().to_string();
    let out = run(&["ocr", &image("photo"), "--model", &model, "--mode", "gundam", "--task", "ocr", "--max-new-tokens", "4", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json(&out);
    let r = &doc["results"][0];
    for (key, check) in [
        ("input", Value::is_string as fn(&Value) -> bool),
        ("page", Value::is_null),
        ("text", Value::is_string),
        ("markdown", Value::is_string),
        ("blocks", Value::is_array),
        ("token_ids", Value::is_array),
        ("image_token_count", Value::is_u64),
        ("prompt_token_count", Value::is_u64),
        ("finish_reason", Value::is_string),
        ("ended_without_eos", Value::is_boolean),
        ("image_size", Value::is_array),
        ("tile_grid", Value::is_array),
        ("timings_ms", Value::is_object),
    ] {
        assert!(check(&r[key]), "{key}: {}", r[key]);
    }
    for stage in ["preprocess", "encode", "prefill", "decode", "total"] {
        assert!(r["timings_ms"][stage].is_number(), "timings_ms.{stage}");
    }
    assert_eq!(r["image_size"], serde_json::json!([800, 600]));
    assert_eq!(r["tile_grid"], serde_json::json!([3, 2]));
    assert_eq!(r["image_token_count"], 893);
    assert_eq!(r["finish_reason"], "max_new_tokens");
    assert_eq!(r["ended_without_eos"], true);
}

#[test]
fn e2e_cli_a_bad_input_is_reported_and_the_batch_goes_on() {
    let dir = std::env::temp_dir().join(format!("dsocr-e2e-{}", std::process::id()));
    std::fs::create_dir_all(dir.join("sub")).unwrap();
    std::fs::write(dir.join("a-broken.png"), b"\x89PNG\r\n\x1a\nnot really").unwrap();
    std::fs::copy(image("note"), dir.join("sub").join("b-note.png")).unwrap();
    std::fs::write(dir.join("notes.txt"), "ignored: not an image").unwrap();
    let model = checkpoint_dir("tiny-a").display().to_string();
    let out_dir = dir.join("out");
    let out = run(&[
        "ocr", dir.to_str().unwrap(), "--model", &model, "--mode", "tiny", "--task", "free",
        "--max-new-tokens", "3", "--format", "json", "--out", out_dir.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(1), "exit code 1 when some inputs failed");
    let doc = json(&out);
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "directories are walked recursively, non-images skipped");
    assert!(results[0]["input"].as_str().unwrap().ends_with("a-broken.png"));
    assert!(results[0]["error"].as_str().unwrap().contains("decode"), "{}", results[0]["error"]);
    assert!(results[1]["input"].as_str().unwrap().ends_with("b-note.png"));
    assert_eq!(results[1]["token_ids"].as_array().unwrap().len(), 3);
    assert!(out_dir.join("b-note.md").is_file() && out_dir.join("b-note.json").is_file());
    std::fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn e2e_cli_usage_errors_exit_2() {
    let out = run(&["ocr", &image("note"), "--model", "/nonexistent/checkpoint"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&out.stderr).contains("not a checkpoint directory"));
    let model = checkpoint_dir("tiny-a").display().to_string();
    let out = run(&["ocr", &image("note"), "--model", &model, "--task", "sing"]);
    assert_eq!(out.status.code(), Some(2));
}

#[test]
fn e2e_cli_pdf_pages_are_rendered_and_numbered() {
    let model = checkpoint_dir("tiny-a").display().to_string();
    let pdf = fixtures_dir().join("images/doc.pdf").display().to_string();
    let out = run(&["ocr", &pdf, "--model", &model, "--mode", "tiny", "--task", "free", "--max-new-tokens", "2", "--format", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let doc = json(&out);
    let results = doc["results"].as_array().unwrap();
    assert_eq!(results.len(), 2, "one result per page");
    for (i, (r, size)) in results.iter().zip([[1190, 1684], [300, 200]]).enumerate() {
        assert_eq!(r["page"], i + 1);
        assert!(r["input"].as_str().unwrap().ends_with("doc.pdf"));
        // The pages were placed at 144 dpi, so rendering at 144 dpi gives the original pixel size.
        assert_eq!(r["image_size"], serde_json::json!(size), "page {}", i + 1);
        assert_eq!(r["token_ids"].as_array().unwrap().len(), 2);
    }
}
