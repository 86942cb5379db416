//! The router, its middleware (auth, metrics) and the REST endpoints: `POST /v1/ocr`, `GET
//! /v1/models`, `GET /healthz`, `GET /readyz`, `GET /metrics`.

use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Multipart, Query, Request, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use serde::Deserialize;
use serde_json::{Value, json};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tokio::time::Instant;

use super::error::ApiError;
use super::worker::{Event, PageInput, Queue, Work};
use clap::ValueEnum;

use crate::cli::ocr::{GuardArg, parse_task};
use crate::cli::pdf;
use crate::{GenerationOptions, Mode, OcrResult};

/// What every handler shares.
pub struct App {
    pub queue: Arc<Queue>,
    /// The id `/v1/models` lists and responses name (the `--model` given).
    pub model_id: String,
    /// sha256 of the API key: compared in constant time, never kept or logged in clear.
    pub api_key: Option<[u8; 32]>,
    pub default_mode: Mode,
    /// Upper bound (and default) of `max_new_tokens`.
    pub max_new_tokens: usize,
    pub timeout: Duration,
    pub allow_remote_images: bool,
    pub max_body_bytes: usize,
    /// Unix seconds when the server started (`/v1/models`' `created`).
    pub started: u64,
}

pub fn router(app: Arc<App>) -> Router {
    let api = Router::new()
        .route("/v1/ocr", post(ocr))
        .route("/v1/chat/completions", post(super::openai::chat))
        .route("/v1/models", get(models))
        .route("/metrics", get(metrics))
        .route_layer(middleware::from_fn_with_state(app.clone(), auth));
    Router::new()
        .route("/healthz", get(|| async { axum::Json(json!({ "status": "ok" })) }))
        .route("/readyz", get(readyz))
        .merge(api)
        .fallback(|| async { ApiError::new(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(middleware::from_fn_with_state(app.clone(), body_limit))
        .layer(middleware::from_fn_with_state(app.clone(), observe))
        .layer(DefaultBodyLimit::max(app.max_body_bytes))
        .with_state(app)
}

/// The metrics label of a path (a fixed set, so that unknown paths cannot grow the series).
pub fn endpoint(path: &str) -> &'static str {
    match path {
        "/v1/ocr" => "/v1/ocr",
        "/v1/chat/completions" => "/v1/chat/completions",
        "/v1/models" => "/v1/models",
        "/metrics" => "/metrics",
        "/healthz" => "/healthz",
        "/readyz" => "/readyz",
        _ => "other",
    }
}

/// Counts each response by endpoint and status and times it; a stream is timed by its
/// [`StreamTimer`] when it ends instead.
async fn observe(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let endpoint = endpoint(request.uri().path());
    let started = Instant::now();
    let response = next.run(request).await;
    let metrics = &app.queue.metrics;
    metrics.requests.get_or_create(&super::metrics::RequestLabels { endpoint, status: response.status().as_u16() }).inc();
    let streaming = response.headers().get(header::CONTENT_TYPE).is_some_and(|v| v.as_bytes().starts_with(b"text/event-stream"));
    if !streaming {
        metrics.latency.get_or_create(&super::metrics::EndpointLabels { endpoint }).observe(started.elapsed().as_secs_f64());
    }
    response
}

/// Records a stream's duration when it is dropped: at its end, or when the client goes away.
pub struct StreamTimer {
    pub app: Arc<App>,
    pub endpoint: &'static str,
    pub started: Instant,
}

impl Drop for StreamTimer {
    fn drop(&mut self) {
        let labels = super::metrics::EndpointLabels { endpoint: self.endpoint };
        self.app.queue.metrics.latency.get_or_create(&labels).observe(self.started.elapsed().as_secs_f64());
    }
}

async fn auth(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    if let Some(expected) = &app.api_key {
        let given = request.headers().get(header::AUTHORIZATION).and_then(|v| v.to_str().ok()).unwrap_or("");
        let token = given.split_once(' ').filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer")).map_or("", |(_, t)| t.trim());
        // Hashing first makes the comparison independent of the key's length as well.
        let matches: bool = Sha256::digest(token.as_bytes()).as_slice().ct_eq(expected).into();
        if !matches {
            let message = if given.is_empty() { "missing API key (Authorization: Bearer KEY)" } else { "wrong API key" };
            drain(request, app.max_body_bytes).await;
            return ApiError::new(StatusCode::UNAUTHORIZED, "unauthorized", message).into_response();
        }
    }
    next.run(request).await
}

/// Reads and drops a body that will not be used (at most `limit` bytes, never held in memory), so
/// that a client still sending it sees the answer instead of a broken pipe.
async fn drain(request: Request, limit: usize) {
    use futures_util::StreamExt;
    let mut stream = request.into_body().into_data_stream();
    let mut read = 0;
    while read <= limit {
        match stream.next().await {
            Some(Ok(chunk)) => read += chunk.len(),
            _ => break,
        }
    }
}

/// 413 for a body whose `Content-Length` is over the limit, before any handler reads it. A body up
/// to four times the limit is read and dropped first so that the client gets the answer (a larger
/// one is cut off); bodies without a length are held to the limit as they are read (also 413).
async fn body_limit(State(app): State<Arc<App>>, request: Request, next: Next) -> Response {
    let declared = request.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()?.parse::<u64>().ok());
    let limit = app.max_body_bytes as u64;
    match declared {
        Some(length) if length > limit => {
            if length <= 4 * limit {
                drain(request, length as usize).await;
            }
            let message = format!("the body is {length} bytes, more than this server's limit of {limit} (--max-body-mb)");
            ApiError::new(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message).into_response()
        }
        _ => next.run(request).await,
    }
}

async fn readyz(State(app): State<Arc<App>>) -> Response {
    if app.queue.ready() {
        axum::Json(json!({ "status": "ready", "model": app.model_id })).into_response()
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, axum::Json(json!({ "status": "loading" }))).into_response()
    }
}

