import { type Clock, systemClock } from "../core/clock.ts";
import type { Metrics } from "../core/metrics.ts";
import type { ReadingRow } from "../core/reading.ts";
import type { HourlyStat, Page, ReadingQuery, ReadingStats, Store } from "../db/store.ts";
import type { Cache, CacheKey, CacheLookup } from "./cache.ts";

/** The store reads that {@linkcode ReadCache} serves; routes take either it or the store. */
export type StoreReads = Pick<Store, "readingStats" | "listReadings" | "hourlyStats">;

/** The `cache_type` label of the cache metrics. */
export type CacheType = "user_stats" | "recent_readings" | "hourly_stats";

/** Lifetimes of cached reads (before jitter); 0 turns that read's caching off. */
export interface ReadCacheTtls {
  /** `readingStats`, one user's or all (CACHE_USER_STATS_TTL). */
  userStatsMs: number;
  /** First page of a meter's newest readings (CACHE_RECENT_READINGS_TTL). */
  recentReadingsMs: number;
  /** `hourlyStats` of closed hours (CACHE_HOURLY_STATS_TTL). */
  hourlyStatsMs: number;
}

/** Options of {@linkcode ReadCache}. */
export interface ReadCacheOptions {
  cache: Cache;
  store: StoreReads;
  metrics: Metrics;
  ttl: ReadCacheTtls;
  /** Decides which hours are closed, and when an invalidation is a backfill. */
  clock?: Clock;
  /** Each TTL is spread uniformly over ±`jitter` of itself; default 0.1. */
  jitter?: number;
  /** Source of the jitter, in [0, 1); `Math.random` unless a test fixes it. */
  random?: () => number;
  /**
   * Longest wait for one cache operation before the read goes to the store as if Redis were
   * down; default 250 ms. Set the connection's own `commandTimeout` too.
   */
  operationTimeoutMs?: number;
  /**
   * How far other instances' clocks may be ahead: a committed reading whose hour closes within
   * this margin also invalidates its meter's hourly stats. Default 10 s.
   */
  clockSkewMs?: number;
}

export const CACHE_HITS = "cache_hits_total";
export const CACHE_MISSES = "cache_misses_total";
export const CACHE_INVALIDATIONS = "cache_invalidations_total";
export const CACHE_ERRORS = "cache_errors_total";
export const CACHE_DURATION = "cache_operation_duration_seconds";

const HOUR = 3_600_000;
/** Invalidations that failed and wait for the next batch; past this, the cache is bypassed. */
const MAX_PENDING = 100_000;

interface Flight {
  promise: Promise<{ value: unknown; hit: boolean }>;
}

/**
 * Read-through caching of the gateway's hot reads in front of a {@linkcode Store}:
 *
 * - `readingStats` (one user's, or everyone's for admins);
 * - `listReadings` when it asks for the first page of one meter's newest readings (optionally
 *   only one owner's): no range, `minted` filter or cursor;
 * - `hourlyStats` of closed hours only (`to` at or before the start of the current hour);
 *
 * every other query goes to the store. {@linkcode invalidateCommitted} takes one committed
 * writer batch and invalidates every entry the batch changes, in one cache call. Fills carry the
 * generation read before the query, so one that started before an invalidation never lands.
 * Concurrent misses of one key share one query (per instance). A cache that fails or is slow
 * counts as a miss (`cache_errors_total`), never as a failed read.
 */
export class ReadCache implements StoreReads {
  #cache: Cache;
  #store: StoreReads;
  #metrics: Metrics;
  #ttl: ReadCacheTtls;
  #clock: Clock;
  #jitter: number;
  #random: () => number;
  #timeoutMs: number;
  #skewMs: number;
  /** In-flight reads: group → item → flight. */
  #flights = new Map<string, Map<string, Flight>>();
  /** Groups whose invalidation failed: read from the store until an invalidation succeeds. */
  #pending = new Map<string, CacheType>();
  /** Pending invalidations were dropped: bypass everything until this instant (or forever). */
  #bypassUntil = 0;

