// Two gateway processes as one cluster: one PostgreSQL schema, one Redis (a private
// redis-server, so that it can be killed), one Mosquitto with a shared subscription. Each
// instance reaches Redis through a TCP proxy, so one can be cut off alone.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect, type MqttClient } from "mqtt";
import { readingPayload } from "../mqtt/device_credentials.ts";
import { isoAgo, signedReading } from "./_gateway.ts";
import { call, GatewayProcess, login } from "./_gateway_process.ts";
import { mosquittoAvailable, startMosquitto } from "./_mosquitto.ts";
import { redisBinariesAvailable, startRedisServer } from "./_redis_cluster.ts";
import { createTestSchema, postgresUrl, probePostgres, requireService } from "./_services.ts";
import { startTcpProxy, type TcpProxy } from "./_tcp_proxy.ts";
import { QueuedWs, type ServerMessage } from "./_ws_client.ts";

const ADMIN = { email: "root@cluster.test", password: "Cluster-root-pw-71" };
const MINUTE = 60_000;

const services = await Promise.all([
  requireService("PostgreSQL", probePostgres(postgresUrl())),
  mosquittoAvailable(),
  redisBinariesAvailable(),
]);
const missing = services.find((s) => !s.ok) as { ok: false; reason: string } | undefined;

/** Registers a test that needs PostgreSQL, mosquitto and redis-server. */
function clusterTest(name: string, fn: (t: Deno.TestContext) => Promise<void>): void {
  Deno.test({
    name: missing ? `${name} (ignored: ${missing.reason})` : name,
    ignore: missing !== undefined,
    fn,
  });
}

interface Meter {
  id: string;
  secret: string;
}

/** Two instances, A and B, and what they share. */
interface Cluster extends AsyncDisposable {
  a: GatewayProcess;
  b: GatewayProcess;
  redis: Awaited<ReturnType<typeof startRedisServer>>;
  /** B's link to Redis (A has one too, `proxyA`). */
  proxyB: TcpProxy;
  proxyA: TcpProxy;
  mqttUrl: string;
  admin: string;
  userId: string;
  userToken: string;
  meters(n: number, prefix: string): Promise<Meter[]>;
}

async function startCluster(env: Record<string, string> = {}): Promise<Cluster> {
  const schema = await createTestSchema();
  const mosq = await startMosquitto();
  const redis = await startRedisServer();
  const proxyA = startTcpProxy({ hostname: "127.0.0.1", port: redis.port });
  const proxyB = startTcpProxy({ hostname: "127.0.0.1", port: redis.port });
  const common = {
    DATABASE_URL: schema.url,
    JWT_SECRET: "Kq8vTz3pXw9LmN2rB7yC4dF6hJ1sG5aE0uI",
    DEVICE_KEY_ENCRYPTION_KEY: "0f1e2d3c4b5a69788796a5b4c3d2e1f00011223344556677889900aabbccddee",
    ADMIN_EMAIL: ADMIN.email,
    ADMIN_PASSWORD: ADMIN.password,
    MQTT_URL: mosq.url,
    MQTT_SHARED_GROUP: "gateways",
    REDIS_PREFIX: `t${crypto.randomUUID().slice(0, 8)}:`,
    DEDUPE_WINDOW: "1s",
    DEVICE_RECHECK_INTERVAL: "1s",
    WS_POSITION_CHECK_INTERVAL: "1s",
    // The resume step replays 100 readings per meter; its meter then holds 102.
    WS_RESUME_MAX: "101",
    DEVICE_REGISTER_RATE_LIMIT: "1000",
    LOG_LEVEL: "info",
    ...env,
  };
  const started: AsyncDisposable[] = [];
  try {
    const a = await GatewayProcess.start({
      ...common,
      GATEWAY_INSTANCE_ID: "gw-a",
      MQTT_CLIENT_ID: "gw-a",
      REDIS_URL: `redis://127.0.0.1:${proxyA.port}`,
    });
    started.push(a);
    const b = await GatewayProcess.start({
      ...common,
      GATEWAY_INSTANCE_ID: "gw-b",
      MQTT_CLIENT_ID: "gw-b",
      REDIS_URL: `redis://127.0.0.1:${proxyB.port}`,
    });
    started.push(b);
    const admin = await login(a.url, ADMIN.email, ADMIN.password);
    const created = await call(a.url, "POST", "/api/admin/users", {
      token: admin,
      body: { email: "owner@cluster.test", password: "Prosumer-grid-pw-5", role: "user" },
    });
    assert.equal(created.status, 201, JSON.stringify(created.body));
    const userId = created.body.id;
    const userToken = await login(b.url, "owner@cluster.test", "Prosumer-grid-pw-5");
    return {
      a,
      b,
      redis,
      proxyA,
      proxyB,
      mqttUrl: mosq.url,
      admin,
      userId,
      userToken,
      async meters(n, prefix) {
        const meters: Meter[] = [];
        for (let i = 0; i < n; i++) {
          const id = `${prefix}-${i}`;
          const res = await call(a.url, "POST", "/api/admin/devices/register", {
            token: admin,
            body: { meter_id: id, user_id: userId },
          });
          assert.equal(res.status, 201, JSON.stringify(res.body));
          meters.push({ id, secret: res.body.secret_hex });
        }
        return meters;
      },
      async [Symbol.asyncDispose]() {
        for (const s of started.reverse()) await s[Symbol.asyncDispose]();
        await proxyA.close();
        await proxyB.close();
        await redis.close();
        await mosq.close();
        await schema.drop();
      },
    };
  } catch (error) {
    for (const s of started.reverse()) await s[Symbol.asyncDispose]();
    await proxyA.close();
    await proxyB.close();
    await redis.close();
    await mosq.close();
    await schema.drop();
    throw error;
  }
}

