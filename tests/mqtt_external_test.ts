// The external-broker ingress against a real Mosquitto started with deploy/mosquitto.conf:
// readings in, acks out, the held-PUBACK technique pinned, broker and gateway restarts, and
// shared subscriptions.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect, type MqttClient } from "mqtt";
import { silentLogger } from "../core/logger.ts";
import { Metrics } from "../core/metrics.ts";
import type { Reading } from "../core/reading.ts";
import { readingPayload } from "../mqtt/device_credentials.ts";
import { AckPublisher } from "../mqtt/ack_publisher.ts";
import { ExternalIngress, type ExternalIngressOptions } from "../mqtt/external_ingress.ts";
import type { AckMessage } from "../mqtt/intake.ts";
import { isoAgo, startTestGateway, type TestGateway } from "./_gateway.ts";
import {
  EVENT_TIMEOUT_MS,
  Inbox,
  type Mosquitto,
  mosquittoAvailable,
  pollUntil,
  startMosquitto,
  within,
} from "./_mosquitto.ts";
import { startTcpProxy } from "./_tcp_proxy.ts";

const MINUTE = 60_000;
/** Readings of one meter are a metering interval apart (the dedupe window is ±15 minutes). */
const INTERVAL = 15 * MINUTE;
/** A reconnect after a broker restart may wait out a grown backoff (30 s at most). */
const RECONNECT_TIMEOUT_MS = 45_000;

const available = await mosquittoAvailable();

/** Registers a test that needs Mosquitto; ignored (reason in the name) when it cannot run. */
function mosquittoTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name: available.ok ? name : `${name} (ignored: ${available.reason})`,
    ignore: !available.ok,
    fn,
  });
}

function uniqueId(prefix: string): string {
  return `${prefix}-${crypto.randomUUID().slice(0, 8)}`;
}

interface Meter {
  id: string;
  secret: string;
}

async function registerMeter(gw: TestGateway, id: string, userId: string): Promise<Meter> {
  return { id, secret: (await gw.registerMeter(id, userId)).secret_hex };
}

/** A signed reading payload of `meter`. */
function payloadOf(meter: Meter, ts: string, kwh = "1.5"): string {
  return readingPayload(meter.id, Buffer.from(meter.secret, "hex"), ts, kwh);
}

/** A plain (anonymous) mqtt.js client of the external broker; resolves once connected. */
async function connectClient(
  mosq: Mosquitto,
  options: { clientId?: string; reconnectPeriod?: number } = {},
): Promise<MqttClient> {
  const client = connect(mosq.url, {
    clientId: options.clientId ?? uniqueId("device"),
    reconnectPeriod: options.reconnectPeriod ?? 0,
    connectTimeout: EVENT_TIMEOUT_MS,
  });
  // Connection errors while the broker is down are expected; reconnects are observed directly.
  client.on("error", () => {});
  await within(
    new Promise<void>((resolve, reject) => {
      client.once("connect", () => resolve());
      client.once("close", () => reject(new Error(`cannot connect to ${mosq.url}`)));
    }),
    "CONNACK from Mosquitto",
  );
  return client;
}

/** Starts the harness gateway consuming from `mosq`, and waits for its subscription. */
async function startGateway(
  mosq: Mosquitto,
  clientId: string,
  extra: { dir?: string; env?: Record<string, string> } = {},
): Promise<TestGateway> {
  const gw = await startTestGateway({
    dir: extra.dir,
    env: { MQTT_URL: mosq.url, MQTT_CLIENT_ID: clientId, ...extra.env },
  });
  try {
    assert.ok(gw.gateway.external, "MQTT_URL set: the external ingress runs");
    assert.equal(gw.gateway.broker, undefined, "MQTT_URL set: no embedded broker");
    await within(gw.gateway.external.ready(), "the gateway's readings subscription");
  } catch (error) {
    await gw.close();
    throw error;
  }
  return gw;
}

