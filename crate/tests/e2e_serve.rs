//! `dsocr serve` on the tiny checkpoint, through a real HTTP client on 127.0.0.1: every endpoint,
//! results equal to the reference's greedy tokens (what the CLI is checked against), SSE order and
//! completeness, the OpenAI chat API, limits (413, 415, 429, 504), auth, bad images, a client that
//! disconnects, SIGTERM draining. Each server binds port 0 and prints its address.

use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use serde_json::{Value, json};

fn fixtures_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures")
}

fn page_png() -> Vec<u8> {
    std::fs::read(fixtures_dir().join("images/page.png")).unwrap()
}

/// The reference's 16 greedy tokens for page.png in Tiny mode (markdown task, hf guard).
fn reference_tokens() -> Vec<Value> {
    let index: Value = serde_json::from_slice(&std::fs::read(fixtures_dir().join("tiny-a/cases/index.json")).unwrap()).unwrap();
    let case = index["cases"].as_array().unwrap().iter().find(|c| c["image"] == "page" && c["mode"] == "tiny").unwrap().clone();
    let mut tokens = case["greedy_tokens"].as_array().unwrap().clone();
    if tokens.last() == Some(&Value::from(1)) {
        tokens.pop();
    }
    tokens
}

struct Server {
    child: Child,
    base: String,
}

