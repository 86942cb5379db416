// Shared by the package's browser tests: the packed package installed here, headless Chromium,
// the reference tokens, progress checks.
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import fs from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { fileURLToPath } from 'node:url';
import { chromium } from 'playwright-core';

export const here = path.dirname(fileURLToPath(import.meta.url));
export const root = path.resolve(here, '..', '..');
export const fixtures = path.join(root, 'tests', 'fixtures');
export const tmp = fs.mkdtempSync(path.join(os.tmpdir(), 'dsocr-npm-'));

export function reference(image, mode = 'tiny') {
  const index = JSON.parse(fs.readFileSync(path.join(fixtures, 'tiny-a', 'cases', 'index.json')));
  return index.cases.find((c) => c.image === image && c.mode === mode).greedy_tokens;
}

/** The package as users get it: `npm pack` of www/, installed here from the tarball. */
export function installPackage() {
  const packed = JSON.parse(execFileSync('npm', ['pack', '--json', '--pack-destination', tmp], { cwd: path.join(root, 'www') }))[0];
  console.log(`# packed ${packed.filename}: ${(packed.size / 1e6).toFixed(2)} MB, unpacked ${(packed.unpackedSize / 1e6).toFixed(2)} MB, ${packed.entryCount} files`);
  execFileSync('npm', ['install', '--no-save', '--no-audit', '--no-fund', path.join(tmp, packed.filename)], { cwd: here, stdio: 'inherit' });
}

export function launch() {
  const args = ['--headless', '--no-sandbox', '--no-first-run', '--disable-background-networking', '--disable-component-update', '--disable-sync', '--disable-quic', '--enable-unsafe-webgpu'];
  return chromium.launch({ executablePath: '/usr/bin/chromium', headless: true, args });
}

/** A page of `browser` (or of `context`) at `url`, once the app has exposed the package. */
export async function open(target, url) {
  const page = await target.newPage();
  page.on('console', (m) => process.env.DSOCR_BROWSER_LOG && console.log('[page]', m.text()));
  page.on('pageerror', (e) => console.log('[page error]', e.message));
  await page.goto(url);
  await page.waitForFunction(() => window.dsocrApp, null, { timeout: 60_000 });
  return page;
}

/** Progress: within each phase the model's bytes never go back; the last event is `ready` at the total. */
export function checkProgress(progress) {
  const last = progress.at(-1);
  assert.equal(last.phase, 'ready');
  assert.ok(last.modelTotal > 0 && last.modelLoaded === last.modelTotal, JSON.stringify(last));
  const previous = {};
  for (const p of progress) {
    assert.ok(p.modelLoaded >= (previous[p.phase] ?? 0), `${p.phase}: the model's progress never goes back`);
    previous[p.phase] = p.modelLoaded;
    if (p.total !== null) assert.ok(p.loaded <= p.total, JSON.stringify(p));
  }
  for (const phase of new Set(progress.map((p) => p.phase).filter((p) => p !== 'ready' && p !== 'verify'))) {
    const inPhase = progress.filter((p) => p.phase === phase);
    const end = inPhase.at(-1);
    assert.equal(end.modelLoaded, end.modelTotal, `${phase} reaches its total`);
  }
}
