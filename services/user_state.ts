import type { Clock } from "../core/clock.ts";
import type { UserState } from "../core/user.ts";

/** Options of {@linkcode StateCache}. */
export interface StateCacheOptions<T> {
  /** Reads the current state from the store; `null` for an unknown key (a deleted user). */
  load: (key: string) => Promise<T | null>;
  clock: Clock;
  /**
   * How long an entry is trusted without a bus event, in ms (default 30 s). Changes are
   * announced on the bus; this bounds staleness when an event is lost (Redis pub/sub is
   * at-most-once).
   */
  ttlMs?: number;
  /** Users remembered (least recently used dropped first); default 100 000. */
  max?: number;
}

/** Options of {@linkcode UserStateCache}. */
export type UserStateCacheOptions = StateCacheOptions<UserState>;

interface Entry<T> {
  state: T | null;
  at: number;
}

/**
 * State read on every request, held in memory (LRU, TTL) and invalidated by bus events, so that
 * a request need not read the store for it; a load that an invalidation overtook is not kept.
 */
export class StateCache<T> {
  #load: (key: string) => Promise<T | null>;
  #clock: Clock;
  #ttlMs: number;
  #max: number;
  #entries = new Map<string, Entry<T>>();
  /** Counts invalidations: a load that saw one happen meanwhile does not write its result back. */
  #epoch = 0;

  constructor(options: StateCacheOptions<T>) {
    this.#load = options.load;
    this.#clock = options.clock;
    this.#ttlMs = options.ttlMs ?? 30_000;
    this.#max = options.max ?? 100_000;
  }

  /** The current state (cached), or `null` when the key does not exist. */
  async get(userId: string): Promise<T | null> {
    const now = this.#clock.now();
    const entry = this.#entries.get(userId);
    if (entry && now - entry.at < this.#ttlMs) {
      // Map order is the LRU order: move a hit to the end.
      this.#entries.delete(userId);
      this.#entries.set(userId, entry);
      return entry.state;
    }
    const epoch = this.#epoch;
    const state = await this.#load(userId);
    // A slow load must never write back a state older than an invalidation that overtook it.
    if (epoch === this.#epoch) {
      this.#entries.delete(userId);
      if (this.#entries.size >= this.#max) {
        this.#entries.delete(this.#entries.keys().next().value!);
      }
      this.#entries.set(userId, { state, at: now });
    }
    return state;
  }

  /** Forgets what is known of `userId`; the next check reads the store. */
  invalidate(userId: string): void {
    this.#epoch++;
    this.#entries.delete(userId);
  }

  /** Number of users cached. */
  get size(): number {
    return this.#entries.size;
  }
}

/**
 * Per-user role, disabled flag and token generation, so that every request can re-check its
 * token against the account's current state without a store round trip. Invalidated by
 * `user.changed` bus events (and by this instance's own changes at once).
 */
export class UserStateCache extends StateCache<UserState> {}