mosquittoTest(
  "a device publishing to an external Mosquitto gets its reading stored and an accepted ack",
  async () => {
    await using mosq = await startMosquitto();
    await using gw = await startGateway(mosq, uniqueId("gw-basic"));
    const user = await gw.createUser("basic@mqtt-ext.test");
    const meter = await registerMeter(gw, "ext-meter-1", user.id);
    const device = await connectClient(mosq);
    try {
      const acks = new Inbox(device);
      await device.subscribeAsync(`meters/${meter.id}/acks`, { qos: 1 });
      const ts = isoAgo(MINUTE);
      await device.publishAsync(`meters/${meter.id}/readings`, payloadOf(meter, ts, "4.75"), {
        qos: 1,
      });
      const ack = await acks.nextJson<AckMessage>();
      assert.equal(ack.status, "accepted", JSON.stringify(ack));
      assert.equal(ack.reading_timestamp, ts);
      const list = await gw.request("GET", `/api/meters/readings?meter_id=${meter.id}`, {
        token: user.token,
      });
      assert.equal(list.status, 200);
      const items = list.body.items as Reading[];
      assert.equal(items.length, 1, JSON.stringify(items));
      assert.equal(items[0].id, ack.id, "the ack carries the stored id");
      assert.equal(items[0].kwh_amount, 4.75);
      assert.equal(items[0].source, "mqtt");

      // A rejected one is answered too, on the same topic.
      await device.publishAsync(`meters/${meter.id}/readings`, "not json", { qos: 1 });
      const rejected = await acks.nextJson<AckMessage>();
      assert.equal(rejected.status, "rejected", JSON.stringify(rejected));
      assert.equal(rejected.code, "invalid_payload");
    } finally {
      await device.endAsync();
    }
  },
);

/** One call of the controllable intake: what arrived, and how to finish it. */
interface Call {
  meterId: string;
  payload: string;
  resolve(ack: AckMessage): void;
}

/**
 * Stands in for MqttIntake (a plain object, not a broker or database): every `handle` call
 * stays pending until the test resolves it.
 */
class ControlledIntake {
  readonly calls: Call[] = [];
  #waiters: { n: number; resolve: () => void }[] = [];

  handle(meterId: string, payload: Uint8Array): Promise<AckMessage> {
    return new Promise((resolve) => {
      this.calls.push({ meterId, payload: new TextDecoder().decode(payload), resolve });
      this.#waiters = this.#waiters.filter((w) => {
        if (this.calls.length < w.n) return true;
        w.resolve();
        return false;
      });
    });
  }

  /** Resolves once `n` calls have arrived. */
  waitFor(n: number): Promise<void> {
    if (this.calls.length >= n) return Promise.resolve();
    const { promise, resolve } = Promise.withResolvers<void>();
    this.#waiters.push({ n, resolve });
    return within(promise, `${n} intake calls (have ${this.calls.length})`);
  }

  get payloads(): string[] {
    return this.calls.map((c) => c.payload);
  }
}

/** The counters the external ingress increments. */
function ingressMetrics(): Metrics {
  const metrics = new Metrics();
  metrics.counter("mqtt_messages_received_total", "test");
  metrics.counter("mqtt_connection_errors_total", "test");
  return metrics;
}

/** The ingress's ack connection, as the gateway builds it. */
function ackPublisher(url: string, clientId: string, metrics: Metrics): AckPublisher {
  return new AckPublisher({ url, clientId: `${clientId}-acks`, logger: silentLogger, metrics });
}

/**
 * An ingress on `mosq` with the tests' defaults (a 100-reading window, one ack connection) and
 * `extra` on top; resolves once it is subscribed and its ack connections are up.
 */
async function startIngress(
  mosq: Mosquitto,
  clientId: string,
  intake: ControlledIntake | AutoIntake,
  metrics: Metrics,
  extra: Partial<ExternalIngressOptions> = {},
): Promise<ExternalIngress> {
  const ingress = await ExternalIngress.start({
    url: mosq.url,
    clientId,
    sessionExpirySeconds: 600,
    inflightMax: 100,
    intake,
    logger: silentLogger,
    metrics,
    ...extra,
    acks: extra.acks ?? ackPublisher(mosq.url, clientId, metrics),
  });
  try {
    await within(ingress.ready(), "ingress subscription and ack connections");
  } catch (error) {
    await ingress.close();
    throw error;
  }
  return ingress;
}

/** A reading payload `slot` metering intervals ago (the stand-in intakes never verify it). */
function readingAt(slot: number): string {
  return JSON.stringify({
    kwh_amount: "1",
    reading_timestamp: isoAgo(slot * INTERVAL),
    device_signature: "x",
  });
}

