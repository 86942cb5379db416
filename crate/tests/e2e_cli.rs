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
        ("model", Value::is_string),
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
    assert_eq!(r["model"], "deepseek-ocr");
    assert_eq!(r["image_size"], serde_json::json!([800, 600]));
    assert_eq!(r["tile_grid"], serde_json::json!([3, 2]));
    assert_eq!(r["image_token_count"], 893);
    assert_eq!(r["finish_reason"], "max_new_tokens");
    assert_eq!(r["ended_without_eos"], true);
}

/// A DeepSeek-OCR-2 checkpoint: picked from its config, the reference's tokens in both its modes,
/// `model` says which; a v1-only mode is a usage error; q8 at load time equals the converted checkpoint.
#[test]
fn e2e_cli_ocr2_checkpoint() {
    let model = checkpoint_dir("ocr2/tiny-v2a").display().to_string();
    for case in cases("ocr2/tiny-v2a").iter().filter(|c| c["image"] == "page") {
        let mode = case["mode"].as_str().unwrap();
        let out = run(&["ocr", &image("page"), "--model", &model, "--mode", mode, "--max-new-tokens", "16", "--repeat-guard", "hf", "--format", "json"]);
        assert!(out.status.success(), "{mode}: {}", String::from_utf8_lossy(&out.stderr));
        let result = &json(&out)["results"][0];
        let mut expected = case["greedy_tokens"].as_array().unwrap().clone();
        if expected.last() == Some(&Value::from(1)) {
            expected.pop();
        }
        assert_eq!(result["token_ids"].as_array().unwrap(), &expected, "tiny-v2a page {mode}");
        assert_eq!(result["image_token_count"], case["image_tokens"]);
        assert_eq!(result["tile_grid"], case["grid"]);
        assert_eq!(result["model"], "deepseek-ocr-2");
    }
    let out = run(&["ocr", &image("note"), "--model", &model, "--mode", "tiny"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("mode tiny does not exist for DeepSeek-OCR-2"), "{stderr}");

    let out_dir = std::env::temp_dir().join(format!("dsocr-e2e-ocr2-q8-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let quantized = out_dir.display().to_string();
    let q = run(&["quantize", &model, "--scheme", "q8", "--out", &quantized]);
    assert!(q.status.success(), "{}", String::from_utf8_lossy(&q.stderr));
    let tokens = |extra: &[&str]| {
        let mut args = vec!["ocr", &image("page"), "--mode", "base", "--max-new-tokens", "6", "--repeat-guard", "hf", "--format", "json"].into_iter().map(String::from).collect::<Vec<_>>();
        args.extend(extra.iter().map(|s| s.to_string()));
        let out = Command::new(env!("CARGO_BIN_EXE_dsocr")).args(&args).output().unwrap();
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        json(&out)["results"][0]["token_ids"].clone()
    };
    let converted = tokens(&["--model", &quantized]);
    assert_eq!(converted, tokens(&["--model", &model, "--quantize", "q8"]), "load-time q8 equals the converted v2 checkpoint");
    assert_eq!(converted.as_array().unwrap().len(), 6);
    let _ = std::fs::remove_dir_all(out_dir);
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

/// A hub mirror on 127.0.0.1: `/{org}/{name}/resolve/main/{file}` serves tiny-a's files (its
/// `model.safetensors` under the original upload's name), honours `Range`, and announces the
/// safetensors sha256 in `X-Linked-ETag` like the hub. Repo `test/drop` cuts the first transfer of the
/// weights short; `test/corrupt` serves one flipped byte.
struct HubMirror {
    port: u16,
    log: std::sync::Arc<std::sync::Mutex<Vec<String>>>,
}

impl HubMirror {
    fn start() -> Self {
        use std::io::{BufRead, BufReader, Write};
        use sha2::Digest;
        let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let log = std::sync::Arc::new(std::sync::Mutex::new(Vec::new()));
        let shared = log.clone();
        std::thread::spawn(move || {
            let mut dropped = false;
            for stream in listener.incoming().take(64) {
                let Ok(mut stream) = stream else { continue };
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut request = String::new();
                reader.read_line(&mut request).unwrap();
                let mut range_start = 0usize;
                loop {
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap() == 0 || line == "\r\n" {
                        break;
                    }
                    if let Some(v) = line.to_ascii_lowercase().strip_prefix("range: bytes=") {
                        range_start = v.trim().trim_end_matches('-').parse().unwrap();
                    }
                }
                let path = request.split_whitespace().nth(1).unwrap_or("/").to_string();
                shared.lock().unwrap().push(format!("{path} from {range_start}"));
                let parts: Vec<&str> = path.trim_start_matches('/').split('/').collect();
                let (repo, file) = (format!("{}/{}", parts[0], parts.get(1).unwrap_or(&"")), parts.last().unwrap().to_string());
                let local = match file.as_str() {
                    "model-00001-of-000001.safetensors" => "model.safetensors",
                    "config.json" | "tokenizer.json" => file.as_str(),
                    _ => "",
                };
                let Ok(mut body) = std::fs::read(checkpoint_dir("tiny-a").join(local)).map_err(|_| ()).and_then(|b| if local.is_empty() { Err(()) } else { Ok(b) }) else {
                    let _ = stream.write_all(b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
                    continue;
                };
                let sha: String = sha2::Sha256::digest(&body).iter().map(|b| format!("{b:02x}")).collect();
                let weights = local == "model.safetensors";
                if weights && repo == "test/corrupt" {
                    let n = body.len() / 2;
                    body[n] ^= 0xff;
                }
                let total = body.len();
                let status = if range_start > 0 { "206 Partial Content" } else { "200 OK" };
                let mut head = format!("HTTP/1.1 {status}\r\ncontent-length: {}\r\nconnection: close\r\n", total - range_start);
                if weights {
                    head += &format!("x-linked-etag: \"{sha}\"\r\n");
                }
                if range_start > 0 {
                    head += &format!("content-range: bytes {range_start}-{}/{total}\r\n", total - 1);
                }
                head += "\r\n";
                let _ = stream.write_all(head.as_bytes());
                let mut rest = &body[range_start..];
                if weights && repo == "test/drop" && !dropped {
                    dropped = true;
                    rest = &rest[..rest.len() / 3]; // the connection drops a third of the way in
                }
                let _ = stream.write_all(rest);
            }
        });
        HubMirror { port, log }
    }

    fn run(&self, home: &Path, args: &[&str]) -> Output {
        Command::new(env!("CARGO_BIN_EXE_dsocr"))
            .args(args)
            .env("HF_ENDPOINT", format!("http://127.0.0.1:{}", self.port))
            .env("HF_HOME", home)
            .output()
            .unwrap()
    }
}

#[test]
fn e2e_cli_downloads_a_repo_from_a_hub_mirror_and_resumes_a_dropped_transfer() {
    let hub = HubMirror::start();
    let home = std::env::temp_dir().join(format!("dsocr-hf-home-{}", std::process::id()));
    let args = ["ocr", &image("note"), "--model", "test/drop", "--mode", "tiny", "--task", "free", "--max-new-tokens", "3", "--format", "json"];
    let out = hub.run(&home, &args);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let expected: Vec<Value> = cases("tiny-a").iter().find(|c| c["image"] == "note" && c["mode"] == "tiny").unwrap()["greedy_tokens"].as_array().unwrap()[..3].to_vec();
    assert_eq!(json(&out)["results"][0]["token_ids"].as_array().unwrap(), &expected);
    let log = hub.log.lock().unwrap().clone();
    assert!(log.iter().any(|l| l.contains("model-00001-of-000001.safetensors from ") && !l.ends_with("from 0")), "a Range request resumed the transfer: {log:?}");
    let snapshot = home.join("hub/models--test--drop/snapshots/main");
    assert!(snapshot.join("model-00001-of-000001.safetensors").is_file());
    // A second run finds everything in the cache and asks the server for nothing.
    let before = hub.log.lock().unwrap().len();
    assert!(hub.run(&home, &args).status.success());
    assert_eq!(hub.log.lock().unwrap().len(), before);
    std::fs::remove_dir_all(&home).unwrap();
}

#[test]
fn e2e_cli_detects_a_corrupted_download() {
    let hub = HubMirror::start();
    let home = std::env::temp_dir().join(format!("dsocr-hf-corrupt-{}", std::process::id()));
    let out = hub.run(&home, &["ocr", &image("note"), "--model", "test/corrupt", "--mode", "tiny", "--max-new-tokens", "1"]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("corrupted download"), "{stderr}");
    assert!(!home.join("hub/models--test--corrupt/snapshots/main/model-00001-of-000001.safetensors").exists());
    std::fs::remove_dir_all(&home).unwrap();
}

/// `dsocr quantize` writes a checkpoint that `dsocr ocr` reads, and `--quantize` on the float
/// checkpoint gives the same tokens; bad arguments fail with exit code 2 and a message.
#[test]
fn e2e_cli_quantize_then_ocr() {
    let out_dir = std::env::temp_dir().join(format!("dsocr-e2e-quantize-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&out_dir);
    let (model, out) = (checkpoint_dir("tiny-a").display().to_string(), out_dir.display().to_string());
    let quantize = run(&["quantize", &model, "--scheme", "q4", "--out", &out, "--shard-mib", "2"]);
    assert!(quantize.status.success(), "{}", String::from_utf8_lossy(&quantize.stderr));
    let stderr = String::from_utf8_lossy(&quantize.stderr);
    assert!(stderr.contains("shards") && stderr.contains("quantized"), "{stderr}");
    let page = image("page");
    let ocr = |extra: &[&str]| {
        let mut args = vec!["ocr", page.as_str(), "--mode", "tiny", "--max-new-tokens", "8", "--repeat-guard", "hf", "--format", "json"];
        args.extend_from_slice(extra);
        let out = run(&args);
        assert!(out.status.success(), "{extra:?}: {}", String::from_utf8_lossy(&out.stderr));
        json(&out)["results"][0]["token_ids"].clone()
    };
    let converted = ocr(&["--model", &out]);
    assert_eq!(converted, ocr(&["--model", &model, "--quantize", "q4"]), "load-time q4 equals the converted checkpoint");
    assert_eq!(converted.as_array().unwrap().len(), 8);
    // Quantizing an already quantized checkpoint at load time with another recipe is refused.
    let refused = run(&["ocr", &image("page"), "--model", &out, "--quantize", "q8", "--mode", "tiny"]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("already quantized"));
    let bad_group = run(&["quantize", &model, "--scheme", "q4", "--group", "48", "--out", &out]);
    assert_eq!(bad_group.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad_group.stderr).contains("group size 48"));
    let _ = std::fs::remove_dir_all(out_dir);
}

/// Native GPU faults: the wgpu device destroyed mid-decode (what a lost device looks like to wgpu)
/// ends the batch with `DEVICE_LOST` naming the input, exit code 2, the JSON results so far printed,
/// and no hang. Runs on the native wgpu device (lavapipe in CI, where `DSOCR_REQUIRE_WGPU` is set);
/// without an adapter it says so and passes, unless that variable is set.
#[test]
fn e2e_cli_a_lost_gpu_device_ends_the_batch_with_exit_2() {
    let model = checkpoint_dir("tiny-a").display().to_string();
    let base = ["ocr", &image("page"), &image("note"), "--model", &model, "--mode", "tiny", "--max-new-tokens", "6", "--device", "wgpu", "--format", "json"];
    let probe = run(&["ocr", &image("note"), "--model", &model, "--mode", "tiny", "--max-new-tokens", "1", "--device", "wgpu"]);
    if !probe.status.success() {
        let stderr = String::from_utf8_lossy(&probe.stderr).to_string();
        assert!(std::env::var_os("DSOCR_REQUIRE_WGPU").is_none(), "no wgpu device: {stderr}");
        eprintln!("SKIPPED: no wgpu device ({})", stderr.lines().last().unwrap_or(""));
        return;
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_dsocr"))
        .args(base)
        .env("DSOCR_FAULT_DESTROY_GPU_AFTER_TOKENS", "2")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(300);
    while child.try_wait().unwrap().is_none() {
        if std::time::Instant::now() > deadline {
            let _ = child.kill();
            panic!("dsocr hung after the GPU device was lost");
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let last = stderr.lines().rev().find(|l| l.starts_with("dsocr: DEVICE_LOST")).unwrap_or_else(|| panic!("no DEVICE_LOST line: {stderr}"));
    assert!(last.contains("page.png") && last.contains("--device cpu"), "{last}");
    let results = json(&out)["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 1, "the batch stopped at the page the device was lost in");
    assert!(results[0]["error"].is_string());
}

/// A GPU out of memory, provoked for real: the CLI runs under a shrinking address-space limit
/// (lavapipe takes GPU memory from the process's own), a Gundam page (the largest activations).
/// Each run either gives the unlimited run's text (the limit was not reached) or ends the batch
/// with `OUT_OF_MEMORY` naming the page, exit code 2, no panic — never other text with exit 0,
/// which is what an out-of-memory gave before the device's faults were recorded (wgpu reports it
/// outside any call and the computation went on with buffers that were never made). Stops at the
/// first out-of-memory. (Far below the window, lavapipe itself crashes compiling a shader.)
#[cfg(all(target_os = "linux", target_env = "gnu"))]
#[test]
fn e2e_cli_a_gpu_out_of_memory_ends_the_batch_with_exit_2() {
    use std::os::unix::process::CommandExt;
    let model = checkpoint_dir("tiny-a").display().to_string();
    let args = ["ocr", &image("page"), "--model", &model, "--mode", "gundam", "--max-new-tokens", "1", "--device", "wgpu"];
    let limited = |megabytes: Option<u64>| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_dsocr"));
        command.args(args);
        if let Some(mb) = megabytes {
            let bytes = mb << 20;
            // SAFETY: only setrlimit between fork and exec (async-signal-safe).
            unsafe {
                command.pre_exec(move || {
                    let limit = libc::rlimit { rlim_cur: bytes, rlim_max: bytes };
                    if libc::setrlimit(libc::RLIMIT_AS, &limit) != 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    Ok(())
                });
            }
        }
        command.output().unwrap()
    };
    let reference = limited(None);
    if !reference.status.success() {
        let stderr = String::from_utf8_lossy(&reference.stderr).to_string();
        assert!(std::env::var_os("DSOCR_REQUIRE_WGPU").is_none(), "no wgpu device: {stderr}");
        eprintln!("SKIPPED: no wgpu device ({})", stderr.lines().last().unwrap_or(""));
        return;
    }
    for mb in (1250..=2250).rev().step_by(250) {
        let out = limited(Some(mb));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(!stderr.contains("panicked"), "{mb} MiB: a panic: {stderr}");
        match out.status.code() {
            Some(0) => assert_eq!(out.stdout, reference.stdout, "{mb} MiB: exit 0 with other text: {stderr}"),
            Some(2) => {
                let last = stderr.lines().rev().find(|l| l.starts_with("dsocr: OUT_OF_MEMORY")).unwrap_or_else(|| panic!("{mb} MiB: no OUT_OF_MEMORY line: {stderr}"));
                assert!(last.contains("page.png"), "{last}");
                eprintln!("{mb} MiB of address space: {last}");
                return;
            }
            other => panic!("{mb} MiB: exit {other:?}: {stderr}"),
        }
    }
    panic!("no out-of-memory down to 1250 MiB of address space");
}
