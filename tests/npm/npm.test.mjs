// The packed npm package (`npm pack` of www/) installed here and used by sample apps — a plain page
// with no bundler, a Vite app (dev server with and without optimizeDeps.exclude, production build) and
// a webpack 5 app — in headless Debian Chromium on WebGPU (SwiftShader), against the reference tokens.
// Needs: www/dist built (python3 www/build.py --skip-opt && (cd www && npm ci && npm run build:ts)),
// /usr/bin/chromium, `npm ci` here. Run: npm test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import path from 'node:path';
import { createRequire } from 'node:module';
import { serve } from './server.mjs';
import { checkProgress, fixtures, here, installPackage, launch, open as openIn, reference, tmp } from './helpers.mjs';

const TOKENS = 4;

let files; // fixture server: checkpoints, images, the plain app, built apps
let browser;

before(async () => {
  installPackage();
  files = await serve({
    '/': path.join(here, 'apps', 'plain'),
    '/node_modules/': path.join(here, 'node_modules'),
    '/ckpt/': fixtures,
    '/images/': path.join(fixtures, 'images'),
    '/vite-build/': path.join(tmp, 'vite-build'),
    '/webpack/': path.join(tmp, 'webpack'),
  });
  browser = await launch();
});

after(async () => {
  await browser?.close();
  files?.server.close();
});

const open = (url) => openIn(browser, url);

// In the page: load, recognise the page image `tokens` tokens long, dispose. Errors come back as data.
function loadAndRecognize(page, weightsUrl, imageUrl, tokens = TOKENS, loadOptions = {}) {
  return page.evaluate(async ({ weightsUrl, imageUrl, tokens, loadOptions }) => {
    const { Dsocr } = window.dsocrApp;
    const progress = [];
    try {
      const t0 = performance.now();
      const engine = await Dsocr.load({ weightsUrl, onProgress: (p) => progress.push(p), ...loadOptions });
      const loadMs = performance.now() - t0;
      const blob = await (await fetch(imageUrl)).blob();
      const streamed = [];
      const t1 = performance.now();
      const result = await engine.recognize(blob, { mode: 'tiny', maxNewTokens: tokens, repeatGuard: 'hf', onToken: (t) => streamed.push(t.id) });
      const runMs = performance.now() - t1;
      await engine.dispose();
      return { ids: result.token_ids, streamed, progress, loadMs, runMs };
    } catch (e) {
      return { error: { name: e.name, code: e.code, message: String(e.message) }, progress };
    }
  }, { weightsUrl, imageUrl, tokens, loadOptions });
}

function checkRun(out, label) {
  assert.equal(out.error, undefined, `${label}: ${JSON.stringify(out.error)}`);
  const expected = reference('page').slice(0, TOKENS);
  assert.deepEqual(out.ids, expected, label);
  assert.deepEqual(out.streamed, expected, `${label}: onToken sees every token`);
  checkProgress(out.progress);
  console.log(`# ${label}: load ${out.loadMs.toFixed(0)} ms, recognize ${TOKENS} tokens ${out.runMs.toFixed(0)} ms`);
}

