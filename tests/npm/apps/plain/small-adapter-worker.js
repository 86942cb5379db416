// An app-owned worker whose GPU adapter reports 8 KiB of workgroup memory (under what the model
// needs), for ADAPTER_LIMITS before any download.
import '/node_modules/dsocr/dist/worker.js';

const limits = Object.getOwnPropertyDescriptor(GPUAdapter.prototype, 'limits').get;
Object.defineProperty(GPUAdapter.prototype, 'limits', {
  get() {
    const real = limits.call(this);
    return new Proxy(real, { get: (target, key) => (key === 'maxComputeWorkgroupStorageSize' ? 8192 : Reflect.get(target, key)) });
  },
});