impl Server {
    fn start(extra: &[&str]) -> Server {
        let model = fixtures_dir().join("tiny-a").display().to_string();
        let mut child = Command::new(env!("CARGO_BIN_EXE_dsocr"))
            .args(["serve", "--model", &model, "--port", "0", "--mode", "tiny", "--max-new-tokens", "4096"])
            .args(extra)
            .stderr(Stdio::piped())
            .stdout(Stdio::null())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let base = rx.recv_timeout(Duration::from_secs(60)).expect("the server printed no address");
        let server = Server { child, base };
        let deadline = Instant::now() + Duration::from_secs(60);
        while server.get("/readyz").0 != 200 {
            assert!(Instant::now() < deadline, "the model did not load within 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        server
    }

    fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    fn get(&self, path: &str) -> (u16, String) {
        let response = agent().get(&self.url(path)).call().unwrap();
        let status = response.status().as_u16();
        (status, response.into_body().read_to_string().unwrap())
    }

    fn post(&self, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Reply {
        let mut request = agent().post(&self.url(path));
        for (name, value) in headers {
            request = request.header(*name, *value);
        }
        let response = request.send(body).unwrap();
        let status = response.status().as_u16();
        let retry_after = response.headers().get("retry-after").map(|v| v.to_str().unwrap().to_string());
        let text = response.into_body().with_config().limit(64 << 20).read_to_string().unwrap();
        Reply { status, retry_after, text }
    }

    fn post_json(&self, path: &str, body: &Value) -> Reply {
        self.post(path, &[("Content-Type", "application/json")], body.to_string().as_bytes())
    }

    /// The value of a metric line (`name{labels} value`) summed over its series.
    fn metric(&self, name: &str) -> f64 {
        let (_, text) = self.get("/metrics");
        text.lines()
            .filter(|l| l.split(['{', ' ']).next() == Some(name))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum()
    }

    fn terminate(&self) {
        assert!(Command::new("kill").args(["-TERM", &self.child.id().to_string()]).status().unwrap().success());
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

struct Reply {
    status: u16,
    retry_after: Option<String>,
    text: String,
}

impl Reply {
    fn json(&self) -> Value {
        serde_json::from_str(&self.text).unwrap_or_else(|e| panic!("not JSON ({e}): {}", self.text))
    }
}

fn agent() -> ureq::Agent {
    ureq::Agent::config_builder().http_status_as_error(false).timeout_global(Some(Duration::from_secs(120))).build().into()
}

const PNG: (&str, &str) = ("Content-Type", "image/png");
const TINY_16: &str = "/v1/ocr?mode=tiny&max_new_tokens=16&repeat_guard=hf&task=markdown";

/// Server-sent events of a body: `(event name, data)` in order.
fn sse_events(body: impl Read) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let (mut name, mut data) = (String::new(), String::new());
    for line in BufReader::new(body).lines().map_while(Result::ok) {
        if line.is_empty() {
            if !data.is_empty() {
                out.push((std::mem::take(&mut name), std::mem::take(&mut data)));
            }
        } else if let Some(v) = line.strip_prefix("event:") {
            name = v.trim().to_string();
        } else if let Some(v) = line.strip_prefix("data:") {
            data.push_str(v.strip_prefix(' ').unwrap_or(v));
        }
    }
    out
}

fn data_url(png: &[u8]) -> String {
    // A tiny base64 encoder keeps the tests free of another dependency.
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::from("data:image/png;base64,");
    for chunk in png.chunks(3) {
        let b = [chunk[0], *chunk.get(1).unwrap_or(&0), *chunk.get(2).unwrap_or(&0)];
        let n = (u32::from(b[0]) << 16) | (u32::from(b[1]) << 8) | u32::from(b[2]);
        for i in 0..4 {
            out.push(if i <= chunk.len() { ALPHABET[(n >> (18 - 6 * i) & 63) as usize] as char } else { '=' });
        }
    }
    out
}

fn chat_request(stream: bool, max_tokens: usize) -> Value {
    json!({
        "model": "tiny-a",
        "messages": [{ "role": "user", "content": [
            { "type": "image_url", "image_url": { "url": data_url(&page_png()) } },
            { "type": "text", "text": "<|grounding|>Convert the document to markdown." },
        ]}],
        "max_tokens": max_tokens,
        "stream": stream,
        "stream_options": { "include_usage": true },
        "mode": "tiny",
        "repeat_guard": "hf",
    })
}

#[test]
fn e2e_serve_endpoints_results_and_streams() {
    let server = Server::start(&[]);
    assert_eq!(server.get("/healthz").0, 200);
    let (status, models) = server.get("/v1/models");
    assert_eq!(status, 200);
    let models: Value = serde_json::from_str(&models).unwrap();
    assert!(models["data"][0]["id"].as_str().unwrap().ends_with("tiny-a"));

    // Raw body: the reference's tokens, as the CLI gives them.
    let reply = server.post(TINY_16, &[PNG], &page_png());
    assert_eq!(reply.status, 200, "{}", reply.text);
    let raw = reply.json();
    let result = &raw["results"][0];
    assert_eq!(result["token_ids"].as_array().unwrap(), &reference_tokens());
    assert_eq!(result["page"], Value::Null);
    assert_eq!(result["finish_reason"], "max_new_tokens");

    // Multipart with the options as form fields: the same result.
    let boundary = "dsocr-test-boundary";
    let mut form = Vec::new();
    for (name, value) in [("mode", "tiny"), ("max_new_tokens", "16"), ("repeat_guard", "hf")] {
        form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"{name}\"\r\n\r\n{value}\r\n").bytes());
    }
    form.extend(format!("--{boundary}\r\nContent-Disposition: form-data; name=\"file\"; filename=\"page.png\"\r\nContent-Type: image/png\r\n\r\n").bytes());
    form.extend(page_png());
    form.extend(format!("\r\n--{boundary}--\r\n").bytes());
    let content_type = format!("multipart/form-data; boundary={boundary}");
    let reply = server.post("/v1/ocr", &[("Content-Type", &content_type)], &form);
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["results"][0]["token_ids"], result["token_ids"]);

    // SSE: every token in order, then the page's result (equal to the plain one), then done.
    let response = agent().post(&server.url(TINY_16)).header("Content-Type", "image/png").header("Accept", "text/event-stream").send(&page_png()[..]).unwrap();
    assert_eq!(response.status().as_u16(), 200);
    let events = sse_events(response.into_body().into_reader());
    let names: Vec<&str> = events.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(names.len(), 18, "{names:?}");
    assert!(names[..16].iter().all(|n| *n == "token") && names[16] == "result" && names[17] == "done", "{names:?}");
    let tokens: Vec<Value> = events[..16].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    for (i, token) in tokens.iter().enumerate() {
        assert_eq!(token["index"], i + 1);
        assert_eq!(token["id"], reference_tokens()[i]);
    }
    let streamed: Value = serde_json::from_str(&events[16].1).unwrap();
    assert_eq!(streamed["token_ids"], result["token_ids"]);
    assert_eq!(streamed["text"], result["text"]);

    // OpenAI chat completions: the same text, usage counted; streamed deltas add up to it.
    let reply = server.post_json("/v1/chat/completions", &chat_request(false, 16));
    assert_eq!(reply.status, 200, "{}", reply.text);
    let chat = reply.json();
    assert_eq!(chat["object"], "chat.completion");
    assert_eq!(chat["choices"][0]["message"]["content"], result["text"]);
    assert_eq!(chat["choices"][0]["finish_reason"], "length");
    assert_eq!(chat["usage"]["completion_tokens"], 16);
    assert_eq!(chat["usage"]["prompt_tokens"], result["prompt_token_count"]);
    let reply = server.post_json("/v1/chat/completions", &chat_request(true, 16));
    assert_eq!(reply.status, 200, "{}", reply.text);
    let chunks = sse_events(reply.text.as_bytes());
    assert_eq!(chunks.last().unwrap().1, "[DONE]");
    let chunks: Vec<Value> = chunks[..chunks.len() - 1].iter().map(|(_, d)| serde_json::from_str(d).unwrap()).collect();
    assert_eq!(chunks[0]["choices"][0]["delta"]["role"], "assistant");
    let content: String = chunks.iter().filter_map(|c| c["choices"][0]["delta"]["content"].as_str()).collect();
    assert_eq!(content, result["text"].as_str().unwrap());
    let finish = &chunks[chunks.len() - 2]["choices"][0]["finish_reason"];
    assert_eq!(finish, "length");
    assert_eq!(chunks.last().unwrap()["usage"]["completion_tokens"], 16);

    // Metrics saw all of it.
    assert!(server.metric("dsocr_generated_tokens_total") >= 80.0);
    assert!(server.metric("dsocr_http_requests_total") >= 6.0);
    assert_eq!(server.metric("dsocr_queue_depth"), 0.0);
}

#[test]
fn e2e_serve_bad_requests_get_typed_errors() {
    let server = Server::start(&["--max-body-mb", "1"]);
    let code = |reply: &Reply| reply.json()["error"]["code"].as_str().unwrap_or("").to_string();

    let reply = server.post("/v1/ocr", &[("Content-Type", "text/plain")], b"hello");
    assert_eq!((reply.status, code(&reply).as_str()), (415, "unsupported_media_type"), "{}", reply.text);
    let reply = server.post("/v1/ocr", &[PNG], &vec![0u8; 2 << 20]);
    assert_eq!((reply.status, code(&reply).as_str()), (413, "payload_too_large"), "{}", reply.text);
    let reply = server.post(TINY_16, &[PNG], b"\x89PNG\r\n\x1a\nnot really");
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert!(code(&reply).starts_with("image_"), "{}", reply.text);
    let reply = server.post(TINY_16, &[("Content-Type", "application/octet-stream")], b"plain words, no image");
    assert_eq!((reply.status, code(&reply).as_str()), (400, "image_format"), "{}", reply.text);
    let reply = server.post("/v1/ocr?mode=huge", &[PNG], &page_png());
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("`mode`"), "{}", reply.text);
    let reply = server.post("/v1/ocr?max_new_tokens=100000", &[PNG], &page_png());
    assert_eq!(reply.status, 422, "{}", reply.text);
    assert!(reply.json()["error"]["message"].as_str().unwrap().contains("Given: 100000"), "{}", reply.text);
    let reply = server.post("/v1/ocr", &[PNG], b"");
    assert_eq!((reply.status, code(&reply).as_str()), (400, "empty_body"));
    let reply = server.post_json("/v1/chat/completions", &json!({ "messages": [{ "role": "user", "content": "no image" }] }));
    assert_eq!(reply.status, 422, "{}", reply.text);
    let mut remote = chat_request(false, 4);
    remote["messages"][0]["content"][0]["image_url"]["url"] = "http://127.0.0.1:9/page.png".into();
    let reply = server.post_json("/v1/chat/completions", &remote);
    assert_eq!((reply.status, code(&reply).as_str()), (400, "remote_image_refused"), "{}", reply.text);
    let reply = server.post("/v1/chat/completions", &[("Content-Type", "application/json")], b"{not json");
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(server.get("/nowhere").0, 404);
    // The server is unharmed.
    assert_eq!(server.post(TINY_16, &[PNG], &page_png()).status, 200);
    assert!(server.metric("dsocr_http_requests_total") >= 12.0);
}

