// The engine host: owns the wasm module and one engine, answers the client's requests. It runs in
// the package's Web Worker (worker.ts) or, with `worker: false`, on the page behind a MessageChannel.
// Recognitions run one at a time in arrival order; an abort stops a running one after its current
// token (the decode loop awaits GPU readbacks, so abort messages are handled between tokens).

import init, { Dsocr as WasmEngine, Sha256 } from './wasm/dsocr.js';
import { CacheWriteError, Fatal } from './cache/download.js';
import { checkSupport } from './support.js';
import { dropCache, prepare, storeAvailable, type Prepared } from './cache/index.js';
import { prepareQuantized } from './cache/quantized.js';
import { toWire, type WireError } from './errors.js';
import type { Endpoint, RawProgress, Reply, Request, WireInput, WireLoadOptions, WireRecognizeOptions } from './protocol.js';
import type { AdapterInfo, OcrResult, TokenEvent } from './types.js';

/** Reports the loss of any GPU device the engine requests (installed once, in the engine's worker). */
let onDeviceLost: ((message: string) => void) | null = null;
/** Reports an out-of-memory error of a watched device (WebGPU reports them as uncaptured errors). */
let onOutOfMemory: ((message: string) => void) | null = null;
const devices: GPUDevice[] = [];

/** Whether a watched device is lost, or turns out to be within `ms` (its `lost` promise settles a task after the loss). */
async function lostWithin(ms: number): Promise<string | null> {
  const timeout = new Promise<null>((resolve) => setTimeout(() => resolve(null), ms));
  const lost = devices.map((d) => d.lost.then((info) => info.message || info.reason || 'unknown reason'));
  return Promise.race([...lost, timeout]);
}

function watchDevices(): void {
  const adapter = (globalThis as { GPUAdapter?: { prototype: GPUAdapter } }).GPUAdapter;
  if (!adapter || (adapter.prototype.requestDevice as { dsocr?: boolean }).dsocr) return;
  const requestDevice = adapter.prototype.requestDevice;
  const watched = async function (this: GPUAdapter, descriptor?: GPUDeviceDescriptor) {
    const device = await requestDevice.call(this, descriptor);
    devices.push(device);
    device.lost.then((info) => onDeviceLost?.(info.message || info.reason || 'unknown reason'));
    // Before the engine's own handler, which treats any uncaptured error as a bug and traps.
    device.addEventListener('uncapturederror', (event) => {
      const error = (event as GPUUncapturedErrorEvent).error;
      if (typeof GPUOutOfMemoryError !== 'undefined' && error instanceof GPUOutOfMemoryError) onOutOfMemory?.(error.message);
    });
    return device;
  };
  (watched as { dsocr?: boolean }).dsocr = true;
  adapter.prototype.requestDevice = watched;
}

