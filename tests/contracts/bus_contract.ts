import assert from "node:assert/strict";
import type { Bus, BusStats, Subscription } from "../../bus/bus.ts";
import type { GatewayEvent, ReadingAcceptedEvent, Topic } from "../../core/events.ts";

/** Buses under test: `count` connected instances on one backend. */
export interface BusFixture {
  buses: Bus[];
  /**
   * Puts `text` on the backend's channel of `topic` as another instance would, bypassing the
   * adapter (for malformed messages). Absent: the backend carries no messages.
   */
  injectRaw?: (topic: Topic, text: string) => Promise<void>;
  /**
   * How many connections the backend counts as subscribed to `topic`'s channel (`PUBSUB
   * NUMSUB` / `PUBSUB SHARDNUMSUB`). Absent: nothing to count.
   */
  serverSubscribers?: (topic: Topic) => Promise<number>;
  /** Runs after the suite has closed every bus. */
  cleanup(): Promise<void>;
}

/** Makes `count` connected buses on one fresh backend (a prefix of their own). */
export type BusFactory = (count: number) => Promise<BusFixture>;

/** How the suite runs against one backend. */
export interface BusContractOptions {
  /** Skip the suite, e.g. when the backend is not available here. */
  ignore?: boolean;
  /** Instances can be several (a network backend): the cross-instance cases run. */
  remote: boolean;
  /** The adapter counts its messages in `stats` (a network adapter). */
  counts: boolean;
}

/** Guards against hangs only: every wait ends on an event. */
const EVENT_TIMEOUT_MS = 10_000;
/** Bounded polls for what has no event (a server-side unsubscribe). */
const POLL_MS = 10;

/**
 * Registers the behaviour of the {@linkcode Bus} contract (bus/bus.ts) as `Deno.test` cases
 * named `"<name>: ..."`. The suite closes the buses itself, then calls the fixture's cleanup.
 */
