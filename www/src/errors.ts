// DsocrError: every failure the package reports, with a stable code, across the worker boundary.

/** Stable error codes to branch on. */
export type DsocrErrorCode =
  /** No WebGPU in this browser, or no adapter. */
  | 'NO_WEBGPU'
  /** The adapter lacks a limit or feature the model needs (e.g. `dtype: 'f16'` without `shader-f16`). */
  | 'ADAPTER_LIMITS'
  /** A download failed (HTTP status, connection, CORS); the message names the URL. */
  | 'NETWORK'
  /** Not enough storage for the model's cache. */
  | 'QUOTA_EXCEEDED'
  /** The checkpoint is malformed, incomplete or of an unsupported kind. */
  | 'BAD_CHECKPOINT'
  /** The input is not a decodable image, or it is too large. */
  | 'BAD_IMAGE'
  /** An option or input of the wrong kind or value. */
  | 'BAD_ARGUMENT'
  /** The GPU device was lost (driver reset, tab in the background too long); load again. */
  | 'DEVICE_LOST'
  /** The GPU or wasm memory ran out. */
  | 'OUT_OF_MEMORY'
  /** The engine was disposed (or its worker crashed); load a new one. */
  | 'DISPOSED'
  /** A bug, or a crash of the worker: the message says what. */
  | 'INTERNAL';

const CODES: readonly DsocrErrorCode[] = [
  'NO_WEBGPU', 'ADAPTER_LIMITS', 'NETWORK', 'QUOTA_EXCEEDED', 'BAD_CHECKPOINT', 'BAD_IMAGE', 'BAD_ARGUMENT',
  'DEVICE_LOST', 'OUT_OF_MEMORY', 'DISPOSED', 'INTERNAL',
];

/** The one error class the package rejects with (aborts reject with `signal.reason`, like `fetch`). */
export class DsocrError extends Error {
  /** What went wrong, stable across versions. */
  readonly code: DsocrErrorCode;

  constructor(code: DsocrErrorCode, message: string, options?: { cause?: unknown }) {
    super(message, options);
    this.name = 'DsocrError';
    this.code = code;
  }
}

/** An error as it crosses postMessage: plain data, always cloneable. */
export interface WireError {
  code: string;
  message: string;
  /** The worker can no longer be used (a wasm trap): the client ends it. */
  fatal?: boolean;
}

/** Any thrown value → a cloneable description (wasm errors carry `code`; traps are fatal). */
export function toWire(e: unknown): WireError {
  const err = e as { code?: unknown; message?: unknown; name?: unknown } | null;
  const message = typeof err?.message === 'string' ? err.message : String(e);
  if (typeof err?.code === 'string') return { code: err.code, message };
  // A Rust panic or a trap leaves the wasm instance unusable.
  if (e instanceof WebAssembly.RuntimeError) return { code: 'INTERNAL', message: `the engine crashed: ${message}`, fatal: true };
  if (err?.name === 'QuotaExceededError') return { code: 'QUOTA_EXCEEDED', message };
  if (e instanceof RangeError && /allocat|memory/i.test(message)) return { code: 'OUT_OF_MEMORY', message, fatal: true };
  if (/out of memory/i.test(message)) return { code: 'OUT_OF_MEMORY', message, fatal: true };
  if (/device (was )?lost/i.test(message)) return { code: 'DEVICE_LOST', message, fatal: true };
  return { code: 'INTERNAL', message };
}

/** The wire form back into a DsocrError (codes the crate adds map onto the documented ones). */
export function fromWire(wire: WireError): DsocrError {
  const code = (CODES as readonly string[]).includes(wire.code) ? (wire.code as DsocrErrorCode) : 'INTERNAL';
  return new DsocrError(code, wire.message);
}
