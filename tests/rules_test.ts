import { createHash } from "node:crypto";
import assert from "node:assert/strict";
import {
  checkKwh,
  checkTimestamp,
  checkTimestampForm,
  collides,
  type RuleLimits,
} from "../core/rules.ts";
import { TokenBucket } from "../core/token_bucket.ts";
import { keyState, rotateKeys, type StoredKey } from "../core/device.ts";
import { isoUtc, isRealDateTime, readingId, readingTimestamp } from "../core/reading.ts";

const LIMITS: RuleLimits = {
  kwhMax: 100,
  maxAgeMs: 7 * 86_400_000,
  maxFutureMs: 5 * 60_000,
  dedupeWindowMs: 15 * 60_000,
};

Deno.test("checkKwh() accepts 0 < kwh <= max in canonical form, exactly", () => {
  assert.equal(checkKwh("12.5", LIMITS), 125_000);
  assert.equal(checkKwh(12.5, LIMITS), 125_000);
  assert.equal(checkKwh("100", LIMITS), 1_000_000);
  assert.equal(checkKwh("0.0001", LIMITS), 1);
  assert.equal(checkKwh("99.9999", LIMITS), 999_999);
  assert.equal(checkKwh(0.3, LIMITS), 3_000);
  for (const bad of ["0", "-1", "100.0001", "1e400", 0, -0.5]) {
    const v = checkKwh(bad, LIMITS);
    assert.equal(typeof v === "object" && v.code, "kwh_out_of_range", String(bad));
  }
  // Anything but the shortest decimal with at most 4 decimals would be stored as another text.
  const variants: (string | number)[] = [
    "0.00015",
    "0.00005",
    "12.50",
    "012.5",
    "+12.5",
    "12.",
    ".5",
    "1e1",
    1e-5,
    0.1 + 0.2,
  ];
  for (const bad of variants) {
    const v = checkKwh(bad, LIMITS);
    assert.equal(typeof v === "object" && v.code, "invalid_payload", String(bad));
    assert.match((v as { message: string }).message, /canonical form/);
  }
  // Every accepted value renders (as the API shows it) to the text that was signed.
  for (let e4 = 1; e4 <= 1_000_000; e4 += 7) {
    const text = JSON.stringify(e4 / 10_000);
    assert.equal(checkKwh(text, LIMITS), e4, text);
  }
});

Deno.test("checkTimestampForm() takes UTC whole seconds only, as readingTimestamp() renders", () => {
  assert.equal(checkTimestampForm("2026-11-29T10:15:00Z"), null);
  for (
    const bad of [
      "2026-11-29T10:15:00.000Z",
      "2026-11-29T10:15:00.5Z",
      "2026-11-29T17:15:00+07:00",
      "2026-11-29T10:15:00+00:00",
      "2026-11-29t10:15:00z",
      "2026-11-29 10:15:00Z",
    ]
  ) {
    assert.equal(checkTimestampForm(bad)?.code, "invalid_payload", bad);
  }
  const ms = Date.parse("2026-11-29T10:15:00Z");
  assert.equal(readingTimestamp(ms), "2026-11-29T10:15:00Z");
  // A row stored before the rule, with milliseconds, keeps them.
  assert.equal(readingTimestamp(ms + 5), "2026-11-29T10:15:00.005Z");
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
  // Ids already stored must never change: pinned to the published derivation.
  assert.equal(
    readingId("meter-1", Date.parse("2026-11-29T10:15:00Z")),
    referenceId("meter-1", Date.parse("2026-11-29T10:15:00Z")),
  );
  for (let i = 0; i < 50; i++) {
    assert.equal(readingId(`m-${i}`, i * 977), referenceId(`m-${i}`, i * 977));
  }
});

