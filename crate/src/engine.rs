//! The one place that orchestrates: checkpoint → model; image + task + mode → [`OcrResult`].
//!
//! image bytes → decode → preprocess (views) → prompt ids → encoder → decoder/generate → text → blocks.

use std::ops::ControlFlow;

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;
use web_time::Instant;

use crate::config::{Config, Mode};
use crate::error::{Error, Result};
use crate::generate::{Batch, BatchItem, FinishReason, GenerationOptions, Generated};
use crate::image::{DecodeLimits, PreprocessOptions, decode, make_views_for, normalize};
use crate::model::layout::image_tokens;
use crate::model::{Decoder, VisionEncoder};
use crate::output::{OcrResult, Timings, clean_markdown, parse_grounding, strip_eos};
use crate::quant::Recipe;
use crate::text::prompt::IMAGE_TOKEN_ID;
use crate::text::{Task, Tokenizer, prompt_ids};
use crate::weights::{Checkpoint, LoadProgress, Loader, expected_tensors};

/// Settings that do not change per request.
#[derive(Debug, Clone, PartialEq)]
pub struct EngineOptions {
    pub preprocess: PreprocessOptions,
    pub decode_limits: DecodeLimits,
    /// The largest tensor the device can bind, in bytes (WebGPU's `maxStorageBufferBindingSize`):
    /// the vocabulary-sized embedding and lm_head are split into row shards within it.
    /// `usize::MAX` (the default) for devices without such a limit.
    pub max_tensor_bytes: usize,
    /// Keep the routed experts stacked so decoding picks them on the device, with no host readback
    /// per MoE layer: what GPUs (wgpu, WebGPU) want; on the CPU the grouped path is faster.
    pub stacked_experts: bool,
    /// Threads the model spreads work over itself where burn's CPU backend would use one thread:
    /// a decoding step's matrix–vector products (decoding is bound by how fast the weights are
    /// read, and one core reads at half the machine's bandwidth), a step's experts, SAM's MLP
    /// (GELU). Default: the CPU's thread count (rayon's pool; 1 in wasm32). Set 1 for a GPU (the
    /// CLI and browser do).
    pub threads: usize,
    /// Quantize a float checkpoint's weights as they are loaded (`Recipe::preset(Preset::Q4, None)`
    /// …): the same numbers as loading the checkpoint `dsocr quantize` writes with that recipe.
    pub quantize: Option<Recipe>,
    /// Keep quantized weights packed on the host and multiply them with the crate's CPU kernels,
    /// and the decoder's KV cache in host memory, where a decoding step appends to it and attends
    /// without copying it (the CPU backend; default). Off, quantized weights are dequantized onto
    /// the device when loaded (GPUs, until they have kernels of their own) and the cache is device
    /// tensors.
    pub host_kernels: bool,
    /// On a GPU that runs the crate's kernels (`gpu/`; wgpu, WebGPU) with host kernels off, keep
    /// quantized weights packed on the device and multiply them there (default). Off, they are
    /// dequantized to the device's float type when loaded (float memory; for comparison).
    pub device_kernels: bool,
    /// Faults the device reports on its own (a GPU's out-of-memory): checked after loading, each
    /// page's prefill and each decoding step; once one is recorded, recognitions fail with
    /// [`Error::Gpu`]. The CLI and the service watch their wgpu device
    /// ([`crate::gpu::DeviceFaults::watch`]); the default watches nothing.
    pub device_faults: crate::gpu::DeviceFaults,
}

impl Default for EngineOptions {
    fn default() -> Self {
        Self {
            preprocess: PreprocessOptions::default(),
            decode_limits: DecodeLimits::default(),
            max_tensor_bytes: usize::MAX,
            stacked_experts: false,
            threads: cpu_threads(),
            quantize: None,
            host_kernels: true,
            device_kernels: true,
            device_faults: crate::gpu::DeviceFaults::default(),
        }
    }
}

impl EngineOptions {
    /// The settings a GPU wants: weights within its binding limit `max_tensor_bytes`, the routed
    /// experts stacked, no host threads of the model's own, quantized weights packed on the device.
    pub fn gpu(max_tensor_bytes: usize) -> Self {
        Self { max_tensor_bytes, stacked_experts: true, threads: 1, host_kernels: false, ..Self::default() }
    }
}

