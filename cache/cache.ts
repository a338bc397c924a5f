// The Cache port: versioned entries that a slow fill can never overwrite with a value older than
// an invalidation. Adapters: cache/lru_cache.ts (in-process), cache/redis_cache.ts (shared by
// every instance). Both pass tests/contracts/cache_contract.ts.

/**
 * Where an entry lives. `group` is the unit of invalidation (one user's stats, one meter's
 * hourly stats); `item` tells entries of one group apart (a page size, an hour range).
 */
export interface CacheKey {
  readonly group: string;
  readonly item: string;
}

/** What {@linkcode Cache.get} found. */
export interface CacheLookup {
  /** The entry's value, when one was filled under the group's current generation. */
  value: string | undefined;
  /**
   * The group's current generation: pass it to {@linkcode Cache.fill} so that the fill only
   * lands if no invalidation of the group happened in between. Opaque; never reused by a group.
   */
  generation: string;
}

/** One write of {@linkcode Cache.fill}. */
export interface CacheFill {
  /** The generation returned by the {@linkcode Cache.get} that preceded the query. */
  generation: string;
  value: string;
  /** Lifetime of the entry; at least 1 ms. */
  ttlMs: number;
}

/**
 * A versioned key-value cache.
 *
 * - `get` returns the entry's value only if it was filled under the group's current
 *   generation, together with that generation.
 * - `fill` stores a value only if the group's generation is still the one given (atomically);
 *   it answers whether it did.
 * - `invalidate` moves each group to a new generation (atomically per group) and drops its
 *   entries: nothing filled before is returned again, and no fill that read an older
 *   generation lands afterwards. All groups of one call go in one round trip where the backend
 *   has round trips.
 *
 * Errors (a backend that is down) are thrown; callers decide that a cache error is a miss.
 */
export interface Cache {
  get(key: CacheKey): Promise<CacheLookup>;
  fill(key: CacheKey, fill: CacheFill): Promise<boolean>;
  invalidate(groups: readonly string[]): Promise<void>;
}

/** Throws unless `ttlMs` is a positive whole number of milliseconds (every adapter agrees). */
export function checkTtl(ttlMs: number): void {
  if (!Number.isInteger(ttlMs) || ttlMs < 1) {
    throw new RangeError(`ttlMs must be a positive integer, got "${ttlMs}"`);
  }
}
