// Weights delivery through the package's persistent cache (OPFS) in headless Chromium, against a
// local fault-injecting server: resume after a dropped connection, refetch of a corrupt shard, a
// stall, 4xx, offline second load, a cached file damaged on disk, quota, a disk that fills up.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { createHash } from 'node:crypto';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { serve } from './server.mjs';
import { checkProgress, fixtures, here, installPackage, launch, open, reference, root, tmp } from './helpers.mjs';

const SINGLE = 'model.safetensors';
const q8 = path.join(tmp, 'tiny-a-q8');
let files; // the app and the package
let browser;

before(async () => {
  installPackage();
  files = await serve({ '/': path.join(here, 'apps', 'plain'), '/node_modules/': path.join(here, 'node_modules'), '/images/': path.join(fixtures, 'images') });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  files?.server.close();
});

/** A sharded checkpoint with sha256s in its index: tiny-a in q8, 1 MiB shards (by the release CLI, which the suite builds). */
function ensureQ8() {
  if (fs.existsSync(path.join(q8, 'model.safetensors.index.json'))) return;
  execFileSync(path.join(root, 'target', 'release', 'dsocr'), ['quantize', path.join(fixtures, 'tiny-a'), '--scheme', 'q8', '--shard-mib', '1', '--out', q8], { stdio: 'inherit' });
  if (!fs.existsSync(path.join(q8, 'tokenizer.json'))) fs.copyFileSync(path.join(fixtures, 'tiny-a', 'tokenizer.json'), path.join(q8, 'tokenizer.json'));
}

/** Bytes of a shard fetched first (`www/src/cache/pipeline.ts`). */
const HEAD = 256 << 10;
const shards = () => JSON.parse(fs.readFileSync(path.join(q8, 'model.safetensors.index.json'))).metadata.shards;
const sha256 = (file) => createHash('sha256').update(fs.readFileSync(file)).digest('hex');

/** A weights server of its own (so a test can stop it), logging requests, with `fault` rules. */
async function weightsServer(fault) {
  return serve({ '/tiny-a/': path.join(fixtures, 'tiny-a'), '/q8/': q8 }, [], fault);
}

/** In the page: load (optionally in an app worker), maybe recognise, dispose; errors as data. */
function load(page, weightsUrl, { tokens = 0, worker, ...options } = {}) {
  return page.evaluate(async ({ weightsUrl, tokens, worker, options }) => {
    const { Dsocr } = window.dsocrApp;
    const progress = [];
    try {
      const t0 = performance.now();
      const engine = await Dsocr.load({ weightsUrl, onProgress: (p) => progress.push(p), ...options, ...(worker ? { worker: new Worker(worker, { type: 'module' }) } : {}) });
      const loadMs = performance.now() - t0;
      let ids;
      if (tokens) ids = (await engine.recognize('/images/page.png', { mode: 'tiny', maxNewTokens: tokens, repeatGuard: 'hf' })).token_ids;
      await engine.dispose();
      return { ids, progress, loadMs };
    } catch (e) {
      return { error: { code: e.code, message: String(e.message) }, progress };
    }
  }, { weightsUrl, tokens, worker, options });
}

/** sha256 (hex) of every file the cache holds, by stored name (`f_<file>`). */
function cachedDigests(page) {
  return page.evaluate(async () => {
    const out = {};
    const top = await (await navigator.storage.getDirectory()).getDirectoryHandle('dsocr-cache');
    for await (const [, dir] of top.entries()) {
      for await (const [name, handle] of dir.entries()) {
        if (!name.startsWith('f_')) continue;
        const bytes = await (await handle.getFile()).arrayBuffer();
        out[name.slice(2)] = [...new Uint8Array(await crypto.subtle.digest('SHA-256', bytes))].map((b) => b.toString(16).padStart(2, '0')).join('');
      }
    }
    return out;
  });
}

