// The embedded MQTT broker (aedes) against real clients: a stock mosquitto_pub signed with
// openssl, mqtt.js devices; CONNECT authentication, the topic ACL, revocation, rejected payloads,
// PUBACK after commit and a thousand concurrent meters.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect, type MqttClient } from "mqtt";
import type { Reading } from "../core/reading.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import type { AckMessage } from "../mqtt/intake.ts";
import { isoAgo, startTestGateway, type TestGateway } from "./_gateway.ts";
import { binariesAvailable, EVENT_TIMEOUT_MS, Inbox, within } from "./_mosquitto.ts";

const MINUTE = 60_000;
/** Readings of one meter are a metering interval apart (the dedupe window is ±15 minutes). */
const INTERVAL = 15 * MINUTE;

interface Meter {
  id: string;
  secret: string;
}

/** CONNACK return codes (MQTT 3.1.1). */
const BAD_USERNAME_OR_PASSWORD = 4;
const NOT_AUTHORIZED = 5;

function mqttPort(gw: TestGateway): number {
  const broker = gw.gateway.broker;
  assert.ok(broker, "the embedded broker runs");
  return broker.ports.mqtt;
}

async function registerMeter(gw: TestGateway, id: string, userId: string): Promise<Meter> {
  return { id, secret: (await gw.registerMeter(id, userId)).secret_hex };
}

function hex(secret: string): Uint8Array {
  return Buffer.from(secret, "hex");
}

/** A connected device, its errors and its close event. */
interface Device {
  client: MqttClient;
  errors: Error[];
  closed: Promise<void>;
}

/**
 * Connects an mqtt.js device to the embedded broker with HMAC CONNECT credentials. Rejects with
 * the CONNACK error (its `code` is the return code) when refused. No automatic reconnects.
 */
async function connectDevice(
  port: number,
  meter: Meter,
  options: { nowMs?: number; username?: string; password?: string; clientId?: string } = {},
): Promise<Device> {
  const clientId = options.clientId ?? `${meter.id}/${crypto.randomUUID().slice(0, 8)}`;
  const creds = connectCredentials(meter.id, hex(meter.secret), { clientId, nowMs: options.nowMs });
  const client = connect({
    host: "127.0.0.1",
    port,
    protocolVersion: 4,
    clientId,
    username: options.username ?? creds.username,
    password: options.password ?? creds.password,
    reconnectPeriod: 0,
    connectTimeout: EVENT_TIMEOUT_MS,
  });
  const errors: Error[] = [];
  client.on("error", (error) => errors.push(error));
  const closed = new Promise<void>((resolve) => client.once("close", () => resolve()));
  try {
    await within(
      new Promise<void>((resolve, reject) => {
        client.once("connect", () => resolve());
        client.once("error", reject);
        client.once("close", () => reject(errors[0] ?? new Error("closed before CONNACK")));
      }),
      `CONNACK for ${meter.id}`,
    );
  } catch (error) {
    await client.endAsync(true);
    throw error;
  }
  return { client, errors, closed };
}

/** Subscribes a device to its own acks topic and returns the inbox of acks. */
async function subscribeAcks(device: Device, meterId: string): Promise<Inbox> {
  const inbox = new Inbox(device.client, (topic) => topic === `meters/${meterId}/acks`);
  const granted = await device.client.subscribeAsync(`meters/${meterId}/acks`, { qos: 1 });
  assert.deepEqual(granted.map((g) => g.qos), [1], "own acks topic granted at QoS 1");
  return inbox;
}

/** Sum of every series of a counter in `/metrics`. */
async function counterTotal(gw: TestGateway, name: string): Promise<number> {
  const res = await fetch(`${gw.url}/metrics`);
  assert.equal(res.status, 200);
  let total = 0;
  for (const line of (await res.text()).split("\n")) {
    const m = new RegExp(`^${name}(\\{[^}]*\\})? (\\S+)$`).exec(line);
    if (m) total += Number(m[2]);
  }
  return total;
}

/** A minimal WebSocket client on `/ws` that queues every server message. */
class WsWatcher implements AsyncDisposable {
  #ws: WebSocket;
  #messages: Inbox;
  #closed: Promise<void>;
  #emit!: (topic: string, payload: Uint8Array) => void;

