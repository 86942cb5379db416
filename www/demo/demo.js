// The demo page: the dsocr npm package on WebGPU, marked + DOMPurify for markdown, pdf.js for PDFs.
import { Dsocr } from 'dsocr';
import { marked } from 'marked';
import DOMPurify from 'dompurify';
import pdfWorkerUrl from 'pdfjs-dist/build/pdf.worker.min.mjs?url';

const $ = (id) => document.getElementById(id);
const MODELS = {
  tiny: { url: new URL('./models/tiny-a', location.href).href, note: 'Random weights: it exercises the whole pipeline on your GPU, but its text is gibberish.' },
  hub: { url: 'https://huggingface.co/deepseek-ai/DeepSeek-OCR/resolve/main', quantize: 'q4', note: 'Reads the 6.7 GB checkpoint once and quantizes it to int4; this browser keeps only the int4 copy (about 2 GB). Until the int4 GPU kernels land the GPU holds it in f16: about 7 GB of GPU memory.' },
  hub2: { url: 'https://huggingface.co/deepseek-ai/DeepSeek-OCR-2/resolve/main', quantize: 'q4', modes: ['base', 'gundam'], note: 'DeepSeek-OCR-2 (reads pages in a learned order): 6.8 GB read once, kept as its int4 copy (about 2 GB). Its modes are Base and Gundam only.' },
  custom: { url: '', note: 'A folder with config.json, tokenizer.json and the weights (CORS and Range requests allowed).' },
};
const state = { engine: null, engineKey: null, input: null, controller: null, results: [] };
window.dsocrDemo = state; // for the page's tests and for curious visitors

const MB = (n) => (n / 1e6).toFixed(n < 1e7 ? 1 : 0);

function status(message, error = false) {
  const el = $('status');
  el.hidden = !message;
  el.textContent = message ?? '';
  el.classList.toggle('error', error);
}

/** What to tell the visitor for each error code. */
function explain(e) {
  if (e?.name === 'AbortError') return 'Stopped.';
  switch (e?.code) {
    case 'NO_WEBGPU': return `This browser gives no WebGPU adapter (${e.message}). Use a recent Chrome or Edge (Linux: enable WebGPU in chrome://flags), or Safari 26.`;
    case 'ADAPTER_LIMITS': return `Your GPU's limits are too small for this model: ${e.message}`;
    case 'QUOTA_EXCEEDED': return `Not enough storage: ${e.message}. Delete stored models below or free disk space.`;
    case 'DEVICE_LOST': return 'The GPU was reset (driver, or the tab was in the background). Load the model again.';
    case 'OUT_OF_MEMORY': return `The GPU ran out of memory: ${e.message}. Try a smaller mode or a quantized model.`;
    case 'NETWORK': return `Could not download the model: ${e.message}. Check the URL and that its server allows CORS.`;
    case 'BAD_CHECKPOINT': return `These are not weights this page can read: ${e.message}`;
    case 'BAD_IMAGE': return `That file is not an image we can read: ${e.message}`;
    default: return `Something went wrong: ${e?.message ?? e}`;
  }
}

function selectedModel() {
  const key = $('model').value;
  const model = { ...MODELS[key] };
  if (key === 'custom') model.url = $('weights-url').value.trim();
  return { key, ...model };
}

function showModel() {
  const model = selectedModel();
  const custom = model.key === 'custom';
  $('weights-url').hidden = $('weights-url-label').hidden = !custom;
  $('model-note').textContent = model.note;
  // DeepSeek-OCR-2 has no Tiny, Small or Large: those options are off while it is selected.
  for (const option of $('mode').options) option.disabled = Boolean(model.modes) && !model.modes.includes(option.value);
  if ($('mode').selectedOptions[0]?.disabled) $('mode').value = model.modes[0];
  let origin = '—';
  try { origin = new URL(model.url, location.href).origin; } catch {}
  $('weights-origin').textContent = origin === location.origin ? 'this site' : origin;
}

async function showCache() {
  const list = $('cache-list');
  list.replaceChildren();
  const models = await Dsocr.cachedModels().catch(() => []);
  if (models.length === 0) list.append(Object.assign(document.createElement('li'), { textContent: 'Nothing stored.' }));
  for (const m of models) {
    const li = document.createElement('li');
    li.textContent = `${m.url || '(unknown)'} — ${MB(m.bytes)} MB${m.complete ? '' : ' (partial)'} `;
    const del = Object.assign(document.createElement('button'), { type: 'button', textContent: 'Delete' });
    del.setAttribute('aria-label', `Delete ${m.url}`);
    del.onclick = async () => { await Dsocr.deleteCachedModel(m.url); showCache(); };
    li.append(del);
    list.append(li);
  }
}