function accepted(call: Call): AckMessage {
  const ts = JSON.parse(call.payload).reading_timestamp as string;
  return { reading_timestamp: ts, status: "accepted", id: `id-${ts}` };
}

mosquittoTest(
  "pin: the external ingress pipelines readings and holds each PUBACK until the reading is " +
    "final, releasing them in receive order (fails if an mqtt.js upgrade breaks the technique)",
  async (t) => {
    await using mosq = await startMosquitto();
    const clientId = uniqueId("pin-ingress");
    const metrics = ingressMetrics();
    // Steps close with readings never made final: close() waits this long for them.
    const start = (intake: ControlledIntake) =>
      startIngress(mosq, clientId, intake, metrics, { drainMs: 200 });
    const meterId = "pin-meter";
    let slot = 1;
    const reading = () => readingAt(slot++);
    const publisher = await connectClient(mosq, { clientId: uniqueId("pin-publisher") });
    const acks = new Inbox(publisher);
    await publisher.subscribeAsync(`meters/${meterId}/acks`, { qos: 1 });
    const publish = async (payloads: string[]) => {
      for (const p of payloads) {
        await publisher.publishAsync(`meters/${meterId}/readings`, p, { qos: 1 });
      }
    };
    /** Resolves a call and waits until its ack went out through the ingress. */
    const finish = async (call: Call) => {
      const ack = accepted(call);
      call.resolve(ack);
      assert.deepEqual(await acks.nextJson(), ack, "the ack of the reading just resolved");
    };
    const ingresses: ExternalIngress[] = [];
    const open = async (intake: ControlledIntake) => {
      const ingress = await start(intake);
      ingresses.push(ingress);
      return ingress;
    };

    try {
      const r = [reading(), reading(), reading()];
      const first = new ControlledIntake();

      await t.step("three readings are all handed to the intake before any is final", async () => {
        const ingress = await open(first);
        await publish(r);
        await first.waitFor(3);
        assert.deepEqual(first.payloads, r, "in publish order");
        assert.ok(first.calls.every((c) => c.meterId === meterId));
        assert.equal(ingress.inFlight, 3);
        assert.equal(ingress.maxInFlight, 3, "pipelined, not one at a time");
        await ingress.close();
      });

      await t.step(
        "closed while none was final, a new ingress with the same client id gets all three " +
          "again (their PUBACKs were held)",
        async () => {
          const second = new ControlledIntake();
          const ingress = await open(second);
          await second.waitFor(3);
          assert.deepEqual(second.payloads, r, "redelivered, in order");
          for (const call of second.calls) await finish(call);
          await pollUntil(() => ingress.inFlight === 0, "the three PUBACKs released");
          await ingress.close();
        },
      );

      await t.step(
        "once final and released, nothing is redelivered: a marker published afterwards is " +
          "the first and only message",
        async () => {
          const third = new ControlledIntake();
          const ingress = await open(third);
          const marker = reading();
          await publish([marker]);
          await third.waitFor(1);
          assert.equal(third.payloads[0], marker, "the marker comes first: nothing was pending");
          await finish(third.calls[0]);
          assert.deepEqual(third.payloads, [marker], "and nothing else came");
          await pollUntil(() => ingress.inFlight === 0, "the marker's PUBACK released");
          await ingress.close();
        },
      );

      await t.step(
        "PUBACKs go out in receive order: a final reading waits behind an earlier unresolved one",
        async () => {
          const fourth = new ControlledIntake();
          const ingress = await open(fourth);
          const s = [reading(), reading(), reading()];
          await publish(s);
          await fourth.waitFor(3);
          assert.deepEqual(fourth.payloads, s);
          await finish(fourth.calls[2]); // 3rd final: its PUBACK waits for 1st and 2nd
          assert.equal(ingress.inFlight, 3);
          await finish(fourth.calls[0]); // 1st final: released; 2nd still pending
          // Released once the broker acknowledged its ack, which may come after the device got it.
          await pollUntil(() => ingress.inFlight === 2, "the 1st reading's PUBACK released");
          await ingress.close();

          const fifth = new ControlledIntake();
          const again = await open(fifth);
          const marker = reading();
          await publish([marker]);
          await fifth.waitFor(3);
          assert.deepEqual(
            fifth.payloads,
            [s[1], s[2], marker],
            "the 2nd and the 3rd (held behind it) are redelivered; the 1st is not",
          );
          for (const call of fifth.calls) await finish(call);
          await pollUntil(() => again.inFlight === 0, "all PUBACKs released");
          await again.close();
        },
      );
    } finally {
      for (const ingress of ingresses) await ingress.close();
      await publisher.endAsync();
    }
  },
);