/** Submits one signed reading over HTTP to `base`; returns the status. */
async function submit(base: string, token: string, meter: Meter, ts: string): Promise<number> {
  const res = await call(base, "POST", "/api/meters/submit-reading", {
    token,
    body: signedReading(meter.id, meter.secret, ts, "1.25"),
  });
  return res.status;
}

/** Reading ids of the events received, with how often each came. */
function counts(messages: ServerMessage[]): Map<string, number> {
  const seen = new Map<string, number>();
  for (const m of messages) {
    if (m.type !== "meter.reading.accepted") continue;
    seen.set(m.data.id, (seen.get(m.data.id) ?? 0) + 1);
  }
  return seen;
}

function assertEachOnce(messages: ServerMessage[], expected: number, what: string): void {
  const seen = counts(messages);
  const twice = [...seen].filter(([, n]) => n > 1);
  assert.deepEqual(twice, [], `${what}: readings received more than once`);
  assert.equal(seen.size, expected, `${what}: distinct readings`);
}

/** A metric's value summed over its series, from `/metrics`. */
async function metric(base: string, token: string, name: string, match = ""): Promise<number> {
  const res = await fetch(`${base}/metrics`, { headers: { authorization: `Bearer ${token}` } });
  const text = await res.text();
  let sum = 0;
  for (const line of text.split("\n")) {
    if (line.startsWith(name) && line.includes(match)) sum += Number(line.split(" ").at(-1));
  }
  return sum;
}

async function deviceClient(url: string): Promise<MqttClient> {
  const client = connect(url, { clientId: `dev-${crypto.randomUUID().slice(0, 8)}` });
  client.on("error", () => {});
  await new Promise<void>((resolve, reject) => {
    client.once("connect", () => resolve());
    client.once("close", () => reject(new Error("device cannot connect")));
  });
  return client;
}

