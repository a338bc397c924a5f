import assert from "node:assert/strict";
import { Cluster, Redis } from "ioredis";
import type { Cache, CacheFill, CacheKey, CacheLookup } from "../cache/cache.ts";
import { LruCache } from "../cache/lru_cache.ts";
import { ReadCache, type ReadCacheOptions, type StoreReads } from "../cache/read_cache.ts";
import { RedisCache } from "../cache/redis_cache.ts";
import { ManualClock } from "../core/clock.ts";
import { Metrics } from "../core/metrics.ts";
import type { ReadingRow } from "../core/reading.ts";
import { KvStore } from "../db/kv_store.ts";
import type { HourlyStat, Page, ReadingQuery, ReadingStats } from "../db/store.ts";
import { cacheContract } from "./contracts/cache_contract.ts";
import type { ActorRegistry } from "../actors/registry.ts";
import { deviceRecord, storeDevice } from "./_devices.ts";
import { meterRoutes } from "../routes/meters.ts";
import { TokenService } from "../services/tokens.ts";
import { UserStateCache } from "../services/user_state.ts";
import { probeTcp, redactUrl, redisUrl, requireService } from "./_services.ts";
import { redisBinariesAvailable, startRedisCluster } from "./_redis_cluster.ts";

const MIN = 60_000;
const HOUR = 60 * MIN;
// 10:30 UTC: hours up to 10:00 are closed, 10:00–11:00 is open.
const NOW = Date.UTC(2026, 10, 29, 10, 30, 0);
const H10 = Date.UTC(2026, 10, 29, 10, 0, 0);
const TTL = { userStatsMs: 300_000, recentReadingsMs: 60_000, hourlyStatsMs: 3_600_000 };

const REDIS_URL = redisUrl();
const service = await requireService(`Redis at ${redactUrl(REDIS_URL)}`, probeTcp(REDIS_URL, 6379));
const ignore = !service.ok;
const skipped = service.ok ? "" : ` (skipped: ${service.reason})`;

// ---- helpers ---------------------------------------------------------------------------------

function connect(url: string, options: { commandTimeout?: number } = {}): Promise<Redis> {
  const redis = new Redis(url, {
    lazyConnect: true,
    enableOfflineQueue: false,
    maxRetriesPerRequest: 1,
    commandTimeout: options.commandTimeout ?? 2_000,
    retryStrategy: () => 50,
  });
  return redis.connect().then(() => redis);
}

/** A Redis cache on the shared server under a prefix of its own, and its cleanup. */
async function redisFixture(): Promise<
  { cache: RedisCache; peer: RedisCache; cleanup(): Promise<void> }
> {
  const prefix = `gtx-test:cache:${crypto.randomUUID()}:`;
  const a = await connect(REDIS_URL);
  const b = await connect(REDIS_URL);
  return {
    cache: new RedisCache(a, { prefix }),
    peer: new RedisCache(b, { prefix }),
    async cleanup() {
      let cursor = "0";
      do {
        const [next, keys] = await a.scan(cursor, "MATCH", `${prefix}*`, "COUNT", 500);
        if (keys.length > 0) await a.del(...keys);
        cursor = next;
      } while (cursor !== "0");
      a.disconnect();
      b.disconnect();
    },
  };
}

function row(meterId: string, ts: number, overrides: Partial<ReadingRow> = {}): ReadingRow {
  return {
    meter_id: meterId,
    ts,
    kwh_e4: 12_345,
    user_id: "user-1",
    wallet_address: null,
    key_id: "k1",
    device_signature: "sig",
    source: "mqtt",
    submitted_at: ts,
    minted: false,
    ...overrides,
  };
}

/** A gate that a store call can wait on, released by the test. */
function gate(): { wait: Promise<void>; open(): void } {
  let open!: () => void;
  const wait = new Promise<void>((resolve) => open = resolve);
  return { wait, open };
}

/**
 * The reads of a real KvStore, counted. `hold` makes the next call read the store at once and
 * then wait for the gate before answering (a slow query whose result is already old).
 */
class CountingStore implements StoreReads {
  calls = { readingStats: 0, listReadings: 0, hourlyStats: 0 };
  #hold: { started: () => void; gate: Promise<void> } | undefined;
  constructor(readonly store: KvStore) {}

  /** The next read waits for `release`; resolves `started` once it has queried the store. */
  holdNext(): { started: Promise<void>; release(): void } {
    const g = gate();
    const s = gate();
    this.#hold = { started: s.open, gate: g.wait };
    return { started: s.wait, release: g.open };
  }

