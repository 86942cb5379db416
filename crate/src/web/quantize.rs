//! A float checkpoint quantized in the browser, for the package's cache: `Dsocr.quantizeCheckpoint`
//! reads the checkpoint under a URL tensor by tensor (Range requests, in blocks of rows), quantizes
//! it by a preset exactly as `dsocr quantize` does, and hands each finished shard (at most 64 MiB)
//! to the caller, which stores it; the index and the quantized `config.json` come back at the end.
//! The next load reads the quantized checkpoint from the cache: no download, no quantization.

use js_sys::{Function, Object, Promise, Reflect, Uint8Array};
use wasm_bindgen::JsCast;
use wasm_bindgen::prelude::*;
use wasm_bindgen_futures::JsFuture;

use super::error::{from_error, js_error};
use super::fetch::{self, Net};
use super::{Dsocr, get, get_string, progress_event};
use crate::error::{Error, Result};
use crate::quant::convert::{TensorSink, convert_into, quantized_config_json};
use crate::quant::{Preset, Recipe};
use crate::weights::{DEFAULT_SHARD_BYTES, PackedShard, ShardPacker};

/// The cache's shard names (its index maps every tensor to one).
fn shard_name(number: usize) -> String {
    format!("shard-{number:05}.safetensors")
}

/// Shards handed to `onShard(name, bytes)`, awaited when it returns a promise.
struct JsShards {
    packer: ShardPacker,
    on_shard: Function,
}

/// Gives `shard` to `on_shard(name, bytes)` and waits for it.
async fn store(on_shard: &Function, shard: PackedShard) -> Result<()> {
    let bytes = Uint8Array::from(&shard.bytes[..]);
    let stored = on_shard.call2(&JsValue::NULL, &shard_name(shard.number).into(), &bytes).map_err(|e| cache_error(&e))?;
    if let Ok(promise) = stored.dyn_into::<Promise>() {
        JsFuture::from(promise).await.map_err(|e| cache_error(&e))?;
    }
    Ok(())
}

fn cache_error(e: &JsValue) -> Error {
    let message = Reflect::get(e, &"message".into()).ok().and_then(|m| m.as_string()).unwrap_or_else(|| format!("{e:?}"));
    Error::Io(format!("storing a quantized shard: {message}"))
}

impl TensorSink for JsShards {
    async fn add(&mut self, name: &str, dtype: safetensors::Dtype, shape: &[usize], bytes: Vec<u8>) -> Result<()> {
        for shard in self.packer.add(name, dtype, shape, bytes)? {
            store(&self.on_shard, shard).await?;
        }
        Ok(())
    }
}

#[wasm_bindgen]
impl Dsocr {
    /// Quantizes the float checkpoint under `baseUrl` (the same files as [`Dsocr::load`] reads) by
    /// the preset `quantize` (`"q4"` or `"q8"`), giving every finished shard to
    /// `onShard(name, Uint8Array)` (awaited if it returns a promise; a rejection stops the
    /// conversion). Options also take `fetch`, `signal` and `onProgress({ file: "quantize", loaded,
    /// total })` (tensors). Resolves to `{ config, index }`: the quantized checkpoint's
    /// `config.json` and `model.safetensors.index.json` texts, the index naming the shards given
    /// with their sizes and sha256. The same bytes as `dsocr quantize` with 64 MiB shards, but
    /// for the shard names.
    #[wasm_bindgen(js_name = quantizeCheckpoint)]
    pub async fn quantize_checkpoint(base_url: String, options: JsValue) -> std::result::Result<JsValue, JsValue> {
        let preset = get_string(&options, "quantize").ok_or_else(|| js_error("BAD_ARGUMENT", "quantize: \"q4\" or \"q8\" is needed"))?;
        let recipe = Recipe::preset(Preset::parse(&preset).map_err(from_error)?, None).map_err(from_error)?;
        let on_shard: Function = get(&options, "onShard").and_then(|f| f.dyn_into().ok()).ok_or_else(|| js_error("BAD_ARGUMENT", "onShard(name, bytes) is needed"))?;
        let on_progress = get(&options, "onProgress").and_then(|f| f.dyn_into::<Function>().ok());
        let signal = Net::from_options(&options);
        let base = base_url.trim_end_matches('/');
        let config = fetch::download(&format!("{base}/config.json"), &signal, &|_, _| {}).await?;
        let config = String::from_utf8(config).map_err(|e| js_error("BAD_CHECKPOINT", format!("config.json: {e}")))?;
        let (_, checkpoint) = fetch::open_checkpoint(base, &signal).await?;
        let mut sink = JsShards { packer: ShardPacker::new(DEFAULT_SHARD_BYTES).map_err(from_error)?, on_shard };
        let mut progress = |done: usize, total: usize| {
            if let Some(callback) = &on_progress {
                let _ = callback.call1(&JsValue::NULL, &progress_event("quantize", done as f64, Some(total as f64)));
            }
        };
        convert_into(&checkpoint, &config, &recipe, &mut sink, &mut progress).await.map_err(from_error)?;
        if signal.aborted() {
            return Err(js_error("ABORTED", "aborted"));
        }
        let JsShards { packer, on_shard } = sink;
        let (last, index) = packer.finish(|i, _| shard_name(i)).map_err(from_error)?;
        if let Some(shard) = last {
            store(&on_shard, shard).await.map_err(from_error)?;
        }
        let out = Object::new();
        let config = quantized_config_json(&config, &recipe).map_err(from_error)?;
        let index = serde_json::to_string_pretty(&index).map_err(|e| js_error("INTERNAL", e))?;
        Reflect::set(&out, &"config".into(), &config.into())?;
        Reflect::set(&out, &"index".into(), &index.into())?;
        Ok(out.into())
    }
}
