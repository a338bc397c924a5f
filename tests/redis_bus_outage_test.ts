// RedisBus through a Redis crash: a private redis-server (or a private 3-node cluster) is
// SIGKILLed and started again on the same port(s); the shared Redis is never touched.
import assert from "node:assert/strict";
import { Redis } from "ioredis";
import { whenConnected } from "../bus/open_bus.ts";
import { RedisBus } from "../bus/redis_bus.ts";
import type { RedisSpec } from "../core/config.ts";
import type { Topic } from "../core/events.ts";
import type { Logger } from "../core/logger.ts";
import { Inbox, reading, within } from "./contracts/bus_contract.ts";
import { freePort } from "./_mosquitto.ts";
import {
  cli,
  redisBinariesAvailable,
  startRedisCluster,
  startRedisServer,
} from "./_redis_cluster.ts";

const binaries = await redisBinariesAvailable();
const skipped = binaries.ok ? "" : ` (skipped: ${binaries.reason})`;
/** A publish while Redis is down must fail within this (it is refused before any I/O). */
const PROMPT_MS = 500;
const TOPICS: Topic[] = ["meter:o1", "meter:o2", "all", "control"];

function busOn(spec: RedisSpec, logger?: Logger): RedisBus {
  return new RedisBus(spec, {
    logger,
    prefix: "gtx-outage:",
    onError: () => {},
    publishTimeoutMs: 1_000,
    reconnect: { baseMs: 20, maxMs: 200 },
  });
}

/** Records a bus's connection changes; `next(value)` awaits the next one equal to `value`. */
class Changes {
  readonly seen: boolean[] = [];
  #waiters: { value: boolean; resolve: () => void }[] = [];
  readonly remove: () => void;

