// The embedded broker against hostile clients (issue #10): connection caps per address and per
// listener, the CONNECT deadline, client ids bound to their meter, sessions per meter and bounded
// session queues, CONNECT passwords bound to the client id within a short window, and devices
// that keep sending junk.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect, type MqttClient } from "mqtt";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import type { AckMessage } from "../mqtt/intake.ts";
import { isoAgo, startTestGateway, type TestGateway } from "./_gateway.ts";
import { EVENT_TIMEOUT_MS, Inbox, pollUntil, within } from "./_mosquitto.ts";

const MINUTE = 60_000;
const INTERVAL = 15 * MINUTE;

/** CONNACK return codes (MQTT 3.1.1). */
const IDENTIFIER_REJECTED = 2;
const SERVER_UNAVAILABLE = 3;
const BAD_USERNAME_OR_PASSWORD = 4;

interface Meter {
  id: string;
  secret: Uint8Array;
}

interface Device {
  client: MqttClient;
  sessionPresent: boolean;
  closed: Promise<void>;
  /** Acks received, from before the CONNACK on (a stored session delivers at once). */
  acks: Inbox;
}

interface ConnectOptions {
  clientId?: string;
  clean?: boolean;
  nowMs?: number;
  /** Credentials signed for another client id than the one connecting. */
  signedFor?: string;
  password?: string;
}

function mqttPort(gw: TestGateway): number {
  assert.ok(gw.gateway.broker, "the embedded broker runs");
  return gw.gateway.broker.ports.mqtt;
}

async function registerMeter(gw: TestGateway, id: string, userId: string): Promise<Meter> {
  const { secret_hex } = await gw.registerMeter(id, userId);
  return { id, secret: Buffer.from(secret_hex, "hex") };
}

/** The last CONNECT second signed per client id (a device signs a later one each time). */
const lastSigned = new Map<string, number>();

/**
 * Connects an mqtt.js device; rejects with the CONNACK error (`code`) when refused. Without
 * `nowMs`, it signs like correct firmware: now, or a second after its last CONNECT if that was
 * within the same second.
 */
async function connectDevice(port: number, meter: Meter, o: ConnectOptions = {}): Promise<Device> {
  const clientId = o.clientId ?? `${meter.id}/${crypto.randomUUID().slice(0, 8)}`;
  const signedFor = o.signedFor ?? clientId;
  const nowMs = o.nowMs ?? Math.max(Date.now(), ((lastSigned.get(signedFor) ?? 0) + 1) * 1000);
  if (o.nowMs === undefined) lastSigned.set(signedFor, Math.floor(nowMs / 1000));
  const creds = connectCredentials(meter.id, meter.secret, { clientId: signedFor, nowMs });
  const client = connect({
    host: "127.0.0.1",
    port,
    protocolVersion: 4,
    clientId,
    clean: o.clean ?? true,
    username: creds.username,
    password: o.password ?? creds.password,
    reconnectPeriod: 0,
    connectTimeout: EVENT_TIMEOUT_MS,
  });
  client.on("error", () => {});
  const acks = new Inbox(client, (topic) => topic === `meters/${meter.id}/acks`);
  const closed = new Promise<void>((resolve) => client.once("close", () => resolve()));
  try {
    const sessionPresent = await within(
      new Promise<boolean>((resolve, reject) => {
        client.once("connect", (connack) => resolve(connack.sessionPresent));
        client.once("error", reject);
        client.once("close", () => reject(new Error("closed before CONNACK")));
      }),
      `CONNACK for ${clientId}`,
    );
    return { client, sessionPresent, closed, acks };
  } catch (error) {
    await client.endAsync(true);
    throw error;
  }
}

const refusedWith = (code: number) => (error: unknown) => {
  assert.equal((error as { code?: number }).code, code, String(error));
  return true;
};

/** Sum of a counter's series in `/metrics` whose labels contain `labels`. */
async function counter(gw: TestGateway, name: string, labels = ""): Promise<number> {
  const text = await (await fetch(`${gw.url}/metrics`)).text();
  let total = 0;
  for (const line of text.split("\n")) {
    const m = new RegExp(`^${name}(\\{[^}]*\\})? (\\S+)$`).exec(line);
    if (m && (m[1] ?? "").includes(labels)) total += Number(m[2]);
  }
  return total;
}

