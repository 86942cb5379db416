// An app-owned worker: the package's worker entry, plus a test hook that throws an uncaught error
// (as a crash would) when the page asks.
import '/node_modules/dsocr/dist/worker.js';

self.addEventListener('message', (event) => {
  if (event.data?.crashAfterMs !== undefined) setTimeout(() => { throw new Error('simulated crash'); }, event.data.crashAfterMs);
});
