// The persistent cache in the Origin Private File System: one folder per model URL under
// `dsocr-cache/`, holding the model's files as downloaded and a manifest of what is complete.
// Writes go in place through a sync access handle in workers (an interrupted file keeps what was
// flushed, so the next load resumes from there) and through a writable stream on the page. Where
// there is no OPFS, Cache Storage holds the same things (`parts.ts`); `openStore` picks.

import { PartsStore, cacheStorageAvailable, clearParts, deleteParts, listParts } from './parts.js';

const ROOT = 'dsocr-cache';
const MANIFEST = 'manifest.json';

/** What the cache knows of one file. */
export interface FileEntry {
  /** Expected size in bytes, when the index or the server said. */
  size: number | null;
  /** Expected sha256 (hex), when the index says. */
  sha256: string | null;
  /** Downloaded in full and verified. */
  complete: boolean;
}

/** One model's manifest. */
export interface Manifest {
  url: string;
  /** What makes this version this version: the index's sha256, or the single file's size/ETag. */
  version: string;
  files: Record<string, FileEntry>;
  /** Every file is complete. */
  complete: boolean;
  /** Last time the model was loaded (ms since the epoch). */
  usedAt: number;
}

/** What the download and the engine's reads need of a cache backend. */
export interface Store {
  readonly url: string;
  manifest: Manifest | null;
  saveManifest(manifest: Manifest): Promise<void>;
  /** The stored bytes of `name` (null when absent). */
  file(name: string): Promise<Blob | null>;
  remove(name: string): Promise<void>;
  clear(): Promise<void>;
  /** Opens `name` for writing from byte `offset` (the bytes after it are dropped). */
  writer(name: string, offset: number): Promise<Writer>;
}

/** The cache for the model at `url`: OPFS where there is one, else Cache Storage. */
export async function openStore(url: string): Promise<Store> {
  return opfsAvailable() ? ModelStore.open(url) : PartsStore.open(url);
}

/** Whether this context has a persistent cache at all. */
export function storeAvailable(): boolean {
  return opfsAvailable() || cacheStorageAvailable();
}

export function opfsAvailable(): boolean {
  return typeof navigator !== 'undefined' && typeof navigator.storage?.getDirectory === 'function';
}

async function root(): Promise<FileSystemDirectoryHandle> {
  return (await navigator.storage.getDirectory()).getDirectoryHandle(ROOT, { create: true });
}

/** A stable folder name for a URL (hex of a simple 64-bit FNV-1a hash; the URL itself is in the manifest). */
export function folderName(url: string): string {
  let h = 0xcbf29ce484222325n;
  for (const byte of new TextEncoder().encode(url)) h = BigInt.asUintN(64, (h ^ BigInt(byte)) * 0x100000001b3n);
  return h.toString(16).padStart(16, '0');
}

export class ModelStore implements Store {
  private constructor(
    readonly url: string,
    private readonly dir: FileSystemDirectoryHandle,
    public manifest: Manifest | null,
  ) {}

  static async open(url: string): Promise<ModelStore> {
    const dir = await (await root()).getDirectoryHandle(folderName(url), { create: true });
    return new ModelStore(url, dir, await readManifest(dir));
  }

  async saveManifest(manifest: Manifest): Promise<void> {
    this.manifest = manifest;
    const handle = await this.dir.getFileHandle(MANIFEST, { create: true });
    const writable = await handle.createWritable();
    await writable.write(JSON.stringify(manifest));
    await writable.close();
  }

  /** The stored file (null when absent). */
  async file(name: string): Promise<File | null> {
    try {
      return await (await this.dir.getFileHandle(storedName(name))).getFile();
    } catch {
      return null;
    }
  }

  async remove(name: string): Promise<void> {
    await this.dir.removeEntry(storedName(name)).catch(() => {});
  }

  /** Everything of this model, manifest included. */
  async clear(): Promise<void> {
    for await (const name of (this.dir as unknown as { keys(): AsyncIterable<string> }).keys()) await this.dir.removeEntry(name).catch(() => {});
    this.manifest = null;
  }

