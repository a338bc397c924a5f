// The scale-out code under attack: a hostile client, a hostile (or confused) bus, a flaky network.
// Each test is one finding; it failed before its fix in ws/hub.ts. The hub runs on PostgreSQL (a
// fresh schema per test), with an in-process bus whose connection state the test controls, and a
// store wrapper that counts the hub's store reads and can hold one back (a slow store, so that a
// replay is provably in progress while the test acts).
import assert from "node:assert/strict";
import type { Bus, EventHandler, Subscription } from "../bus/bus.ts";
import { LocalBus } from "../bus/local_bus.ts";
import type { GatewayEvent, ReadingAcceptedEvent, Topic } from "../core/events.ts";
import { silentLogger } from "../core/logger.ts";
import type { ReadingRow } from "../core/reading.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { DeviceRecheck } from "../services/device_recheck.ts";
import { eventOf, type HubStore, WsHub } from "../ws/hub.ts";
import { positionsOf, recorder, waitFor } from "./_hub_clients.ts";
import { deviceRecord, plainUser, storeDevice } from "./_devices.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
  type TestSchema,
} from "./_services.ts";

const MINUTE = 60_000;
const PG_URL = postgresUrl();
const service = await requireService(`PostgreSQL at ${redactUrl(PG_URL)}`, probePostgres(PG_URL));

function hostileTest(name: string, fn: () => Promise<void>): void {
  Deno.test({
    name: service.ok ? name : `${name} (ignored: ${service.reason})`,
    ignore: !service.ok,
    fn,
  });
}

