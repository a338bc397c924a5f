// Descriptor exhaustion against the embedded broker (issue #10): the real gateway (main.ts) with a
// low descriptor limit (`prlimit` on the child) and a flood of idle TCP connections to its MQTT
// port. It must stay up, keep serving connected devices, and accept new ones once the flood ends.
// Deno 2.9.6's node:net server stops accepting for good after an EMFILE; the broker's listener
// guard notices (a loopback probe) and listens again.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connectAsync, type MqttClient } from "mqtt";
import { connectCredentials, readingPayload } from "../mqtt/device_credentials.ts";
import { call, embeddedMqttPort, GatewayProcess, login } from "./_gateway_process.ts";
import { binariesAvailable, within } from "./_mosquitto.ts";

const ADMIN_EMAIL = "root@mqtt-fd.test";
const ADMIN_PASSWORD = "mqtt-fd-admin-password";
const RECOVERY_TIMEOUT_MS = 30_000;

interface Meter {
  id: string;
  secret: Uint8Array;
}

/** Starts main.ts, lowers its descriptor limit, registers one meter. */
async function startGateway(
  dir: string,
  nofile: number,
  env: Record<string, string>,
): Promise<{ gw: GatewayProcess; meter: Meter; port: number }> {
  const gw = await GatewayProcess.start({
    DENO_KV_PATH: `${dir}/gateway.kv`,
    ADMIN_EMAIL,
    ADMIN_PASSWORD,
    LOG_LEVEL: "info",
    ...env,
  });
  try {
    const limit = await new Deno.Command("prlimit", {
      args: ["--pid", String(gw.child.pid), `--nofile=${nofile}:${nofile}`],
      stdout: "null",
      stderr: "piped",
    }).output();
    assert.equal(limit.code, 0, new TextDecoder().decode(limit.stderr));
    const token = await login(gw.url, ADMIN_EMAIL, ADMIN_PASSWORD);
    const user = await call(gw.url, "POST", "/api/admin/users", {
      token,
      body: { email: "owner@mqtt-fd.test", password: "holder-Secret-82", role: "user" },
    });
    assert.equal(user.status, 201, JSON.stringify(user.body));
    const res = await call(gw.url, "POST", "/api/admin/devices/register", {
      token,
      body: { meter_id: "fd-meter", user_id: user.body.id, algorithm: "hmac-sha256" },
    });
    assert.equal(res.status, 201, JSON.stringify(res.body));
    const meter = { id: "fd-meter", secret: Buffer.from(res.body.secret_hex, "hex") };
    return { gw, meter, port: embeddedMqttPort(gw) };
  } catch (error) {
    await gw.stop();
    throw error;
  }
}

async function device(port: number, meter: Meter, suffix: string): Promise<MqttClient> {
  return await connectAsync(`mqtt://127.0.0.1:${port}`, {
    protocolVersion: 4,
    reconnectPeriod: 0,
    connectTimeout: 5_000,
    ...connectCredentials(meter.id, meter.secret, { clientId: `${meter.id}/${suffix}` }),
  });
}

/** Opens `n` idle TCP connections (never a byte sent); returns the ones the server kept open. */
async function flood(port: number, n: number): Promise<Deno.TcpConn[]> {
  const conns: Deno.TcpConn[] = [];
  for (let i = 0; i < n; i++) {
    try {
      conns.push(await Deno.connect({ hostname: "127.0.0.1", port }));
    } catch {
      break; // the backlog is full: nobody accepts any more
    }
  }
  return conns;
}

let slot = 0;
async function publish(client: MqttClient, meter: Meter): Promise<void> {
  const ts = new Date(Math.floor(Date.now() / 1000) * 1000 - ++slot * 16 * 60_000)
    .toISOString().replace(".000Z", "Z");
  await within(
    client.publishAsync(
      `meters/${meter.id}/readings`,
      readingPayload(meter.id, meter.secret, ts, "1"),
      {
        qos: 1,
      },
    ),
    "PUBACK",
  );
}

/** Connects a new device, retrying until it works (the listener is back) or the guard ends. */
async function connectEventually(port: number, meter: Meter): Promise<MqttClient> {
  const deadline = Date.now() + RECOVERY_TIMEOUT_MS;
  for (let attempt = 0;; attempt++) {
    try {
      return await device(port, meter, `late-${attempt}`);
    } catch (error) {
      if (Date.now() > deadline) throw error;
      await new Promise((resolve) => setTimeout(resolve, 500));
    }
  }
}