async fn models(State(app): State<Arc<App>>) -> axum::Json<Value> {
    axum::Json(json!({
        "object": "list",
        "data": [{ "id": app.model_id, "object": "model", "created": app.started, "owned_by": "dsocr" }],
    }))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let content_type = "application/openmetrics-text; version=1.0.0; charset=utf-8";
    ([(header::CONTENT_TYPE, content_type)], app.queue.metrics.render()).into_response()
}

/// `POST /v1/ocr` options, from the query string or multipart form fields.
#[derive(Deserialize, Default)]
pub struct OcrOptions {
    task: Option<String>,
    mode: Option<String>,
    max_new_tokens: Option<String>,
    repeat_guard: Option<String>,
    stream: Option<String>,
}

impl OcrOptions {
    fn set(&mut self, field: &str, value: String) -> Result<(), ApiError> {
        let slot = match field {
            "task" => &mut self.task,
            "mode" => &mut self.mode,
            "max_new_tokens" => &mut self.max_new_tokens,
            "repeat_guard" => &mut self.repeat_guard,
            "stream" => &mut self.stream,
            _ => return Err(ApiError::invalid(field, "is not an option (task, mode, max_new_tokens, repeat_guard, stream; the image goes in `file`)", "a form field")),
        };
        *slot = Some(value);
        Ok(())
    }
}

pub fn parse_mode(app: &App, mode: Option<&str>) -> Result<Mode, ApiError> {
    mode.map_or(Ok(app.default_mode), |m| m.parse().map_err(|_| ApiError::invalid("mode", "must be tiny, small, base, large or gundam", m)))
}

pub fn generation(app: &App, max_new_tokens: Option<usize>, repeat_guard: Option<&str>) -> Result<GenerationOptions, ApiError> {
    let max = max_new_tokens.unwrap_or(app.max_new_tokens);
    if max == 0 || max > app.max_new_tokens {
        return Err(ApiError::invalid("max_new_tokens", format_args!("must be between 1 and {}", app.max_new_tokens), max));
    }
    // The CLI's `--repeat-guard` values, the same names and rules.
    let guard = repeat_guard.unwrap_or("vllm");
    let guard = GuardArg::from_str(guard, false).map_err(|_| ApiError::invalid("repeat_guard", "must be vllm, hf or off", guard))?;
    Ok(GenerationOptions { max_new_tokens: max, repeat_guard: guard.guard(), ..GenerationOptions::default() })
}