#[test]
fn e2e_serve_api_key() {
    let key_file = std::env::temp_dir().join(format!("dsocr-test-key-{}", std::process::id()));
    std::fs::write(&key_file, "s3cret-key\n").unwrap();
    let server = Server::start(&["--api-key-file", key_file.to_str().unwrap()]);
    assert_eq!(server.get("/healthz").0, 200);
    assert_eq!(server.get("/readyz").0, 200);
    assert_eq!(server.get("/v1/models").0, 401);
    assert_eq!(server.get("/metrics").0, 401);
    let reply = server.post(TINY_16, &[PNG, ("Authorization", "Bearer wrong")], &page_png());
    assert_eq!(reply.status, 401);
    assert!(!reply.text.contains("s3cret"));
    let reply = server.post(TINY_16, &[PNG, ("Authorization", "Bearer s3cret-key")], &page_png());
    assert_eq!(reply.status, 200, "{}", reply.text);
    let _ = std::fs::remove_file(key_file);
}

const LONG: &str = "/v1/ocr?max_new_tokens=4096&repeat_guard=off";

fn post_in_thread(url: String) -> std::thread::JoinHandle<u16> {
    std::thread::spawn(move || agent().post(&url).header("Content-Type", "image/png").send(&page_png()[..]).unwrap().status().as_u16())
}