  constructor(options: ReadCacheOptions) {
    const jitter = options.jitter ?? 0.1;
    if (!(jitter >= 0 && jitter < 1)) {
      throw new RangeError(`jitter must be in [0, 1), got "${jitter}"`);
    }
    for (const [name, ms] of Object.entries(options.ttl)) {
      if (!Number.isInteger(ms) || ms < 0) {
        throw new RangeError(`ttl.${name} must be a whole number of ms >= 0, got "${ms}"`);
      }
    }
    this.#cache = options.cache;
    this.#store = options.store;
    this.#metrics = options.metrics;
    this.#ttl = { ...options.ttl };
    this.#clock = options.clock ?? systemClock;
    this.#jitter = jitter;
    this.#random = options.random ?? Math.random;
    this.#timeoutMs = options.operationTimeoutMs ?? 250;
    this.#skewMs = options.clockSkewMs ?? 10_000;
    declareCacheMetrics(this.#metrics);
  }

  readingStats(query: { user_id?: string }): Promise<ReadingStats> {
    const group = query.user_id === undefined ? "stats:all" : `stats:user:${query.user_id}`;
    return this.#read(
      "user_stats",
      { group, item: "v" },
      this.#ttl.userStatsMs,
      () => this.#store.readingStats({ user_id: query.user_id }),
    );
  }