/// A body's extraction failure (too large, unreadable) with its own status (413 for the size limit).
pub fn rejection(status: StatusCode, text: String) -> ApiError {
    let code = if status == StatusCode::PAYLOAD_TOO_LARGE { "payload_too_large" } else { "bad_body" };
    ApiError::new(status, code, text)
}

/// The pages of an uploaded file: one for an image, one per page for a PDF (rendered off the runtime).
pub async fn pages_of(bytes: Vec<u8>) -> Result<Vec<PageInput>, ApiError> {
    if bytes.is_empty() {
        return Err(ApiError::new(StatusCode::BAD_REQUEST, "empty_body", "the request has no image"));
    }
    if !pdf::is_pdf(&bytes) {
        return Ok(vec![PageInput { number: None, bytes }]);
    }
    let rendered = tokio::task::spawn_blocking(move || -> Result<Vec<(usize, Vec<u8>)>, String> {
        let doc = pdf::Pdf::from_bytes(&bytes, pdf::PdfLimits::default())?;
        (1..=doc.page_count()).map(|n| doc.render(n).map(|png| (n, png)).map_err(|e| format!("page {n}: {e}"))).collect()
    })
        .await
        .map_err(|_| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "PDF rendering failed"))?
        .map_err(|message| ApiError::new(StatusCode::BAD_REQUEST, "pdf", message))?;
    Ok(rendered.into_iter().map(|(n, bytes)| PageInput { number: Some(n), bytes }).collect())
}

async fn ocr(State(app): State<Arc<App>>, Query(mut options): Query<OcrOptions>, headers: HeaderMap, request: Request) -> Response {
    let started = Instant::now();
    match ocr_inner(app.clone(), &mut options, &headers, request, started).await {
        Ok(response) => response,
        Err(error) => error.into_response(),
    }
}

async fn ocr_inner(app: Arc<App>, options: &mut OcrOptions, headers: &HeaderMap, request: Request, started: Instant) -> Result<Response, ApiError> {
    let deadline = started + app.timeout;
    let content_type = headers.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or("");
    let media = content_type.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
    let is_form = media == "multipart/form-data";
    if !(is_form || media.starts_with("image/") || media == "application/pdf" || media == "application/octet-stream") {
        let given = if media.is_empty() { "none".to_string() } else { media };
        drain(request, app.max_body_bytes).await;
        return Err(ApiError::new(
            StatusCode::UNSUPPORTED_MEDIA_TYPE,
            "unsupported_media_type",
            format!("send the image or PDF as the body (Content-Type image/*, application/pdf or application/octet-stream) or as the `file` field of multipart/form-data; Content-Type given: {given}"),
        ));
    }
    let bytes = if is_form {
        let mut form = Multipart::from_request(request, &()).await.map_err(|r| rejection(r.status(), r.body_text()))?;
        let mut file = None;
        while let Some(field) = form.next_field().await.map_err(|e| rejection(e.status(), e.body_text()))? {
            let name = field.name().unwrap_or("").to_string();
            let data = field.bytes().await.map_err(|e| rejection(e.status(), e.body_text()))?;
            if name == "file" {
                file = Some(data.to_vec());
            } else {
                options.set(&name, String::from_utf8_lossy(&data).into_owned())?;
            }
        }
        file.ok_or_else(|| ApiError::new(StatusCode::BAD_REQUEST, "missing_file", "the form has no `file` field"))?
    } else {
        Bytes::from_request(request, &()).await.map_err(|r| rejection(r.status(), r.body_text()))?.to_vec()
    };
    let task = parse_task(options.task.as_deref().unwrap_or("markdown")).map_err(|message| ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "invalid_argument", message))?;
    let mode = parse_mode(&app, options.mode.as_deref())?;
    let max_new_tokens = match options.max_new_tokens.as_deref() {
        Some(text) => Some(text.parse::<usize>().map_err(|_| ApiError::invalid("max_new_tokens", "must be a positive integer", text))?),
        None => None,
    };
    let generation = generation(&app, max_new_tokens, options.repeat_guard.as_deref())?;
    // After the body (read within its size limit) and the options: a client that is turned away
    // still gets its answer, and a bad request never takes a place in the queue.
    let admission = app.queue.admit()?;
    let pages = pages_of(bytes).await?;
    let numbers: Vec<Option<usize>> = pages.iter().map(|p| p.number).collect();
    let events = app.queue.submit(admission, Work { pages, task, mode, generation })?;
    let wants_stream = headers.get(header::ACCEPT).and_then(|v| v.to_str().ok()).is_some_and(|a| a.contains("text/event-stream"))
        || options.stream.as_deref() == Some("true");
    if wants_stream {
        return Ok(stream(app, events, numbers, deadline, started).into_response());
    }
    let outcomes = outcomes(&app, events, numbers.len(), deadline).await?;
    if let Some(error) = outcomes.iter().all(Result::is_err).then(|| outcomes[0].clone().err()).flatten() {
        return Err(error);
    }
    let results: Vec<Value> = outcomes.iter().zip(&numbers).map(|(outcome, &number)| page_entry(number, outcome)).collect();
    Ok(axum::Json(json!({ "model": app.model_id, "results": results })).into_response())
}