export function busContract(name: string, factory: BusFactory, options: BusContractOptions): void {
  const test = (
    title: string,
    needs: { remote?: boolean; counts?: boolean },
    fn: (fixture: BusFixture) => Promise<void>,
  ) => {
    const unsupported = (needs.remote && !options.remote) || (needs.counts && !options.counts);
    Deno.test({
      name: `${name}: ${title}`,
      ignore: (options.ignore ?? false) || unsupported,
      async fn() {
        const fixture = await factory(options.remote ? 2 : 1);
        try {
          await fn(fixture);
        } finally {
          await Promise.all(fixture.buses.map((bus) => bus.close()));
          await fixture.cleanup();
        }
      },
    });
  };

  test("every bus is connected after the factory", {}, ({ buses }) => {
    for (const bus of buses) assert.equal(bus.connected, true);
    const remove = buses[0].onConnectionChange(() => {});
    assert.equal(typeof remove, "function");
    remove();
    return Promise.resolve();
  });

  test(
    "readings go to meter:<id> and all, mints to user:<id> and all, device and user changes to control, batch events to user:<id>",
    {},
    async (fixture) => {
      const [a] = fixture.buses;
      const buses = fixture.buses;
      const topics: Topic[] = ["meter:m1", "meter:m2", "all", "control", "user:u1", "user:u2"];
      // On every instance: this one (local delivery) and the others (remote).
      const inboxes = buses.map((bus) => new Map(topics.map((t) => [t, new Inbox(bus, t)])));
      await Promise.all(inboxes.flatMap((map) => [...map.values()].map((i) => i.ready)));
      const r1 = reading("m1", 1, "u1");
      const r2 = reading("m2", 1, "u2");
      const device: GatewayEvent = {
        type: "device.changed",
        data: { meter_id: "m1", change: "revoked", user_id: "u1" },
      };
      const user: GatewayEvent = {
        type: "user.changed",
        data: { user_id: "u2", change: "logout", token_generation: 3 },
      };
      const progress: GatewayEvent = {
        type: "batch.progress",
        data: { job_id: "j1", user_id: "u1", done: 5 },
      };
      const mint: GatewayEvent = {
        type: "meter.reading.minted",
        data: {
          mint_id: "x1",
          user_id: "u2",
          reading_ids: [r2.data.id],
          amount: "1.5",
          tx_signature: null,
        },
      };
      await a.publish([r1, r2, device, user, progress, mint]);
      const expected: Record<string, GatewayEvent[]> = {
        "meter:m1": [r1],
        "meter:m2": [r2],
        all: [r1, r2, mint],
        control: [device, user],
        "user:u1": [progress],
        "user:u2": [mint],
      };
      for (const map of inboxes) {
        for (const [topic, inbox] of map) {
          assert.deepEqual(await inbox.take(expected[topic].length), expected[topic], topic);
        }
      }
      // A fence per topic: anything extra would have arrived before it.
      await fence(a, inboxes.flatMap((map) => [...map.values()]));
      for (const map of inboxes) {
        for (const [topic, inbox] of map) assert.deepEqual(inbox.rest(), [], topic);
      }
    },
  );

  test("a publisher's own subscribers get its events at once, exactly once", {}, async (f) => {
    const [a] = f.buses;
    const inbox = new Inbox(a, "meter:m1");
    await inbox.ready;
    const event = reading("m1", 1);
    const publishing = a.publish([event]);
    // Before the promise settles, with no turn of the event loop.
    assert.deepEqual(inbox.events, [event]);
    assert.deepEqual(await inbox.take(1), [event]);
    await publishing;
    // Published by another instance (if any), the fence comes after the echo of our own.
    await fence(f.buses[1] ?? a, [inbox]);
    assert.deepEqual(inbox.rest(), [], "its own message coming back is skipped");
    inbox.subscription.unsubscribe();
  });

  test(
    "another instance gets each event once per subscription, in order within a topic",
    { remote: true },
    async ({ buses: [a, b] }) => {
      const first = new Inbox(b, "meter:m1");
      const second = new Inbox(b, "meter:m1");
      const all = new Inbox(b, "all");
      await Promise.all([first.ready, second.ready, all.ready]);
      const batches = [1, 2, 3].map((batch) =>
        [1, 2, 3, 4].map((n) => reading(n % 2 === 0 ? "m1" : "m2", batch * 10 + n))
      );
      for (const batch of batches) await a.publish(batch);
      const m1 = batches.flat().filter((e) => e.data.meter_id === "m1");
      assert.deepEqual(await first.take(m1.length), m1);
      assert.deepEqual(await second.take(m1.length), m1);
      assert.deepEqual(await all.take(12), batches.flat());
      await fence(a, [first, second, all]);
      assert.deepEqual(first.rest(), []);
      assert.deepEqual(second.rest(), []);
      assert.deepEqual(all.rest(), []);
    },
  );

  test(
    "a batch is sent as one message per topic, counted by topic kind",
    { remote: true, counts: true },
    async ({ buses: [a, b] }) => {
      const inboxes = (["meter:m1", "meter:m2", "all", "control"] as Topic[]).map((t) =>
        new Inbox(b, t)
      );
      await Promise.all(inboxes.map((i) => i.ready));
      const sentBefore = snapshot(a.stats);
      const receivedBefore = snapshot(b.stats);
      const batch: GatewayEvent[] = [
        reading("m1", 1),
        reading("m2", 1),
        reading("m1", 2),
        reading("m1", 3),
        { type: "device.changed", data: { meter_id: "m2", change: "rotated" } },
      ];
      await a.publish(batch);
      assert.deepEqual(delta(a.stats.published, sentBefore.published), {
        meter: 2,
        all: 1,
        control: 1,
      });
      await Promise.all(inboxes.map((i, n) => i.take([3, 1, 4, 1][n])));
      assert.deepEqual(delta(b.stats.received, receivedBefore.received), {
        meter: 2,
        all: 1,
        control: 1,
      });
      assert.equal(a.stats.publishErrors, sentBefore.publishErrors);
    },
  );

  test(
    "unsubscribe stops delivery; the last one of a channel leaves it on the server",
    { remote: true },
    async (fixture) => {
      const [a, b] = fixture.buses;
      const one = new Inbox(b, "meter:u1");
      const two = new Inbox(b, "meter:u1");
      const other = new Inbox(b, "meter:u2");
      await Promise.all([one.ready, two.ready, other.ready]);
      const count = fixture.serverSubscribers;
      if (count) assert.equal(await count("meter:u1"), 1, "one server subscription per bus");

      one.subscription.unsubscribe();
      one.subscription.unsubscribe(); // idempotent
      await a.publish([reading("u1", 1), reading("u2", 1)]);
      assert.equal((await two.take(1)).length, 1);
      await other.take(1);
      if (count) assert.equal(await count("meter:u1"), 1, "another subscription still holds it");

      two.subscription.unsubscribe();
      if (count) await until(async () => await count("meter:u1") === 0, "server unsubscribe");
      await a.publish([reading("u1", 2), reading("u2", 2)]);
      await other.take(1);
      assert.deepEqual(one.rest(), []);
      assert.deepEqual(two.rest(), []);
      if (count) assert.equal(await count("meter:u2"), 1);
    },
  );

  test(
    "once ready has settled, events published by another instance arrive",
    { remote: true },
    async (fixture) => {
      const [a, b] = fixture.buses;
      for (let n = 1; n <= 5; n++) {
        const topic: Topic = `meter:ready${n}`;
        const inbox = new Inbox(b, topic);
        await inbox.ready;
        if (fixture.serverSubscribers) assert.equal(await fixture.serverSubscribers(topic), 1);
        // No other wait: the publish right after `ready` must arrive.
        const event = reading(`ready${n}`, 1);
        await a.publish([event]);
        assert.deepEqual(await inbox.take(1), [event]);
        inbox.subscription.unsubscribe();
      }
      // A further subscription of a subscribed channel is ready as well.
      const held = new Inbox(b, "control");
      await held.ready;
      const again = new Inbox(b, "control");
      await again.ready;
      const event: GatewayEvent = {
        type: "user.changed",
        data: { user_id: "u", change: "updated", token_generation: 1 },
      };
      await a.publish([event]);
      assert.deepEqual(await again.take(1), [event]);
      assert.deepEqual(await held.take(1), [event]);
    },
  );

  test("a throwing handler does not keep the event from the others", {}, async (fixture) => {
    const buses = fixture.buses;
    const thrower = buses.map((bus) =>
      bus.subscribe("meter:t", () => {
        throw new Error("handler failure (expected by the test)");
      })
    );
    const inboxes = buses.map((bus) => new Inbox(bus, "meter:t"));
    await Promise.all([
      ...thrower.map((s) => within(s.ready, "ready")),
      ...inboxes.map((i) => i.ready),
    ]);
    const event = reading("t", 1);
    await buses[0].publish([event]);
    for (const inbox of inboxes) assert.deepEqual(await inbox.take(1), [event]);
    // Still subscribed and delivering afterwards.
    const next = reading("t", 2);
    await buses[0].publish([next]);
    for (const inbox of inboxes) assert.deepEqual(await inbox.take(1), [next]);
  });

  test(
    "malformed messages on a channel are dropped, never handed to handlers",
    { remote: true },
    async (fixture) => {
      const inject = fixture.injectRaw;
      assert.ok(inject, "a network backend can carry raw messages");
      const [a, b] = fixture.buses;
      const inbox = new Inbox(b, "meter:bad");
      await inbox.ready;
      const malformedBefore = (b.stats as BusStats & { malformed?: number }).malformed;
      const good = reading("bad", 1);
      const bad = [
        "not json at all",
        "null",
        "[1,2]",
        JSON.stringify({ v: 99, o: "x", e: [good] }),
        JSON.stringify({ v: 1, o: "x", e: [] }),
        JSON.stringify({ v: 1, o: "x", e: [{ type: "nonsense", data: {} }] }),
        JSON.stringify({ v: 1, o: "x", e: [{ type: "meter.reading.accepted" }] }),
        JSON.stringify({ v: 1, o: "x", e: [reading("other", 1)] }),
      ];
      for (const text of bad) await inject("meter:bad", text);
      await a.publish([good]);
      assert.deepEqual(await inbox.take(1), [good]);
      assert.deepEqual(inbox.rest(), []);
      if (malformedBefore !== undefined) {
        const after = (b.stats as BusStats & { malformed: number }).malformed;
        assert.equal(after - malformedBefore, bad.length);
      }
      assert.equal(b.connected, true);
    },
  );

  test("publishing nothing is a no-op that resolves", {}, async ({ buses: [a] }) => {
    const before = snapshot(a.stats);
    await a.publish([]);
    assert.deepEqual(a.stats.published, before.published);
  });
}

