// Loading through the persistent cache: plan the model's files (from the shard index, or the single
// file's size), check the quota, download what is missing (a few files at a time, each resumable and
// verified), then hand the engine a `fetch` that serves every byte range from storage. A model
// already complete in the cache loads with no request at all.

import { CacheWriteError, Fatal, downloadInto, request, verify, type Hasher } from './download.js';
import { deleteCached, openStore, storeAvailable, type FileEntry, type Manifest, type Store } from './store.js';

export const INDEX = 'model.safetensors.index.json';
const SINGLE = ['model-00001-of-000001.safetensors', 'model.safetensors'];
/** Files downloaded at once. */
const STREAMS = 3;

export interface CacheEvent {
  phase: 'download' | 'verify' | 'quantize';
  file: string;
  loaded: number;
  total: number | null;
  fromCache: boolean;
  warning?: string;
}

export interface PrepareOptions {
  signal: AbortSignal;
  stallMs: number;
  hasher: () => Hasher;
  onEvent: (event: CacheEvent) => void;
}

export { storeAvailable };

/**
 * Makes sure every file of the model at `base` is in the cache and intact; resolves to the fetch
 * that reads them from there, or null when the cache cannot be written (the caller loads from the
 * network; a warning event says why).
 */
export async function prepare(base: string, options: PrepareOptions): Promise<typeof fetch | null> {
  const store = await openStore(base);
  try {
    let manifest: Manifest;
    if (store.manifest?.complete) {
      const bad = await verifyAll(store, store.manifest, options);
      if (bad.length === 0) {
        await store.saveManifest({ ...store.manifest, usedAt: Date.now() }).catch(() => {});
        return cachedFetch(store, base);
      }
      // Truncated or corrupt in storage: those files alone are fetched again, by the stored plan.
      manifest = { ...store.manifest, complete: false };
      for (const name of bad) {
        manifest.files[name].complete = false;
        await store.remove(name);
      }
    } else {
      manifest = await plan(store, base, options);
    }
    await checkQuota(store, manifest);
    await downloadAll(store, base, manifest, options);
    await store.saveManifest({ ...manifest, complete: true, usedAt: Date.now() });
    return cachedFetch(store, base);
  } catch (e) {
    if (!(e instanceof CacheWriteError)) throw e;
    options.onEvent({ phase: 'download', file: '', loaded: 0, total: null, fromCache: false, warning: `${e.message}; loading without the cache` });
    // What was stored is dropped, to give the space back.
    await deleteCached(base);
    return null;
  }
}

/** The files of the model and what they should be; a different version than the stored one is wiped. */
async function plan(store: Store, base: string, options: PrepareOptions): Promise<Manifest> {
  const files: Record<string, FileEntry> = {
    'config.json': { size: null, sha256: null, complete: false },
    'tokenizer.json': { size: null, sha256: null, complete: false },
  };
  let version: string;
  const index = await request(`${base}/${INDEX}`, { signal: options.signal, cache: 'no-store' });
  if (index.ok) {
    const bytes = new Uint8Array(await index.arrayBuffer());
    const hash = options.hasher();
    hash.update(bytes);
    version = `index:${hash.finish()}`;
    let parsed: { weight_map?: Record<string, string>; metadata?: { shards?: Record<string, { size: number; sha256: string }> } };
    try {
      parsed = JSON.parse(new TextDecoder().decode(bytes));
    } catch (e) {
      throw new Fatal('BAD_CHECKPOINT', `${INDEX}: ${(e as Error).message}`);
    }
    files[INDEX] = { size: bytes.byteLength, sha256: null, complete: false };
    for (const shard of new Set(Object.values(parsed.weight_map ?? {}))) {
      const meta = parsed.metadata?.shards?.[shard];
      files[shard] = { size: meta?.size ?? null, sha256: meta?.sha256 ?? null, complete: false };
    }
    resetIfOther(store, version);
    await storeBytes(store, INDEX, bytes);
    files[INDEX].complete = true;
  } else if (index.status === 404) {
    const found = await probeSingle(base, options.signal);
    version = found.version;
    // The hub's ETag of an LFS file is its sha256.
    const sha = /^"?([0-9a-f]{64})"?$/.exec(found.etag)?.[1] ?? null;
    files[found.name] = { size: Number.isFinite(found.size) && found.size > 0 ? found.size : null, sha256: sha, complete: false };
    resetIfOther(store, version);
  } else {
    throw new Fatal('NETWORK', `${base}/${INDEX}: HTTP ${index.status}`);
  }
  // Keep what a previous, interrupted load of this same version completed.
  const previous = store.manifest?.version === version ? store.manifest.files : {};
  for (const [name, entry] of Object.entries(files)) if (previous[name]?.complete && !entry.complete) entry.complete = true;
  const manifest: Manifest = { url: base, version, files, complete: false, usedAt: Date.now() };
  await store.saveManifest(manifest).catch((e) => { throw new CacheWriteError(`cannot write the cache: ${e?.message ?? e}`); });
  return manifest;
}