test('plain page: every input type gives the same tokens (pixels transferred, caller objects intact); memory flat over 20 recognitions', { timeout: 15 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  const cdp = await page.context().newCDPSession(page);
  try {
    const pageHeap = async () => {
      await cdp.send('HeapProfiler.collectGarbage');
      return (await cdp.send('Runtime.getHeapUsage')).usedSize;
    };
    await page.evaluate(async () => {
      const { Dsocr } = window.dsocrApp;
      const worker = new Worker('/stats-worker.js', { type: 'module' });
      window.stats = () => new Promise((resolve) => {
        const onStats = (e) => e.data?.stats && (worker.removeEventListener('message', onStats), resolve(e.data.stats));
        worker.addEventListener('message', onStats);
        worker.postMessage({ stats: true });
      });
      window.engine = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker });
      window.image = await (await fetch('/images/page.png')).blob();
      window.once = async (input) => (await window.engine.recognize(input ?? window.image, { mode: 'tiny', maxNewTokens: 1, repeatGuard: 'hf' })).token_ids;
      // Warm-up: shaders compiled, the GPU memory pool sized.
      await window.once();
      await window.once();
    });
    const before = { ...(await page.evaluate(() => window.stats())), pageHeap: await pageHeap() };
    const out = await page.evaluate(async () => {
      const url = '/images/page.png';
      const bytes = await (await fetch(url)).arrayBuffer();
      const blob = new Blob([bytes], { type: 'image/png' });
      const img = new Image();
      img.src = url;
      await img.decode();
      const bitmap = await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' });
      const canvas = document.createElement('canvas');
      [canvas.width, canvas.height] = [bitmap.width, bitmap.height];
      canvas.getContext('2d').drawImage(bitmap, 0, 0);
      const offscreen = new OffscreenCanvas(bitmap.width, bitmap.height);
      offscreen.getContext('2d').drawImage(bitmap, 0, 0);
      const imageData = canvas.getContext('2d').getImageData(0, 0, bitmap.width, bitmap.height);
      const frame = new VideoFrame(bitmap, { timestamp: 0 });
      const inputs = {
        Blob: blob, File: new File([bytes], 'page.png', { type: 'image/png' }), ArrayBuffer: bytes, Uint8Array: new Uint8Array(bytes),
        ImageData: imageData, ImageBitmap: bitmap, HTMLImageElement: img, HTMLCanvasElement: canvas, OffscreenCanvas: offscreen,
        VideoFrame: frame, 'URL string': url, URL: new URL(url, location.href),
      };
      const ids = {};
      for (const [name, input] of Object.entries(inputs)) {
        try {
          ids[name] = await window.once(input);
        } catch (e) {
          ids[name] = `${e.code}: ${e.message}`;
        }
      }
      const intact = { bitmap: bitmap.width > 0, buffer: bytes.byteLength > 0, imageData: imageData.data.length > 0, frame: frame.codedWidth > 0 };
      frame.close();
      const errors = {};
      for (const [name, input] of [['bytes', new Uint8Array([1, 2, 3])], ['object', { not: 'an image' }]]) {
        errors[name] = await window.once(input).then(() => 'resolved', (e) => e.code);
      }
      // More of the same, up to 20 recognitions on this engine in all.
      for (let i = 0; i < 6; i++) await window.once();
      return { ids, intact, errors };
    });
    const after = { ...(await page.evaluate(() => window.stats())), pageHeap: await pageHeap() };
    await page.evaluate(() => window.engine.dispose());
    const expected = reference('page').slice(0, 1);
    for (const [name, ids] of Object.entries(out.ids)) assert.deepEqual(ids, expected, name);
    assert.deepEqual(out.intact, { bitmap: true, buffer: true, imageData: true, frame: true });
    assert.deepEqual(out.errors, { bytes: 'BAD_IMAGE', object: 'BAD_ARGUMENT' });
    console.log(`# memory after 2 recognitions: ${JSON.stringify(before)}; after 20: ${JSON.stringify(after)}`);
    // Flat: no GPU buffer is leaked per call, wasm memory and the page's heap do not grow with calls.
    assert.ok(after.gpuBuffers <= before.gpuBuffers && after.gpuBytes <= before.gpuBytes, 'GPU buffers do not grow');
    assert.ok(after.wasmBytes <= before.wasmBytes * 1.1, 'wasm memory stays within 10%');
    assert.ok(after.pageHeap <= before.pageHeap + 2e6, 'the page heap stays within 2 MB');
  } finally {
    await page.close();
  }
});

test('plain page (import map, no bundler; the package\'s own worker): progress to ready, stream, abort mid-decode then a job, abort mid-download then a load, dispose → DISPOSED, worker: false', { timeout: 15 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  try {
    const out = await page.evaluate(async () => {
      const { Dsocr, DsocrError } = window.dsocrApp;
      const image = await (await fetch('/images/page.png')).blob();
      const r = {};
      // Abort while the weights download: rejects with the signal's reason; a new load works.
      const early = new AbortController();
      const aborted = Dsocr.load({ weightsUrl: '/ckpt/tiny-a', signal: early.signal, onProgress: (p) => p.file.endsWith('.safetensors') && early.abort(new Error('stop the download')) });
      r.loadAbort = await aborted.then(() => 'resolved', (e) => e.message);
      r.progress = [];
      const engine = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', onProgress: (p) => r.progress.push(p) });
      // A stream read to the end.
      const stream = engine.stream(image, { mode: 'tiny', maxNewTokens: 3, repeatGuard: 'hf' });
      r.streamed = [];
      for await (const t of stream) r.streamed.push(t.id);
      r.streamResult = (await stream.result).token_ids;
      // Abort after the first token: rejects with the reason (an AbortError DOMException by default).
      const controller = new AbortController();
      r.decodeAbort = await engine.recognize(image, { mode: 'tiny', maxNewTokens: 50, repeatGuard: 'hf', signal: controller.signal, onToken: () => controller.abort() })
        .then(() => 'resolved', (e) => `${e.name}`);
      // The engine takes the next job.
      r.after = (await engine.recognize(image, { mode: 'tiny', maxNewTokens: 2, repeatGuard: 'hf' })).token_ids;
      // Leaving a stream early stops it; the engine goes on.
      for await (const t of engine.stream(image, { mode: 'tiny', maxNewTokens: 50, repeatGuard: 'hf' })) break;
      r.afterBreak = (await engine.recognize(image, { mode: 'tiny', maxNewTokens: 1, repeatGuard: 'hf' })).token_ids;
      await engine.dispose();
      await engine.dispose();
      r.disposed = await engine.recognize(image).then(() => 'resolved', (e) => e instanceof DsocrError && e.code);
      // On the calling thread.
      const local = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker: false });
      r.local = (await local.recognize(image, { mode: 'tiny', maxNewTokens: 2, repeatGuard: 'hf' })).token_ids;
      await local.dispose();
      // Errors of load: a missing checkpoint.
      r.missing = await Dsocr.load({ weightsUrl: '/ckpt/nothing-here' }).then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      r.noOptions = await Dsocr.load().then(() => 'resolved', (e) => e.code);
      return r;
    });
    const ref = reference('page');
    checkProgress(out.progress);
    assert.equal(out.loadAbort, 'stop the download');
    assert.deepEqual(out.streamed, ref.slice(0, 3));
    assert.deepEqual(out.streamResult, ref.slice(0, 3));
    assert.equal(out.decodeAbort, 'AbortError');
    assert.deepEqual(out.after, ref.slice(0, 2));
    assert.deepEqual(out.afterBreak, ref.slice(0, 1));
    assert.equal(out.disposed, 'DISPOSED');
    assert.deepEqual(out.local, ref.slice(0, 2));
    assert.match(out.missing, /^NETWORK: .*nothing-here/);
    assert.equal(out.noOptions, 'BAD_ARGUMENT');
  } finally {
    await page.close();
  }
});