/** Rewrites one cached file: `truncate` to a length, or flip the byte at `flip`. */
function damage(page, file, { truncate, flip }) {
  return page.evaluate(async ({ file, truncate, flip }) => {
    const top = await (await navigator.storage.getDirectory()).getDirectoryHandle('dsocr-cache');
    for await (const [, dir] of top.entries()) {
      const handle = await dir.getFileHandle(`f_${file}`).catch(() => null);
      if (!handle) continue;
      const writable = await handle.createWritable({ keepExistingData: true });
      if (truncate !== undefined) await writable.truncate(truncate);
      if (flip !== undefined) {
        const byte = new Uint8Array(await (await handle.getFile()).slice(flip, flip + 1).arrayBuffer());
        await writable.write({ type: 'write', position: flip, data: new Uint8Array([byte[0] ^ 0xff]) });
      }
      await writable.close();
      return true;
    }
    return false;
  }, { file, truncate, flip });
}

/** The cache lists tiny-a (complete, `bytesOk(bytes, size of its files)`), deletes it by `deleteUrl`, then lists nothing. */
async function listThenDelete(page, url, deleteUrl, bytesOk) {
  const listed = await page.evaluate(async (deleteUrl) => {
    const { Dsocr } = window.dsocrApp;
    const before = await Dsocr.cachedModels();
    const deleted = await Dsocr.deleteCachedModel(deleteUrl);
    return { before, deleted, after: await Dsocr.cachedModels() };
  }, deleteUrl);
  const size = ['config.json', 'tokenizer.json', SINGLE].reduce((n, f) => n + fs.statSync(path.join(fixtures, 'tiny-a', f)).size, 0);
  assert.equal(listed.before.length, 1);
  assert.equal(listed.before[0].url, url);
  assert.equal(listed.before[0].complete, true);
  assert.ok(bytesOk(listed.before[0].bytes, size), `${listed.before[0].bytes} bytes listed for ${size}`);
  assert.equal(listed.deleted, true);
  assert.deepEqual(listed.after, []);
}

const requestsFor = (log, file) => log.filter((r) => r.path.endsWith(`/${file}`));

