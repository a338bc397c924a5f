// No loss under crash, over MQTT: the real gateway (main.ts) as a subprocess is killed with
// SIGKILL while 5,000 QoS 1 readings from 500 meters stream in, and restarted on the same data.
// Embedded broker: every reading whose PUBACK reached the device is stored exactly once, and
// the devices' resubmissions of the rest complete the set. External Mosquitto: the broker keeps
// the gateway's persistent session, so what it had not acknowledged is redelivered and stored.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connectAsync, type MqttClient } from "mqtt";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import { mosquittoAvailable, startMosquitto } from "./_mosquitto.ts";
import { call, embeddedMqttPort, GatewayProcess, login } from "./_gateway_process.ts";
import { createTestSchema } from "./_services.ts";

const ADMIN_EMAIL = "root@mqtt-crash.test";
const ADMIN_PASSWORD = "mqtt-crash-admin-password";
const METERS = 500;
const PER_METER = 10;
const TOTAL = METERS * PER_METER;
/** The kill comes once this many readings were acknowledged… */
const KILL_AFTER = 1_000;
/** …while at least this many are still outstanding. */
const MIN_OUTSTANDING = 50;
/** Guards against hangs only; every wait ends on an event, a counter or an exit. */
const SETTLE_TIMEOUT_MS = 30_000;

/** Deno KV by default; a fresh PostgreSQL schema per test with `GATEWAY_TEST_STORE=postgres`. */
const ON_POSTGRES = Deno.env.get("GATEWAY_TEST_STORE") === "postgres";
const STORE_NAME = ON_POSTGRES ? " (PostgreSQL)" : "";

// deno-lint-ignore no-explicit-any
type Json = any;

interface Meter {
  id: string;
  secret: Buffer;
}

/** Creates an owner and registers `METERS` HMAC meters with one bulk import. */
async function provision(base: string, token: string, prefix: string): Promise<Meter[]> {
  const user = await call(base, "POST", "/api/admin/users", {
    token,
    body: { email: `owner-${prefix}@mqtt-crash.test`, password: "owner-password", role: "user" },
  });
  assert.equal(user.status, 201, JSON.stringify(user.body));
  const devices = Array.from({ length: METERS }, (_, m) => ({
    meter_id: `${prefix}-${m}`,
    user_id: user.body.id,
    algorithm: "hmac-sha256",
  }));
  const res = await call(base, "POST", "/api/admin/devices/import", { token, body: { devices } });
  assert.equal(res.status, 200, JSON.stringify(res.body).slice(0, 500));
  return res.body.results.map((r: Json) => {
    assert.equal(typeof r.secret_hex, "string", `import of ${r.meter_id}: ${JSON.stringify(r)}`);
    return { id: r.meter_id, secret: Buffer.from(r.secret_hex, "hex") };
  });
}

interface Reading {
  index: number;
  meter: number;
  topic: string;
  /** `meter_id|epoch ms`, the natural key. */
  key: string;
  payload: string;
}

/**
 * 10 signed readings per meter, 16 minutes apart (newest 2 minutes ago, all within 3 hours),
 * in publishing order: every meter's first reading, then every meter's second, …
 */
function readingsOf(meters: Meter[]): Reading[] {
  const now = Math.floor(Date.now() / 1000) * 1000;
  const out: Reading[] = [];
  for (let k = 0; k < PER_METER; k++) {
    meters.forEach((meter, m) => {
      const ts = now - 2 * 60_000 - k * 16 * 60_000;
      const iso = new Date(ts).toISOString().replace(".000Z", "Z");
      out.push({
        index: out.length,
        meter: m,
        topic: `meters/${meter.id}/readings`,
        key: `${meter.id}|${ts}`,
        payload: readingPayload(meter.id, meter.secret, iso, `${1 + (out.length % 97)}.125`),
      });
    });
  }
  return out;
}

