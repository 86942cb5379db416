//! The browser API (wasm32 only): `await Dsocr.load(baseUrl, { onProgress })` and
//! `await engine.recognize(input, { task, mode, maxNewTokens, repeatGuard, onToken, signal })`.
//! Errors are JS `Error`s with a `code` field. Every GPU readback is asynchronous; weights stream
//! from the network into GPU buffers tensor by tensor.

use std::ops::ControlFlow;

use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::engine::{Engine, EngineOptions, wgpu_max_tensor_bytes};
use crate::error::Error;
use crate::generate::{GenerationOptions, RepeatGuard};
use crate::text::Task;
use crate::Mode;
use crate::weights::{Checkpoint, DEFAULT_WINDOW_BYTES, LocalBoxFuture, RangeFetch};

/// A JS `Error` with `code` (a stable identifier to branch on) and the message.
fn js_error(code: &str, message: impl std::fmt::Display) -> JsValue {
    let error = js_sys::Error::new(&message.to_string());
    let _ = Reflect::set(&error, &"code".into(), &code.into());
    error.into()
}

fn code_of(e: &Error) -> &'static str {
    match e {
        Error::Config(_) | Error::Unsupported(_) => "BAD_CHECKPOINT",
        Error::Safetensors(_) | Error::MissingTensor { .. } | Error::ShapeMismatch { .. } | Error::UnsupportedDtype { .. } => {
            "BAD_CHECKPOINT"
        }
        Error::Shard { .. } => "BAD_CHECKPOINT",
        Error::InFile { source, .. } => code_of(source),
        Error::ImageFormat(_) | Error::ImageDecode(_) | Error::ImageTooLarge { .. } => "BAD_IMAGE",
        Error::InvalidArgument(_) => "BAD_ARGUMENT",
        Error::Tokenizer(_) => "BAD_TOKENIZER",
        Error::ContextOverflow { .. } | Error::ImageTokenMismatch { .. } | Error::TokenOutOfRange { .. } => "BAD_INPUT",
        Error::Io(_) | Error::Download(_) => "NETWORK",
        Error::Backend(_) => "BACKEND",
    }
}

fn from_error(e: Error) -> JsValue {
    js_error(code_of(&e), e)
}

fn get(obj: &JsValue, key: &str) -> Option<JsValue> {
    if obj.is_undefined() || obj.is_null() {
        return None;
    }
    Reflect::get(obj, &key.into()).ok().filter(|v| !v.is_undefined() && !v.is_null())
}

/// Downloads `url` fully, reporting `{ file, loaded, total }` to `on_progress` as chunks arrive.
async fn download(url: &str, file: &str, on_progress: Option<&Function>) -> Result<Vec<u8>, JsValue> {
    let response = fetch_with(url, &web_sys::RequestInit::new()).await?;
    let total = response.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<f64>().ok());
    let body = response.body().ok_or_else(|| js_error("NETWORK", format!("{url}: empty body")))?;
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().dyn_into()?;
    let mut bytes = Vec::with_capacity(total.unwrap_or(0.0) as usize);
    let report = |loaded: usize| {
        if let Some(callback) = on_progress {
            let _ = callback.call1(&JsValue::NULL, &progress_event(file, loaded as f64, total));
        }
    };
    loop {
        let chunk = JsFuture::from(reader.read()).await?;
        if Reflect::get(&chunk, &"done".into())?.as_bool().unwrap_or(true) {
            break;
        }
        let value: Uint8Array = Reflect::get(&chunk, &"value".into())?.dyn_into()?;
        let start = bytes.len();
        bytes.resize(start + value.length() as usize, 0);
        value.copy_to(&mut bytes[start..]);
        report(bytes.len());
    }
    report(bytes.len());
    Ok(bytes)
}

/// Reads byte ranges of a checkpoint with HTTP Range requests (retried, so a dropped connection
/// resumes where it stopped). A server that ignores Range and sends the whole file (200) is
/// served from that one copy instead.
struct HttpRange {
    url: String,
    whole: std::cell::RefCell<Option<Vec<u8>>>,
}

impl HttpRange {
    async fn fetch_once(&self, start: u64, end: u64) -> Result<Vec<u8>, JsValue> {
        let headers = web_sys::Headers::new()?;
        headers.set("Range", &format!("bytes={start}-{}", end - 1))?;
        let init = web_sys::RequestInit::new();
        init.set_headers(&headers);
        let response = fetch_with(&self.url, &init).await?;
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
            let mut last = JsValue::NULL;
            for _attempt in 0..3 {
                match self.fetch_once(start, end).await {
                    Ok(bytes) => return Ok(bytes),
                    Err(e) => last = e,
                }
            }
            Err(Error::Download(format!("{}: bytes {start}..{end}: {}", self.url, message_of(&last))))
        })
    }
}