  async #answer<T>(value: T): Promise<T> {
    const hold = this.#hold;
    this.#hold = undefined;
    if (hold) {
      hold.started();
      await hold.gate;
    }
    return value;
  }

  async readingStats(query: { user_id?: string }): Promise<ReadingStats> {
    this.calls.readingStats++;
    return this.#answer(await this.store.readingStats(query));
  }
  async listReadings(query: ReadingQuery): Promise<Page<ReadingRow>> {
    this.calls.listReadings++;
    return this.#answer(await this.store.listReadings(query));
  }
  async hourlyStats(meterId: string, from: number, to: number): Promise<HourlyStat[]> {
    this.calls.hourlyStats++;
    return this.#answer(await this.store.hourlyStats(meterId, from, to));
  }
}

/** A real adapter with its calls recorded (what was invalidated, which TTLs were filled). */
class RecordingCache implements Cache {
  invalidations: string[][] = [];
  ttls: number[] = [];
  constructor(readonly inner: Cache) {}
  get(key: CacheKey): Promise<CacheLookup> {
    return this.inner.get(key);
  }
  fill(key: CacheKey, fill: CacheFill): Promise<boolean> {
    this.ttls.push(fill.ttlMs);
    return this.inner.fill(key, fill);
  }
  invalidate(groups: readonly string[]): Promise<void> {
    this.invalidations.push([...groups].sort());
    return this.inner.invalidate(groups);
  }
}

interface Setup {
  reads: ReadCache;
  store: CountingStore;
  kv: KvStore;
  cache: RecordingCache;
  metrics: Metrics;
  clock: ManualClock;
}

type Adapter = {
  name: string;
  ignore: boolean;
  open(): Promise<{ cache: Cache; close(): Promise<void> }>;
};

const ADAPTERS: Adapter[] = [
  {
    name: "LruCache",
    ignore: false,
    open: () =>
      Promise.resolve({
        cache: new LruCache({ maxEntries: 1000 }),
        close: () => Promise.resolve(),
      }),
  },
  {
    name: `RedisCache${skipped}`,
    ignore,
    async open() {
      const f = await redisFixture();
      return { cache: f.cache, close: f.cleanup };
    },
  },
];

/** Runs `fn` with a ReadCache over `cache` and a fresh KvStore in a temp directory. */
async function withReads(
  cache: Cache,
  fn: (s: Setup) => Promise<void>,
  options: Partial<ReadCacheOptions> = {},
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "cache_test_" });
  const kv = await KvStore.open(`${dir}/gateway.kv`, { dedupeWindowMs: MIN });
  try {
    const store = new CountingStore(kv);
    const recording = new RecordingCache(cache);
    const metrics = new Metrics();
    const clock = new ManualClock(NOW);
    const reads = new ReadCache({ cache: recording, store, metrics, clock, ttl: TTL, ...options });
    await fn({ reads, store, kv, cache: recording, metrics, clock });
  } finally {
    await kv.close();
    await Deno.remove(dir, { recursive: true });
  }
}

/** Inserts rows and hands the stored ones to the cache, as the writer does per batch. */
async function commit(s: Setup, rows: ReadingRow[]): Promise<void> {
  const results = await s.kv.insertReadings(rows);
  await s.reads.invalidateCommitted(rows.filter((_, i) => results[i].status === "stored"));
}

function metricLine(metrics: Metrics, series: string): number | undefined {
  const line = metrics.render().split("\n").find((l) => l.startsWith(`${series} `));
  return line === undefined ? undefined : Number(line.slice(series.length + 1));
}

function readTest(
  title: string,
  fn: (s: Setup) => Promise<void>,
  options: Partial<ReadCacheOptions> = {},
): void {
  for (const adapter of ADAPTERS) {
    Deno.test({
      name: `ReadCache on ${adapter.name}: ${title}`,
      ignore: adapter.ignore,
      async fn() {
        const { cache, close } = await adapter.open();
        try {
          await withReads(cache, fn, options);
        } finally {
          await close();
        }
      },
    });
  }
}

// ---- the contract on both adapters -------------------------------------------------------------

cacheContract("LruCache", () => {
  const clock = new ManualClock(NOW);
  return Promise.resolve({
    cache: new LruCache({ maxEntries: 1000, clock }),
    advance: (ms: number) => clock.advance(ms),
    cleanup: () => Promise.resolve(),
  });
});

