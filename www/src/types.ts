// The package's public types. Every member is documented here; index.ts re-exports them.

/** What the model is asked to do (the official prompts). */
export type Task =
  | 'markdown'
  | 'free'
  | 'ocr'
  | 'figure'
  | 'describe'
  | `locate=${string}`
  | `prompt=${string}`;

/** Resolution mode: Tiny 512 px → 64 image tokens, Small 640 → 100, Base 1024 → 256, Large 1280 → 400, Gundam (tiled).
 * DeepSeek-OCR-2 checkpoints have Base (257 tokens) and Gundam (768-px tiles, 144 tokens each) only. */
export type Mode = 'tiny' | 'small' | 'base' | 'large' | 'gundam';

/**
 * Anything `recognize` reads. Encoded images (Blob/File, ArrayBuffer, Uint8Array, a URL) are decoded
 * in the worker; pixel sources (elements, canvases, bitmaps, video frames) are turned into an
 * `ImageBitmap` and transferred, never copied; `ImageData` is posted as is. The caller's objects are
 * never detached or closed.
 */
export type ImageInput =
  | Blob
  | ArrayBuffer
  | Uint8Array
  | ImageData
  | ImageBitmap
  | HTMLImageElement
  | HTMLCanvasElement
  | OffscreenCanvas
  | VideoFrame
  | string
  | URL;

/**
 * A loading progress event. With the cache: `download` (network → storage; files already stored count
 * as loaded, `fromCache`), `verify` (stored files checked against their sha256), `upload` (storage →
 * GPU); without it: `download` (network → GPU). A float checkpoint loaded with `quantize` and the cache
 * is quantized into the cache once: `quantize` (file `quantize`, counted in tensors; the original is read
 * by Range requests and never stored), then `upload` from the cache on this and every later load. With `warmup`, `compile` (file `shaders`, 0 then 1 of 1).
 * Then `ready`. Byte counts are per phase.
 */
export interface LoadProgress {
  phase: 'download' | 'verify' | 'quantize' | 'upload' | 'compile' | 'ready';
  /** The file the bytes belong to (`config.json`, `tokenizer.json`, the weights file or index). */
  file: string;
  /** Bytes of `file` received so far. */
  loaded: number;
  /** Size of `file` in bytes, when known. */
  total: number | null;
  /** Bytes received for the whole model so far (every file). */
  modelLoaded: number;
  /** Size of the whole model in bytes, once every file's size is known; else null. */
  modelTotal: number | null;
  /** Receive rate over the last few seconds, bytes per second. */
  bytesPerSecond: number;
  /** Estimated seconds left for the file being read, when its size is known. */
  etaSeconds: number | null;
  /** Whether the bytes come from the local cache rather than the network. */
  fromCache: boolean;
  /** Milliseconds since `load` was called. */
  elapsedMs: number;
  /** Something went wrong that the load works around (e.g. the cache could not be written). */
  warning?: string;
}

/** Options of {@link Dsocr.load}. */
export interface LoadOptions {
  /**
   * Base URL of the checkpoint folder (CORS and HTTP Range needed on another origin): `config.json`,
   * `tokenizer.json`, and either `model.safetensors.index.json` with its shards (what `dsocr quantize`
   * writes) or the hub's `model-00001-of-000001.safetensors` / `model.safetensors`. Relative URLs are
   * resolved against the page.
   */
  weightsUrl: string | URL;
  /** Quantize a float checkpoint while loading it (`q4`: int4 decoder, int8 vision; `q8`: int8). Default: as stored. */
  quantize?: 'q4' | 'q8' | 'none';
  /** Activations and float weights: `auto` (f16 where the adapter has `shader-f16`, default), `f32` or `f16`. */
  dtype?: 'auto' | 'f32' | 'f16';
  /** A lower cap than the adapter's `maxStorageBufferBindingSize` for one weight tensor, in bytes. */
  maxBindingBytes?: number;
  /**
   * `opfs` (default): files are kept in the Origin Private File System, keyed by URL and version (the
   * index's sha256); a load resumes an interrupted download and the next load reads only the cache,
   * offline too. `none`: every load reads the network, byte ranges straight into the GPU.
   */
  cache?: 'opfs' | 'none';
  /** A download that receives no bytes for this long is retried from its last byte (default 30000). */
  stallTimeoutMs?: number;
  /**
   * Run a blank page through the model's smallest mode (two tokens: encoding, prefill and a decoding
   * step) before `load` resolves (phase `compile`), so the GPU compiles the model's shaders during the
   * load instead of in the first recognition (seconds on a real GPU, tens of seconds on a software
   * adapter). Default false.
   */
  warmup?: boolean;
  /**
   * Where the engine runs. Default (`undefined` or `true`): a module Web Worker the package creates.
   * A `Worker` you made from `dsocr/worker` (e.g. `new Worker(new URL('./my-worker.js', import.meta.url),
   * { type: 'module' })` with `import 'dsocr/worker'` inside) is used as is. `false` runs on the
   * calling thread (the page stays responsive between tokens, but not during a step).
   */
  worker?: Worker | boolean;
  /** Where the `.wasm` file is served, if not next to the package's JavaScript (self-hosting, CDNs). */
  wasmUrl?: string | URL;
  /** Aborts the load: downloads stop and the promise rejects with `signal.reason`. */
  signal?: AbortSignal;
  /** Called with every progress event. */
  onProgress?: (event: LoadProgress) => void;
}