mosquittoTest(
  "the gateway reconnects after a broker restart, and readings queued while it was away are " +
    "all delivered and stored",
  async (t) => {
    await using mosq = await startMosquitto();
    const clientId = uniqueId("gw-restart");
    const dir = await Deno.makeTempDir({ prefix: "gw-ext-restart-" });
    let gw: TestGateway | null = null;
    let device: MqttClient | null = null;
    try {
      gw = await startGateway(mosq, clientId, { dir });
      const user = await gw.createUser("restart@mqtt-ext.test");
      const meter = await registerMeter(gw, "ext-restart-1", user.id);
      // The device reconnects by itself (and resubscribes its acks topic).
      device = await connectClient(mosq, { reconnectPeriod: 100 });
      const acks = new Inbox(device);
      await device.subscribeAsync(`meters/${meter.id}/acks`, { qos: 1 });
      let slot = 40;
      const publishReadings = async (n: number) => {
        const stamps: string[] = [];
        for (let i = 0; i < n; i++) {
          const ts = isoAgo(slot-- * INTERVAL);
          stamps.push(ts);
          await device!.publishAsync(`meters/${meter.id}/readings`, payloadOf(meter, ts), {
            qos: 1,
          });
        }
        return stamps;
      };
      // Accepted once; a reading whose PUBACK was still on its way when the broker stopped is
      // delivered again (at least once) and answered as a duplicate, which is allowed.
      const acceptedBefore = new Set<string>();
      const expectAccepted = async (stamps: string[]) => {
        const got: string[] = [];
        try {
          while (got.length < stamps.length) {
            const ack = await acks.nextJson<AckMessage>();
            if (ack.status === "duplicate" && acceptedBefore.has(ack.reading_timestamp!)) continue;
            assert.equal(ack.status, "accepted", JSON.stringify(ack));
            got.push(ack.reading_timestamp!);
            acceptedBefore.add(ack.reading_timestamp!);
          }
        } catch (error) {
          const missing = stamps.filter((ts) => !got.includes(ts));
          assert.fail(
            `${missing.length} of ${stamps.length} readings were never delivered to the ` +
              `gateway (no ack): ${missing.join(", ")} — ${(error as Error).message}`,
          );
        }
        assert.deepEqual(got.toSorted(), stamps.toSorted());
        for (const ts of stamps) {
          assert.ok(await gw!.gateway.store.getReading(meter.id, Date.parse(ts)), `${ts} stored`);
        }
      };
      const reconnected = (client: MqttClient) =>
        within(
          new Promise<void>((resolve) => client.once("connect", () => resolve())),
          "the device reconnects",
          RECONNECT_TIMEOUT_MS,
        );

      await t.step("readings flow before the restart", async () => {
        await expectAccepted(await publishReadings(2));
      });

      await t.step("after Mosquitto stops and starts again, the gateway reconnects", async () => {
        const external = gw!.gateway.external!;
        assert.equal(external.connected, true);
        const deviceBack = reconnected(device!);
        await mosq.stop();
        await pollUntil(() => !external.connected, "the gateway notices the broker is gone");
        await mosq.restart();
        await pollUntil(
          () => external.connected,
          "the gateway is connected again",
          RECONNECT_TIMEOUT_MS,
        );
        await deviceBack;
      });

      await t.step("readings published after the restart are stored", async () => {
        await expectAccepted(await publishReadings(3));
      });

      const listedCount = async () =>
        (await gw!.gateway.store.listReadings({ meter_id: meter.id, order: "asc", limit: 100 }))
          .items.length;

      await t.step(
        "20 readings published while the gateway is down are delivered from its persistent " +
          "session when it comes back with the same client id",
        async () => {
          await gw!.close();
          gw = null;
          const queued = await publishReadings(20);
          gw = await startGateway(mosq, clientId, { dir });
          await expectAccepted(queued);
          assert.equal(await listedCount(), 2 + 3 + 20, "every reading stored exactly once");
        },
      );

      await t.step(
        "readings published while the gateway is down survive a broker restart, and so do " +
          "readings published after the restart before the gateway is back",
        async () => {
          await gw!.close();
          gw = null;
          const before = await publishReadings(5);
          // The queue survives a broker restart (persistence on, saved at shutdown).
          const deviceBack = reconnected(device!);
          await mosq.restart();
          await deviceBack;
          const after = await publishReadings(5);
          gw = await startGateway(mosq, clientId, { dir });
          await expectAccepted([...before, ...after]);
          assert.equal(await listedCount(), 2 + 3 + 20 + 10, "every reading stored exactly once");
          assert.doesNotMatch(mosq.log(), /Outgoing messages are being dropped/);
        },
      );
    } finally {
      await device?.endAsync(true);
      await gw?.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
);

mosquittoTest(
  "with MQTT_SHARED_GROUP the gateway consumes through a shared subscription",
  async (t) => {
    await using mosq = await startMosquitto();
    await using gw = await startGateway(mosq, uniqueId("gw-shared"), {
      env: { MQTT_SHARED_GROUP: "gateways" },
    });
    const user = await gw.createUser("shared@mqtt-ext.test");
    const meters = [
      await registerMeter(gw, "ext-shared-1", user.id),
      await registerMeter(gw, "ext-shared-2", user.id),
    ];
    const device = await connectClient(mosq);
    try {
      const acks = new Inbox(device);
      await device.subscribeAsync("meters/+/acks", { qos: 1 });
      await t.step("readings of several meters are consumed, stored and acked", async () => {
        const sent: string[] = [];
        for (let i = 0; i < 5; i++) {
          for (const m of meters) {
            const ts = isoAgo((i + 1) * INTERVAL);
            sent.push(`${m.id} ${ts}`);
            await device.publishAsync(`meters/${m.id}/readings`, payloadOf(m, ts), { qos: 1 });
          }
        }
        const got: string[] = [];
        for (let i = 0; i < sent.length; i++) {
          const msg = await acks.next();
          const ack = JSON.parse(msg.text) as AckMessage;
          assert.equal(ack.status, "accepted", msg.text);
          got.push(`${msg.topic.split("/")[1]} ${ack.reading_timestamp}`);
        }
        assert.deepEqual(got.toSorted(), sent.toSorted());
        for (const entry of sent) {
          const [id, ts] = entry.split(" ");
          assert.ok(await gw.gateway.store.getReading(id, Date.parse(ts)), entry);
        }
      });
    } finally {
      await device.endAsync();
    }
  },
);

mosquittoTest(
  "an ack published while the broker is away reaches the device after the reconnect, and the " +
    "reading, never acknowledged, comes again",
  async () => {
    await using mosq = await startMosquitto();
    const metrics = ingressMetrics();
    const intake = new ControlledIntake();
    const ingress = await startIngress(mosq, uniqueId("away-ingress"), intake, metrics);
    // A persistent device session: its acks subscription outlives the broker restart.
    const device = connect(mosq.url, {
      clientId: uniqueId("away-device"),
      clean: false,
      reconnectPeriod: 200,
      connectTimeout: EVENT_TIMEOUT_MS,
    });
    device.on("error", () => {});
    try {
      await within(new Promise((resolve) => device.once("connect", resolve)), "device CONNACK");
      const meterId = "away-meter";
      const acks = new Inbox(device);
      await device.subscribeAsync(`meters/${meterId}/acks`, { qos: 1 });
      const payload = readingAt(1);
      await device.publishAsync(`meters/${meterId}/readings`, payload, { qos: 1 });
      await intake.waitFor(1);

      await mosq.stop();
      await pollUntil(() => !ingress.connected, "the ingress saw the broker go");
      const ack = accepted(intake.calls[0]);
      intake.calls[0].resolve(ack); // final while the broker is away: kept, not dropped
      await mosq.restart();

      assert.deepEqual(
        await acks.nextJson(RECONNECT_TIMEOUT_MS),
        ack,
        "the ack made while away, delivered after both reconnected",
      );
      await intake.waitFor(2);
      assert.equal(intake.calls[1].payload, payload, "its PUBACK never went out: redelivered");
      const again = { ...accepted(intake.calls[1]), status: "duplicate" as const };
      intake.calls[1].resolve(again);
      assert.deepEqual(await acks.nextJson(), again);
      await pollUntil(() => ingress.inFlight === 0, "the redelivered reading's PUBACK released");
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

mosquittoTest(
  "a reading's PUBACK waits until the broker has its ack: with the ack connection cut, a final " +
    "reading stays in flight; once the ack is through, the PUBACK goes and nothing comes again",
  async (t) => {
    await using mosq = await startMosquitto();
    // Only the ack connection goes through the proxy, so it alone can be cut.
    await using proxy = startTcpProxy({ hostname: "127.0.0.1", port: mosq.port });
    const metrics = ingressMetrics();
    const clientId = uniqueId("held-ingress");
    const open = (intake: ControlledIntake, acks: AckPublisher) =>
      startIngress(mosq, clientId, intake, metrics, { acks });
    const acks = new AckPublisher({
      url: `mqtt://127.0.0.1:${proxy.port}`,
      clientId: `${clientId}-acks`,
      logger: silentLogger,
      metrics,
    });
    const intake = new ControlledIntake();
    let ingress = await open(intake, acks);
    const device = await connectClient(mosq);
    const meterId = "held-meter";
    try {
      assert.match(
        mosq.log(),
        new RegExp(`as ${clientId}-acks`),
        "the acks have a connection of their own",
      );
      const inbox = new Inbox(device);
      await device.subscribeAsync(`meters/${meterId}/acks`, { qos: 1 });
      await device.publishAsync(`meters/${meterId}/readings`, readingAt(1), { qos: 1 });
      await intake.waitFor(1);

      await t.step("final while the ack connection is cut: held, not acknowledged", async () => {
        await proxy.cut();
        await pollUntil(() => !ingress.connected, "the ingress sees its ack connection gone");
        intake.calls[0].resolve(accepted(intake.calls[0]));
        // The ack is queued in the same turn as the reading becomes final.
        await pollUntil(() => acks.pending === 1, "the ack waiting for its connection");
        assert.equal(ingress.inFlight, 1, "final, but its PUBACK waits for the ack");
      });

      await t.step(
        "the ack connection is back: the device gets the ack, then the PUBACK goes",
        async () => {
          proxy.restore();
          assert.deepEqual(
            await inbox.nextJson(RECONNECT_TIMEOUT_MS),
            accepted(intake.calls[0]),
            "the ack held while the connection was cut",
          );
          await pollUntil(
            () => ingress.inFlight === 0,
            "the PUBACK released",
            RECONNECT_TIMEOUT_MS,
          );
          assert.equal(acks.pending, 0);
        },
      );

      await t.step("a new ingress with the same client id gets only what comes next", async () => {
        await ingress.close();
        const next = new ControlledIntake();
        ingress = await open(next, ackPublisher(mosq.url, clientId, metrics));
        const marker = readingAt(2);
        await device.publishAsync(`meters/${meterId}/readings`, marker, { qos: 1 });
        await next.waitFor(1);
        assert.equal(next.payloads[0], marker, "the held reading was acknowledged in the end");
        next.calls[0].resolve(accepted(next.calls[0]));
        await pollUntil(() => ingress.inFlight === 0, "the marker's PUBACK released");
      });
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

mosquittoTest(
  "with the window full for several keepalive periods, the connection stays up and nothing is " +
    "delivered twice (keepalive answers do not wait behind held readings)",
  async () => {
    await using mosq = await startMosquitto();
    const metrics = ingressMetrics();
    const intake = new ControlledIntake();
    const ingress = await startIngress(mosq, uniqueId("keepalive-ingress"), intake, metrics, {
      inflightMax: 2,
      keepalive: 1,
    });
    const device = await connectClient(mosq);
    try {
      const payloads = [1, 2, 3, 4].map(readingAt);
      for (const p of payloads) {
        await device.publishAsync("meters/keepalive-meter/readings", p, { qos: 1 });
      }
      await intake.waitFor(2);
      // The property is about time passing: 3.5 keepalive periods with the window full. mqtt.js
      // drops a connection whose PINGRESP is missing after one period; a drop would bring the
      // two readings in flight back as new intake calls.
      await new Promise((resolve) => setTimeout(resolve, 3_500));
      assert.equal(ingress.connected, true, "still connected");
      assert.deepEqual(intake.payloads, payloads.slice(0, 2), "nothing delivered again");
      for (const call of intake.calls.slice(0, 2)) call.resolve(accepted(call));
      await intake.waitFor(4);
      assert.deepEqual(intake.payloads, payloads, "the held ones follow, in order, once each");
      for (const call of intake.calls.slice(2)) call.resolve(accepted(call));
      await pollUntil(() => ingress.inFlight === 0, "all four PUBACKs released");
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

mosquittoTest(
  "an ack the broker refuses is counted, and the stored reading is acknowledged all the same",
  async () => {
    // Anonymous clients may publish readings and read acks, but not publish acks.
    await using mosq = await startMosquitto({
      acl: "topic readwrite meters/+/readings\ntopic read meters/+/acks\n",
    });
    const metrics = ingressMetrics();
    const clientId = uniqueId("refused-ingress");
    const open = (intake: ControlledIntake) => startIngress(mosq, clientId, intake, metrics);
    const intake = new ControlledIntake();
    let ingress = await open(intake);
    const device = await connectClient(mosq);
    try {
      await device.publishAsync("meters/refused-meter/readings", readingAt(1), { qos: 1 });
      await intake.waitFor(1);
      intake.calls[0].resolve(accepted(intake.calls[0]));
      await pollUntil(() => ingress.inFlight === 0, "the reading released after the refusal");
      assert.match(
        metrics.render(),
        /mqtt_connection_errors_total\{reason="ack_refused"\} 1\b/,
        "the refusal is counted",
      );
      await ingress.close();

      const next = new ControlledIntake();
      ingress = await open(next);
      const marker = readingAt(2);
      await device.publishAsync("meters/refused-meter/readings", marker, { qos: 1 });
      await next.waitFor(1);
      assert.equal(next.payloads[0], marker, "the first reading was acknowledged: not again");
      next.calls[0].resolve(accepted(next.calls[0]));
      await pollUntil(() => ingress.inFlight === 0, "the marker's PUBACK released");
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

mosquittoTest(
  "close() lets the readings in flight finish and acknowledges them, so a restart does not " +
    "bring them back",
  async () => {
    await using mosq = await startMosquitto();
    const metrics = ingressMetrics();
    const clientId = uniqueId("drain-ingress");
    const open = (intake: ControlledIntake) => startIngress(mosq, clientId, intake, metrics);
    const intake = new ControlledIntake();
    let ingress = await open(intake);
    const device = await connectClient(mosq);
    try {
      for (const slot of [1, 2, 3]) {
        await device.publishAsync("meters/drain-meter/readings", readingAt(slot), { qos: 1 });
      }
      await intake.waitFor(3);
      const closing = ingress.close();
      // Final while close() drains, as when the writer commits them during a shutdown.
      for (const call of intake.calls) call.resolve(accepted(call));
      await closing;
      assert.equal(ingress.inFlight, 0, "all three were released before the disconnect");

      const next = new ControlledIntake();
      ingress = await open(next);
      const marker = readingAt(4);
      await device.publishAsync("meters/drain-meter/readings", marker, { qos: 1 });
      await next.waitFor(1);
      assert.equal(next.payloads[0], marker, "none of the three came back");
      next.calls[0].resolve(accepted(next.calls[0]));
      await pollUntil(() => ingress.inFlight === 0, "the marker's PUBACK released");
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

mosquittoTest(
  "with several ack connections, each meter's acks arrive in the order they were made",
  async () => {
    await using mosq = await startMosquitto();
    const metrics = ingressMetrics();
    const clientId = uniqueId("ackpool-ingress");
    const intake = new ControlledIntake();
    const ingress = await startIngress(mosq, clientId, intake, metrics, {
      acks: new AckPublisher({
        url: mosq.url,
        clientId: `${clientId}-acks`,
        connections: 3,
        logger: silentLogger,
        metrics,
      }),
    });
    const device = await connectClient(mosq);
    try {
      for (let i = 0; i < 3; i++) {
        assert.match(mosq.log(), new RegExp(`as ${clientId}-acks-${i}\\b`), `ack connection ${i}`);
      }
      const inbox = new Inbox(device);
      await device.subscribeAsync("meters/+/acks", { qos: 1 });
      const meters = ["pool-a", "pool-b", "pool-c", "pool-d", "pool-e", "pool-f"];
      const perMeter = 5;
      for (let k = 1; k <= perMeter; k++) {
        for (const m of meters) {
          await device.publishAsync(`meters/${m}/readings`, readingAt(k), { qos: 1 });
        }
      }
      const n = meters.length * perMeter;
      await intake.waitFor(n);
      for (const call of intake.calls) call.resolve(accepted(call));
      const got = new Map<string, string[]>();
      for (let i = 0; i < n; i++) {
        const msg = await inbox.next();
        const ack = JSON.parse(msg.text) as AckMessage;
        const meter = msg.topic.split("/")[1];
        got.set(meter, [...(got.get(meter) ?? []), ack.reading_timestamp!]);
      }
      for (const m of meters) {
        const made = intake.calls.filter((c) => c.meterId === m)
          .map((c) => JSON.parse(c.payload).reading_timestamp as string);
        assert.deepEqual(got.get(m), made, `${m}: acks in the order they were made`);
      }
      await pollUntil(() => ingress.inFlight === 0, "every PUBACK released");
    } finally {
      await device.endAsync(true);
      await ingress.close();
    }
  },
);

/** An intake that answers every reading itself: at once, or all pending ones together. */
class AutoIntake {
  calls = 0;
  #pending: ((ack: AckMessage) => void)[] = [];
  #timer: ReturnType<typeof setInterval> | undefined;

  constructor(readonly mode: "instant" | "batched") {
    if (mode === "batched") {
      // Like the writer: outcomes arrive for many readings in one turn.
      this.#timer = setInterval(() => {
        for (const resolve of this.#pending.splice(0)) resolve(this.#ack());
      }, 5);
    }
  }

  handle(): Promise<AckMessage> {
    this.calls++;
    if (this.mode === "instant") return Promise.resolve(this.#ack());
    return new Promise((resolve) => this.#pending.push(resolve));
  }

  #ack(): AckMessage {
    return { reading_timestamp: null, status: "rejected", code: "invalid_payload", message: "x" };
  }

  stop(): void {
    clearInterval(this.#timer);
  }
}

for (const mode of ["instant", "batched"] as const) {
  mosquittoTest(
    `every reading gets its PUBACK when outcomes come ${
      mode === "instant" ? "at once" : "in batches"
    } ` +
      "and the in-flight window is small: after a restart nothing is redelivered",
    async () => {
      await using mosq = await startMosquitto();
      const metrics = ingressMetrics();
      const clientId = uniqueId(`window-${mode}`);
      const open = (intake: ControlledIntake | AutoIntake) =>
        startIngress(mosq, clientId, intake, metrics, { inflightMax: 10 });
      const auto = new AutoIntake(mode);
      const publisher = await connectClient(mosq, { clientId: uniqueId("window-pub") });
      let ingress = await open(auto);
      try {
        const N = 300;
        await Promise.all(
          Array.from(
            { length: N },
            (_, i) =>
              publisher.publishAsync(`meters/window-meter/readings`, `{"n":${i}}`, { qos: 1 }),
          ),
        );
        await pollUntil(() => auto.calls >= N && ingress.inFlight === 0, `${N} readings final`);
        assert.equal(auto.calls, N, "each reading reached the intake once");
        await ingress.close();

        const again = new ControlledIntake();
        ingress = await open(again);
        const marker = JSON.stringify({ marker: true });
        await publisher.publishAsync(`meters/window-meter/readings`, marker, { qos: 1 });
        await again.waitFor(1);
        assert.equal(again.payloads[0], marker, "no reading was left without its PUBACK");
        again.calls[0].resolve(
          accepted({ ...again.calls[0], payload: '{"reading_timestamp":"x"}' }),
        );
      } finally {
        auto.stop();
        await ingress.close();
        await publisher.endAsync();
      }
    },
  );
}