test('an adapter under the model\'s limits fails load with ADAPTER_LIMITS before any download', { timeout: 5 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  try {
    files.log.length = 0;
    const out = await page.evaluate(async () => {
      const { Dsocr } = window.dsocrApp;
      const worker = new Worker('/small-adapter-worker.js', { type: 'module' });
      const result = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker }).then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      worker.terminate();
      return result;
    });
    assert.equal(out, 'ADAPTER_LIMITS: the adapter offers 8192 bytes of workgroup memory, 16384 are needed');
    assert.deepEqual(files.log.filter((r) => r.path.startsWith('/ckpt/')), [], 'nothing of the checkpoint was requested');
  } finally {
    await page.close();
  }
});

test('a worker that crashes mid-job rejects the pending call (no hang); an app-made worker from dsocr/worker', { timeout: 10 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  try {
    const out = await page.evaluate(async () => {
      const { Dsocr } = window.dsocrApp;
      const worker = new Worker('/crash-worker.js', { type: 'module' });
      const engine = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker });
      const image = await (await fetch('/images/page.png')).blob();
      worker.postMessage({ crashAfterMs: 10 });
      const pending = await engine.recognize(image, { mode: 'tiny', maxNewTokens: 50, repeatGuard: 'hf' }).then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      const later = await engine.recognize(image).then(() => 'resolved', (e) => e.code);
      worker.terminate();
      return { pending, later };
    });
    assert.match(out.pending, /^INTERNAL: .*simulated crash/);
    assert.equal(out.later, 'INTERNAL');
  } finally {
    await page.close();
  }
});

test('a lost GPU device fails the job with DEVICE_LOST, during decode and during load; a new engine then works', { timeout: 10 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  try {
    const out = await page.evaluate(async () => {
      const { Dsocr } = window.dsocrApp;
      const image = await (await fetch('/images/page.png')).blob();
      const worker = new Worker('/lose-worker.js', { type: 'module' });
      const engine = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker, cache: 'none' });
      const decode = await engine.recognize(image, { mode: 'tiny', maxNewTokens: 50, repeatGuard: 'hf', onToken: () => worker.postMessage({ loseDevice: true }) })
        .then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      const after = await engine.recognize(image).then(() => 'resolved', (e) => e.code);
      worker.terminate();
      const second = new Worker('/lose-worker.js', { type: 'module' });
      const during = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker: second, cache: 'none', onProgress: (p) => p.file.endsWith('.safetensors') && p.loaded > 0 && second.postMessage({ loseDevice: true }) })
        .then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      second.terminate();
      const fresh = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', cache: 'none' });
      const info = fresh.adapterInfo();
      await fresh.dispose();
      return { decode, after, during, fresh: info.maxBufferSize > 0 };
    });
    assert.match(out.decode, /^DEVICE_LOST: the GPU device was lost/);
    assert.equal(out.after, 'DISPOSED');
    assert.match(out.during, /^DEVICE_LOST: the GPU device was lost/);
    assert.equal(out.fresh, true);
  } finally {
    await page.close();
  }
});

