// The cache where there is no Origin Private File System (some private windows, older engines):
// Cache Storage, one cache per model URL (`dsocr-cache-<hash of the URL>`). Cache Storage cannot
// append to an entry, so each file is kept as numbered parts of 16 MiB — an interrupted download
// keeps the parts it completed (and, when the connection drops, the part it was filling) and the
// next load resumes after them with a Range request; reads join the parts into one Blob, which the
// browser keeps on disk (no part is read until its bytes are asked for).

import { folderName, parseManifest, storedName, type CachedModel, type Manifest, type Store, type Writer } from './store.js';

const PREFIX = 'dsocr-cache-';
/** Bytes a part holds before it is stored (and what a crash can lose at most). */
const PART = 16 << 20;
/** Keys are requests; these URLs only name entries (nothing is fetched from them). */
const ORIGIN = 'https://dsocr.cache.invalid';
const MANIFEST_KEY = `${ORIGIN}/manifest.json`;

const partKey = (name: string, part: number) => `${ORIGIN}/${storedName(name)}/${part}`;

export function cacheStorageAvailable(): boolean {
  return typeof caches !== 'undefined' && typeof caches.open === 'function';
}

export class PartsStore implements Store {
  private constructor(
    readonly url: string,
    private readonly cache: Cache,
    public manifest: Manifest | null,
  ) {}

  static async open(url: string): Promise<PartsStore> {
    const cache = await caches.open(PREFIX + folderName(url));
    return new PartsStore(url, cache, await readManifest(cache));
  }

  async saveManifest(manifest: Manifest): Promise<void> {
    this.manifest = manifest;
    await this.cache.put(MANIFEST_KEY, new Response(JSON.stringify(manifest), { headers: { 'content-type': 'application/json' } }));
  }

  private async parts(name: string): Promise<Blob[]> {
    const parts: Blob[] = [];
    for (let i = 0; ; i++) {
      const response = await this.cache.match(partKey(name, i));
      if (!response) return parts;
      parts.push(await response.blob());
    }
  }

  async file(name: string): Promise<Blob | null> {
    const parts = await this.parts(name);
    return parts.length > 0 ? new Blob(parts) : null;
  }

  async remove(name: string): Promise<void> {
    for (let i = 0; await this.cache.delete(partKey(name, i)); i++);
  }

  async clear(): Promise<void> {
    for (const request of await this.cache.keys()) await this.cache.delete(request);
    this.manifest = null;
  }

  async writer(name: string, offset: number): Promise<Writer> {
    // Whole parts below `offset` stay; the one it falls in is cut there and refilled; later ones go.
    const parts = await this.parts(name);
    let at = 0;
    let kept = 0;
    let carry: Uint8Array | null = null;
    for (const part of parts) {
      if (at + part.size <= offset) {
        at += part.size;
        kept += 1;
        continue;
      }
      if (at < offset) carry = new Uint8Array(await part.slice(0, offset - at).arrayBuffer());
      break;
    }
    for (let i = kept; i < parts.length; i++) await this.cache.delete(partKey(name, i));
    return new PartsWriter(this.cache, name, kept, carry);
  }
}

/** Collects bytes and stores them a part at a time; `close` stores the rest. */
class PartsWriter implements Writer {
  private chunks: Uint8Array[] = [];
  private bytes = 0;
  constructor(private readonly cache: Cache, private readonly name: string, private next: number, carry: Uint8Array | null) {
    if (carry && carry.byteLength > 0) this.push(carry);
  }
  private push(chunk: Uint8Array): void {
    this.chunks.push(chunk);
    this.bytes += chunk.byteLength;
  }
  private async store(): Promise<void> {
    if (this.bytes === 0) return;
    const body = new Blob(this.chunks as Uint8Array<ArrayBuffer>[]);
    [this.chunks, this.bytes] = [[], 0];
    await this.cache.put(partKey(this.name, this.next), new Response(body, { headers: { 'content-length': String(body.size) } }));
    this.next += 1;
  }
  async write(chunk: Uint8Array): Promise<void> {
    // The stream may reuse its buffer: keep a copy.
    this.push(chunk.slice());
    if (this.bytes >= PART) await this.store();
  }
  async close(): Promise<void> {
    await this.store();
  }
}

async function readManifest(cache: Cache): Promise<Manifest | null> {
  const response = await cache.match(MANIFEST_KEY);
  return response ? parseManifest(await response.text()) : null;
}

/** Models cached in Cache Storage (none where it is missing). */
export async function listParts(): Promise<CachedModel[]> {
  if (!cacheStorageAvailable()) return [];
  const models: CachedModel[] = [];
  for (const name of await caches.keys()) {
    if (!name.startsWith(PREFIX)) continue;
    const cache = await caches.open(name);
    const manifest = await readManifest(cache);
    let bytes = 0;
    for (const request of await cache.keys()) {
      if (request.url === MANIFEST_KEY) continue;
      bytes += (await (await cache.match(request))?.blob())?.size ?? 0;
    }
    models.push({ url: manifest?.url ?? '', bytes, complete: manifest?.complete ?? false, usedAt: manifest?.usedAt ?? 0 });
  }
  return models;
}

export async function deleteParts(url: string): Promise<boolean> {
  return cacheStorageAvailable() ? caches.delete(PREFIX + folderName(url)) : false;
}

export async function clearParts(): Promise<void> {
  if (!cacheStorageAvailable()) return;
  for (const name of await caches.keys()) if (name.startsWith(PREFIX)) await caches.delete(name);
}
