// dsocr compiled to wasm32, in headless Debian Chromium on WebGPU (SwiftShader), against the reference.
// Needs: www/dist/wasm (python3 www/build.py), /usr/bin/chromium, `npm ci` here. Run: npm test.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import http from 'node:http';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { execFileSync } from 'node:child_process';
import { chromium } from 'playwright-core';

const root = path.resolve(path.dirname(fileURLToPath(import.meta.url)), '..', '..');
const fixtures = path.join(root, 'tests', 'fixtures');
// tiny-a converted to q4 and q8 by the CLI (built by the suite's `cargo test --release`), 1 MiB shards.
const quantized = fs.mkdtempSync(path.join(os.tmpdir(), 'dsocr-browser-quantized-'));
const dsocr = path.join(root, 'target', 'release', 'dsocr');
const routes = {
  '/quantized/': quantized,
  '/pkg/': path.join(root, 'www', 'dist', 'wasm'),
  '/ckpt/': fixtures,
  // The same files from a server that ignores Range headers (like `python3 -m http.server`).
  '/norange/': fixtures,
  '/images/': path.join(fixtures, 'images'),
};
// What the server sent for each weights file: [status, bytes] per request.
const served = [];
const types = { '.js': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json', '.png': 'image/png', '.html': 'text/html' };
const PAGE = `<!doctype html><meta charset="utf-8"><title>dsocr test</title>
<script type="module">
  import init, { Dsocr } from '/pkg/dsocr.js';
  window.dsocr = init().then(() => ({ Dsocr }));
</script>`;

let server;
let base;

before(async () => {
  server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    if (url.pathname === '/' || url.pathname === '/index.html') {
      res.writeHead(200, { 'content-type': 'text/html' });
      return res.end(PAGE);
    }
    const prefix = Object.keys(routes).find((p) => url.pathname.startsWith(p));
    const file = prefix && path.join(routes[prefix], decodeURIComponent(url.pathname.slice(prefix.length)));
    if (!file || !file.startsWith(routes[prefix]) || !fs.existsSync(file) || !fs.statSync(file).isFile()) {
      res.writeHead(404);
      return res.end();
    }
    const body = fs.readFileSync(file);
    const type = types[path.extname(file)] ?? 'application/octet-stream';
    const range = /^bytes=(\d+)-(\d+)$/.exec(req.headers.range ?? '');
    if (range && prefix !== '/norange/') {
      const [start, end] = [Number(range[1]), Math.min(Number(range[2]), body.length - 1)];
      if (start > end) {
        res.writeHead(416, { 'content-range': `bytes */${body.length}` });
        return res.end();
      }
      if (file.endsWith('.safetensors')) served.push([206, end - start + 1]);
      res.writeHead(206, { 'content-type': type, 'content-length': end - start + 1, 'content-range': `bytes ${start}-${end}/${body.length}`, 'accept-ranges': 'bytes' });
      return res.end(body.subarray(start, end + 1));
    }
    if (file.endsWith('.safetensors')) served.push([200, body.length]);
    res.writeHead(200, { 'content-type': type, 'content-length': body.length });
    res.end(body);
  });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  base = `http://127.0.0.1:${server.address().port}`;
});

after(() => {
  server?.close();
  fs.rmSync(quantized, { recursive: true, force: true });
});

async function browser(webgpu = true) {
  const args = ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic'];
  if (webgpu) args.push('--enable-unsafe-webgpu');
  const userDataDir = fs.mkdtempSync(path.join(os.tmpdir(), 'dsocr-chromium-'));
  const context = await chromium.launchPersistentContext(userDataDir, { executablePath: '/usr/bin/chromium', headless: true, args });
  const page = await context.newPage();
  page.on('console', (m) => process.env.DSOCR_BROWSER_LOG && console.log('[page]', m.text()));
  await page.goto(`${base}/`);
  return { context, page };
}

function reference(checkpoint, image, mode) {
  const index = JSON.parse(fs.readFileSync(path.join(fixtures, checkpoint, 'cases', 'index.json')));
  return index.cases.find((c) => c.image === image && c.mode === mode);
}

