// Turns the engine's per-file byte counts into the package's progress events: whole-model totals,
// a receive rate over a sliding window, an ETA.

import type { RawProgress } from './protocol.js';
import type { LoadProgress } from './types.js';

/** Seconds of history the rate is measured over. */
const WINDOW_MS = 3000;

/** One phase's files and rate samples. */
interface PhaseState {
  files: Map<string, { loaded: number; total: number | null }>;
  samples: { t: number; bytes: number }[];
}

export class ProgressTracker {
  /** Per phase: a cold load downloads and uploads at the same time, so their events interleave. */
  private phases = new Map<RawProgress['phase'], PhaseState>();
  private files = new Map<string, { loaded: number; total: number | null }>();
  private samples: { t: number; bytes: number }[] = [];
  /** Whether any byte came from the network (then `ready` is not `fromCache`). */
  private fetched = false;
  /** The model's bytes as the last download or upload event counted them (what `ready` reports). */
  private bytes = { loaded: 0, file: '', fileLoaded: 0, fileTotal: null as number | null };
  private readonly started = performance.now();

  /** The event for one raw report. Totals and the rate are per phase (download, verify, upload). */
  update(raw: RawProgress): LoadProgress {
    let state = this.phases.get(raw.phase);
    if (!state) {
      state = { files: new Map(), samples: [] };
      this.phases.set(raw.phase, state);
    }
    ({ files: this.files, samples: this.samples } = state);
    if (raw.phase === 'download' && !raw.fromCache && raw.loaded > 0) this.fetched = true;
    if (raw.file === '') return { ...this.ready(), phase: raw.phase, warning: raw.warning };
    const previous = this.files.get(raw.file);
    this.files.set(raw.file, { loaded: raw.loaded, total: raw.total });
    const now = performance.now();
    const modelLoaded = this.loaded();
    if (!previous || previous.loaded !== raw.loaded) this.samples.push({ t: now, bytes: modelLoaded });
    while (this.samples.length > 2 && now - this.samples[0].t > WINDOW_MS) this.samples.shift();
    const first = this.samples[0];
    const seconds = (now - first.t) / 1000;
    const bytesPerSecond = seconds > 0 ? (modelLoaded - first.bytes) / seconds : 0;
    const left = raw.total === null ? null : Math.max(0, raw.total - raw.loaded);
    if (raw.phase === 'download' || raw.phase === 'upload') this.bytes = { loaded: modelLoaded, file: raw.file, fileLoaded: raw.loaded, fileTotal: raw.total };
    return {
      phase: raw.phase,
      file: raw.file,
      loaded: raw.loaded,
      total: raw.total,
      modelLoaded,
      modelTotal: this.total(),
      bytesPerSecond,
      etaSeconds: left === null ? null : left === 0 ? 0 : bytesPerSecond > 0 ? left / bytesPerSecond : null,
      fromCache: raw.fromCache,
      elapsedMs: now - this.started,
      ...(raw.warning ? { warning: raw.warning } : {}),
    };
  }

  /** The final event, once the engine is ready (`fromCache`: the cache was used, so if nothing was fetched, all came from it). */
  ready(fromCache = false): LoadProgress {
    return {
      phase: 'ready',
      file: this.bytes.file,
      loaded: this.bytes.fileLoaded,
      total: this.bytes.fileTotal,
      modelLoaded: this.bytes.loaded,
      modelTotal: this.bytes.loaded,
      bytesPerSecond: 0,
      etaSeconds: 0,
      fromCache: fromCache && !this.fetched,
      elapsedMs: performance.now() - this.started,
    };
  }

  private loaded(): number {
    let sum = 0;
    for (const f of this.files.values()) sum += f.loaded;
    return sum;
  }

  /** Known once the weights have been opened (config, tokenizer and weights sizes all seen). */
  private total(): number | null {
    if (this.files.size < 3) return null;
    let sum = 0;
    for (const f of this.files.values()) {
      if (f.total === null) return null;
      sum += f.total;
    }
    return sum;
  }
}