async function load() {
  const model = selectedModel();
  if (!model.url) return status('Enter the weights URL first.', true);
  const support = await Dsocr.isSupported();
  if (!support.ok) return status(explain({ code: support.code, message: support.reason }), true);
  $('load').disabled = true;
  $('run').disabled = true;
  status(null);
  const bar = $('load-progress');
  bar.parentElement.hidden = false;
  try {
    await state.engine?.dispose();
    state.engine = null;
    state.phases = [];
    let downloading = false;
    state.engine = await Dsocr.load({
      weightsUrl: model.url,
      quantize: model.quantize,
      // Shaders compile during the load, so the first Run is as fast as the next.
      warmup: true,
      onProgress: (p) => {
        if (!state.phases.includes(p.phase)) state.phases.push(p.phase);
        if (p.warning) status(p.warning);
        // A cold load uploads shards while later ones download: the bar follows the download until it ends.
        if (p.phase === 'download') downloading = p.modelTotal === null || p.modelLoaded < p.modelTotal;
        if (p.phase === 'upload' && downloading) return;
        if (p.phase === 'compile') {
          $('load-label').textContent = 'Compiling the GPU shaders (once per load)…';
          return;
        }
        bar.value = p.modelTotal ? p.modelLoaded / p.modelTotal : 0;
        const eta = p.etaSeconds ? ` · ${Math.ceil(p.etaSeconds)} s left` : '';
        const rate = p.bytesPerSecond ? ` · ${MB(p.bytesPerSecond)} MB/s` : '';
        const what = { download: 'Downloading', verify: 'Checking', upload: 'To the GPU', compile: 'Compiling', ready: 'Ready' }[p.phase];
        $('load-label').textContent = p.phase === 'ready' ? `Ready (${MB(p.modelTotal)} MB${p.fromCache ? ', from this browser' : ''})` : `${what} ${p.file}: ${MB(p.modelLoaded)} of ${p.modelTotal ? MB(p.modelTotal) : '?'} MB${rate}${eta}`;
      },
    });
    state.engineKey = model.url;
    $('run').disabled = !state.input;
  } catch (e) {
    status(explain(e), true);
    bar.parentElement.hidden = true;
  } finally {
    $('load').disabled = false;
    showCache();
  }
}

function setInput(file) {
  if (!file) return;
  const pdf = file.type === 'application/pdf' || /\.pdf$/i.test(file.name ?? '');
  if (!pdf && !file.type.startsWith('image/')) return status(`${file.name}: not an image or a PDF.`, true);
  state.input = { file, pdf, name: file.name || (pdf ? 'document.pdf' : 'pasted image') };
  $('input-name').textContent = `${state.input.name} (${pdf ? 'PDF' : 'image'}, ${MB(file.size)} MB)`;
  $('run').disabled = !state.engine;
  status(null);
}

/** "1-3, 5" → [1, 2, 3, 5] within 1..count; empty → every page. */
function pageList(text, count) {
  if (!text.trim()) return Array.from({ length: count }, (_, i) => i + 1);
  const pages = new Set();
  for (const part of text.split(',')) {
    const [a, b] = part.split('-').map((s) => Number.parseInt(s, 10));
    for (let p = a; p <= (Number.isFinite(b) ? b : a); p++) if (p >= 1 && p <= count) pages.add(p);
  }
  return [...pages].sort((x, y) => x - y);
}

