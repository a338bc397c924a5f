// The broker admins (mqtt/broker_admin.ts): Mosquitto's dynamic security plugin on a real
// Mosquitto started here, the EMQX REST calls against a local recording server, their
// configuration, and DeviceService passing revocations on.
import assert from "node:assert/strict";
import { fileURLToPath } from "node:url";
import { connect, type MqttClient } from "mqtt";
import { LocalBus } from "../bus/local_bus.ts";
import { ManualClock } from "../core/clock.ts";
import { loadConfig } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";
import type { Logger } from "../core/logger.ts";
import { KvStore } from "../db/kv_store.ts";
import {
  type BrokerAdmin,
  BrokerAdminError,
  EmqxHttpAdmin,
  MosquittoDynsecAdmin,
  openBrokerAdmin,
} from "../mqtt/broker_admin.ts";
import { DeviceService } from "../services/devices.ts";
import { plainUser } from "./_devices.ts";
import {
  binariesAvailable,
  EVENT_TIMEOUT_MS,
  freePort,
  type Mosquitto,
  startMosquitto,
  within,
} from "./_mosquitto.ts";
import { memoryLogger } from "./_memory_logger.ts";

const DYNSEC_CONF = fileURLToPath(new URL("../deploy/mosquitto.dynsec.conf", import.meta.url));
const PLUGIN = "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so";
const ADMIN = "gateway-admin";
const ADMIN_PASSWORD = "dynsec-admin-Secret-7f3a";
const METER_PASSWORD = "meter-1-password-Q9";
const MINUTE = 60_000;

const tools = await binariesAvailable(["mosquitto", "mosquitto_ctrl"]);
const pluginThere = await Deno.stat(PLUGIN).then(() => true, () => false);
const skip = !tools.ok ? tools.reason : pluginThere ? undefined : `${PLUGIN} is missing`;
const name = (title: string) => skip ? `${title} (ignored: ${skip})` : title;

/**
 * Mosquitto with deploy/mosquitto.conf followed by deploy/mosquitto.dynsec.conf, its plugin file
 * in the broker's temp dir (initialised with `mosquitto_ctrl dynsec init`), a role that may
 * publish readings and a client "meter-1" with a password in that role.
 */
async function startDynsecMosquitto(): Promise<Mosquitto> {
  const broker = await startMosquitto({
    extraConfig: async (dir) => {
      const file = `${dir}/dynamic-security.json`;
      await run("mosquitto_ctrl", ["dynsec", "init", file, ADMIN, ADMIN_PASSWORD]);
      // The plugin saves every change; the broker runs as its own user.
      await Deno.chmod(file, 0o666);
      const conf = await Deno.readTextFile(DYNSEC_CONF);
      assert.match(conf, /^plugin_opt_config_file .+$/m);
      return conf.replace(/^plugin_opt_config_file .+$/m, `plugin_opt_config_file ${file}`);
    },
  });
  try {
    const ctrl = (...args: string[]) =>
      run("mosquitto_ctrl", [
        "-h",
        "127.0.0.1",
        "-p",
        String(broker.port),
        "-u",
        ADMIN,
        "-P",
        ADMIN_PASSWORD,
        "dynsec",
        ...args,
      ]);
    await ctrl("createRole", "meter");
    await ctrl("addRoleACL", "meter", "publishClientSend", "meters/+/readings", "allow");
    await ctrl("createClient", "meter-1", "-p", METER_PASSWORD);
    await ctrl("addClientRole", "meter-1", "meter");
    return broker;
  } catch (error) {
    await broker.close();
    throw error;
  }
}

async function run(command: string, args: string[]): Promise<void> {
  const out = await new Deno.Command(command, { args, stdin: "null" }).output();
  const text = new TextDecoder().decode(out.stdout) + new TextDecoder().decode(out.stderr);
  // mosquitto_ctrl exits 0 even when the plugin refuses a command; its answer says so.
  if (!out.success || /Error/.test(text)) {
    throw new Error(`${command} ${args.slice(-4).join(" ")} failed:\n${text}`);
  }
}

