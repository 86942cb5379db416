//! The network side of loading: small files whole, checkpoint bytes by HTTP Range requests (a
//! single safetensors file or the shards of a `model.safetensors.index.json`), retried with
//! backoff, every request tied to the caller's `AbortSignal`.

use std::cell::RefCell;

use js_sys::{Function, Promise, Reflect, Uint8Array};
use wasm_bindgen::{JsCast, JsValue};
use wasm_bindgen_futures::JsFuture;

use super::error::{is_abort, js_error, message_of};
use crate::error::Error;
use crate::weights::{Checkpoint, DEFAULT_WINDOW_BYTES, INDEX_FILE, LocalBoxFuture, RangeFetch, Shard, ShardIndex};

/// Attempts per byte range: a dropped connection or a 5xx is retried after 0.5 s, 1 s, 2 s …
const ATTEMPTS: u32 = 4;

/// What every request of one load shares: the caller's `AbortSignal` and the `fetch` to call
/// (the global one, or the `fetch` option: the npm package's cache serves requests through it).
#[derive(Clone, Default)]
pub(crate) struct Net {
    signal: Option<web_sys::AbortSignal>,
    fetch: Option<Function>,
}

impl Net {
    pub(crate) fn from_options(options: &JsValue) -> Self {
        Self {
            signal: super::get(options, "signal").and_then(|s| s.dyn_into().ok()),
            fetch: super::get(options, "fetch").and_then(|f| f.dyn_into().ok()),
        }
    }

    pub(crate) fn aborted(&self) -> bool {
        self.signal.as_ref().is_some_and(|s| s.aborted())
    }

    fn check(&self) -> Result<(), JsValue> {
        if self.aborted() { Err(js_error("ABORTED", "aborted")) } else { Ok(()) }
    }
}

/// Calls `fetch` (the option's, else the global one of the window or worker); a non-2xx status is
/// a `NETWORK` error naming the URL.
async fn fetch_with(url: &str, init: &web_sys::RequestInit, signal: &Net) -> Result<web_sys::Response, JsValue> {
    signal.check()?;
    if let Some(abort) = &signal.signal {
        init.set_signal(Some(abort));
    }
    let global = js_sys::global();
    let fetch: Function = match &signal.fetch {
        Some(fetch) => fetch.clone(),
        None => Reflect::get(&global, &"fetch".into())?.dyn_into()?,
    };
    let response: web_sys::Response = JsFuture::from(fetch.call2(&global, &url.into(), init)?.dyn_into::<Promise>()?).await?.dyn_into()?;
    if !response.ok() {
        let error = js_error("NETWORK", format!("{url}: HTTP {}", response.status()));
        let _ = Reflect::set(&error, &"status".into(), &response.status().into());
        return Err(error);
    }
    Ok(response)
}

/// Whether a failed request is worth repeating: not an abort, not a 4xx.
fn retryable(e: &JsValue) -> bool {
    let status = Reflect::get(e, &"status".into()).ok().and_then(|v| v.as_f64());
    !is_abort(e) && !status.is_some_and(|s| (400.0..500.0).contains(&s))
}

/// Runs `request` up to [`ATTEMPTS`] times while it fails retryably, waiting 0.5 s, 1 s, 2 s … between.
async fn with_retries<T, F: std::future::Future<Output = Result<T, JsValue>>>(mut request: impl FnMut() -> F) -> Result<T, JsValue> {
    let mut attempt = 0;
    loop {
        match request().await {
            Err(e) if attempt + 1 < ATTEMPTS && retryable(&e) => gloo_timers::future::TimeoutFuture::new(500 << attempt.min(4)).await,
            done => return done,
        }
        attempt += 1;
    }
}

/// Downloads `url` fully (config, tokenizer, index: small files), reporting `(loaded, total)`.
pub(crate) async fn download(url: &str, signal: &Net, progress: &dyn Fn(f64, Option<f64>)) -> Result<Vec<u8>, JsValue> {
    with_retries(|| download_once(url, signal, progress)).await
}

async fn download_once(url: &str, signal: &Net, progress: &dyn Fn(f64, Option<f64>)) -> Result<Vec<u8>, JsValue> {
    let response = fetch_with(url, &web_sys::RequestInit::new(), signal).await?;
    let total = response.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<f64>().ok());
    let body = response.body().ok_or_else(|| js_error("NETWORK", format!("{url}: empty body")))?;
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().dyn_into()?;
    let mut bytes = Vec::with_capacity(total.unwrap_or(0.0) as usize);
    loop {
        let chunk = JsFuture::from(reader.read()).await?;
        if Reflect::get(&chunk, &"done".into())?.as_bool().unwrap_or(true) {
            break;
        }
        let value: Uint8Array = Reflect::get(&chunk, &"value".into())?.dyn_into()?;
        let start = bytes.len();
        bytes.resize(start + value.length() as usize, 0);
        value.copy_to(&mut bytes[start..]);
        progress(bytes.len() as f64, total);
    }
    progress(bytes.len() as f64, Some(bytes.len() as f64));
    Ok(bytes)
}