fn message_of(e: &JsValue) -> String {
    e.dyn_ref::<js_sys::Error>().map(|e| String::from(e.message())).or_else(|| e.as_string()).unwrap_or_else(|| format!("{e:?}"))
}

/// Calls the global `fetch` (window or worker) with request options.
async fn fetch_with(url: &str, init: &web_sys::RequestInit) -> Result<web_sys::Response, JsValue> {
    let global = js_sys::global();
    let fetch: Function = Reflect::get(&global, &"fetch".into())?.dyn_into()?;
    let response: web_sys::Response = JsFuture::from(fetch.call2(&global, &url.into(), init)?.dyn_into::<Promise>()?).await?.dyn_into()?;
    if !response.ok() {
        return Err(js_error("NETWORK", format!("{url}: HTTP {}", response.status())));
    }
    Ok(response)
}

fn progress_event(file: &str, loaded: f64, total: Option<f64>) -> Object {
    let event = Object::new();
    let _ = Reflect::set(&event, &"file".into(), &file.into());
    let _ = Reflect::set(&event, &"loaded".into(), &loaded.into());
    let _ = Reflect::set(&event, &"total".into(), &total.map_or(JsValue::NULL, JsValue::from));
    event
}

fn adapter_report(setup: &burn::tensor::wgpu::WgpuSetup, max_tensor_bytes: usize, f16: bool) -> String {
    let granted = setup.device.limits();
    let adapter = setup.adapter.limits();
    let info = setup.adapter.get_info();
    serde_json::json!({
        "name": info.name,
        "backend": format!("{:?}", setup.backend),
        "maxStorageBufferBindingSize": granted.max_storage_buffer_binding_size,
        "maxBufferSize": granted.max_buffer_size,
        "maxComputeWorkgroupStorageSize": granted.max_compute_workgroup_storage_size,
        "adapterMaxStorageBufferBindingSize": adapter.max_storage_buffer_binding_size,
        "adapterMaxBufferSize": adapter.max_buffer_size,
        "shaderF16": setup.device.features().contains(burn::tensor::wgpu::wgpu::Features::SHADER_F16),
        "maxTensorBytes": max_tensor_bytes,
        "dtype": if f16 { "f16" } else { "f32" },
    })
    .to_string()
}

fn has_webgpu() -> bool {
    let navigator = Reflect::get(&js_sys::global(), &"navigator".into()).unwrap_or(JsValue::UNDEFINED);
    get(&navigator, "gpu").is_some()
}

#[wasm_bindgen]
pub struct Dsocr {
    engine: Engine,
    /// What the WebGPU device was granted (burn asks for the adapter's maxima).
    adapter: String,
}

