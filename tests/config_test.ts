import assert from "node:assert/strict";
import { loadConfig } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";
import { parseDuration } from "../core/duration.ts";

Deno.test("loadConfig() gives working defaults for an empty environment", () => {
  const config = loadConfig({});
  assert.equal(config.port, 8080);
  assert.equal(config.kvPath, "./data/gateway.kv");
  assert.equal(config.rules.dedupeWindowMs, 15 * 60_000);
  assert.equal(config.registerRateLimit, 5);
  assert.equal(config.keyGraceMs, 24 * 3_600_000);
  assert.equal(config.kek, undefined);
  assert.equal(config.rateSyncMs, 250);
  assert.equal(loadConfig({ RATE_SYNC_INTERVAL: "1s" }).rateSyncMs, 1000);
  assert.throws(() => loadConfig({ RATE_SYNC_INTERVAL: "1ms" }), /RATE_SYNC_INTERVAL/);
});

Deno.test("loadConfig() names every bad variable in one error", () => {
  try {
    loadConfig({ PORT: "abc", DEVICE_KEY_ENCRYPTION_KEY: "xyz", DEDUPE_WINDOW: "soon" });
    assert.fail("expected a ConfigError");
  } catch (error) {
    assert.ok(error instanceof ConfigError);
    assert.deepEqual(
      error.variables.sort(),
      ["DEDUPE_WINDOW", "DEVICE_KEY_ENCRYPTION_KEY", "PORT"],
    );
    assert.match(error.message, /PORT/);
    assert.match(error.message, /DEVICE_KEY_ENCRYPTION_KEY: must be 64 hex characters/);
  }
});

Deno.test("parseDuration() reads units and bare seconds", () => {
  assert.equal(parseDuration("500ms"), 500);
  assert.equal(parseDuration("30"), 30_000);
  assert.equal(parseDuration("15m"), 900_000);
  assert.equal(parseDuration("24h"), 86_400_000);
  assert.equal(parseDuration("7d"), 604_800_000);
  assert.equal(parseDuration("soon"), undefined);
});

Deno.test("loadConfig() refuses placeholder secrets and names the variable", () => {
  const cases: [Record<string, string>, string, RegExp][] = [
    [{ JWT_SECRET: "a".repeat(32) }, "JWT_SECRET", /JWT_SECRET: must be random/],
    [{ JWT_SECRET: "ab".repeat(32) }, "JWT_SECRET", /JWT_SECRET: must be random/],
    [
      { JWT_SECRET: "change-me-change-me-change-me-32" },
      "JWT_SECRET",
      /JWT_SECRET: must be random/,
    ],
    [
      { DEVICE_KEY_ENCRYPTION_KEY: "0123456789abcdef".repeat(4) },
      "DEVICE_KEY_ENCRYPTION_KEY",
      /DEVICE_KEY_ENCRYPTION_KEY: must be random/,
    ],
    [{ KWH_MAX: "1e12" }, "KWH_MAX", /KWH_MAX: /],
    [
      { DEVICE_KEY_ENCRYPTION_KEY: "00".repeat(32) },
      "DEVICE_KEY_ENCRYPTION_KEY",
      /DEVICE_KEY_ENCRYPTION_KEY: must be random/,
    ],
    [
      { DEVICE_KEY_ENCRYPTION_KEY: "0102".repeat(16) },
      "DEVICE_KEY_ENCRYPTION_KEY",
      /DEVICE_KEY_ENCRYPTION_KEY: must be random/,
    ],
    [
      { ADMIN_PASSWORD: "12345678" },
      "ADMIN_PASSWORD",
      /ADMIN_PASSWORD: Passwords need at least 12/,
    ],
    [{ ADMIN_PASSWORD: " ".repeat(12) }, "ADMIN_PASSWORD", /ADMIN_PASSWORD: A password of only/],
    [{ ADMIN_PASSWORD: "password1234" }, "ADMIN_PASSWORD", /ADMIN_PASSWORD: This password is too/],
  ];
  for (const [env, variable, message] of cases) {
    assert.throws(() => loadConfig(env), (error: unknown) => {
      assert.ok(error instanceof ConfigError, JSON.stringify(env));
      assert.deepEqual(error.variables, [variable]);
      assert.match(error.message, message);
      // The message names the variable, never the value.
      const value = Object.values(env)[0];
      if (value.trim() !== "") assert.ok(!error.message.includes(value), error.message);
      return true;
    });
  }
});

Deno.test("loadConfig() accepts random secrets and a good admin password", () => {
  const hex = Array.from(crypto.getRandomValues(new Uint8Array(32)))
    .map((b) => b.toString(16).padStart(2, "0")).join("");
  const config = loadConfig({
    JWT_SECRET: btoa(String.fromCharCode(...crypto.getRandomValues(new Uint8Array(32)))),
    DEVICE_KEY_ENCRYPTION_KEY: hex,
    ADMIN_PASSWORD: "a good long admin password",
    LOGIN_BACKOFF_AFTER: "3",
    LOGIN_BACKOFF_MAX: "5m",
  });
  assert.equal(config.kek?.length, 32);
  assert.deepEqual(config.loginBackoff, { free: 3, maxMs: 300_000 });
  assert.equal(config.wsMaxPerUser, 16);
});

