// A float checkpoint loaded with `quantize` and the cache: the cache keeps the quantized checkpoint
// (≈ 2 GB for q4 of the real model) instead of the 6.7 GB original. The engine makes it once,
// reading the original with Range requests tensor by tensor and handing over each finished shard
// (≤ 64 MiB), which is stored as it comes; from then on the load reads it from the cache: no
// download, no quantization. Keyed by the source URL, the scheme and the source's version (its
// index's sha256, or its single file's size and ETag), so a new upload is quantized afresh.

import { CacheWriteError, Fatal, request } from './download.js';
import { INDEX, cachedFetch, probeSingle, storeBytes, verifyAll, type PrepareOptions } from './index.js';
import { deleteCached, openStore, type FileEntry, type Store } from './store.js';

/** The engine's converter (`Dsocr.quantizeCheckpoint` of the wasm module). */
export type Quantizer = (
  base: string,
  options: {
    quantize: string;
    signal: AbortSignal;
    onShard: (name: string, bytes: Uint8Array) => Promise<void>;
    onProgress: (event: { file: string; loaded: number; total: number | null }) => void;
  },
) => Promise<{ config: string; index: string }>;

/** Where the quantized copy of `base` lives in the cache (never requested from the network). */
export function quantizedUrl(base: string, scheme: string): string {
  return `${base}/.dsocr-${scheme}`;
}

/**
 * The quantized checkpoint of `base` by `scheme` from the cache, made first if need be: resolves to
 * its URL and the fetch that serves it, or null when `base` is already quantized (the plain cache
 * applies). A cache that cannot be written throws `CacheWriteError` after dropping what it stored (the
 * caller loads without the cache).
 */
export async function prepareQuantized(base: string, scheme: string, quantize: Quantizer, options: PrepareOptions): Promise<{ url: string; fetch: typeof fetch } | null> {
  const url = quantizedUrl(base, scheme);
  const store = await openStore(url);
  // As the plain cache: a complete copy is used as it is, with no request (offline included).
  if (store.manifest?.complete) {
    const bad = await verifyAll(store, store.manifest, options);
    if (bad.length === 0) {
      await store.saveManifest({ ...store.manifest, usedAt: Date.now() }).catch(() => {});
      return { url, fetch: cachedFetch(store, url) };
    }
  }
  const source = await sourceVersion(base, options.signal);
  if (source === null) return null;
  await checkQuota(source.bytes === null ? null : Math.ceil(source.bytes * (QUANTIZED_SHARE[scheme] ?? 1)));
  try {
    return await make(store, base, url, scheme, `quantized:${scheme}:${source.version}`, quantize, options);
  } catch (e) {
    // What was stored is dropped, to give the space back (as the plain cache does).
    if (e instanceof CacheWriteError) await deleteCached(url).catch(() => {});
    throw e;
  }
}