/** A raw TCP connection that never speaks MQTT; `closed` resolves when the server drops it. */
async function idleSocket(port: number, send?: Uint8Array): Promise<{
  conn: Deno.TcpConn;
  closed: Promise<void>;
  close(): void;
}> {
  const conn = await Deno.connect({ hostname: "127.0.0.1", port });
  if (send) await conn.write(send);
  let open = true;
  const closed = (async () => {
    const buf = new Uint8Array(256);
    try {
      while (await conn.read(buf) !== null) { /* drain */ }
    } catch { /* reset */ }
    if (open) {
      open = false;
      conn.close();
    }
  })();
  return {
    conn,
    closed,
    close() {
      if (open) {
        open = false;
        conn.close();
      }
    },
  };
}

/** Publishes a reading at QoS 1 and returns once its PUBACK came. */
function publishReading(device: Device, meter: Meter, ts: string, kwh = "1.5"): Promise<unknown> {
  return within(
    device.client.publishAsync(
      `meters/${meter.id}/readings`,
      readingPayload(meter.id, meter.secret, ts, kwh),
      { qos: 1 },
    ),
    `PUBACK for ${ts}`,
  );
}

Deno.test("the broker caps unauthenticated connections per address and closes the excess at once", async (t) => {
  const N = 5;
  await using gw = await startTestGateway({
    env: { MQTT_MAX_CONNECTIONS_PER_ADDRESS: String(N), MQTT_CONNECT_TIMEOUT: "30s" },
  });
  const port = mqttPort(gw);
  const user = await gw.createUser("cap@hardening.test");
  const meter = await registerMeter(gw, "cap-meter", user.id);
  const device = await connectDevice(port, meter);
  const idle: Awaited<ReturnType<typeof idleSocket>>[] = [];
  try {
    await t.step(
      `the ${N + 1}th idle socket from one address is closed, the first ${N} stay`,
      async () => {
        for (let i = 0; i < N; i++) idle.push(await idleSocket(port));
        const extra = await idleSocket(port);
        await within(extra.closed, "the extra socket is closed");
        assert.equal(await counter(gw, "mqtt_connection_errors_total", 'reason="address_full"'), 1);
        // The first N are still open: a write and a moment later nothing has closed them.
        let closedEarly = false;
        for (const s of idle) s.closed.then(() => closedEarly = true);
        const again = await idleSocket(port);
        await within(again.closed, "a further socket is closed as well");
        assert.equal(closedEarly, false, "the first sockets are still open");
      },
    );

    await t.step("an authenticated device is not counted and keeps publishing", async () => {
      // Connected before the flood; its session is not "pending".
      const base = Date.now();
      for (let i = 0; i < 5; i++) {
        const ts = isoAgo((i + 1) * INTERVAL, base);
        await publishReading(device, meter, ts);
        assert.ok(await gw.gateway.store.getReading(meter.id, Date.parse(ts)), ts);
      }
    });

    await t.step("once the idle sockets are gone, new devices connect again", async () => {
      for (const s of idle) s.close();
      await Promise.all(idle.map((s) => s.closed));
      await pollUntil(async () => {
        try {
          const d = await connectDevice(port, meter);
          await d.client.endAsync();
          return true;
        } catch {
          return false;
        }
      }, "a new device connects");
    });
  } finally {
    for (const s of idle) s.close();
    await device.client.endAsync();
  }
});

Deno.test("sockets that do not authenticate within MQTT_CONNECT_TIMEOUT are closed", async (t) => {
  await using gw = await startTestGateway({ env: { MQTT_CONNECT_TIMEOUT: "1s" } });
  const port = mqttPort(gw);

  await t.step("an idle socket (no CONNECT at all)", async () => {
    const started = Date.now();
    const s = await idleSocket(port);
    // aedes alone waited 10 s (30 s by default); the deadline here is 1 s.
    await within(s.closed, "the idle socket is closed", 5_000);
    assert.ok(Date.now() - started >= 800, "not before the deadline");
  });

  await t.step("a socket that sends half a CONNECT and stops (half-open)", async () => {
    // Fixed header of a CONNECT with remaining length 40, then nothing.
    const s = await idleSocket(port, new Uint8Array([0x10, 40, 0, 4, 0x4d, 0x51]));
    await within(s.closed, "the half-open socket is closed", 5_000);
  });

  await t.step("both are counted", async () => {
    assert.equal(
      await counter(gw, "mqtt_connection_errors_total", 'reason="connect_timeout"'),
      2,
    );
  });
});