#[wasm_bindgen]
impl Dsocr {
    /// Loads the checkpoint under `baseUrl` (`config.json`, `model-00001-of-000001.safetensors` or
    /// `model.safetensors`, `tokenizer.json`) onto the WebGPU device. The weights are read tensor by
    /// tensor with HTTP Range requests straight into GPU buffers, never whole in wasm memory.
    /// Options: `onProgress({ file, loaded, total })`; `dtype`: `"auto"` (f16 where the adapter has
    /// `shader-f16`), `"f32"` or `"f16"`; `maxBindingBytes`: a lower cap than the adapter's
    /// `maxStorageBufferBindingSize` for one weight (vocabulary matrices are split in row shards).
    pub async fn load(base_url: String, options: JsValue) -> Result<Dsocr, JsValue> {
        if !has_webgpu() {
            return Err(js_error("NO_WEBGPU", "WebGPU is not available in this browser (navigator.gpu is missing)"));
        }
        let (mut device, setup) = burn::tensor::Device::wgpu_options()
            .init_with_setup_async()
            .await
            .map_err(|e| js_error("NO_WEBGPU", format!("no usable WebGPU adapter: {e:?}")))?;
        let f16_available = setup.device.features().contains(burn::tensor::wgpu::wgpu::Features::SHADER_F16);
        let f16 = match get(&options, "dtype").and_then(|v| v.as_string()).as_deref() {
            None | Some("auto") => f16_available,
            Some("f32") => false,
            Some("f16") if f16_available => true,
            Some("f16") => return Err(js_error("BAD_ARGUMENT", "dtype \"f16\" needs an adapter with shader-f16")),
            Some(other) => return Err(js_error("BAD_ARGUMENT", format!("unknown dtype {other:?} (auto, f32, f16)"))),
        };
        if f16 {
            device.configure(burn::tensor::FloatDType::F16).map_err(|e| js_error("BACKEND", format!("{e:?}")))?;
        }
        let mut max_tensor_bytes = wgpu_max_tensor_bytes(&setup);
        if let Some(cap) = get(&options, "maxBindingBytes").and_then(|v| v.as_f64()) {
            max_tensor_bytes = max_tensor_bytes.min(cap.max(1.0) as usize);
        }
        let adapter = adapter_report(&setup, max_tensor_bytes, f16);
        let on_progress = get(&options, "onProgress").and_then(|f| f.dyn_into::<Function>().ok());
        let base = base_url.trim_end_matches('/');
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| js_error("BAD_CHECKPOINT", e));
        let config = text(download(&format!("{base}/config.json"), "config.json", on_progress.as_ref()).await?)?;
        let tokenizer = download(&format!("{base}/tokenizer.json"), "tokenizer.json", on_progress.as_ref()).await?;
        let mut opened = None;
        let mut last_error = String::new();
        for name in ["model-00001-of-000001.safetensors", "model.safetensors"] {
            let fetch = HttpRange { url: format!("{base}/{name}"), whole: Default::default() };
            match Checkpoint::open(Box::new(fetch), DEFAULT_WINDOW_BYTES).await {
                Ok(checkpoint) => {
                    opened = Some((name, checkpoint));
                    break;
                }
                Err(e @ (Error::Safetensors(_) | Error::UnsupportedDtype { .. })) => return Err(from_error(e)),
                Err(e) => last_error = e.to_string(),
            }
        }
        let (name, checkpoint) =
            opened.ok_or_else(|| js_error("NETWORK", format!("{base}: no model-00001-of-000001.safetensors or model.safetensors ({last_error})")))?;
        let progress = |loaded: u64, total: u64| {
            if let Some(callback) = &on_progress {
                let _ = callback.call1(&JsValue::NULL, &progress_event(name, loaded as f64, Some(total as f64)));
            }
        };
        let options = EngineOptions::gpu(max_tensor_bytes);
        let engine = Engine::from_checkpoint(&config, &checkpoint, &tokenizer, &device, options, Some(&progress)).await.map_err(from_error)?;
        Ok(Dsocr { engine, adapter })
    }

    /// The adapter and the limits the device was granted, as JSON: `{ name, backend,
    /// maxStorageBufferBindingSize, maxBufferSize, maxComputeWorkgroupStorageSize, adapterMax…, shaderF16 }`.
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> Result<JsValue, JsValue> {
        js_sys::JSON::parse(&self.adapter)
    }

    /// Recognises `input` (Uint8Array / ArrayBuffer of an encoded image, Blob/File, ImageData or
    /// ImageBitmap; give `createImageBitmap` `{ colorSpaceConversion: "none" }` for exact pixels).
    /// Resolves to the same object as the native `OcrResult` JSON.
    pub async fn recognize(&self, input: JsValue, options: JsValue) -> Result<JsValue, JsValue> {
        let task = match get(&options, "task").and_then(|v| v.as_string()).as_deref().unwrap_or("markdown") {
            "markdown" => Task::Markdown,
            "free" => Task::FreeOcr,
            "ocr" => Task::Ocr,
            "figure" => Task::ParseFigure,
            "describe" => Task::Describe,
            other => match other.split_once('=') {
                Some(("locate", text)) => Task::Locate(text.into()),
                Some(("prompt", raw)) => Task::Raw(raw.into()),
                _ => return Err(js_error("BAD_ARGUMENT", format!("unknown task {other:?}"))),
            },
        };
        let mode: Mode = get(&options, "mode").and_then(|v| v.as_string()).unwrap_or_else(|| "tiny".into()).parse().map_err(from_error)?;
        let mut generation = GenerationOptions::default();
        if let Some(n) = get(&options, "maxNewTokens").and_then(|v| v.as_f64()) {
            generation.max_new_tokens = n as usize;
        }
        generation.repeat_guard = match get(&options, "repeatGuard").and_then(|v| v.as_string()).as_deref() {
            None | Some("vllm") => RepeatGuard::vllm(),
            Some("hf") => RepeatGuard::hf(),
            Some("off") => RepeatGuard::Off,
            Some(other) => return Err(js_error("BAD_ARGUMENT", format!("unknown repeatGuard {other:?}"))),
        };
        let on_token = get(&options, "onToken").and_then(|f| f.dyn_into::<Function>().ok());
        let signal = get(&options, "signal");
        let aborted = |signal: &Option<JsValue>| signal.as_ref().and_then(|s| get(s, "aborted")).and_then(|v| v.as_bool()).unwrap_or(false);
        if aborted(&signal) {
            return Err(js_error("ABORTED", "recognition was aborted"));
        }

        let on_event = |event: &crate::engine::TokenEvent| {
            if let Some(callback) = &on_token {
                let e = Object::new();
                let _ = Reflect::set(&e, &"id".into(), &event.id.into());
                let _ = Reflect::set(&e, &"text".into(), &event.text.as_str().into());
                let _ = Reflect::set(&e, &"index".into(), &(event.index as f64).into());
                let _ = callback.call1(&JsValue::NULL, &e);
            }
            if aborted(&signal) { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let input = match input.dyn_ref::<web_sys::ImageBitmap>() {
            Some(bitmap) => bitmap_pixels(bitmap)?,
            None => input,
        };
        let result = if let Some(image) = image_data(&input)? {
            self.engine.recognize_image(&image, &task, mode, &generation, on_event).await
        } else {
            let bytes = input_bytes(&input).await?;
            self.engine.recognize(&bytes, &task, mode, &generation, on_event).await
        }
        .map_err(from_error)?;
        if result.finish_reason == "cancelled" && aborted(&signal) {
            return Err(js_error("ABORTED", "recognition was aborted"));
        }
        let json = serde_json::to_string(&result).map_err(|e| js_error("BACKEND", e))?;
        js_sys::JSON::parse(&json)
    }
}

/// `ImageData` → RGB (alpha dropped, as the reference's `convert("RGB")`).
fn image_data(input: &JsValue) -> Result<Option<image::RgbImage>, JsValue> {
    let Some(data) = get(input, "data").filter(|d| d.is_instance_of::<js_sys::Uint8ClampedArray>()) else { return Ok(None) };
    let width = get(input, "width").and_then(|v| v.as_f64()).unwrap_or(0.0) as u32;
    let height = get(input, "height").and_then(|v| v.as_f64()).unwrap_or(0.0) as u32;
    let rgba = js_sys::Uint8ClampedArray::from(data).to_vec();
    if width == 0 || height == 0 || rgba.len() != (width * height * 4) as usize {
        return Err(js_error("BAD_IMAGE", "ImageData with inconsistent size"));
    }
    let rgb: Vec<u8> = rgba.chunks_exact(4).flat_map(|p| [p[0], p[1], p[2]]).collect();
    Ok(image::RgbImage::from_raw(width, height, rgb))
}

/// An `ImageBitmap`'s pixels as `ImageData`, drawn on an `OffscreenCanvas` (works in workers too).
fn bitmap_pixels(bitmap: &web_sys::ImageBitmap) -> Result<JsValue, JsValue> {
    let (width, height) = (bitmap.width(), bitmap.height());
    if width == 0 || height == 0 {
        return Err(js_error("BAD_IMAGE", "empty ImageBitmap (closed or zero-sized)"));
    }
    let canvas = web_sys::OffscreenCanvas::new(width, height)?;
    let context: web_sys::OffscreenCanvasRenderingContext2d =
        canvas.get_context("2d")?.ok_or_else(|| js_error("BACKEND", "no 2d context for an OffscreenCanvas"))?.dyn_into()?;
    context.draw_image_with_image_bitmap(bitmap, 0.0, 0.0)?;
    Ok(context.get_image_data(0.0, 0.0, width as f64, height as f64)?.into())
}

/// Encoded image bytes from a Uint8Array, ArrayBuffer or Blob/File.
async fn input_bytes(input: &JsValue) -> Result<Vec<u8>, JsValue> {
    if let Some(array) = input.dyn_ref::<Uint8Array>() {
        return Ok(array.to_vec());
    }
    if input.is_instance_of::<js_sys::ArrayBuffer>() {
        return Ok(Uint8Array::new(input).to_vec());
    }
    if let Some(blob) = input.dyn_ref::<web_sys::Blob>() {
        let buffer = JsFuture::from(blob.array_buffer()).await?;
        return Ok(Uint8Array::new(&buffer).to_vec());
    }
    Err(js_error("BAD_ARGUMENT", "input must be a Uint8Array, ArrayBuffer, Blob/File, ImageData or ImageBitmap"))
}
