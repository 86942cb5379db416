// Downloads that the engine reads while they go on: a cold load uploads each shard to the GPU as
// soon as it is downloaded and verified, while the next ones download, instead of downloading the
// whole model first.
//
// The engine opens every shard's safetensors header before it reads a tensor, so for a sharded
// checkpoint the first bytes of each shard still to fetch (its head) are downloaded first, stored
// as the start of the file (the rest then resumes after them) and kept in memory: the engine's
// header reads are served from there at once. Any other read of a file waits until the file is
// complete and its sha256 checked — the engine never gets an unverified tensor byte — and moves
// that file to the front of the queue. Header bytes served that turn out to differ from the
// verified file (corrupted in transit, then fetched again) mark the load `stale`: the engine loads
// again, from the cache, complete by then. If the cache cannot be written, the files not yet
// complete are read from the network instead.

import { CacheWriteError, Fatal, downloadInto, verify } from './download.js';
import { type PrepareOptions, INDEX, cachedFetch } from './index.js';
import type { Manifest, Store } from './store.js';

/** Files downloaded at once. */
export const STREAMS = 3;
/** Bytes of a shard fetched first (a safetensors header of a 64 MiB shard is a few tens of KB). */
const HEAD = 256 << 10;

interface Waiter {
  promise: Promise<void>;
  resolve: () => void;
  reject: (e: unknown) => void;
}

export class Pipeline {
  private readonly queue: string[];
  private readonly waiters = new Map<string, Waiter>();
  private readonly heads = new Map<string, Uint8Array>();
  /** Per file, where the head bytes served so far end. */
  private readonly served = new Map<string, number>();
  private readonly controller = new AbortController();
  private failure: unknown = null;
  /** The cache could not be written: what is not complete comes from the network. */
  private network = false;
  /** A head the engine read differed from the verified file. */
  stale = false;
  private readonly forward = () => this.controller.abort(this.options.signal.reason);

  constructor(
    private readonly store: Store,
    private readonly base: string,
    private readonly manifest: Manifest,
    private readonly options: PrepareOptions,
  ) {
    this.queue = Object.keys(manifest.files).filter((name) => !manifest.files[name].complete);
    if (options.signal.aborted) this.forward();
    else options.signal.addEventListener('abort', this.forward, { once: true });
  }

  /** Every file's size so far (the whole model's total is known from the first event), then the
   * heads of a sharded checkpoint's shards. */
  async start(): Promise<void> {
    for (const [name, entry] of Object.entries(this.manifest.files)) {
      const stored = (await this.store.file(name))?.size ?? 0;
      const loaded = entry.complete ? entry.size ?? stored : stored;
      this.options.onEvent({ phase: 'download', file: name, loaded, total: entry.complete ? loaded : entry.size, fromCache: loaded > 0 });
    }
    if (!this.manifest.files[INDEX]) return;
    const shards = this.queue.filter((name) => name.endsWith('.safetensors'));
    await pool(shards, async (name) => {
      const entry = this.manifest.files[name];
      const stored = (await this.store.file(name))?.size ?? 0;
      if (stored < HEAD && (entry.size === null || stored < entry.size)) {
        await downloadInto(this.store, name, `${this.base}/${name}`, entry, this.downloadOptions(name), HEAD);
      }
      const file = await this.store.file(name);
      if (file) this.heads.set(name, new Uint8Array(await file.slice(0, HEAD).arrayBuffer()));
    });
  }

  /** Downloads what is missing; settles when every file is complete (or with the first failure). */
  async run(): Promise<void> {
    try {
      await this.runStreams();
    } finally {
      this.options.signal.removeEventListener('abort', this.forward);
    }
  }

  private async runStreams(): Promise<void> {
    const worker = async () => {
      for (let name = this.queue.shift(); name !== undefined; name = this.queue.shift()) {
        await this.download(name);
        this.waiter(name).resolve();
      }
    };
    await Promise.all(
      Array.from({ length: Math.min(STREAMS, this.queue.length) }, () =>
        worker().catch((e) => {
          // The first failure stops the other streams, and nothing is written after this returns.
          if (this.failure === null) {
            this.failure = e;
            this.network = e instanceof CacheWriteError;
            this.controller.abort(e);
          }
        }),
      ),
    );
    if (this.failure === null && this.controller.signal.aborted) this.failure = this.controller.signal.reason;
    if (this.failure !== null) {
      for (const waiter of this.waiters.values()) {
        if (this.network) waiter.resolve();
        else waiter.reject(this.failure);
      }
      throw this.failure;
    }
  }