/** Every stored reading (admin listing, paged), as natural key → reading ids listed for it. */
async function listStored(base: string, token: string): Promise<Map<string, string[]>> {
  const stored = new Map<string, string[]>();
  let cursor: string | null = null;
  for (let page = 0;; page++) {
    assert.ok(page < 100, "paging terminates");
    const query = new URLSearchParams({ limit: "1000", order: "asc" });
    if (cursor) query.set("cursor", cursor);
    const res = await call(base, "GET", `/api/meters/readings?${query}`, { token });
    assert.equal(res.status, 200, JSON.stringify(res.body));
    for (const item of res.body.items) {
      const key = `${item.meter_id}|${Date.parse(item.reading_timestamp)}`;
      stored.set(key, [...stored.get(key) ?? [], item.id]);
    }
    cursor = res.body.next_cursor;
    if (cursor === null) return stored;
  }
}

async function readingCount(base: string, token: string): Promise<number> {
  const res = await call(base, "GET", "/api/meters/stats", { token });
  assert.equal(res.status, 200, JSON.stringify(res.body));
  return res.body.reading_count;
}

/** Every listed key is one of ours and is listed once. */
function assertOnce(stored: Map<string, string[]>, readings: Reading[]): void {
  const ours = new Set(readings.map((r) => r.key));
  for (const [key, ids] of stored) {
    assert.ok(ours.has(key), `stored reading ${key} was never published`);
    assert.equal(ids.length, 1, `${key} is stored ${ids.length} times`);
  }
}

async function pool<T>(items: T[], width: number, fn: (item: T) => Promise<void>) {
  let next = 0;
  await Promise.all(Array.from({ length: Math.min(width, items.length) }, async () => {
    while (next < items.length) await fn(items[next++]);
  }));
}

const sleep = (ms: number) => new Promise((resolve) => setTimeout(resolve, ms));

/** Polls `check` every 100 ms until it returns true; fails with `what` after the guard. */
async function until(what: () => string, check: () => boolean | Promise<boolean>) {
  const deadline = Date.now() + SETTLE_TIMEOUT_MS;
  while (!(await check())) {
    assert.ok(Date.now() < deadline, `timed out: ${what()}`);
    await sleep(100);
  }
}

/** Device connections to the embedded broker, one per meter, with its CONNECT signature. */
async function connectDevices(port: number, meters: Meter[]): Promise<MqttClient[]> {
  const clients: MqttClient[] = new Array(meters.length);
  try {
    await pool(meters.map((meter, m) => ({ meter, m })), 50, async ({ meter, m }) => {
      clients[m] = await connectAsync(`mqtt://127.0.0.1:${port}`, {
        protocolVersion: 4,
        clean: true,
        reconnectPeriod: 0,
        connectTimeout: 10_000,
        ...connectCredentials(meter.id, meter.secret, {
          clientId: `${meter.id}/${crypto.randomUUID().slice(0, 8)}`,
        }),
      });
    });
  } catch (error) {
    await closeAll(clients.filter(Boolean));
    throw error;
  }
  return clients;
}

async function closeAll(clients: MqttClient[]): Promise<void> {
  await Promise.all(clients.map((c) => c.endAsync(true).catch(() => {})));
}

/** A data directory (and, on PostgreSQL, a schema) for one test; both removed on dispose. */
interface DataDir extends AsyncDisposable {
  path: string;
  /** Store settings for the gateway: the KV file in `path`, or the schema's URL and secrets. */
  env: Record<string, string>;
}

async function dataDir(): Promise<DataDir> {
  const path = await Deno.makeTempDir({ prefix: "gw-mqtt-crash-" });
  const env: Record<string, string> = { DENO_KV_PATH: `${path}/gateway.kv` };
  let drop = () => Promise.resolve();
  if (ON_POSTGRES) {
    try {
      const schema = await createTestSchema();
      drop = schema.drop;
      Object.assign(env, {
        DATABASE_URL: schema.url,
        DATABASE_POOL_MAX: "4",
        JWT_SECRET: "mqtt-crash-test-jwt-secret-0123456789abcdef",
        DEVICE_KEY_ENCRYPTION_KEY:
          "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee",
      });
    } catch (error) {
      await Deno.remove(path, { recursive: true });
      throw error;
    }
  }
  return {
    path,
    env,
    [Symbol.asyncDispose]: async () => {
      await Deno.remove(path, { recursive: true });
      await drop();
    },
  };
}