/// For a process that runs the model on the CPU (call once, first thing): glibc's allocator otherwise
/// serves every block over 128 KiB — each op's output — from a fresh `mmap`, paid for in page faults
/// and zeroing, and hands it back when freed. This keeps blocks up to 32 MiB in the heap for reuse.
/// Measured (full-size weights, 2 cores): encoder Tiny 2.5 → 2.2 s, Small 3.6 → 3.0 s, load
/// 33 → 28 s, same peak memory. No-op on other platforms.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes the allocator's thresholds (at worst it refuses a value).
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            // Free memory at the heap's top beyond this goes back to the system.
            libc::mallopt(libc::M_TRIM_THRESHOLD, 64 << 20);
        }
    }
}

/// Threads of the CPU backend's pool (1 in wasm32, which has none).
pub fn cpu_threads() -> usize {
    #[cfg(not(target_arch = "wasm32"))]
    return rayon::current_num_threads();
    #[cfg(target_arch = "wasm32")]
    return 1;
}

/// The largest weight a wgpu/WebGPU device can bind, for [`EngineOptions::max_tensor_bytes`]: the
/// smaller of its storage-binding and buffer-size limits.
#[cfg(any(feature = "wgpu", feature = "webgpu"))]
pub fn wgpu_max_tensor_bytes(setup: &burn::tensor::wgpu::WgpuSetup) -> usize {
    let limits = setup.device.limits();
    usize::try_from(limits.max_storage_buffer_binding_size.min(limits.max_buffer_size)).unwrap_or(usize::MAX)
}

/// Where and how [`Engine::load`] runs the model, and whom it tells about progress.
#[cfg(all(feature = "hub", not(target_arch = "wasm32")))]
pub struct LoadOptions<'p> {
    /// Default: burn's default device (`BURN_DEVICE` picks one at run time). For a GPU set `engine`
    /// to [`EngineOptions::gpu`] with its binding limit (the CLI does).
    pub device: Device,
    /// Float type of weights and activations: f16/bf16 halve the memory where the device has them.
    pub dtype: burn::tensor::FloatDType,
    pub engine: EngineOptions,
    /// Download progress per file: `(file, bytes so far, total)`.
    pub on_download: Option<crate::hub::Progress<'p>>,
    /// Loading progress: `(bytes loaded, bytes in the checkpoint)`.
    pub on_load: Option<LoadProgress<'p>>,
}

#[cfg(all(feature = "hub", not(target_arch = "wasm32")))]
impl Default for LoadOptions<'_> {
    fn default() -> Self {
        Self { device: Device::default(), dtype: burn::tensor::FloatDType::F32, engine: EngineOptions::default(), on_download: None, on_load: None }
    }
}

/// A loaded model, tokenizer and device.
#[derive(Debug)]
pub struct Engine {
    config: Config,
    encoder: VisionEncoder,
    decoder: Decoder,
    tokenizer: Tokenizer,
    device: Device,
    options: EngineOptions,
}

/// `tokenizer.json` must be DeepSeek-OCR's: `<image>` at the id the prompts use, every id within the
/// model's vocabulary (a tokenizer from another model would give text that means nothing).
fn check_tokenizer(tokenizer: &Tokenizer, config: &Config) -> Result<()> {
    let vocab = config.decoder.vocab_size;
    let fail = |why: String| Err(Error::Tokenizer(format!("tokenizer.json does not belong to this model ({why}); use the checkpoint's own tokenizer.json")));
    match tokenizer.token_id("<image>") {
        Some(IMAGE_TOKEN_ID) => {}
        Some(id) => return fail(format!("`<image>` is token {id}, DeepSeek-OCR's is {IMAGE_TOKEN_ID}")),
        None => return fail("it has no `<image>` token".into()),
    }
    if tokenizer.vocab_size() > vocab {
        return fail(format!("{} tokens, more than the model's vocabulary of {vocab}", tokenizer.vocab_size()));
    }
    Ok(())
}

/// A page ready for generation (see [`Engine::prepare`]).
struct Prepared {
    ids: Vec<u32>,
    embeds: Tensor<2>,
    placeholders: usize,
    original_size: [u32; 2],
    grid: [usize; 2],
    timings: Timings,
    started: Instant,
}