test('the GPU out of memory fails the call with OUT_OF_MEMORY naming what ran, during load and during a recognition; a new engine then works', { timeout: 10 * 60_000 }, async () => {
  const page = await open(`${files.base}/`);
  try {
    const out = await page.evaluate(async () => {
      const { Dsocr } = window.dsocrApp;
      const image = await (await fetch('/images/page.png')).blob();
      const worker = new Worker('/oom-worker.js', { type: 'module' });
      worker.postMessage({ oomAfterBytes: 8e6 });
      const during = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker, cache: 'none' }).then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      worker.terminate();
      const second = new Worker('/oom-worker.js', { type: 'module' });
      const engine = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', worker: second, cache: 'none' });
      second.postMessage({ oomAfterBytes: 0 });
      const decode = await engine.recognize(image, { mode: 'tiny', maxNewTokens: 50, repeatGuard: 'hf' }).then(() => 'resolved', (e) => `${e.code}: ${e.message}`);
      const after = await engine.recognize(image).then(() => 'resolved', (e) => e.code);
      second.terminate();
      const fresh = await Dsocr.load({ weightsUrl: '/ckpt/tiny-a', cache: 'none' });
      const ids = (await fresh.recognize(image, { mode: 'tiny', maxNewTokens: 1, repeatGuard: 'hf' })).token_ids;
      await fresh.dispose();
      return { during, decode, after, ids };
    });
    assert.match(out.during, /^OUT_OF_MEMORY: the GPU ran out of memory while loading model\.safetensors \(\d+% read\) \(simulated: no memory/);
    assert.match(out.decode, /^OUT_OF_MEMORY: the GPU ran out of memory while recognizing an image \(mode tiny\)/);
    assert.equal(out.after, 'DISPOSED');
    assert.deepEqual(out.ids, reference('page').slice(0, 1));
  } finally {
    await page.close();
  }
});

test('the .d.ts type-checks a sample that uses every member (tsc --noEmit)', { timeout: 2 * 60_000 }, () => {
  execFileSync(path.join(here, 'node_modules', '.bin', 'tsc'), ['-p', path.join(here, 'types')], { stdio: 'inherit' });
});

for (const exclude of [false, true]) {
  test(`Vite dev server${exclude ? ' with optimizeDeps.exclude' : ' (dependency pre-bundling on)'}: reference tokens`, { timeout: 10 * 60_000 }, async () => {
    const { createServer } = await import('vite');
    if (exclude) process.env.DSOCR_VITE_EXCLUDE = '1';
    else delete process.env.DSOCR_VITE_EXCLUDE;
    const server = await createServer({ configFile: path.join(here, 'apps', 'vite', 'vite.config.js'), server: { host: '127.0.0.1', port: 0 }, cacheDir: path.join(tmp, `vite-cache-${exclude}`) });
    await server.listen();
    try {
      const page = await open(server.resolvedUrls.local[0]);
      checkRun(await loadAndRecognize(page, `${files.base}/ckpt/tiny-a`, `${files.base}/images/page.png`), `Vite dev${exclude ? ' (exclude)' : ''}`);
      await page.close();
    } finally {
      await server.close();
    }
  });
}

test('Vite production build, served statically: reference tokens', { timeout: 10 * 60_000 }, async () => {
  const { build } = await import('vite');
  process.env.DSOCR_VITE_OUT = path.join(tmp, 'vite-build');
  await build({ configFile: path.join(here, 'apps', 'vite', 'vite.config.js'), base: '/vite-build/' });
  const page = await open(`${files.base}/vite-build/`);
  try {
    checkRun(await loadAndRecognize(page, '/ckpt/tiny-a', '/images/page.png'), 'Vite build');
  } finally {
    await page.close();
  }
});

test('webpack 5 production build (no wasm or worker config), served statically: reference tokens', { timeout: 10 * 60_000 }, async () => {
  const require = createRequire(import.meta.url);
  const webpack = require('webpack');
  process.env.DSOCR_WEBPACK_OUT = path.join(tmp, 'webpack');
  const config = require(path.join(here, 'apps', 'webpack', 'webpack.config.cjs'));
  const stats = await new Promise((resolve, reject) => webpack(config, (e, s) => (e ? reject(e) : resolve(s))));
  assert.ok(!stats.hasErrors(), stats.toString('errors-only'));
  fs.copyFileSync(path.join(here, 'apps', 'webpack', 'index.html'), path.join(tmp, 'webpack', 'index.html'));
  const page = await open(`${files.base}/webpack/`);
  try {
    checkRun(await loadAndRecognize(page, '/ckpt/tiny-a', '/images/page.png'), 'webpack');
  } finally {
    await page.close();
  }
});
