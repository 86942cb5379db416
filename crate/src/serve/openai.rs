//! `POST /v1/chat/completions`: OpenAI's chat API, as vLLM and llama-server serve DeepSeek-OCR.
//! One user message with one image (`image_url`: a data URL, or http(s) with `--allow-remote-images`)
//! and the prompt as text (DeepSeek-OCR's prompts: "Free OCR.", "<|grounding|>Convert the document
//! to markdown.", …; none means the markdown task). The answer is the model's raw text. dsocr's own
//! options ride along as extra body fields: `mode`, `repeat_guard`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::Json;
use axum::extract::State;
use axum::extract::rejection::JsonRejection;
use axum::http::StatusCode;
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::time::Instant;

use super::error::ApiError;
use super::http::{App, StreamTimer, generation, outcomes, pages_of, parse_mode, rejection, timeout, unix_now};
use super::worker::{Event, Work};
use crate::{OcrResult, Sampling, Task};

#[derive(Deserialize)]
pub struct ChatRequest {
    #[serde(default)]
    model: Option<String>,
    messages: Vec<Message>,
    #[serde(default)]
    max_tokens: Option<usize>,
    #[serde(default)]
    max_completion_tokens: Option<usize>,
    #[serde(default)]
    stream: bool,
    #[serde(default)]
    stream_options: Option<StreamOptions>,
    #[serde(default)]
    temperature: Option<f32>,
    #[serde(default)]
    top_p: Option<f32>,
    #[serde(default)]
    seed: Option<u64>,
    #[serde(default)]
    mode: Option<String>,
    #[serde(default)]
    repeat_guard: Option<String>,
}

#[derive(Deserialize)]
struct StreamOptions {
    #[serde(default)]
    include_usage: bool,
}

#[derive(Deserialize)]
struct Message {
    role: String,
    #[serde(default)]
    content: Option<Content>,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum Content {
    Text(String),
    Parts(Vec<Part>),
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Part {
    Text { text: String },
    ImageUrl { image_url: ImageUrl },
    #[serde(other)]
    Other,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum ImageUrl {
    Object { url: String },
    Plain(String),
}

impl ImageUrl {
    fn url(&self) -> &str {
        match self {
            ImageUrl::Object { url } | ImageUrl::Plain(url) => url,
        }
    }
}

/// The prompt and the image URL of the last user message.
fn prompt_and_image(messages: &[Message]) -> Result<(Task, String), ApiError> {
    let Some(message) = messages.iter().rev().find(|m| m.role == "user") else {
        return Err(ApiError::invalid("messages", "must hold a user message with an image", "none"));
    };
    let (mut texts, mut images) = (Vec::new(), Vec::new());
    match &message.content {
        Some(Content::Text(text)) => texts.push(text.as_str()),
        Some(Content::Parts(parts)) => {
            for part in parts {
                match part {
                    Part::Text { text } => texts.push(text),
                    Part::ImageUrl { image_url } => images.push(image_url.url().to_string()),
                    Part::Other => return Err(ApiError::invalid("messages[].content[].type", "must be text or image_url", "another type")),
                }
            }
        }
        None => {}
    }
    if images.len() != 1 {
        return Err(ApiError::invalid("messages", "must give the last user message exactly one image_url part", format_args!("{} images", images.len())));
    }
    let text = texts.join("\n");
    let text = text.trim();
    let task = if text.is_empty() {
        Task::Markdown
    } else if text.contains("<image>") {
        Task::Raw(text.to_string())
    } else {
        Task::Raw(format!("<image>\n{text}"))
    };
    Ok((task, images.pop().unwrap_or_default()))
}

/// The image's bytes: a `data:` URL decoded, or a remote URL fetched when the server allows it.
async fn image_bytes(app: &App, url: &str) -> Result<Vec<u8>, ApiError> {
    if let Some(rest) = url.strip_prefix("data:") {
        let Some((meta, data)) = rest.split_once(',') else {
            return Err(ApiError::invalid("image_url.url", "must be a data URL (data:image/png;base64,…)", "a data URL without a comma"));
        };
        if !meta.ends_with(";base64") {
            return Err(ApiError::invalid("image_url.url", "must be base64 encoded (data:…;base64,…)", meta));
        }
        let data: String = data.chars().filter(|c| !c.is_ascii_whitespace()).collect();
        return base64::engine::general_purpose::STANDARD
            .decode(data)
            .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "image_decode", format!("the image's base64 is invalid: {e}")));
    }
    if !(url.starts_with("http://") || url.starts_with("https://")) {
        return Err(ApiError::invalid("image_url.url", "must be a data: URL (or http(s) where the server allows remote images)", url));
    }
    if !app.allow_remote_images {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            "remote_image_refused",
            "this server does not fetch remote images (started without --allow-remote-images): send the image as a data: URL",
        ));
    }
    let (url, limit) = (url.to_string(), app.max_body_bytes as u64);
    tokio::task::spawn_blocking(move || -> Result<Vec<u8>, String> {
        let mut response = ureq::get(&url).call().map_err(|e| e.to_string())?;
        response.body_mut().with_config().limit(limit).read_to_vec().map_err(|e| e.to_string())
    })
    .await
    .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "fetching the image failed"))?
    .map_err(|e| ApiError::new(StatusCode::BAD_REQUEST, "remote_image", format!("cannot fetch the image: {e}")))
}