/** What a flooded test works with. */
interface Flooded {
  gw: GatewayProcess;
  meter: Meter;
  port: number;
  /** The device connected before the flood. */
  first: MqttClient;
  /** Clients closed when the test ends. */
  clients: MqttClient[];
  /** Closes the flood's connections. */
  endFlood(): void;
}

/**
 * Starts the gateway with `nofile` descriptors, connects a first device, floods the MQTT port
 * with `n` idle connections (a step that checks the first device still gets its PUBACKs), runs
 * `rest`, and closes everything.
 */
async function floodTest(
  t: Deno.TestContext,
  nofile: number,
  env: Record<string, string>,
  n: number,
  rest: (flooded: Flooded) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "gw-mqtt-fd-" });
  const { gw, meter, port } = await startGateway(dir, nofile, env);
  let conns: Deno.TcpConn[] = [];
  const clients: MqttClient[] = [];
  const endFlood = () => {
    for (const c of conns) c.close();
    conns = [];
  };
  try {
    const first = await device(port, meter, "first");
    clients.push(first);

    await t.step("during the flood, the connected device gets its PUBACKs", async () => {
      conns = await flood(port, n);
      for (let i = 0; i < 5; i++) await publish(first, meter);
    });

    await rest({ gw, meter, port, first, clients, endFlood });
  } finally {
    endFlood();
    await Promise.all(clients.map((c) => c.endAsync(true)));
    await gw.stop();
    await Deno.remove(dir, { recursive: true });
  }
}

const tools = await binariesAvailable(["prlimit"]);

Deno.test({
  name: "with 256 descriptors, a flood of 400 idle connections exhausts them; the gateway " +
    "survives, keeps serving its device, and accepts again once the flood ends" +
    (tools.ok ? "" : ` (ignored: ${tools.reason})`),
  ignore: !tools.ok,
  async fn(t) {
    await floodTest(
      t,
      256,
      {
        // No per-address cap and a long deadline: the flood really holds the descriptors.
        MQTT_MAX_CONNECTIONS_PER_ADDRESS: "100000",
        MQTT_CONNECT_TIMEOUT: "5m",
      },
      400,
      async ({ gw, meter, port, first, clients, endFlood }) => {
        await t.step("after the flood, a new device connects and publishes", async () => {
          endFlood();
          const late = await connectEventually(port, meter);
          clients.push(late);
          await publish(late, meter);
          await publish(first, meter);
        });

        await t.step("the process is alive and logged the stall", async () => {
          const status = await Promise.race([gw.status, Promise.resolve(null)]);
          assert.equal(status, null, "still running");
          const stall = gw.logs().find((e) => String(e.msg).startsWith("mqtt listener stopped"));
          assert.ok(stall, `a stall was logged:\n${gw.describe().slice(-3000)}`);
          assert.equal(stall.level, "warn");
        });
      },
    );
  },
});

Deno.test({
  name: "with 1,024 descriptors and default limits, 1,100 idle connections from one address are " +
    "refused beyond the per-address cap; refusals are logged rate-limited and without secrets" +
    (tools.ok ? "" : ` (ignored: ${tools.reason})`),
  ignore: !tools.ok,
  async fn(t) {
    await floodTest(t, 1024, {}, 1100, async ({ gw, meter, port, clients, endFlood }) => {
      await t.step("a CONNECT with a bad password is refused and logged without it", async () => {
        endFlood();
        const password = "1700000000.deadbeefdeadbeefdeadbeef";
        const refused = await connectAsync(`mqtt://127.0.0.1:${port}`, {
          protocolVersion: 4,
          reconnectPeriod: 0,
          clientId: `${meter.id}/bad`,
          username: meter.id,
          password,
        }).then((c) => c.endAsync().then(() => false), () => true);
        assert.ok(refused, "refused");
        const line = await gw.waitForLog((e) => e.msg === "security: mqtt_connect_refused");
        assert.equal(line.level, "warn");
        assert.equal(line.address, "127.0.0.1");
        assert.ok(!gw.stdout.join("\n").includes("deadbeef"), "the password is never logged");
      });

      await t.step(
        "the excess was refused, logged a few times only, and devices connect",
        async () => {
          const refusals = gw.logs().filter((e) => e.msg === "security: connection_refused");
          assert.ok(refusals.length >= 1, "refusals are logged");
          assert.ok(refusals.length <= 5, `rate-limited: ${refusals.length} lines`);
          assert.equal(refusals[0].level, "warn");
          const late = await connectEventually(port, meter);
          clients.push(late);
          await publish(late, meter);
          const status = await Promise.race([gw.status, Promise.resolve(null)]);
          assert.equal(status, null, "still running");
        },
      );
    });
  },
});
