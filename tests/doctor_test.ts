// `deno task doctor` as an operator runs it (a subprocess with a clean environment), against the
// real local PostgreSQL, Redis and MQTT broker.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { fileURLToPath } from "node:url";
import { migrate } from "../db/migrate.ts";
import { openPinnedPool } from "../db/postgres_pool.ts";
import { baseEnv, freePort } from "./_gateway_process.ts";
import {
  createTestSchema,
  mqttUrl,
  postgresUrl,
  probePostgres,
  probeTcp,
  redisUrl,
  requireService,
} from "./_services.ts";

const ROOT = fileURLToPath(new URL("..", import.meta.url));

async function doctor(
  env: Record<string, string>,
  args: string[] = [],
): Promise<{ code: number; stdout: string; stderr: string }> {
  const out = await new Deno.Command(Deno.execPath(), {
    args: [
      "run",
      "--allow-net",
      "--allow-env",
      "--allow-read",
      "--allow-write",
      "--allow-sys",
      "cli/doctor.ts",
      ...args,
    ],
    cwd: ROOT,
    env: { ...baseEnv(), ...env },
    clearEnv: true,
    stdin: "null",
  }).output();
  const decode = (b: Uint8Array) => new TextDecoder().decode(b);
  return { code: out.code, stdout: decode(out.stdout), stderr: decode(out.stderr) };
}

function randomHex(bytes: number): string {
  return Buffer.from(crypto.getRandomValues(new Uint8Array(bytes))).toString("hex");
}

/** The status of `check` in doctor's text output. */
function statusOf(stdout: string, check: string): string | undefined {
  for (const line of stdout.split("\n")) {
    const [status, name] = line.split(/\s+/);
    if (name === check) return status;
  }
  return undefined;
}

const pg = await requireService("PostgreSQL", probePostgres(postgresUrl()));
const redis = await requireService("Redis", probeTcp(redisUrl(), 6379));
const broker = await requireService("MQTT broker", probeTcp(mqttUrl(), 1883));
const missing = [pg, redis, broker].find((s) => !s.ok) as { reason: string } | undefined;