/** Events of one subscription, awaited in order; fence markers are kept apart. */
export class Inbox {
  readonly topic: Topic;
  readonly events: GatewayEvent[] = [];
  readonly markers: GatewayEvent[] = [];
  readonly subscription: Subscription;
  #taken = 0;
  #waiter: (() => void) | null = null;

  constructor(bus: Bus, topic: Topic) {
    this.topic = topic;
    this.subscription = bus.subscribe(topic, (event) => {
      (isMarker(event) ? this.markers : this.events).push(event);
      this.#waiter?.();
    });
  }

  /** The subscription's `ready`, failing after EVENT_TIMEOUT_MS instead of hanging. */
  get ready(): Promise<void> {
    return within(this.subscription.ready, `ready of ${this.topic}`);
  }

  /** The next `count` events (waits for them). */
  async take(count: number, timeoutMs = EVENT_TIMEOUT_MS): Promise<GatewayEvent[]> {
    await this.#until(
      () => this.events.length >= this.#taken + count,
      timeoutMs,
      () =>
        `${count} events expected on ${this.topic}, ${this.events.length - this.#taken} arrived`,
    );
    const out = this.events.slice(this.#taken, this.#taken + count);
    this.#taken += count;
    return out;
  }

  /** Waits for the fence marker of this inbox's topic. */
  async marker(timeoutMs = EVENT_TIMEOUT_MS): Promise<void> {
    const wanted = JSON.stringify(markerFor(this.topic));
    await this.#until(
      () => this.markers.some((m) => JSON.stringify(m) === wanted),
      timeoutMs,
      () => `no fence marker on ${this.topic}`,
    );
    this.markers.length = 0;
  }

  /** Events not taken yet. */
  rest(): GatewayEvent[] {
    return this.events.slice(this.#taken);
  }

  async #until(done: () => boolean, timeoutMs: number, why: () => string): Promise<void> {
    const deadline = Date.now() + timeoutMs;
    while (!done()) {
      const left = deadline - Date.now();
      if (left <= 0) throw new Error(`${why()} within ${timeoutMs} ms`);
      let timer: ReturnType<typeof setTimeout> | undefined;
      await new Promise<void>((resolve) => {
        this.#waiter = resolve;
        timer = setTimeout(resolve, left);
      });
      clearTimeout(timer);
      this.#waiter = null;
    }
  }
}

