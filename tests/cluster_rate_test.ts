// The per-meter rate limit across instances: two registries ("instances", each with its own
// ClusterRateLimiter) share one meter, readings split round-robin between them, one Redis.
// The shared Redis of the machine is used with a unique key prefix per test; outage and
// command-count tests start their own redis-server, the cluster test three of them.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { Cluster, Redis } from "ioredis";
import { ClusterRateLimiter } from "../actors/cluster_rate.ts";
import type { Submission } from "../actors/meter_actor.ts";
import { ActorRegistry, type ReadingSink, type WriteResult } from "../actors/registry.ts";
import { ManualClock } from "../core/clock.ts";
import { keySlot } from "../core/key_slot.ts";
import { type Logger, silentLogger } from "../core/logger.ts";
import type { Outcome } from "../core/outcome.ts";
import type { ReadingRow } from "../core/reading.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { TokenBucket } from "../core/token_bucket.ts";
import { KvStore } from "../db/kv_store.ts";
import { hmacDevice, plainUser, storeDevice } from "./_devices.ts";
import {
  cli,
  redisBinariesAvailable,
  startRedisCluster,
  startRedisServer,
} from "./_redis_cluster.ts";
import { redisUrl } from "./_services.ts";
import { memoryLogger } from "./_memory_logger.ts";

const KEK = new Uint8Array(32).fill(3);
const SECRET = Buffer.alloc(32, 9);
const NOW = Date.parse("2026-11-29T12:00:00Z");
/** Readings one second apart must not collide. */
const WINDOW = 1000;
const BURST = 20;
/** One token per second. */
const REFILL = 1 / 1000;
const BUCKET = { burst: BURST, refillPerMs: REFILL };
const SYNC_MS = 250;

const redisBinaries = await redisBinariesAvailable();