test('cold load into the cache, then the server stopped: no request, the same tokens; listing and deleting', { timeout: 10 * 60_000 }, async () => {
  const weights = await weightsServer();
  const context = await browser.newContext();
  try {
    const url = `${weights.base}/tiny-a`;
    const page = await open(context, `${files.base}/`);
    const cold = await load(page, url, { tokens: 2 });
    assert.equal(cold.error, undefined, JSON.stringify(cold.error));
    assert.deepEqual(cold.ids, reference('page').slice(0, 2));
    checkProgress(cold.progress);
    assert.ok(cold.progress.some((p) => p.phase === 'download' && !p.fromCache) && cold.progress.some((p) => p.phase === 'upload' && p.fromCache));
    await weights.server.stop();
    const requests = weights.log.length;
    const warmPage = await open(context, `${files.base}/`);
    const warm = await load(warmPage, url);
    assert.equal(warm.error, undefined, JSON.stringify(warm.error));
    // What the engine read is the checkpoint, byte for byte (the cold load's tokens came through the same path).
    assert.equal((await cachedDigests(warmPage))[SINGLE], sha256(path.join(fixtures, 'tiny-a', SINGLE)));
    assert.equal(weights.log.length, requests, 'the second load sent no request');
    assert.ok(!warm.progress.some((p) => p.phase === 'download'), 'nothing downloaded');
    checkProgress(warm.progress);
    console.log(`# tiny-a (${(fs.statSync(path.join(fixtures, 'tiny-a', SINGLE)).size / 1e6).toFixed(1)} MB): cold load ${cold.loadMs.toFixed(0)} ms, warm from the cache ${warm.loadMs.toFixed(0)} ms`);
    // OPFS counts the manifest too.
    await listThenDelete(warmPage, url, `${url}/`, (bytes, size) => bytes >= size && bytes < size + 10_000);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('a float checkpoint loaded with quantize: the cache keeps the quantized copy, not the original; the second load is offline, the same tokens as the converted checkpoint', { timeout: 10 * 60_000 }, async () => {
  ensureQ8();
  const weights = await weightsServer();
  const context = await browser.newContext();
  try {
    const url = `${weights.base}/tiny-a`;
    const page = await open(context, `${files.base}/`);
    // What `dsocr quantize --scheme q8` wrote, loaded without the cache: the tokens to expect.
    const converted = await load(page, `${weights.base}/q8`, { tokens: 3, cache: 'none' });
    assert.equal(converted.error, undefined, JSON.stringify(converted.error));
    const before = weights.log.length;
    const cold = await load(page, url, { tokens: 3, quantize: 'q8' });
    assert.equal(cold.error, undefined, JSON.stringify(cold.error));
    assert.deepEqual(cold.ids, converted.ids, 'quantized into the cache = the converted checkpoint');
    const made = cold.progress.filter((p) => p.phase === 'quantize');
    assert.ok(made.length > 0 && made.at(-1).loaded === made.at(-1).total, 'quantize events reach every tensor');
    assert.ok(cold.progress.some((p) => p.phase === 'upload' && p.fromCache), 'then read from the cache');
    // The original was read with Range requests only, never stored.
    const reads = requestsFor(weights.log.slice(before), SINGLE);
    assert.ok(reads.length > 0 && reads.every((r) => r.range !== null), JSON.stringify(reads.slice(0, 3)));
    const digests = await cachedDigests(page);
    assert.equal(digests[SINGLE], undefined, 'the float original is not in the cache');
    assert.ok(Object.keys(digests).some((f) => f.startsWith('shard-')), JSON.stringify(Object.keys(digests)));
    await weights.server.stop();
    const requests = weights.log.length;
    const warmPage = await open(context, `${files.base}/`);
    const warm = await load(warmPage, url, { tokens: 3, quantize: 'q8' });
    assert.equal(warm.error, undefined, JSON.stringify(warm.error));
    assert.deepEqual(warm.ids, converted.ids);
    assert.equal(weights.log.length, requests, 'the second load sent no request');
    assert.ok(!warm.progress.some((p) => p.phase === 'quantize' || p.phase === 'download'), 'no download, no quantization');
    const listed = await warmPage.evaluate(() => window.dsocrApp.Dsocr.cachedModels());
    const float = fs.statSync(path.join(fixtures, 'tiny-a', SINGLE)).size;
    const small = ['config.json', 'tokenizer.json'].reduce((n, f) => n + fs.statSync(path.join(fixtures, 'tiny-a', f)).size, 0);
    assert.equal(listed.length, 1);
    assert.equal(listed[0].url, `${url}/.dsocr-q8`);
    // int8 weights with f16 scales are ~0.53 of bf16 (the tiny model is mostly its vocabulary matrices).
    assert.ok(listed[0].complete && listed[0].bytes - small < 0.6 * float, `${listed[0].bytes} bytes cached for a ${float}-byte original (+ ${small} of config and tokenizer)`);
    console.log(`# tiny-a quantized into the cache (q8): cold ${cold.loadMs.toFixed(0)} ms, warm ${warm.loadMs.toFixed(0)} ms; ${listed[0].bytes} bytes cached for a ${float}-byte original`);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('a connection dropped mid-file resumes with a Range request from the bytes stored; a stall is retried', { timeout: 10 * 60_000 }, async () => {
  let faults = 0;
  const weights = await weightsServer((p, req) => {
    if (!p.endsWith(SINGLE) || req.headers.range === 'bytes=0-0') return null;
    faults++;
    if (faults === 1) return { dropAfter: 5_000_000 };
    if (faults === 2) return { stallAfter: 1_000_000 };
    return null;
  });
  const context = await browser.newContext();
  try {
    const page = await open(context, `${files.base}/`);
    const out = await load(page, `${weights.base}/tiny-a`, { stallTimeoutMs: 1500 });
    assert.equal(out.error, undefined, JSON.stringify(out.error));
    const ranges = requestsFor(weights.log, SINGLE).map((r) => r.range);
    // The probe, the dropped request, then resumes: after (up to) the 5 MB received, then after the
    // stall's 1 MB more.
    assert.equal(ranges.length, 4, JSON.stringify(ranges));
    assert.equal(ranges[0], 'bytes=0-0');
    assert.equal(ranges[1], null);
    const [first, second] = [ranges[2], ranges[3]].map((r) => Number(/^bytes=(\d+)-$/.exec(r ?? '')?.[1]));
    assert.ok(first > 0 && first <= 5_000_000, JSON.stringify(ranges));
    assert.ok(second > first && second <= first + 1_000_000, JSON.stringify(ranges));
    const digests = await cachedDigests(page);
    assert.equal(digests[SINGLE], sha256(path.join(fixtures, 'tiny-a', SINGLE)));
    // Events keep coming while a download waits (every 250 ms; the slack is for a loaded machine).
    const times = out.progress.filter((p) => p.phase === 'download').map((p) => p.elapsedMs);
    const gap = Math.max(...times.slice(1).map((t, i) => t - times[i]));
    console.log(`# longest gap between download events: ${gap.toFixed(0)} ms (a 1.5 s stall included)`);
    assert.ok(gap < 750, `${gap} ms without a progress event`);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('without OPFS the cache is Cache Storage: a dropped connection resumes after the stored parts, the second load is offline, listing and deleting', { timeout: 10 * 60_000 }, async () => {
  let faults = 0;
  const weights = await weightsServer((p, req) => {
    if (!p.endsWith(SINGLE) || req.headers.range === 'bytes=0-0') return null;
    return ++faults === 1 ? { dropAfter: 20_000_000 } : null;
  });
  const context = await browser.newContext();
  try {
    const url = `${weights.base}/tiny-a`;
    const page = await open(context, `${files.base}/`);
    const cold = await load(page, url, { tokens: 1, worker: '/no-opfs-worker.js' });
    assert.equal(cold.error, undefined, JSON.stringify(cold.error));
    assert.deepEqual(cold.ids, reference('page').slice(0, 1));
    checkProgress(cold.progress);
    assert.ok(!cold.progress.some((p) => p.warning), 'cached, not loaded past the cache');
    // The probe, the request cut at 20 MB, then one resume from what was stored (a 16 MiB part and
    // the bytes after it, kept when the connection dropped).
    const ranges = requestsFor(weights.log, SINGLE).map((r) => r.range);
    assert.equal(ranges.length, 3, JSON.stringify(ranges));
    const resumedAt = Number(/^bytes=(\d+)-$/.exec(ranges[2] ?? '')?.[1]);
    assert.ok(resumedAt >= 16 << 20 && resumedAt <= 20_000_000, JSON.stringify(ranges));
    // Nothing went to OPFS; Cache Storage holds the model.
    const stored = await page.evaluate(async () => ({
      opfs: await navigator.storage.getDirectory().then(async (d) => { for await (const name of d.keys()) if (name === 'dsocr-cache') return true; return false; }),
      caches: (await caches.keys()).filter((n) => n.startsWith('dsocr-cache-')).length,
    }));
    assert.deepEqual(stored, { opfs: false, caches: 1 });
    await weights.server.stop();
    const requests = weights.log.length;
    const warm = await load(page, url, { tokens: 1, worker: '/no-opfs-worker.js' });
    assert.equal(warm.error, undefined, JSON.stringify(warm.error));
    assert.deepEqual(warm.ids, reference('page').slice(0, 1));
    assert.equal(weights.log.length, requests, 'the second load sent no request');
    assert.ok(!warm.progress.some((p) => p.phase === 'download'), 'nothing downloaded');
    await listThenDelete(page, url, url, (bytes, size) => bytes === size);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('sharded: a corrupted byte refetches that shard alone; a shard corrupt twice fails naming it; 403 fails at once', { timeout: 10 * 60_000 }, async () => {
  ensureQ8();
  const names = Object.keys(shards()).sort();
  // `victim` arrives with a tensor byte flipped; `header` with a byte of its header flipped (the
  // engine has opened that header from the head before the shard was verified).
  const [victim, hopeless, header] = [names[1], names[2], names[3]];
  let [corrupted, corruptedHeader] = [false, false];
  const weights = await weightsServer((p) => {
    if (p === `/q8/${victim}` && !corrupted) return (corrupted = true), { corruptAt: 1000 };
    if (p === `/q8/${header}` && !corruptedHeader) return (corruptedHeader = true), { corruptAt: 20 };
    if (p.startsWith('/forbidden/')) return { status: 403 };
    return null;
  });
  const context = await browser.newContext();
  try {
    const page = await open(context, `${files.base}/`);
    const out = await load(page, `${weights.base}/q8`, { tokens: 2 });
    assert.equal(out.error, undefined, JSON.stringify(out.error));
    // Each shard's head (its header, which the engine opens while the shard downloads), then the
    // rest; the two corrupted ones once more, whole — and the engine, which had read the corrupt
    // header, loaded again from the verified cache.
    for (const name of names) {
      const requests = requestsFor(weights.log, name);
      const parts = shards()[name].size > HEAD ? 2 : 1;
      assert.equal(requests.length, name === victim || name === header ? parts + 1 : parts, name);
      assert.equal(requests[0].range, `bytes=0-${HEAD - 1}`, name);
    }
    const digests = await cachedDigests(page);
    for (const [name, meta] of Object.entries(shards())) assert.equal(digests[name], meta.sha256, name);
    const warm = await load(page, `${weights.base}/q8`, { tokens: 2 });
    assert.deepEqual(out.ids, warm.ids, 'the reloaded engine gives what the verified cache gives');
    // The same files under another path, one of them always corrupt.
    fs.symlinkSync(q8, path.join(tmp, 'bad'));
    const bad = await serve({ '/bad/': path.join(tmp, 'bad') }, [], (p) => (p === `/bad/${hopeless}` ? { corruptAt: 10 } : null));
    const failed = await load(page, `${bad.base}/bad`);
    await bad.server.stop();
    assert.equal(failed.error?.code, 'BAD_CHECKPOINT');
    assert.match(failed.error.message, new RegExp(`${hopeless}: sha256 .* \\(downloaded twice\\)`));
    const forbidden = await load(page, `${weights.base}/forbidden`);
    assert.equal(forbidden.error?.code, 'NETWORK');
    assert.match(forbidden.error.message, /forbidden\/model.safetensors.index.json: HTTP 403/);
    assert.equal(weights.log.filter((r) => r.path.startsWith('/forbidden/')).length, 1, 'a 403 is not retried');
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('sharded, cold: each shard goes to the GPU once verified, while later ones download; the tokens of a warm load', { timeout: 10 * 60_000 }, async () => {
  ensureQ8();
  const names = Object.keys(shards()).sort();
  // The last shard the engine reads (the lm_head's last rows) that is larger than a head.
  const late = names.filter((name) => shards()[name].size > HEAD).at(-1);
  // The last shard's bytes after its head come 4 s late.
  const weights = await weightsServer((p, req) => (p === `/q8/${late}` && req.headers.range !== `bytes=0-${HEAD - 1}` ? { delayMs: 4000 } : null));
  const context = await browser.newContext();
  try {
    const page = await open(context, `${files.base}/`);
    const cold = await load(page, `${weights.base}/q8`, { tokens: 2 });
    assert.equal(cold.error, undefined, JSON.stringify(cold.error));
    checkProgress(cold.progress);
    const lateDone = cold.progress.filter((p) => p.phase === 'download' && p.file === late).at(-1);
    assert.equal(lateDone.loaded, shards()[late].size);
    const firstUpload = cold.progress.find((p) => p.phase === 'upload' && p.loaded > 0);
    assert.ok(firstUpload.elapsedMs < lateDone.elapsedMs, `uploading began at ${firstUpload.elapsedMs.toFixed(0)} ms, the last shard arrived at ${lateDone.elapsedMs.toFixed(0)} ms`);
    const uploaded = cold.progress.filter((p) => p.phase === 'upload' && p.elapsedMs < lateDone.elapsedMs).at(-1);
    console.log(`# sharded q8 cold: ${uploaded.modelLoaded} of ${uploaded.modelTotal} bytes on the GPU before the last shard arrived (${lateDone.elapsedMs.toFixed(0)} ms); load ${cold.loadMs.toFixed(0)} ms`);
    const warm = await load(page, `${weights.base}/q8`, { tokens: 2 });
    assert.equal(warm.error, undefined, JSON.stringify(warm.error));
    assert.deepEqual(cold.ids, warm.ids);
    console.log(`# sharded q8 (${names.length} shards): warm from the cache ${warm.loadMs.toFixed(0)} ms`);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('a cached shard truncated or corrupted on disk is detected at load and refetched, alone', { timeout: 10 * 60_000 }, async () => {
  ensureQ8();
  const weights = await weightsServer();
  const context = await browser.newContext();
  try {
    const names = Object.keys(shards()).sort();
    const page = await open(context, `${files.base}/`);
    assert.equal((await load(page, `${weights.base}/q8`)).error, undefined);
    assert.ok(await damage(page, names[0], { truncate: 1000 }));
    assert.ok(await damage(page, names[3], { flip: 12345 }));
    weights.log.length = 0;
    const again = await load(page, `${weights.base}/q8`);
    assert.equal(again.error, undefined, JSON.stringify(again.error));
    assert.ok(again.progress.some((p) => p.phase === 'verify'));
    // Only the damaged shards were fetched: each one's head, then (beyond it) the rest.
    const expected = [names[0], names[3]].flatMap((name) => (shards()[name].size > HEAD ? [name, name] : [name]));
    assert.deepEqual(weights.log.map((r) => r.path.split('/').pop()).sort(), expected.sort(), 'only the damaged shards were fetched');
    const digests = await cachedDigests(page);
    for (const [name, meta] of Object.entries(shards())) assert.equal(digests[name], meta.sha256, name);
  } finally {
    await context.close();
    await weights.server.stop();
  }
});

test('too little storage is QUOTA_EXCEEDED before any download; a disk that fills up mid-way loads without the cache (warning)', { timeout: 10 * 60_000 }, async () => {
  const weights = await weightsServer();
  const context = await browser.newContext();
  try {
    const page = await open(context, `${files.base}/`);
    const quota = await load(page, `${weights.base}/tiny-a`, { worker: '/quota-worker.js' });
    assert.equal(quota.error?.code, 'QUOTA_EXCEEDED', JSON.stringify(quota));
    assert.match(quota.error.message, /needs \d+\.\d MB more of storage, 1\.0 MB is available/);
    assert.equal(requestsFor(weights.log, SINGLE).filter((r) => r.range !== 'bytes=0-0').length, 0, 'nothing downloaded');
    const full = await load(page, `${weights.base}/tiny-a`, { worker: '/full-disk-worker.js' });
    assert.equal(full.error, undefined, JSON.stringify(full.error));
    // It went on from the network: the weights file was read by range requests.
    assert.ok(requestsFor(weights.log, SINGLE).some((r) => r.range && r.range !== 'bytes=0-0' && !r.range.endsWith('-')), JSON.stringify(requestsFor(weights.log, SINGLE)));
    assert.ok(full.progress.some((p) => /cannot write .* loading without the cache/.test(p.warning ?? '')), JSON.stringify(full.progress.filter((p) => p.warning)));
    assert.deepEqual(await page.evaluate(() => window.dsocrApp.Dsocr.cachedModels()), [], 'the partial copy was removed');
  } finally {
    await context.close();
    await weights.server.stop();
  }
});