Deno.test("an authenticated device keeps publishing and getting PUBACKs while the listener is full of idle sockets", async (t) => {
  const MAX = 40;
  await using gw = await startTestGateway({
    env: {
      MQTT_MAX_CONNECTIONS: String(MAX),
      MQTT_MAX_CONNECTIONS_PER_ADDRESS: "1000",
      MQTT_CONNECT_TIMEOUT: "60s",
    },
  });
  const port = mqttPort(gw);
  const user = await gw.createUser("flood@hardening.test");
  const meter = await registerMeter(gw, "flood-meter", user.id);
  const device = await connectDevice(port, meter);
  const acks = device.acks;
  await device.client.subscribeAsync(`meters/${meter.id}/acks`, { qos: 1 });
  const idle: Awaited<ReturnType<typeof idleSocket>>[] = [];
  try {
    await t.step("a flood fills the listener; the excess is closed at once", async () => {
      for (let i = 0; i < MAX + 20; i++) idle.push(await idleSocket(port));
      await pollUntil(
        async () =>
          await counter(gw, "mqtt_connection_errors_total", 'reason="listener_full"') >= 21,
        "the sockets beyond the cap are refused",
      );
    });

    await t.step("the connected device is served throughout", async () => {
      const base = Date.now();
      for (let i = 0; i < 10; i++) {
        const ts = isoAgo((i + 1) * INTERVAL, base);
        await publishReading(device, meter, ts);
        const ack = await acks.nextJson<AckMessage>();
        assert.equal(ack.status, "accepted", JSON.stringify(ack));
        assert.ok(await gw.gateway.store.getReading(meter.id, Date.parse(ts)));
      }
    });
  } finally {
    for (const s of idle) s.close();
    await device.client.endAsync();
  }
});

Deno.test("a client id is bound to its meter: another tenant's device cannot take a meter's session", async (t) => {
  await using gw = await startTestGateway();
  const port = mqttPort(gw);
  const alice = await gw.createUser("alice@hardening.test");
  const bob = await gw.createUser("bob@hardening.test");
  // "hz-1" is a prefix of "hz-10": the rule must not confuse them.
  const a = await registerMeter(gw, "hz-1", alice.id);
  const b = await registerMeter(gw, "hz-10", bob.id);

  await t.step("the meter id itself and <meter_id>/<suffix> are accepted", async () => {
    for (const clientId of [a.id, `${a.id}/main`, `${a.id}/fw-2.1:x_y`]) {
      const d = await connectDevice(port, a, { clientId });
      await d.client.endAsync();
    }
  });

  await t.step("any other client id is refused with 'identifier rejected'", async () => {
    for (const clientId of [b.id, `${b.id}/main`, `${a.id}-main`, `${a.id}0`, "", "device-7"]) {
      await assert.rejects(
        connectDevice(port, a, { clientId }),
        refusedWith(IDENTIFIER_REJECTED),
        `client id ${JSON.stringify(clientId)} for ${a.id}`,
      );
    }
    for (const clientId of [a.id, `${a.id}/main`, `${a.id}/x`]) {
      await assert.rejects(
        connectDevice(port, b, { clientId }),
        refusedWith(IDENTIFIER_REJECTED),
        `client id ${JSON.stringify(clientId)} for ${b.id}`,
      );
    }
  });

  await t.step(
    "bob's device using alice's persistent client id neither disconnects her nor gets her acks",
    async () => {
      const clientId = `${a.id}/main`;
      const owner = await connectDevice(port, a, { clientId, clean: false });
      const acks = owner.acks;
      await owner.client.subscribeAsync(`meters/${a.id}/acks`, { qos: 1 });
      await assert.rejects(
        connectDevice(port, b, { clientId }),
        refusedWith(IDENTIFIER_REJECTED),
      );
      assert.ok(owner.client.connected, "alice's session is still up");
      const ts = isoAgo(MINUTE);
      await publishReading(owner, a, ts);
      const ack = await acks.nextJson<AckMessage>();
      assert.equal(ack.status, "accepted", JSON.stringify(ack));
      assert.equal(
        await counter(gw, "mqtt_connection_errors_total", 'reason="client_id_rejected"'),
        10,
      );
      await owner.client.endAsync();
    },
  );
});