/** Connects as meter-1 (MQTT 3.1.1, no reconnects); rejects with the CONNACK error. */
function connectMeter(url: string, password = METER_PASSWORD): Promise<MqttClient> {
  const client = connect(url, {
    clientId: `meter-1/${crypto.randomUUID().slice(0, 8)}`,
    username: "meter-1",
    password,
    protocolVersion: 4,
    reconnectPeriod: 0,
    connectTimeout: EVENT_TIMEOUT_MS,
    log: () => {},
  });
  return new Promise((resolve, reject) => {
    client.once("connect", () => resolve(client));
    client.once("error", (error) => {
      client.end(true, {}, () => reject(error));
    });
  });
}

function end(client: MqttClient): Promise<void> {
  return new Promise((resolve) => client.end(true, {}, () => resolve()));
}

/** Resolves when the broker closes the client's connection. */
function closedByBroker(client: MqttClient): Promise<void> {
  return new Promise((resolve) => client.once("close", () => resolve()));
}

/** The CONNACK refusal code of a meter login (5: not authorised). */
async function refusal(url: string): Promise<number | undefined> {
  try {
    await end(await connectMeter(url));
    return undefined;
  } catch (error) {
    return (error as { code?: number }).code;
  }
}

function dynsecEnv(url: string): Record<string, string> {
  return {
    MQTT_URL: url,
    MQTT_USERNAME: "gateway",
    MQTT_CLIENT_ID: "gw-test",
    MQTT_BROKER_ADMIN: "mosquitto-dynsec",
    MQTT_ADMIN_USERNAME: ADMIN,
    MQTT_ADMIN_PASSWORD: ADMIN_PASSWORD,
  };
}

Deno.test({
  name: name("MosquittoDynsecAdmin disconnects a revoked meter, refuses it, and lets it in again"),
  ignore: skip !== undefined,
  async fn(t) {
    await using broker = await startDynsecMosquitto();
    const logger = memoryLogger();
    const admin = openBrokerAdmin(loadConfig(dynsecEnv(broker.url)), logger);
    assert.ok(admin instanceof MosquittoDynsecAdmin);
    await using _admin = admin;

    await t.step("revoke() closes the meter's live connection", async () => {
      const meter = await connectMeter(broker.url);
      try {
        // The meter is a working client until then: its reading is accepted (PUBACK).
        await within(
          meter.publishAsync("meters/meter-1/readings", "{}", { qos: 1 }),
          "PUBACK before the revocation",
        );
        const closed = closedByBroker(meter);
        await admin.revoke("meter-1");
        await within(closed, "the broker closing the revoked meter's connection");
      } finally {
        await end(meter);
      }
    });

    await t.step("a revoked meter's login is refused with the right password", async () => {
      assert.equal(await refusal(broker.url), 5, "CONNACK 5: not authorised");
    });

    await t.step("reinstate() lets it connect again", async () => {
      await admin.reinstate("meter-1");
      const meter = await connectMeter(broker.url);
      await end(meter);
    });

    await t.step("a meter unknown to dynsec counts as revoked, and is logged", async () => {
      await admin.revoke("meter-nobody");
      await admin.reinstate("meter-nobody");
      const entry = logger.entries.find((e) => e.fields.meter_id === "meter-nobody");
      assert.equal(entry?.level, "info");
      assert.match(entry!.msg, /unknown to Mosquitto dynamic security/);
    });

    await t.step("concurrent commands each get their own answer", async () => {
      // Answers are matched by correlationData; the plugin answers in order, a mix-up would
      // resolve the wrong call or leave one to time out.
      const results = await Promise.allSettled([
        admin.revoke("meter-nobody-1"),
        admin.reinstate("meter-1"),
        admin.revoke("meter-nobody-2"),
        admin.reinstate("meter-nobody-3"),
      ]);
      assert.deepEqual(results.map((r) => r.status), [
        "fulfilled",
        "fulfilled",
        "fulfilled",
        "fulfilled",
      ]);
      await end(await connectMeter(broker.url));
    });

    await t.step("the admin's own and the gateway's username are never disabled", async () => {
      for (const reserved of [ADMIN, "gateway"]) {
        await assert.rejects(admin.revoke(reserved), /username of a broker service account/);
      }
      // The admin still works: it did not lock itself out.
      await admin.reinstate("meter-1");
    });

    await t.step("no secret reaches the log", () => {
      assert.doesNotMatch(JSON.stringify(logger.entries), new RegExp(ADMIN_PASSWORD));
    });
  },
});