/** One generated token, as it is produced. */
export interface TokenEvent {
  /** Token id. */
  id: number;
  /** Its text (may be empty for a partial UTF-8 sequence; the full text is in the result). */
  text: string;
  /** 0-based position among the generated tokens. */
  index: number;
}

/** Options of {@link Dsocr.recognize} and {@link Dsocr.stream}. */
export interface RecognizeOptions {
  /** Default `markdown`. `locate=TEXT` finds TEXT; `prompt=RAW` sends a raw prompt. */
  task?: Task;
  /** Default: the model's smallest mode, `tiny` (`base` for DeepSeek-OCR-2). Base, Large and Gundam are heavy for a browser. */
  mode?: Mode;
  /** Most tokens to generate (default 8192, bounded by the context). */
  maxNewTokens?: number;
  /** `vllm` (default, the official vLLM rule), `hf` (the hub code's no-repeat 20-gram) or `off`. */
  repeatGuard?: 'vllm' | 'hf' | 'off';
  /** Called with every token as it is generated. */
  onToken?: (event: TokenEvent) => void;
  /** Aborts the recognition after the current token: the promise rejects with `signal.reason`. */
  signal?: AbortSignal;
}

/** A layout element found by a grounding task (`markdown`, `ocr`, `locate=…`). */
export interface Block {
  /** `title`, `text`, `table`, `image`, `equation`, … or free text (locate / ocr). */
  label: string;
  /** Boxes in pixels of the input image: `[x1, y1, x2, y2]`. */
  boxes: [number, number, number, number][];
  /** The same boxes as the model wrote them (0..999 grid). */
  boxes_normalized: [number, number, number, number][];
  /** The block's content (markdown, LaTeX or HTML). */
  text: string;
}

/** What a recognition gives: the same object as `dsocr ocr --format json` writes. */
export interface OcrResult {
  /** Which model read it (from the checkpoint's config). */
  model: 'deepseek-ocr' | 'deepseek-ocr-2';
  /** The model's output with special tokens kept, the final end-of-sequence removed, trimmed. */
  text: string;
  /** `text` cleaned as the official `result.mmd` (grounding tags removed, images as links). */
  markdown: string;
  /** Layout elements with boxes (empty without grounding). */
  blocks: Block[];
  /** Generated token ids (without the stop token). */
  token_ids: number[];
  /** Image vectors in the prompt. */
  image_token_count: number;
  /** Prompt length in tokens. */
  prompt_token_count: number;
  /** `stop`, `max_new_tokens`, `context_limit` or `cancelled`. */
  finish_reason: 'stop' | 'max_new_tokens' | 'context_limit' | 'cancelled';
  /** True when generation did not end with end-of-sequence (the text may be cut or looping). */
  ended_without_eos: boolean;
  /** Width and height of the input after EXIF orientation. */
  image_size: [number, number];
  /** Tiles across and down (`[1, 1]` when not tiled). */
  tile_grid: [number, number];
  /** Milliseconds per stage. */
  timings_ms: { preprocess: number; encode: number; prefill: number; decode: number; total: number };
}

/** What {@link Dsocr.isSupported} reports. */
export interface Support {
  /** Whether this browser can run the engine (WebGPU with an adapter). */
  ok: boolean;
  /** Why not, when `ok` is false. */
  reason?: string;
  /** The error code that `load` would fail with (`NO_WEBGPU` or `ADAPTER_LIMITS`). */
  code?: 'NO_WEBGPU' | 'ADAPTER_LIMITS';
  /** The adapter's vendor/architecture/description, as far as the browser tells. */
  adapter?: { vendor: string; architecture: string; device: string; description: string };
  /** The adapter's limits that decide what fits. */
  limits?: { maxStorageBufferBindingSize: number; maxBufferSize: number; maxComputeWorkgroupStorageSize: number };
  /** Whether the adapter offers `shader-f16` (half-precision weights and activations). */
  shaderF16?: boolean;
}

/** The device the engine got (from {@link Dsocr.adapterInfo}). */
export interface AdapterInfo {
  name: string;
  backend: string;
  maxStorageBufferBindingSize: number;
  maxBufferSize: number;
  maxComputeWorkgroupStorageSize: number;
  adapterMaxStorageBufferBindingSize: number;
  adapterMaxBufferSize: number;
  shaderF16: boolean;
  /** The largest single weight tensor the engine binds (vocabulary matrices are split under it). */
  maxTensorBytes: number;
  /** `f16` or `f32`. */
  dtype: 'f16' | 'f32';
}