/** The pages to recognise: [{ label, source (what recognize takes), url (for the <img>) }]. */
async function pagesOf(input) {
  if (!input.pdf) return [{ label: input.name, source: input.file, url: URL.createObjectURL(input.file) }];
  // pdf.js only when a PDF comes (it is most of the page's JavaScript).
  const pdfjs = await import('pdfjs-dist');
  pdfjs.GlobalWorkerOptions.workerSrc = pdfWorkerUrl;
  const loading = pdfjs.getDocument({ data: new Uint8Array(await input.file.arrayBuffer()), isEvalSupported: false });
  const pdf = await loading.promise;
  const pages = [];
  for (const n of pageList($('pages').value, pdf.numPages)) {
    const page = await pdf.getPage(n);
    const viewport = page.getViewport({ scale: 2 }); // 144 dpi, as the CLI renders PDFs
    const canvas = document.createElement('canvas');
    [canvas.width, canvas.height] = [Math.ceil(viewport.width), Math.ceil(viewport.height)];
    await page.render({ canvas, canvasContext: canvas.getContext('2d'), viewport }).promise;
    const blob = await new Promise((resolve) => canvas.toBlob(resolve, 'image/png'));
    pages.push({ label: `${input.name}, page ${n}`, source: blob, url: URL.createObjectURL(blob), page: n });
  }
  await loading.destroy();
  return pages;
}

async function run() {
  if (!state.engine || !state.input) return;
  const task = $('task').value === 'locate' ? `locate=${$('locate').value}` : $('task').value;
  const options = { task, mode: $('mode').value, maxNewTokens: Number($('max-tokens').value) || 2048 };
  state.controller = new AbortController();
  $('run').disabled = true;
  $('stop').disabled = false;
  $('results').replaceChildren();
  state.results = [];
  status(null);
  try {
    for (const page of await pagesOf(state.input)) {
      const view = resultView(page);
      let streamed = '';
      const started = performance.now();
      const result = await state.engine.recognize(page.source, {
        ...options,
        signal: state.controller.signal,
        onToken: (t) => {
          streamed += t.text;
          view.text.textContent = streamed;
          $('stats').textContent = `${page.label}: ${t.index + 1} tokens, ${((t.index + 1) / ((performance.now() - started) / 1000)).toFixed(1)} tokens/s`;
        },
      });
      state.results.push({ page: page.page ?? null, label: page.label, result });
      showResult(view, page, result);
      const t = result.timings_ms;
      $('stats').textContent = `${page.label}: ${result.token_ids.length} tokens, ${(result.token_ids.length / Math.max(t.decode / 1000, 1e-3)).toFixed(1)} tokens/s; encode ${t.encode.toFixed(0)} ms, prefill ${t.prefill.toFixed(0)} ms, decode ${t.decode.toFixed(0)} ms`;
    }
  } catch (e) {
    status(explain(e), e?.name !== 'AbortError');
  } finally {
    $('run').disabled = false;
    $('stop').disabled = true;
  }
}

function resultView(page) {
  const node = $('result-template').content.firstElementChild.cloneNode(true);
  node.querySelector('h3').textContent = page.label;
  const img = node.querySelector('img');
  img.src = page.url;
  img.alt = page.label;
  const view = { node, img, canvas: node.querySelector('canvas'), markdown: node.querySelector('.pane.markdown'), text: node.querySelector('.pane.text'), json: node.querySelector('.pane.json') };
  for (const tab of node.querySelectorAll('[role=tab]')) {
    tab.onclick = () => {
      for (const t of node.querySelectorAll('[role=tab]')) t.setAttribute('aria-selected', String(t === tab));
      for (const pane of node.querySelectorAll('.pane')) pane.hidden = !pane.classList.contains(tab.dataset.pane);
    };
  }
  $('results').append(node);
  return view;
}

const safe = (markdown) => DOMPurify.sanitize(marked.parse(markdown, { async: false }));

function showResult(view, page, result) {
  view.text.textContent = result.text;
  view.json.textContent = JSON.stringify(result, null, 2);
  view.markdown.replaceChildren();
  if (result.blocks.length > 0) {
    result.blocks.forEach((block, i) => {
      const div = document.createElement('div');
      div.className = 'block';
      div.dataset.index = String(i);
      div.innerHTML = safe(block.text || `*${block.label}*`);
      div.onmouseenter = () => highlight(view, result, i);
      div.onmouseleave = () => highlight(view, result, -1);
      view.markdown.append(div);
    });
  } else {
    view.markdown.innerHTML = safe(result.markdown);
  }
  const draw = () => highlight(view, result, -1);
  if (view.img.complete) draw();
  else view.img.onload = draw;
  view.canvas.onmousemove = (event) => {
    const r = view.canvas.getBoundingClientRect();
    const [x, y] = [((event.clientX - r.left) / r.width) * result.image_size[0], ((event.clientY - r.top) / r.height) * result.image_size[1]];
    const hit = result.blocks.findIndex((b) => b.boxes.some(([x1, y1, x2, y2]) => x >= x1 && x <= x2 && y >= y1 && y <= y2));
    highlight(view, result, hit);
  };
  view.canvas.onmouseleave = () => highlight(view, result, -1);
  const name = page.label.replace(/[^\w.-]+/g, '_');
  const actions = view.node.querySelector('.actions');
  actions.querySelector('[data-action=copy]').onclick = () => navigator.clipboard.writeText(result.markdown);
  actions.querySelector('[data-action=md]').onclick = () => save(`${name}.md`, result.markdown, 'text/markdown');
  actions.querySelector('[data-action=json]').onclick = () => save(`${name}.json`, JSON.stringify(result, null, 2), 'application/json');
}