Deno.test({
  name: name("MosquittoDynsecAdmin with a wrong password or no broker fails fast and says why"),
  ignore: skip !== undefined,
  async fn(t) {
    await t.step("nothing listening: the error names the broker", async () => {
      const url = `mqtt://127.0.0.1:${freePort()}`;
      await using admin = new MosquittoDynsecAdmin({
        url,
        username: ADMIN,
        password: ADMIN_PASSWORD,
        clientId: "gw-test-admin",
        timeoutMs: 10_000,
        logger: memoryLogger(),
      });
      const started = Date.now();
      const error = await admin.revoke("meter-1").then(() => undefined, (e) => e);
      assert.ok(error instanceof BrokerAdminError, String(error));
      assert.match(
        error.message,
        /^Broker admin is not connected to "mqtt:\/\/127\.0\.0\.1:\d+" as "gateway-admin"/,
      );
      assert.match(error.message, /ECONNREFUSED/);
      assert.equal(error.meterId, "meter-1");
      // Well before the command's 10 s timeout: the refused connection ends the wait.
      assert.ok(Date.now() - started < 5_000, `took ${Date.now() - started} ms`);
      // Once the connection is known to be down, commands fail at once.
      const again = Date.now();
      await assert.rejects(admin.reinstate("meter-1"), /not connected/);
      assert.ok(Date.now() - again < 1_000);
    });

    await t.step(
      "a broker that never answers CONNECT: the command ends at its timeout",
      async () => {
        const listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
        const held: Deno.Conn[] = [];
        const accepting = (async () => {
          for await (const conn of listener) held.push(conn);
        })();
        try {
          await using admin = new MosquittoDynsecAdmin({
            url: `mqtt://127.0.0.1:${listener.addr.port}`,
            username: ADMIN,
            password: ADMIN_PASSWORD,
            clientId: "gw-test-admin",
            timeoutMs: 300,
            logger: memoryLogger(),
          });
          const started = Date.now();
          await assert.rejects(admin.revoke("meter-1"), /Broker admin (did )?not connect/);
          assert.ok(Date.now() - started < 3_000, `took ${Date.now() - started} ms`);
        } finally {
          listener.close();
          await accepting.catch(() => {});
          for (const conn of held) {
            try {
              conn.close();
            } catch { /* closed by the client */ }
          }
        }
      },
    );

    await t.step("a wrong admin password: the broker's refusal is in the error", async () => {
      await using broker = await startDynsecMosquitto();
      const logger = memoryLogger();
      await using admin = new MosquittoDynsecAdmin({
        url: broker.url,
        username: ADMIN,
        password: "not-the-password",
        clientId: "gw-test-admin",
        timeoutMs: 10_000,
        logger,
      });
      const error = await admin.revoke("meter-1").then(() => undefined, (e) => e);
      assert.ok(error instanceof BrokerAdminError, String(error));
      assert.match(error.message, /not connected .*as "gateway-admin".*[Nn]ot authori[sz]ed/);
      assert.doesNotMatch(JSON.stringify(logger.entries), /not-the-password/);
    });

    await t.step("a broker without the plugin: the command times out", async () => {
      // deploy/mosquitto.conf alone: anonymous logins, nobody answers $CONTROL requests.
      await using broker = await startMosquitto();
      await using admin = new MosquittoDynsecAdmin({
        url: broker.url,
        username: ADMIN,
        password: ADMIN_PASSWORD,
        clientId: "gw-test-admin",
        timeoutMs: 300,
        logger: memoryLogger(),
      });
      const started = Date.now();
      await assert.rejects(
        admin.revoke("meter-1"),
        /^BrokerAdminError: Mosquitto dynamic security did not answer "disableClient" for "meter-1" within 300 ms$/,
      );
      assert.ok(Date.now() - started < 3_000, `took ${Date.now() - started} ms`);
    });
  },
});