/**
 * Publishes from `from` one marker per topic of `inboxes` and waits until every inbox has its
 * own: whatever was published before on a topic has arrived by then (order within a topic).
 */
async function fence(from: Bus, inboxes: Inbox[]): Promise<void> {
  const topics = [...new Set(inboxes.map((inbox) => inbox.topic))];
  await from.publish(topics.map(markerFor));
  await Promise.all(inboxes.map((inbox) => inbox.marker()));
}

const MARK = 999_999;

function markerFor(topic: Topic): GatewayEvent {
  if (topic === "control") {
    return {
      type: "user.changed",
      data: { user_id: "fence", change: "updated", token_generation: MARK },
    };
  }
  if (topic === "all") return reading("fence", MARK);
  if (topic.startsWith("meter:")) return reading(topic.slice("meter:".length), MARK);
  return {
    type: "batch.completed",
    data: { job_id: "fence", user_id: topic.slice("user:".length) },
  };
}

function isMarker(event: GatewayEvent): boolean {
  switch (event.type) {
    case "meter.reading.accepted":
      return event.position.endsWith(`@${MARK}`);
    case "user.changed":
      return event.data.token_generation === MARK;
    case "batch.completed":
      return event.data.job_id === "fence";
    default:
      return false;
  }
}

/** `promise`, or a failure naming `what` after EVENT_TIMEOUT_MS. */
export async function within<T>(promise: Promise<T>, what: string): Promise<T> {
  let timer: ReturnType<typeof setTimeout> | undefined;
  try {
    return await Promise.race([
      promise,
      new Promise<never>((_, reject) => {
        timer = setTimeout(
          () => reject(new Error(`${what} did not settle within ${EVENT_TIMEOUT_MS} ms`)),
          EVENT_TIMEOUT_MS,
        );
      }),
    ]);
  } finally {
    clearTimeout(timer);
  }
}

async function until(check: () => Promise<boolean>, what: string): Promise<void> {
  const deadline = Date.now() + EVENT_TIMEOUT_MS;
  while (!(await within(check(), what))) {
    if (Date.now() > deadline) throw new Error(`${what} did not happen in ${EVENT_TIMEOUT_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, POLL_MS));
  }
}

function snapshot(stats: BusStats): BusStats {
  return structuredClone(stats);
}

function delta(now: Record<string, number>, before: Record<string, number>) {
  const out: Record<string, number> = {};
  for (const [kind, n] of Object.entries(now)) {
    if (n !== (before[kind] ?? 0)) out[kind] = n - (before[kind] ?? 0);
  }
  return out;
}

/** A committed reading of `meterId` (the `n`th), owned by `userId`. */
export function reading(meterId: string, n: number, userId = "u0"): ReadingAcceptedEvent {
  const ts = new Date(Date.UTC(2026, 0, 1) + n * 60_000).toISOString().replace(/\.\d+Z$/, "Z");
  return {
    type: "meter.reading.accepted",
    position: `${meterId}@${n}`,
    data: {
      id: `${meterId}-${n}`,
      meter_id: meterId,
      user_id: userId,
      wallet_address: null,
      kwh_amount: n / 10,
      reading_timestamp: ts,
      key_id: "k1",
      device_signature: "sig",
      source: "mqtt",
      submitted_at: ts,
      minted: false,
    },
  };
}