Deno.test("sessions per meter are capped and each offline session's queue is bounded", async (t) => {
  await using gw = await startTestGateway({
    env: { MQTT_SESSIONS_PER_METER: "2", MQTT_SESSION_QUEUE_MAX: "3" },
  });
  const port = mqttPort(gw);
  const user = await gw.createUser("sessions@hardening.test");
  const m = await registerMeter(gw, "sess-meter", user.id);
  const subscribe = async (d: Device) => {
    await d.client.subscribeAsync(`meters/${m.id}/acks`, { qos: 1 });
  };

  await t.step("two live sessions are admitted, a third is refused", async () => {
    const one = await connectDevice(port, m, { clientId: `${m.id}/1` });
    const two = await connectDevice(port, m, { clientId: `${m.id}/2` });
    await assert.rejects(
      connectDevice(port, m, { clientId: `${m.id}/3` }),
      refusedWith(IDENTIFIER_REJECTED),
    );
    // The same id again takes its own session over (a device reconnecting).
    const again = await connectDevice(port, m, { clientId: `${m.id}/1` });
    await within(one.closed, "the older connection with the same id is closed");
    await again.client.endAsync();
    await two.client.endAsync();
    assert.equal(
      await counter(gw, "mqtt_connection_errors_total", 'reason="sessions_full"'),
      1,
    );
  });

  await t.step("an offline session keeps at most MQTT_SESSION_QUEUE_MAX acks", async () => {
    const q = await connectDevice(port, m, { clientId: `${m.id}/q`, clean: false });
    await subscribe(q);
    await q.client.endAsync();
    // Six readings while the persistent session is offline: six acks for it.
    const pub = await connectDevice(port, m, { clientId: `${m.id}/pub` });
    const base = Date.now();
    for (let i = 0; i < 6; i++) await publishReading(pub, m, isoAgo((i + 1) * INTERVAL, base));
    const back = await connectDevice(port, m, { clientId: `${m.id}/q`, clean: false });
    assert.equal(back.sessionPresent, true);
    const inbox = back.acks;
    // A marker reading: its ack arrives after whatever was queued.
    const marker = isoAgo(10 * INTERVAL, base);
    await publishReading(pub, m, marker, "9");
    const received: AckMessage[] = [];
    for (;;) {
      const ack = await inbox.nextJson<AckMessage>();
      if (ack.reading_timestamp === marker) break;
      received.push(ack);
    }
    assert.equal(received.length, 3, JSON.stringify(received));
    assert.equal(await counter(gw, "mqtt_connection_errors_total", 'reason="queue_full"'), 3);
    await back.client.endAsync();
    await pub.client.endAsync();
  });

  await t.step(
    "a new client id evicts the least recently seen offline session instead of growing",
    async () => {
      // Sessions now: q (offline, persistent). Add p (offline, persistent): the table is full.
      const p = await connectDevice(port, m, { clientId: `${m.id}/p`, clean: false });
      await subscribe(p);
      await p.client.endAsync();
      // q was seen before p: a third id evicts q, not p.
      const fresh = await connectDevice(port, m, { clientId: `${m.id}/new`, clean: false });
      await fresh.client.endAsync();
      const pBack = await connectDevice(port, m, { clientId: `${m.id}/p`, clean: false });
      assert.equal(pBack.sessionPresent, true, "p's session survived");
      await pBack.client.endAsync();
      // /new was seen last, p just now: reconnecting q evicts /new and finds nothing stored.
      const qBack = await connectDevice(port, m, { clientId: `${m.id}/q`, clean: false });
      assert.equal(qBack.sessionPresent, false, "q's session was forgotten");
      await qBack.client.endAsync();
    },
  );
});

Deno.test("a CONNECT password is bound to its client id and fresh for MQTT_CONNECT_MAX_AGE only", async (t) => {
  await using gw = await startTestGateway({
    env: { MQTT_CONNECT_MAX_AGE: "60s", MQTT_CONNECT_MAX_SKEW: "30s" },
  });
  const port = mqttPort(gw);
  const user = await gw.createUser("replay@hardening.test");
  const m = await registerMeter(gw, "replay-meter", user.id);

  await t.step("a password signed for one client id is refused from another", async () => {
    await assert.rejects(
      connectDevice(port, m, { clientId: `${m.id}/b`, signedFor: `${m.id}/a` }),
      refusedWith(5),
    );
  });

  await t.step("timestamps older than 60 s or more than 30 s ahead are refused", async () => {
    for (const offset of [-90_000, -6 * MINUTE, 45_000, 6 * MINUTE]) {
      await assert.rejects(
        connectDevice(port, m, { nowMs: Date.now() + offset }),
        refusedWith(BAD_USERNAME_OR_PASSWORD),
        `offset ${offset} ms`,
      );
    }
    for (const offset of [-40_000, 15_000]) {
      const d = await connectDevice(port, m, { nowMs: Date.now() + offset });
      await d.client.endAsync();
    }
    assert.equal(
      await counter(gw, "mqtt_connection_errors_total", 'reason="stale_password"') +
        await counter(gw, "mqtt_connection_errors_total", 'reason="future_password"'),
      4,
    );
  });

  await t.step("the same password is not accepted twice, even within its window", async () => {
    const clientId = `${m.id}/once`;
    const { password } = connectCredentials(m.id, m.secret, { clientId });
    const first = await connectDevice(port, m, { clientId, password });
    await first.client.endAsync();
    await assert.rejects(
      connectDevice(port, m, { clientId, password }),
      refusedWith(BAD_USERNAME_OR_PASSWORD),
    );
    // An older timestamp than the one last used is a replay too.
    await assert.rejects(
      connectDevice(port, m, { clientId, nowMs: Date.now() - 10_000 }),
      refusedWith(BAD_USERNAME_OR_PASSWORD),
    );
    assert.equal(
      await counter(gw, "mqtt_connection_errors_total", 'reason="replayed_password"'),
      2,
    );
  });
});

