// A static server for the sample apps and the checkpoint fixtures: HTTP Range, CORS (the apps on
// Vite's dev server load weights from this other origin), the MIME types the package needs.
import http from 'node:http';
import fs from 'node:fs';
import path from 'node:path';

const types = {
  '.js': 'text/javascript', '.mjs': 'text/javascript', '.wasm': 'application/wasm', '.json': 'application/json',
  '.png': 'image/png', '.html': 'text/html', '.css': 'text/css', '.map': 'application/json',
};

/**
 * `routes`: URL prefix → folder (the longest prefix wins); `/` → `index.html`. Logs every request in
 * `log`. `fault(path, request)` may return one fault for a response: `{ status }`, `{ dropAfter: n }`
 * (the connection is cut after n body bytes), `{ stallAfter: n }` (n bytes, then silence), or
 * `{ corruptAt: i }` (the body's i-th byte flipped), `{ delayMs: n }` (the body after n ms).
 */
export async function serve(routes, log = [], fault = () => null) {
  const prefixes = Object.keys(routes).sort((a, b) => b.length - a.length);
  const server = http.createServer((req, res) => {
    const url = new URL(req.url, 'http://127.0.0.1');
    log.push({ path: url.pathname, range: req.headers.range ?? null, origin: req.headers.origin ?? null });
    res.setHeader('access-control-allow-origin', '*');
    res.setHeader('access-control-allow-headers', 'range');
    res.setHeader('access-control-expose-headers', 'content-length, content-range, accept-ranges');
    if (req.method === 'OPTIONS') {
      res.writeHead(204);
      return res.end();
    }
    const f = fault(url.pathname, req);
    if (f?.status) {
      res.writeHead(f.status);
      return res.end();
    }
    const prefix = prefixes.find((p) => url.pathname.startsWith(p));
    let file = prefix && path.join(routes[prefix], decodeURIComponent(url.pathname.slice(prefix.length)));
    if (file && fs.existsSync(file) && fs.statSync(file).isDirectory()) file = path.join(file, 'index.html');
    if (!file || !file.startsWith(routes[prefix]) || !fs.existsSync(file)) {
      res.writeHead(404);
      return res.end();
    }
    const body = fs.readFileSync(file);
    const type = types[path.extname(file)] ?? 'application/octet-stream';
    const send = (status, headers, bytes) => {
      res.writeHead(status, { 'content-type': type, 'content-length': bytes.length, 'accept-ranges': 'bytes', ...headers });
      if (f?.corruptAt !== undefined && f.corruptAt < bytes.length) {
        bytes = Buffer.from(bytes);
        bytes[f.corruptAt] ^= 0xff;
      }
      if (f?.dropAfter !== undefined) return res.write(bytes.subarray(0, f.dropAfter), () => setTimeout(() => res.destroy(), 50));
      if (f?.stallAfter !== undefined) return res.write(bytes.subarray(0, f.stallAfter)); // and nothing more
      if (f?.delayMs !== undefined) return setTimeout(() => res.end(bytes), f.delayMs);
      res.end(bytes);
    };
    const range = /^bytes=(\d+)-(\d*)$/.exec(req.headers.range ?? '');
    if (range) {
      const start = Number(range[1]);
      const end = range[2] === '' ? body.length - 1 : Math.min(Number(range[2]), body.length - 1);
      if (start > end) {
        res.writeHead(416, { 'content-range': `bytes */${body.length}` });
        return res.end();
      }
      return send(206, { 'content-range': `bytes ${start}-${end}/${body.length}` }, body.subarray(start, end + 1));
    }
    send(200, {}, body);
  });
  const sockets = new Set();
  server.on('connection', (s) => (sockets.add(s), s.on('close', () => sockets.delete(s))));
  // Stops the server and cuts every connection (stalled ones too).
  server.stop = () => new Promise((resolve) => { for (const s of sockets) s.destroy(); server.close(resolve); });
  await new Promise((resolve) => server.listen(0, '127.0.0.1', resolve));
  return { server, base: `http://127.0.0.1:${server.address().port}`, log };
}
