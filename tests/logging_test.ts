// Structured logs: redaction, per-component levels, request ids, and a real gateway process whose
// every stdout line is JSON and carries none of the secrets it was given or handed out.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { connect } from "mqtt";
import { loadConfig, parseLogLevels } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";
import {
  isSecretKey,
  jsonLogger,
  redact,
  REDACTED,
  redactText,
  ShownOnce,
  withLogContext,
} from "../core/logger.ts";
import { connectCredentials } from "../mqtt/device_credentials.ts";
import { isoAgo, signedReading } from "./_gateway.ts";
import { call, embeddedMqttPort, GatewayProcess, type LogEntry } from "./_gateway_process.ts";
import { createTestSchema, postgresUrl, probePostgres, requireService } from "./_services.ts";

function capture(level: "debug" | "info" | "warn" | "error" = "debug", levels = {}) {
  const lines: string[] = [];
  const logger = jsonLogger(level, { sink: (line) => lines.push(line), levels });
  const parsed = () => lines.map((l) => JSON.parse(l) as LogEntry);
  return { lines, logger, parsed };
}

Deno.test("redact() removes values of secret-named fields at any depth and in any spelling", () => {
  const out = redact({
    password: "hunter2",
    new_password: "hunter3",
    Authorization: "Bearer abc",
    "set-cookie": "sid=1",
    device_signature: "c2lnbmF0dXJl",
    signature: "00ff",
    api_key: "k1",
    apiKey: "k2",
    "x-api-key": "k3",
    private_key: "pk",
    kek: "0011",
    jwt: "eyJ",
    jwtSecret: "s",
    JWT_SECRET: "s2",
    DEVICE_KEY_ENCRYPTION_KEY: "e",
    access_token: "t",
    secret_hex: "aa",
    nested: { list: [{ mqtt_password: "p" }, "plain"], deeper: { client_secret: "c" } },
    meter_id: "m-1",
    key_id: "k-1",
    event: "token_rejected",
    user_id: "u-1",
    kwh_amount: 1.5,
  }) as Record<string, unknown>;
  for (
    const key of [
      "password",
      "new_password",
      "Authorization",
      "set-cookie",
      "device_signature",
      "signature",
      "api_key",
      "apiKey",
      "x-api-key",
      "private_key",
      "kek",
      "jwt",
      "jwtSecret",
      "JWT_SECRET",
      "DEVICE_KEY_ENCRYPTION_KEY",
      "access_token",
      "secret_hex",
    ]
  ) {
    assert.equal(out[key], REDACTED, key);
  }
  assert.deepEqual(out.nested, {
    list: [{ mqtt_password: REDACTED }, "plain"],
    deeper: { client_secret: REDACTED },
  });
  assert.equal(out.meter_id, "m-1");
  assert.equal(out.key_id, "k-1");
  assert.equal(out.event, "token_rejected");
  assert.equal(out.kwh_amount, 1.5);
  for (const plain of ["meter_id", "key_id", "user_id", "wallet_address", "suppressed", "reason"]) {
    assert.equal(isSecretKey(plain), false, plain);
  }
});

Deno.test("redactText() masks credentials in URLs, key=value pairs, bearer tokens and JWTs", () => {
  const jwt = "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ1LTEifQ.c2lnbmF0dXJlLXBhcnQ";
  const cases: [string, string][] = [
    ["postgres://gw:Pa55w0rd@db:5432/x", "postgres://***@db:5432/x"],
    ["redis://:r3d1s@cache:6379/0 down", "redis://***@cache:6379/0 down"],
    ["mqtts://meter:p@ss@broker", "mqtts://***@broker"],
    ["https://h/cb?user=a&password=xyz&x=1", "https://h/cb?user=a&password=***&x=1"],
    ["GET /ws?token=abc.def", "GET /ws?token=***"],
    ['{"api_key":"k-123","n":1}', '{"api_key":"***","n":1}'],
    [
      "connect failed: password authentication failed",
      "connect failed: password authentication failed",
    ],
    ["Authorization: Bearer abc.def.ghi", "Authorization: ***"],
    ["header Bearer abcdef", "header Bearer ***"],
    [`token was ${jwt} ok`, "token was *** ok"],
    ["meter m-1 reading 2026-11-29T10:15:00Z", "meter m-1 reading 2026-11-29T10:15:00Z"],
  ];
  for (const [input, expected] of cases) assert.equal(redactText(input), expected, input);
});

