import type { Clock } from "./clock.ts";

/** Options of {@linkcode Backoff}. */
export interface BackoffOptions {
  clock: Clock;
  /** Attempts allowed before the first wait; default 5. */
  free?: number;
  /** The first wait in ms, doubled by every further attempt; default 1 s. */
  baseMs?: number;
  /** The longest wait in ms; default 15 min. */
  maxMs?: number;
  /** Keys remembered; default 100 000 (quiet ones are forgotten first). */
  maxKeys?: number;
}

interface Entry {
  attempts: number;
  /** Epoch ms of the last attempt. */
  last: number;
  /** Epoch ms before which the next attempt is refused. */
  until: number;
}

/**
 * Exponential back-off per key (an account): after `free` attempts without a success, each
 * attempt must wait `baseMs`, `2·baseMs`, `4·baseMs` … up to `maxMs` after the previous one.
 * Never a permanent lockout: the wait is capped, and a success resets the key.
 */
export class Backoff {
  #clock: Clock;
  #free: number;
  #baseMs: number;
  #maxMs: number;
  #maxKeys: number;
  #entries = new Map<string, Entry>();

  constructor(options: BackoffOptions) {
    this.#clock = options.clock;
    this.#free = options.free ?? 5;
    this.#baseMs = options.baseMs ?? 1_000;
    this.#maxMs = options.maxMs ?? 15 * 60_000;
    this.#maxKeys = options.maxKeys ?? 100_000;
  }

  /**
   * Starts an attempt for `key`: returns 0 and counts it, or the ms to wait when it is too
   * early. Attempts are counted when they start, so parallel ones cannot slip past the limit;
   * call {@linkcode succeeded} when one succeeds.
   */
  attempt(key: string): number {
    const now = this.#clock.now();
    let entry = this.#entries.get(key);
    if (entry && now - entry.last >= 2 * this.#maxMs) {
      // Quiet for long enough: start afresh.
      this.#entries.delete(key);
      entry = undefined;
    }
    if (entry && now < entry.until) return entry.until - now;
    if (!entry) {
      if (this.#entries.size >= this.#maxKeys) this.#forget(now);
      entry = { attempts: 0, last: now, until: 0 };
      this.#entries.set(key, entry);
    }
    entry.attempts++;
    entry.last = now;
    const over = entry.attempts - this.#free;
    if (over >= 0) {
      entry.until = now + Math.min(this.#maxMs, this.#baseMs * 2 ** Math.min(over, 40));
    }
    return 0;
  }

  /** Forgets the attempts of `key` (a successful login). */
  succeeded(key: string): void {
    this.#entries.delete(key);
  }

  #forget(now: number): void {
    for (const [k, e] of this.#entries) {
      if (now - e.last >= 2 * this.#maxMs) this.#entries.delete(k);
    }
    if (this.#entries.size < this.#maxKeys) return;
    let drop = this.#entries.size >> 1;
    for (const k of this.#entries.keys()) {
      if (drop-- <= 0) break;
      this.#entries.delete(k);
    }
  }
}
