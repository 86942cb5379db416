// Throughput of a running `dsocr serve` at several numbers of concurrent clients:
//   node tests/serve/bench.mjs http://127.0.0.1:8080 tests/fixtures/images/page.png [clients=1,4,8] [requests=8] [query]
// Each level sends `requests` POST /v1/ocr requests from that many clients at once and prints
// requests/s, generated tokens/s and the median and slowest latency, and the ratio to the first level.
import { readFileSync } from 'node:fs';

const [base, image, clientsArg = '1,4,8', requestsArg = '8', query = 'mode=tiny&max_new_tokens=32&repeat_guard=off'] = process.argv.slice(2);
if (!base || !image) {
  console.error('usage: node bench.mjs BASE_URL IMAGE [clients=1,4,8] [requests=8] [query]');
  process.exit(2);
}
const body = readFileSync(image);
const total = Number(requestsArg);

async function one() {
  const started = performance.now();
  const response = await fetch(`${base}/v1/ocr?${query}`, { method: 'POST', body, headers: { 'Content-Type': 'application/octet-stream' } });
  const json = await response.json();
  if (response.status !== 200) throw new Error(`status ${response.status}: ${JSON.stringify(json)}`);
  return { ms: performance.now() - started, tokens: json.results.reduce((n, r) => n + r.token_ids.length, 0) };
}

let first = null;
for (const clients of clientsArg.split(',').map(Number)) {
  let next = 0;
  const done = [];
  const started = performance.now();
  await Promise.all(Array.from({ length: clients }, async () => {
    while (next < total) {
      next += 1;
      done.push(await one());
    }
  }));
  const seconds = (performance.now() - started) / 1000;
  const latencies = done.map((d) => d.ms).sort((a, b) => a - b);
  const rps = done.length / seconds;
  const tps = done.reduce((n, d) => n + d.tokens, 0) / seconds;
  first ??= { rps, tps };
  console.log(`${clients} clients: ${done.length} requests in ${seconds.toFixed(1)} s, ${rps.toFixed(3)} requests/s `
    + `(${(rps / first.rps).toFixed(2)}x), ${tps.toFixed(1)} tokens/s (${(tps / first.tps).toFixed(2)}x), `
    + `latency median ${(latencies[latencies.length >> 1] / 1000).toFixed(2)} s, max ${(latencies.at(-1) / 1000).toFixed(2)} s`);
}
