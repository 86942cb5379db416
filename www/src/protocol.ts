// Messages between the page (client.ts) and the engine host (host.ts), one request id per call.
// Everything here is structured-cloneable: no functions, no AbortSignals, errors as WireError.

import type { WireError } from './errors.js';
import type { AdapterInfo, OcrResult, RecognizeOptions, TokenEvent } from './types.js';

/** What `recognize` sends: encoded bytes, pixels, or a URL the host fetches. */
export type WireInput = Blob | ArrayBuffer | Uint8Array | ImageData | ImageBitmap | { url: string };

export interface WireLoadOptions {
  weightsUrl: string;
  wasmUrl?: string;
  quantize?: string;
  dtype?: string;
  maxBindingBytes?: number;
  cache?: 'opfs' | 'none';
  stallTimeoutMs?: number;
  warmup?: boolean;
}

export type WireRecognizeOptions = Omit<RecognizeOptions, 'onToken' | 'signal'> & { stream: boolean };

export type Request =
  | { type: 'load'; id: number; options: WireLoadOptions }
  | { type: 'recognize'; id: number; input: WireInput; options: WireRecognizeOptions }
  | { type: 'abort'; id: number }
  | { type: 'dispose'; id: number };

/** A request as the client makes it (the connection adds the id; aborts are its own). */
export type Call = Request extends infer R ? (R extends { type: 'abort' } ? never : Omit<R, 'id'>) : never;

/** The host's progress report: bytes of one file in one phase. */
export interface RawProgress {
  phase: 'download' | 'verify' | 'quantize' | 'upload' | 'compile';
  file: string;
  loaded: number;
  total: number | null;
  fromCache: boolean;
  warning?: string;
}

export type Reply =
  | { type: 'progress'; id: number; event: RawProgress }
  | { type: 'token'; id: number; event: TokenEvent }
  | { type: 'loaded'; id: number; adapter: AdapterInfo }
  | { type: 'result'; id: number; result: OcrResult }
  | { type: 'disposed'; id: number }
  | { type: 'error'; id: number; error: WireError };

/** The side of a Worker or MessagePort each end uses. */
export interface Endpoint {
  postMessage(message: unknown, transfer?: Transferable[]): void;
  addEventListener(type: 'message', listener: (event: MessageEvent) => void): void;
}
