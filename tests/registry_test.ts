import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { ActorRegistry, type ReadingSink } from "../actors/registry.ts";
import type { Submission } from "../actors/meter_actor.ts";
import { ManualClock } from "../core/clock.ts";
import { silentLogger } from "../core/logger.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { KvStore } from "../db/kv_store.ts";
import type { InsertResult } from "../db/store.ts";
import { hmacDevice, plainUser, storeDevice } from "./_devices.ts";

const KEK = new Uint8Array(32).fill(3);
const SECRET = Buffer.alloc(32, 9);
const NOW = Date.parse("2026-11-29T12:00:00Z");
const WINDOW = 15 * 60_000;

/** A sink that writes straight to the store, with a gate to hold commits. */
class StoreSink implements ReadingSink {
  gate: Promise<void> = Promise.resolve();
  full = false;
  submitted = 0;
  constructor(private store: KvStore) {}
  submit(row: Parameters<ReadingSink["submit"]>[0]): Promise<InsertResult> | null {
    if (this.full) return null;
    this.submitted++;
    return this.gate.then(() => this.store.insertReadings([row])).then((r) => r[0]);
  }
}

async function setup(
  options: { maxActors?: number; mailboxMax?: number; store?: KvStore; recent?: number } = {},
) {
  const existing = options.store;
  const store = existing ?? await KvStore.open(undefined, { dedupeWindowMs: WINDOW });
  const clock = new ManualClock(NOW);
  if (!existing) {
    await store.createUser(plainUser("u1", NOW));
  }
  const addMeter = async (meterId: string) => {
    await storeDevice(store, hmacDevice(meterId, "u1", KEK, SECRET, NOW));
  };
  const sink = new StoreSink(store);
  const committed: string[] = [];
  const registry = new ActorRegistry({
    store,
    sink,
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
      bucket: { burst: 100, refillPerMs: 1 / 60_000 },
      keys: { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 },
      recent: options.recent ?? 4,
    },
    idleTtlMs: 60_000,
    maxActors: options.maxActors ?? 1000,
    mailboxMax: options.mailboxMax ?? 100,
    onCommitted: (r) => committed.push(r.id),
  });
  return { store, clock, sink, registry, committed, addMeter };
}

function reading(meterId: string, minutesAgo: number, kwh = "1.25"): Submission {
  const ts = new Date(NOW - minutesAgo * 60_000).toISOString().replace(".000Z", "Z");
  return {
    meter_id: meterId,
    kwh_amount: kwh,
    reading_timestamp: ts,
    device_signature: signHmac(SECRET, canonicalMessage(meterId, ts, kwh)),
    source: "mqtt",
  };
}

Deno.test("ActorRegistry activates one actor per meter and rehydrates its recent readings", async (t) => {
  const { store, registry, committed, addMeter } = await setup();
  await addMeter("m1");
  await t.step("messages sent during activation wait in the mailbox and run in order", async () => {
    const outcomes = await Promise.all([
      registry.submit(reading("m1", 60)),
      registry.submit(reading("m1", 60)),
      registry.submit(reading("m1", 30)),
    ]);
    assert.deepEqual(outcomes.map((o) => o.status), ["accepted", "duplicate", "accepted"]);
    assert.equal(registry.size, 1);
    assert.equal(committed.length, 2);
  });
  await t.step(
    "a new registry rehydrates the window: the replay never reaches the writer",
    async () => {
      const fresh = await setup({ store });
      const replay = await fresh.registry.submit(reading("m1", 30));
      assert.equal(replay.status, "duplicate");
      assert.equal(fresh.sink.submitted, 0);
    },
  );
  await store.close();
});

Deno.test("A meter actor applies its rules in memory: unknown meter, signature, window, owner", async () => {
  const { store, registry, addMeter } = await setup();
  await addMeter("m1");
  assert.equal((await registry.submit(reading("nope", 1))).status, "rejected");
  const bad = { ...reading("m1", 10), device_signature: "00".repeat(32) };
  const o1 = await registry.submit(bad);
  assert.equal(o1.status === "rejected" && o1.code, "bad_signature");
  assert.equal((await registry.submit(reading("m1", 10))).status, "accepted");
  const near = await registry.submit(reading("m1", 20));
  assert.equal(near.status, "duplicate");
  assert.equal((await registry.submit(reading("m1", 25))).status, "accepted");
  const forbidden = await registry.submit({
    ...reading("m1", 100),
    caller: { user_id: "someone-else", role: "user" },
  });
  assert.equal(forbidden.status === "rejected" && forbidden.code, "forbidden");
  await store.close();
});

Deno.test("Readings for unknown meters do not occupy the registry", async () => {
  const { store, registry, addMeter } = await setup();
  await addMeter("real");
  assert.equal((await registry.submit(reading("real", 60))).status, "accepted");
  for (let i = 0; i < 500; i++) {
    const outcome = await registry.submit(reading(`ghost-${i}`, 30));
    assert.equal(outcome.status === "rejected" && outcome.code, "unknown_meter");
  }
  // Concurrent ones share one activation each and leave nothing behind either.
  await Promise.all(Array.from({ length: 500 }, (_, i) => registry.submit(reading(`g${i}`, 30))));
  assert.equal(registry.size, 1);
  await store.close();
});