#[test]
fn e2e_serve_queue_timeout_and_disconnect() {
    let server = Server::start(&["--max-queue", "2", "--timeout-s", "3", "--max-batch", "1"]);
    // 16 concurrent requests on a queue of 2 (+ 1 running): each is answered, correctly or with 429.
    let url = server.url(TINY_16);
    let clients: Vec<_> = (0..16)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let response = agent().post(&url).header("Content-Type", "image/png").send(&page_png()[..]).unwrap();
                let status = response.status().as_u16();
                let retry = response.headers().get("retry-after").is_some();
                (status, retry, response.into_body().read_to_string().unwrap())
            })
        })
        .collect();
    let (mut ok, mut busy) = (0, 0);
    for client in clients {
        let (status, retry, body) = client.join().unwrap();
        match status {
            200 => {
                ok += 1;
                let body: Value = serde_json::from_str(&body).unwrap();
                assert_eq!(body["results"][0]["token_ids"].as_array().unwrap(), &reference_tokens());
            }
            429 => {
                busy += 1;
                assert!(retry, "429 without Retry-After");
            }
            other => panic!("status {other}: {body}"),
        }
    }
    assert!(ok >= 3 && ok + busy == 16, "{ok} answered, {busy} turned away");

    // One long request runs, two wait: the fourth is turned away at once. All three run past the
    // 3 s limit: 504, and their generations are stopped, not left running.
    let cancelled = server.metric("dsocr_cancelled_generations_total");
    let running = post_in_thread(server.url(LONG));
    wait_for(|| server.metric("dsocr_in_flight") == 1.0, "the long request to start");
    let waiting: Vec<_> = (0..2).map(|_| post_in_thread(server.url(LONG))).collect();
    wait_for(|| server.metric("dsocr_queue_depth") == 2.0, "two requests to wait");
    let reply = server.post(TINY_16, &[PNG], &page_png());
    assert_eq!(reply.status, 429, "{}", reply.text);
    assert!(reply.retry_after.unwrap().parse::<u64>().unwrap() >= 1);
    assert_eq!(running.join().unwrap(), 504);
    for request in waiting {
        assert_eq!(request.join().unwrap(), 504);
    }
    wait_for(|| server.metric("dsocr_in_flight") == 0.0, "the model to be free");
    assert!(server.metric("dsocr_cancelled_generations_total") >= cancelled + 1.0);
    assert_eq!(server.post(TINY_16, &[PNG], &page_png()).status, 200);

    // A streaming client that leaves after three tokens stops its generation.
    let cancelled = server.metric("dsocr_cancelled_generations_total");
    let response = agent().post(&server.url(LONG)).header("Content-Type", "image/png").header("Accept", "text/event-stream").send(&page_png()[..]).unwrap();
    let mut reader = BufReader::new(response.into_body().into_reader());
    let (mut tokens, mut line) = (0, String::new());
    while tokens < 3 && reader.read_line(&mut line).unwrap() > 0 {
        tokens += usize::from(line.starts_with("event: token"));
        line.clear();
    }
    drop(reader);
    wait_for(|| server.metric("dsocr_cancelled_generations_total") > cancelled, "the abandoned generation to stop");
    wait_for(|| server.metric("dsocr_in_flight") == 0.0, "the model to be free");
}