/** The in-process bus, plus an outage the test switches on and off (as Redis would). */
class SwitchedBus implements Bus {
  #local = new LocalBus();
  #listeners = new Set<(up: boolean) => void>();
  connected = true;
  get stats() {
    return this.#local.stats;
  }
  publish(events: readonly GatewayEvent[]): Promise<void> {
    return this.#local.publish(events);
  }
  subscribe(topic: Topic, handler: EventHandler): Subscription {
    return this.#local.subscribe(topic, handler);
  }
  onConnectionChange(listener: (up: boolean) => void): () => void {
    this.#listeners.add(listener);
    return () => this.#listeners.delete(listener);
  }
  setConnected(up: boolean): void {
    this.connected = up;
    for (const listener of this.#listeners) listener(up);
  }
  close(): Promise<void> {
    return this.#local.close();
  }
}

/** What the hub read from the store; `hold()` makes the next readingsAfter wait for `release`. */
interface Reads {
  readingsAfter: number;
  lastSeqs: number;
  /** lastSeqs calls answered. */
  lastSeqsDone: number;
  listDevices: number;
  /** Makes the next listDevices call fail (the store is down). */
  failListDevices: boolean;
  /**
   * Holds the next readingsAfter call: `waiting` resolves once it waits, `done` once it was
   * answered after `release` and the hub had a turn to act on the answer.
   */
  hold(): { waiting: Promise<void>; release: () => void; done: Promise<void> };
}

interface Fixture extends AsyncDisposable {
  store: PostgresStore;
  bus: SwitchedBus;
  hub: WsHub;
  reads: Reads;
  commit(meter: string, n: number, owner?: string): Promise<ReadingRow[]>;
}

async function fixture(resumeMax = 1000): Promise<Fixture> {
  const schema: TestSchema = await createTestSchema(PG_URL);
  const store = await PostgresStore.connect(schema.url, { dedupeWindowMs: 1000, max: 4 });
  const bus = new SwitchedBus();
  type Held = Record<"waiting" | "gate" | "done", PromiseWithResolvers<void>>;
  let held: Held | null = null;
  const reads: Reads = {
    readingsAfter: 0,
    lastSeqs: 0,
    lastSeqsDone: 0,
    listDevices: 0,
    failListDevices: false,
    hold() {
      const h: Held = {
        waiting: Promise.withResolvers(),
        gate: Promise.withResolvers(),
        done: Promise.withResolvers(),
      };
      held = h;
      return {
        waiting: h.waiting.promise,
        release: () => h.gate.resolve(),
        done: h.done.promise,
      };
    },
  };
  const hubStore: HubStore = {
    async readingsAfter(meter, after, limit) {
      reads.readingsAfter++;
      const h = held;
      held = null;
      if (!h) return store.readingsAfter(meter, after, limit);
      h.waiting.resolve();
      await h.gate.promise;
      try {
        return await store.readingsAfter(meter, after, limit);
      } finally {
        // A macrotask later: the hub's continuation (a chain of microtasks) has run.
        setTimeout(() => h.done.resolve(), 0);
      }
    },
    async lastSeqs(meters) {
      reads.lastSeqs++;
      const heads = await store.lastSeqs(meters);
      reads.lastSeqsDone++;
      return heads;
    },
    listDevices(query) {
      reads.listDevices++;
      if (reads.failListDevices) {
        reads.failListDevices = false;
        return Promise.reject(new Error("connection refused"));
      }
      return store.listDevices(query);
    },
  };
  const hub = new WsHub({
    bus,
    store: hubStore,
    logger: silentLogger,
    sendBufferMax: 1 << 20,
    resumeMax,
  });
  const next = new Map<string, number>();
  return {
    store,
    bus,
    hub,
    reads,
    async commit(meter, n, owner = "u1") {
      const rows: ReadingRow[] = [];
      for (let i = 0; i < n; i++) {
        const ts = next.get(meter) ?? Date.now() - 5 * 24 * 60 * MINUTE;
        next.set(meter, ts + MINUTE);
        rows.push({
          meter_id: meter,
          ts,
          kwh_e4: 10_000,
          user_id: owner,
          wallet_address: null,
          key_id: "k1",
          device_signature: `sig-${ts}`,
          source: "http",
          submitted_at: ts,
          minted: false,
        });
      }
      const results = await store.insertReadings(rows);
      return rows.map((row, i) => {
        const result = results[i];
        assert.equal(result.status, "stored");
        return { ...row, seq: (result as { seq: number }).seq };
      });
    },
    async [Symbol.asyncDispose]() {
      hub.close();
      await bus.close();
      await store.close();
      await schema.drop();
    },
  };
}

/** An event as another instance (or anyone able to PUBLISH on the bus) could send it. */
function forged(row: ReadingRow, seq: number): ReadingAcceptedEvent {
  return { ...eventOf(row), position: `${row.meter_id}@${seq}` };
}

hostileTest(
  "a user resuming a meter that changed hands is not replayed the new owner's readings",
  async () => {
    // The re-registration's device.changed never reached this instance (lost during a bus
    // outage: DeviceRecheck reloads actors, not WebSocket subscriptions), or it crossed the
    // route's ownership check, which runs before the hub follows the meter.
    await using f = await fixture();
    await f.commit("m1", 2, "alice");
    await f.commit("m1", 2, "bob"); // m1 now bob's
    const alice = recorder("alice");
    f.hub.attach(alice);
    await f.hub.subscribe(alice, { meters: ["m1"], since: "m1@0" });
    assert.deepEqual(positionsOf(alice), ["m1@1", "m1@2"], "alice's own readings only");

    // Live: bob's next reading ends alice's subscription instead of reaching her.
    const [live] = await f.commit("m1", 1, "bob");
    await f.bus.publish([eventOf(live)]);
    assert.deepEqual(positionsOf(alice), ["m1@1", "m1@2"]);
    assert.deepEqual(alice.sent.at(-1), {
      type: "unsubscribed",
      meters: ["m1"],
      reason: 'Meter "m1" is no longer yours',
    });
    assert.equal(f.hub.subscriptions(alice).meter_count, 0);
  },
);

hostileTest(
  "an event with a seq the store does not have makes no endless store loop",
  async () => {
    // A message from another deployment sharing the Redis prefix, or forged by a Redis user:
    // before the fix every follower re-read the store in a loop that never ended.
    await using f = await fixture();
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"] });
    const [first] = await f.commit("m1", 1);
    await f.bus.publish([forged(first, 6)]); // 2 … 5 do not exist
    // Real readings follow; each commit is a store round trip the loop would have used.
    for (let i = 0; i < 3; i++) {
      const [row] = await f.commit("m1", 1);
      await f.bus.publish([eventOf(row)]);
    }
    await waitFor(() => positionsOf(client).length >= 4, "the real readings");
    assert.deepEqual(positionsOf(client), ["m1@1", "m1@2", "m1@3", "m1@4"]);
    const before = f.reads.readingsAfter;
    // Give a loop, if any, the time of a few more store round trips.
    for (let i = 0; i < 5; i++) await f.store.lastSeqs(["m1"]);
    assert.equal(f.reads.readingsAfter, before, "the store is not queried in a loop");
    assert.ok(before <= 2, `${before} gap reads for one forged event`);
  },
);

hostileTest(
  "an event with a huge seq does not silence the meter for every follower",
  async () => {
    await using f = await fixture();
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"] });
    const [first] = await f.commit("m1", 1);
    await f.bus.publish([eventOf(first)]);
    await f.bus.publish([forged(first, Number.MAX_SAFE_INTEGER)]);
    const [second] = await f.commit("m1", 1);
    await f.bus.publish([eventOf(second)]);
    await waitFor(
      () =>
        positionsOf(client).length >= 2 || client.sent.some((m) => m.type === "resync_required"),
      "the next reading (or a resync)",
    );
    assert.deepEqual(positionsOf(client), ["m1@1", "m1@2"]);
    assert.equal(f.hub.subscriptions(client, ["m1"]).positions.m1, "m1@2");
  },
);

hostileTest(
  "unsubscribing during a gap fill stops it; subscribing again gets each reading once",
  async () => {
    await using f = await fixture();
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"] });
    const rows = await f.commit("m1", 600);
    const held = f.reads.hold();
    await f.bus.publish([eventOf(rows.at(-1)!)]); // 1 … 599 lost: a gap fill starts
    await held.waiting;
    f.hub.unsubscribe(client, { meters: ["m1"] });
    await f.hub.subscribe(client, { meters: ["m1"], since: "m1@0" }); // replays 1 … 600
    assert.equal(positionsOf(client).length, 600);
    const after = f.reads.readingsAfter;
    held.release();
    await held.done; // the abandoned fill's read: before the fix it sent its rows and read on
    assert.equal(f.reads.readingsAfter, after, "the abandoned fill reads no further");
    const seen = positionsOf(client);
    assert.equal(new Set(seen).size, seen.length, "no reading twice");
    assert.equal(seen.length, 600);
  },
);

hostileTest(
  "two connections of one owner subscribing to their account at once both follow its meters",
  async () => {
    await using f = await fixture();
    await f.store.createUser(plainUser("u1", Date.now()));
    for (const meter of ["a1", "a2"]) {
      await storeDevice(f.store, deviceRecord(meter, "u1", { algorithm: "hmac-sha256" }));
    }
    const phone = recorder("u1");
    const laptop = recorder("u1");
    f.hub.attach(phone);
    f.hub.attach(laptop);
    await Promise.all([
      f.hub.subscribe(phone, { account: true }),
      f.hub.subscribe(laptop, { account: true }),
    ]);
    assert.deepEqual(Object.keys(f.hub.accountPositions(laptop)).sort(), ["a1", "a2"]);
    const [row] = await f.commit("a2", 1);
    await f.bus.publish([eventOf(row)]);
    assert.deepEqual(positionsOf(phone), ["a2@1"]);
    assert.deepEqual(positionsOf(laptop), ["a2@1"]);
  },
);

hostileTest(
  "an account subscription the store could not answer adds nothing and can be retried",
  async () => {
    await using f = await fixture();
    await f.store.createUser(plainUser("u1", Date.now()));
    await storeDevice(f.store, deviceRecord("a1", "u1", { algorithm: "hmac-sha256" }));
    const client = recorder("u1");
    f.hub.attach(client);
    f.reads.failListDevices = true;
    await assert.rejects(
      f.hub.subscribe(client, { meters: ["a1"], account: true }),
      (e: Error & { code?: string }) => e.code === "unavailable",
    );
    const view = f.hub.subscriptions(client);
    assert.equal(view.meter_count, 0, "no phantom meter counted against the 1,000");
    assert.equal(view.account, false);
    await f.hub.subscribe(client, { account: true });
    assert.deepEqual(Object.keys(f.hub.accountPositions(client)), ["a1"]);
  },
);

hostileTest(
  "a bus outage that ends while a replay runs is caught up after the replay",
  async () => {
    await using f = await fixture();
    await f.commit("m1", 3);
    const client = recorder("u1");
    f.hub.attach(client);
    const held = f.reads.hold();
    const subscribing = f.hub.subscribe(client, { meters: ["m1"], since: "m1@0" });
    await held.waiting; // replaying 1 … 3
    f.bus.setConnected(false);
    await f.commit("m1", 1); // 4: its event is lost with the outage
    const seqsRead = f.reads.lastSeqsDone;
    f.bus.setConnected(true); // the hub catches its clients up from the store …
    await waitFor(() => f.reads.lastSeqsDone > seqsRead, "the catch-up's read of the heads");
    held.release(); // … while this client's replay is still running
    await subscribing;
    await waitFor(() => positionsOf(client).length >= 4, "m1@4, committed during the outage");
    assert.deepEqual(positionsOf(client), ["m1@1", "m1@2", "m1@3", "m1@4"]);
  },
);

hostileTest(
  "Redis flapping: an outage that begins while the post-outage recheck runs is rechecked too",
  async () => {
    // Before the fix the second outage had no recheck timer and, once over, no recheck at all:
    // a device revoked during it stayed accepted by this instance's cached actor.
    const schema = await createTestSchema(PG_URL);
    const store = await PostgresStore.connect(schema.url, { dedupeWindowMs: 1000, max: 2 });
    const bus = new SwitchedBus();
    const changed: string[] = [];
    let hold: PromiseWithResolvers<void> | null = null;
    const recheck = new DeviceRecheck({
      bus,
      store: {
        async devicesChangedSince(since) {
          const gate = hold;
          hold = null;
          await gate?.promise;
          return store.devicesChangedSince(since);
        },
      },
      clock: { now: () => Date.now() },
      logger: silentLogger,
      intervalMs: 3_600_000, // the test runs the checks itself
      onChanged: (meterId, status) => changed.push(`${meterId}:${status}`),
    });
    try {
      await store.createUser(plainUser("u1", Date.now()));
      await storeDevice(store, deviceRecord("flap-1", "u1", { algorithm: "hmac-sha256" }));
      bus.setConnected(false);
      await recheck.check();
      changed.length = 0; // the registration above is not what this test is about
      hold = Promise.withResolvers();
      const gate = hold;
      bus.setConnected(true); // the recheck after the outage starts, and waits on the store
      bus.setConnected(false); // Redis is gone again before it is done
      gate.resolve();
      await recheck.check(); // joins the running one
      await store.updateDevice("flap-1", (device) => ({
        device: { ...device, status: "revoked", revoked_at: Date.now(), updated_at: Date.now() },
        audit: {
          id: crypto.randomUUID(),
          meter_id: "flap-1",
          action: "revoked",
          actor: "test",
          at: Date.now(),
        },
      }));
      await recheck.check(); // what the interval does during the second outage
      assert.deepEqual(changed, ["flap-1:revoked"]);
    } finally {
      await recheck.close();
      await bus.close();
      await store.close();
      await schema.drop();
    }
  },
);
