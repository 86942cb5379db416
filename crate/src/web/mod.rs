//! The browser surface (wasm32 + `webgpu`): `await Dsocr.load(baseUrl, options)` and
//! `await engine.recognize(input, options)`, what the npm package's worker calls (`www/src/`).
//! Errors are JS `Error`s with a `code` field ([`error`]); every GPU readback is asynchronous;
//! weights stream from the network into GPU buffers tensor by tensor ([`fetch`]).

mod error;
mod fetch;
mod hash;
mod input;
mod quantize;

use std::ops::ControlFlow;

use js_sys::{Function, Object, Reflect};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;

use self::error::{from_error, js_error};
pub use self::hash::Sha256Stream;
use self::fetch::Net;
use crate::Mode;
use crate::engine::{Engine, EngineOptions, wgpu_max_tensor_bytes};
use crate::generate::{GenerationOptions, RepeatGuard};
use crate::quant::{Preset, Recipe};
use crate::text::Task;

pub(crate) fn get(obj: &JsValue, key: &str) -> Option<JsValue> {
    if obj.is_undefined() || obj.is_null() {
        return None;
    }
    Reflect::get(obj, &key.into()).ok().filter(|v| !v.is_undefined() && !v.is_null())
}

fn get_string(obj: &JsValue, key: &str) -> Option<String> {
    get(obj, key).and_then(|v| v.as_string())
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

fn task_of(options: &JsValue) -> Result<Task, JsValue> {
    Ok(match get_string(options, "task").as_deref().unwrap_or("markdown") {
        "markdown" => Task::Markdown,
        "free" => Task::FreeOcr,
        "ocr" => Task::Ocr,
        "figure" => Task::ParseFigure,
        "describe" => Task::Describe,
        other => match other.split_once('=') {
            Some(("locate", text)) => Task::Locate(text.into()),
            Some(("prompt", raw)) => Task::Raw(raw.into()),
            _ => return Err(js_error("BAD_ARGUMENT", format!("unknown task {other:?} (markdown, free, ocr, figure, describe, locate=TEXT, prompt=RAW)"))),
        },
    })
}

fn generation_of(options: &JsValue) -> Result<GenerationOptions, JsValue> {
    let mut generation = GenerationOptions::default();
    if let Some(n) = get(options, "maxNewTokens") {
        match n.as_f64() {
            Some(n) if n >= 1.0 && n.fract() == 0.0 => generation.max_new_tokens = n as usize,
            _ => return Err(js_error("BAD_ARGUMENT", format!("maxNewTokens must be a positive integer, got {n:?}"))),
        }
    }
    generation.repeat_guard = match get_string(options, "repeatGuard").as_deref() {
        None | Some("vllm") => RepeatGuard::vllm(),
        Some("hf") => RepeatGuard::hf(),
        Some("off") => RepeatGuard::Off,
        Some(other) => return Err(js_error("BAD_ARGUMENT", format!("unknown repeatGuard {other:?} (vllm, hf, off)"))),
    };
    Ok(generation)
}

// cubecl registers its IR dialects through `inventory`, i.e. static constructors. wasm-ld runs them
// from `__wasm_call_ctors`, and when no export calls that itself it wraps *every* export in a call
// to it ("command" linkage) — so each call into the module (every future wake-up, every callback,
// thousands per recognition) re-ran all constructors: ~60% of the main thread's time per decoded
// token. Calling it once here, at instantiation, makes the linker leave the exports alone.
unsafe extern "C" {
    fn __wasm_call_ctors();
}

#[wasm_bindgen(start)]
fn start() {
    // SAFETY: called once, by wasm-bindgen's init right after instantiation, before any other export.
    unsafe { __wasm_call_ctors() }
}

#[wasm_bindgen]
pub struct Dsocr {
    engine: Engine,
    /// What the WebGPU device was granted (burn asks for the adapter's maxima).
    adapter: String,
}

#[wasm_bindgen]
impl Dsocr {
    /// Loads the checkpoint under `baseUrl` onto the WebGPU device: the shards listed by
    /// `model.safetensors.index.json` (what `dsocr quantize` writes), else the hub's
    /// `model-00001-of-000001.safetensors` or `model.safetensors`; with `config.json` and
    /// `tokenizer.json`. Weights are read tensor by tensor with HTTP Range requests straight into
    /// GPU buffers, never whole in wasm memory.
    /// Options: `onProgress({ file, loaded, total })`; `dtype`: `"auto"` (f16 where the adapter has
    /// `shader-f16`), `"f32"` or `"f16"`; `quantize`: `"q4"` or `"q8"` (a float checkpoint
    /// quantized while loading); `maxBindingBytes`: a lower cap than the adapter's
    /// `maxStorageBufferBindingSize` for one weight (vocabulary matrices are split in row shards);
    /// `signal`: an `AbortSignal` that stops the downloads (rejects with code `ABORTED`);
    /// `fetch`: the function to request files with, `fetch`'s signature (default: the global
    /// `fetch`; the npm package passes its cache's); with it, `settled` (a promise that settles once
    /// every file the fetch serves is verified) and `stale()` (whether a byte served before that
    /// differed): the engine then loads once more.
    pub async fn load(base_url: String, options: JsValue) -> Result<Dsocr, JsValue> {
        if !has_webgpu() {
            return Err(js_error("NO_WEBGPU", "WebGPU is not available in this browser (navigator.gpu is missing)"));
        }
        let signal = Net::from_options(&options);
        let quantize = match get_string(&options, "quantize").as_deref() {
            None | Some("none") => None,
            Some(name) => Some(Recipe::preset(Preset::parse(name).map_err(from_error)?, None).map_err(from_error)?),
        };
        let (mut device, setup) = burn::tensor::Device::wgpu_options()
            .init_with_setup_async()
            .await
            .map_err(|e| js_error("NO_WEBGPU", format!("no usable WebGPU adapter: {e:?}")))?;
        // The model's kernels use 16 KiB of workgroup memory (WebGPU's guaranteed minimum).
        let workgroup = setup.adapter.limits().max_compute_workgroup_storage_size;
        if workgroup < 16384 {
            return Err(js_error("ADAPTER_LIMITS", format!("the adapter offers {workgroup} bytes of workgroup memory, 16384 are needed")));
        }
        let f16_available = setup.device.features().contains(burn::tensor::wgpu::wgpu::Features::SHADER_F16);
        let f16 = match get_string(&options, "dtype").as_deref() {
            None | Some("auto") => f16_available,
            Some("f32") => false,
            Some("f16") if f16_available => true,
            Some("f16") => return Err(js_error("ADAPTER_LIMITS", "dtype \"f16\" needs an adapter with shader-f16")),
            Some(other) => return Err(js_error("BAD_ARGUMENT", format!("unknown dtype {other:?} (auto, f32, f16)"))),
        };
        if f16 {
            device.configure(burn::tensor::FloatDType::F16).map_err(|e| js_error("INTERNAL", format!("{e:?}")))?;
        }
        let mut max_tensor_bytes = wgpu_max_tensor_bytes(&setup);
        if let Some(cap) = get(&options, "maxBindingBytes").and_then(|v| v.as_f64()) {
            max_tensor_bytes = max_tensor_bytes.min(cap.max(1.0) as usize);
        }
        let adapter = adapter_report(&setup, max_tensor_bytes, f16);
        let on_progress = get(&options, "onProgress").and_then(|f| f.dyn_into::<Function>().ok());
        let report = |file: &str, loaded: f64, total: Option<f64>| {
            if let Some(callback) = &on_progress {
                let _ = callback.call1(&JsValue::NULL, &progress_event(file, loaded, total));
            }
        };
        let base = base_url.trim_end_matches('/');
        let small = |name: &'static str| {
            let (url, signal) = (format!("{base}/{name}"), signal.clone());
            let report = &report;
            async move { fetch::download(&url, &signal, &|loaded, total| report(name, loaded, total)).await }
        };
        let load_once = || async {
            let config = String::from_utf8(small("config.json").await?).map_err(|e| js_error("BAD_CHECKPOINT", format!("config.json: {e}")))?;
            let tokenizer = small("tokenizer.json").await?;
            let (name, checkpoint) = fetch::open_checkpoint(base, &signal).await?;
            let progress = |loaded: u64, total: u64| report(&name, loaded as f64, Some(total as f64));
            let options = EngineOptions { quantize: quantize.clone(), ..EngineOptions::gpu(max_tensor_bytes) };
            Engine::from_checkpoint(&config, &checkpoint, &tokenizer, &device, options, Some(&progress)).await.map_err(from_error)
        };
        let mut engine = load_once().await;
        // Files served while they download (the package's cache): once every one is verified, a
        // header read before its shard was (`stale`) means the engine loads again, on this device.
        if let Some(settled) = get(&options, "settled").and_then(|p| p.dyn_into::<js_sys::Promise>().ok()) {
            let _ = wasm_bindgen_futures::JsFuture::from(settled).await;
            let stale = get(&options, "stale").and_then(|f| f.dyn_into::<Function>().ok()).and_then(|f| f.call0(&JsValue::NULL).ok());
            if stale.and_then(|v| v.as_bool()) == Some(true) {
                drop(engine);
                engine = load_once().await;
            }
        }
        let engine = engine?;
        if signal.aborted() {
            return Err(js_error("ABORTED", "aborted"));
        }
        Ok(Dsocr { engine, adapter })
    }

    /// Compiles the GPU kernels now ([`Engine::warm_up`]: a blank page, two tokens), so the first
    /// recognition does not wait for them.
    #[wasm_bindgen(js_name = warmUp)]
    pub async fn warm_up(&self) -> Result<(), JsValue> {
        self.engine.warm_up().await.map_err(from_error)
    }

    /// The adapter and the limits the device was granted, as JSON: `{ name, backend,
    /// maxStorageBufferBindingSize, maxBufferSize, maxComputeWorkgroupStorageSize, adapterMax…,
    /// shaderF16, maxTensorBytes, dtype }`.
    #[wasm_bindgen(js_name = adapterInfo)]
    pub fn adapter_info(&self) -> Result<JsValue, JsValue> {
        js_sys::JSON::parse(&self.adapter)
    }

    /// Recognises `input` (Uint8Array / ArrayBuffer of an encoded image, Blob/File, ImageData or
    /// ImageBitmap; give `createImageBitmap` `{ colorSpaceConversion: "none" }` for exact pixels).
    /// Options: `task`, `mode`, `maxNewTokens`, `repeatGuard`, `onToken({ id, text, index })`,
    /// `signal` (checked after every token: an abort rejects with code `ABORTED`). Resolves to the
    /// same object as the native `OcrResult` JSON.
    pub async fn recognize(&self, input: JsValue, options: JsValue) -> Result<JsValue, JsValue> {
        let task = task_of(&options)?;
        // Default: the model's smallest mode (Tiny; DeepSeek-OCR-2: Base).
        let mode: Mode = match get_string(&options, "mode") {
            Some(name) => name.parse().map_err(from_error)?,
            None => Mode::available(self.engine.config().version())[0],
        };
        let generation = generation_of(&options)?;
        let on_token = get(&options, "onToken").and_then(|f| f.dyn_into::<Function>().ok());
        let signal = Net::from_options(&options);
        if signal.aborted() {
            return Err(js_error("ABORTED", "aborted"));
        }
        let on_event = |event: &crate::engine::TokenEvent| {
            if let Some(callback) = &on_token {
                let e = Object::new();
                let _ = Reflect::set(&e, &"id".into(), &event.id.into());
                let _ = Reflect::set(&e, &"text".into(), &event.text.as_str().into());
                let _ = Reflect::set(&e, &"index".into(), &(event.index as f64).into());
                let _ = callback.call1(&JsValue::NULL, &e);
            }
            if signal.aborted() { ControlFlow::Break(()) } else { ControlFlow::Continue(()) }
        };
        let result = match input::read(&input).await? {
            input::Input::Pixels(image) => self.engine.recognize_image(&image, &task, mode, &generation, on_event).await,
            input::Input::Encoded(bytes) => self.engine.recognize(&bytes, &task, mode, &generation, on_event).await,
        }
        .map_err(from_error)?;
        if signal.aborted() {
            return Err(js_error("ABORTED", "aborted"));
        }
        let json = serde_json::to_string(&result).map_err(|e| js_error("INTERNAL", e))?;
        js_sys::JSON::parse(&json)
    }
}