  private constructor(ws: WebSocket) {
    this.#ws = ws;
    this.#messages = new Inbox({
      on: (_event, listener) => this.#emit = (topic, payload) => listener(topic, payload, {}),
    });
    ws.addEventListener("message", (event) => {
      this.#emit("ws", new TextEncoder().encode(String(event.data)));
    });
    this.#closed = new Promise((resolve) => ws.addEventListener("close", () => resolve()));
  }

  static async open(gw: TestGateway, token: string): Promise<WsWatcher> {
    const ws = new WebSocket(`${gw.url.replace("http", "ws")}/ws?token=${token}`);
    const watcher = new WsWatcher(ws);
    await within(
      new Promise<void>((resolve, reject) => {
        ws.addEventListener("open", () => resolve(), { once: true });
        ws.addEventListener("close", () => reject(new Error("WebSocket closed")), { once: true });
      }),
      "WebSocket open",
    );
    return watcher;
  }

  // deno-lint-ignore no-explicit-any -- server messages of several shapes
  request(value: unknown): Promise<any> {
    this.#ws.send(JSON.stringify(value));
    return this.next();
  }

  // deno-lint-ignore no-explicit-any -- server messages of several shapes
  next(): Promise<any> {
    return this.#messages.nextJson();
  }

  async close(): Promise<void> {
    if (this.#ws.readyState !== WebSocket.CLOSED) this.#ws.close();
    await this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** Waits until the unix second after the one `ms` fell in (CONNECT timestamps are seconds). */
async function nextSecond(ms: number): Promise<void> {
  const wait = (Math.floor(ms / 1000) + 1) * 1000 - Date.now();
  if (wait > 0) await new Promise((resolve) => setTimeout(resolve, wait + 10));
}

/** Runs a shell script with the given environment; returns its output (stdout, stderr, code). */
async function sh(
  script: string,
  env: Record<string, string>,
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command("sh", {
    args: ["-c", script],
    env,
    stdin: "null",
    stdout: "piped",
    stderr: "piped",
  }).output();
  const decoder = new TextDecoder();
  return {
    code: out.code,
    stdout: decoder.decode(out.stdout),
    stderr: decoder.decode(out.stderr),
  };
}

// The README's recipe for a device without any SDK: openssl signs, mosquitto_pub publishes.
// CONNECT password = "<unix seconds>.<HMAC hex of the connect message>"; the message names the
// client id ($CID), which must be the meter id or "<meter id>/<suffix>".
const CONNECT_PASSWORD = `
NOW=$(date +%s)
PASS="$NOW.$(printf 'GRIDTOKENX_MQTT_CONNECT\\nmeter_id: %s\\nclient_id: %s\\ntimestamp: %s' \\
  "$METER" "$CID" "$NOW" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$SECRET | awk '{print $NF}')"
`;
const PUBLISH_SCRIPT = `set -eu
CID="$METER/pub"
${CONNECT_PASSWORD}
SIG=$(printf 'GRIDTOKENX_METER_READING\\nmeter_id: %s\\ntimestamp: %s\\nkwh_amount: %s' \\
  "$METER" "$TS" "$KWH" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$SECRET | awk '{print $NF}')
mosquitto_pub -h 127.0.0.1 -p "$PORT" -i "$CID" -u "$METER" -P "$PASS" -q 1 \\
  -t "meters/$METER/readings" \\
  -m "{\\"kwh_amount\\":\\"$KWH\\",\\"reading_timestamp\\":\\"$TS\\",\\"device_signature\\":\\"$SIG\\"}"
`;
// A persistent session (-c) for the acks: -E returns once the SUBACK came; the second run then
// receives what was queued for the session meanwhile (-C 1: one message; -W: a guard).
const ACKS_SESSION_SCRIPT = `set -eu
CID="$METER/acks"
${CONNECT_PASSWORD}
mosquitto_sub -h 127.0.0.1 -p "$PORT" -i "$CID" -c -u "$METER" -P "$PASS" -q 1 \\
  -t "meters/$METER/acks" $MODE
`;

const stock = await binariesAvailable(["mosquitto_pub", "mosquitto_sub", "openssl"]);

Deno.test({
  name: "a stock mosquitto_pub with an openssl-signed payload gets its reading stored, acked " +
    "on its acks topic and streamed to a WebSocket subscriber" +
    (stock.ok ? "" : ` (ignored: ${stock.reason})`),
  ignore: !stock.ok,
  async fn(t) {
    await using gw = await startTestGateway();
    const port = String(mqttPort(gw));
    const alice = await gw.createUser("alice@mqtt-stock.test");
    const meter = await registerMeter(gw, "stock-meter-1", alice.id);
    const env = { PATH: Deno.env.get("PATH") ?? "/usr/bin:/bin", PORT: port };

    await t.step("the openssl recipe reproduces the reference HMAC signer", async () => {
      const ts = isoAgo(0);
      const out = await sh(
        `printf 'GRIDTOKENX_METER_READING\\nmeter_id: %s\\ntimestamp: %s\\nkwh_amount: %s' \\
          "$METER" "$TS" "$KWH" | openssl dgst -sha256 -mac HMAC -macopt hexkey:$SECRET \\
          | awk '{print $NF}'`,
        { ...env, METER: meter.id, SECRET: meter.secret, TS: ts, KWH: "12.5" },
      );
      assert.equal(out.code, 0, out.stderr);
      assert.equal(
        out.stdout.trim(),
        signHmac(hex(meter.secret), canonicalMessage(meter.id, ts, "12.5")),
      );
    });

    await t.step(
      "the reading is stored by the time mosquitto_pub has its PUBACK, acked with its id, " +
        "and streamed over the WebSocket",
      async () => {
        await using ws = await WsWatcher.open(gw, alice.token);
        assert.equal(
          (await ws.request({ type: "subscribe", meters: [meter.id] })).type,
          "subscribed",
        );
        const session = { ...env, METER: meter.id, SECRET: meter.secret };
        const subscribed = await sh(ACKS_SESSION_SCRIPT, { ...session, MODE: "-E" });
        const subscribedAt = Date.now();
        assert.equal(subscribed.code, 0, `mosquitto_sub -E: ${subscribed.stderr}`);

        const ts = isoAgo(2 * MINUTE);
        const pub = await sh(PUBLISH_SCRIPT, { ...session, TS: ts, KWH: "12.5" });
        assert.equal(pub.code, 0, `mosquitto_pub failed: ${pub.stderr}`);
        // mosquitto_pub exits after its PUBACK: the reading must already be stored.
        const row = await gw.gateway.store.getReading(meter.id, Date.parse(ts));
        assert.ok(row, "stored before the PUBACK");
        assert.equal(row.source, "mqtt");

        // The same client id reconnects: its CONNECT must carry a later timestamp than the last.
        await nextSecond(subscribedAt);
        const acks = await sh(ACKS_SESSION_SCRIPT, { ...session, MODE: "-C 1 -W 20" });
        assert.equal(acks.code, 0, `mosquitto_sub -C 1: ${acks.stderr}`);
        const ack = JSON.parse(acks.stdout.trim()) as AckMessage;
        assert.equal(ack.status, "accepted", acks.stdout);
        assert.equal(ack.reading_timestamp, ts);

        const list = await gw.request("GET", `/api/meters/readings?meter_id=${meter.id}`, {
          token: alice.token,
        });
        assert.equal(list.status, 200, JSON.stringify(list.body));
        const items = list.body.items as Reading[];
        assert.equal(items.length, 1, JSON.stringify(items));
        assert.equal(items[0].id, ack.id, "the ack carries the stored reading's id");
        assert.equal(items[0].kwh_amount, 12.5);
        assert.equal(items[0].source, "mqtt");
        assert.equal(Date.parse(items[0].reading_timestamp), Date.parse(ts));

        const event = await ws.next();
        assert.equal(event.type, "meter.reading.accepted", JSON.stringify(event));
        assert.equal(event.data.id, ack.id);
        assert.deepEqual(event.data, items[0], "the event carries the stored reading");
      },
    );

    await t.step("mosquitto_pub signing its CONNECT with a wrong key is refused", async () => {
      const wrong = "ab".repeat(32);
      const pub = await sh(PUBLISH_SCRIPT, {
        ...env,
        METER: meter.id,
        SECRET: wrong,
        TS: isoAgo(20 * MINUTE),
        KWH: "1",
      });
      assert.notEqual(pub.code, 0, "mosquitto_pub must fail");
      assert.match(pub.stderr, /not authori[sz]ed/i, pub.stderr);
      const count = (await gw.gateway.store.listReadings({
        meter_id: meter.id,
        order: "asc",
        limit: 10,
      })).items.length;
      assert.equal(count, 1, "nothing more stored");
    });
  },
});

Deno.test("device CONNECT authentication and the topic ACL of the embedded broker", async (t) => {
  await using gw = await startTestGateway();
  const port = mqttPort(gw);
  const user = await gw.createUser("acl@mqtt.test");
  const a = await registerMeter(gw, "acl-meter-a", user.id);
  const b = await registerMeter(gw, "acl-meter-b", user.id);

  const refusedWith = (code: number) => (error: unknown) => {
    assert.equal((error as { code?: number }).code, code, String(error));
    return true;
  };

  await t.step("valid credentials connect", async () => {
    const device = await connectDevice(port, a);
    assert.ok(device.client.connected);
    await device.client.endAsync();
  });

  await t.step("a CONNECT password signed with the wrong key is not authorised", async () => {
    await assert.rejects(
      connectDevice(port, { id: a.id, secret: b.secret }),
      refusedWith(NOT_AUTHORIZED),
    );
  });

  await t.step("a tampered CONNECT signature is not authorised", async () => {
    const good = connectCredentials(a.id, hex(a.secret), { clientId: a.id }).password;
    const [seconds, sig] = good.split(".");
    const flipped = sig.slice(0, -1) + (sig.endsWith("0") ? "1" : "0");
    await assert.rejects(
      connectDevice(port, a, { clientId: a.id, password: `${seconds}.${flipped}` }),
      refusedWith(NOT_AUTHORIZED),
    );
  });

  await t.step(
    "a CONNECT password signed with a stale timestamp (6 minutes) is refused",
    async () => {
      await assert.rejects(
        connectDevice(port, a, { nowMs: Date.now() - 6 * MINUTE }),
        refusedWith(BAD_USERNAME_OR_PASSWORD),
      );
      await assert.rejects(
        connectDevice(port, a, { nowMs: Date.now() + 6 * MINUTE }),
        refusedWith(BAD_USERNAME_OR_PASSWORD),
        "a timestamp from the future is as stale",
      );
    },
  );

  await t.step("malformed passwords and usernames are refused", async () => {
    for (const password of ["", "nodot", "123.", ".abc", "12x.abcd"]) {
      await assert.rejects(
        connectDevice(port, a, { password }),
        refusedWith(BAD_USERNAME_OR_PASSWORD),
        `password ${JSON.stringify(password)}`,
      );
    }
    await assert.rejects(
      connectDevice(port, a, { username: "bad/meter" }),
      refusedWith(BAD_USERNAME_OR_PASSWORD),
    );
  });

  await t.step("an unknown meter is not authorised", async () => {
    await assert.rejects(
      connectDevice(port, { id: "acl-meter-unknown", secret: a.secret }),
      refusedWith(NOT_AUTHORIZED),
    );
  });

  await t.step(
    "publishing to another meter's readings topic closes the connection and stores nothing",
    async () => {
      const device = await connectDevice(port, a);
      const ts = isoAgo(MINUTE);
      // A payload B really signed: only the topic ACL stands in the way.
      const publish = device.client.publishAsync(
        `meters/${b.id}/readings`,
        readingPayload(b.id, hex(b.secret), ts, "3"),
        { qos: 1 },
      ).then(() => "acked", () => "failed");
      await within(device.closed, "the broker closes the offending connection");
      await device.client.endAsync(true);
      assert.notEqual(await Promise.race([publish, Promise.resolve("pending")]), "acked");
      assert.equal(await gw.gateway.store.getReading(b.id, Date.parse(ts)), null);
      const listed = await gw.gateway.store.listReadings({
        meter_id: b.id,
        order: "asc",
        limit: 10,
      });
      assert.equal(listed.items.length, 0, "nothing stored for the other meter");
    },
  );

  await t.step("publishing to its own acks topic or elsewhere is refused too", async () => {
    for (const topic of [`meters/${a.id}/acks`, "meters/x/readings/extra", "other"]) {
      const device = await connectDevice(port, a);
      device.client.publish(topic, "{}", { qos: 1 });
      await within(device.closed, `the broker closes the connection after ${topic}`);
      await device.client.endAsync(true);
    }
  });

  await t.step(
    "subscribing to another meter's acks (or a wildcard) is refused with SUBACK 0x80",
    async () => {
      const device = await connectDevice(port, a);
      for (const topic of [`meters/${b.id}/acks`, "meters/+/acks", "#", `meters/${b.id}/#`]) {
        const error = await device.client.subscribeAsync(topic, { qos: 1 }).then(
          () => null,
          (e) => e as Error & { packet?: { granted?: number[] } },
        );
        assert.ok(error, `subscribing to ${topic} must fail`);
        assert.deepEqual(error.packet?.granted, [128], `${topic}: ${error.message}`);
      }
      assert.ok(device.client.connected, "a refused subscription leaves the session up");
      // The session is still usable: its own acks topic works.
      const acks = await subscribeAcks(device, a.id);
      const ts = isoAgo(2 * MINUTE);
      await device.client.publishAsync(
        `meters/${a.id}/readings`,
        readingPayload(a.id, hex(a.secret), ts, "1"),
        { qos: 1 },
      );
      const ack = await acks.nextJson<AckMessage>();
      assert.equal(ack.status, "accepted", JSON.stringify(ack));
      await device.client.endAsync();
    },
  );

  await t.step(
    "a revoked device is disconnected at once and refused when it reconnects",
    async () => {
      const device = await connectDevice(port, b);
      const second = await connectDevice(port, b);
      const res = await gw.request("POST", `/api/admin/devices/${b.id}/revoke`, {
        token: gw.adminToken,
        body: { reason: "test" },
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
      await within(device.closed, "the revoked device's connection closes");
      await within(second.closed, "every session of the revoked meter closes");
      await device.client.endAsync(true);
      await second.client.endAsync(true);
      await assert.rejects(connectDevice(port, b), refusedWith(NOT_AUTHORIZED));
      // Other meters are unaffected.
      const other = await connectDevice(port, a);
      await other.client.endAsync();
    },
  );
});

Deno.test("every kind of invalid payload gets a rejected ack with its code, a PUBACK, and nothing stored", async (t) => {
  // Far more junk than a device may send (MQTT_JUNK_LIMIT, tested in mqtt_hardening_test.ts).
  await using gw = await startTestGateway({ env: { MQTT_JUNK_LIMIT: "1000" } });
  const port = mqttPort(gw);
  const user = await gw.createUser("payloads@mqtt.test");
  const meter = await registerMeter(gw, "payload-meter", user.id);
  const other = await registerMeter(gw, "payload-other", user.id);
  const device = await connectDevice(port, meter);
  const acks = await subscribeAcks(device, meter.id);
  const topic = `meters/${meter.id}/readings`;
  const key = hex(meter.secret);
  let slot = 1;
  /** A fresh timestamp for each reading, 15 minutes apart. */
  const nextTs = () => isoAgo(slot++ * INTERVAL);
  const sign = (ts: string, kwh: string, id = meter.id, secret = key) =>
    signHmac(secret, canonicalMessage(id, ts, kwh));
  const json = (value: unknown) => JSON.stringify(value);
  const rejectedTs: string[] = [];

  /** Publishes at QoS 1, awaits the PUBACK, then the ack, and returns the ack. */
  const publish = async (payload: string | Uint8Array): Promise<AckMessage> => {
    await within(
      device.client.publishAsync(topic, payload as string, { qos: 1 }),
      "PUBACK",
    );
    return await acks.nextJson<AckMessage>();
  };
  const expectRejected = async (
    payload: string | Uint8Array,
    code: string,
    ts: string | null,
  ) => {
    const ack = await publish(payload);
    assert.equal(ack.status, "rejected", json(ack));
    assert.equal(ack.code, code, json(ack));
    assert.equal(typeof ack.message, "string", json(ack));
    assert.ok(ack.message!.length > 0, json(ack));
    assert.equal(ack.id, undefined, json(ack));
    assert.equal(ack.reading_timestamp, ts, json(ack));
    if (ts) rejectedTs.push(ts);
  };

  try {
    await t.step("not JSON", async () => {
      await expectRejected("kwh=1.5", "invalid_payload", null);
      await expectRejected("", "invalid_payload", null);
      await expectRejected("{", "invalid_payload", null);
    });

    await t.step("JSON that is not an object", async () => {
      for (const p of ["null", "42", '"text"', "[1,2]", "true"]) {
        await expectRejected(p, "invalid_payload", null);
      }
    });

    await t.step("wrong types", async () => {
      const ts = nextTs();
      const sig = sign(ts, "1");
      await expectRejected(
        json({ kwh_amount: true, reading_timestamp: ts, device_signature: sig }),
        "invalid_payload",
        ts,
      );
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: 1700000000, device_signature: sig }),
        "invalid_payload",
        null,
      );
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: ts, device_signature: 7 }),
        "invalid_payload",
        ts,
      );
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: ts, device_signature: sig, key_id: 3 }),
        "invalid_payload",
        ts,
      );
      await expectRejected(
        json({ kwh_amount: "one", reading_timestamp: ts, device_signature: sig }),
        "invalid_payload",
        ts,
      );
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: "yesterday", device_signature: sig }),
        "invalid_payload",
        "yesterday",
      );
    });

    await t.step("a payload larger than MQTT_MAX_PAYLOAD (4096 bytes)", async () => {
      const ts = nextTs();
      const big = json({
        kwh_amount: "1",
        reading_timestamp: ts,
        device_signature: sign(ts, "1"),
        padding: "x".repeat(5000),
      });
      assert.ok(new TextEncoder().encode(big).length > 4096);
      await expectRejected(big, "payload_too_large", null);
      rejectedTs.push(ts);
    });

    await t.step("binary garbage and non-UTF-8 bytes", async () => {
      await expectRejected(
        new Uint8Array([0xff, 0xfe, 0x00, 0x01, 0x80, 0xc3]),
        "invalid_payload",
        null,
      );
      const ts = nextTs();
      const text = json({ kwh_amount: "1", reading_timestamp: ts, device_signature: "SIG" });
      const bytes = new TextEncoder().encode(text);
      const i = text.indexOf("SIG");
      const invalid = new Uint8Array([...bytes.slice(0, i), 0xc3, 0x28, ...bytes.slice(i + 3)]);
      await expectRejected(invalid, "invalid_payload", null);
      rejectedTs.push(ts);
    });

    await t.step("a missing or empty signature", async () => {
      const ts = nextTs();
      await expectRejected(json({ kwh_amount: "1", reading_timestamp: ts }), "invalid_payload", ts);
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: ts, device_signature: "" }),
        "invalid_payload",
        ts,
      );
    });

    await t.step("an extra unknown field", async () => {
      const ts = nextTs();
      await expectRejected(
        json({ kwh_amount: "1", reading_timestamp: ts, device_signature: sign(ts, "1"), x: 1 }),
        "invalid_payload",
        ts,
      );
    });

    await t.step("a meter_id in the payload that differs from the topic", async () => {
      const ts = nextTs();
      await expectRejected(
        json({
          meter_id: other.id,
          kwh_amount: "1",
          reading_timestamp: ts,
          device_signature: sign(ts, "1", other.id, hex(other.secret)),
        }),
        "invalid_payload",
        ts,
      );
    });

    await t.step(
      "a payload signed for another meter, published on this meter's topic",
      async () => {
        const ts = nextTs();
        // Signed by the other meter, for the other meter.
        await expectRejected(
          readingPayload(other.id, hex(other.secret), ts, "1"),
          "bad_signature",
          ts,
        );
        // Signed with this meter's key, but over the other meter's id.
        await expectRejected(readingPayload(other.id, key, ts, "1"), "bad_signature", ts);
        // A signature that is not even hex or base64url.
        await expectRejected(
          json({ kwh_amount: "1", reading_timestamp: ts, device_signature: "not a signature!" }),
          "bad_signature",
          ts,
        );
      },
    );

    await t.step("kwh out of range", async () => {
      for (const kwh of ["150", "0", "-1", "100.0001"]) {
        const ts = nextTs();
        await expectRejected(readingPayload(meter.id, key, ts, kwh), "kwh_out_of_range", ts);
      }
    });

    await t.step("a timestamp too old or in the future", async () => {
      const old = isoAgo(8 * 24 * 60 * MINUTE);
      await expectRejected(readingPayload(meter.id, key, old, "1"), "timestamp_too_old", old);
      const future = isoAgo(-10 * MINUTE);
      await expectRejected(
        readingPayload(meter.id, key, future, "1"),
        "timestamp_in_future",
        future,
      );
    });

    await t.step("nothing was stored for any of them", async () => {
      for (const ts of rejectedTs) {
        assert.equal(await gw.gateway.store.getReading(meter.id, Date.parse(ts)), null, ts);
      }
      const listed = await gw.gateway.store.listReadings({
        meter_id: meter.id,
        order: "asc",
        limit: 10,
      });
      assert.equal(listed.items.length, 0, JSON.stringify(listed.items));
    });

    await t.step(
      "the session stays usable: a valid reading is accepted, its replay is a duplicate with the first id",
      async () => {
        assert.ok(device.client.connected);
        assert.deepEqual(device.errors, []);
        const ts = nextTs();
        const payload = readingPayload(meter.id, key, ts, "2.5");
        const first = await publish(payload);
        assert.equal(first.status, "accepted", json(first));
        assert.equal(first.reading_timestamp, ts);
        assert.ok(first.id);
        const second = await publish(payload);
        assert.deepEqual(
          { status: second.status, code: second.code, id: second.id, ts: second.reading_timestamp },
          { status: "duplicate", code: "duplicate", id: first.id, ts },
          json(second),
        );
        // Within the dedupe window of the first: a duplicate of it as well.
        const near = new Date(Date.parse(ts) + 5 * MINUTE).toISOString().replace(".000Z", "Z");
        const third = await publish(readingPayload(meter.id, key, near, "2.5"));
        assert.equal(third.status, "duplicate", json(third));
        assert.equal(third.id, first.id, json(third));
        const listed = await gw.gateway.store.listReadings({
          meter_id: meter.id,
          order: "asc",
          limit: 10,
        });
        assert.deepEqual(listed.items.map((r) => r.ts), [Date.parse(ts)], "stored once");
      },
    );
  } finally {
    await device.client.endAsync();
  }
});

