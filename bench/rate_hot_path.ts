// deno run --allow-all bench/rate_hot_path.ts [decisions] [redis-url]
// The actor hot path with and without the ClusterRateLimiter: the same signed readings through
// ActorRegistry.submit (1,000 meters, an instant sink), limiter off, on without rounds, and on
// with real sync rounds every 250 ms against Redis. Prints nanoseconds per decision.
import { Buffer } from "node:buffer";
import { Redis } from "ioredis";
import { ClusterRateLimiter } from "../actors/cluster_rate.ts";
import { MeterActor, type Submission } from "../actors/meter_actor.ts";
import { ActorRegistry, type RateShare, type WriteResult } from "../actors/registry.ts";
import { systemClock } from "../core/clock.ts";
import { silentLogger } from "../core/logger.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { KvStore } from "../db/kv_store.ts";
import { hmacDevice, plainUser, storeDevice } from "../tests/_devices.ts";

const N = Number(Deno.args[0] ?? 100_000);
const URL = Deno.args[1] ?? "redis://127.0.0.1:6379";
const METERS = 1000;
const KEK = new Uint8Array(32).fill(3);
const SECRET = Buffer.alloc(32, 9);
const now = Math.floor(Date.now() / 1000) * 1000;
// Every reading admitted, so every one is counted for the next round.
const bucket = { burst: 1e9, refillPerMs: 1 };
const settings = {
  rules: { kwhMax: 100, maxAgeMs: 7 * 86_400_000, maxFutureMs: 300_000, dedupeWindowMs: 1000 },
  bucket,
  keys: { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 },
  recent: 8,
};

const store = await KvStore.open(undefined, { dedupeWindowMs: 1000 });
await store.createUser(plainUser("u1", now));
const meterIds = Array.from({ length: METERS }, (_, i) => `bench-${i}`);
for (const id of meterIds) await storeDevice(store, hmacDevice(id, "u1", KEK, SECRET, now));

/** `count` distinct signed readings, round-robin over the meters, from `offset` seconds on. */
function readings(count: number, offset: number): Submission[] {
  return Array.from({ length: count }, (_, i) => {
    const meterId = meterIds[i % METERS];
    const second = offset + Math.floor(i / METERS);
    const ts = new Date(now - 6 * 86_400_000 + second * 1000).toISOString().replace(".000Z", "Z");
    return {
      meter_id: meterId,
      kwh_amount: "1.5",
      reading_timestamp: ts,
      device_signature: signHmac(SECRET, canonicalMessage(meterId, ts, "1.5")),
      source: "mqtt",
    };
  });
}

const sink = { submit: () => Promise.resolve({ status: "stored", seq: 1 } as WriteResult) };

async function run(label: string, rate: RateShare | undefined, offset: number): Promise<number> {
  const registry = new ActorRegistry({
    store,
    sink,
    clock: systemClock,
    logger: silentLogger,
    kek: KEK,
    settings,
    idleTtlMs: 3_600_000,
    maxActors: 10_000,
    mailboxMax: 1000,
    rate,
  });
  // Activate every meter and warm up the JIT outside the timing.
  for (const msg of readings(METERS * 5, offset)) await registry.submit(msg);
  const batch = readings(N, offset + 10);
  let accepted = 0;
  let elapsed = 0;
  // Chunks of 1000, timed alone: between them the event loop runs timers (the sync rounds),
  // which a loop of immediately resolved submissions would otherwise starve.
  for (let i = 0; i < N; i += 1000) {
    const start = performance.now();
    for (const msg of batch.slice(i, i + 1000)) {
      if ((await registry.submit(msg)).status === "accepted") accepted++;
    }
    elapsed += performance.now() - start;
    await new Promise((resolve) => setTimeout(resolve, 1));
  }
  if (accepted !== N) throw new Error(`${label}: only ${accepted} of ${N} accepted`);
  return elapsed * 1e6 / N;
}

const median = (xs: number[]) => [...xs].sort((a, b) => a - b)[Math.floor(xs.length / 2)];

const redis = new Redis(URL, { lazyConnect: true, enableOfflineQueue: false });
await redis.connect();
const prefix = `bench:rate:${crypto.randomUUID().slice(0, 8)}:`;
const options = { redis, prefix, bucket, clock: systemClock, logger: silentLogger };
try {
  let offset = 0;
  const times: Record<string, number[]> = { off: [], counting: [], rounds: [] };
  let rounds = 0;
  let updates = 0;
  for (let repeat = 0; repeat < 5; repeat++) {
    times.off.push(await run("off", undefined, offset += 1000));
    times.counting.push(await run("counting", new ClusterRateLimiter(options), offset += 1000));
    const live = new ClusterRateLimiter({ ...options, intervalMs: 250 });
    live.start();
    times.rounds.push(await run("rounds", live, offset += 1000));
    await live.close();
    rounds += live.stats.rounds;
    updates += live.stats.meters;
  }
  const show = (label: string, xs: number[]) =>
    console.log(
      `${label.padEnd(36)} median ${median(xs).toFixed(0).padStart(5)} ns per decision ` +
        `(runs: ${xs.map((x) => x.toFixed(0)).join(", ")})`,
    );
  console.log(`${N} decisions per run over ${METERS} meters, 5 runs each`);
  show("limiter off", times.off);
  show("limiter on, counting only", times.counting);
  show("limiter on, rounds every 250 ms", times.rounds);
  console.log(`  rounds: ${rounds} in all, ${updates} meter updates`);

  // What the limiter adds to a decision: one took() (a Map lookup and an increment).
  const counter = new ClusterRateLimiter(options);
  const actors = meterIds.map((id) => new MeterActor(id, null, [], now));
  const calls = 10_000_000;
  for (let i = 0; i < 1_000_000; i++) counter.took(actors[i % METERS]);
  const start = performance.now();
  for (let i = 0; i < calls; i++) counter.took(actors[i % METERS]);
  const ns = (performance.now() - start) * 1e6 / calls;
  console.log(`took() alone: ${ns.toFixed(1)} ns per call (${calls} calls, ${METERS} meters)`);
} finally {
  const keys = await redis.keys(`${prefix}*`);
  for (let i = 0; i < keys.length; i += 500) await redis.del(...keys.slice(i, i + 500));
  redis.disconnect();
  await store.close();
}
