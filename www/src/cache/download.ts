// One file from the network into the cache: resumed with a Range request from the bytes already
// stored, retried with backoff after a dropped connection, a 5xx or a stall (no bytes for
// `stallMs`), checked against its size and sha256 at the end.

import type { FileEntry, Store } from './store.js';

/** A failure to write the cache (quota, disk): the load goes on without it. */
export class CacheWriteError extends Error {}

/** A non-retryable failure with the package's error code. */
export class Fatal extends Error {
  constructor(readonly code: string, message: string) {
    super(message);
  }
}

export interface DownloadOptions {
  signal: AbortSignal;
  stallMs: number;
  attempts: number;
  /** Bytes of this file stored so far, and its size when known. */
  onBytes: (loaded: number, total: number | null) => void;
}

/** `fetch`, with a failure to connect (offline, refused, CORS) as a NETWORK error naming the URL. */
export async function request(url: string, init: RequestInit): Promise<Response> {
  try {
    return await fetch(url, init);
  } catch (e) {
    if (init.signal?.aborted) throw init.signal.reason;
    throw new Fatal('NETWORK', `${url}: ${(e as Error)?.message ?? e}`);
  }
}

export function sleep(ms: number, signal: AbortSignal): Promise<void> {
  return new Promise((resolve, reject) => {
    const timer = setTimeout(resolve, ms);
    signal.addEventListener('abort', () => (clearTimeout(timer), reject(signal.reason)), { once: true });
  });
}

/** Downloads `url` into `name` of `store`, resuming; resolves to the bytes stored. With `end`, only
 * the file's bytes before it (its head). */
export async function downloadInto(store: Store, name: string, url: string, expected: FileEntry, options: DownloadOptions, end: number | null = null): Promise<number> {
  for (let attempt = 1; ; attempt++) {
    let stored = (await store.file(name))?.size ?? 0;
    if (expected.size !== null && stored > expected.size) stored = 0;
    try {
      return await attemptOnce(store, name, url, expected, stored, options, end);
    } catch (e) {
      if (options.signal.aborted) throw options.signal.reason;
      if (e instanceof Fatal || e instanceof CacheWriteError) throw e;
      if (attempt >= options.attempts) throw new Fatal('NETWORK', `${url}: ${(e as Error)?.message ?? e} (${attempt} attempts)`);
      await sleep(Math.min(500 * 2 ** (attempt - 1), 8000), options.signal);
    }
  }
}

async function attemptOnce(store: Store, name: string, url: string, expected: FileEntry, offset: number, options: DownloadOptions, end: number | null): Promise<number> {
  if (expected.size !== null && offset === expected.size) return offset;
  if (end !== null && offset >= end) return offset;
  const controller = new AbortController();
  const onAbort = () => controller.abort(options.signal.reason);
  options.signal.addEventListener('abort', onAbort, { once: true });
  let timer: ReturnType<typeof setTimeout> | undefined;
  const arm = () => {
    clearTimeout(timer);
    timer = setTimeout(() => controller.abort(new DOMException(`no bytes for ${options.stallMs} ms`, 'TimeoutError')), options.stallMs);
  };
  try {
    arm();
    const headers: HeadersInit = end !== null ? { Range: `bytes=${offset}-${end - 1}` } : offset > 0 ? { Range: `bytes=${offset}-` } : {};
    const response = await fetch(url, { headers, signal: controller.signal, cache: 'no-store' });
    if (response.status >= 400 && response.status < 500 && response.status !== 408 && response.status !== 429) {
      throw new Fatal('NETWORK', `${url}: HTTP ${response.status}`);
    }
    if (!response.ok || !response.body) throw new Error(`${url}: HTTP ${response.status}`);
    let start = offset;
    if (response.status !== 206) start = 0; // the server ignored Range: the whole file again
    const range = /^bytes (\d+)-\d+\/(\d+)$/.exec(response.headers.get('content-range') ?? '');
    if (response.status === 206 && (!range || Number(range[1]) !== offset)) throw new Error(`${url}: the server answered another range (${response.headers.get('content-range')})`);
    const length = Number(response.headers.get('content-length') ?? NaN);
    const total = expected.size ?? (range ? Number(range[2]) : Number.isFinite(length) ? start + length : null);
    // Where this response ends: the head asked for, or the file's end.
    const until = response.status === 206 && end !== null ? Math.min(end, total ?? end) : total;
    let writer;
    try {
      writer = await store.writer(name, start);
    } catch (e) {
      throw new CacheWriteError(`cannot write ${name} to the cache: ${(e as Error)?.message ?? e}`);
    }
    let loaded = start;
    options.onBytes(loaded, total);
    const reader = response.body.getReader();
    try {
      for (;;) {
        const { done, value } = await reader.read();
        if (done) break;
        arm();
        if (total !== null && loaded + value.byteLength > total) throw new Fatal('BAD_CHECKPOINT', `${url}: longer than its ${total} bytes`);
        try {
          await writer.write(value);
        } catch (e) {
          throw new CacheWriteError(`cannot write ${name} to the cache: ${(e as Error)?.message ?? e}`);
        }
        loaded += value.byteLength;
        options.onBytes(loaded, total);
      }
    } finally {
      reader.cancel().catch(() => {});
      await writer.close().catch(() => {});
    }
    if (until !== null && loaded !== until) throw new Error(`${url}: the connection ended at byte ${loaded} of ${until}`);
    return loaded;
  } finally {
    clearTimeout(timer);
    options.signal.removeEventListener('abort', onAbort);
  }
}

/** A hasher with `update` and `finish` (the wasm module's streaming SHA-256). */
export interface Hasher {
  update(bytes: Uint8Array): void;
  finish(): string;
}

/** Whether the stored file has the expected size and sha256 (what is known of them). */
export async function verify(store: Store, name: string, expected: FileEntry, hasher: () => Hasher, signal: AbortSignal, onBytes: (n: number) => void): Promise<string | null> {
  const file = await store.file(name);
  if (!file) return 'missing';
  if (expected.size !== null && file.size !== expected.size) return `${file.size} bytes, expected ${expected.size}`;
  if (!expected.sha256) return null;
  const hash = hasher();
  const reader = file.stream().getReader();
  let read = 0;
  for (;;) {
    if (signal.aborted) throw signal.reason;
    const { done, value } = await reader.read();
    if (done) break;
    hash.update(value);
    read += value.byteLength;
    onBytes(read);
  }
  const digest = hash.finish();
  return digest === expected.sha256 ? null : `sha256 ${digest}, expected ${expected.sha256}`;
}