Deno.test("ActorRegistry passivates idle actors and caps live ones with LRU eviction", async (t) => {
  const { store, clock, registry, addMeter } = await setup({ maxActors: 3 });
  for (const m of ["a", "b", "c", "d"]) await addMeter(m);
  await t.step("the least recently used actor makes room", async () => {
    for (const m of ["a", "b", "c"]) await registry.submit(reading(m, 60));
    await registry.submit(reading("a", 30)); // touch "a": "b" is now the oldest
    await registry.submit(reading("d", 60));
    assert.equal(registry.size, 3);
  });
  await t.step("an evicted meter reactivates and still rejects its replays", async () => {
    const replay = await registry.submit(reading("b", 60));
    assert.equal(replay.status, "duplicate");
  });
  await t.step("sweep() drops actors idle longer than the TTL", () => {
    clock.advance(61_000);
    assert.equal(registry.sweep(), 3);
    assert.equal(registry.size, 0);
  });
  await store.close();
});

Deno.test("ActorRegistry refuses with overloaded when a mailbox or the writer is full", async (t) => {
  const { store, sink, registry, addMeter } = await setup({ mailboxMax: 2 });
  await addMeter("m1");
  await t.step("the mailbox bound gives an explicit overflow result", async () => {
    const outcomes = await Promise.all([
      registry.submit(reading("m1", 90)),
      registry.submit(reading("m1", 60)),
      registry.submit(reading("m1", 30)),
    ]);
    assert.deepEqual(outcomes.map((o) => o.status), ["accepted", "accepted", "rejected"]);
    assert.equal(outcomes[2].status === "rejected" && outcomes[2].code, "overloaded");
  });
  await t.step("a full writer answers overloaded and the reading can be retried", async () => {
    sink.full = true;
    const refused = await registry.submit(reading("m1", 0));
    assert.equal(refused.status === "rejected" && refused.code, "overloaded");
    sink.full = false;
    assert.equal((await registry.submit(reading("m1", 0))).status, "accepted");
  });
  await store.close();
});

Deno.test("invalidate() reloads a revoked device before the next reading", async () => {
  const { store, clock, registry, addMeter } = await setup();
  await addMeter("m1");
  assert.equal((await registry.submit(reading("m1", 60))).status, "accepted");
  const device = (await store.getDevice("m1"))!;
  await store.updateDevice("m1", () => ({
    device: { ...device, status: "revoked", revoked_at: clock.now() },
    audit: { id: "a2", meter_id: "m1", action: "revoked", actor: "test", at: clock.now() },
  }));
  registry.invalidate("m1");
  const outcome = await registry.submit(reading("m1", 30));
  assert.equal(outcome.status === "rejected" && outcome.code, "device_revoked");
  await store.close();
});

Deno.test("a revocation announced while the actor rehydrates applies before its first reading", async () => {
  const { store, registry, addMeter, clock } = await setup();
  await addMeter("m1");
  let reached!: () => void;
  const atRecent = new Promise<void>((r) => reached = r);
  let release!: () => void;
  const gate = new Promise<void>((r) => release = r);
  const recentReadingTimes = store.recentReadingTimes.bind(store);
  store.recentReadingTimes = async (m, n) => {
    reached();
    await gate;
    return recentReadingTimes(m, n);
  };
  const first = registry.submit(reading("m1", 60));
  await atRecent; // the device (still active) is loaded; the recent readings are loading
  await store.updateDevice("m1", (d) => ({
    device: { ...d, status: "revoked", revoked_at: clock.now() },
    audit: { id: "r1", meter_id: "m1", action: "revoked", actor: "test", at: clock.now() },
  }));
  registry.invalidate("m1");
  release();
  const outcome = await first;
  assert.equal(outcome.status === "rejected" && outcome.code, "device_revoked");
  await store.close();
});

Deno.test("a replay of a reading still being written waits for its commit before answering", async () => {
  const { store, sink, registry, addMeter } = await setup();
  await addMeter("m1");
  let commit!: () => void;
  sink.gate = new Promise<void>((r) => commit = r);
  const first = registry.submit(reading("m1", 60));
  let answered = false;
  const replay = registry.submit(reading("m1", 60)).then((o) => {
    answered = true;
    return o;
  });
  // Let every microtask run: the replay must still be waiting, since nothing is stored yet.
  await new Promise((r) => setTimeout(r, 0));
  assert.equal(answered, false);
  commit();
  const [a, b] = await Promise.all([first, replay]);
  assert.equal(a.status, "accepted");
  assert.equal(b.status, "duplicate");
  assert.equal(b.status === "duplicate" && a.status === "accepted" && b.id, a.reading.id);
  await store.close();
});

Deno.test("a reading that only collided with a write which then failed is decided again", async () => {
  // The actor remembers 2 readings, so the one stored 75 minutes ago is known only to the store.
  const { store, sink, registry, addMeter } = await setup({ recent: 2 });
  await addMeter("m1");
  const stored = (minutesAgo: number) => ({
    meter_id: "m1",
    ts: NOW - minutesAgo * 60_000,
    kwh_e4: 1,
    user_id: "u1",
    wallet_address: null,
    key_id: "k1",
    device_signature: "x",
    source: "http" as const,
    submitted_at: NOW,
    minted: false,
  });
  await store.insertReadings([stored(75), stored(35), stored(15)]);
  let commit!: () => void;
  sink.gate = new Promise<void>((r) => commit = r);
  const a = registry.submit(reading("m1", 65)); // the store will find it collides with 75
  const b = registry.submit(reading("m1", 55)); // 20 minutes from every stored one: only near a
  commit();
  const [oa, ob] = await Promise.all([a, b]);
  assert.equal(oa.status, "duplicate");
  assert.equal(ob.status, "accepted");
  await store.close();
});