Deno.test("doctor passes on the embedded defaults with free ports", async () => {
  const dir = await Deno.makeTempDir({ prefix: "gw-doctor-" });
  try {
    const res = await doctor({
      DENO_KV_PATH: `${dir}/data/gateway.kv`,
      PORT: String(freePort()),
      MQTT_PORT: String(freePort()),
    });
    assert.equal(res.code, 0, res.stdout + res.stderr);
    assert.equal(statusOf(res.stdout, "store"), "OK", res.stdout);
    assert.match(res.stdout, /Deno KV .* will be created/);
    assert.equal(statusOf(res.stdout, "mqtt"), "OK", res.stdout);
    assert.equal(statusOf(res.stdout, "redis"), "OK", res.stdout);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("doctor fails when the embedded broker's port is taken, naming MQTT_PORT", async () => {
  const dir = await Deno.makeTempDir({ prefix: "gw-doctor-" });
  using listener = Deno.listen({ hostname: "127.0.0.1", port: 0 });
  try {
    const res = await doctor({
      DENO_KV_PATH: `${dir}/gateway.kv`,
      PORT: "0",
      MQTT_PORT: String(listener.addr.port),
    });
    assert.equal(res.code, 1, res.stdout + res.stderr);
    assert.equal(statusOf(res.stdout, "mqtt"), "FAIL", res.stdout);
    assert.match(res.stdout, new RegExp(`127\\.0\\.0\\.1:${listener.addr.port} \\(MQTT_PORT\\)`));
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("doctor stops at a bad environment value, naming the variable", async () => {
  const res = await doctor({ LOG_LEVELS: "mqtt=loud", KWH_MAX: "lots" });
  assert.equal(res.code, 2, res.stdout + res.stderr);
  assert.match(res.stdout, /FAIL\s+config/);
  assert.match(res.stdout, /LOG_LEVELS: "loud" is not a level/);
  assert.match(res.stdout, /KWH_MAX/);
  const json = await doctor({ DATABASE_URL: "mysql://x" }, ["--json"]);
  assert.equal(json.code, 2);
  assert.deepEqual(JSON.parse(json.stdout).variables, ["DATABASE_URL"]);
});

Deno.test({
  name: missing
    ? `doctor checks PostgreSQL, Redis and the MQTT broker (skipped: ${missing.reason})`
    : "doctor checks PostgreSQL, Redis and the MQTT broker and never prints their secrets",
  ignore: missing !== undefined,
  fn: async (t) => {
    const dbPassword = `DbPw${randomHex(8)}`;
    const base = new URL(postgresUrl());
    base.username ||= "postgres";
    base.password = dbPassword; // the local server trusts: carried, not checked
    const schema = await createTestSchema(base.href);
    const mqttPassword = `MqPw${randomHex(8)}`;
    const broker = new URL(mqttUrl());
    broker.username = "doctor";
    broker.password = mqttPassword; // the local broker allows anonymous clients
    const env = {
      DATABASE_URL: schema.url,
      JWT_SECRET: randomHex(24),
      DEVICE_KEY_ENCRYPTION_KEY: randomHex(32),
      REDIS_URL: redisUrl(),
      MQTT_URL: broker.href,
      PORT: "0",
    };
    const secrets = [dbPassword, mqttPassword, env.JWT_SECRET, env.DEVICE_KEY_ENCRYPTION_KEY];
    try {
      await t.step("pending migrations are a warning while MIGRATE_ON_START is on", async () => {
        const res = await doctor(env);
        assert.equal(res.code, 0, res.stdout + res.stderr);
        assert.equal(statusOf(res.stdout, "store.migrations"), "WARN", res.stdout);
        const off = await doctor({ ...env, MIGRATE_ON_START: "false" });
        assert.equal(off.code, 1, off.stdout);
        assert.match(off.stdout, /FAIL\s+store\.migrations .*deno task migrate/);
      });

      await t.step("everything configured and reachable: exit 0", async () => {
        const pool = await openPinnedPool(schema.url, { max: 1 });
        try {
          await migrate(pool.sql, {});
        } finally {
          await pool.sql.end({ timeout: 5 });
        }
        const res = await doctor(env);
        assert.equal(res.code, 0, res.stdout + res.stderr);
        for (const check of ["config", "store", "store.timescaledb", "store.migrations"]) {
          assert.equal(statusOf(res.stdout, check), "OK", `${check}:\n${res.stdout}`);
        }
        assert.match(res.stdout, /OK\s+store\s+PostgreSQL \d+/);
        assert.match(res.stdout, /store\.migrations\s+\d+ applied, 0 pending/);
        assert.match(res.stdout, /OK\s+redis\s+Redis \S+ at .*PONG/);
        assert.match(res.stdout, /OK\s+mqtt\s+broker .* accepted the connection as "doctor"/);
        const json = JSON.parse((await doctor(env, ["--json"])).stdout);
        assert.equal(json.ok, true);
        for (const secret of secrets) {
          assert.ok(
            !res.stdout.includes(secret) && !res.stderr.includes(secret),
            "a secret leaked",
          );
          assert.ok(!JSON.stringify(json).includes(secret), "a secret leaked into --json");
        }
      });

      await t.step("an unreachable database port fails naming DATABASE_URL: exit 1", async () => {
        const dead = new URL(schema.url);
        dead.port = String(freePort());
        const res = await doctor({ ...env, DATABASE_URL: dead.href });
        assert.equal(res.code, 1, res.stdout + res.stderr);
        const line = res.stdout.split("\n").find((l) => /^FAIL\s+store\s/.test(l)) ?? "";
        assert.match(line, /DATABASE_URL/, res.stdout);
        assert.match(line, new RegExp(`127\\.0\\.0\\.1:${dead.port}`));
        assert.ok(!res.stdout.includes(dbPassword), "the password is not printed");
        assert.match(res.stdout, /FAILED: /);
      });

      await t.step("an unreachable Redis fails naming REDIS_URL", async () => {
        const res = await doctor({
          ...env,
          REDIS_URL: `redis://:${mqttPassword}@127.0.0.1:${freePort()}`,
        }, ["--timeout", "2"]);
        assert.equal(res.code, 1, res.stdout + res.stderr);
        assert.match(res.stdout, /FAIL\s+redis\s+Redis at redis:\/\/.*REDIS_URL/);
        assert.ok(!res.stdout.includes(mqttPassword), "the password is not printed");
      });
    } finally {
      await schema.drop();
    }
  },
});
