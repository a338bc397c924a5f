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
  /**
   * Keys remembered; default 100 000. When full, keys not backing off are forgotten first; a
   * key whose wait is still running is never forgotten, so new keys are refused instead.
   */
  maxKeys?: number;
}

/** The outcome of {@linkcode Backoff.attempt}. */
export type BackoffAttempt =
  /** Counted; `undo` takes it back when it was never evaluated (overload, store failure). */
  | { ok: true; undo: () => void }
  /** `backoff`: this key must wait; `full`: the table holds only running back-offs. */
  | { ok: false; reason: "backoff" | "full"; waitMs: number };

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
  /** Set when the table was found full of running back-offs: no new key before this instant. */
  #fullUntil = 0;

  constructor(options: BackoffOptions) {
    this.#clock = options.clock;
    this.#free = options.free ?? 5;
    this.#baseMs = options.baseMs ?? 1_000;
    this.#maxMs = options.maxMs ?? 15 * 60_000;
    this.#maxKeys = options.maxKeys ?? 100_000;
  }

  /** Keys remembered (tests). */
  get size(): number {
    return this.#entries.size;
  }

  /**
   * Starts an attempt for `key`: counts it, or says how long to wait. Attempts are counted when
   * they start, so parallel ones cannot slip past the limit; call {@linkcode succeeded} when
   * one succeeds, and the attempt's `undo` when it could not be evaluated.
   */
  attempt(key: string): BackoffAttempt {
    const now = this.#clock.now();
    let entry = this.#entries.get(key);
    if (entry && now - entry.last >= 2 * this.#maxMs) {
      // Quiet for long enough: start afresh.
      this.#entries.delete(key);
      entry = undefined;
    }
    if (entry && now < entry.until) {
      return { ok: false, reason: "backoff", waitMs: entry.until - now };
    }
    const created = !entry;
    if (!entry) {
      if (this.#entries.size >= this.#maxKeys && !this.#makeRoom(now)) {
        return { ok: false, reason: "full", waitMs: Math.max(1, this.#fullUntil - now) };
      }
      entry = { attempts: 0, last: now, until: 0 };
      this.#entries.set(key, entry);
    }
    const before = { last: entry.last, until: entry.until };
    entry.attempts++;
    entry.last = now;
    const over = entry.attempts - this.#free;
    if (over >= 0) {
      entry.until = now + Math.min(this.#maxMs, this.#baseMs * 2 ** Math.min(over, 40));
    }
    const counted = entry;
    let undone = false;
    const undo = () => {
      if (undone || this.#entries.get(key) !== counted) return;
      undone = true;
      counted.attempts--;
      if (created && counted.attempts === 0) {
        this.#entries.delete(key);
        return;
      }
      // The wait this attempt started is taken back unless a later attempt set its own.
      if (counted.until === now + this.#waitFor(counted.attempts + 1)) {
        counted.until = before.until;
        counted.last = before.last;
      }
    };
    return { ok: true, undo };
  }

  /** Forgets the attempts of `key` (a successful login). */
  succeeded(key: string): void {
    this.#entries.delete(key);
  }

  #waitFor(attempts: number): number {
    const over = attempts - this.#free;
    return over < 0 ? -Infinity : Math.min(this.#maxMs, this.#baseMs * 2 ** Math.min(over, 40));
  }

  /**
   * Frees room for a new key: forgets quiet keys, then keys not backing off (oldest first, down
   * to half the table, so the scan is paid rarely). Running back-offs are kept; when only those
   * remain, returns false and refuses new keys until the first of them ends.
   */
  #makeRoom(now: number): boolean {
    if (now < this.#fullUntil) return false;
    let soonest = Infinity;
    const target = this.#maxKeys >> 1;
    for (const [k, e] of this.#entries) {
      if (now - e.last >= 2 * this.#maxMs) this.#entries.delete(k);
    }
    for (const [k, e] of this.#entries) {
      if (this.#entries.size <= target) break;
      if (now >= e.until) this.#entries.delete(k);
      else soonest = Math.min(soonest, e.until);
    }
    if (this.#entries.size < this.#maxKeys) return true;
    this.#fullUntil = soonest;
    return false;
  }
}
