// dsocr: DeepSeek-OCR in the browser on WebGPU. `Dsocr.load(...)` → `engine.recognize(image)`.
// The engine runs in a module Web Worker the package creates (see LoadOptions.worker).

import { quantizedUrl } from './cache/quantized.js';
import { Connection } from './client.js';
import { DsocrError } from './errors.js';
import { toWire } from './inputs.js';
import { ProgressTracker } from './progress.js';
import { checkSupport } from './support.js';
import { clearCache, deleteCached, listCached, type CachedModel } from './cache/store.js';
import type { Endpoint, RawProgress } from './protocol.js';
import type { AdapterInfo, ImageInput, LoadOptions, OcrResult, RecognizeOptions, Support, TokenEvent } from './types.js';

export { DsocrError } from './errors.js';
export type { DsocrErrorCode } from './errors.js';
export type * from './types.js';
export type { CachedModel } from './cache/store.js';

/** Where `Symbol.asyncDispose` is missing, the well-known registry symbol `await using` polyfills use. */
const asyncDispose: typeof Symbol.asyncDispose = (Symbol as { asyncDispose?: typeof Symbol.asyncDispose }).asyncDispose ?? (Symbol.for('Symbol.asyncDispose') as typeof Symbol.asyncDispose);

/** A loaded engine: one model on one GPU device. Calls queue and run one at a time. */
export class Dsocr {
  private constructor(
    private readonly connection: Connection,
    private readonly adapter: AdapterInfo,
  ) {}

  /**
   * Whether this browser can run the engine: WebGPU with an adapter (a `navigator.gpu` that gives no
   * adapter is not support). Never throws.
   */
  static async isSupported(): Promise<Support> {
    return checkSupport();
  }

  /** Downloads the checkpoint and prepares it on the GPU. Rejects with a {@link DsocrError} or `signal.reason`. */
  static async load(options: LoadOptions): Promise<Dsocr> {
    if (!options || (typeof options.weightsUrl !== 'string' && !(options.weightsUrl instanceof URL))) {
      throw new DsocrError('BAD_ARGUMENT', 'Dsocr.load needs { weightsUrl }: the URL of the checkpoint folder');
    }
    const { connection, ownWorker } = await connect(options.worker);
    const tracker = new ProgressTracker();
    const onProgress = options.onProgress;
    // While bytes are expected, an event at least every 250 ms (the rate falls during a stall).
    let lastRaw: RawProgress | null = null;
    const heartbeat = setInterval(() => {
      if (lastRaw && lastRaw.phase === 'download' && lastRaw.loaded !== lastRaw.total) onProgress?.(tracker.update(lastRaw));
    }, 250);
    try {
      const reply = await connection.call(
        {
          type: 'load',
          options: {
            weightsUrl: modelUrl(options.weightsUrl),
            wasmUrl: options.wasmUrl === undefined ? undefined : absolute(options.wasmUrl),
            quantize: options.quantize,
            dtype: options.dtype,
            maxBindingBytes: options.maxBindingBytes,
            cache: options.cache,
            stallTimeoutMs: options.stallTimeoutMs,
            warmup: options.warmup,
          },
        },
        [],
        options.signal,
        (r) => {
          if (r.type !== 'progress') return;
          lastRaw = r.event;
          onProgress?.(tracker.update(r.event));
        },
      );
      if (reply.type !== 'loaded') throw new DsocrError('INTERNAL', `unexpected reply ${reply.type}`);
      onProgress?.(tracker.ready(options.cache !== 'none'));
      return new Dsocr(connection, reply.adapter);
    } catch (e) {
      // A failed or aborted load leaves nothing running: a worker the package made is ended.
      if (ownWorker) connection.kill(new DsocrError('DISPOSED', 'the load failed'));
      throw e;
    } finally {
      clearInterval(heartbeat);
    }
  }

  /** The models in the persistent cache, most recently used first, with their sizes. */
  static cachedModels(): Promise<CachedModel[]> {
    return listCached();
  }

  /** Deletes one model from the cache (`weightsUrl` as given to `load`), with the copies quantized from it
   * at load time; resolves to whether anything was there. */
  static async deleteCachedModel(weightsUrl: string | URL): Promise<boolean> {
    const url = modelUrl(weightsUrl);
    const deleted = await Promise.all([url, quantizedUrl(url, 'q4'), quantizedUrl(url, 'q8')].map((u) => deleteCached(u)));
    return deleted.some(Boolean);
  }

  /** Deletes every cached model. */
  static clearCache(): Promise<void> {
    return clearCache();
  }