cacheContract(`RedisCache${skipped}`, redisFixture, { ignore });

// A Redis Cluster of its own per case: an entry's keys share a hash slot, invalidations of one
// batch span slots.
const clusterBinaries = await redisBinariesAvailable();
cacheContract(
  `RedisCache on a 3-node Redis Cluster${
    clusterBinaries.ok ? "" : ` (skipped: ${clusterBinaries.reason})`
  }`,
  async () => {
    const cluster = await startRedisCluster();
    const nodes = cluster.nodes.map((node) => {
      const [host, port] = node.split(":");
      return { host, port: Number(port) };
    });
    const clients: Cluster[] = [];
    try {
      for (let i = 0; i < 2; i++) {
        const client = new Cluster(nodes, { enableOfflineQueue: true });
        clients.push(client);
        await new Promise<void>((resolve, reject) => {
          client.once("ready", () => resolve());
          client.once("error", reject);
        });
      }
      const prefix = "gtx-test:cache:";
      return {
        cache: new RedisCache(clients[0], { prefix }),
        peer: new RedisCache(clients[1], { prefix }),
        async cleanup() {
          await Promise.all(clients.map((c) => c.quit()));
          await cluster.close();
        },
      };
    } catch (error) {
      for (const c of clients) c.disconnect();
      await cluster.close();
      throw error;
    }
  },
  { ignore: !clusterBinaries.ok },
);

// ---- adapter specifics ----------------------------------------------------------------------------

Deno.test("LruCache drops the least recently used entry past maxEntries", async () => {
  const cache = new LruCache({ maxEntries: 2 });
  const fill = async (group: string) => {
    const { generation } = await cache.get({ group, item: "v" });
    await cache.fill({ group, item: "v" }, { generation, value: group, ttlMs: 60_000 });
  };
  await fill("a");
  await fill("b");
  assert.equal((await cache.get({ group: "a", item: "v" })).value, "a"); // a is now the newest
  await fill("c");
  assert.equal(cache.size, 2);
  assert.equal((await cache.get({ group: "b", item: "v" })).value, undefined);
  assert.equal((await cache.get({ group: "a", item: "v" })).value, "a");
  assert.equal((await cache.get({ group: "c", item: "v" })).value, "c");
});

Deno.test("LruCache refuses a size that is not a positive integer", () => {
  assert.throws(() => new LruCache({ maxEntries: 0 }), RangeError);
});

Deno.test({
  name:
    `RedisCache keeps each group's keys in one hash slot and refuses braces in the prefix${skipped}`,
  ignore,
  async fn() {
    const f = await redisFixture();
    try {
      const redis = await connect(REDIS_URL);
      try {
        assert.throws(() => new RedisCache(redis, { prefix: "x{y}:" }), TypeError);
        const prefix = `gtx-test:cache:${crypto.randomUUID()}:`;
        const cache = new RedisCache(redis, { prefix });
        const key = { group: "hourly:meter-1", item: "1-2" };
        const { generation } = await cache.get(key);
        await cache.fill(key, { generation, value: "v", ttlMs: 60_000 });
        const keys = (await redis.keys(`${prefix}*`)).sort();
        assert.deepEqual(keys, [`${prefix}{hourly:meter-1}:g`, `${prefix}{hourly:meter-1}:v:1-2`]);
        const pttl = await redis.pttl(keys[1]);
        assert.ok(pttl > 0 && pttl <= 60_000, `value TTL ${pttl}`);
        assert.ok(await redis.pttl(keys[0]) >= pttl, "the generation outlives the value");
        await redis.del(...keys);
      } finally {
        redis.disconnect();
      }
    } finally {
      await f.cleanup();
    }
  },
});

// ---- read-through ---------------------------------------------------------------------------------

readTest("a miss queries the store once, the next read is a hit with the same value", async (s) => {
  await s.kv.insertReadings([row("m1", H10 - HOUR), row("m1", H10 - 2 * HOUR, { kwh_e4: 7 })]);
  const first = await s.reads.readingStats({ user_id: "user-1" });
  const second = await s.reads.readingStats({ user_id: "user-1" });
  assert.deepStrictEqual(second, first);
  assert.deepStrictEqual(second, await s.kv.readingStats({ user_id: "user-1" }));
  assert.equal(s.store.calls.readingStats, 1);
  assert.equal(metricLine(s.metrics, 'cache_misses_total{cache_type="user_stats"}'), 1);
  assert.equal(metricLine(s.metrics, 'cache_hits_total{cache_type="user_stats"}'), 1);
});