function gatewayEnv(dir: DataDir, extra: Record<string, string> = {}): Record<string, string> {
  return {
    ...dir.env,
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    LOG_LEVEL: "info",
    MQTT_PORT: "0",
    DEVICE_REGISTER_RATE_LIMIT: "100",
    ...extra,
  };
}

Deno.test(`the embedded broker stores every PUBACKed reading exactly once across kill -9, and resubmissions complete the set${STORE_NAME}`, async (t) => {
  await using dir = await dataDir();
  const env = gatewayEnv(dir);
  let meters: Meter[] = [];
  let readings: Reading[] = [];
  const acked = new Set<number>();
  let storedAfterRestart = new Map<string, string[]>();

  await t.step("5,000 readings stream in; the gateway is killed mid-stream", async () => {
    await using gw = await GatewayProcess.start(env);
    const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
    meters = await provision(gw.url, token, "emb");
    readings = readingsOf(meters);
    const clients = await connectDevices(embeddedMqttPort(gw), meters);
    let killed = false;
    let outstanding = 0;
    let outstandingAtKill = 0;
    let next = 0;
    const WINDOW = 300;
    try {
      await new Promise<void>((resolve, reject) => {
        const pump = () => {
          while (!killed && outstanding < WINDOW && next < readings.length) {
            const r = readings[next++];
            outstanding++;
            clients[r.meter].publish(r.topic, r.payload, { qos: 1 }, (error) => {
              outstanding--;
              // A PUBACK read after the kill was still sent by the gateway before it died.
              if (!error) acked.add(r.index);
              if (!killed && acked.size >= KILL_AFTER && outstanding >= MIN_OUTSTANDING) {
                killed = true;
                outstandingAtKill = outstanding;
                gw.child.kill("SIGKILL");
                resolve();
              }
              if (!killed && next === readings.length && outstanding === 0) {
                reject(new Error("every reading was acknowledged before the kill"));
              }
              pump();
            });
          }
        };
        pump();
      });
      const status = await gw.stop();
      assert.equal(status.signal, "SIGKILL");
    } finally {
      // Ends the dead connections: their unacknowledged publishes fail, never count as acked.
      await closeAll(clients);
    }
    assert.ok(acked.size >= KILL_AFTER, `${acked.size} PUBACKs before the kill`);
    assert.ok(acked.size < TOTAL, "the kill came before the end of the stream");
    assert.ok(outstandingAtKill >= MIN_OUTSTANDING, `${outstandingAtKill} outstanding at the kill`);
  });

  await t.step("after the restart, every PUBACKed reading is stored exactly once", async () => {
    await using gw = await GatewayProcess.start(env);
    const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
    storedAfterRestart = await listStored(gw.url, token);
    assertOnce(storedAfterRestart, readings);
    for (const index of acked) {
      const r = readings[index];
      assert.equal(storedAfterRestart.get(r.key)?.length, 1, `PUBACKed reading ${r.key} is lost`);
    }
    // Readings without a PUBACK may or may not have been committed: at most the ones published.
    assert.ok(storedAfterRestart.size >= acked.size);
    assert.equal(await readingCount(gw.url, token), storedAfterRestart.size);
    await gw.stop("SIGTERM");
  });

  await t.step("devices resubmit what had no PUBACK; all 5,000 are stored once", async () => {
    await using gw = await GatewayProcess.start(env);
    const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
    const missing = readings.filter((r) => !acked.has(r.index));
    const clients = await connectDevices(embeddedMqttPort(gw), meters);
    const acks = new Map<string, Json[]>();
    try {
      clients.forEach((client, m) => {
        client.on("message", (_topic, payload) => {
          const ack = JSON.parse(new TextDecoder().decode(payload));
          const key = `${meters[m].id}|${Date.parse(ack.reading_timestamp)}`;
          acks.set(key, [...acks.get(key) ?? [], ack]);
        });
      });
      await pool(clients, 50, async (client) => {
        const m = clients.indexOf(client);
        await client.subscribeAsync(`meters/${meters[m].id}/acks`, { qos: 1 });
      });
      // Many in flight; each publish resolves on its PUBACK, i.e. once its fate is final.
      await pool(missing, 200, async (r) => {
        await clients[r.meter].publishAsync(r.topic, r.payload, { qos: 1 });
      });
      await until(
        () => `acks for ${acks.size} of ${missing.length} resubmissions`,
        () => missing.every((r) => acks.has(r.key)),
      );
    } finally {
      await closeAll(clients);
    }
    for (const r of missing) {
      const [ack, ...more] = acks.get(r.key)!;
      assert.equal(more.length, 0, `one ack per resubmission of ${r.key}`);
      if (storedAfterRestart.has(r.key)) {
        // Committed before the crash, its PUBACK lost: a duplicate of the stored reading.
        assert.equal(ack.status, "duplicate", `${r.key}: ${JSON.stringify(ack)}`);
        assert.equal(ack.id, storedAfterRestart.get(r.key)![0]);
      } else {
        assert.equal(ack.status, "accepted", `${r.key}: ${JSON.stringify(ack)}`);
      }
    }
    const stored = await listStored(gw.url, token);
    assertOnce(stored, readings);
    assert.equal(stored.size, TOTAL);
    assert.equal(await readingCount(gw.url, token), TOTAL);
    const status = await gw.stop("SIGTERM");
    assert.equal(status.code, 0, gw.describe());
  });
});

