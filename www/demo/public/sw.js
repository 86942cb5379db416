// The demo's service worker: keeps the page's own files (HTML, JS, CSS, wasm, workers) so that a
// second visit works offline. Network first (updates show at once), the cache when offline. The model
// weights are not kept here: the dsocr package stores them in the Origin Private File System.
const CACHE = 'dsocr-demo-v1';

self.addEventListener('install', () => self.skipWaiting());
self.addEventListener('activate', (event) => event.waitUntil(self.clients.claim()));

const mine = (url) => {
  const u = new URL(url);
  return u.protocol.startsWith('http') && u.origin === self.location.origin && !u.pathname.includes('/models/');
};

// The page sends what it loaded before this worker controlled it.
self.addEventListener('message', (event) => {
  const urls = (event.data?.precache ?? []).filter(mine);
  event.waitUntil(caches.open(CACHE).then((cache) => Promise.all(urls.map((url) => cache.add(url).catch(() => {})))));
});

self.addEventListener('fetch', (event) => {
  const { request } = event;
  if (request.method !== 'GET' || !mine(request.url) || request.headers.has('range')) return;
  event.respondWith((async () => {
    const cache = await caches.open(CACHE);
    try {
      const response = await fetch(request);
      if (response.ok) await cache.put(request, response.clone());
      return response;
    } catch (e) {
      const cached = await cache.match(request, { ignoreSearch: true });
      if (cached) return cached;
      throw e;
    }
  })());
});