Deno.test({
  name: name(
    "DeviceService passes a revocation on to the broker; a failing broker does not fail it",
  ),
  ignore: skip !== undefined,
  async fn(t) {
    const dir = await Deno.makeTempDir({ prefix: "broker_admin_test_" });
    const store = await KvStore.open(`${dir}/gateway.kv`, { dedupeWindowMs: 15 * MINUTE });
    try {
      await store.createUser(plainUser("u-1", 0));
      const service = (brokerAdmin: BrokerAdmin, logger: Logger) =>
        new DeviceService({
          store,
          bus: new LocalBus(),
          clock: new ManualClock(Date.now()),
          kek: new Uint8Array(32).fill(7),
          policy: { rotationMs: 90 * 24 * 60 * MINUTE, graceMs: 24 * 60 * MINUTE },
          logger,
          brokerAdmin,
        });

      await t.step("revoke through the service disconnects and refuses the meter", async () => {
        await using broker = await startDynsecMosquitto();
        const logger = memoryLogger();
        await using admin = new MosquittoDynsecAdmin({
          url: broker.url,
          username: ADMIN,
          password: ADMIN_PASSWORD,
          clientId: "gw-test-admin",
          logger,
        });
        const devices = service(admin, logger);
        await devices.register(
          { meter_id: "meter-1", user_id: "u-1", algorithm: "hmac-sha256" },
          "t",
        );
        const meter = await connectMeter(broker.url);
        try {
          const closed = closedByBroker(meter);
          const view = await devices.revoke("meter-1", "t", "stolen");
          assert.equal(view.status, "revoked");
          await within(closed, "the broker closing the revoked meter's connection");
        } finally {
          await end(meter);
        }
        assert.equal(await refusal(broker.url), 5);
        assert.deepEqual(logger.entries.filter((e) => e.level === "error"), []);
      });

      await t.step("an unreachable broker admin: revoke and register still succeed", async () => {
        const logger = memoryLogger();
        await using admin = new MosquittoDynsecAdmin({
          url: `mqtt://127.0.0.1:${freePort()}`,
          username: ADMIN,
          password: ADMIN_PASSWORD,
          clientId: "gw-test-admin",
          logger,
        });
        const devices = service(admin, logger);
        const issued = await devices.register(
          { meter_id: "meter-2", user_id: "u-1", algorithm: "hmac-sha256" },
          "t",
        );
        assert.match(issued.secret_hex!, /^[0-9a-f]{64}$/);
        const view = await devices.revoke("meter-2", "t");
        assert.equal(view.status, "revoked");
        assert.equal((await store.getDevice("meter-2"))?.status, "revoked");
        const errors = logger.entries.filter((e) => e.level === "error");
        assert.deepEqual(errors.map((e) => [e.msg, e.fields.meter_id]), [
          ["device registered but the external broker did not reinstate it", "meter-2"],
          ["device revoked but the external broker did not disconnect it", "meter-2"],
        ]);
        assert.ok(errors.every((e) => e.fields.error instanceof BrokerAdminError));
        const logged = JSON.stringify(
          logger.entries,
          (_k, v) => v instanceof Error ? v.message : v,
        );
        assert.doesNotMatch(logged, new RegExp(ADMIN_PASSWORD));
        assert.doesNotMatch(logged, new RegExp(issued.secret_hex!));
      });
    } finally {
      await store.close();
      await Deno.remove(dir, { recursive: true });
    }
  },
});

// ---- EMQX --------------------------------------------------------------------------------