/** The single-file checkpoint under `base` (no index): its name, size and ETag from a one-byte Range
 * request, and the version they make; none there is a `NETWORK` error naming what was looked for. */
export async function probeSingle(base: string, signal: AbortSignal): Promise<{ name: string; size: number; etag: string; version: string }> {
  for (const name of SINGLE) {
    const probe = await request(`${base}/${name}`, { headers: { Range: 'bytes=0-0' }, signal, cache: 'no-store' });
    await probe.body?.cancel();
    if (probe.status === 404) continue;
    if (!probe.ok) throw new Fatal('NETWORK', `${base}/${name}: HTTP ${probe.status}`);
    const total = /\/(\d+)$/.exec(probe.headers.get('content-range') ?? '')?.[1] ?? probe.headers.get('content-length');
    const [size, etag] = [Number(total), probe.headers.get('etag') ?? ''];
    return { name, size, etag, version: `single:${name}:${size}:${etag}` };
  }
  throw new Fatal('NETWORK', `${base}: no ${INDEX}, ${SINGLE.join(' or ')} (HTTP 404)`);
}

function resetIfOther(store: Store, version: string): void {
  if (store.manifest && store.manifest.version !== version) store.manifest = { ...store.manifest, files: {}, version };
}

export async function storeBytes(store: Store, name: string, bytes: Uint8Array): Promise<void> {
  try {
    const writer = await store.writer(name, 0);
    await writer.write(bytes);
    await writer.close();
  } catch (e) {
    throw new CacheWriteError(`cannot write ${name} to the cache: ${(e as Error)?.message ?? e}`);
  }
}

/** QUOTA_EXCEEDED before any byte is fetched, with what is needed and available. */
async function checkQuota(store: Store, manifest: Manifest): Promise<void> {
  let needed = 0;
  for (const [name, entry] of Object.entries(manifest.files)) {
    if (entry.complete || entry.size === null) continue;
    needed += entry.size - ((await store.file(name))?.size ?? 0);
  }
  const estimate = await navigator.storage.estimate?.().catch(() => null);
  if (estimate?.quota !== undefined && estimate.usage !== undefined) {
    const available = estimate.quota - estimate.usage;
    if (needed > available) {
      const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;
      throw new Fatal('QUOTA_EXCEEDED', `the model needs ${mb(needed)} more of storage, ${mb(Math.max(0, available))} is available (free disk space, or load with cache: 'none')`);
    }
  }
  // Ask that the browser keep it under storage pressure; a refusal is not an error.
  await navigator.storage.persist?.().catch(() => false);
}

