// Loading through the persistent cache: plan the model's files (from the shard index, or the single
// file's size), check the quota, download what is missing (a few files at a time, each resumable and
// verified; `pipeline.ts`) while the engine reads each file from storage as soon as it is complete.
// A model already complete in the cache loads with no request at all.

import { CacheWriteError, Fatal, request, verify, type Hasher } from './download.js';
import { Pipeline } from './pipeline.js';
import { deleteCached, openStore, storeAvailable, type FileEntry, type Manifest, type Store } from './store.js';

export const INDEX = 'model.safetensors.index.json';
const SINGLE = ['model-00001-of-000001.safetensors', 'model.safetensors'];

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

/** A model being made ready in the cache (see {@link prepare}). */
export interface Prepared {
  /** Serves the model's files from the cache, each once it is complete and verified. */
  fetch: typeof fetch;
  /** Settles when every file is downloaded and verified (rejects with what stopped it). */
  done: Promise<void>;
  /** Whether the engine read a shard's header that differed from the verified shard (it must load again). */
  stale(): boolean;
}

/**
 * Plans the model's files at `base`, checks the quota and starts downloading what is missing;
 * resolves to the fetch that reads them from the cache as each one completes (the engine loads
 * while the rest download; see `pipeline.ts`), or to null when the cache cannot be written (the
 * caller loads from the network; a warning event says why). A model already complete in the cache
 * is verified and served with no request at all.
 */
export async function prepare(base: string, options: PrepareOptions): Promise<Prepared | null> {
  const store = await openStore(base);
  try {
    let manifest: Manifest;
    if (store.manifest?.complete) {
      const bad = await verifyAll(store, store.manifest, options);
      if (bad.length === 0) {
        await store.saveManifest({ ...store.manifest, usedAt: Date.now() }).catch(() => {});
        return { fetch: cachedFetch(store, base), done: Promise.resolve(), stale: () => false };
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
    const pipeline = new Pipeline(store, base, manifest, options);
    await pipeline.start();
    const done = pipeline.run().then(() => store.saveManifest({ ...manifest, complete: true, usedAt: Date.now() }));
    done.catch(() => {});
    return { fetch: pipeline.fetch(), done, stale: () => pipeline.stale };
  } catch (e) {
    if (!(e instanceof CacheWriteError)) throw e;
    await dropCache(base, e, options);
    return null;
  }
}

/** After a failed cache write: a warning, and what was stored is dropped to give the space back. */
export async function dropCache(base: string, e: CacheWriteError, options: Pick<PrepareOptions, 'onEvent'>): Promise<void> {
  options.onEvent({ phase: 'download', file: '', loaded: 0, total: null, fromCache: false, warning: `${e.message}; loading without the cache` });
  await deleteCached(base);
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
