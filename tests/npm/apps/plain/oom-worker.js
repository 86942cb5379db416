// An app-owned worker whose GPU runs out of memory on request: once `{ oomAfterBytes: n }` more bytes
// of buffers are created, the device reports a GPUOutOfMemoryError as WebGPU does (an uncaptured
// error event, a task later), for OUT_OF_MEMORY.
import '/node_modules/dsocr/dist/worker.js';

let budget = Infinity;
let fired = false;
const createBuffer = GPUDevice.prototype.createBuffer;
GPUDevice.prototype.createBuffer = function (descriptor) {
  budget -= descriptor.size;
  if (budget < 0 && !fired) {
    fired = true;
    const error = new GPUOutOfMemoryError(`simulated: no memory for a ${descriptor.size}-byte buffer`);
    setTimeout(() => this.dispatchEvent(new GPUUncapturedErrorEvent('uncapturederror', { error })));
  }
  return createBuffer.call(this, descriptor);
};
self.addEventListener('message', (event) => {
  if (typeof event.data?.oomAfterBytes === 'number') [budget, fired] = [event.data.oomAfterBytes, false];
});