static NEXT_ID: AtomicU64 = AtomicU64::new(1);

pub async fn chat(State(app): State<Arc<App>>, request: Result<Json<ChatRequest>, JsonRejection>) -> Response {
    let started = Instant::now();
    match chat_inner(app, request, started).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn chat_inner(app: Arc<App>, request: Result<Json<ChatRequest>, JsonRejection>, started: Instant) -> Result<Response, ApiError> {
    let deadline = started + app.timeout;
    let Json(request) = request.map_err(|r| rejection(r.status(), r.body_text()))?;
    if let Some(model) = request.model.as_deref().filter(|m| *m != app.model_id) {
        // One model is served: a different name is answered by it (as vLLM's single-model server does).
        eprintln!("dsocr: a request named model {model:?}; serving {:?}", app.model_id);
    }
    let (task, url) = prompt_and_image(&request.messages)?;
    let mode = parse_mode(&app, request.mode.as_deref())?;
    let mut generation = generation(&app, request.max_completion_tokens.or(request.max_tokens), request.repeat_guard.as_deref())?;
    match request.temperature {
        Some(t) if !(0.0..=2.0).contains(&t) => return Err(ApiError::invalid("temperature", "must be between 0 and 2", t)),
        Some(t) if t > 0.0 => {
            let top_p = request.top_p.unwrap_or(1.0);
            if !(top_p > 0.0 && top_p <= 1.0) {
                return Err(ApiError::invalid("top_p", "must be in (0, 1]", top_p));
            }
            generation.sampling = Sampling::Sample { temperature: t, top_k: 0, top_p, seed: request.seed.unwrap_or(0) };
        }
        _ => {}
    }
    let admission = app.queue.admit()?;
    let pages = pages_of(image_bytes(&app, &url).await?).await?;
    let page_count = pages.len();
    let events = app.queue.submit(admission, Work { pages, task, mode, generation })?;
    let id = format!("chatcmpl-{:x}{:06x}", app.started, NEXT_ID.fetch_add(1, Ordering::Relaxed));
    let created = unix_now();
    if request.stream {
        let include_usage = request.stream_options.is_some_and(|o| o.include_usage);
        return Ok(stream(app, events, Chunk { id, created }, include_usage, deadline, started).into_response());
    }
    let pages = outcomes(&app, events, page_count, deadline).await?.into_iter().collect::<Result<Vec<_>, _>>()?;
    let content: Vec<&str> = pages.iter().map(|r| r.text.as_str()).collect();
    let completion: usize = pages.iter().map(|r| r.token_ids.len()).sum();
    let prompt: usize = pages.iter().map(|r| r.prompt_token_count).sum();
    Ok(Json(json!({
        "id": id,
        "object": "chat.completion",
        "created": created,
        "model": app.model_id,
        "choices": [{
            "index": 0,
            "message": { "role": "assistant", "content": content.join("\n\n") },
            "finish_reason": finish_reason(pages.last()),
        }],
        "usage": { "prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion },
    }))
    .into_response())
}

fn finish_reason(last: Option<&OcrResult>) -> &'static str {
    match last.map(|r| r.finish_reason.as_str()) {
        Some("stop") | None => "stop",
        _ => "length",
    }
}

/// Streamed text that adds up to what the plain answer holds: each page's text trimmed (leading
/// whitespace dropped, trailing whitespace held back until more text follows), pages joined by a
/// blank line.
#[derive(Default)]
struct Trimmed {
    started: bool,
    page_started: bool,
    held: String,
}

impl Trimmed {
    fn page_break(&mut self) {
        self.held.clear();
        self.page_started = false;
    }

    /// What to send for a token's text, if anything.
    fn push(&mut self, text: &str) -> Option<String> {
        let text = if self.page_started { text } else { text.trim_start() };
        let body = text.trim_end();
        if body.is_empty() {
            if self.page_started {
                self.held.push_str(text);
            }
            return None;
        }
        let mut out = std::mem::take(&mut self.held);
        if !self.page_started && self.started {
            out.push_str("\n\n");
        }
        self.started = true;
        self.page_started = true;
        out.push_str(body);
        self.held.push_str(&text[body.len()..]);
        Some(out)
    }
}

struct Chunk {
    id: String,
    created: u64,
}

impl Chunk {
    fn event(&self, app: &App, delta: Value, finish: Option<&str>) -> SseEvent {
        let chunk = json!({
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": app.model_id,
            "choices": [{ "index": 0, "delta": delta, "finish_reason": finish }],
        });
        SseEvent::default().data(chunk.to_string())
    }
}

/// Where a streamed completion is.
enum Phase {
    Start,
    Tokens,
    Usage,
    Done,
}

/// OpenAI's stream: a role chunk, a content chunk per token, a chunk with `finish_reason`, a usage
/// chunk when asked for, then `[DONE]`.
fn stream(
    app: Arc<App>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    chunk: Chunk,
    include_usage: bool,
    deadline: Instant,
    started: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    struct State {
        events: tokio::sync::mpsc::UnboundedReceiver<Event>,
        phase: Phase,
        last_page: Option<usize>,
        prompt: usize,
        completion: usize,
        finish: &'static str,
        text: Trimmed,
        _timer: StreamTimer,
    }
    let timer = StreamTimer { app: app.clone(), endpoint: "/v1/chat/completions", started };
    let state = State { events, phase: Phase::Start, last_page: None, prompt: 0, completion: 0, finish: "stop", text: Trimmed::default(), _timer: timer };
    let chunk = Arc::new(chunk);
    let stream = futures_util::stream::unfold(Some(state), move |state| {
        let (app, chunk) = (app.clone(), chunk.clone());
        async move {
            let mut state = state?;
            loop {
                match state.phase {
                    Phase::Start => {
                        state.phase = Phase::Tokens;
                        return Some((Ok(chunk.event(&app, json!({ "role": "assistant", "content": "" }), None)), Some(state)));
                    }
                    Phase::Usage => {
                        state.phase = Phase::Done;
                        let (p, c) = (state.prompt, state.completion);
                        let usage = json!({
                            "id": chunk.id, "object": "chat.completion.chunk", "created": chunk.created, "model": app.model_id,
                            "choices": [], "usage": { "prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c },
                        });
                        return Some((Ok(SseEvent::default().data(usage.to_string())), Some(state)));
                    }
                    Phase::Done => return Some((Ok(SseEvent::default().data("[DONE]")), None)),
                    Phase::Tokens => {}
                }
                match tokio::time::timeout_at(deadline, state.events.recv()).await {
                    Err(_) => return Some((Ok(SseEvent::default().data(timeout(&app).body().to_string())), None)),
                    Ok(None) => {
                        state.phase = if include_usage { Phase::Usage } else { Phase::Done };
                        let finish = state.finish;
                        return Some((Ok(chunk.event(&app, json!({}), Some(finish))), Some(state)));
                    }
                    Ok(Some(Event::Token { page, token })) => {
                        if state.last_page.is_some_and(|p| p != page) {
                            state.text.page_break();
                        }
                        state.last_page = Some(page);
                        let Some(content) = state.text.push(&token.text) else { continue };
                        return Some((Ok(chunk.event(&app, json!({ "content": content }), None)), Some(state)));
                    }
                    Ok(Some(Event::Page { outcome: Ok(result), .. })) => {
                        state.prompt += result.prompt_token_count;
                        state.completion += result.token_ids.len();
                        state.finish = finish_reason(Some(&result));
                    }
                    Ok(Some(Event::Page { outcome: Err(error), .. })) => {
                        return Some((Ok(SseEvent::default().data(error.body().to_string())), None));
                    }
                }
            }
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}