async function downloadAll(store: Store, base: string, manifest: Manifest, options: PrepareOptions): Promise<void> {
  const queue = Object.keys(manifest.files).filter((name) => !manifest.files[name].complete);
  // Every file's size up front, so the whole model's total is known from the first event.
  for (const [name, entry] of Object.entries(manifest.files)) {
    const stored = (await store.file(name))?.size ?? 0;
    const loaded = entry.complete ? entry.size ?? stored : stored;
    options.onEvent({ phase: 'download', file: name, loaded, total: entry.complete ? loaded : entry.size, fromCache: loaded > 0 });
  }
  const worker = async () => {
    for (let name = queue.shift(); name !== undefined; name = queue.shift()) {
      const entry = manifest.files[name];
      for (let attempt = 1; ; attempt++) {
        if (controller.signal.aborted) return;
        await downloadInto(store, name, `${base}/${name}`, entry, {
          signal: controller.signal,
          stallMs: options.stallMs,
          attempts: 5,
          onBytes: (loaded, total) => options.onEvent({ phase: 'download', file: name, loaded, total, fromCache: false }),
        });
        const problem = await verify(store, name, entry, options.hasher, controller.signal, () => {});
        if (!problem) break;
        await store.remove(name);
        // A corrupt file is fetched once more; twice corrupt is the server's file.
        if (attempt >= 2) throw new Fatal('BAD_CHECKPOINT', `${base}/${name}: ${problem} (downloaded twice)`);
      }
      entry.complete = true;
      await store.saveManifest(manifest).catch(() => {});
    }
  };
  // The first failure stops the other streams, and nothing is written after this returns.
  let failure: unknown = null;
  const controller = new AbortController();
  const forward = () => controller.abort(options.signal.reason);
  options.signal.addEventListener('abort', forward, { once: true });
  const streams = Array.from({ length: Math.min(STREAMS, queue.length) }, () =>
    worker().catch((e) => {
      if (failure === null) {
        failure = e;
        controller.abort(e);
      }
    }),
  );
  await Promise.all(streams);
  options.signal.removeEventListener('abort', forward);
  if (failure === null && controller.signal.aborted) failure = controller.signal.reason;
  if (failure !== null) throw failure;
}

/** Checks every cached file (size, and sha256 where known); resolves to the bad ones. */
export async function verifyAll(store: Store, manifest: Manifest, options: PrepareOptions): Promise<string[]> {
  const bad: string[] = [];
  for (const [name, entry] of Object.entries(manifest.files)) {
    const problem = await verify(store, name, entry, options.hasher, options.signal, (n) =>
      options.onEvent({ phase: 'verify', file: name, loaded: n, total: entry.size, fromCache: true }),
    );
    if (problem) bad.push(name);
  }
  return bad;
}

/** `fetch` for the engine: the model's files (and byte ranges of them) from storage. */
export function cachedFetch(store: Store, base: string): typeof fetch {
  return (async (input: RequestInfo | URL, init?: RequestInit) => {
    const url = String(input instanceof Request ? input.url : input);
    if (!url.startsWith(`${base}/`)) return fetch(input, init);
    if (init?.signal?.aborted) throw init.signal.reason;
    const name = url.slice(base.length + 1);
    const file = store.manifest?.files[name] ? await store.file(name) : null;
    if (!file) return new Response(null, { status: 404, statusText: 'not in the cache' });
    const range = /^bytes=(\d+)-(\d*)$/.exec(new Headers(init?.headers).get('range') ?? '');
    if (!range) return new Response(file, { status: 200, headers: { 'content-length': String(file.size) } });
    const start = Number(range[1]);
    const end = range[2] === '' ? file.size - 1 : Math.min(Number(range[2]), file.size - 1);
    if (start > end) return new Response(null, { status: 416, headers: { 'content-range': `bytes */${file.size}` } });
    return new Response(file.slice(start, end + 1), {
      status: 206,
      headers: { 'content-length': String(end - start + 1), 'content-range': `bytes ${start}-${end}/${file.size}` },
    });
  }) as typeof fetch;
}
