// The demo builds to static files in dist/ (any static host serves it). The bundled test model
// (tests/fixtures/tiny-a: random weights, it reads nothing) is copied to dist/models/tiny-a so the
// page works with no other server; `?weights=URL` points it at real weights.
import fs from 'node:fs';
import path from 'node:path';

const here = import.meta.dirname;
const tiny = path.resolve(here, '..', '..', 'tests', 'fixtures', 'tiny-a');
const FILES = ['config.json', 'model.safetensors', 'tokenizer.json'];
// The example page image: the fixtures' sample page.
const example = path.resolve(here, '..', '..', 'tests', 'fixtures', 'images', 'page.png');

const bundledModel = {
  name: 'dsocr-bundled-test-model',
  configureServer(server) {
    server.middlewares.use('/example.png', (req, res) => {
      res.setHeader('content-type', 'image/png');
      res.end(fs.readFileSync(example));
    });
    server.middlewares.use('/models/tiny-a/', (req, res, next) => {
      const name = req.url.split('?')[0].replace(/^\//, '');
      if (!FILES.includes(name)) return next();
      const body = fs.readFileSync(path.join(tiny, name));
      res.setHeader('content-length', body.length);
      res.end(body);
    });
  },
  closeBundle() {
    const out = path.join(here, 'dist', 'models', 'tiny-a');
    fs.mkdirSync(out, { recursive: true });
    for (const name of FILES) fs.copyFileSync(fs.realpathSync(path.join(tiny, name)), path.join(out, name));
    fs.copyFileSync(example, path.join(here, 'dist', 'example.png'));
  },
};

export default {
  root: here,
  base: './',
  logLevel: 'warn',
  plugins: [bundledModel],
  build: { outDir: 'dist', emptyOutDir: true, target: 'es2022' },
  worker: { format: 'es' },
};