Deno.test("the embedded broker's PUBACK means the reading is already stored", async () => {
  await using gw = await startTestGateway();
  const port = mqttPort(gw);
  const user = await gw.createUser("puback@mqtt.test");
  const meter = await registerMeter(gw, "puback-meter", user.id);
  const device = await connectDevice(port, meter);
  try {
    const base = Date.now();
    for (let i = 0; i < 50; i++) {
      const ts = isoAgo((i + 1) * INTERVAL, base);
      await within(
        device.client.publishAsync(
          `meters/${meter.id}/readings`,
          readingPayload(meter.id, hex(meter.secret), ts, `${i + 1}.25`),
          { qos: 1 },
        ),
        `PUBACK ${i}`,
      );
      const row = await gw.gateway.store.getReading(meter.id, Date.parse(ts));
      assert.ok(row, `reading ${i} (${ts}) is readable as soon as its PUBACK arrived`);
      assert.equal(row.kwh_e4, (i + 1) * 10_000 + 2_500);
    }
  } finally {
    await device.client.endAsync();
  }
});

Deno.test("1,000 meters connect at once to the embedded broker, each publishes, all are stored, no connection errors", async () => {
  const N = 1_000;
  const BATCH = 100;
  // All from 127.0.0.1, like meters behind one NAT: more than the default 64 connecting at once.
  await using gw = await startTestGateway({ env: { MQTT_MAX_CONNECTIONS_PER_ADDRESS: "1000" } });
  const port = mqttPort(gw);
  const user = await gw.createUser("fleet@mqtt.test");
  const started = performance.now();
  const res = await gw.request("POST", "/api/admin/devices/import", {
    token: gw.adminToken,
    body: {
      devices: Array.from({ length: N }, (_, i) => ({
        meter_id: `fleet-${String(i).padStart(4, "0")}`,
        user_id: user.id,
        algorithm: "hmac-sha256",
      })),
    },
  });
  assert.equal(res.status, 200, JSON.stringify(res.body).slice(0, 500));
  const meters: Meter[] = (res.body.results as { meter_id: string; secret_hex?: string }[]).map(
    (r) => {
      assert.ok(r.secret_hex, JSON.stringify(r));
      return { id: r.meter_id, secret: r.secret_hex };
    },
  );
  assert.equal(meters.length, N);
  const imported = performance.now();
  const errorsBefore = await counterTotal(gw, "mqtt_connection_errors_total");

  const devices: Device[] = [];
  try {
    for (let i = 0; i < N; i += BATCH) {
      devices.push(
        ...await Promise.all(meters.slice(i, i + BATCH).map((m) => connectDevice(port, m))),
      );
    }
    assert.equal(gw.gateway.broker!.connections, N, "all sessions connected at once");
    const connected = performance.now();

    const ts = isoAgo(MINUTE);
    await within(
      Promise.all(devices.map((d, i) =>
        d.client.publishAsync(
          `meters/${meters[i].id}/readings`,
          readingPayload(meters[i].id, hex(meters[i].secret), ts, "0.5"),
          { qos: 1 },
        )
      )),
      "every PUBACK",
      30_000,
    );
    const published = performance.now();
    for (const m of meters) {
      assert.ok(await gw.gateway.store.getReading(m.id, Date.parse(ts)), `${m.id} stored`);
    }
    const stats = await gw.request("GET", "/api/meters/stats", { token: user.token });
    assert.equal(stats.body.reading_count, N, JSON.stringify(stats.body));
    for (const d of devices) assert.deepEqual(d.errors, []);
    console.log(
      `  import ${Math.round(imported - started)} ms, connect ${
        Math.round(connected - imported)
      } ms, publish+PUBACK ${Math.round(published - connected)} ms`,
    );
  } finally {
    await Promise.all(devices.map((d) => d.client.endAsync()));
  }
  assert.equal(
    await counterTotal(gw, "mqtt_connection_errors_total"),
    errorsBefore,
    "mqtt_connection_errors_total did not grow",
  );
});

