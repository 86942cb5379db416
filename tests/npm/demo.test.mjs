// The demo page (www/demo, built to static files) in headless Chromium on WebGPU (SwiftShader) with
// the bundled tiny checkpoint: load with progress, the example image's reference tokens, layout boxes
// drawn where the blocks say, a 2-page PDF, paste and drop, Stop, no WebGPU, no request outside the
// page's origin, a second visit offline. Screenshots go to tests/npm/screenshots/.
// Needs: www/demo/dist (cd www/demo && npm ci && npm run build).
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import fs from 'node:fs';
import path from 'node:path';
import { PNG } from 'pngjs';
import { serve } from './server.mjs';
import { fixtures, here, launch, reference, root } from './helpers.mjs';

const dist = path.join(root, 'www', 'demo', 'dist');
const shots = path.join(here, 'screenshots');
let site;
let browser;
let context;
let page;
const requests = [];

before(async () => {
  assert.ok(fs.existsSync(path.join(dist, 'index.html')), 'build the demo first: cd www/demo && npm ci && npm run build');
  fs.mkdirSync(shots, { recursive: true });
  site = await serve({ '/': dist, '/fixtures/': path.join(fixtures, 'images') });
  browser = await launch();
  context = await browser.newContext({ viewport: { width: 1280, height: 900 } });
  context.on('request', (r) => requests.push(r.url()));
  page = await context.newPage();
  page.on('pageerror', (e) => console.log('[page error]', e.message));
  await page.goto(`${site.base}/`);
});

after(async () => {
  await browser?.close();
  site?.server.close();
});

const shot = (name) => page.screenshot({ path: path.join(shots, `${name}.png`), fullPage: true });
const text = (id) => page.locator(`#${id}`).textContent();

test('load shows progress and ends ready; the example page gives the reference tokens, streamed', { timeout: 10 * 60_000 }, async () => {
  assert.match(await text('privacy'), /never leave this page/);
  assert.equal(await text('weights-origin'), 'this site');
  await page.click('#load');
  await page.waitForFunction(() => document.getElementById('load-label').textContent.startsWith('Ready'), null, { timeout: 120_000 });
  const labels = await page.evaluate(() => document.getElementById('load-label').textContent);
  assert.match(labels, /^Ready \(\d+(\.\d)? MB\)$/, 'a cold load: not from the cache');
  assert.deepEqual(await page.evaluate(() => window.dsocrDemo.phases), ['download', 'upload', 'compile', 'ready']);
  await page.click('#example');
  await page.fill('#max-tokens', '4');
  await page.click('#run');
  await page.waitForFunction(() => window.dsocrDemo.results.length === 1, null, { timeout: 300_000 });
  const ids = await page.evaluate(() => window.dsocrDemo.results[0].result.token_ids);
  assert.deepEqual(ids, reference('page').slice(0, 4));
  assert.match(await text('stats'), /4 tokens, [\d.]+ tokens\/s; encode \d+ ms/);
  assert.ok((await page.locator('.result .pane.text').textContent()).length > 0, 'the text pane shows the output');
  await shot('1-example-page');
});

test('layout boxes are drawn over the image where the blocks say; hovering a box highlights its block', { timeout: 5 * 60_000 }, async () => {
  // The renderer with a result as the crate parses the grounding of a known page (tests/tests/output.rs).
  const size = [1000, 1294];
  const box = ([x1, y1, x2, y2]) => [x1, y1, x2, y2].map((v, i) => Math.trunc((v / 999) * size[i % 2]));
  const blocks = [
    { label: 'title', boxes: [box([90, 47, 512, 80])], text: '# Quarterly Report 2026' },
    { label: 'text', boxes: [box([90, 107, 905, 260])], text: 'Revenue grew by 12% while costs fell.' },
    { label: 'table', boxes: [box([75, 683, 920, 800])], text: '<table><tr><td>Item</td><td>Qty</td></tr></table>' },
  ].map((b) => ({ ...b, boxes_normalized: [] }));
  const result = { text: '', markdown: blocks.map((b) => b.text).join('\n\n'), blocks, token_ids: [], image_token_count: 0, prompt_token_count: 0, finish_reason: 'stop', ended_without_eos: false, image_size: size, tile_grid: [1, 1], timings_ms: { preprocess: 0, encode: 0, prefill: 0, decode: 0, total: 0 } };
  await page.evaluate(async (result) => {
    document.getElementById('results').replaceChildren();
    const canvas = new OffscreenCanvas(result.image_size[0], result.image_size[1]);
    const ctx = canvas.getContext('2d');
    ctx.fillStyle = 'white';
    ctx.fillRect(0, 0, canvas.width, canvas.height);
    const url = URL.createObjectURL(await canvas.convertToBlob());
    window.dsocrDemo.render('known page', url, result);
    await new Promise((r) => setTimeout(r, 300));
  }, result);
  const canvas = page.locator('.result canvas');
  const png = PNG.sync.read(await canvas.screenshot());
  png.pixel = (x, y) => [...png.data.subarray((y * png.width + x) * 4, (y * png.width + x) * 4 + 3)];
  const scale = png.width / size[0];
  // On each box's left edge: the stroke colour (blue); in the middle of the page's empty band: white.
  for (const b of blocks) {
    const [x1, y1, , y2] = b.boxes[0];
    const [r, g, bl] = png.pixel(Math.round(x1 * scale), Math.round(((y1 + y2) / 2) * scale));
    assert.ok(bl > 200 && r < 150, `${b.label}: box edge at (${x1}, ${(y1 + y2) / 2}) is blue, got ${[r, g, bl]}`);
  }
  const [r, g, bl] = png.pixel(Math.round(500 * scale), Math.round(450 * scale));
  assert.ok(r > 240 && g > 240 && bl > 240, `no box at (500, 450): white, got ${[r, g, bl]}`);
  // Hover the text box: its block in the markdown pane is highlighted.
  const bbox = await canvas.boundingBox();
  const [x1, y1, x2, y2] = blocks[1].boxes[0];
  await page.mouse.move(bbox.x + ((x1 + x2) / 2) * (bbox.width / size[0]), bbox.y + ((y1 + y2) / 2) * (bbox.height / size[1]));
  assert.equal(await page.locator('.block.hover').getAttribute('data-index'), '1');
  assert.match(await page.locator('.pane.markdown').innerHTML(), /<h1[^>]*>Quarterly Report 2026<\/h1>/);
  await shot('2-boxes');
});