/** Quantizes `base` into `store` afresh (a shard is only usable with the index of the same run). */
async function make(store: Store, base: string, url: string, scheme: string, version: string, quantize: Quantizer, options: PrepareOptions): Promise<{ url: string; fetch: typeof fetch }> {
  await store.clear().catch(() => {});
  const files: Record<string, FileEntry> = {};
  await save(store, { url, version, files, complete: false, usedAt: Date.now() });
  const tokenizer = await request(`${base}/tokenizer.json`, { signal: options.signal });
  if (!tokenizer.ok) throw new Fatal('NETWORK', `${base}/tokenizer.json: HTTP ${tokenizer.status}`);
  // A shard that cannot be stored stops the engine's conversion, which rejects with an error of its
  // own: the store's `CacheWriteError` is what the caller needs to see (it then loads without the cache).
  let writeFailure: unknown = null;
  const made = await quantize(base, {
    quantize: scheme,
    signal: options.signal,
    onShard: (name, bytes) => storeBytes(store, name, bytes).catch((e) => { writeFailure = e; throw e; }),
    onProgress: (e) => options.onEvent({ phase: 'quantize', file: e.file, loaded: e.loaded, total: e.total, fromCache: false }),
  }).catch((e) => { throw writeFailure ?? e; });
  // The index names every shard with its size and sha256: the next load verifies them against it.
  const shards: Record<string, { size: number; sha256: string }> = JSON.parse(made.index).metadata.shards;
  for (const [name, meta] of Object.entries(shards)) files[name] = { size: meta.size, sha256: meta.sha256, complete: true };
  const small: [string, Uint8Array][] = [
    ['config.json', new TextEncoder().encode(made.config)],
    ['tokenizer.json', new Uint8Array(await tokenizer.arrayBuffer())],
    [INDEX, new TextEncoder().encode(made.index)],
  ];
  for (const [name, bytes] of small) {
    await storeBytes(store, name, bytes);
    files[name] = { size: bytes.byteLength, sha256: null, complete: true };
  }
  await save(store, { url, version, files, complete: true, usedAt: Date.now() });
  return { url, fetch: cachedFetch(store, url) };
}

/** What the quantized copy takes of a bf16 original, with some room: q4 (int4, f16 scales per 64)
 * ≈ 0.30 of the real model, q8 ≈ 0.56 (the float tensors and the vision encoder's q8 included). */
const QUANTIZED_SHARE: Record<string, number> = { q4: 0.35, q8: 0.6 };

/** QUOTA_EXCEEDED before the copy is made when the estimate does not fit; asks for persistence. */
async function checkQuota(needed: number | null): Promise<void> {
  const estimate = await navigator.storage.estimate?.().catch(() => null);
  if (needed !== null && estimate?.quota !== undefined && estimate.usage !== undefined) {
    const available = estimate.quota - estimate.usage;
    if (needed > available) {
      const mb = (n: number) => `${(n / 1e6).toFixed(1)} MB`;
      throw new Fatal('QUOTA_EXCEEDED', `the quantized model needs about ${mb(needed)} of storage, ${mb(Math.max(0, available))} is available (free disk space, or load with cache: 'none')`);
    }
  }
  await navigator.storage.persist?.().catch(() => false);
}

/** What identifies the source's weights (and their size in bytes, when known), or null when its config
 * says it is quantized already. */
async function sourceVersion(base: string, signal: AbortSignal): Promise<{ version: string; bytes: number | null } | null> {
  const config = await request(`${base}/config.json`, { signal, cache: 'no-store' });
  if (!config.ok) return { version: `unreadable-config:${config.status}`, bytes: null }; // the engine's load reports it
  let parsed: { quantization_config?: unknown } = {};
  try {
    parsed = JSON.parse(await config.text());
  } catch {
    return { version: 'unparsable-config', bytes: null }; // the engine's load reports it
  }
  if (parsed.quantization_config) return null;
  const index = await request(`${base}/${INDEX}`, { signal, cache: 'no-store' });
  if (index.ok) {
    const bytes = await index.arrayBuffer();
    const digest = await crypto.subtle.digest('SHA-256', bytes);
    let total: number | null = null;
    try {
      total = JSON.parse(new TextDecoder().decode(bytes)).metadata?.total_size ?? null;
    } catch {
      // the engine's load reports a bad index
    }
    return { version: `index:${[...new Uint8Array(digest)].map((b) => b.toString(16).padStart(2, '0')).join('')}`, bytes: total };
  }
  await index.body?.cancel();
  const single = await probeSingle(base, signal);
  return { version: single.version, bytes: Number.isFinite(single.size) && single.size > 0 ? single.size : null };
}

async function save(store: Store, manifest: Parameters<Store['saveManifest']>[0]): Promise<void> {
  await store.saveManifest(manifest).catch((e) => {
    throw new CacheWriteError(`cannot write the cache: ${e?.message ?? e}`);
  });
}