/** Draws every block's boxes over the image, `active` highlighted (and its text block). */
function highlight(view, result, active) {
  const { canvas } = view;
  [canvas.width, canvas.height] = result.image_size;
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const line = Math.max(2, canvas.width / 300);
  ctx.font = `${Math.max(12, canvas.width / 60)}px system-ui, sans-serif`;
  result.blocks.forEach((block, i) => {
    const on = i === active;
    for (const [x1, y1, x2, y2] of block.boxes) {
      ctx.fillStyle = on ? 'rgba(245, 158, 11, 0.30)' : 'rgba(37, 99, 235, 0.12)';
      ctx.fillRect(x1, y1, x2 - x1, y2 - y1);
      ctx.lineWidth = line;
      ctx.strokeStyle = on ? 'rgb(245, 158, 11)' : 'rgb(37, 99, 235)';
      ctx.strokeRect(x1, y1, x2 - x1, y2 - y1);
      ctx.fillStyle = ctx.strokeStyle;
      ctx.fillText(block.label, x1 + line, Math.max(y1 - line, 12));
    }
  });
  for (const div of view.markdown.querySelectorAll('.block')) div.classList.toggle('hover', Number(div.dataset.index) === active);
}

function save(name, text, type) {
  const a = Object.assign(document.createElement('a'), { href: URL.createObjectURL(new Blob([text], { type })), download: name });
  a.click();
  setTimeout(() => URL.revokeObjectURL(a.href), 1000);
}

// The renderer on its own: shows `result` for the image at `url` (the page's tests use it).
state.render = (label, url, result) => showResult(resultView({ label, url }), { label, url }, result);
state.pages = () => pagesOf(state.input);

// Wiring.
const params = new URLSearchParams(location.search);
if (params.get('weights')) {
  $('model').value = 'custom';
  $('weights-url').value = params.get('weights');
}
$('model').onchange = showModel;
$('weights-url').oninput = showModel;
$('load').onclick = load;
$('run').onclick = run;
$('stop').onclick = () => state.controller?.abort();
$('task').onchange = () => { $('locate').hidden = $('locate-label').hidden = $('task').value !== 'locate'; };
$('file').onchange = (e) => setInput(e.target.files[0]);
$('camera').onchange = (e) => setInput(e.target.files[0]);
$('example').onclick = async () => setInput(new File([await (await fetch(new URL('./example.png', location.href))).blob()], 'example.png', { type: 'image/png' }));
const drop = $('drop');
drop.ondragover = (e) => { e.preventDefault(); drop.classList.add('over'); };
drop.ondragleave = () => drop.classList.remove('over');
drop.ondrop = (e) => { e.preventDefault(); drop.classList.remove('over'); setInput(e.dataTransfer.files[0]); };
drop.onkeydown = (e) => { if (e.key === 'Enter' || e.key === ' ') { e.preventDefault(); $('file').click(); } };
document.addEventListener('paste', (e) => {
  const file = [...(e.clipboardData?.files ?? [])][0];
  if (file) setInput(file);
});
showModel();
showCache();
Dsocr.isSupported().then((s) => { if (!s.ok) status(explain({ code: s.code, message: s.reason }), true); });

// Offline: the service worker keeps this page's files; it is told what loaded before it took over.
if ('serviceWorker' in navigator) {
  navigator.serviceWorker.register('./sw.js').then(async () => {
    await navigator.serviceWorker.ready;
    const urls = [location.href, ...performance.getEntriesByType('resource').map((r) => r.name)];
    navigator.serviceWorker.controller?.postMessage({ precache: urls }) ?? (await navigator.serviceWorker.ready).active?.postMessage({ precache: urls });
  }).catch(() => {});
}
