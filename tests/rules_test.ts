import assert from "node:assert/strict";
import { checkKwh, checkTimestamp, collides, type RuleLimits } from "../core/rules.ts";
import { TokenBucket } from "../core/token_bucket.ts";
import { keyState } from "../core/device.ts";
import { readingId } from "../core/reading.ts";

const LIMITS: RuleLimits = {
  kwhMax: 100,
  maxAgeMs: 7 * 86_400_000,
  maxFutureMs: 5 * 60_000,
  dedupeWindowMs: 15 * 60_000,
};

Deno.test("checkKwh() accepts 0 < kwh <= max and keeps 4 decimals", () => {
  assert.equal(checkKwh("12.5", LIMITS), 125_000);
  assert.equal(checkKwh(12.5, LIMITS), 125_000);
  assert.equal(checkKwh("100", LIMITS), 1_000_000);
  assert.equal(checkKwh("0.00015", LIMITS), 2);
  for (const bad of ["0", "-1", "100.0001", "0.00001", "1e400"]) {
    const v = checkKwh(bad, LIMITS);
    assert.equal(typeof v === "object" && v.code, "kwh_out_of_range", bad);
  }
});

Deno.test("checkTimestamp() rejects readings older than 7 days or over 5 minutes ahead", () => {
  const now = Date.parse("2026-11-29T12:00:00Z");
  assert.equal(checkTimestamp(now - LIMITS.maxAgeMs, now, LIMITS), null);
  assert.equal(checkTimestamp(now - LIMITS.maxAgeMs - 1, now, LIMITS)?.code, "timestamp_too_old");
  assert.equal(checkTimestamp(now + 5 * 60_000, now, LIMITS), null);
  assert.equal(checkTimestamp(now + 5 * 60_000 + 1, now, LIMITS)?.code, "timestamp_in_future");
});

Deno.test("collides() is strict: exactly one window apart does not collide", () => {
  const w = LIMITS.dedupeWindowMs;
  assert.equal(collides(0, 0, w), true);
  assert.equal(collides(0, w - 1, w), true);
  assert.equal(collides(0, w, w), false);
  assert.equal(collides(w, 0, w), false);
});

Deno.test("TokenBucket allows the burst, then refills at its rate", () => {
  const config = { burst: 3, refillPerMs: 1 / 1000 };
  const bucket = new TokenBucket(config, 0);
  assert.equal(bucket.take(config, 0), 0);
  assert.equal(bucket.take(config, 0), 0);
  assert.equal(bucket.take(config, 0), 0);
  assert.equal(bucket.take(config, 0), 1000);
  assert.equal(bucket.take(config, 1000), 0);
  bucket.refund(config);
  assert.equal(bucket.take(config, 1000), 0);
  assert.ok(bucket.take(config, 1000) > 0);
});

Deno.test("keyState() marks keys due after the rotation age and expired after the grace", () => {
  const policy = { rotationMs: 1000, graceMs: 100 };
  const key = { created_at: 0, retired_at: null };
  assert.equal(keyState(key, 999, policy), "valid");
  assert.equal(keyState(key, 1000, policy), "due");
  assert.equal(keyState(key, 1100, policy), "expired");
  assert.equal(keyState({ created_at: 0, retired_at: 500 }, 599, policy), "valid");
  assert.equal(keyState({ created_at: 0, retired_at: 500 }, 600, policy), "expired");
});

Deno.test("readingId() is a UUID derived from the natural key", () => {
  const a = readingId("meter-1", 1000);
  assert.match(a, /^[0-9a-f]{8}-[0-9a-f]{4}-8[0-9a-f]{3}-[89ab][0-9a-f]{3}-[0-9a-f]{12}$/);
  assert.equal(readingId("meter-1", 1000), a);
  assert.notEqual(readingId("meter-1", 1001), a);
  assert.notEqual(readingId("meter-2", 1000), a);
});