Deno.test("a device that keeps sending junk is slowed down, disconnected and refused for a while", async (t) => {
  await using gw = await startTestGateway({
    env: { MQTT_JUNK_LIMIT: "6", MQTT_JUNK_WINDOW: "1m", MQTT_JUNK_BACKOFF: "3s" },
  });
  const port = mqttPort(gw);
  const user = await gw.createUser("junk@hardening.test");
  const m = await registerMeter(gw, "junk-meter", user.id);
  const other = await registerMeter(gw, "junk-other", user.id);
  const topic = `meters/${m.id}/readings`;

  await t.step("valid readings do not count", async () => {
    const d = await connectDevice(port, m);
    const base = Date.now();
    for (let i = 0; i < 8; i++) await publishReading(d, m, isoAgo((i + 1) * INTERVAL, base));
    assert.ok(d.client.connected);
    await d.client.endAsync();
  });

  await t.step(
    "junk gets PUBACKs, slower past half the limit, then the device is dropped",
    async () => {
      const d = await connectDevice(port, m);
      const elapsed: number[] = [];
      // Invalid JSON, then a reading signed with another meter's key (bad_signature).
      const junk = [
        "not json",
        readingPayload(m.id, other.secret, isoAgo(MINUTE), "1"),
      ];
      for (let i = 0; i < 5; i++) {
        const started = Date.now();
        await within(d.client.publishAsync(topic, junk[i % 2], { qos: 1 }), `PUBACK ${i}`);
        elapsed.push(Date.now() - started);
      }
      assert.ok(elapsed[3] >= 800 && elapsed[4] >= 800, `throttled: ${elapsed.join(", ")} ms`);
      d.client.publish(topic, "still junk", { qos: 1 });
      await within(d.closed, "the device is disconnected at the limit");
      await d.client.endAsync(true);
      assert.equal(
        await counter(gw, "mqtt_connection_errors_total", 'reason="junk_disconnect"'),
        1,
      );
    },
  );

  await t.step("its reconnects are refused during the back-off, then accepted", async () => {
    await assert.rejects(connectDevice(port, m), refusedWith(SERVER_UNAVAILABLE));
    // Other meters are not affected.
    const o = await connectDevice(port, other);
    await o.client.endAsync();
    await pollUntil(async () => {
      try {
        const d = await connectDevice(port, m);
        await d.client.endAsync();
        return true;
      } catch {
        return false;
      }
    }, "the device may connect after the back-off");
  });

  await t.step("publishing to a forbidden topic counts as junk too", async () => {
    for (let i = 0; i < 6; i++) {
      const d = await connectDevice(port, m);
      d.client.publish(`meters/${other.id}/readings`, "{}", { qos: 1 });
      await within(d.closed, `connection ${i} closed`);
      await d.client.endAsync(true);
    }
    await assert.rejects(connectDevice(port, m), refusedWith(SERVER_UNAVAILABLE));
  });

  await t.step("so do malformed packets", async () => {
    const third = await registerMeter(gw, "junk-third", user.id);
    for (let i = 0; i < 6; i++) {
      const d = await connectDevice(port, third);
      // Packet type 0 is reserved: the parser fails and aedes drops the connection.
      (d.client.stream as unknown as { write(b: Uint8Array): void }).write(
        new Uint8Array([0x00, 0x00]),
      );
      await within(d.closed, `connection ${i} closed`);
      await d.client.endAsync(true);
    }
    await assert.rejects(connectDevice(port, third), refusedWith(SERVER_UNAVAILABLE));
  });
});