Deno.test("a device with more readings in flight than its actor's mailbox holds gets them all stored", async () => {
  // Regression: "overloaded" from a full mailbox used to make the intake spin on the writer's
  // (free) capacity at 100% CPU, starving the very activation it waited for.
  await using gw = await startTestGateway({ env: { ACTOR_MAILBOX_MAX: "2" } });
  const user = await gw.createUser("mailbox@example.com");
  const meter = "mailbox-1";
  const secret = Buffer.from((await gw.registerMeter(meter, user.id)).secret_hex, "hex");
  const client = connect(`mqtt://127.0.0.1:${gw.gateway.broker!.ports.mqtt}`, {
    ...connectCredentials(meter, secret, { clientId: `${meter}/device` }),
    reconnectPeriod: 0,
  });
  await new Promise((resolve, reject) => {
    client.once("connect", resolve);
    client.once("error", reject);
  });
  // Make the actor reload slowly (a key rotation invalidates it) so publishes pile up.
  const store = gw.gateway.store;
  const getDevice = store.getDevice.bind(store);
  store.getDevice = async (m) => {
    await new Promise((r) => setTimeout(r, 300));
    return getDevice(m);
  };
  const rotated = await gw.request("POST", `/api/admin/devices/${meter}/rotate`, {
    token: gw.adminToken,
  });
  assert.equal(rotated.status, 200);
  const stamps = Array.from({ length: 40 }, (_, i) => isoAgo((i + 1) * 16 * 60_000));
  await Promise.all(
    stamps.map((ts) =>
      client.publishAsync(`meters/${meter}/readings`, readingPayload(meter, secret, ts, "1.5"), {
        qos: 1,
      })
    ),
  );
  for (const ts of stamps) {
    assert.ok(await gw.gateway.store.getReading(meter, Date.parse(ts)), `stored ${ts}`);
  }
  await client.endAsync();
});