Deno.test(`SIGTERM during a 5,000-reading MQTT stream: the gateway exits 0 within its deadline and every PUBACKed reading is stored exactly once${STORE_NAME}`, async () => {
  await using dir = await dataDir();
  const env = gatewayEnv(dir, { SHUTDOWN_TIMEOUT: "20s" });
  const acked = new Set<number>();
  let readings: Reading[] = [];
  let meters: Meter[] = [];
  {
    await using gw = await GatewayProcess.start(env);
    const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
    meters = await provision(gw.url, token, "term");
    readings = readingsOf(meters);
    const clients = await connectDevices(embeddedMqttPort(gw), meters);
    // An app watching live: told "going away" (1001), so it reconnects elsewhere and resumes.
    const ws = new WebSocket(`${gw.url.replace("http", "ws")}/ws?token=${token}`);
    const wsClosed = new Promise<CloseEvent>((resolve) => ws.onclose = resolve);
    await new Promise<void>((resolve, reject) => {
      ws.onopen = () => resolve();
      ws.onerror = () => reject(new Error("WebSocket did not open"));
    });
    let signalled = false;
    let outstanding = 0;
    let outstandingAtSignal = 0;
    let next = 0;
    let signalledAt = 0;
    const WINDOW = 300;
    try {
      await new Promise<void>((resolve) => {
        const pump = () => {
          while (!signalled && outstanding < WINDOW && next < readings.length) {
            const r = readings[next++];
            outstanding++;
            clients[r.meter].publish(r.topic, r.payload, { qos: 1 }, (error) => {
              outstanding--;
              if (!error) acked.add(r.index);
              if (!signalled && acked.size >= KILL_AFTER && outstanding >= MIN_OUTSTANDING) {
                signalled = true;
                outstandingAtSignal = outstanding;
                signalledAt = performance.now();
                gw.child.kill("SIGTERM");
                resolve();
              }
              pump();
            });
          }
        };
        pump();
      });
      const status = await gw.waitForExit(30_000);
      const tookMs = performance.now() - signalledAt;
      assert.equal(status.code, 0, gw.describe());
      assert.ok(tookMs < 20_000, `stopped after ${Math.round(tookMs)} ms`);
      const closed = await wsClosed;
      assert.equal(closed.code, 1001, `WebSocket closed with ${closed.code} ${closed.reason}`);
      const logs = gw.logs();
      assert.ok(logs.some((e) => e.msg === "stopped"), "the gateway says it stopped");
      assert.ok(!logs.some((e) => e.msg?.includes("deadline passed")), "within the deadline");
    } finally {
      await closeAll(clients);
    }
    assert.ok(outstandingAtSignal >= MIN_OUTSTANDING, `${outstandingAtSignal} in flight`);
    assert.ok(acked.size < readings.length, "the signal came before the end of the stream");
  }
  await using gw = await GatewayProcess.start(env);
  const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
  const stored = await listStored(gw.url, token);
  assertOnce(stored, readings);
  for (const index of acked) {
    assert.equal(
      stored.get(readings[index].key)?.length,
      1,
      `PUBACKed ${readings[index].key} lost`,
    );
  }
  // A graceful stop commits what it had taken: at most the readings whose PUBACK was in flight
  // when the connections closed are stored without one.
  assert.ok(stored.size >= acked.size, `${stored.size} stored, ${acked.size} acked`);
  assert.equal(await readingCount(gw.url, token), stored.size);
  assert.ok(meters.length > 0);
  await gw.stop("SIGTERM");
});