export function serve(endpoint: Endpoint): void {
  // Only in a worker of its own: on the page, other code's devices would be watched too.
  if (typeof (globalThis as { WorkerGlobalScope?: unknown }).WorkerGlobalScope !== 'undefined') watchDevices();
  let engine: WasmEngine | null = null;
  let loading: Promise<unknown> | null = null;
  /** Set once the wasm instance trapped: nothing can run on it any more. */
  let broken: WireError | null = null;
  let disposed = false;
  const controllers = new Map<number, AbortController>();
  let queue: Promise<unknown> = Promise.resolve();

  const reply = (message: Reply, transfer: Transferable[] = []) => endpoint.postMessage(message, transfer);
  // A GPU failure that arrives on its own, not on a call — a lost device (a readback on it may never
  // settle), an out-of-memory (WebGPU says so in an event, and the engine's handler traps) — fails
  // every call in flight at once and the engine with it; the page loads a new one.
  const failAll = (error: WireError) => {
    if (disposed || broken) return;
    broken = error;
    for (const id of controllers.keys()) reply({ type: 'error', id, error });
    for (const c of controllers.values()) c.abort();
    controllers.clear();
  };
  /** What the engine is doing, for the errors that arrive on their own. */
  let doing = 'while idle';
  onDeviceLost = (message) => failAll({ code: 'DEVICE_LOST', message: `the GPU device was lost (${message}); load the model again`, fatal: true });
  onOutOfMemory = (message) =>
    failAll({ code: 'OUT_OF_MEMORY', message: `the GPU ran out of memory ${doing} (${message}); try a smaller mode, quantized weights or another device`, fatal: true });
  const fail = async (id: number, e: unknown) => {
    let error = toWire(e);
    // A backend error right after a device loss is that loss (reported to every call by onDeviceLost).
    // The `lost` promise can settle well after the failed mapping on a busy machine (over 200 ms was
    // seen on the software adapter): a backend error is rare, so waiting up to 2 s for it costs nothing.
    if (error.code === 'INTERNAL' && !broken) {
      const lost = await lostWithin(2000);
      if (lost) onDeviceLost?.(lost);
    }
    // Those GPU failures were told to every call in flight (by failAll) and are every later call's error.
    const gpuFailure = broken?.code === 'DEVICE_LOST' || broken?.code === 'OUT_OF_MEMORY';
    if (gpuFailure && !controllers.has(id)) return;
    if (gpuFailure && broken) error = broken;
    if (error.fatal) broken = error;
    reply({ type: 'error', id, error });
  };

  async function load(id: number, options: WireLoadOptions, signal: AbortSignal): Promise<void> {
    if (engine || loading) throw { code: 'BAD_ARGUMENT', message: 'this engine is already loaded; create another with Dsocr.load' };
    loading = (async () => {
      await init(options.wasmUrl ? { module_or_path: options.wasmUrl } : undefined);
      // Byte events at most every 100 ms per file (a file's first and last always go).
      const sent = new Map<string, number>();
      const progress = (event: RawProgress) => {
        const key = `${event.phase}:${event.file}`;
        const now = performance.now();
        const last = sent.get(key);
        if (last !== undefined && now - last < 100 && event.loaded !== event.total && !event.warning) return;
        sent.set(key, now);
        reply({ type: 'progress', id, event });
      };
      // An adapter the model cannot run on fails here, before any download.
      const support = await checkSupport();
      if (!support.ok) throw { code: support.code, message: support.reason };
      let cached: Prepared | null = null;
      let url = options.weightsUrl;
      let quantize = options.quantize;
      const cacheOptions = { signal, stallMs: options.stallTimeoutMs ?? 30_000, hasher: () => new Sha256(), onEvent: progress };
      if ((options.cache ?? 'opfs') === 'opfs') {
        if (storeAvailable()) {
          try {
            // A float checkpoint quantized at load time: the cache keeps the quantized copy.
            if (quantize && quantize !== 'none') {
              const made = await prepareQuantized(url, quantize, (base, o) => WasmEngine.quantizeCheckpoint(base, o), cacheOptions);
              if (made) [cached, url, quantize] = [{ fetch: made.fetch, done: Promise.resolve(), stale: () => false }, made.url, undefined];
            }
            if (!cached) cached = await prepare(url, cacheOptions);
          } catch (e) {
            if (e instanceof Fatal) throw { code: e.code, message: e.message };
            if (!(e instanceof CacheWriteError)) throw e;
            progress({ phase: 'download', file: '', loaded: 0, total: null, fromCache: false, warning: `${e.message}; loading without the cache` });
            [cached, url, quantize] = [null, options.weightsUrl, options.quantize];
          }
        } else {
          progress({ phase: 'download', file: '', loaded: 0, total: null, fromCache: false, warning: 'no Origin Private File System or Cache Storage here: loading without the cache' });
        }
      }
      const open = (from: Prepared | null) =>
        WasmEngine.load(url, {
          dtype: options.dtype,
          quantize,
          maxBindingBytes: options.maxBindingBytes,
          signal,
          fetch: from?.fetch ?? undefined,
          // The engine reads each file as the cache completes it, while the others download; once
          // all are verified, a shard header it read that differed makes it load again.
          settled: from?.done.then(() => {}, () => {}),
          stale: from?.stale,
          onProgress: (event: { file: string; loaded: number; total: number | null }) => {
            doing = `while loading ${event.file}${event.total ? ` (${Math.floor((100 * event.loaded) / event.total)}% read)` : ''}`;
            progress({ phase: from ? 'upload' : 'download', file: event.file, loaded: event.loaded, total: event.total, fromCache: from !== null });
          },
        });
      if (!cached) return open(null);
      const [loaded, downloaded] = await Promise.allSettled([open(cached), cached.done]);
      if (downloaded.status === 'rejected') {
        const e = downloaded.reason;
        if (e instanceof CacheWriteError) {
          // What was not in the cache came from the network; the partial cache goes.
          await dropCache(url, e, cacheOptions);
        } else {
          if (loaded.status === 'fulfilled') loaded.value.free();
          if (e instanceof Fatal) throw { code: e.code, message: e.message };
          throw e;
        }
      }
      if (loaded.status === 'rejected') throw loaded.reason;
      return loaded.value;
    })();
    try {
      engine = (await loading) as WasmEngine;
      if (options.warmup) await warmup(engine, id, signal);
      reply({ type: 'loaded', id, adapter: engine.adapterInfo() as AdapterInfo });
    } finally {
      loading = null;
      doing = 'while idle';
    }
  }

  /** A blank page through the model's smallest mode, two tokens (encoding, prefill and a decoding step): the GPU compiles the model's shaders now rather than on the first call. */
  async function warmup(engine: WasmEngine, id: number, signal: AbortSignal): Promise<void> {
    reply({ type: 'progress', id, event: { phase: 'compile', file: 'shaders', loaded: 0, total: 1, fromCache: false } });
    await engine.warmUp();
    if (signal.aborted) throw { code: 'ABORTED', message: 'aborted' };
    reply({ type: 'progress', id, event: { phase: 'compile', file: 'shaders', loaded: 1, total: 1, fromCache: false } });
  }

  async function recognize(id: number, input: WireInput, options: WireRecognizeOptions, signal: AbortSignal): Promise<void> {
    try {
      if (signal.aborted) throw { code: 'ABORTED', message: 'aborted' };
      if (!engine) throw { code: 'BAD_ARGUMENT', message: 'the engine is not loaded' };
      let source: unknown = input;
      if (typeof input === 'object' && 'url' in input) {
        const response = await fetch(input.url, { signal });
        if (!response.ok) throw { code: 'NETWORK', message: `${input.url}: HTTP ${response.status}` };
        source = new Uint8Array(await response.arrayBuffer());
      }
      const { stream, ...rest } = options;
      doing = `while recognizing an image (mode ${options.mode ?? "the model's default"})`;
      const result = (await engine.recognize(source, {
        ...rest,
        signal,
        onToken: stream ? (event: TokenEvent) => reply({ type: 'token', id, event }) : undefined,
      })) as OcrResult;
      reply({ type: 'result', id, result });
    } finally {
      doing = 'while idle';
      // The bitmap was transferred to us (a copy of the caller's): free its memory now.
      if (typeof ImageBitmap !== 'undefined' && input instanceof ImageBitmap) input.close();
    }
  }

  endpoint.addEventListener('message', (event: MessageEvent<Request>) => {
    const request = event.data;
    // The app's own messages to a worker it shares with the engine are not ours.
    if (typeof request !== 'object' || request === null || typeof request.id !== 'number') return;
    if (request.type === 'abort') {
      controllers.get(request.id)?.abort();
      return;
    }
    const { id } = request;
    if (broken) return reply({ type: 'error', id, error: { code: 'DISPOSED', message: `the engine failed earlier (${broken.message}); load a new one` } });
    if (disposed) return reply({ type: 'error', id, error: { code: 'DISPOSED', message: 'the engine was disposed' } });
    const controller = new AbortController();
    controllers.set(id, controller);
    const done = () => controllers.delete(id);
    switch (request.type) {
      case 'load':
        load(id, request.options, controller.signal).catch((e) => fail(id, e)).finally(done);
        return;
      case 'recognize':
        queue = queue.then(() => recognize(id, request.input, request.options, controller.signal).catch((e) => fail(id, e)).finally(done));
        return;
      case 'dispose':
        disposed = true;
        for (const c of controllers.values()) c.abort();
        queue = queue.then(() => {
          engine?.free();
          engine = null;
          done();
          reply({ type: 'disposed', id });
        });
        return;
    }
  });
}
