// The fan-out hub on its own: the in-process bus, a real Deno KV store, recording clients.
import assert from "node:assert/strict";
import { LocalBus } from "../bus/local_bus.ts";
import { silentLogger } from "../core/logger.ts";
import type { ReadingRow } from "../core/reading.ts";
import { KvStore } from "../db/kv_store.ts";
import { eventOf, WsHub } from "../ws/hub.ts";
import { positionsOf, recorder, waitFor } from "./_hub_clients.ts";
import { deviceRecord, storeDevice } from "./_devices.ts";

const MINUTE = 60_000;

interface Fixture extends AsyncDisposable {
  store: KvStore;
  bus: LocalBus;
  hub: WsHub;
  /** Stores `n` readings of `meter` (owner `u1`); returns them with their seq. */
  commit(meter: string, n: number, owner?: string): Promise<ReadingRow[]>;
}

async function fixture(resumeMax = 1000, positionCheckMs?: number): Promise<Fixture> {
  const dir = await Deno.makeTempDir({ prefix: "gw-hub-" });
  const store = await KvStore.open(`${dir}/gateway.kv`, { dedupeWindowMs: 1000 });
  const bus = new LocalBus();
  const hub = new WsHub({
    bus,
    store,
    logger: silentLogger,
    sendBufferMax: 1 << 20,
    resumeMax,
    positionCheckMs,
  });
  const next = new Map<string, number>();
  return {
    store,
    bus,
    hub,
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
          device_signature: "sig",
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
      await Deno.remove(dir, { recursive: true });
    },
  };
}

Deno.test("WsHub sends each meter's readings once and in seq order", async (t) => {
  await using f = await fixture();
  const client = recorder("u1");
  f.hub.attach(client);
  await f.hub.subscribe(client, { meters: ["m1"] });

  await t.step("live events in order are sent as they come", async () => {
    const rows = await f.commit("m1", 2);
    await f.bus.publish(rows.map(eventOf));
    assert.deepEqual(positionsOf(client), ["m1@1", "m1@2"]);
  });

  await t.step("an event delivered twice (two topics, two instances) is sent once", async () => {
    const [row] = await f.commit("m1", 1);
    await f.bus.publish([eventOf(row), eventOf(row)]);
    assert.deepEqual(positionsOf(client), ["m1@1", "m1@2", "m1@3"]);
  });

  await t.step("a skipped seq is filled in from the store before what follows", async () => {
    const rows = await f.commit("m1", 3); // 4, 5, 6: the bus loses 4 and 5
    await f.bus.publish([eventOf(rows[2])]);
    await waitFor(() => positionsOf(client).length === 6, "the gap filled");
    assert.deepEqual(positionsOf(client).slice(3), ["m1@4", "m1@5", "m1@6"]);
    await f.bus.publish([eventOf(rows[0])]); // the lost one arrives late: already sent
    assert.equal(positionsOf(client).length, 6);
  });
});

Deno.test("WsHub resumes from a position: the missed readings, then live, none twice", async (t) => {
  await using f = await fixture(10);
  await f.commit("m1", 5);

  await t.step("since m1@2 replays 3..5 before subscribe resolves", async () => {
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"], since: "m1@2" });
    assert.deepEqual(positionsOf(client), ["m1@3", "m1@4", "m1@5"]);
    assert.equal(f.hub.subscriptions(client, ["m1"]).positions.m1, "m1@5");
    const live = await f.commit("m1", 1);
    await f.bus.publish([eventOf({ ...live[0], seq: 5 }), eventOf(live[0])]);
    assert.deepEqual(positionsOf(client), ["m1@3", "m1@4", "m1@5", "m1@6"]);
  });

  await t.step("readings committed while the replay runs come once, after it", async () => {
    const client = recorder("u1");
    f.hub.attach(client);
    const subscribing = f.hub.subscribe(client, { meters: ["m1"], since: "m1@0" });
    const more = await f.commit("m1", 2); // 7, 8, published while the replay may be running
    await f.bus.publish(more.map(eventOf));
    await subscribing;
    await waitFor(() => positionsOf(client).length === 8, "replay and live");
    assert.deepEqual(positionsOf(client), [1, 2, 3, 4, 5, 6, 7, 8].map((n) => `m1@${n}`));
  });

  await t.step("a gap over the bound gets resync_required and no partial replay", async () => {
    await f.commit("m1", 10); // head 18; from 0 that is 18 > 10
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"], since: "m1@0" });
    assert.deepEqual(positionsOf(client), []);
    assert.deepEqual(client.sent, [{
      type: "resync_required",
      reason: "gap_too_large",
      meters: ["m1"],
      positions: { m1: "m1@18" },
    }]);
  });

  await t.step("a position from the future (another store) gets resync_required", async () => {
    const client = recorder("u1");
    f.hub.attach(client);
    await f.hub.subscribe(client, { meters: ["m1"], since: ["m1@999"] });
    assert.equal(client.sent[0].type, "resync_required");
  });

  await t.step("a malformed position is refused and subscribes nothing", async () => {
    const client = recorder("u1");
    f.hub.attach(client);
    await assert.rejects(
      f.hub.subscribe(client, { meters: ["m1"], since: "m1-no-seq" }),
      (e: Error & { code?: string }) => e.code === "invalid_payload",
    );
    assert.equal(f.hub.subscriptions(client).meter_count, 0);
  });
});