readTest("cached values round-trip exactly: numbers, nulls, minted flags, cursors", async (s) => {
  await s.kv.insertReadings([
    row("m1", H10 - 3 * HOUR, { kwh_e4: 1, minted: true, wallet_address: "wallet-1" }),
    row("m1", H10 - 2 * HOUR, { kwh_e4: 333_333, source: "http" }),
    row("m1", H10 - HOUR, { kwh_e4: 10_001 }),
  ]);
  const query: ReadingQuery = { meter_id: "m1", order: "desc", limit: 2 };
  const direct = await s.kv.listReadings(query);
  assert.ok(direct.next_cursor !== null);
  await s.reads.listReadings(query);
  assert.deepStrictEqual(await s.reads.listReadings(query), direct);
  const hourly = await s.kv.hourlyStats("m1", H10 - 4 * HOUR, H10);
  await s.reads.hourlyStats("m1", H10 - 4 * HOUR, H10);
  assert.deepStrictEqual(await s.reads.hourlyStats("m1", H10 - 4 * HOUR, H10), hourly);
  const empty = await s.reads.readingStats({ user_id: "nobody" });
  assert.deepStrictEqual(await s.reads.readingStats({ user_id: "nobody" }), empty);
  assert.equal(empty.first_ts, null);
  assert.deepStrictEqual(await s.reads.readingStats({}), await s.kv.readingStats({}));
  assert.deepEqual(s.store.calls, { readingStats: 2, listReadings: 1, hourlyStats: 1 });
});

readTest("only the first page of a meter's newest readings is cached", async (s) => {
  await s.kv.insertReadings([row("m1", H10 - HOUR), row("m1", H10 - 2 * HOUR)]);
  const others: ReadingQuery[] = [
    { meter_id: "m1", order: "asc", limit: 10 },
    { meter_id: "m1", order: "desc", limit: 10, from: 0 },
    { meter_id: "m1", order: "desc", limit: 10, minted: false },
    { user_id: "user-1", order: "desc", limit: 10 },
  ];
  for (const q of others) {
    await s.reads.listReadings(q);
    await s.reads.listReadings(q);
  }
  assert.equal(s.store.calls.listReadings, 8);
  // One entry per page size and owner filter.
  const mine = { meter_id: "m1", user_id: "user-1", order: "desc", limit: 10 } as const;
  const theirs = { meter_id: "m1", user_id: "user-2", order: "desc", limit: 10 } as const;
  assert.equal((await s.reads.listReadings(mine)).items.length, 2);
  assert.equal((await s.reads.listReadings(theirs)).items.length, 0);
  assert.equal((await s.reads.listReadings(mine)).items.length, 2);
  assert.equal((await s.reads.listReadings(theirs)).items.length, 0);
  assert.equal(s.store.calls.listReadings, 10);
});

readTest("one committed batch invalidates each affected key once, in one cache call", async (s) => {
  s.clock.set(NOW);
  const readAll = async () => {
    await s.reads.readingStats({ user_id: "user-1" });
    await s.reads.readingStats({ user_id: "user-2" });
    await s.reads.readingStats({ user_id: "user-3" });
    await s.reads.readingStats({});
    await s.reads.listReadings({ meter_id: "m1", order: "desc", limit: 5 });
    await s.reads.listReadings({ meter_id: "m2", order: "desc", limit: 5 });
    await s.reads.listReadings({ meter_id: "m3", order: "desc", limit: 5 });
    await s.reads.hourlyStats("m1", H10 - 5 * HOUR, H10);
    await s.reads.hourlyStats("m2", H10 - 5 * HOUR, H10);
  };
  await readAll();
  assert.deepEqual(s.store.calls, { readingStats: 4, listReadings: 3, hourlyStats: 2 });
  // m1 (user-1): three readings of the open hour; m2 (user-2): one backfilled into 08:00.
  await commit(s, [
    row("m1", H10 + 1 * MIN),
    row("m1", H10 + 5 * MIN),
    row("m1", H10 + 9 * MIN),
    row("m2", H10 - 2 * HOUR + MIN, { user_id: "user-2", kwh_e4: 99 }),
  ]);
  assert.deepEqual(s.cache.invalidations, [[
    "hourly:m2",
    "recent:m1",
    "recent:m2",
    "stats:all",
    "stats:user:user-1",
    "stats:user:user-2",
  ]]);
  assert.equal(metricLine(s.metrics, 'cache_invalidations_total{cache_type="user_stats"}'), 3);
  assert.equal(metricLine(s.metrics, 'cache_invalidations_total{cache_type="recent_readings"}'), 2);
  assert.equal(metricLine(s.metrics, 'cache_invalidations_total{cache_type="hourly_stats"}'), 1);
  await readAll();
  // Re-read: user-1, user-2, all, m1, m2 and m2's hours; user-3, m3 and m1's hours were hits.
  assert.deepEqual(s.store.calls, { readingStats: 7, listReadings: 5, hourlyStats: 3 });
  assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 3);
  assert.equal((await s.reads.readingStats({})).reading_count, 4);
  assert.equal(
    (await s.reads.listReadings({ meter_id: "m1", order: "desc", limit: 5 })).items.length,
    3,
  );
  const m2Hours = await s.reads.hourlyStats("m2", H10 - 5 * HOUR, H10);
  assert.deepStrictEqual(m2Hours, await s.kv.hourlyStats("m2", H10 - 5 * HOUR, H10));
  assert.equal(m2Hours.length, 1);
  // An empty batch invalidates nothing.
  await s.reads.invalidateCommitted([]);
  assert.equal(s.cache.invalidations.length, 1);
});

