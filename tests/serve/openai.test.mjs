// `dsocr serve` called by OpenAI's official Node client: chat completions with an image (a data URL),
// plain and streamed, behind an API key, on 127.0.0.1 with the tiny test checkpoint. The answer must
// equal what `POST /v1/ocr` gives for the same prompt (the reference's greedy tokens; see
// crate/tests/e2e_serve.rs). Needs target/release/dsocr built with the `serve` feature.
import { test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { mkdtempSync, readFileSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join, dirname } from 'node:path';
import { fileURLToPath } from 'node:url';
import OpenAI from 'openai';

const root = join(dirname(fileURLToPath(import.meta.url)), '..', '..');
const binary = join(root, 'target', 'release', 'dsocr');
const page = readFileSync(join(root, 'tests', 'fixtures', 'images', 'page.png'));
const key = 'test-key-for-openai-client';
let server;
let base;

before(async () => {
  const dir = mkdtempSync(join(tmpdir(), 'dsocr-serve-'));
  writeFileSync(join(dir, 'key'), key);
  server = spawn(binary, ['serve', '--model', join(root, 'tests', 'fixtures', 'tiny-a'), '--port', '0', '--mode', 'tiny',
    '--api-key-file', join(dir, 'key')], { stdio: ['ignore', 'ignore', 'pipe'] });
  base = await new Promise((resolve, reject) => {
    const timer = setTimeout(() => reject(new Error('no address printed within 60 s')), 60_000);
    let seen = '';
    server.stderr.on('data', (chunk) => {
      seen += chunk;
      const match = seen.match(/listening on (http:\/\/\S+)/);
      if (match) { clearTimeout(timer); resolve(match[1]); }
    });
    server.on('exit', (code) => reject(new Error(`dsocr serve exited (${code}): ${seen}`)));
  });
  for (let i = 0; i < 600; i++) {
    if ((await fetch(`${base}/readyz`)).ok) return;
    await new Promise((r) => setTimeout(r, 100));
  }
  throw new Error('the model did not load within 60 s');
});

after(() => server?.kill('SIGTERM'));

const prompt = '<|grounding|>Convert the document to markdown.';
const messages = [{ role: 'user', content: [
  { type: 'image_url', image_url: { url: `data:image/png;base64,${page.toString('base64')}` } },
  { type: 'text', text: prompt },
] }];
// dsocr's own options travel as extra body fields, as vLLM's do.
const extra = { mode: 'tiny', repeat_guard: 'hf' };

async function ocrText() {
  const response = await fetch(`${base}/v1/ocr?mode=tiny&max_new_tokens=16&repeat_guard=hf&task=markdown`, {
    method: 'POST', body: page, headers: { 'Content-Type': 'image/png', Authorization: `Bearer ${key}` },
  });
  assert.equal(response.status, 200);
  return (await response.json()).results[0].text;
}

test('chat completion with an image equals /v1/ocr', async () => {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key });
  const models = await client.models.list();
  assert.equal(models.data.length, 1);
  const completion = await client.chat.completions.create({ model: models.data[0].id, messages, max_tokens: 16, ...extra });
  assert.equal(completion.object, 'chat.completion');
  assert.equal(completion.choices[0].message.role, 'assistant');
  assert.equal(completion.choices[0].message.content, await ocrText());
  assert.equal(completion.choices[0].finish_reason, 'length');
  assert.equal(completion.usage.completion_tokens, 16);
});

test('streamed chat completion adds up to the same text', async () => {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: key });
  const stream = await client.chat.completions.create({
    model: 'any-name', messages, max_tokens: 16, stream: true, stream_options: { include_usage: true }, ...extra,
  });
  let text = '';
  let finish = null;
  let usage = null;
  for await (const chunk of stream) {
    for (const choice of chunk.choices) {
      text += choice.delta?.content ?? '';
      finish = choice.finish_reason ?? finish;
    }
    usage = chunk.usage ?? usage;
  }
  assert.equal(text, await ocrText());
  assert.equal(finish, 'length');
  assert.equal(usage.completion_tokens, 16);
});

test('a wrong key is refused with the OpenAI error shape', async () => {
  const client = new OpenAI({ baseURL: `${base}/v1`, apiKey: 'wrong', maxRetries: 0 });
  await assert.rejects(client.chat.completions.create({ model: 'm', messages, max_tokens: 4, ...extra }), (error) => {
    assert.equal(error.status, 401);
    assert.equal(error.code, 'unauthorized');
    return true;
  });
});