/** A sink that "stores" every row at once (the writer is not what is tested here). */
class InstantSink implements ReadingSink {
  #seq = 0;
  submit(_row: ReadingRow): Promise<WriteResult> {
    return Promise.resolve({ status: "stored", seq: ++this.#seq } as WriteResult);
  }
}

interface Instance {
  registry: ActorRegistry;
  limiter?: ClusterRateLimiter;
}

async function sharedStore(meterIds: string[]): Promise<KvStore> {
  const store = await KvStore.open(undefined, { dedupeWindowMs: WINDOW });
  await store.createUser(plainUser("u1", NOW));
  for (const id of meterIds) await storeDevice(store, hmacDevice(id, "u1", KEK, SECRET, NOW));
  return store;
}

function instance(
  store: KvStore,
  clock: ManualClock,
  rate?: { redis: Redis | Cluster; prefix: string; logger?: Logger },
  bucket = BUCKET,
): Instance {
  const limiter = rate &&
    new ClusterRateLimiter({
      redis: rate.redis,
      prefix: rate.prefix,
      bucket,
      clock,
      logger: rate.logger ?? silentLogger,
      intervalMs: SYNC_MS,
    });
  const registry = new ActorRegistry({
    store,
    sink: new InstantSink(),
    clock,
    logger: silentLogger,
    kek: KEK,
    settings: {
      rules: {
        kwhMax: 100,
        maxAgeMs: 7 * 86_400_000,
        maxFutureMs: 300_000,
        dedupeWindowMs: WINDOW,
      },
      bucket,
      keys: { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 },
      recent: 4,
    },
    idleTtlMs: 3_600_000,
    maxActors: 1000,
    mailboxMax: 1000,
    rate: limiter,
  });
  return { registry, limiter };
}

let nextSecond = 0;
/** A signed reading with a timestamp no other reading of the run has. */
function reading(meterId: string): Submission {
  const ts = new Date(NOW - 5 * 86_400_000 + nextSecond++ * 1000).toISOString().replace(
    ".000Z",
    "Z",
  );
  return {
    meter_id: meterId,
    kwh_amount: "1.25",
    reading_timestamp: ts,
    device_signature: signHmac(SECRET, canonicalMessage(meterId, ts, "1.25")),
    source: "mqtt",
  };
}

const accepted = (o: Outcome) => o.status === "accepted";

function prefix(): string {
  return `test:rate:${crypto.randomUUID().slice(0, 8)}:`;
}

async function dropKeys(redis: Redis, pattern: string): Promise<void> {
  const keys = await redis.keys(pattern);
  if (keys.length > 0) await redis.del(...keys);
}

/**
 * Sends `perSecond` readings of one meter for `seconds` (simulated), round-robin over the
 * instances, plus `burst` readings at once at the start; every sync interval each limiter runs
 * one round (concurrently, as separate processes would). Returns the admitted totals after
 * each interval.
 */
async function flood(
  instances: Instance[],
  clock: ManualClock,
  meterId: string,
  options: { perSecond: number; seconds: number; burst?: number },
): Promise<{ t: number; admitted: number }[]> {
  const start = clock.now();
  let admitted = 0;
  let turn = 0;
  const send = async () => {
    const target = instances[turn++ % instances.length];
    if (accepted(await target.registry.submit(reading(meterId)))) admitted++;
  };
  for (let i = 0; i < (options.burst ?? 0); i++) await send();
  const stepMs = 1000 / options.perSecond;
  const samples: { t: number; admitted: number }[] = [];
  let nextSync = start + SYNC_MS;
  for (let at = start + stepMs; at <= start + options.seconds * 1000; at += stepMs) {
    while (nextSync <= at) {
      clock.set(nextSync);
      await Promise.all(instances.map((i) => i.limiter?.sync()));
      samples.push({ t: nextSync - start, admitted });
      nextSync += SYNC_MS;
    }
    clock.set(at);
    await send();
  }
  samples.push({ t: clock.now() - start, admitted });
  return samples;
}

// ---- bucket math ---------------------------------------------------------------------------

Deno.test("TokenBucket.lower() never raises the level, carries a debt, and refills to its own time", () => {
  const bucket = new TokenBucket(BUCKET, 0);
  for (let i = 0; i < 10; i++) assert.equal(bucket.take(BUCKET, 0), 0);
  bucket.lower(BUCKET, 15, 0); // above its own 10: unchanged
  for (let i = 0; i < 10; i++) assert.equal(bucket.take(BUCKET, 0), 0);
  assert.ok(bucket.take(BUCKET, 0) > 0);

  const debt = new TokenBucket(BUCKET, 0);
  debt.lower(BUCKET, -4, 0);
  // Five seconds to get back to 1 token.
  assert.equal(debt.take(BUCKET, 0), 5000);
  assert.ok(debt.take(BUCKET, 4990) > 0);
  assert.equal(debt.take(BUCKET, 5000), 0);

  // A level computed before the bucket's last take refills by the time in between.
  const late = new TokenBucket(BUCKET, 0);
  late.take(BUCKET, 2000);
  late.lower(BUCKET, 0, 1000);
  assert.equal(late.take(BUCKET, 2000), 0); // 0 at 1s + 1 by 2s
  assert.ok(late.take(BUCKET, 2000) > 0);
});

Deno.test("keySlot() is Redis Cluster's CRC16 slot, hash tags included", () => {
  assert.equal(keySlot("123456789"), 0x31c3);
  assert.equal(keySlot("{user1000}.following"), keySlot("user1000"));
  assert.equal(keySlot("foo{}{bar}"), keySlot("foo{}{bar}"));
  assert.notEqual(keySlot("foo{}{bar}"), keySlot("bar"));
  assert.equal(keySlot("foo{{bar}}zap"), keySlot("{bar"));
});

// ---- two instances, one Redis ------------------------------------------------------------------

Deno.test("two instances sharing a meter stay within B + r·t + the stated tolerance", async (t) => {
  const redis = new Redis(redisUrl(), { lazyConnect: true, enableOfflineQueue: false });
  await redis.connect();
  const store = await sharedStore(["m-flood", "m-burst", "m-free"]);
  const keys = prefix();
  try {
    const N = 2;
    const W = 2 * SYNC_MS; // round trips take no simulated time here
    const stated = (seconds: number) =>
      BURST + REFILL * seconds * 1000 + (N - 1) * (BURST + REFILL * W);
    const steady = (N - 1) * (1 + REFILL * W);

    await t.step("a flood of 40 readings/s for 60 s", async () => {
      const clock = new ManualClock(NOW);
      const pair = [1, 2].map(() => instance(store, clock, { redis, prefix: keys }));
      const samples = await flood(pair, clock, "m-flood", { perSecond: 40, seconds: 60 });
      let peak = -Infinity;
      for (const { t, admitted } of samples) {
        assert.ok(admitted <= stated(t / 1000), `${admitted} admitted by ${t} ms`);
        peak = Math.max(peak, admitted - (BURST + REFILL * t));
      }
      const last = samples.at(-1)!;
      const excess = last.admitted - (BURST + REFILL * last.t);
      console.log(
        `flood: ${last.admitted} admitted in 60 s (single bucket: 80); peak excess ` +
          `${peak.toFixed(2)}, final ${excess.toFixed(2)}`,
      );
      assert.ok(excess <= steady, `final excess ${excess}`);
      // Not much stricter than one bucket either.
      assert.ok(last.admitted >= BURST + REFILL * last.t - 2, `${last.admitted}`);
      assert.equal(pair[0].limiter!.stats.failures, 0);
    });

    await t.step("a burst reaching both instances at once, then 40/s for 60 s", async () => {
      const clock = new ManualClock(NOW);
      const pair = [1, 2].map(() => instance(store, clock, { redis, prefix: keys }));
      const samples = await flood(pair, clock, "m-burst", {
        perSecond: 40,
        seconds: 60,
        burst: 100,
      });
      let peak = -Infinity;
      for (const { t, admitted } of samples) {
        assert.ok(admitted <= stated(t / 1000), `${admitted} admitted by ${t} ms`);
        peak = Math.max(peak, admitted - (BURST + REFILL * t));
      }
      const last = samples.at(-1)!;
      const excess = last.admitted - (BURST + REFILL * last.t);
      console.log(
        `burst: ${last.admitted} admitted in 60 s (single bucket: 80); peak excess ` +
          `${peak.toFixed(2)} (bound ${((N - 1) * (BURST + REFILL * W)).toFixed(1)}), ` +
          `final ${excess.toFixed(2)}`,
      );
      // Both full buckets spent before the first round: the (N − 1)·B of the bound.
      assert.ok(peak >= BURST - 1);
      // The debt was repaid: back at one bucket's total.
      assert.ok(excess <= steady, `final excess ${excess}`);
    });

    await t.step("without the limiter the pair admits about twice as much", async () => {
      const clock = new ManualClock(NOW);
      const pair = [1, 2].map(() => instance(store, clock));
      const samples = await flood(pair, clock, "m-free", { perSecond: 40, seconds: 60 });
      const last = samples.at(-1)!;
      console.log(`no limiter: ${last.admitted} admitted in 60 s`);
      assert.ok(last.admitted >= 1.9 * (BURST + REFILL * last.t), `${last.admitted}`);
    });
  } finally {
    await store.close();
    await dropKeys(redis, `${keys}*`);
    redis.disconnect();
  }
});

Deno.test("start() syncs on its timer and close() stops it", async () => {
  const redis = new Redis(redisUrl(), { lazyConnect: true, enableOfflineQueue: false });
  await redis.connect();
  const store = await sharedStore(["m-timer"]);
  const keys = prefix();
  const clock = new ManualClock(NOW);
  const one = instance(store, clock, { redis, prefix: keys });
  try {
    one.limiter!.start();
    for (let i = 0; i < 5; i++) await one.registry.submit(reading("m-timer"));
    const deadline = Date.now() + 5000;
    while (one.limiter!.stats.rounds === 0 && Date.now() < deadline) {
      await new Promise((r) => setTimeout(r, 20));
    }
    assert.equal(one.limiter!.stats.rounds, 1);
    assert.equal(Number(await redis.hget(`${keys}rate:m-timer`, "tokens")), BURST - 5);
  } finally {
    await one.limiter!.close();
    await store.close();
    await dropKeys(redis, `${keys}*`);
    redis.disconnect();
  }
});

async function until(probe: () => Promise<boolean> | boolean, timeoutMs: number): Promise<void> {
  const deadline = Date.now() + timeoutMs;
  while (!(await probe())) {
    if (Date.now() > deadline) throw new Error(`Not reached within ${timeoutMs} ms`);
    await new Promise((r) => setTimeout(r, 25));
  }
}

async function commandCalls(port: number, command: string): Promise<number> {
  const info = await cli(port, ["INFO", "commandstats"]);
  const match = new RegExp(`cmdstat_${command}:calls=(\\d+)`).exec(info);
  return match ? Number(match[1]) : 0;
}

Deno.test({
  name: "one script call per sync round however many readings and meters",
  ignore: !redisBinaries.ok,
  async fn() {
    const server = await startRedisServer();
    const redis = new Redis(server.port, "127.0.0.1", {
      lazyConnect: true,
      enableOfflineQueue: false,
    });
    await redis.connect();
    const meters = Array.from({ length: 20 }, (_, i) => `m-count-${i}`);
    const store = await sharedStore(meters);
    const clock = new ManualClock(NOW);
    // A bucket large enough that every reading is admitted (and so reported).
    const big = { burst: 10_000, refillPerMs: REFILL };
    const one = instance(store, clock, { redis, prefix: "gtx:" }, big);
    try {
      const evalshaBefore = await commandCalls(server.port, "evalsha");
      const rounds = 8;
      let readings = 0;
      for (let round = 0; round < rounds; round++) {
        // 1, 2, 4, … readings per meter: the calls stay one per round.
        for (let k = 0; k < Math.min(2 ** round, 16); k++) {
          for (const id of meters) {
            await one.registry.submit(reading(id));
            readings++;
          }
        }
        clock.advance(SYNC_MS);
        await one.limiter!.sync();
      }
      const stats = one.limiter!.stats;
      const evalsha = (await commandCalls(server.port, "evalsha")) - evalshaBefore;
      const evals = await commandCalls(server.port, "eval");
      console.log(
        `${readings} readings of ${meters.length} meters in ${rounds} rounds: ` +
          `${evalsha} EVALSHA + ${evals} EVAL (the first, NOSCRIPT)`,
      );
      assert.equal(stats.rounds, rounds);
      assert.equal(evalsha, rounds);
      assert.equal(evals, 1);
      assert.equal(stats.calls, rounds + 1);
      assert.equal(stats.meters, rounds * meters.length);
      // A round with no readings sends nothing.
      await one.limiter!.sync();
      assert.equal(one.limiter!.stats.rounds, rounds);
    } finally {
      await store.close();
      redis.disconnect();
      await server.close();
    }
  },
});

Deno.test({
  name: "with Redis down each instance decides alone, logs once, and recovers by itself",
  ignore: !redisBinaries.ok,
  async fn() {
    const server = await startRedisServer();
    const redis = new Redis(server.port, "127.0.0.1", {
      lazyConnect: true,
      enableOfflineQueue: false,
      maxRetriesPerRequest: 1,
      retryStrategy: () => 50,
    });
    redis.on("error", () => {}); // reconnection attempts while the server is down
    await redis.connect();
    const store = await sharedStore(["m-out"]);
    const clock = new ManualClock(NOW);
    const logger = memoryLogger();
    const one = instance(store, clock, { redis, prefix: "gtx:", logger });
    const limiter = one.limiter!;
    const key = "gtx:rate:m-out";
    try {
      for (let i = 0; i < 5; i++) assert.ok(accepted(await one.registry.submit(reading("m-out"))));
      await limiter.sync();
      assert.equal(Number(await redis.hget(key, "tokens")), BURST - 5);

      await server.kill();
      await until(() => redis.status !== "ready", 5000);
      // The local bucket alone decides: its other 15 tokens, then rate_limited.
      const outcomes: Outcome[] = [];
      for (let i = 0; i < 20; i++) {
        outcomes.push(await one.registry.submit(reading("m-out")));
        await limiter.sync();
      }
      assert.equal(outcomes.filter(accepted).length, 15);
      const last = outcomes.at(-1)!;
      assert.equal(last.status === "rejected" && last.code, "rate_limited");
      assert.ok(limiter.degraded);
      assert.ok(limiter.stats.failures >= 15, `${limiter.stats.failures}`);
      assert.deepEqual(logger.entries.map((l) => l.level), ["warn"]);
      assert.equal(limiter.pending, 1);

      await server.start();
      await until(() => redis.status === "ready", 10_000);
      await limiter.sync();
      assert.ok(!limiter.degraded);
      assert.deepEqual(logger.entries.map((l) => l.level), ["warn", "info"]);
      // The restarted server had lost the bucket (a full one): the outage's 15 are charged.
      assert.equal(Number(await redis.hget(key, "tokens")), BURST - 15);
      assert.equal(limiter.pending, 0);
    } finally {
      await store.close();
      redis.disconnect();
      await server.close();
    }
  },
});

Deno.test({
  name: "on a Redis Cluster a round sends one call per slot and every bucket is right",
  ignore: !redisBinaries.ok,
  async fn() {
    const redisCluster = await startRedisCluster();
    const ports = redisCluster.servers.map((server) => server.port);
    const cluster = new Cluster(ports.map((port) => ({ host: "127.0.0.1", port })), {
      lazyConnect: true,
      enableOfflineQueue: false,
    });
    const meters = Array.from({ length: 40 }, (_, i) => `m-cl-${i}`);
    const store = await sharedStore(meters);
    try {
      await cluster.connect();
      await until(() => cluster.status === "ready", 10_000);

      const clock = new ManualClock(NOW);
      const pair = [1, 2].map(() => instance(store, clock, { redis: cluster, prefix: "gtx:" }));
      // Each meter: 3 readings on one instance, 2 on the other.
      for (const id of meters) {
        for (let i = 0; i < 5; i++) await pair[i % 2].registry.submit(reading(id));
      }
      await Promise.all(pair.map((p) => p.limiter!.sync()));
      const slots = new Set(meters.map((id) => keySlot(`gtx:rate:${id}`)));
      for (const id of meters.slice(0, 5)) {
        const viaServer = await cli(ports[0], ["CLUSTER", "KEYSLOT", `gtx:rate:${id}`]);
        assert.equal(Number(viaServer), keySlot(`gtx:rate:${id}`));
      }
      for (const p of pair) {
        const { stats } = p.limiter!;
        assert.equal(stats.failures, 0);
        assert.equal(stats.rounds, 1);
        assert.equal(stats.meters, meters.length);
        // One call per slot; calls reaching a node that has not seen the script yet are
        // repeated as EVAL (all of the first round's run concurrently).
        assert.ok(stats.calls >= slots.size && stats.calls <= 2 * slots.size, `${stats.calls}`);
      }
      for (const id of meters) {
        assert.equal(Number(await cluster.hget(`gtx:rate:${id}`, "tokens")), BURST - 5);
      }
      const firstRound = pair[0].limiter!.stats.calls;
      // The next round: exactly one call per slot.
      for (const id of meters) await pair[0].registry.submit(reading(id));
      await pair[0].limiter!.sync();
      assert.equal(pair[0].limiter!.stats.calls - firstRound, slots.size);
      for (const id of meters) {
        assert.equal(Number(await cluster.hget(`gtx:rate:${id}`, "tokens")), BURST - 6);
      }
      console.log(
        `cluster: ${meters.length} meters over ${slots.size} slots: first round ` +
          `${firstRound} calls (with NOSCRIPT retries), next ${slots.size}`,
      );
      await pair[1].limiter!.sync(); // nothing taken there since: no round
      assert.equal(pair[1].limiter!.stats.rounds, 1);
      // Both instances' buckets were lowered to the shared level: 14 more are admitted, not 30.
      let admitted = 0;
      for (let i = 0; i < 40; i++) {
        if (accepted(await pair[i % 2].registry.submit(reading("m-cl-0")))) admitted++;
        if (i % 4 === 3) await Promise.all(pair.map((p) => p.limiter!.sync()));
      }
      assert.ok(admitted <= BURST - 6 + 2, `${admitted}`);
    } finally {
      await store.close();
      cluster.disconnect();
      await redisCluster.close();
    }
  },
});
