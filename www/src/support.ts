// Whether this browser can run the engine, asked of WebGPU without loading anything: what
// `Dsocr.isSupported` reports, and what `load` checks before it downloads a byte.
import type { Support } from './types.js';

/** WebGPU with an adapter whose limits the model's kernels fit in. Never throws. */
export async function checkSupport(): Promise<Support> {
  const gpu = (globalThis.navigator as Navigator & { gpu?: GPU } | undefined)?.gpu;
  if (!gpu) return { ok: false, code: 'NO_WEBGPU', reason: 'this browser has no WebGPU (navigator.gpu is missing)' };
  let adapter: GPUAdapter | null = null;
  try {
    adapter = await gpu.requestAdapter();
  } catch (e) {
    return { ok: false, code: 'NO_WEBGPU', reason: `requestAdapter failed: ${(e as Error)?.message ?? e}` };
  }
  if (!adapter) return { ok: false, code: 'NO_WEBGPU', reason: 'WebGPU is present but gives no adapter (blocklisted GPU, or disabled)' };
  const info = adapter.info ?? ({} as GPUAdapterInfo);
  const limits = {
    maxStorageBufferBindingSize: adapter.limits.maxStorageBufferBindingSize,
    maxBufferSize: adapter.limits.maxBufferSize,
    maxComputeWorkgroupStorageSize: adapter.limits.maxComputeWorkgroupStorageSize,
  };
  const support: Support = {
    ok: true,
    adapter: { vendor: info.vendor ?? '', architecture: info.architecture ?? '', device: info.device ?? '', description: info.description ?? '' },
    limits,
    shaderF16: adapter.features.has('shader-f16'),
  };
  // The model's kernels use 16 KiB of workgroup memory: WebGPU's guaranteed minimum.
  if (limits.maxComputeWorkgroupStorageSize < 16384) {
    return { ...support, ok: false, code: 'ADAPTER_LIMITS', reason: `the adapter offers ${limits.maxComputeWorkgroupStorageSize} bytes of workgroup memory, 16384 are needed` };
  }
  return support;
}