/// What `recognize` streams per generated token.
#[derive(Debug, Clone, PartialEq)]
pub struct TokenEvent {
    pub id: u32,
    /// Decoded text of this token (may be empty for a partial UTF-8 sequence).
    pub text: String,
    /// Tokens generated so far, this one included.
    pub index: usize,
}

impl Engine {
    /// Builds the engine from `config.json`, an opened checkpoint (in memory or ranged) and
    /// `tokenizer.json`. `progress` gets `(bytes loaded, bytes in the checkpoint)` after each tensor.
    pub async fn from_checkpoint(
        config_json: &str,
        checkpoint: &Checkpoint<'_>,
        tokenizer_json: &[u8],
        device: &Device,
        options: EngineOptions,
        progress: Option<LoadProgress<'_>>,
    ) -> Result<Self> {
        let config = Config::from_json(config_json)?;
        let stored = Recipe::from_config_json(config_json)?;
        if let (Some(stored), Some(wanted)) = (&stored, &options.quantize) {
            if stored != wanted {
                return Err(Error::InvalidArgument(format!(
                    "the checkpoint is already quantized ({}); load it without a quantization option",
                    stored.preset.map_or("custom recipe", |p| p.name())
                )));
            }
        }
        // Check every name and shape up front: a wrong file fails fast, naming the tensor.
        checkpoint.check(&expected_tensors(&config), stored.as_ref())?;
        let tokenizer = Tokenizer::from_json(tokenizer_json)?;
        check_tokenizer(&tokenizer, &config)?;
        let mut loader = Loader::new(checkpoint, device)
            .with_max_tensor_bytes(options.max_tensor_bytes)
            .with_stacked_experts(options.stacked_experts)
            .with_threads(options.threads)
            .with_stored_recipe(stored)
            .with_quantize(options.quantize.clone())
            .with_host_kernels(options.host_kernels)
            .with_device_kernels(options.device_kernels);
        if let Some(progress) = progress {
            loader = loader.with_progress(progress);
        }
        // A weight whose buffer could not be made reads as garbage: a device fault comes first.
        let encoder = VisionEncoder::load(&config, &loader).await;
        let encoder = options.device_faults.check().and(encoder)?;
        let decoder = Decoder::load(&config.decoder, &loader).await;
        let decoder = options.device_faults.check().and(decoder)?;
        if let Some(progress) = progress {
            // Tensors the model does not use (CLIP's patch embedding) were never read.
            let total = checkpoint.data_len() as u64;
            progress(total, total);
        }
        Ok(Self { config, encoder, decoder, tokenizer, device: device.clone(), options })
    }

    /// Builds the engine from the checkpoint's files held in memory: `config.json`, the safetensors
    /// file and `tokenizer.json` (natively see [`Engine::load_dir`]; in the browser the weights are
    /// read through a ranged [`Checkpoint`]).
    pub async fn from_parts(config_json: &str, weights: &[u8], tokenizer_json: &[u8], device: &Device, options: EngineOptions) -> Result<Self> {
        let checkpoint = Checkpoint::parse(weights)?;
        Self::from_checkpoint(config_json, &checkpoint, tokenizer_json, device, options, None).await
    }

    /// Loads the model from `source`: a checkpoint folder, a hub repo id (`deepseek-ai/DeepSeek-OCR`,
    /// downloaded into the hub cache with resume and sha256 checks; `HF_ENDPOINT`, `HF_HOME`,
    /// `HF_TOKEN`) or an http(s) base URL holding the same files.
    #[cfg(all(feature = "hub", not(target_arch = "wasm32")))]
    pub async fn load(source: &str, options: LoadOptions<'_>) -> Result<Self> {
        let LoadOptions { mut device, dtype, engine, on_download, on_load } = options;
        let mut quiet = |_: &str, _: u64, _: Option<u64>| {};
        let dir = crate::hub::resolve(source, on_download.unwrap_or(&mut quiet))?;
        if dtype != burn::tensor::FloatDType::F32 {
            if !device.supports_dtype(burn::tensor::DType::from(dtype)) {
                return Err(Error::InvalidArgument(format!("{dtype:?} is not supported on this device")));
            }
            device.configure(dtype).map_err(|e| Error::InvalidArgument(format!("cannot use {dtype:?} on this device: {e:?}")))?;
        }
        Self::load_dir(&dir, &device, engine, on_load).await
    }