/// Every page's outcome, in order, once the model thread is done with the request (504 past the
/// deadline: dropping the events then stops the generation).
pub async fn outcomes(
    app: &App,
    mut events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    pages: usize,
    deadline: Instant,
) -> Result<Vec<Result<OcrResult, ApiError>>, ApiError> {
    let mut outcomes: Vec<Option<Result<OcrResult, ApiError>>> = (0..pages).map(|_| None).collect();
    let collect = async {
        while let Some(event) = events.recv().await {
            if let Event::Page { page, outcome } = event {
                outcomes[page] = Some(outcome);
            }
        }
    };
    if tokio::time::timeout_at(deadline, collect).await.is_err() {
        return Err(timeout(app));
    }
    let stopped = || Err(ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, "internal", "the model stopped before this page"));
    Ok(outcomes.into_iter().map(|o| o.unwrap_or_else(stopped)).collect())
}

/// Seconds since the Unix epoch (OpenAI's `created`).
pub fn unix_now() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

pub fn timeout(app: &App) -> ApiError {
    ApiError::new(StatusCode::GATEWAY_TIMEOUT, "timeout", format!("the request took longer than the server's limit of {} s", app.timeout.as_secs()))
}

/// One page of `/v1/ocr`'s `results`: the CLI's JSON result with its page number (null for an
/// image), or the page's error.
fn page_entry(number: Option<usize>, outcome: &Result<OcrResult, ApiError>) -> Value {
    let mut entry = match outcome {
        Ok(result) => serde_json::to_value(result).unwrap_or_default(),
        Err(error) => json!({ "error": error.body()["error"] }),
    };
    entry["page"] = number.map_or(Value::Null, Value::from);
    entry
}

/// Server-sent events: `token` per generated token, `result` per page (or `error`), then `done`.
fn stream(
    app: Arc<App>,
    events: tokio::sync::mpsc::UnboundedReceiver<Event>,
    numbers: Vec<Option<usize>>,
    deadline: Instant,
    started: Instant,
) -> Sse<impl futures_util::Stream<Item = Result<SseEvent, std::convert::Infallible>>> {
    let timer = StreamTimer { app: app.clone(), endpoint: "/v1/ocr", started };
    let state = Some((events, timer));
    let stream = futures_util::stream::unfold(state, move |state| {
        let (app, numbers) = (app.clone(), numbers.clone());
        async move {
            let (mut events, timer) = state?;
            let page_number = |page: usize| numbers[page].map_or(Value::Null, Value::from);
            let event = match tokio::time::timeout_at(deadline, events.recv()).await {
                Err(_) => return Some((Ok(sse("error", &timeout(&app).body())), None)),
                Ok(None) => return Some((Ok(sse("done", &json!({ "pages": numbers.len() }))), None)),
                Ok(Some(Event::Token { page, token })) => {
                    sse("token", &json!({ "page": page_number(page), "index": token.index, "id": token.id, "text": token.text }))
                }
                Ok(Some(Event::Page { page, outcome })) => match &outcome {
                    Ok(_) => sse("result", &page_entry(numbers[page], &outcome)),
                    Err(_) => sse("error", &page_entry(numbers[page], &outcome)),
                },
            };
            Some((Ok(event), Some((events, timer))))
        }
    });
    Sse::new(stream).keep_alive(KeepAlive::default())
}

pub fn sse(name: &str, data: &Value) -> SseEvent {
    SseEvent::default().event(name).data(data.to_string())
}