const mosquitto = await mosquittoAvailable();

Deno.test({
  name: "through an external Mosquitto, readings the killed gateway had not acknowledged are " +
    "redelivered after its restart and all 5,000 are stored exactly once" + STORE_NAME +
    (mosquitto.ok ? "" : ` (ignored: ${mosquitto.reason})`),
  ignore: !mosquitto.ok,
  fn: async (t) => {
    await using dir = await dataDir();
    await using broker = await startMosquitto();
    const env = gatewayEnv(dir, {
      MQTT_URL: broker.url,
      MQTT_CLIENT_ID: "gateway-crash-test-1",
    });
    let meters: Meter[] = [];
    let readings: Reading[] = [];
    /** Acks seen on `meters/+/acks`, by natural key. */
    const acks = new Map<string, Json[]>();
    let accepted = 0;
    let onAccepted: () => void = () => {};
    const listener = await connectAsync(broker.url, {
      protocolVersion: 4,
      clientId: "crash-test-ack-listener",
      clean: true,
      reconnectPeriod: 0,
    });
    const publishers: MqttClient[] = [];
    try {
      listener.on("message", (topic, payload) => {
        const meter = topic.split("/")[1];
        let ack: Json;
        try {
          ack = JSON.parse(new TextDecoder().decode(payload));
        } catch {
          return;
        }
        const key = `${meter}|${Date.parse(ack.reading_timestamp)}`;
        acks.set(key, [...acks.get(key) ?? [], ack]);
        if (ack.status === "accepted") {
          accepted++;
          onAccepted();
        }
      });
      await listener.subscribeAsync("meters/+/acks", { qos: 1 });
      for (let c = 0; c < 8; c++) {
        publishers.push(
          await connectAsync(broker.url, {
            protocolVersion: 4,
            clientId: `crash-test-publisher-${c}`,
            clean: true,
            reconnectPeriod: 0,
          }),
        );
      }
      const brokerAcked = new Set<number>();
      let acceptedAtKill = 0;
      let publishing: Promise<void> = Promise.resolve();

      await t.step("5,000 readings go to Mosquitto; the gateway is killed mid-stream", async () => {
        await using gw = await GatewayProcess.start(env);
        const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
        meters = await provision(gw.url, token, "ext");
        readings = readingsOf(meters);
        await waitForIngress(publishers[0], acks);

        // Paced at ~2,500/s so that the stream is still going when the kill comes.
        let killed = false;
        const killedNow = Promise.withResolvers<void>();
        onAccepted = () => {
          if (killed || accepted < KILL_AFTER) return;
          killed = true;
          acceptedAtKill = accepted;
          gw.child.kill("SIGKILL");
          killedNow.resolve();
        };
        publishing = (async () => {
          const started = performance.now();
          for (let i = 0; i < readings.length; i += 25) {
            const due = started + (i / 2500) * 1000;
            if (due > performance.now()) await sleep(due - performance.now());
            for (const r of readings.slice(i, i + 25)) {
              publishers[r.meter % publishers.length].publish(
                r.topic,
                r.payload,
                { qos: 1 },
                (error) => error || brokerAcked.add(r.index),
              );
            }
          }
        })();
        let timer: ReturnType<typeof setTimeout> | undefined;
        await Promise.race([
          killedNow.promise,
          new Promise((_, reject) =>
            timer = setTimeout(
              () => reject(new Error(`only ${accepted} accepted acks`)),
              SETTLE_TIMEOUT_MS,
            )
          ),
        ]);
        clearTimeout(timer);
        const status = await gw.stop();
        assert.equal(status.signal, "SIGKILL");
        assert.ok(acceptedAtKill >= KILL_AFTER);
        assert.ok(
          readings.length - acceptedAtKill >= MIN_OUTSTANDING,
          `${readings.length - acceptedAtKill} readings were not yet acknowledged at the kill`,
        );
      });

      await t.step("Mosquitto acknowledges the whole stream, gateway up or down", async () => {
        await publishing;
        await until(
          () => `${brokerAcked.size} PUBACKs from Mosquitto`,
          () => brokerAcked.size === TOTAL,
        );
      });

      await t.step(
        "restarted with the same client id, the gateway stores all 5,000 once",
        async () => {
          await using gw = await GatewayProcess.start(env);
          const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
          let count = 0;
          await until(() => `${count} of ${TOTAL} stored`, async () => {
            count = await readingCount(gw.url, token);
            return count >= TOTAL;
          });
          // Every reading is answered: accepted, or (committed before the kill) a duplicate.
          await until(
            () => `acks for ${acks.size} readings`,
            () => readings.every((r) => acks.has(r.key)),
          );
          const stored = await listStored(gw.url, token);
          assertOnce(stored, readings);
          assert.equal(stored.size, TOTAL);
          assert.equal(await readingCount(gw.url, token), TOTAL);
          for (const r of readings) {
            const answers = acks.get(r.key)!;
            const accepts = answers.filter((a) => a.status === "accepted");
            assert.ok(accepts.length <= 1, `${r.key} was accepted ${accepts.length} times`);
            for (const ack of answers) {
              assert.ok(
                ack.status === "accepted" || ack.status === "duplicate",
                `${r.key}: ${JSON.stringify(ack)}`,
              );
              assert.equal(ack.id, stored.get(r.key)![0], `${r.key}: the ack names the stored id`);
            }
          }
          const redelivered = readings.filter((r) =>
            acks.get(r.key)!.some((a) => a.status === "duplicate")
          );
          assert.ok(accepted >= acceptedAtKill);
          assert.ok(!/dropped/i.test(broker.log()), `Mosquitto dropped messages:\n${broker.log()}`);
          const status = await gw.stop("SIGTERM");
          assert.equal(status.code, 0, gw.describe());
          // Not an assertion on timing, only on what the test exercised.
          console.log(
            `  ${acceptedAtKill} accepted before the kill; ${redelivered.length} redelivered ` +
              `after having been stored (answered duplicate)`,
          );
        },
      );
    } finally {
      await closeAll([listener, ...publishers]);
    }
  },
});

/**
 * Waits until the gateway consumes from its subscription: an unparsable probe on an unknown
 * meter's topic is answered with a `rejected` ack (and stores nothing).
 */
async function waitForIngress(publisher: MqttClient, acks: Map<string, Json[]>): Promise<void> {
  const probe = `meters/crash-probe/readings`;
  await until(() => "the gateway never answered a probe", async () => {
    if ([...acks.keys()].some((k) => k.startsWith("crash-probe|"))) return true;
    await publisher.publishAsync(probe, "not json", { qos: 1 });
    return false;
  });
}