// Loads a tiny checkpoint, recognises an image, returns the result plus streamed tokens and progress.
// `route`: '/ckpt' (Range requests), '/norange' or '/quantized'; `maxBindingBytes` lowers the
// binding limit; `bitmap` passes an ImageBitmap instead of a Blob; `quantize` quantizes at load.
async function recognize(page, { checkpoint, image, mode, maxNewTokens, abortAfter, route = '/ckpt', maxBindingBytes, bitmap = false, task = 'markdown', quantize }) {
  return page.evaluate(async ({ checkpoint, image, mode, maxNewTokens, abortAfter, route, maxBindingBytes, bitmap, task, quantize }) => {
    const { Dsocr } = await window.dsocr;
    const progress = [];
    const streamed = [];
    try {
      const started = performance.now();
      const engine = await Dsocr.load(`${route}/${checkpoint}`, { onProgress: (p) => progress.push(p), maxBindingBytes, quantize });
      const loadMs = performance.now() - started;
      const adapter = engine.adapterInfo();
      const blob = new Blob([await (await fetch(`/images/${image}.png`)).arrayBuffer()], { type: 'image/png' });
      const input = bitmap ? await createImageBitmap(blob, { colorSpaceConversion: 'none', premultiplyAlpha: 'none' }) : blob;
      const controller = new AbortController();
      const t = performance.now();
      const result = await engine.recognize(input, {
        task, mode, maxNewTokens, repeatGuard: 'hf', signal: controller.signal,
        onToken: (e) => { streamed.push(e.id); if (abortAfter && streamed.length >= abortAfter) controller.abort(); },
      });
      return { result, streamed, progress, loadMs, adapter, runMs: performance.now() - t };
    } catch (e) {
      return { error: { code: e.code, message: String(e.message) }, streamed, progress };
    }
  }, { checkpoint, image, mode, maxNewTokens, abortAfter, route, maxBindingBytes, bitmap, task, quantize });
}

// Small runs under a 4 MiB binding cap, so the embedding and lm_head load as vocabulary shards.
for (const [mode, tokens, maxBindingBytes] of [['tiny', 8, undefined], ['small', 4, 4 << 20]]) {
  test(`tiny-a ${mode}: the reference's greedy tokens on WebGPU, streamed, with progress to 100%${maxBindingBytes ? ', vocabulary split under a 4 MiB binding limit' : ''}`, { timeout: 15 * 60_000 }, async () => {
    const { context, page } = await browser();
    try {
      served.length = 0;
      const out = await recognize(page, { checkpoint: 'tiny-a', image: 'page', mode, maxNewTokens: tokens, maxBindingBytes });
      assert.equal(out.error, undefined, JSON.stringify(out.error));
      // The weights came as Range requests (header, then data), never as one whole-file response.
      assert.ok(served.length >= 3 && served.every(([status]) => status === 206), JSON.stringify(served));
      if (maxBindingBytes) assert.equal(out.adapter.maxTensorBytes, maxBindingBytes);
      const expected = reference('tiny-a', 'page', mode).greedy_tokens.slice(0, tokens);
      assert.deepEqual(out.result.token_ids, expected);
      assert.deepEqual(out.streamed, expected, 'onToken sees every token in order');
      assert.equal(out.result.image_token_count, reference('tiny-a', 'page', mode).image_tokens);
      for (const file of ['config.json', 'tokenizer.json', 'model.safetensors']) {
        const last = out.progress.filter((p) => p.file === file).at(-1);
        assert.ok(last, `progress for ${file}`);
        assert.equal(last.loaded, last.total, `${file} reaches 100%`);
      }
      console.log(`# ${mode}: load ${out.loadMs.toFixed(0)} ms, recognize ${tokens} tokens ${out.runMs.toFixed(0)} ms`);
      console.log(`# adapter: ${JSON.stringify(out.adapter)}`);
      // burn requests the adapter's maxima, not WebGPU's defaults.
      assert.equal(out.adapter.maxStorageBufferBindingSize, out.adapter.adapterMaxStorageBufferBindingSize);
      assert.equal(out.adapter.maxBufferSize, out.adapter.adapterMaxBufferSize);
    } finally {
      await context.close();
    }
  });
}