readTest("a fill that started before an invalidation never lands (stale refill)", async (s) => {
  await s.kv.insertReadings([row("m1", H10 - HOUR)]);
  const held = s.store.holdNext();
  // The slow read: its query has seen one reading and now waits.
  const slow = s.reads.readingStats({ user_id: "user-1" });
  await held.started;
  await commit(s, [row("m1", H10 - 2 * HOUR)]);
  // A read after the commit does not join the slow one: it queries and sees both readings.
  assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
  held.release();
  assert.equal((await slow).reading_count, 1);
  // The slow fill carried the old generation: the cache holds the new value, not the old one.
  for (let i = 0; i < 3; i++) {
    assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
  }
  assert.equal(s.store.calls.readingStats, 2);
});

readTest("a stale refill of a meter's recent readings never lands either", async (s) => {
  await s.kv.insertReadings([row("m1", H10 - HOUR)]);
  const q: ReadingQuery = { meter_id: "m1", order: "desc", limit: 10 };
  const held = s.store.holdNext();
  const slow = s.reads.listReadings(q);
  await held.started;
  await commit(s, [row("m1", H10 - 2 * HOUR, { minted: true })]);
  held.release();
  assert.equal((await slow).items.length, 1);
  assert.equal((await s.reads.listReadings(q)).items.length, 2);
  assert.equal((await s.reads.listReadings(q)).items.length, 2);
  assert.equal(s.store.calls.listReadings, 2);
});

readTest("50 concurrent misses of one key run one store query", async (s) => {
  await s.kv.insertReadings([row("m1", H10 - HOUR)]);
  const held = s.store.holdNext();
  const reads = Array.from({ length: 50 }, () => s.reads.readingStats({ user_id: "user-1" }));
  await held.started;
  held.release();
  const results = await Promise.all(reads);
  assert.equal(s.store.calls.readingStats, 1);
  for (const r of results) assert.deepStrictEqual(r, results[0]);
  assert.equal(metricLine(s.metrics, 'cache_misses_total{cache_type="user_stats"}'), 50);
  // Different keys are not coalesced.
  await Promise.all([s.reads.readingStats({ user_id: "user-2" }), s.reads.readingStats({})]);
  assert.equal(s.store.calls.readingStats, 3);
});

for (const [random, factor] of [[() => 0, 0.9], [() => 0.5, 1], [() => 1 - 1e-12, 1.1]] as const) {
  Deno.test(`ReadCache spreads TTLs by jitter: random ${random()} gives ${factor} x TTL`, async () => {
    await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
      await s.reads.readingStats({ user_id: "u" });
      await s.reads.listReadings({ meter_id: "m1", order: "desc", limit: 1 });
      await s.reads.hourlyStats("m1", H10 - HOUR, H10);
      assert.deepEqual(s.cache.ttls, [
        Math.round(TTL.userStatsMs * factor),
        Math.round(TTL.recentReadingsMs * factor),
        Math.round(TTL.hourlyStatsMs * factor),
      ]);
    }, { random });
  });
}