  private async download(name: string): Promise<void> {
    const entry = this.manifest.files[name];
    for (let attempt = 1; ; attempt++) {
      if (this.controller.signal.aborted) throw this.controller.signal.reason;
      await downloadInto(this.store, name, `${this.base}/${name}`, entry, this.downloadOptions(name));
      const problem = await verify(this.store, name, entry, this.options.hasher, this.controller.signal, () => {});
      if (!problem) break;
      await this.store.remove(name);
      // A corrupt file is fetched once more; twice corrupt is the server's file.
      if (attempt >= 2) throw new Fatal('BAD_CHECKPOINT', `${this.base}/${name}: ${problem} (downloaded twice)`);
    }
    const [head, served] = [this.heads.get(name), this.served.get(name) ?? 0];
    if (head && served > 0) {
      const file = await this.store.file(name);
      const verified = new Uint8Array((await file?.slice(0, served).arrayBuffer()) ?? new ArrayBuffer(0));
      if (!equal(head.subarray(0, served), verified)) this.stale = true;
    }
    entry.complete = true;
    await this.store.saveManifest(this.manifest).catch(() => {});
  }

  private downloadOptions(name: string) {
    return {
      signal: this.controller.signal,
      stallMs: this.options.stallMs,
      attempts: 5,
      onBytes: (loaded: number, total: number | null) => this.options.onEvent({ phase: 'download', file: name, loaded, total, fromCache: false }),
    };
  }

  private waiter(name: string): Waiter {
    let waiter = this.waiters.get(name);
    if (!waiter) {
      let resolve = () => {};
      let reject: (e: unknown) => void = () => {};
      const promise = new Promise<void>((ok, fail) => ((resolve = ok), (reject = fail)));
      promise.catch(() => {});
      waiter = { promise, resolve, reject };
      this.waiters.set(name, waiter);
    }
    return waiter;
  }

  /** Resolves once `name` is complete (or is to be read from the network); it downloads next. */
  private async ready(name: string): Promise<void> {
    if (this.manifest.files[name]?.complete || this.network) return;
    if (this.failure !== null) throw this.failure;
    const at = this.queue.indexOf(name);
    if (at > 0) this.queue.unshift(...this.queue.splice(at, 1));
    await this.waiter(name).promise;
  }

  /** `fetch` for the engine: heads from memory, files from the cache once complete, from the
   * network when the cache gave up. */
  fetch(): typeof fetch {
    const fromCache = cachedFetch(this.store, this.base);
    return (async (input: RequestInfo | URL, init?: RequestInit) => {
      const url = String(input instanceof Request ? input.url : input);
      if (!url.startsWith(`${this.base}/`)) return fetch(input, init);
      if (init?.signal?.aborted) throw init.signal.reason;
      const name = url.slice(this.base.length + 1);
      const entry = this.manifest.files[name];
      if (entry && !entry.complete && !this.network) {
        const range = /^bytes=(\d+)-(\d+)$/.exec(new Headers(init?.headers).get('range') ?? '');
        const head = this.heads.get(name);
        if (head && range && Number(range[1]) <= Number(range[2]) && Number(range[2]) < head.byteLength) {
          const [start, end] = [Number(range[1]), Number(range[2])];
          this.served.set(name, Math.max(this.served.get(name) ?? 0, end + 1));
          const size = entry.size === null ? '*' : String(entry.size);
          return new Response(head.slice(start, end + 1), {
            status: 206,
            headers: { 'content-length': String(end - start + 1), 'content-range': `bytes ${start}-${end}/${size}` },
          });
        }
        await this.ready(name);
      }
      if (entry && !entry.complete) return fetch(input, init);
      return fromCache(input, init);
    }) as typeof fetch;
  }
}

/** `task` over `items`, [`STREAMS`] at a time; the first failure rejects. */
async function pool<T>(items: T[], task: (item: T) => Promise<void>): Promise<void> {
  const left = [...items];
  const worker = async () => {
    for (let item = left.shift(); item !== undefined; item = left.shift()) await task(item);
  };
  await Promise.all(Array.from({ length: Math.min(STREAMS, left.length) }, worker));
}

function equal(a: Uint8Array, b: Uint8Array): boolean {
  return a.byteLength === b.byteLength && a.every((v, i) => v === b[i]);
}