  listReadings(query: ReadingQuery): Promise<Page<ReadingRow>> {
    const recent = query.meter_id !== undefined && query.order === "desc" &&
      query.from === undefined && query.to === undefined && query.minted === undefined &&
      query.cursor === undefined;
    if (!recent) return this.#store.listReadings(query);
    const item = `${query.limit}/${query.user_id ?? "*"}`;
    return this.#read(
      "recent_readings",
      { group: `recent:${query.meter_id}`, item },
      this.#ttl.recentReadingsMs,
      () =>
        this.#store.listReadings({
          meter_id: query.meter_id,
          user_id: query.user_id,
          order: "desc",
          limit: query.limit,
        }),
    );
  }

  hourlyStats(meterId: string, from: number, to: number): Promise<HourlyStat[]> {
    // An open hour still changes with every reading: only ranges of closed hours are cached.
    if (to > hourStart(this.#clock.now())) return this.#store.hourlyStats(meterId, from, to);
    return this.#read(
      "hourly_stats",
      { group: `hourly:${meterId}`, item: `${from}-${to}` },
      this.#ttl.hourlyStatsMs,
      () => this.#store.hourlyStats(meterId, from, to),
    );
  }

  /**
   * Invalidates what one committed batch changed: each owner's stats and everyone's, each
   * meter's recent readings, and the hourly stats of each meter with a reading in a closed hour
   * (a backfill). One invalidation per key, one cache call. Never throws: a failed invalidation
   * is counted, retried with the next batch, and its keys are read from the store meanwhile.
   */
  async invalidateCommitted(rows: readonly ReadingRow[]): Promise<void> {
    if (rows.length === 0 && this.#pending.size === 0) return;
    const groups = new Map<string, CacheType>(this.#pending);
    if (rows.length > 0) groups.set("stats:all", "user_stats");
    // Rows before this instant lie in hours that are closed, or close before another
    // instance's (faster) clock could cache them.
    const closedBefore = hourStart(this.#clock.now() + this.#skewMs);
    for (const row of rows) {
      groups.set(`stats:user:${row.user_id}`, "user_stats");
      groups.set(`recent:${row.meter_id}`, "recent_readings");
      if (row.ts < closedBefore) groups.set(`hourly:${row.meter_id}`, "hourly_stats");
    }
    // Reads from now on must not join a query that started before the commit.
    for (const group of groups.keys()) this.#flights.delete(group);
    const types = new Set(groups.values());
    const started = performance.now();
    try {
      await this.#timed(this.#cache.invalidate([...groups.keys()]));
    } catch {
      for (const type of types) {
        this.#metrics.inc(CACHE_ERRORS, { cache_type: type, operation: "invalidate" });
      }
      this.#keepPending(groups);
      return;
    }
    const seconds = (performance.now() - started) / 1000;
    const counts = new Map<CacheType, number>();
    for (const type of groups.values()) counts.set(type, (counts.get(type) ?? 0) + 1);
    for (const [type, n] of counts) {
      this.#metrics.inc(CACHE_INVALIDATIONS, { cache_type: type }, n);
      this.#metrics.observe(CACHE_DURATION, { cache_type: type, operation: "invalidate" }, seconds);
    }
    this.#pending.clear();
    if (this.#bypassUntil === Infinity) this.#bypassUntil = this.#clock.now() + this.#maxTtl();
  }

  #keepPending(groups: Map<string, CacheType>): void {
    if (this.#bypassUntil === Infinity) return;
    for (const [group, type] of groups) this.#pending.set(group, type);
    if (this.#pending.size > MAX_PENDING) {
      // Too many to remember: read nothing from the cache until, after the next invalidation
      // that lands, every entry filled before it has expired.
      this.#pending.clear();
      this.#bypassUntil = Infinity;
    }
  }

  /** The longest TTL after jitter. */
  #maxTtl(): number {
    const { userStatsMs, recentReadingsMs, hourlyStatsMs } = this.#ttl;
    return Math.ceil(Math.max(userStatsMs, recentReadingsMs, hourlyStatsMs) * (1 + this.#jitter));
  }

  async #read<T>(
    type: CacheType,
    key: CacheKey,
    ttlMs: number,
    load: () => Promise<T>,
  ): Promise<T> {
    if (
      ttlMs === 0 || this.#pending.has(key.group) ||
      (this.#bypassUntil > 0 && this.#clock.now() < this.#bypassUntil)
    ) {
      return load();
    }
    let items = this.#flights.get(key.group);
    let flight = items?.get(key.item);
    if (flight === undefined) {
      if (items === undefined) this.#flights.set(key.group, items = new Map());
      const f: Flight = { promise: this.#fly(type, key, ttlMs, load) };
      flight = f;
      items.set(key.item, f);
      const done = () => {
        const now = this.#flights.get(key.group);
        if (now?.get(key.item) !== f) return;
        now.delete(key.item);
        if (now.size === 0) this.#flights.delete(key.group);
      };
      f.promise.then(done, done);
    }
    const { value, hit } = await flight.promise;
    this.#metrics.inc(hit ? CACHE_HITS : CACHE_MISSES, { cache_type: type });
    return value as T;
  }

  /** One lookup; on a miss one query, and a fill under the generation the lookup saw. */
  async #fly<T>(
    type: CacheType,
    key: CacheKey,
    ttlMs: number,
    load: () => Promise<T>,
  ): Promise<{ value: T; hit: boolean }> {
    let lookup: CacheLookup | undefined;
    try {
      lookup = await this.#op(type, "get", this.#cache.get(key));
      if (lookup.value !== undefined) return { value: JSON.parse(lookup.value) as T, hit: true };
    } catch {
      // Down, slow, or an entry that does not parse: a miss.
      this.#metrics.inc(CACHE_ERRORS, { cache_type: type, operation: "get" });
    }
    const value = await load();
    if (lookup !== undefined) {
      try {
        await this.#op(
          type,
          "fill",
          this.#cache.fill(key, {
            generation: lookup.generation,
            value: JSON.stringify(value),
            ttlMs: this.#jittered(ttlMs),
          }),
        );
      } catch {
        this.#metrics.inc(CACHE_ERRORS, { cache_type: type, operation: "fill" });
      }
    }
    return { value, hit: false };
  }

  /** A cache operation, bounded by the timeout and timed into the histogram when it succeeds. */
  async #op<T>(type: CacheType, operation: string, promise: Promise<T>): Promise<T> {
    const started = performance.now();
    const result = await this.#timed(promise);
    this.#metrics.observe(
      CACHE_DURATION,
      { cache_type: type, operation },
      (performance.now() - started) / 1000,
    );
    return result;
  }

  #timed<T>(promise: Promise<T>): Promise<T> {
    let timer: ReturnType<typeof setTimeout> | undefined;
    const timeout = new Promise<never>((_, reject) => {
      timer = setTimeout(
        () => reject(new Error(`Cache operation took over ${this.#timeoutMs} ms`)),
        this.#timeoutMs,
      );
    });
    // A late rejection of the abandoned operation must not be unhandled.
    promise.catch(() => {});
    return Promise.race([promise, timeout]).finally(() => clearTimeout(timer));
  }

  /** `ttlMs` spread uniformly over ±jitter, at least 1 ms. */
  #jittered(ttlMs: number): number {
    return Math.max(1, Math.round(ttlMs * (1 + this.#jitter * (2 * this.#random() - 1))));
  }
}

/** Declares the cache metrics on `metrics` (once; later calls keep the values). */
export function declareCacheMetrics(metrics: Metrics): void {
  const declare = (name: string, help: string) => {
    if (!metrics.has(name)) metrics.counter(name, help);
  };
  declare(CACHE_HITS, "Reads served from the cache, by cache_type");
  declare(CACHE_MISSES, "Reads that went to the store (miss, bypass excluded), by cache_type");
  declare(CACHE_INVALIDATIONS, "Cache keys invalidated by committed batches, by cache_type");
  declare(CACHE_ERRORS, "Cache operations that failed or timed out, by cache_type and operation");
  if (!metrics.has(CACHE_DURATION)) {
    metrics.histogram(CACHE_DURATION, "Duration of cache operations, by cache_type and operation");
  }
}

function hourStart(ms: number): number {
  return Math.floor(ms / HOUR) * HOUR;
}