Deno.test("ReadCache TTLs with Math.random stay within ±10 % and vary", async () => {
  await withReads(new LruCache({ maxEntries: 1000 }), async (s) => {
    for (let i = 0; i < 200; i++) await s.reads.readingStats({ user_id: `u${i}` });
    assert.equal(s.cache.ttls.length, 200);
    for (const ttl of s.cache.ttls) {
      assert.ok(ttl >= TTL.userStatsMs * 0.9 && ttl <= TTL.userStatsMs * 1.1, `TTL ${ttl}`);
    }
    assert.ok(new Set(s.cache.ttls).size > 50, "TTLs vary");
  });
});

Deno.test("ReadCache caches hourly stats of closed hours only, by the injected clock", async () => {
  await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
    await s.kv.insertReadings([row("m1", H10 - HOUR + MIN), row("m1", H10 + MIN)]);
    const twice = async (from: number, to: number) => {
      const before = s.store.calls.hourlyStats;
      await s.reads.hourlyStats("m1", from, to);
      await s.reads.hourlyStats("m1", from, to);
      return s.store.calls.hourlyStats - before;
    };
    assert.equal(await twice(H10 - 3 * HOUR, H10), 1, "closed: ends at the current hour");
    assert.equal(
      await twice(H10 - 3 * HOUR, H10 - HOUR + 30 * MIN),
      1,
      "closed: inside a past hour",
    );
    assert.equal(await twice(H10 - 3 * HOUR, H10 + 1), 2, "open: reaches into the current hour");
    assert.equal(await twice(H10 - HOUR, NOW), 2, "open: up to now");
    // Once the hour has closed, the same range is cached.
    s.clock.set(H10 + HOUR);
    assert.equal(await twice(H10 - HOUR, NOW), 1);
    assert.equal((await s.reads.hourlyStats("m1", H10 - HOUR, NOW)).length, 2);
  });
});

Deno.test("ReadCache invalidates hourly stats for backfills only, with a clock-skew margin", async () => {
  await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
    const hourly = (rows: ReadingRow[]) => {
      s.cache.invalidations.length = 0;
      return s.reads.invalidateCommitted(rows).then(() =>
        s.cache.invalidations[0].filter((g) => g.startsWith("hourly:"))
      );
    };
    s.clock.set(NOW); // 10:30
    assert.deepEqual(await hourly([row("a", H10 + MIN), row("b", H10 - 1)]), ["hourly:b"]);
    s.clock.set(H10 + HOUR - 5_000); // 10:59:55: the hour closes within the 10 s margin
    assert.deepEqual(await hourly([row("c", H10 + 30 * MIN)]), ["hourly:c"]);
    s.clock.set(H10 + HOUR - 20_000); // 10:59:40: it does not
    assert.deepEqual(await hourly([row("d", H10 + 30 * MIN)]), []);
  });
});

Deno.test("ReadCache with a TTL of 0 does not cache that read", async () => {
  await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
    await s.reads.readingStats({ user_id: "u" });
    await s.reads.readingStats({ user_id: "u" });
    assert.equal(s.store.calls.readingStats, 2);
    await s.reads.listReadings({ meter_id: "m", order: "desc", limit: 1 });
    await s.reads.listReadings({ meter_id: "m", order: "desc", limit: 1 });
    assert.equal(s.store.calls.listReadings, 1);
  }, { ttl: { ...TTL, userStatsMs: 0 } });
});

Deno.test("ReadCache metrics count hits, misses, invalidations and time operations", async () => {
  await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
    await s.reads.readingStats({ user_id: "u" });
    await s.reads.readingStats({ user_id: "u" });
    await s.reads.readingStats({ user_id: "u" });
    await s.reads.hourlyStats("m", H10 - HOUR, H10);
    await s.reads.invalidateCommitted([row("m", H10 - MIN, { user_id: "u" })]);
    const m = s.metrics;
    assert.equal(metricLine(m, 'cache_hits_total{cache_type="user_stats"}'), 2);
    assert.equal(metricLine(m, 'cache_misses_total{cache_type="user_stats"}'), 1);
    assert.equal(metricLine(m, 'cache_misses_total{cache_type="hourly_stats"}'), 1);
    assert.equal(metricLine(m, 'cache_invalidations_total{cache_type="user_stats"}'), 2);
    assert.equal(metricLine(m, 'cache_invalidations_total{cache_type="hourly_stats"}'), 1);
    const d = "cache_operation_duration_seconds";
    assert.equal(metricLine(m, `${d}_count{cache_type="user_stats",operation="get"}`), 3);
    assert.equal(metricLine(m, `${d}_count{cache_type="user_stats",operation="fill"}`), 1);
    assert.equal(metricLine(m, `${d}_count{cache_type="user_stats",operation="invalidate"}`), 1);
    assert.equal(
      metricLine(m, `${d}_bucket{cache_type="user_stats",operation="get",le="+Inf"}`),
      3,
    );
    assert.ok(m.render().includes("# TYPE cache_errors_total counter"));
    // Declaring twice (a second ReadCache on one registry) keeps the values.
    new ReadCache({ cache: new LruCache({ maxEntries: 1 }), store: s.store, metrics: m, ttl: TTL });
    assert.equal(metricLine(m, 'cache_hits_total{cache_type="user_stats"}'), 2);
  });
});