#[test]
fn e2e_serve_concurrent_requests_are_decoded_in_batches() {
    let server = Server::start(&["--max-queue", "16", "--max-batch", "4"]);
    // 8 clients at once: every answer is the reference's, and pages were decoded together.
    let url = server.url(TINY_16);
    let clients: Vec<_> = (0..8)
        .map(|_| {
            let url = url.clone();
            std::thread::spawn(move || {
                let response = agent().post(&url).header("Content-Type", "image/png").send(&page_png()[..]).unwrap();
                (response.status().as_u16(), response.into_body().read_to_string().unwrap())
            })
        })
        .collect();
    for client in clients {
        let (status, body) = client.join().unwrap();
        assert_eq!(status, 200, "{body}");
        let body: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(body["results"][0]["token_ids"].as_array().unwrap(), &reference_tokens());
    }
    // Per decoding step: how many pages it decoded; more than one on average when pages shared steps.
    let (steps, pages) = (server.metric("dsocr_batch_pages_count"), server.metric("dsocr_batch_pages_sum"));
    assert!(steps > 0.0 && pages / steps > 1.0, "{pages} page-steps in {steps} steps: some decoded together");
    assert_eq!(server.metric("dsocr_pages_total"), 8.0);
    assert_eq!(server.metric("dsocr_in_flight"), 0.0);
}

#[test]
fn e2e_serve_a_request_joins_one_that_is_decoding() {
    let server = Server::start(&["--max-batch", "2"]);
    let long = post_in_thread(server.url("/v1/ocr?max_new_tokens=3000&repeat_guard=off"));
    wait_for(|| server.metric("dsocr_in_flight") == 1.0, "the long request to start");
    // Continuous batching: the short request is prefilled and decoded beside the long one, and
    // answered while the long one is still going (one at a time, it would wait for all 3000 tokens).
    let reply = server.post(TINY_16, &[("Content-Type", "image/png")], &page_png());
    assert_eq!(reply.status, 200, "{}", reply.text);
    assert_eq!(reply.json()["results"][0]["token_ids"].as_array().unwrap(), &reference_tokens());
    assert_eq!(server.metric("dsocr_in_flight"), 1.0, "the long request is still decoding");
    assert_eq!(long.join().unwrap(), 200);
    let (steps, pages) = (server.metric("dsocr_batch_pages_count"), server.metric("dsocr_batch_pages_sum"));
    assert!(pages > steps, "some steps decoded both requests ({pages} page-steps in {steps} steps)");
}

#[test]
fn e2e_serve_sigterm_finishes_requests_in_flight() {
    let mut server = Server::start(&[]);
    let running = post_in_thread(server.url("/v1/ocr?max_new_tokens=400&repeat_guard=off"));
    wait_for(|| server.metric("dsocr_in_flight") == 1.0, "the request to start");
    server.terminate();
    assert_eq!(running.join().unwrap(), 200);
    let status = wait_exit(&mut server.child);
    assert!(status.success(), "exit status {status}");
}

fn wait_for(mut condition: impl FnMut() -> bool, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn wait_exit(child: &mut Child) -> std::process::ExitStatus {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        assert!(Instant::now() < deadline, "the server did not exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn e2e_serve_pdf_pages_and_a_broken_pdf() {
    let server = Server::start(&[]);
    let pdf = std::fs::read(fixtures_dir().join("images/doc.pdf")).unwrap();
    let reply = server.post("/v1/ocr?task=free&max_new_tokens=2", &[("Content-Type", "application/pdf")], &pdf);
    assert_eq!(reply.status, 200, "{}", reply.text);
    let results = reply.json()["results"].as_array().unwrap().clone();
    assert_eq!(results.len(), 2, "one result per page");
    for (i, (r, size)) in results.iter().zip([[1190, 1684], [300, 200]]).enumerate() {
        assert_eq!(r["page"], i + 1);
        assert_eq!(r["image_size"], json!(size), "page {}", i + 1);
        assert_eq!(r["token_ids"].as_array().unwrap().len(), 2);
    }
    let reply = server.post("/v1/ocr", &[("Content-Type", "application/pdf")], b"%PDF-1.7\nnot a document at all\n");
    assert_eq!(reply.status, 400, "{}", reply.text);
    assert_eq!(reply.json()["error"]["code"], "pdf", "{}", reply.text);
}
