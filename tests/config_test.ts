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