/// Reads byte ranges of one checkpoint file with HTTP Range requests (retried, so a dropped
/// connection resumes where it stopped). A server that ignores Range and sends the whole file
/// (200) is served from that one copy instead.
struct HttpRange {
    url: String,
    signal: Net,
    whole: RefCell<Option<Vec<u8>>>,
}

impl HttpRange {
    async fn fetch_once(&self, start: u64, end: u64) -> Result<Vec<u8>, JsValue> {
        let headers = web_sys::Headers::new()?;
        headers.set("Range", &format!("bytes={start}-{}", end - 1))?;
        let init = web_sys::RequestInit::new();
        init.set_headers(&headers);
        let response = fetch_with(&self.url, &init, &self.signal).await?;
        let bytes = Uint8Array::new(&JsFuture::from(response.array_buffer()?).await?).to_vec();
        match response.status() {
            206 => Ok(bytes),
            _ => {
                let end = usize::try_from(end).map_err(|_| js_error("NETWORK", "range beyond wasm32 memory"))?;
                let slice = bytes.get(start as usize..end).map(<[u8]>::to_vec);
                *self.whole.borrow_mut() = Some(bytes);
                slice.ok_or_else(|| js_error("BAD_CHECKPOINT", format!("{}: shorter than its header says", self.url)))
            }
        }
    }
}

impl RangeFetch for HttpRange {
    fn fetch(&self, start: u64, end: u64) -> LocalBoxFuture<'_, crate::Result<Vec<u8>>> {
        Box::pin(async move {
            if let Some(whole) = self.whole.borrow().as_ref() {
                return whole.get(start as usize..end as usize).map(<[u8]>::to_vec).ok_or_else(|| Error::Download(format!("{}: bytes {start}..{end} beyond the file", self.url)));
            }
            with_retries(|| self.fetch_once(start, end))
                .await
                .map_err(|e| Error::Download(format!("{}: bytes {start}..{end}: {}", self.url, message_of(&e))))
        })
    }
}

/// Opens the checkpoint under `base`: the shards of `model.safetensors.index.json` when there is
/// one (a sharded, possibly quantized checkpoint written by `dsocr quantize`), otherwise
/// `model-00001-of-000001.safetensors` (the hub's file) or `model.safetensors`. Returns the file
/// name to report progress under and the checkpoint, read lazily by byte ranges.
pub(crate) async fn open_checkpoint(base: &str, signal: &Net) -> Result<(String, Checkpoint<'static>), JsValue> {
    let open = |name: &str| Shard::open(Box::new(HttpRange { url: format!("{base}/{name}"), signal: signal.clone(), whole: Default::default() }), DEFAULT_WINDOW_BYTES);
    match download(&format!("{base}/{INDEX_FILE}"), signal, &|_, _| {}).await {
        Ok(bytes) => {
            let text = String::from_utf8(bytes).map_err(|e| js_error("BAD_CHECKPOINT", format!("{INDEX_FILE}: {e}")))?;
            let index = ShardIndex::parse(&text).map_err(super::error::from_error)?;
            let mut shards = Vec::new();
            for file in index.files() {
                let shard = open(&file).await.map_err(|e| super::error::from_error(Error::InFile { file: file.clone(), source: Box::new(e) }))?;
                shards.push((file, shard));
            }
            let checkpoint = Checkpoint::from_index(shards, &index).map_err(super::error::from_error)?;
            return Ok((INDEX_FILE.to_string(), checkpoint));
        }
        Err(e) if !is_404(&e) => return Err(e),
        Err(_) => {}
    }
    let mut last_error = String::new();
    for name in ["model-00001-of-000001.safetensors", "model.safetensors"] {
        match open(name).await {
            Ok(shard) => return Ok((name.to_string(), Checkpoint::from_shards(vec![(String::new(), shard)]).map_err(super::error::from_error)?)),
            Err(e @ (Error::Safetensors(_) | Error::UnsupportedDtype { .. })) => return Err(super::error::from_error(e)),
            Err(e) => {
                signal.check()?;
                last_error = e.to_string();
            }
        }
    }
    Err(js_error("NETWORK", format!("{base}: no {INDEX_FILE}, model-00001-of-000001.safetensors or model.safetensors ({last_error})")))
}

fn is_404(e: &JsValue) -> bool {
    Reflect::get(e, &"status".into()).ok().and_then(|v| v.as_f64()) == Some(404.0)
}
