//! The browser API (wasm32 only): `await Dsocr.load(baseUrl, { onProgress })` and
//! `await engine.recognize(input, { task, mode, maxNewTokens, repeatGuard, onToken, signal })`.
//! Errors are JS `Error`s with a `code` field. Every GPU readback is asynchronous.

use std::ops::ControlFlow;

use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use crate::engine::{Engine, EngineOptions};
use crate::error::Error;
use crate::generate::{GenerationOptions, RepeatGuard};
use crate::text::Task;
use crate::Mode;

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

/// Calls the global `fetch` (window or worker).
async fn fetch(url: &str) -> Result<web_sys::Response, JsValue> {
    let global = js_sys::global();
    let fetch: Function = Reflect::get(&global, &"fetch".into())?.dyn_into()?;
    let response: web_sys::Response = JsFuture::from(fetch.call1(&global, &url.into())?.dyn_into::<Promise>()?).await?.dyn_into()?;
    if !response.ok() {
        return Err(js_error("NETWORK", format!("{url}: HTTP {}", response.status())));
    }
    Ok(response)
}

/// Downloads `url` fully, reporting `{ file, loaded, total }` to `on_progress` as chunks arrive.
async fn download(url: &str, file: &str, on_progress: Option<&Function>) -> Result<Vec<u8>, JsValue> {
    let response = fetch(url).await?;
    let total = response.headers().get("content-length").ok().flatten().and_then(|v| v.parse::<f64>().ok());
    let body = response.body().ok_or_else(|| js_error("NETWORK", format!("{url}: empty body")))?;
    let reader: web_sys::ReadableStreamDefaultReader = body.get_reader().dyn_into()?;
    let mut bytes = Vec::with_capacity(total.unwrap_or(0.0) as usize);
    let report = |loaded: usize| {
        if let Some(callback) = on_progress {
            let event = Object::new();
            let _ = Reflect::set(&event, &"file".into(), &file.into());
            let _ = Reflect::set(&event, &"loaded".into(), &(loaded as f64).into());
            let _ = Reflect::set(&event, &"total".into(), &total.map_or(JsValue::NULL, JsValue::from));
            let _ = callback.call1(&JsValue::NULL, &event);
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

fn adapter_report(setup: &burn::tensor::wgpu::WgpuSetup) -> String {
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
    /// `model.safetensors`, `tokenizer.json`) onto the WebGPU device. `options.onProgress` receives
    /// `{ file, loaded, total }`.
    pub async fn load(base_url: String, options: JsValue) -> Result<Dsocr, JsValue> {
        if !has_webgpu() {
            return Err(js_error("NO_WEBGPU", "WebGPU is not available in this browser (navigator.gpu is missing)"));
        }
        let (device, setup) = burn::tensor::Device::wgpu_options()
            .init_with_setup_async()
            .await
            .map_err(|e| js_error("NO_WEBGPU", format!("no usable WebGPU adapter: {e:?}")))?;
        let adapter = adapter_report(&setup);
        let on_progress = get(&options, "onProgress").and_then(|f| f.dyn_into::<Function>().ok());
        let base = base_url.trim_end_matches('/');
        let text = |bytes: Vec<u8>| String::from_utf8(bytes).map_err(|e| js_error("BAD_CHECKPOINT", e));
        let config = text(download(&format!("{base}/config.json"), "config.json", on_progress.as_ref()).await?)?;
        let tokenizer = download(&format!("{base}/tokenizer.json"), "tokenizer.json", on_progress.as_ref()).await?;
        let mut weights = None;
        for name in ["model-00001-of-000001.safetensors", "model.safetensors"] {
            if let Ok(bytes) = download(&format!("{base}/{name}"), name, on_progress.as_ref()).await {
                weights = Some(bytes);
                break;
            }
        }
        let weights = weights.ok_or_else(|| js_error("NETWORK", format!("{base}: no model-00001-of-000001.safetensors or model.safetensors")))?;
        let engine = Engine::from_parts(&config, &weights, &tokenizer, &device, EngineOptions::default()).map_err(from_error)?;
        Ok(Dsocr { engine, adapter })
    }

    /// The adapter and the limits the device was granted, as JSON: `{ name, backend,
    /// maxStorageBufferBindingSize, maxBufferSize, maxComputeWorkgroupStorageSize, adapterMax…, shaderF16 }`.
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> Result<JsValue, JsValue> {
        js_sys::JSON::parse(&self.adapter)
    }

    /// Recognises `input` (Uint8Array / ArrayBuffer of an encoded image, Blob/File, or ImageData).
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
    Err(js_error("BAD_ARGUMENT", "input must be a Uint8Array, ArrayBuffer, Blob/File or ImageData"))
}