clusterTest("two instances behind a shared subscription act as one gateway", async (t) => {
  await using cluster = await startCluster();
  const { a, b } = cluster;

  await t.step(
    "1,000 MQTT readings consumed by either instance reach a WebSocket client on each exactly once",
    async () => {
      const meters = await cluster.meters(10, "fan");
      await using onA = await QueuedWs.connect(a.url, cluster.userToken);
      await using onB = await QueuedWs.connect(b.url, cluster.userToken);
      for (const ws of [onA, onB]) await ws.subscribe({ meters: meters.map((m) => m.id) });
      const device = await deviceClient(cluster.mqttUrl);
      try {
        const base = Date.now() - 2 * 24 * 60 * MINUTE;
        for (let i = 0; i < 100; i++) {
          for (const meter of meters) {
            const ts = isoAgo(0, base + i * MINUTE);
            const payload = readingPayload(meter.id, Buffer.from(meter.secret, "hex"), ts, "0.5");
            await device.publishAsync(`meters/${meter.id}/readings`, payload, { qos: 1 });
          }
        }
      } finally {
        await device.endAsync();
      }
      for (const [ws, name] of [[onA, "client on A"], [onB, "client on B"]] as const) {
        await ws.until((r) => counts(r).size >= 1000, `${name}: 1,000 readings`);
        assertEachOnce(ws.received, 1000, name);
      }
      const accepted = (gw: GatewayProcess) =>
        metric(gw.url, cluster.admin, "gateway_readings_total", 'outcome="accepted"');
      // An outcome is counted once its answer is final, a little after its event went out.
      let [byA, byB] = [0, 0];
      for (const deadline = Date.now() + 10_000; byA + byB < 1000 && Date.now() < deadline;) {
        [byA, byB] = [await accepted(a), await accepted(b)];
      }
      assert.equal(byA + byB, 1000, "every reading was accepted once, by one instance");
      assert.ok(byA > 0 && byB > 0, `both instances consumed readings (A ${byA}, B ${byB})`);
    },
  );

  await t.step("a device revoked through A is refused by B within 1 s", async () => {
    const [meter] = await cluster.meters(1, "revoke-live");
    let ts = Date.now() - 60 * MINUTE;
    const next = () => isoAgo(0, ts += 2_000);
    assert.equal(await submit(b.url, cluster.userToken, meter, next()), 201, "B's actor is warm");
    const revoked = await call(a.url, "POST", `/api/admin/devices/${meter.id}/revoke`, {
      token: cluster.admin,
      body: {},
    });
    assert.equal(revoked.status, 200, JSON.stringify(revoked.body));
    const start = performance.now();
    let status = 201;
    while (status === 201 && performance.now() - start < 5_000) {
      status = await submit(b.url, cluster.userToken, meter, next());
    }
    const elapsed = performance.now() - start;
    assert.equal(status, 403, "B refuses the revoked device");
    assert.ok(elapsed < 1_000, `refused after ${elapsed.toFixed(0)} ms`);
  });

  await t.step(
    "cut off from Redis, B refuses a device revoked meanwhile within the recheck interval",
    async () => {
      const [meter] = await cluster.meters(1, "revoke-cut");
      let ts = Date.now() - 60 * MINUTE;
      const next = () => isoAgo(0, ts += 2_000);
      assert.equal(await submit(b.url, cluster.userToken, meter, next()), 201);
      await cluster.proxyB.cut();
      try {
        await b.waitForLog((e) =>
          e.msg === "bus disconnected; fan-out from other instances paused"
        );
        const revoked = await call(a.url, "POST", `/api/admin/devices/${meter.id}/revoke`, {
          token: cluster.admin,
          body: {},
        });
        assert.equal(revoked.status, 200);
        const start = performance.now();
        let status = 201;
        while (status === 201 && performance.now() - start < 10_000) {
          status = await submit(b.url, cluster.userToken, meter, next());
        }
        const elapsed = performance.now() - start;
        assert.equal(status, 403, "B refuses the revoked device without the bus");
        // DEVICE_RECHECK_INTERVAL is 1 s here; one interval plus the time a recheck takes.
        assert.ok(elapsed < 2_500, `refused after ${elapsed.toFixed(0)} ms`);
      } finally {
        cluster.proxyB.restore();
      }
    },
  );

  await t.step(
    "a client resuming on the other instance gets exactly the 200 readings it missed, then live ones",
    async () => {
      const meters = await cluster.meters(2, "resume");
      let ts = Date.now() - 3 * 24 * 60 * MINUTE;
      const next = () => isoAgo(0, ts += 2_000);
      const positions: Record<string, string> = {};
      {
        await using first = await QueuedWs.connect(a.url, cluster.userToken);
        const reply = await first.subscribe({ meters: meters.map((m) => m.id) });
        Object.assign(positions, reply.positions);
        for (const meter of meters) {
          assert.equal(await submit(a.url, cluster.userToken, meter, next()), 201);
        }
        await first.until((r) => counts(r).size === 2, "two live readings");
        for (const m of first.readings()) positions[m.data.meter_id] = m.position;
      }
      const missed = new Set<string>();
      for (let i = 0; i < 100; i++) {
        for (const [k, meter] of meters.entries()) {
          const gw = (i + k) % 2 === 0 ? a : b;
          const when = next();
          assert.equal(await submit(gw.url, cluster.userToken, meter, when), 201);
          missed.add(`${meter.id}:${when}`);
        }
      }
      await using again = await QueuedWs.connect(b.url, cluster.userToken);
      await again.subscribe({ meters: meters.map((m) => m.id), since: Object.values(positions) });
      const replayed = again.readings();
      assert.equal(replayed.length, 200, "the replay comes before the subscribed reply");
      assert.deepEqual(
        new Set(replayed.map((m) => `${m.data.meter_id}:${m.data.reading_timestamp}`)),
        missed,
      );
      for (const meter of meters) {
        const seqs = replayed.filter((m) => m.data.meter_id === meter.id).map((m) =>
          Number(m.position.split("@")[1])
        );
        assert.deepEqual(seqs, [...seqs].sort((x, y) => x - y), "in commit order per meter");
      }
      assert.equal(await submit(a.url, cluster.userToken, meters[0], next()), 201);
      await again.until((r) => counts(r).size === 201, "the live reading after the replay");
      assertEachOnce(again.received, 201, "resumed client");

      await using far = await QueuedWs.connect(a.url, cluster.userToken);
      far.send({ type: "subscribe", meters: [meters[0].id], since: `${meters[0].id}@0` });
      const resync = await far.next((m) => m.type === "resync_required", "resync_required");
      assert.deepEqual(resync.meters, [meters[0].id]);
      assert.equal(resync.reason, "gap_too_large");
      assert.equal(far.readings().length, 0, "no partial replay");
    },
  );

  await t.step(
    "the shared cache: reads hit, a commit on A invalidates for B, Redis down still serves",
    async () => {
      const [meter] = await cluster.meters(1, "cache");
      let ts = Date.now() - 5 * 24 * 60 * MINUTE;
      const next = () => isoAgo(0, ts += 2_000);
      const stats = async (gw: GatewayProcess) => {
        const res = await call(gw.url, "GET", "/api/meters/stats", { token: cluster.userToken });
        assert.equal(res.status, 200, JSON.stringify(res.body));
        return res.body.reading_count as number;
      };
      const hits = (gw: GatewayProcess) =>
        metric(gw.url, cluster.admin, "cache_hits_total", 'cache_type="user_stats"');
      const before = await stats(a); // fills the shared entry
      const hitsBefore = await hits(b);
      assert.equal(await stats(b), before, "B reads the entry A filled");
      assert.equal(await hits(b), hitsBefore + 1, "a hit on B");
      assert.equal(await submit(a.url, cluster.userToken, meter, next()), 201);
      assert.equal(await stats(b), before + 1, "the commit on A invalidated B's view");
      await cluster.redis.kill();
      try {
        assert.equal(await stats(b), before + 1, "served from the store without Redis");
        assert.equal(await submit(b.url, cluster.userToken, meter, next()), 201);
        assert.equal(await stats(a), before + 2);
      } finally {
        await cluster.redis.start();
      }
    },
  );

  await t.step(
    "Redis killed and restarted during a stream: nothing lost, every client gets every reading",
    async () => {
      const meters = await cluster.meters(4, "outage");
      await using onA = await QueuedWs.connect(a.url, cluster.userToken);
      await using onB = await QueuedWs.connect(b.url, cluster.userToken);
      for (const ws of [onA, onB]) await ws.subscribe({ meters: meters.map((m) => m.id) });
      let ts = Date.now() - 4 * 24 * 60 * MINUTE;
      const next = () => isoAgo(0, ts += 2_000);
      let stored = 0;
      const stream = async (rounds: number) => {
        for (let i = 0; i < rounds; i++) {
          for (const [k, meter] of meters.entries()) {
            const gw = (i + k) % 2 === 0 ? a : b;
            assert.equal(await submit(gw.url, cluster.userToken, meter, next()), 201);
            stored++;
          }
        }
      };
      await stream(10);
      const killedAt = Date.now();
      await cluster.redis.kill();
      await a.waitForLog((e) =>
        e.msg === "bus disconnected; fan-out from other instances paused" &&
        Date.parse(String(e.ts)) >= killedAt - 1_000
      );
      const ready = await call(a.url, "GET", "/readyz");
      assert.equal(ready.status, 200, "still ready: ingestion does not need Redis");
      assert.equal(ready.body.checks.bus, "down");
      await stream(10); // ingestion goes on without Redis
      await cluster.redis.start();
      await stream(10);
      for (const [ws, name] of [[onA, "client on A"], [onB, "client on B"]] as const) {
        await ws.until((r) => counts(r).size >= stored, `${name}: all ${stored} readings`)
          .catch((error) => {
            const bus = (gw: GatewayProcess) =>
              gw.logs().filter((e) => /bus|catch|redis/i.test(String(e.msg))).map((e) =>
                `${e.ts} ${e.msg} ${e.error ?? ""}`
              ).join("\n");
            throw new Error(
              `${error.message}; got ${counts(ws.received).size}:\nA:\n${bus(a)}\nB:\n${bus(b)}`,
            );
          });
        assertEachOnce(ws.received, stored, name);
      }
      const listed = await call(
        a.url,
        "GET",
        `/api/meters/readings?meter_id=${meters[0].id}&limit=100`,
        { token: cluster.userToken },
      );
      assert.equal(listed.body.items.length, stored / meters.length, "nothing lost in the store");
    },
  );
});