  /** Opens `name` for writing from byte `offset` (the bytes after it are dropped). */
  async writer(name: string, offset: number): Promise<Writer> {
    const handle = await this.dir.getFileHandle(storedName(name), { create: true });
    const sync = (handle as unknown as { createSyncAccessHandle?: () => Promise<SyncHandle> }).createSyncAccessHandle;
    if (typeof sync === 'function' && typeof WorkerGlobalScope !== 'undefined') {
      const access = await sync.call(handle);
      access.truncate(offset);
      return new SyncWriter(access, offset);
    }
    const writable = await handle.createWritable({ keepExistingData: true });
    await writable.truncate(offset);
    await writable.seek(offset);
    return new StreamWriter(writable);
  }
}

interface SyncHandle {
  write(buffer: BufferSource, options: { at: number }): number;
  truncate(size: number): void;
  flush(): void;
  close(): void;
}

declare const WorkerGlobalScope: unknown;

export interface Writer {
  write(chunk: Uint8Array): Promise<void>;
  close(): Promise<void>;
}

/** Flushes every 16 MiB: what a crash or a closed tab leaves is what the next load resumes from. */
class SyncWriter implements Writer {
  private sinceFlush = 0;
  constructor(private readonly access: SyncHandle, private at: number) {}
  async write(chunk: Uint8Array): Promise<void> {
    const written = this.access.write(chunk as Uint8Array<ArrayBuffer>, { at: this.at });
    if (written !== chunk.byteLength) throw new DOMException(`wrote ${written} of ${chunk.byteLength} bytes`, 'QuotaExceededError');
    this.at += written;
    this.sinceFlush += written;
    if (this.sinceFlush >= 16 << 20) {
      this.access.flush();
      this.sinceFlush = 0;
    }
  }
  async close(): Promise<void> {
    this.access.flush();
    this.access.close();
  }
}

class StreamWriter implements Writer {
  constructor(private readonly writable: FileSystemWritableFileStream) {}
  async write(chunk: Uint8Array): Promise<void> {
    await this.writable.write(chunk as Uint8Array<ArrayBuffer>);
  }
  async close(): Promise<void> {
    await this.writable.close();
  }
}

/** File names from the checkpoint are kept as they are, minus anything that could leave the folder. */
export function storedName(name: string): string {
  return `f_${name.replace(/[^A-Za-z0-9._-]/g, '_')}`;
}

async function readManifest(dir: FileSystemDirectoryHandle): Promise<Manifest | null> {
  try {
    return parseManifest(await (await (await dir.getFileHandle(MANIFEST)).getFile()).text());
  } catch {
    return null;
  }
}

/** A stored manifest, or null when it is not one. */
export function parseManifest(text: string): Manifest | null {
  try {
    const manifest = JSON.parse(text) as Manifest;
    return typeof manifest?.url === 'string' && typeof manifest.files === 'object' ? manifest : null;
  } catch {
    return null;
  }
}

/** A cached model, as {@link listCached} reports it. */
export interface CachedModel {
  /** The weights URL it was loaded from. */
  url: string;
  /** Bytes stored for it. */
  bytes: number;
  /** Every file downloaded and verified: it loads with no network. */
  complete: boolean;
  /** Last load, ms since the epoch. */
  usedAt: number;
}

export async function listCached(): Promise<CachedModel[]> {
  const models = await listParts();
  if (opfsAvailable()) {
    for await (const [, handle] of (await root() as unknown as { entries(): AsyncIterable<[string, FileSystemHandle]> }).entries()) {
      if (handle.kind !== 'directory') continue;
      const dir = handle as FileSystemDirectoryHandle;
      const manifest = await readManifest(dir);
      let bytes = 0;
      for await (const [, file] of (dir as unknown as { entries(): AsyncIterable<[string, FileSystemHandle]> }).entries()) {
        if (file.kind === 'file') bytes += (await (file as FileSystemFileHandle).getFile()).size;
      }
      models.push({ url: manifest?.url ?? '', bytes, complete: manifest?.complete ?? false, usedAt: manifest?.usedAt ?? 0 });
    }
  }
  return models.sort((a, b) => b.usedAt - a.usedAt);
}

/** Deletes one model's files (in either backend); true if there was something to delete. */
export async function deleteCached(url: string): Promise<boolean> {
  let deleted = await deleteParts(url);
  if (opfsAvailable()) {
    try {
      await (await root()).removeEntry(folderName(url), { recursive: true });
      deleted = true;
    } catch {
      // nothing there
    }
  }
  return deleted;
}

export async function clearCache(): Promise<void> {
  await clearParts();
  if (!opfsAvailable()) return;
  await (await navigator.storage.getDirectory()).removeEntry(ROOT, { recursive: true }).catch(() => {});
}