    /// Loads a checkpoint directory in the hub layout: `config.json`, `tokenizer.json` and either the
    /// single `model-00001-of-000001.safetensors` / `model.safetensors` or the shards named by
    /// `model.safetensors.index.json` (each checked against the size and sha256 the index records).
    #[cfg(not(target_arch = "wasm32"))]
    pub async fn load_dir(dir: &std::path::Path, device: &Device, options: EngineOptions, progress: Option<LoadProgress<'_>>) -> Result<Self> {
        let read = |name: &str| std::fs::read(dir.join(name)).map_err(|e| Error::Io(format!("{}: {e}", dir.join(name).display())));
        let config = String::from_utf8(read("config.json")?).map_err(|e| Error::Config(e.to_string()))?;
        let tokenizer = read("tokenizer.json")?;
        let files = crate::weights::native::map_checkpoint(dir)?;
        let checkpoint = files.checkpoint()?;
        Self::from_checkpoint(&config, &checkpoint, &tokenizer, device, options, progress).await
    }

    /// The vision encoder (for tests and tools that compare stages).
    pub fn encoder(&self) -> &VisionEncoder {
        &self.encoder
    }

    /// The decoder (for tests and tools that drive generation themselves).
    pub fn decoder(&self) -> &Decoder {
        &self.decoder
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    /// The device the model runs on.
    pub fn device(&self) -> &Device {
        &self.device
    }

    pub fn tokenizer(&self) -> &Tokenizer {
        &self.tokenizer
    }

    /// The settings it was loaded with (limits included).
    pub fn options(&self) -> &EngineOptions {
        &self.options
    }

    /// Decodes image bytes and recognises them; see [`Engine::recognize_image`].
    pub async fn recognize(
        &self,
        image_bytes: &[u8],
        task: &Task,
        mode: Mode,
        generation: &GenerationOptions,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<OcrResult> {
        let mut batch = PageBatch::new(self);
        batch.join((), image_bytes, task, mode, generation).await?;
        batch.run(|_, event| on_token(event)).await.pop().expect("one result per page").1
    }

    /// Runs a blank page through the model's smallest mode with two greedy tokens and no stop ids,
    /// so that a GPU compiles the kernels of encoding, prefill and a decoding step now (wgpu compiles
    /// each on first use: seconds) rather than during the first recognition. The CLI and the service
    /// call it after loading on a GPU, the npm package with its `warmup` option.
    pub async fn warm_up(&self) -> Result<()> {
        let blank = RgbImage::from_pixel(64, 64, image::Rgb([255, 255, 255]));
        let mode = Mode::available(self.config.version())[0];
        let generation = GenerationOptions { max_new_tokens: 2, stop_ids: Vec::new(), ..GenerationOptions::default() };
        self.recognize_image(&blank, &Task::FreeOcr, mode, &generation, |_| ControlFlow::Continue(())).await.map(|_| ())
    }

    /// Runs the whole pipeline on an RGB image (already EXIF-oriented).
    pub async fn recognize_image(
        &self,
        image: &RgbImage,
        task: &Task,
        mode: Mode,
        generation: &GenerationOptions,
        mut on_token: impl FnMut(&TokenEvent) -> ControlFlow<()>,
    ) -> Result<OcrResult> {
        let mut batch = PageBatch::new(self);
        batch.join_image((), image, task, mode, generation).await?;
        batch.run(|_, event| on_token(event)).await.pop().expect("one result per page").1
    }

    /// Several pages at once: each is decoded, encoded and prefilled alone, then their decoding steps
    /// run as one batch (a [`PageBatch`]: each decoder weight is read once per step for all pages).
    /// `on_token(page, event)` streams each page's tokens; `Break` cancels that page only. Results
    /// come in the pages' order, each what [`Engine::recognize`] gives.
    pub async fn recognize_batch(
        &self,
        pages: &[(&[u8], &Task, Mode, &GenerationOptions)],
        on_token: impl FnMut(usize, &TokenEvent) -> ControlFlow<()>,
    ) -> Vec<Result<OcrResult>> {
        let mut results: Vec<Option<Result<OcrResult>>> = (0..pages.len()).map(|_| None).collect();
        let mut batch = PageBatch::new(self);
        for (i, &(bytes, task, mode, generation)) in pages.iter().enumerate() {
            if let Err(e) = batch.join(i, bytes, task, mode, generation).await {
                results[i] = Some(Err(e));
            }
        }
        for (i, result) in batch.run(on_token).await {
            results[i] = Some(result);
        }
        results.into_iter().map(|r| r.expect("one result per page")).collect()
    }

    /// Views, prompt ids and the prompt's embeddings (image vectors spliced in) of an image.
    fn prepare(&self, image: &RgbImage, task: &Task, mode: Mode) -> Result<Prepared> {
        let started = Instant::now();
        let mut timings = Timings::default();
        let version = self.config.version();
        let geometry = mode.geometry(version)?;
        let views = make_views_for(image, &geometry, &self.options.preprocess)?;
        let placeholders = image_tokens(version, &geometry, views.grid);
        let ids = prompt_ids(&self.tokenizer, &task.prompt(), &[placeholders])?;
        let global = self.pixels(&[&views.global]);
        let tiles = (!views.tiles.is_empty()).then(|| (self.pixels(&views.tiles.iter().collect::<Vec<_>>()), views.grid));
        timings.preprocess = ms(started);
        let t = Instant::now();
        let image_embeds = self.encoder.embed_image(global, tiles)?;
        let embeds = self.decoder.embed_prompt(&ids, IMAGE_TOKEN_ID, Some(image_embeds), &self.device)?;
        timings.encode = ms(t);
        Ok(Prepared { ids, embeds, placeholders, original_size: views.original_size, grid: views.grid, timings, started })
    }

    /// The result of a prepared page and what was generated for it.
    fn finish(&self, prepared: Prepared, task: &Task, generated: Generated, prefill_ms: f64, decode_ms: f64) -> Result<OcrResult> {
        let Prepared { ids, placeholders, original_size, grid, mut timings, started, .. } = prepared;
        timings.prefill = prefill_ms;
        timings.decode = decode_ms;
        let decoded = self.tokenizer.decode(&generated.tokens)?;
        let text = strip_eos(&decoded).to_string();
        let blocks = if task.grounded() { parse_grounding(&text, original_size) } else { Vec::new() };
        let markdown = clean_markdown(&text);
        timings.total = ms(started);
        Ok(OcrResult {
            model: self.config.version().name().into(),
            text,
            markdown,
            blocks,
            token_ids: generated.tokens.clone(),
            image_token_count: placeholders,
            prompt_token_count: ids.len(),
            finish_reason: finish_name(generated.finish).into(),
            ended_without_eos: generated.truncated(),
            image_size: original_size,
            tile_grid: grid,
            timings_ms: timings,
        })
    }

    /// `result`, unless the device has reported a fault: then that fault (what went wrong first).
    fn unless_faulted<T>(&self, result: Result<T>) -> Result<T> {
        self.options.device_faults.check().and(result)
    }

    fn pixels(&self, views: &[&RgbImage]) -> Tensor<4> {
        let (values, shape) = normalize(views, self.options.preprocess.round_to_bf16);
        Tensor::from_data(TensorData::new(values, shape), &self.device)
    }
}

/// Pages recognised together that join and leave between decoding steps (continuous batching over
/// [`Batch`]): a page joins decoded, encoded and prefilled, and takes part from the next step on;
/// each [`PageBatch::step`] chooses every page's next token and returns the pages that ended, with
/// their results. `K` names a page to the caller (distinct keys). `dsocr serve` keeps one for the
/// whole service, so a request that arrives while others decode joins them at the next step.
pub struct PageBatch<'e, K> {
    engine: &'e Engine,
    batch: Batch<'e, K>,
    pages: Vec<(K, Page)>,
}

/// A page of a [`PageBatch`]: what its result needs besides the generated tokens.
struct Page {
    prepared: Prepared,
    task: Task,
    tokens: usize,
    prefill_ms: f64,
    decoding: Instant,
}

impl<'e, K: Copy + PartialEq> PageBatch<'e, K> {
    pub fn new(engine: &'e Engine) -> Self {
        Self { engine, batch: Batch::new(&engine.decoder), pages: Vec::new() }
    }