interface Recorded {
  method: string;
  path: string;
  query: Record<string, string>;
  authorization: string | null;
  body: unknown;
}

/**
 * A stand-in for EMQX 5's REST API that records every request and answers like EMQX does
 * (status codes and error bodies from emqx_mgmt_api_banned.erl / emqx_mgmt_api_clients.erl).
 * This tests our HTTP calls, not EMQX: no EMQX runs here.
 */
function fakeEmqx() {
  const requests: Recorded[] = [];
  const bans = new Set<string>();
  const clients = new Map<string, string[]>([["meter-1", ["meter-1/a", "meter-1/b"]]]);
  const controller = new AbortController();
  /** Holds the "slow" answer until the server closes. */
  const release = Promise.withResolvers<void>();
  const json = (status: number, body: unknown) => Response.json(body, { status });
  const server = Deno.serve(
    { hostname: "127.0.0.1", port: 0, signal: controller.signal, onListen: () => {} },
    async (req) => {
      const url = new URL(req.url);
      const text = await req.text();
      requests.push({
        method: req.method,
        path: url.pathname,
        query: Object.fromEntries(url.searchParams),
        authorization: req.headers.get("authorization"),
        body: text === "" ? undefined : JSON.parse(text),
      });
      const path = url.pathname;
      if (path === "/api/v5/banned" && req.method === "POST") {
        const { as, who } = JSON.parse(text);
        if (who === "bad") return json(400, { code: "BAD_REQUEST", message: "invalid who" });
        if (who === "slow") {
          // Never answers in time; released when the server closes.
          await release.promise;
          return new Response(null, { status: 503 });
        }
        const key = `${as}/${who}`;
        if (bans.has(key)) return json(400, { code: "ALREADY_EXISTS", message: "{}" });
        bans.add(key);
        return json(200, { as, who, by: "x", reason: "x", at: "", until: "infinity" });
      }
      const unban = path.match(/^\/api\/v5\/banned\/username\/([^/]+)$/);
      if (unban && req.method === "DELETE") {
        const key = `username/${decodeURIComponent(unban[1])}`;
        if (!bans.delete(key)) return json(404, { code: "NOT_FOUND", message: "not found" });
        return new Response(null, { status: 204 });
      }
      if (path === "/api/v5/clients" && req.method === "GET") {
        const ids = clients.get(url.searchParams.get("username") ?? "") ?? [];
        return json(200, {
          data: ids.map((clientid) => ({ clientid, username: url.searchParams.get("username") })),
          meta: { page: 1, limit: 100, hasnext: false, count: ids.length },
        });
      }
      const kick = path.match(/^\/api\/v5\/clients\/([^/]+)$/);
      if (kick && req.method === "DELETE") {
        const id = decodeURIComponent(kick[1]);
        // meter-1/b went away between the listing and the kick.
        if (id === "meter-1/b") {
          return json(404, { code: "CLIENTID_NOT_FOUND", message: "Client ID not found" });
        }
        return new Response(null, { status: 204 });
      }
      return json(404, { code: "NOT_FOUND", message: "no such route" });
    },
  );
  return {
    url: `http://127.0.0.1:${server.addr.port}`,
    requests,
    bans,
    async close() {
      release.resolve();
      controller.abort();
      await server.finished;
    },
  };
}