  constructor(bus: RedisBus) {
    this.remove = bus.onConnectionChange((connected) => {
      this.seen.push(connected);
      for (const waiter of this.#waiters.filter((w) => w.value === connected)) waiter.resolve();
      this.#waiters = this.#waiters.filter((w) => w.value !== connected);
    });
  }

  next(value: boolean): Promise<void> {
    return within(
      new Promise<void>((resolve) => this.#waiters.push({ value, resolve })),
      `onConnectionChange(${value})`,
    );
  }
}

/**
 * The outage scenario on any backend: `crash` kills every Redis process, `revive` starts them
 * again on the same ports; `count` tells how many server-side subscriptions a channel has.
 */
async function outage(
  spec: RedisSpec,
  crash: () => Promise<void>,
  revive: () => Promise<void>,
  count: (channel: string) => Promise<number>,
): Promise<void> {
  await using a = busOn(spec);
  await using b = busOn(spec);
  assert.ok(await whenConnected(a, 10_000), "a connected");
  assert.ok(await whenConnected(b, 10_000), "b connected");
  const remote = TOPICS.map((topic) => new Inbox(b, topic));
  const local = new Inbox(a, "meter:o1");
  await Promise.all([...remote, local].map((inbox) => inbox.ready));
  const batch = (n: number) => [
    reading("o1", n),
    reading("o2", n),
    { type: "device.changed" as const, data: { meter_id: "o1", change: "rotated" as const } },
  ];
  await a.publish(batch(1));
  await Promise.all(remote.map((inbox, i) => inbox.take([1, 1, 2, 1][i])));
  await local.take(1);

  const changesA = new Changes(a);
  const changesB = new Changes(b);
  const lostA = changesA.next(false);
  const lostB = changesB.next(false);
  await crash();
  await Promise.all([lostA, lostB]);
  assert.equal(a.connected, false);
  assert.equal(b.connected, false);
  assert.equal(a.stats.disconnects, 1);
  assert.equal(b.stats.disconnects, 1);

  // Down: a publish is refused at once, and this instance's subscribers still get it.
  const errorsBefore = a.stats.publishErrors;
  const started = performance.now();
  await assert.rejects(a.publish(batch(2)));
  const took = performance.now() - started;
  assert.ok(took < PROMPT_MS, `publish rejected after ${Math.round(took)} ms`);
  assert.equal(a.stats.publishErrors, errorsBefore + 1);
  assert.deepEqual(await local.take(1), [reading("o1", 2)]);

  const backA = changesA.next(true);
  const backB = changesB.next(true);
  await revive();
  await Promise.all([backA, backB]);
  assert.equal(b.connected, true);
  // Each loss reported once, each return once.
  assert.deepEqual(changesA.seen, [false, true]);
  assert.deepEqual(changesB.seen, [false, true]);
  assert.equal(b.stats.disconnects, 1);
  // b holds every topic, a holds meter:o1 too.
  for (const topic of TOPICS) {
    const expected = topic === "meter:o1" ? 2 : 1;
    assert.equal(await count(`gtx-outage:${topic}`), expected, `${topic} subscribed again`);
  }

  // Every channel subscribed before the crash delivers again; nothing published while down.
  await a.publish(batch(3));
  assert.deepEqual(await remote[0].take(1), [reading("o1", 3)]);
  assert.deepEqual(await remote[1].take(1), [reading("o2", 3)]);
  assert.deepEqual(await remote[2].take(2), [reading("o1", 3), reading("o2", 3)]);
  assert.equal((await remote[3].take(1)).length, 1);
  assert.deepEqual(await local.take(1), [reading("o1", 3)]);
  changesA.remove();
  changesB.remove();
}

Deno.test({
  name: `RedisBus survives a crash of its Redis server${skipped}`,
  ignore: !binaries.ok,
  async fn() {
    await using server = await startRedisServer();
    await using raw = disposable(new Redis(server.url, { lazyConnect: true }));
    await outage(
      { mode: "single", url: server.url },
      () => server.kill(),
      () => server.start(),
      async (channel) => {
        if (raw.client.status !== "ready") await raw.client.connect().catch(() => {});
        const reply = await raw.client.call("PUBSUB", "NUMSUB", channel) as [string, number];
        return Number(reply[1]);
      },
    );
  },
});

Deno.test({
  name: `RedisBus survives a crash of every node of its Redis Cluster${skipped}`,
  ignore: !binaries.ok,
  async fn() {
    await using cluster = await startRedisCluster();
    const nodes = cluster.servers.map((server) => ({ host: "127.0.0.1", port: server.port }));
    await outage(
      { mode: "cluster", nodes },
      () => cluster.kill(),
      () => cluster.start(),
      async (channel) => {
        let total = 0;
        for (const server of cluster.servers) {
          const out = await cli(server.port, ["PUBSUB", "SHARDNUMSUB", channel]);
          total += Number(out.trim().split("\n").at(-1));
        }
        return total;
      },
    );
  },
});

Deno.test({
  name: "RedisBus without a reachable Redis delivers locally and rejects publishes at once",
  async fn() {
    // Nothing listens on a port just freed.
    const bus = busOn({ mode: "single", url: `redis://127.0.0.1:${freePort()}` });
    try {
      const inbox = new Inbox(bus, "control");
      const event = {
        type: "user.changed" as const,
        data: { user_id: "u", change: "logout" as const, token_generation: 2 },
      };
      const started = performance.now();
      await assert.rejects(bus.publish([event]));
      assert.ok(performance.now() - started < PROMPT_MS);
      assert.deepEqual(await inbox.take(1), [event]);
      assert.equal(bus.connected, false);
      assert.equal(bus.stats.publishErrors, 1);
    } finally {
      await bus.close();
    }
  },
});

/** An ioredis client closed by `await using` (quit, or disconnect when not connected). */
function disposable(client: Redis): { client: Redis } & AsyncDisposable {
  return {
    client,
    async [Symbol.asyncDispose]() {
      if (client.status === "ready") await client.quit().catch(() => client.disconnect());
      else client.disconnect();
    },
  };
}