    /// Pages still decoding.
    pub fn len(&self) -> usize {
        self.pages.len()
    }

    pub fn is_empty(&self) -> bool {
        self.pages.is_empty()
    }

    /// Decodes image bytes and joins them (see [`PageBatch::join_image`]).
    pub async fn join(&mut self, key: K, image_bytes: &[u8], task: &Task, mode: Mode, generation: &GenerationOptions) -> Result<()> {
        let started = Instant::now();
        let image = decode(image_bytes, &self.engine.options.decode_limits)?;
        let decode_ms = ms(started);
        self.join_at(key, &image, task, mode, generation, started, decode_ms).await
    }

    /// Prepares, encodes and prefills an RGB image (already EXIF-oriented); a page that fails does
    /// not join and leaves the others as they were.
    pub async fn join_image(&mut self, key: K, image: &RgbImage, task: &Task, mode: Mode, generation: &GenerationOptions) -> Result<()> {
        self.join_at(key, image, task, mode, generation, Instant::now(), 0.0).await
    }

    async fn join_at(&mut self, key: K, image: &RgbImage, task: &Task, mode: Mode, generation: &GenerationOptions, started: Instant, decode_ms: f64) -> Result<()> {
        if self.pages.iter().any(|(k, _)| *k == key) {
            return Err(Error::InvalidArgument("a page with this key is already in the batch".into()));
        }
        let mut prepared = self.engine.unless_faulted(self.engine.prepare(image, task, mode))?;
        prepared.started = started;
        prepared.timings.preprocess += decode_ms;
        let t = Instant::now();
        let item = BatchItem { prompt_embeds: prepared.embeds.clone(), prompt_ids: &prepared.ids, options: generation };
        let joined = self.batch.join(key, item).await;
        if let Err(fault) = self.engine.options.device_faults.check() {
            // The pages already here end with the fault at the next step.
            self.batch = Batch::new(&self.engine.decoder);
            return Err(fault);
        }
        joined?;
        let page = Page { prepared, task: task.clone(), tokens: 0, prefill_ms: ms(t), decoding: Instant::now() };
        self.pages.push((key, page));
        Ok(())
    }

