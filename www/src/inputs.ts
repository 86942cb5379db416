// Image inputs → what crosses into the engine: encoded bytes and ImageData as they are, pixel
// sources as a fresh ImageBitmap (transferred, so the pixels are not copied again), URLs resolved
// against the page. The caller's own objects are never detached or closed.

import { DsocrError } from './errors.js';
import type { WireInput } from './protocol.js';
import type { ImageInput } from './types.js';

const bitmapOptions: ImageBitmapOptions = { colorSpaceConversion: 'none', premultiplyAlpha: 'none' };

function isA<T>(value: unknown, name: string): value is T {
  const ctor = (globalThis as Record<string, unknown>)[name];
  return typeof ctor === 'function' && value instanceof (ctor as new () => T);
}

export async function toWire(input: ImageInput): Promise<{ input: WireInput; transfer: Transferable[] }> {
  if (typeof input === 'string' || input instanceof URL) {
    const base = typeof location !== 'undefined' ? location.href : undefined;
    return { input: { url: new URL(String(input), base).href }, transfer: [] };
  }
  if (input instanceof Blob || input instanceof ArrayBuffer || input instanceof Uint8Array) return { input, transfer: [] };
  if (isA<ImageData>(input, 'ImageData')) return { input, transfer: [] };
  if (isA<HTMLImageElement>(input, 'HTMLImageElement')) {
    if (!input.complete || input.naturalWidth === 0) {
      try {
        await input.decode();
      } catch (cause) {
        throw new DsocrError('BAD_IMAGE', `the <img> (${input.currentSrc || input.src}) could not be decoded`, { cause });
      }
    }
  }
  const pixelSource =
    isA<ImageBitmap>(input, 'ImageBitmap') || isA<HTMLImageElement>(input, 'HTMLImageElement') ||
    isA<HTMLCanvasElement>(input, 'HTMLCanvasElement') || isA<OffscreenCanvas>(input, 'OffscreenCanvas') ||
    isA<VideoFrame>(input, 'VideoFrame');
  if (!pixelSource) {
    throw new DsocrError('BAD_ARGUMENT', 'image must be a Blob/File, ArrayBuffer, Uint8Array, ImageData, ImageBitmap, <img>, <canvas>, OffscreenCanvas, VideoFrame or URL');
  }
  let bitmap: ImageBitmap;
  try {
    bitmap = await createImageBitmap(input as ImageBitmapSource, bitmapOptions);
  } catch (cause) {
    throw new DsocrError('BAD_IMAGE', `could not read the image's pixels: ${(cause as Error)?.message ?? cause}`, { cause });
  }
  return { input: bitmap, transfer: [bitmap] };
}