Deno.test("EmqxHttpAdmin bans and kicks on revoke, lifts the ban on reinstate (recorded HTTP)", async () => {
  const emqx = fakeEmqx();
  try {
    const logger = memoryLogger();
    const config = loadConfig({
      MQTT_BROKER_ADMIN: "emqx",
      EMQX_API_URL: `${emqx.url}/`,
      EMQX_API_KEY: "key-1",
      EMQX_API_SECRET: "emqx-Secret-9d2c",
    });
    const admin = openBrokerAdmin(config, logger);
    assert.ok(admin instanceof EmqxHttpAdmin);
    await using _admin = admin;
    const auth = `Basic ${btoa("key-1:emqx-Secret-9d2c")}`;

    await admin.revoke("meter-1");
    assert.deepEqual(emqx.requests.map((r) => [r.method, r.path]), [
      ["POST", "/api/v5/banned"],
      ["GET", "/api/v5/clients"],
      ["DELETE", "/api/v5/clients/meter-1%2Fa"],
      ["DELETE", "/api/v5/clients/meter-1%2Fb"],
    ]);
    const [ban, list] = emqx.requests;
    assert.deepEqual(
      { ...(ban.body as Record<string, unknown>), reason: undefined },
      { as: "username", who: "meter-1", by: "gridtokenx-gateway", reason: undefined },
    );
    assert.equal(list.query.username, "meter-1");
    assert.ok(emqx.requests.every((r) => r.authorization === auth));
    assert.ok(emqx.bans.has("username/meter-1"));

    // Again: the existing ban (400 ALREADY_EXISTS) counts as done.
    await admin.revoke("meter-1");
    emqx.requests.length = 0;

    await admin.reinstate("meter-1");
    assert.deepEqual(emqx.requests.map((r) => [r.method, r.path]), [
      ["DELETE", "/api/v5/banned/username/meter-1"],
    ]);
    assert.equal(emqx.bans.size, 0);
    // No ban left (404 NOT_FOUND) counts as done too.
    await admin.reinstate("meter-1");

    await assert.rejects(
      admin.revoke("bad"),
      /^BrokerAdminError: EMQX refused to ban "bad": HTTP 400 BAD_REQUEST: invalid who$/,
    );
    assert.doesNotMatch(JSON.stringify(logger.entries), /emqx-Secret-9d2c/);
  } finally {
    await emqx.close();
  }
});

Deno.test("EmqxHttpAdmin gives up on a request after its timeout", async () => {
  const emqx = fakeEmqx();
  try {
    await using admin = new EmqxHttpAdmin({
      apiUrl: `${emqx.url}/api/v5`,
      apiKey: "k",
      apiSecret: "s",
      timeoutMs: 200,
      logger: memoryLogger(),
    });
    const started = Date.now();
    await assert.rejects(
      admin.revoke("slow"),
      /^BrokerAdminError: EMQX API POST http:\/\/127\.0\.0\.1:\d+\/api\/v5\/banned failed: no answer within 200 ms$/,
    );
    assert.ok(Date.now() - started < 3_000);
  } finally {
    await emqx.close();
  }
});

Deno.test("MQTT_BROKER_ADMIN is none by default and names a missing companion variable", () => {
  const config = loadConfig({});
  assert.deepEqual(config.brokerAdmin, { kind: "none" });
  assert.equal(openBrokerAdmin(config, memoryLogger()), undefined);

  const missing = (env: Record<string, string>) => {
    try {
      loadConfig(env);
    } catch (error) {
      assert.ok(error instanceof ConfigError);
      return error.variables.sort();
    }
    assert.fail("expected a ConfigError");
  };
  assert.deepEqual(
    missing({ MQTT_BROKER_ADMIN: "mosquitto-dynsec", MQTT_ADMIN_USERNAME: "a" }),
    ["MQTT_ADMIN_PASSWORD", "MQTT_URL"],
  );
  assert.deepEqual(
    missing({ MQTT_BROKER_ADMIN: "emqx", EMQX_API_URL: "http://emqx:18083" }),
    ["EMQX_API_KEY", "EMQX_API_SECRET"],
  );
  assert.deepEqual(missing({ MQTT_BROKER_ADMIN: "hivemq" }), ["MQTT_BROKER_ADMIN"]);

  const dynsec = loadConfig(dynsecEnv("mqtt://broker:1883")).brokerAdmin;
  assert.deepEqual(dynsec, {
    kind: "mosquitto-dynsec",
    url: "mqtt://broker:1883",
    username: ADMIN,
    password: ADMIN_PASSWORD,
    // Unique per instance, beside the ingress's id.
    clientId: "gw-test-admin",
  });
});