    /// Chooses every page's next token (`on_token(key, event)`, events numbered from 1 per page;
    /// `Break` cancels that page), then one decoding step for the pages that go on. Returns the
    /// pages that ended, with their results (`prefill` timing: the page's own prefill; `decode`:
    /// from then to its end, steps shared with the other pages included).
    pub async fn step(&mut self, mut on_token: impl FnMut(K, &TokenEvent) -> ControlFlow<()>) -> Vec<(K, Result<OcrResult>)> {
        let (tokenizer, pages) = (&self.engine.tokenizer, &mut self.pages);
        let ended = self
            .batch
            .step(&mut |key, id| {
                let (_, page) = pages.iter_mut().find(|(k, _)| *k == key).expect("a page per sequence");
                page.tokens += 1;
                let text = tokenizer.decode(&[id]).unwrap_or_default();
                on_token(key, &TokenEvent { id, text, index: page.tokens })
            })
            .await;
        if let Some(Error::Gpu { out_of_memory, message }) = self.engine.options.device_faults.error() {
            // Every page's numbers since the fault are suspect: all of them end with it.
            self.batch = Batch::new(&self.engine.decoder);
            return self.pages.drain(..).map(|(key, _)| (key, Err(Error::Gpu { out_of_memory, message: message.clone() }))).collect();
        }
        ended
            .into_iter()
            .map(|(key, generated)| {
                let at = self.pages.iter().position(|(k, _)| *k == key).expect("a page per sequence");
                let (_, page) = self.pages.remove(at);
                let result = generated.and_then(|g| self.engine.finish(page.prepared, &page.task, g, page.prefill_ms, ms(page.decoding)));
                (key, result)
            })
            .collect()
    }

    /// Steps until every page has ended; their results in the order they ended.
    pub async fn run(&mut self, mut on_token: impl FnMut(K, &TokenEvent) -> ControlFlow<()>) -> Vec<(K, Result<OcrResult>)> {
        let mut ended = Vec::new();
        while !self.is_empty() {
            ended.extend(self.step(&mut on_token).await);
        }
        ended
    }
}

fn finish_name(finish: FinishReason) -> &'static str {
    match finish {
        FinishReason::Stop(_) => "stop",
        FinishReason::MaxNewTokens => "max_new_tokens",
        FinishReason::ContextLimit => "context_limit",
        FinishReason::Cancelled => "cancelled",
    }
}

fn ms(since: Instant) -> f64 {
    since.elapsed().as_secs_f64() * 1000.0
}