// Quantized weights on WebGPU, multiplied packed by the crate's GPU kernels: tiny-a converted to q4
// and q8 (the sharded format) and the float checkpoint quantized while loading (q4) give the greedy
// tokens the native GPU path gives (wgpu on Vulkan: lavapipe in CI) for the same weights.
test('tiny-a q4 and q8 on WebGPU: the greedy tokens of native wgpu (converted checkpoints, and quantize at load)', { timeout: 15 * 60_000 }, async () => {
  const tokens = 6;
  const native = (model) => {
    const out = execFileSync(dsocr, ['ocr', path.join(fixtures, 'images', 'page.png'), '--model', model, '--device', 'wgpu', '--mode', 'tiny',
      '--max-new-tokens', String(tokens), '--repeat-guard', 'hf', '--format', 'json'], { env: { ...process.env, XDG_RUNTIME_DIR: os.tmpdir() } });
    return JSON.parse(out).results[0].token_ids;
  };
  // A page per load: one WebGPU device per page.
  const inBrowser = async (options) => {
    const { context, page } = await browser();
    try {
      return await recognize(page, { image: 'page', mode: 'tiny', maxNewTokens: tokens, ...options });
    } finally {
      await context.close();
    }
  };
  for (const scheme of ['q4', 'q8']) {
    const dir = path.join(quantized, scheme);
    execFileSync(dsocr, ['quantize', path.join(fixtures, 'tiny-a'), '--scheme', scheme, '--shard-mib', '1', '--out', dir], { stdio: 'inherit' });
    const expected = native(dir);
    assert.equal(expected.length, tokens);
    const out = await inBrowser({ checkpoint: scheme, route: '/quantized' });
    assert.equal(out.error, undefined, JSON.stringify(out.error));
    assert.deepEqual(out.result.token_ids, expected, `${scheme}: the native wgpu tokens`);
    console.log(`# tiny-a ${scheme} converted: load ${out.loadMs.toFixed(0)} ms, recognize ${tokens} tokens ${out.runMs.toFixed(0)} ms`);
  }
  const atLoad = await inBrowser({ checkpoint: 'tiny-a', quantize: 'q4' });
  assert.equal(atLoad.error, undefined, JSON.stringify(atLoad.error));
  assert.deepEqual(atLoad.result.token_ids, native(path.join(quantized, 'q4')), 'quantized at load = the converted q4 checkpoint on native wgpu');
});

// DeepSeek-OCR-2 in the browser: the engine picks the model from config.json; Base (the 1024 view,
// the query encoder's masked attention on WebGPU) gives the reference's tokens; a v1-only mode is refused.
test('ocr2/tiny-v2a base: the reference greedy tokens on WebGPU; tiny is BAD_ARGUMENT', { timeout: 15 * 60_000 }, async () => {
  const { context, page } = await browser();
  try {
    const out = await page.evaluate(async () => {
      const { Dsocr } = await window.dsocr;
      const engine = await Dsocr.load('/ckpt/ocr2/tiny-v2a', {});
      const blob = new Blob([await (await fetch('/images/note.png')).arrayBuffer()], { type: 'image/png' });
      const t = performance.now();
      const result = await engine.recognize(blob, { task: 'free', maxNewTokens: 4, repeatGuard: 'hf' });
      const runMs = performance.now() - t;
      let refused = null;
      try {
        await engine.recognize(blob, { mode: 'tiny', maxNewTokens: 1 });
      } catch (e) {
        refused = { code: e.code, message: String(e.message) };
      }
      return { result, runMs, refused };
    });
    const expected = reference('ocr2/tiny-v2a', 'note', 'base');
    assert.deepEqual(out.result.token_ids, expected.greedy_tokens.slice(0, 4));
    assert.equal(out.result.image_token_count, expected.image_tokens);
    assert.equal(out.result.model, 'deepseek-ocr-2');
    assert.equal(out.refused?.code, 'BAD_ARGUMENT', JSON.stringify(out.refused));
    assert.match(out.refused.message, /base or gundam/);
    console.log(`# ocr2 base (default mode): recognize 4 tokens ${out.runMs.toFixed(0)} ms`);
  } finally {
    await context.close();
  }
});

// Also: an ImageBitmap input, and a server without Range support (the whole file, served once).
test('abort through an AbortSignal rejects with code ABORTED (ImageBitmap input, server without Range)', { timeout: 15 * 60_000 }, async () => {
  const { context, page } = await browser();
  try {
    served.length = 0;
    const out = await recognize(page, { checkpoint: 'tiny-a', image: 'note', mode: 'tiny', maxNewTokens: 16, abortAfter: 2, route: '/norange', bitmap: true, task: 'free' });
    assert.equal(out.error?.code, 'ABORTED', JSON.stringify(out));
    assert.deepEqual(out.streamed, reference('tiny-a', 'note', 'tiny').greedy_tokens.slice(0, 2));
    assert.deepEqual(served.map(([status]) => status), [200], 'one whole-file response, reused for every range');
  } finally {
    await context.close();
  }
});

test('without WebGPU, load fails with code NO_WEBGPU', { timeout: 5 * 60_000 }, async () => {
  const { context, page } = await browser(false);
  try {
    const out = await recognize(page, { checkpoint: 'tiny-a', image: 'note', mode: 'tiny', maxNewTokens: 1 });
    assert.equal(out.error?.code, 'NO_WEBGPU', JSON.stringify(out));
  } finally {
    await context.close();
  }
});
