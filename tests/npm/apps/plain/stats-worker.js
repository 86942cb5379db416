// An app-owned worker: the package's worker entry, plus a test hook that reports what the engine
// holds — live GPU buffers (counted by wrapping createBuffer/destroy) and the wasm memory's size.
import '/node_modules/dsocr/dist/worker.js';
import init from '/node_modules/dsocr/dist/wasm/dsocr.js';

const live = new Map();
const createBuffer = GPUDevice.prototype.createBuffer;
GPUDevice.prototype.createBuffer = function (descriptor) {
  const buffer = createBuffer.call(this, descriptor);
  live.set(buffer, descriptor.size);
  return buffer;
};
const destroy = GPUBuffer.prototype.destroy;
GPUBuffer.prototype.destroy = function () {
  live.delete(this);
  return destroy.call(this);
};

self.addEventListener('message', async (event) => {
  if (!event.data?.stats) return;
  // init() after the engine's own returns the same instance: its memory is the engine's.
  const wasm = await init();
  let gpuBytes = 0;
  for (const size of live.values()) gpuBytes += size;
  self.postMessage({ stats: { gpuBuffers: live.size, gpuBytes, wasmBytes: wasm.memory.buffer.byteLength } });
});