// ---- Redis down -----------------------------------------------------------------------------------

interface RedisServer {
  url: string;
  process: Deno.ChildProcess;
  /** SIGKILL, then wait for the exit. */
  kill(): Promise<void>;
}

/** A redis-server of this test's own on a free port, ready to accept connections. */
async function startRedisServer(): Promise<RedisServer> {
  const probe = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  const port = (probe.addr as Deno.NetAddr).port;
  probe.close();
  const process = new Deno.Command("redis-server", {
    args: ["--port", String(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
    stdout: "piped",
    stderr: "null",
  }).spawn();
  const lines = process.stdout.pipeThrough(new TextDecoderStream());
  const reader = lines.getReader();
  let seen = "";
  while (!seen.includes("Ready to accept connections")) {
    const { value, done } = await reader.read();
    if (done) throw new Error(`redis-server on port ${port} exited before it was ready: ${seen}`);
    seen += value;
  }
  reader.releaseLock();
  const drained = lines.pipeTo(new WritableStream());
  return {
    url: `redis://127.0.0.1:${port}`,
    process,
    async kill() {
      try {
        process.kill("SIGKILL");
      } catch { /* already gone */ }
      await process.status;
      await drained.catch(() => {});
    },
  };
}

Deno.test("ReadCache reads from the store while Redis is down, counting cache errors", async () => {
  const server = await startRedisServer();
  const redis = await connect(server.url, { commandTimeout: 200 });
  try {
    const cache = new RedisCache(redis, { prefix: "t:" });
    await withReads(cache, async (s) => {
      await s.kv.insertReadings([row("m1", H10 - HOUR)]);
      await s.reads.readingStats({ user_id: "user-1" });
      await s.reads.readingStats({ user_id: "user-1" });
      assert.equal(metricLine(s.metrics, 'cache_hits_total{cache_type="user_stats"}'), 1);
      await server.kill();
      // Every read is answered from the store, fresh.
      await commit(s, [row("m1", H10 - 2 * HOUR)]);
      for (let i = 0; i < 3; i++) {
        assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
        assert.equal(
          (await s.reads.listReadings({ meter_id: "m1", order: "desc", limit: 5 })).items.length,
          2,
        );
      }
      const errors = (op: string) =>
        metricLine(s.metrics, `cache_errors_total{cache_type="user_stats",operation="${op}"}`) ?? 0;
      assert.equal(errors("invalidate"), 1);
      // The failed invalidation keeps user-1's stats and m1's readings away from the cache...
      assert.equal(errors("get"), 0);
      assert.equal(s.store.calls.readingStats, 4);
      // ...other keys still try it, and count the error.
      assert.equal((await s.reads.readingStats({ user_id: "user-2" })).reading_count, 0);
      assert.equal(errors("get"), 1);
      assert.equal(s.store.calls.readingStats, 5);
    }, { operationTimeoutMs: 500 });
  } finally {
    redis.disconnect();
    await server.kill();
  }
});

Deno.test("ReadCache bounds a read on a hung Redis, and re-sends a failed invalidation", async () => {
  const server = await startRedisServer();
  const redis = await connect(server.url, { commandTimeout: 5_000 });
  try {
    const cache = new RedisCache(redis, { prefix: "t:" });
    await withReads(cache, async (s) => {
      await s.kv.insertReadings([row("m1", H10 - HOUR)]);
      await s.reads.readingStats({ user_id: "user-1" }); // filled: 1 reading
      server.process.kill("SIGSTOP"); // Redis keeps its data but answers nothing
      try {
        await commit(s, [row("m1", H10 - 2 * HOUR)]); // the invalidation times out
        const started = performance.now();
        assert.equal((await s.reads.readingStats({ user_id: "user-2" })).reading_count, 0);
        const ms = performance.now() - started;
        assert.ok(ms < 1_500, `a read took ${ms} ms on a hung Redis`);
        // The stale entry is still in the hung Redis; this instance does not read it.
        assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
      } finally {
        server.process.kill("SIGCONT");
      }
      const errors = metricLine(
        s.metrics,
        'cache_errors_total{cache_type="user_stats",operation="invalidate"}',
      );
      assert.equal(errors, 1);
      // With the next batch (here: none) the pending invalidation goes out again.
      await s.reads.invalidateCommitted([]);
      assert.ok(s.cache.invalidations.at(-1)!.includes("stats:user:user-1"));
      assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
      const calls = s.store.calls.readingStats;
      assert.equal((await s.reads.readingStats({ user_id: "user-1" })).reading_count, 2);
      assert.equal(s.store.calls.readingStats, calls, "cached again after Redis came back");
    }, { operationTimeoutMs: 300 });
  } finally {
    redis.disconnect();
    await server.kill();
  }
});

Deno.test("LruCache forgets old generations safely: a fill holding one does not land", async () => {
  const cache = new LruCache({ maxEntries: 1 }); // keeps two generations
  const { generation } = await cache.get({ group: "a", item: "v" });
  await cache.get({ group: "b", item: "v" });
  await cache.get({ group: "c", item: "v" }); // a's generation is forgotten
  assert.equal(
    await cache.fill({ group: "a", item: "v" }, { generation, value: "x", ttlMs: 1000 }),
    false,
  );
  const again = await cache.get({ group: "a", item: "v" });
  assert.notEqual(again.generation, generation);
  assert.equal(again.value, undefined);
});

Deno.test("meterRoutes serve stats, recent readings and closed hours through the cache", async () => {
  await withReads(new LruCache({ maxEntries: 100 }), async (s) => {
    const clock = s.clock;
    const tokens = new TokenService({
      secret: "cache-test-secret-cache-test-secret-0123",
      ttlMs: HOUR,
      clock,
      state: new UserStateCache({
        load: () => Promise.resolve({ role: "user", disabled: false, token_generation: 0 }),
        clock,
      }),
    });
    // The device only serves the routes' ownership check.
    await storeDevice(
      s.kv,
      deviceRecord("m1", "user-1", { algorithm: "ed25519", public_key: "00" }, NOW),
    );
    const app = meterRoutes({
      registry: {} as ActorRegistry,
      store: s.kv,
      tokens,
      clock,
      cache: s.reads,
    });
    const { access_token } = await tokens.issue({
      id: "user-1",
      email: "u1@test.local",
      role: "user",
      wallet_address: null,
      created_at: NOW,
      disabled: false,
      token_generation: 0,
    });
    const get = async (path: string) => {
      const res = await app.request(path, { headers: { authorization: `Bearer ${access_token}` } });
      assert.equal(res.status, 200, await res.clone().text());
      return await res.json();
    };
    await commit(s, [row("m1", H10 - HOUR), row("m1", H10 - 2 * HOUR)]);
    assert.equal((await get("/stats")).reading_count, 2);
    assert.equal((await get("/stats")).reading_count, 2);
    assert.equal(s.store.calls.readingStats, 1);
    await commit(s, [row("m1", H10 - 3 * HOUR)]);
    assert.equal((await get("/stats")).reading_count, 3);
    assert.equal(s.store.calls.readingStats, 2);
    assert.equal((await get("/readings?meter_id=m1&limit=10")).items.length, 3);
    assert.equal((await get("/readings?meter_id=m1&limit=10")).items.length, 3);
    assert.equal((await get("/readings?limit=10")).items.length, 3); // no meter: not cached
    assert.equal(s.store.calls.listReadings, 2);
    const end = new Date(H10).toISOString();
    const hourly = `/m1/stats/hourly?start=${new Date(H10 - 5 * HOUR).toISOString()}&end=${end}`;
    assert.equal((await get(hourly)).hours.length, 3);
    assert.equal((await get(hourly)).hours.length, 3);
    assert.equal(s.store.calls.hourlyStats, 1);
    await get("/m1/stats/hourly"); // ends now: the open hour is never cached
    await get("/m1/stats/hourly");
    assert.equal(s.store.calls.hourlyStats, 3);
  });
});