  /** The GPU adapter and the limits the device was granted. */
  adapterInfo(): AdapterInfo {
    return { ...this.adapter };
  }

  /** Recognises one image. Rejects with a {@link DsocrError} or `signal.reason`. */
  async recognize(image: ImageInput, options: RecognizeOptions = {}): Promise<OcrResult> {
    const { onToken, signal, ...rest } = options;
    this.check();
    const { input, transfer } = await toWire(image);
    const reply = await this.connection.call(
      { type: 'recognize', input, options: { ...rest, stream: typeof onToken === 'function' } },
      transfer,
      signal,
      (r) => r.type === 'token' && onToken?.(r.event),
    );
    if (reply.type !== 'result') throw new DsocrError('INTERNAL', `unexpected reply ${reply.type}`);
    return reply.result;
  }

  /**
   * Recognises one image as a stream of tokens: `for await (const token of engine.stream(img)) …`;
   * `.result` resolves to the full result (and rejects like `recognize`). Leaving the loop early
   * aborts the recognition.
   */
  stream(image: ImageInput, options: Omit<RecognizeOptions, 'onToken'> = {}): AsyncIterable<TokenEvent> & { result: Promise<OcrResult> } {
    const queue: TokenEvent[] = [];
    let wake: (() => void) | null = null;
    let finished = false;
    let failure: unknown = null;
    const controller = new AbortController();
    const outer = options.signal;
    const forward = () => controller.abort(outer?.reason);
    if (outer?.aborted) forward();
    else outer?.addEventListener('abort', forward, { once: true });
    const result = this.recognize(image, {
      ...options,
      signal: controller.signal,
      onToken: (t) => {
        queue.push(t);
        wake?.();
      },
    });
    result.then(
      () => { finished = true; wake?.(); },
      (e) => { finished = true; failure = e; wake?.(); },
    ).finally(() => outer?.removeEventListener('abort', forward));
    // `result` is for the caller; an unread rejection there must not be reported as unhandled twice.
    result.catch(() => {});
    const iterator: AsyncIterator<TokenEvent> = {
      async next() {
        while (queue.length === 0 && !finished) await new Promise<void>((r) => (wake = r));
        wake = null;
        if (queue.length > 0) return { value: queue.shift()!, done: false };
        if (failure) throw failure;
        return { value: undefined, done: true };
      },
      async return() {
        if (!finished) controller.abort(new DOMException('the stream was closed', 'AbortError'));
        return { value: undefined, done: true };
      },
    };
    return { result, [Symbol.asyncIterator]: () => iterator };
  }

  /** Frees the GPU memory and ends the worker. Later calls reject with `DISPOSED`. Safe to call twice. */
  async dispose(): Promise<void> {
    if (this.connection.closed) return;
    try {
      await this.connection.call({ type: 'dispose' }, []);
    } catch {
      // Already gone: nothing left to free.
    }
    this.connection.kill(new DsocrError('DISPOSED', 'the engine was disposed'));
  }

  /** `await using engine = await Dsocr.load(...)` disposes it at the end of the scope. */
  [asyncDispose](): Promise<void> {
    return this.dispose();
  }

  private check(): void {
    const closed = this.connection.closed;
    if (closed) throw closed;
  }
}

function absolute(url: string | URL): string {
  return new URL(String(url), typeof location !== 'undefined' ? location.href : undefined).href;
}

/** A model's URL as the engine and the cache key it: absolute, without trailing slashes. */
function modelUrl(url: string | URL): string {
  return absolute(url).replace(/\/+$/, '');
}

async function connect(worker: Worker | boolean | undefined): Promise<{ connection: Connection; ownWorker: boolean }> {
  if (worker === false) {
    const channel = new MessageChannel();
    const { serve } = await import('./host.js');
    serve(channel.port1 as unknown as Endpoint);
    channel.port1.start();
    channel.port2.start();
    return { connection: new Connection(channel.port2 as unknown as Endpoint, () => { channel.port1.close(); channel.port2.close(); }, null), ownWorker: true };
  }
  if (typeof Worker === 'undefined') throw new DsocrError('NO_WEBGPU', 'this environment has no Web Workers; pass { worker: false }');
  if (worker instanceof Worker) return { connection: new Connection(worker as unknown as Endpoint, null, worker), ownWorker: false };
  // The form Vite and webpack 5 both recognise and bundle (the worker and, through it, the .wasm).
  const created = new Worker(new URL('./worker.js', import.meta.url), { type: 'module', name: 'dsocr' });
  return { connection: new Connection(created as unknown as Endpoint, () => created.terminate(), created), ownWorker: true };
}