Deno.test("loadConfig() reads the cache TTLs and size, and names a bad one", () => {
  const defaults = loadConfig({}).cache;
  assert.deepEqual(defaults, {
    userStatsTtlMs: 300_000,
    recentReadingsTtlMs: 60_000,
    hourlyStatsTtlMs: 3_600_000,
    maxEntries: 10_000,
  });
  const set = loadConfig({
    CACHE_USER_STATS_TTL: "30s",
    CACHE_RECENT_READINGS_TTL: "0",
    CACHE_HOURLY_STATS_TTL: "2h",
    CACHE_MAX_ENTRIES: "500",
  }).cache;
  assert.deepEqual(set, {
    userStatsTtlMs: 30_000,
    recentReadingsTtlMs: 0,
    hourlyStatsTtlMs: 7_200_000,
    maxEntries: 500,
  });
  try {
    loadConfig({
      CACHE_USER_STATS_TTL: "soon",
      CACHE_HOURLY_STATS_TTL: "2d",
      CACHE_MAX_ENTRIES: "0",
    });
    assert.fail("expected a ConfigError");
  } catch (error) {
    assert.ok(error instanceof ConfigError);
    assert.deepEqual(
      error.variables.sort(),
      ["CACHE_HOURLY_STATS_TTL", "CACHE_MAX_ENTRIES", "CACHE_USER_STATS_TTL"],
    );
  }
});

Deno.test("loadConfig() reads REDIS_URL or REDIS_CLUSTER_NODES with REDIS_PREFIX", () => {
  assert.equal(loadConfig({}).redis, undefined);
  assert.deepEqual(loadConfig({ REDIS_URL: "redis://:pw@cache:6380/2" }).redis, {
    spec: { mode: "single", url: "redis://:pw@cache:6380/2" },
    prefix: "gtx:",
  });
  assert.deepEqual(
    loadConfig({ REDIS_URL: "rediss://cache", REDIS_TLS_CA_PATH: "/ca.pem" }).redis?.spec.tls,
    { caPath: "/ca.pem" },
  );
  assert.deepEqual(
    loadConfig({
      REDIS_CLUSTER_NODES: "10.0.0.1:7000, 10.0.0.2:7001,[::1]:7002",
      REDIS_PASSWORD: "pw",
      REDIS_TLS: "true",
      REDIS_PREFIX: "grid.a:",
    }).redis,
    {
      spec: {
        mode: "cluster",
        nodes: [
          { host: "10.0.0.1", port: 7000 },
          { host: "10.0.0.2", port: 7001 },
          { host: "::1", port: 7002 },
        ],
        password: "pw",
        tls: {},
      },
      prefix: "grid.a:",
    },
  );
});

Deno.test("loadConfig() names the Redis variable that is wrong", () => {
  const cases: [Record<string, string>, string[], RegExp][] = [
    [{ REDIS_URL: "http://cache:6379" }, ["REDIS_URL"], /REDIS_URL: must be a redis:\/\//],
    [{ REDIS_URL: "redis://cache/db" }, ["REDIS_URL"], /REDIS_URL: /],
    [{ REDIS_CLUSTER_NODES: "a:1,b" }, ["REDIS_CLUSTER_NODES"], /host:port/],
    [{ REDIS_CLUSTER_NODES: "a:70000" }, ["REDIS_CLUSTER_NODES"], /host:port/],
    [{ REDIS_PREFIX: "{gtx}:" }, ["REDIS_PREFIX"], /REDIS_PREFIX: must be/],
    [
      { REDIS_URL: "redis://a", REDIS_CLUSTER_NODES: "a:7000" },
      ["REDIS_URL", "REDIS_CLUSTER_NODES"],
      /one or the other/,
    ],
    [
      { REDIS_URL: "redis://:secret-pw@a", REDIS_PASSWORD: "other-pw" },
      ["REDIS_PASSWORD"],
      /carries credentials/,
    ],
    [{ REDIS_URL: "redis://a", REDIS_TLS: "true" }, ["REDIS_TLS"], /rediss:\/\//],
    [{ REDIS_URL: "redis://a", REDIS_TLS_CA_PATH: "/ca" }, ["REDIS_TLS_CA_PATH"], /rediss/],
    [{ REDIS_CLUSTER_NODES: "a:1", REDIS_TLS_CA_PATH: "/ca" }, ["REDIS_TLS_CA_PATH"], /TLS/],
    [{ REDIS_PASSWORD: "pw" }, ["REDIS_PASSWORD"], /only with REDIS_URL or/],
  ];
  for (const [env, variables, message] of cases) {
    assert.throws(() => loadConfig(env), (error: unknown) => {
      assert.ok(error instanceof ConfigError, JSON.stringify(env));
      assert.deepEqual(error.variables, variables, JSON.stringify(env));
      assert.match(error.message, message);
      assert.ok(!/secret-pw|other-pw/.test(error.message), "no password in the message");
      return true;
    });
  }
});