test('a 2-page PDF gives two results; paste and drop set the input; Stop stops', { timeout: 10 * 60_000 }, async () => {
  await page.setInputFiles('#file', path.join(fixtures, 'images', 'doc.pdf'));
  assert.match(await text('input-name'), /doc\.pdf \(PDF/);
  await page.fill('#max-tokens', '1');
  await page.click('#run');
  await page.waitForFunction(() => window.dsocrDemo.results.length === 2 && !document.getElementById('run').disabled, null, { timeout: 300_000 });
  assert.deepEqual(await page.evaluate(() => window.dsocrDemo.results.map((r) => [r.page, r.result.token_ids.length])), [[1, 1], [2, 1]]);
  assert.equal(await page.locator('.result').count(), 2);
  await shot('3-pdf');
  // Paste, then drop (as the browser delivers them: events carrying a File).
  for (const kind of ['paste', 'drop']) {
    await page.evaluate(async (kind) => {
      const blob = await (await fetch('/fixtures/note.png')).blob();
      const data = new DataTransfer();
      data.items.add(new File([blob], `${kind}.png`, { type: 'image/png' }));
      const target = kind === 'paste' ? document : document.getElementById('drop');
      target.dispatchEvent(kind === 'paste' ? new ClipboardEvent('paste', { clipboardData: data }) : new DragEvent('drop', { dataTransfer: data, bubbles: true, cancelable: true }));
    }, kind);
    assert.match(await text('input-name'), new RegExp(`^${kind}\\.png \\(image`));
  }
  // Stop after the first token.
  await page.fill('#max-tokens', '500');
  await page.click('#run');
  await page.waitForFunction(() => /\d+ tokens/.test(document.getElementById('stats').textContent) && !document.getElementById('stop').disabled, null, { timeout: 300_000 });
  await page.click('#stop');
  await page.waitForFunction(() => document.getElementById('status').textContent === 'Stopped.', null, { timeout: 60_000 });
  assert.equal(await page.locator('#run').isDisabled(), false);
});

test('the page requested nothing outside its own origin; a second visit works offline', { timeout: 10 * 60_000 }, async () => {
  const foreign = requests.filter((u) => !u.startsWith(site.base) && !u.startsWith('blob:') && !u.startsWith('data:'));
  assert.deepEqual(foreign, []);
  await context.setOffline(true);
  const second = await context.newPage();
  try {
    await second.goto(`${site.base}/`);
    await second.click('#load');
    await second.waitForFunction(() => /^Ready .*from this browser/.test(document.getElementById('load-label').textContent) || !document.getElementById('status').hidden, null, { timeout: 120_000 });
    assert.match(await second.locator('#load-label').textContent(), /^Ready .*from this browser/, await second.locator('#status').textContent());
    await second.screenshot({ path: path.join(shots, '4-offline.png'), fullPage: true });
  } finally {
    await context.setOffline(false);
    await second.close();
  }
});

test('without WebGPU the page says so and stays usable', { timeout: 5 * 60_000 }, async () => {
  const args = ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking'];
  const { chromium } = await import('playwright-core');
  const plain = await chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args });
  try {
    const p = await plain.newPage();
    await p.goto(`${site.base}/`);
    await p.waitForFunction(() => !document.getElementById('status').hidden, null, { timeout: 60_000 });
    assert.match(await p.locator('#status').textContent(), /WebGPU/);
    await p.setInputFiles('#file', path.join(fixtures, 'images', 'note.png'));
    assert.match(await p.locator('#input-name').textContent(), /note\.png/);
    await p.screenshot({ path: path.join(shots, '5-no-webgpu.png'), fullPage: true });
  } finally {
    await plain.close();
  }
});