Deno.test("the logger redacts fields, error messages and causes; only ShownOnce passes", () => {
  const { logger, lines, parsed } = capture();
  const cause = new Error("dial postgres://u:causepw@h/db failed");
  logger.error("store failed", {
    error: new Error("no connection to postgres://u:toppw@h/db", { cause }),
    url: "redis://:redispw@r:6379",
    headers: { authorization: "Bearer tok-123", cookie: "sid=cookiepw" },
    device_signature: "sigvalue",
  });
  logger.warn("first admin", { password: new ShownOnce("generated-pw") });
  for (const secret of ["causepw", "toppw", "redispw", "tok-123", "cookiepw", "sigvalue"]) {
    assert.ok(!lines.join("\n").includes(secret), secret);
  }
  const [first, second] = parsed();
  const error = first.error as { name: string; message: string; cause: { message: string } };
  assert.equal(error.name, "Error");
  assert.equal(error.message, "no connection to postgres://***@h/db");
  assert.equal(error.cause.message, "dial postgres://***@h/db failed");
  assert.equal(second.password, "generated-pw");
});

Deno.test("child loggers carry their component and its level from LOG_LEVELS", () => {
  const { logger, parsed } = capture("info", parseLogLevels("mqtt=debug,http=warn"));
  const mqtt = logger.child("mqtt");
  const http = logger.child("http", { listener: "api" });
  const db = logger.child("db");
  mqtt.debug("mqtt detail");
  http.info("http chatter");
  http.warn("http problem");
  db.debug("db detail");
  db.info("db note");
  mqtt.child("acks").debug("acks detail");
  logger.debug("root detail");
  assert.deepEqual(
    parsed().map((e) => [e.msg, e.component]),
    [
      ["mqtt detail", "mqtt"],
      ["http problem", "http"],
      ["db note", "db"],
      ["acks detail", "mqtt.acks"],
    ],
  );
  assert.equal(parsed()[1].listener, "api");
  assert.equal(mqtt.enabled("debug"), true);
  assert.equal(http.enabled("info"), false);
  assert.equal(logger.enabled("debug"), false);
});

Deno.test("withLogContext() adds its fields to every line written during it, timers included", async () => {
  const { logger, parsed } = capture();
  const child = logger.child("http");
  await withLogContext({ request_id: "r-1" }, async () => {
    child.info("inside");
    await new Promise((resolve) => setTimeout(resolve, 1));
    logger.info("after a timer");
  });
  logger.info("outside");
  assert.deepEqual(parsed().map((e) => e.request_id), ["r-1", "r-1", undefined]);
});

Deno.test("LOG_LEVELS is validated: a bad value names the variable", () => {
  assert.deepEqual(loadConfig({ LOG_LEVELS: "mqtt=debug, http=WARN" }).logLevels, {
    mqtt: "debug",
    http: "warn",
  });
  assert.deepEqual(loadConfig({}).logLevels, {});
  for (const bad of ["mqtt", "mqtt=loud", "nothing=debug", "mqtt=debug,,=warn"]) {
    assert.throws(
      () => loadConfig({ LOG_LEVELS: bad }),
      (error: unknown) =>
        error instanceof ConfigError && error.message.includes("LOG_LEVELS") &&
        error.variables.includes("LOG_LEVELS"),
      bad,
    );
  }
});

// ---------------------------------------------------------------------------------------------
// A real gateway process on PostgreSQL (a password in its URL), every secret tracked.

const pg = await requireService("PostgreSQL", probePostgres(postgresUrl()));

function randomHex(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("hex");
}

/** Tries an MQTT CONNECT; resolves with the CONNACK error (refused) or null (accepted). */
function tryConnect(
  port: number,
  options: { username: string; password: string; clientId: string },
): Promise<Error | null> {
  return new Promise((resolve) => {
    const client = connect({
      host: "127.0.0.1",
      port,
      protocolVersion: 4,
      ...options,
      reconnectPeriod: 0,
      connectTimeout: 10_000,
    });
    client.once("connect", () => client.end(true, () => resolve(null)));
    client.once("error", (error) => client.end(true, () => resolve(error)));
  });
}

