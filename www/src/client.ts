// The page's side of the engine: one Connection per engine, to a Worker or a MessagePort. Calls are
// request ids with pending promises; a crashed or unreadable worker rejects every pending call, so
// no promise ever hangs.

import { DsocrError, fromWire } from './errors.js';
import type { Call, Endpoint, Reply, Request } from './protocol.js';

type Pending = {
  resolve: (reply: Reply) => void;
  reject: (error: unknown) => void;
  onEvent?: (reply: Reply) => void;
};

export class Connection {
  private nextId = 1;
  private readonly pending = new Map<number, Pending>();
  /** Set once the other side is gone: every later call rejects with it. */
  private dead: DsocrError | null = null;

  constructor(
    private readonly endpoint: Endpoint,
    /** Ends the other side (terminates a worker the package created); null when the app owns it. */
    private readonly end: (() => void) | null,
    worker: Worker | null,
  ) {
    endpoint.addEventListener('message', (event) => this.onMessage(event.data as Reply));
    worker?.addEventListener('error', (event: ErrorEvent) => {
      event.preventDefault();
      const where = event.filename ? ` (${event.filename}:${event.lineno})` : '';
      this.kill(new DsocrError('INTERNAL', `the engine's worker failed: ${event.message || 'it could not start or crashed'}${where}`));
    });
    worker?.addEventListener('messageerror', () => this.kill(new DsocrError('INTERNAL', "a message from the engine's worker could not be read")));
  }

  get closed(): DsocrError | null {
    return this.dead;
  }

  /** Sends a request; `signal` aborts it (the promise rejects with `signal.reason` at once). */
  call(request: Call, transfer: Transferable[], signal?: AbortSignal, onEvent?: (reply: Reply) => void): Promise<Reply> {
    if (this.dead) return Promise.reject(this.dead);
    if (signal?.aborted) return Promise.reject(signal.reason);
    const id = this.nextId++;
    return new Promise<Reply>((resolve, reject) => {
      const onAbort = () => {
        this.pending.delete(id);
        this.endpoint.postMessage({ type: 'abort', id } satisfies Request);
        reject(signal!.reason);
      };
      const settle = <T>(f: (v: T) => void) => (v: T) => {
        signal?.removeEventListener('abort', onAbort);
        this.pending.delete(id);
        f(v);
      };
      this.pending.set(id, { resolve: settle(resolve), reject: settle(reject), onEvent });
      signal?.addEventListener('abort', onAbort, { once: true });
      try {
        this.endpoint.postMessage({ ...request, id } as Request, transfer);
      } catch (cause) {
        settle(reject)(new DsocrError('BAD_ARGUMENT', `could not send the request to the engine: ${(cause as Error)?.message ?? cause}`, { cause }));
      }
    });
  }

  /** Rejects everything pending and every later call with `error`, and ends the other side. */
  kill(error: DsocrError): void {
    if (this.dead) return;
    this.dead = error;
    for (const p of [...this.pending.values()]) p.reject(error);
    this.pending.clear();
    this.end?.();
  }

  private onMessage(reply: Reply): void {
    const pending = this.pending.get(reply.id);
    if (!pending) return; // aborted earlier: its late replies are dropped
    switch (reply.type) {
      case 'progress':
      case 'token':
        try {
          pending.onEvent?.(reply);
        } catch (e) {
          // An exception in the app's callback must not break the engine; report it like the platform does.
          queueMicrotask(() => { throw e; });
        }
        return;
      case 'error': {
        const error = fromWire(reply.error);
        pending.reject(error);
        if (reply.error.fatal) this.kill(new DsocrError('DISPOSED', `the engine crashed (${reply.error.message}); load a new one`));
        return;
      }
      default:
        pending.resolve(reply);
    }
  }
}