Deno.test("WsHub subscribes the bus only to what its clients need", async () => {
  await using f = await fixture();
  const user = recorder("u1");
  const admin = recorder("root", "admin");
  f.hub.attach(user);
  f.hub.attach(admin);
  assert.deepEqual(f.hub.topics.sort(), ["user:root", "user:u1"]);
  await f.hub.subscribe(user, { meters: ["m1", "m2"] });
  assert.deepEqual(f.hub.topics.sort(), ["meter:m1", "meter:m2", "user:root", "user:u1"]);
  await f.hub.subscribe(admin, { all: true, meters: ["m1"] });
  assert.ok(f.hub.topics.includes("all"));

  // The firehose client also follows m1: it still gets each reading once.
  const [row] = await f.commit("m1", 1);
  await f.bus.publish([eventOf(row)]);
  assert.deepEqual(positionsOf(admin), ["m1@1"]);
  assert.deepEqual(positionsOf(user), ["m1@1"]);

  f.hub.unsubscribe(admin, { all: true });
  assert.ok(!f.hub.topics.includes("all"), "no firehose without an admin on it");
  f.hub.detach(user);
  f.hub.detach(admin);
  assert.deepEqual(f.hub.topics, []);
});

Deno.test("WsHub re-checks subscriptions when a meter changes owner", async (t) => {
  await using f = await fixture();
  await storeDevice(f.store, deviceRecord("m1", "u1", { algorithm: "hmac-sha256" }));
  const follower = recorder("u1");
  const account = recorder("u2");
  const admin = recorder("root", "admin");
  for (const c of [follower, account, admin]) f.hub.attach(c);
  await f.hub.subscribe(follower, { meters: ["m1"] });
  await f.hub.subscribe(admin, { meters: ["m1"] });
  await f.hub.subscribe(account, { account: true });

  await t.step("the old owner's subscription ends with a message; the admin's stays", () => {
    f.hub.handleControl({
      type: "device.changed",
      data: { meter_id: "m1", change: "registered", user_id: "u2" },
    });
    assert.deepEqual(follower.sent.at(-1), {
      type: "unsubscribed",
      meters: ["m1"],
      reason: 'Meter "m1" is no longer yours',
    });
    assert.equal(f.hub.subscriptions(follower).meter_count, 0);
    assert.equal(f.hub.subscriptions(admin).meter_count, 1);
  });

  await t.step("the new owner's account subscription follows the meter", async () => {
    await waitFor(() => f.hub.accountPositions(account).m1 !== undefined, "follows m1");
    const [row] = await f.commit("m1", 1, "u2");
    await f.bus.publish([eventOf(row)]);
    assert.deepEqual(positionsOf(account), ["m1@1"]);
    assert.deepEqual(positionsOf(follower), [], "the old owner gets nothing more");
  });

  await t.step("a user.changed event closes older sessions with 4001", () => {
    f.hub.handleControl({
      type: "user.changed",
      data: { user_id: "u2", change: "logout", token_generation: 1 },
    });
    assert.equal(account.closedWith, 4001);
  });
});

Deno.test("WsHub sends a reading whose event was lost, at the next position check", async () => {
  await using f = await fixture(1000, 20);
  const client = recorder("u1");
  f.hub.attach(client);
  await f.hub.subscribe(client, { meters: ["m1"] });
  const [first, last] = await f.commit("m1", 2);
  await f.bus.publish([eventOf(first)]); // the last one's event never comes: no gap shows it
  await waitFor(() => positionsOf(client).length === 2, "the lost reading from the store");
  assert.deepEqual(positionsOf(client), ["m1@1", "m1@2"]);
  assert.equal(last.seq, 2);
});