Deno.test({
  name: pg.ok
    ? "a gateway's log lines are all JSON, carry request ids and addresses, and no secret"
    : `a gateway's log lines are all JSON and carry no secret (skipped: ${pg.reason})`,
  ignore: !pg.ok,
  fn: async (t) => {
    const dbPassword = `DbPw${randomHex(8)}`;
    const base = new URL(postgresUrl());
    base.username ||= "postgres";
    base.password = dbPassword; // the local server trusts: the password is carried, not checked
    const schema = await createTestSchema(base.href);
    const dir = await Deno.makeTempDir({ prefix: "gw-logging-" });
    const secrets: Record<string, string> = {
      JWT_SECRET: randomHex(24),
      DEVICE_KEY_ENCRYPTION_KEY: randomHex(32),
      ADMIN_PASSWORD: `Adm1n-${randomHex(8)}`,
      "database password": dbPassword,
    };
    const email = "root@logging.test";
    await using gw = await GatewayProcess.start({
      DATABASE_URL: schema.url,
      DENO_KV_PATH: `${dir}/gateway.kv`,
      JWT_SECRET: secrets.JWT_SECRET,
      DEVICE_KEY_ENCRYPTION_KEY: secrets.DEVICE_KEY_ENCRYPTION_KEY,
      ADMIN_EMAIL: email,
      ADMIN_PASSWORD: secrets.ADMIN_PASSWORD,
      LOG_LEVEL: "debug",
      GATEWAY_INSTANCE_ID: "gw-logging",
    });
    try {
      let adminToken = "";
      await t.step(
        "a login with a wrong password is logged with the address and request id",
        async () => {
          secrets["wrong password"] = `Wr0ng-${randomHex(8)}`;
          const res = await fetch(`${gw.url}/api/auth/login`, {
            method: "POST",
            headers: { "content-type": "application/json", "x-request-id": "req-login-1" },
            body: JSON.stringify({ email, password: secrets["wrong password"] }),
          });
          await res.body?.cancel();
          assert.equal(res.status, 401);
          assert.equal(res.headers.get("x-request-id"), "req-login-1");
          const line = await gw.waitForLog((e) => e.event === "login_failed");
          assert.equal(line.address, "127.0.0.1");
          assert.equal(line.request_id, "req-login-1");
          assert.equal(line.component, "security");
          const access = await gw.waitForLog((e) =>
            e.msg === "http request" && e.request_id === "req-login-1"
          );
          assert.equal(access.level, "info");
          assert.equal(access.method, "POST");
          assert.equal(access.route, "/api/auth/login");
          assert.equal(access.status, 401);
          assert.equal(access.error, "unauthorized");
          assert.equal(access.address, "127.0.0.1");
          assert.equal(typeof access.duration_ms, "number");

          const ok = await call(gw.url, "POST", "/api/auth/login", {
            body: { email, password: secrets.ADMIN_PASSWORD },
          });
          assert.equal(ok.status, 200);
          adminToken = ok.body.access_token;
          secrets["admin token"] = adminToken;
        },
      );

      await t.step("a bad token is logged; an invalid X-Request-Id is replaced", async () => {
        const [head, payload] = adminToken.split(".");
        secrets["forged token"] = `${head}.${payload}.${randomHex(32)}`;
        const res = await fetch(`${gw.url}/api/meters/readings?token=${secrets["forged token"]}`, {
          headers: {
            authorization: `Bearer ${secrets["forged token"]}`,
            "x-request-id": "bad id; with spaces",
          },
        });
        await res.body?.cancel();
        assert.equal(res.status, 401);
        const id = res.headers.get("x-request-id") ?? "";
        assert.match(id, /^[0-9a-f-]{36}$/);
        const line = await gw.waitForLog((e) => e.event === "token_rejected");
        assert.equal(line.address, "127.0.0.1");
        assert.equal(line.request_id, id);
      });

      let meter = { id: "log-meter-1", secret: "" };
      let userId = "";
      await t.step(
        "a device registration returns a secret; a bad signature is logged",
        async () => {
          const user = await call(gw.url, "POST", "/api/admin/users", {
            token: adminToken,
            body: { email: "owner@logging.test", password: `Own3r-${randomHex(6)}`, role: "user" },
          });
          assert.equal(user.status, 201, JSON.stringify(user.body));
          userId = user.body.id;
          const reg = await call(gw.url, "POST", "/api/admin/devices/register", {
            token: adminToken,
            body: { meter_id: meter.id, user_id: userId, algorithm: "hmac-sha256" },
          });
          assert.equal(reg.status, 201, JSON.stringify(reg.body));
          meter = { id: meter.id, secret: reg.body.secret_hex };
          secrets["device secret"] = meter.secret;
          secrets["device secret (base64)"] = Buffer.from(meter.secret, "hex").toString("base64");

          const ts = isoAgo(60_000);
          const forged = signedReading(meter.id, randomHex(32), ts, "2.5");
          secrets["bad signature"] = String(forged.device_signature);
          const bad = await call(gw.url, "POST", "/api/meters/submit-reading", {
            token: adminToken,
            body: forged,
          });
          assert.equal(bad.status, 401, JSON.stringify(bad.body));
          const security = await gw.waitForLog((e) => e.event === "bad_signature");
          assert.equal(security.address, "127.0.0.1");
          assert.equal(security.meter_id, meter.id);
          const rejected = await gw.waitForLog((e) => e.msg === "reading rejected");
          assert.equal(rejected.meter_id, meter.id);
          assert.equal(rejected.user_id, JSON.parse(atob(adminToken.split(".")[1])).sub);
          assert.equal(rejected.kwh_amount, "2.5");
          assert.equal(rejected.source, "http");
          assert.equal(rejected.error, "bad_signature");
          assert.equal(typeof rejected.request_id, "string");

          const good = signedReading(meter.id, meter.secret, ts, "3.25");
          secrets["good signature"] = String(good.device_signature);
          const stored = await call(gw.url, "POST", "/api/meters/submit-reading", {
            token: adminToken,
            body: good,
          });
          assert.equal(stored.status, 201, JSON.stringify(stored.body));
          const accepted = await gw.waitForLog((e) => e.msg === "reading accepted");
          assert.equal(accepted.level, "debug");
          assert.equal(accepted.meter_id, meter.id);
          assert.equal(accepted.user_id, userId);
          assert.equal(accepted.kwh_amount, 3.25);
          assert.equal(accepted.source, "http");
        },
      );

      await t.step(
        "an MQTT connect with wrong credentials is logged with the address",
        async () => {
          const port = embeddedMqttPort(gw);
          const clientId = `${meter.id}/bad`;
          const creds = connectCredentials(meter.id, crypto.getRandomValues(new Uint8Array(32)), {
            clientId,
          });
          secrets["mqtt wrong password"] = creds.password;
          const refused = await tryConnect(port, creds);
          assert.ok(refused, "the connection is refused");
          const line = await gw.waitForLog((e) => e.event === "mqtt_connect_refused");
          assert.equal(line.address, "127.0.0.1");
          assert.equal(line.meter_id, meter.id);
          assert.equal(line.component, "security");
        },
      );

      await t.step("every line is JSON, and no secret appears anywhere in the output", async () => {
        const status = await gw.stop("SIGTERM");
        assert.equal(status.code, 0, gw.describe());
        const lines = gw.stdout.filter((l) => l.trim() !== "");
        assert.ok(lines.length > 10, "the run logged");
        for (const line of lines) {
          const value = JSON.parse(line);
          assert.equal(typeof value, "object", line);
          assert.equal(typeof value.ts, "string", line);
          assert.equal(typeof value.level, "string", line);
          assert.equal(typeof value.msg, "string", line);
        }
        const output = [...gw.stdout, ...gw.stderr].join("\n");
        for (const [what, secret] of Object.entries(secrets)) {
          assert.ok(secret.length >= 8, what);
          assert.ok(!output.includes(secret), `${what} appears in the output`);
        }
        // Components are labelled where the gateway wires them.
        const components = new Set(gw.logs().map((e) => e.component));
        for (const c of ["http", "db", "security", "actors", "auth"]) {
          assert.ok(components.has(c), `component ${c}: ${[...components].join(", ")}`);
        }
      });
    } finally {
      await gw.stop();
      await schema.drop();
      await Deno.remove(dir, { recursive: true });
    }
  },
});