/** The id derivation written with node:crypto, as the README states it. */
function referenceId(meterId: string, ts: number): string {
  const h = createHash("sha256").update(`${meterId}\n${ts}`).digest();
  h[6] = (h[6] & 0x0f) | 0x80;
  h[8] = (h[8] & 0x3f) | 0x80;
  const x = h.toString("hex", 0, 16);
  return `${x.slice(0, 8)}-${x.slice(8, 12)}-${x.slice(12, 16)}-${x.slice(16, 20)}-${x.slice(20)}`;
}

Deno.test("isRealDateTime() knows the calendar", () => {
  const real = [
    "2024-02-29T00:00:00Z",
    "2000-02-29T12:00:00+02:00",
    "2026-12-31T23:59:59.999Z",
    "2026-04-30t00:00:00z",
    "2026-11-29 10:15:00Z",
  ];
  const unreal = [
    "2023-02-29T00:00:00Z",
    "1900-02-29T00:00:00Z",
    "2026-04-31T00:00:00Z",
    "2026-13-01T00:00:00Z",
    "2026-00-10T00:00:00Z",
    "2026-01-00T00:00:00Z",
    "2026-01-01T24:00:00Z",
    "2026-01-01T23:60:00Z",
    "2026-01-01T23:59:60Z",
    "2026-1-01T00:00:00Z",
    "abcd-01-01T00:00:00Z",
    "",
  ];
  for (const text of real) assert.equal(isRealDateTime(text), true, text);
  for (const text of unreal) assert.equal(isRealDateTime(text), false, text);
  // Every day of a leap and a common year agrees with the Date-based definition.
  for (const year of [2023, 2024]) {
    for (let month = 1; month <= 12; month++) {
      for (let day = 1; day <= 31; day++) {
        const text = `${year}-${String(month).padStart(2, "0")}-${
          String(day).padStart(2, "0")
        }T06:30:00Z`;
        const expected = new Date(Date.UTC(year, month, 0)).getUTCDate() >= day;
        assert.equal(isRealDateTime(text), expected, text);
      }
    }
  }
});

Deno.test("rotateKeys() keeps only the previous key, with a shortened grace or none", () => {
  const policy = { rotationMs: 90 * 86_400_000, graceMs: 86_400_000 };
  const key = (id: string, at: number): StoredKey => ({
    key_id: id,
    algorithm: "hmac-sha256",
    secret_enc: "x",
    created_at: at,
    retired_at: null,
  });
  let keys = [key("k1", 0)];
  for (let i = 2; i <= 5; i++) keys = rotateKeys(keys, key(`k${i}`, i), i, { policy });
  assert.deepEqual(keys.map((k) => k.key_id), ["k4", "k5"]);
  assert.equal(keys[0].retired_at, 5);
  assert.equal(keyState(keys[0], 5 + policy.graceMs - 1, policy), "valid");

  const short = rotateKeys(keys, key("k6", 6), 6, { policy, graceMs: 60_000 });
  assert.deepEqual(short.map((k) => [k.key_id, k.grace_ms]), [["k5", 60_000], ["k6", undefined]]);
  assert.equal(keyState(short[0], 6 + 59_999, policy), "valid");
  assert.equal(keyState(short[0], 6 + 60_000, policy), "expired");

  assert.deepEqual(
    rotateKeys(keys, key("k6", 6), 6, { policy, graceMs: 0 }).map((k) => k.key_id),
    ["k6"],
  );
});

Deno.test("isoUtc() formats exactly as Date#toISOString", () => {
  const edges = [
    0,
    1,
    999,
    86_399_999,
    951_782_400_000,
    4_107_542_399_999,
    253_402_300_799_999,
    253_402_300_800_000,
    -1,
    -86_400_000,
  ];
  for (const ms of edges) assert.equal(isoUtc(ms), new Date(ms).toISOString(), String(ms));
  for (let i = 0; i < 20_000; i++) {
    const ms = Math.floor(Math.random() * 253_402_300_800_000);
    assert.equal(isoUtc(ms), new Date(ms).toISOString(), String(ms));
  }
});
