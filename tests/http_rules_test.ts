// End-to-end: every rejection code of DESIGN.md §3 over real HTTP, each produced by the input
// that should produce it, with its status and the `{error: {code, message}}` body.
import { deepEqual, equal, match, notEqual, ok } from "node:assert/strict";
import { Buffer } from "node:buffer";
import { randomBytes } from "node:crypto";
import { ManualClock } from "../core/clock.ts";
import { canonicalMessage, signHmac } from "../core/signature.ts";
import { isoAgo, signedReading, startTestGateway, type TestGateway } from "./_gateway.ts";

type Res = Awaited<ReturnType<TestGateway["request"]>>;

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

/** Asserts an error response: status, `{error: {code, message}}` and the code. */
function assertError(res: Res, status: number, code: string, what = ""): void {
  const shown = `${what ? `${what}: ` : ""}${res.status} ${JSON.stringify(res.body)}`;
  equal(res.status, status, `expected ${status} ${code}, got ${shown}`);
  ok(res.body !== null && typeof res.body === "object", `error body is not JSON: ${shown}`);
  ok(res.body.error !== null && typeof res.body.error === "object", `no error object: ${shown}`);
  equal(res.body.error.code, code, `wrong code: ${shown}`);
  equal(typeof res.body.error.message, "string", `no message: ${shown}`);
  ok(res.body.error.message.length > 0, `empty message: ${shown}`);
}

/** Asserts a 201 and returns the stored reading. */
function assertStored(res: Res): Record<string, unknown> & { id: string } {
  equal(res.status, 201, `expected 201, got ${res.status} ${JSON.stringify(res.body)}`);
  equal(typeof res.body.id, "string");
  return res.body;
}

/** A positive integer number of seconds in a Retry-After header. */
function retryAfterSeconds(res: Res): number {
  const header = res.headers.get("retry-after");
  ok(header !== null, "Retry-After header is missing");
  match(header, /^\d+$/, `Retry-After is not whole seconds: ${header}`);
  const seconds = Number(header);
  ok(seconds >= 1, `Retry-After must be at least 1 second, got ${seconds}`);
  return seconds;
}

function submit(gw: TestGateway, token: string, body: unknown): Promise<Res> {
  return gw.request("POST", "/api/meters/submit-reading", { token, body });
}

function randomSecretHex(): string {
  return randomBytes(32).toString("hex");
}

Deno.test("each rule violation of a reading is rejected over HTTP with its own code and status", async (t) => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("alice@rules.test");
  const bob = await gw.createUser("bob@rules.test");
  const base = Date.now();
  /** Whole-second timestamp `minutes` before the start of the test. */
  const ago = (minutes: number) => isoAgo(minutes * MINUTE, base);

  await t.step("a structurally invalid submission is 400 invalid_payload", async () => {
    const { secret_hex } = await gw.registerMeter("rules-payload", alice.id);
    const good = signedReading("rules-payload", secret_hex, ago(10));
    const { device_signature: _, ...unsigned } = good;
    const cases: [string, unknown][] = [
      ["missing device_signature", unsigned],
      ["empty device_signature", { ...good, device_signature: "" }],
      ["missing meter_id", { ...good, meter_id: undefined }],
      ["empty meter_id", { ...good, meter_id: "" }],
      ["meter_id longer than 64 characters", { ...good, meter_id: "m".repeat(65) }],
      ["meter_id with a space", { ...good, meter_id: "meter 1" }],
      ["kwh_amount that is not a decimal", { ...good, kwh_amount: "twelve" }],
      ["kwh_amount with an exponent", { ...good, kwh_amount: "1e2" }],
      ["reading_timestamp that is not RFC 3339", { ...good, reading_timestamp: "yesterday" }],
      ["reading_timestamp without a zone", { ...good, reading_timestamp: "2026-01-01T10:00:00" }],
      ["reading_timestamp that is no real date", {
        ...good,
        reading_timestamp: "2026-13-45T99:99:99Z",
      }],
      ["malformed key_id", { ...good, key_id: "key id with spaces" }],
      ["an array instead of an object", [good]],
      ["a string instead of an object", "reading"],
      ["null", null],
    ];
    for (const [what, body] of cases) {
      const res = await submit(gw, alice.token, body);
      assertError(res, 400, "invalid_payload", what);
    }
    // The same reading, well formed, is accepted: the rejections above were about the shape.
    assertStored(await submit(gw, alice.token, good));
  });

  await t.step(
    "kwh_amount outside (0, KWH_MAX] is 422 kwh_out_of_range, more than 4 decimals 400",
    async () => {
      const meter = "rules-kwh";
      const { secret_hex } = await gw.registerMeter(meter, alice.id);
      const amounts: (string | number)[] = ["0", 0, "0.0000", "-1", -0.5, "100.0001", 100.0001];
      amounts.push("1000");
      let minutes = 60;
      for (const kwh of amounts) {
        const res = await submit(
          gw,
          alice.token,
          signedReading(meter, secret_hex, ago(minutes), kwh),
        );
        assertError(res, 422, "kwh_out_of_range");
        minutes += 15;
      }
      // Boundaries that are inside the range are stored, with at most 4 decimals kept.
      const top = assertStored(
        await submit(gw, alice.token, signedReading(meter, secret_hex, ago(20), "100")),
      );
      equal(top.kwh_amount, 100);
      const smallest = assertStored(
        await submit(gw, alice.token, signedReading(meter, secret_hex, ago(40), "0.0001")),
      );
      equal(smallest.kwh_amount, 0.0001);
      // More decimals than are stored would be rounded: refused (canonical form only).
      for (const kwh of ["0.00001", "0.00004", "12.34567"]) {
        const res = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(300), kwh));
        assertError(res, 400, "invalid_payload");
      }
      // A JSON number is accepted, signed in its JSON.stringify form.
      const numeric = assertStored(
        await submit(gw, alice.token, signedReading(meter, secret_hex, ago(330), 2.5)),
      );
      equal(numeric.kwh_amount, 2.5);
    },
  );

  await t.step("a reading 8 days old is 422 timestamp_too_old", async () => {
    const meter = "rules-old";
    const { secret_hex } = await gw.registerMeter(meter, alice.id);
    const res = await submit(gw, alice.token, signedReading(meter, secret_hex, isoAgo(8 * DAY)));
    assertError(res, 422, "timestamp_too_old");
    // Six days old is still inside the 7-day window.
    assertStored(await submit(gw, alice.token, signedReading(meter, secret_hex, isoAgo(6 * DAY))));
  });

  await t.step("a reading 10 minutes ahead is 422 timestamp_in_future", async () => {
    const meter = "rules-future";
    const { secret_hex } = await gw.registerMeter(meter, alice.id);
    const res = await submit(
      gw,
      alice.token,
      signedReading(meter, secret_hex, isoAgo(-10 * MINUTE)),
    );
    assertError(res, 422, "timestamp_in_future");
    // Three minutes ahead is tolerated (clock skew of devices, limit 5 minutes).
    assertStored(
      await submit(gw, alice.token, signedReading(meter, secret_hex, isoAgo(-3 * MINUTE))),
    );
  });

  await t.step(
    "a replay or a reading within ±15 minutes of a stored one is 409 duplicate with the stored id",
    async () => {
      const meter = "rules-dup";
      const { secret_hex } = await gw.registerMeter(meter, alice.id);
      const first = assertStored(
        await submit(gw, alice.token, signedReading(meter, secret_hex, ago(60), "2.5")),
      );

      const replay = await submit(
        gw,
        alice.token,
        signedReading(meter, secret_hex, ago(60), "2.5"),
      );
      assertError(replay, 409, "duplicate");
      equal(replay.body.error.details?.id, first.id);

      // A different amount at the same instant is still the same reading slot.
      const sameInstant = await submit(
        gw,
        alice.token,
        signedReading(meter, secret_hex, ago(60), "7"),
      );
      assertError(sameInstant, 409, "duplicate");
      equal(sameInstant.body.error.details?.id, first.id);

      const fiveLater = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(55)));
      assertError(fiveLater, 409, "duplicate");
      equal(fiveLater.body.error.details?.id, first.id);

      const tenEarlier = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(70)));
      assertError(tenEarlier, 409, "duplicate");
      equal(tenEarlier.body.error.details?.id, first.id);

      const justInside = isoAgo(45 * MINUTE + 1000, base); // 14 min 59 s after the first
      const inside = await submit(gw, alice.token, signedReading(meter, secret_hex, justInside));
      assertError(inside, 409, "duplicate");
      equal(inside.body.error.details?.id, first.id);

      // Exactly 15 minutes apart is outside the (strict) window, on both sides.
      const after = assertStored(
        await submit(gw, alice.token, signedReading(meter, secret_hex, ago(45))),
      );
      notEqual(after.id, first.id);
      assertStored(await submit(gw, alice.token, signedReading(meter, secret_hex, ago(75))));

      // The same instant written with a zone offset or milliseconds is refused: only the
      // canonical form is stored (so the stored reading shows what was signed).
      const hourAhead = new Date(Date.parse(ago(60)) + HOUR).toISOString().replace(/\.000Z$/, "");
      for (const sameInstant of [`${hourAhead}+01:00`, ago(60).replace("Z", ".000Z")]) {
        const res = await submit(gw, alice.token, signedReading(meter, secret_hex, sameInstant));
        assertError(res, 400, "invalid_payload");
      }

      const listed = await gw.request(
        "GET",
        `/api/meters/readings?meter_id=${meter}&order=asc`,
        { token: alice.token },
      );
      equal(listed.status, 200);
      deepEqual(
        listed.body.items.map((r: { reading_timestamp: string }) =>
          Date.parse(r.reading_timestamp)
        ),
        [ago(75), ago(60), ago(45)].map((s) => Date.parse(s)),
      );
    },
  );

  await t.step(
    "a replay of a reading the meter's actor no longer remembers is still 409 with the stored id",
    async () => {
      // RECENT_READINGS defaults to 8: the actor forgets the oldest of these 12, the store not.
      const meter = "rules-dup-old";
      const { secret_hex } = await gw.registerMeter(meter, alice.id);
      const ids: string[] = [];
      for (let i = 12; i >= 1; i--) {
        const res = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(i * 15)));
        ids[i] = assertStored(res).id;
      }
      const replay = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(180)));
      assertError(replay, 409, "duplicate");
      equal(replay.body.error.details?.id, ids[12]);
      const near = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(184)));
      assertError(near, 409, "duplicate");
      equal(near.body.error.details?.id, ids[12]);
      const between = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(172)));
      assertError(between, 409, "duplicate");
      ok([ids[12], ids[11]].includes(between.body.error.details?.id));
      // Exactly 15 minutes before the oldest is outside the window.
      assertStored(await submit(gw, alice.token, signedReading(meter, secret_hex, ago(195))));
      const listed = await gw.request("GET", `/api/meters/readings?meter_id=${meter}`, {
        token: alice.token,
      });
      equal(listed.body.items.length, 13);
    },
  );

  await t.step(
    "a meter nobody registered is 422 unknown_meter to an admin, 403 to a user",
    async () => {
      // A user gets the answer it gets for another user's meter: ids do not leak.
      const res = await submit(
        gw,
        alice.token,
        signedReading("rules-ghost", randomSecretHex(), ago(10)),
      );
      assertError(res, 403, "forbidden");
      const asAdmin = await submit(
        gw,
        gw.adminToken,
        signedReading("rules-ghost", randomSecretHex(), ago(10)),
      );
      assertError(asAdmin, 422, "unknown_meter");
    },
  );

  await t.step("a reading of a revoked meter is 403 device_revoked", async () => {
    const meter = "rules-revoked";
    const { secret_hex } = await gw.registerMeter(meter, alice.id);
    assertStored(await submit(gw, alice.token, signedReading(meter, secret_hex, ago(60))));
    const revoked = await gw.request("POST", `/api/admin/devices/${meter}/revoke`, {
      token: gw.adminToken,
      body: { reason: "stolen" },
    });
    equal(revoked.status, 200, JSON.stringify(revoked.body));
    equal(revoked.body.status, "revoked");
    const res = await submit(gw, alice.token, signedReading(meter, secret_hex, ago(30)));
    assertError(res, 403, "device_revoked");
  });

  await t.step(
    "a signature that does not verify, or names a key the meter lacks, is 401 bad_signature",
    async () => {
      const meter = "rules-sig";
      const { secret_hex, key_id } = await gw.registerMeter(meter, alice.id);
      const ts = ago(30);

      const otherSecret = await submit(
        gw,
        alice.token,
        signedReading(meter, randomSecretHex(), ts),
      );
      assertError(otherSecret, 401, "bad_signature");

      // Signed for 1.5 kWh, submitted as 15 kWh.
      const tampered = { ...signedReading(meter, secret_hex, ts, "1.5"), kwh_amount: "15" };
      assertError(await submit(gw, alice.token, tampered), 401, "bad_signature");

      // Signed for another timestamp.
      const moved = { ...signedReading(meter, secret_hex, ts), reading_timestamp: ago(90) };
      assertError(await submit(gw, alice.token, moved), 401, "bad_signature");

      const garbage = { ...signedReading(meter, secret_hex, ts), device_signature: "not-a-sig" };
      assertError(await submit(gw, alice.token, garbage), 401, "bad_signature");

      const unknownKey = signedReading(meter, secret_hex, ts, "1.5", { key_id: "k-no-such-key" });
      assertError(await submit(gw, alice.token, unknownKey), 401, "bad_signature");

      // The right key id with a correct signature, in base64url instead of hex, is accepted.
      const mac = signHmac(Buffer.from(secret_hex, "hex"), canonicalMessage(meter, ts, "1.5"));
      const good = {
        meter_id: meter,
        kwh_amount: "1.5",
        reading_timestamp: ts,
        key_id,
        device_signature: Buffer.from(mac, "hex").toString("base64url"),
      };
      const stored = assertStored(await submit(gw, alice.token, good));
      equal(stored.key_id, key_id);
    },
  );

  await t.step("a user submitting for another user's meter is 403 forbidden", async () => {
    const meter = "rules-owned-by-alice";
    const { secret_hex } = await gw.registerMeter(meter, alice.id);
    const body = signedReading(meter, secret_hex, ago(30));
    assertError(await submit(gw, bob.token, body), 403, "forbidden");
    // The reading itself is fine: its owner gets it stored.
    const stored = assertStored(await submit(gw, alice.token, body));
    equal(stored.user_id, alice.id);
    // An operator is not the owner either; an admin may submit for any meter (rule 4).
    const operator = await gw.createUser("operator@rules.test", "operator");
    const next = signedReading(meter, secret_hex, ago(90));
    assertError(await submit(gw, operator.token, next), 403, "forbidden");
    const byAdmin = assertStored(await submit(gw, gw.adminToken, next));
    equal(byAdmin.user_id, alice.id);
  });
});

Deno.test("a reading_timestamp naming a day or hour that does not exist is 400 invalid_payload", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock });
  // Tokens are checked against real time, so every login happens before the clock moves.
  const user = await gw.createUser("calendar@rules.test");
  const meter = "rules-calendar";
  const { secret_hex } = await gw.registerMeter(meter, user.id);
  // A past year, so the gateway's clock stays before the key's creation (never "due").
  const year = new Date().getUTCFullYear() - 1;
  /** Submits `ts` with the gateway's clock 5 minutes after the instant `Date.parse` reads. */
  const submitAt = (ts: string) => {
    clock.set(Date.parse(ts) + 5 * MINUTE);
    return submit(gw, user.token, signedReading(meter, secret_hex, ts));
  };

  await t.step("a real date is stored (control)", async () => {
    assertStored(await submitAt(`${year}-05-15T10:00:00Z`));
  });

  const impossible: [string, string][] = [
    ["February 30", `${year}-02-30T10:00:00Z`],
    ["April 31", `${year}-04-31T10:00:00Z`],
    ["hour 24", `${year}-06-15T24:00:00Z`],
  ];
  for (const [what, ts] of impossible) {
    await t.step(`${what} (${ts}) is rejected as invalid_payload, not stored`, async () => {
      assertError(await submitAt(ts), 400, "invalid_payload");
    });
  }
});

Deno.test("a key older than DEVICE_KEY_ROTATION_DAYS plus grace is rejected with 401 key_expired", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock });
  // Tokens are checked against real time, so every login happens before the clock moves.
  const user = await gw.createUser("keys@rules.test");
  const meter = "rules-expiring";
  const { secret_hex, key_id } = await gw.registerMeter(meter, user.id);
  const nearNow = (minutesAgo: number) => isoAgo(minutesAgo * MINUTE, clock.now());
  const keyOf = async () => {
    const res = await gw.request("GET", `/api/admin/devices?user_id=${user.id}`, {
      token: gw.adminToken,
    });
    equal(res.status, 200);
    const device = res.body.items.find((d: { meter_id: string }) => d.meter_id === meter);
    ok(device, "device not listed");
    return device;
  };

  await t.step("a fresh key verifies", async () => {
    assertStored(await submit(gw, user.token, signedReading(meter, secret_hex, nearNow(1))));
  });

  await t.step("a key past 90 days is due but still verifies during the grace period", async () => {
    clock.advance(90 * DAY + MINUTE);
    assertStored(await submit(gw, user.token, signedReading(meter, secret_hex, nearNow(1))));
    const device = await keyOf();
    equal(device.rotation_due, true);
    equal(device.keys[0].state, "due");
  });

  await t.step(
    "past 90 days plus 24 h of grace the correct signature is 401 key_expired",
    async () => {
      clock.advance(DAY);
      const res = await submit(gw, user.token, signedReading(meter, secret_hex, nearNow(1)));
      assertError(res, 401, "key_expired");
      const withKeyId = signedReading(meter, secret_hex, nearNow(2), "1.5", { key_id });
      assertError(await submit(gw, user.token, withKeyId), 401, "key_expired");
      // A wrong signature is still told apart from an expired key.
      const wrong = await submit(
        gw,
        user.token,
        signedReading(meter, randomSecretHex(), nearNow(3)),
      );
      assertError(wrong, 401, "bad_signature");
      equal((await keyOf()).keys[0].state, "expired");
    },
  );

  await t.step("after a rotation the new key verifies and the expired one does not", async () => {
    const rotated = await gw.request("POST", `/api/admin/devices/${meter}/rotate`, {
      token: gw.adminToken,
    });
    equal(rotated.status, 200, JSON.stringify(rotated.body));
    notEqual(rotated.body.key_id, key_id);
    const stored = assertStored(
      await submit(gw, user.token, signedReading(meter, rotated.body.secret_hex, nearNow(1))),
    );
    equal(stored.key_id, rotated.body.key_id);
    const old = await submit(gw, user.token, signedReading(meter, secret_hex, nearNow(20)));
    equal(old.status, 401, JSON.stringify(old.body));
    ok(["bad_signature", "key_expired"].includes(old.body.error.code), old.body.error.code);
  });
});

Deno.test("a meter that exceeds its token bucket gets 429 rate_limited with a truthful Retry-After", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({
    clock,
    env: { METER_RATE_BURST: "3", METER_RATE_PER_MINUTE: "1" },
  });
  const user = await gw.createUser("burst@rules.test");
  const meter = "rules-burst";
  const { secret_hex } = await gw.registerMeter(meter, user.id);
  const start = clock.now();
  const at = (minutesAgo: number) => isoAgo(minutesAgo * MINUTE, start);
  let retryAfter = 0;

  await t.step("the burst of 3 is stored and the 4th reading is 429 with Retry-After", async () => {
    for (const minutes of [120, 105, 90]) {
      assertStored(await submit(gw, user.token, signedReading(meter, secret_hex, at(minutes))));
    }
    const res = await submit(gw, user.token, signedReading(meter, secret_hex, at(75)));
    assertError(res, 429, "rate_limited");
    retryAfter = retryAfterSeconds(res);
    ok(retryAfter <= 60, `one token per minute refills within 60 s, Retry-After ${retryAfter}`);
    const again = await submit(gw, user.token, signedReading(meter, secret_hex, at(60)));
    assertError(again, 429, "rate_limited");
  });

  await t.step(
    "a replay of a stored reading is still reported as a duplicate, not throttled",
    async () => {
      const res = await submit(gw, user.token, signedReading(meter, secret_hex, at(120)));
      assertError(res, 409, "duplicate");
    },
  );

  await t.step("another meter has its own bucket", async () => {
    const other = await gw.registerMeter("rules-burst-other", user.id);
    assertStored(
      await submit(gw, user.token, signedReading("rules-burst-other", other.secret_hex, at(75))),
    );
  });

  await t.step("after Retry-After seconds the meter may submit again", async () => {
    clock.advance(retryAfter * 1000);
    assertStored(await submit(gw, user.token, signedReading(meter, secret_hex, at(75))));
    assertError(
      await submit(gw, user.token, signedReading(meter, secret_hex, at(45))),
      429,
      "rate_limited",
    );
  });
});

Deno.test("a full writer queue answers 503 overloaded with Retry-After and loses nothing it accepted", async (t) => {
  await using gw = await startTestGateway({
    env: { WRITER_QUEUE_MAX: "1", WRITER_FLUSH_MS: "200" },
  });
  const user = await gw.createUser("busy@rules.test");
  const meters: { meter: string; secret: string }[] = [];
  for (let i = 0; i < 8; i++) {
    const meter = `rules-busy-${i}`;
    meters.push({ meter, secret: (await gw.registerMeter(meter, user.id)).secret_hex });
  }
  const ts = isoAgo(10 * MINUTE);

  // Activate every meter's actor with a rejected reading, so the burst below is decided at once.
  for (const { meter, secret } of meters) {
    assertError(
      await submit(gw, user.token, signedReading(meter, secret, ts, "0")),
      422,
      "kwh_out_of_range",
    );
  }

  const results = await Promise.all(
    meters.map(({ meter, secret }) => submit(gw, user.token, signedReading(meter, secret, ts))),
  );
  const accepted = results.filter((r) => r.status === 201);
  const refused = results.filter((r) => r.status === 503);

  await t.step("at least one submission is 503 overloaded with Retry-After", () => {
    for (const r of results) {
      ok([201, 503].includes(r.status), `unexpected ${r.status} ${JSON.stringify(r.body)}`);
    }
    ok(refused.length >= 1, "no submission was refused with a queue of 1");
    ok(accepted.length >= 1, "no submission was accepted");
    for (const r of refused) {
      assertError(r, 503, "overloaded");
      retryAfterSeconds(r);
    }
  });

  await t.step("every 201 reading is listed, and no refused one is", async () => {
    const listed = await gw.request("GET", "/api/meters/readings?limit=100", { token: user.token });
    equal(listed.status, 200);
    const ids = new Set(listed.body.items.map((r: { id: string }) => r.id));
    for (const r of accepted) ok(ids.has(r.body.id), `accepted reading ${r.body.id} is missing`);
    equal(ids.size, accepted.length);
  });

  await t.step("a refused reading may be retried and is then stored", async () => {
    const storedMeters = new Set(accepted.map((r) => r.body.meter_id));
    for (const { meter, secret } of meters.filter((m) => !storedMeters.has(m.meter))) {
      assertStored(await submit(gw, user.token, signedReading(meter, secret, ts)));
    }
    const stats = await gw.request("GET", "/api/meters/stats", { token: user.token });
    equal(stats.status, 200);
    equal(stats.body.reading_count, meters.length);
  });
});

Deno.test("the third device registration in a minute from one address gets 429 with Retry-After", async (t) => {
  await using gw = await startTestGateway({ env: { DEVICE_REGISTER_RATE_LIMIT: "2" } });
  const user = await gw.createUser("fleet@rules.test");
  const register = (meterId: string) =>
    gw.request("POST", "/api/admin/devices/register", {
      token: gw.adminToken,
      body: { meter_id: meterId, user_id: user.id, algorithm: "hmac-sha256" },
    });

  await t.step("two registrations are accepted", async () => {
    equal((await register("rules-reg-1")).status, 201);
    equal((await register("rules-reg-2")).status, 201);
  });

  await t.step("the third is 429 rate_limited with Retry-After of at most a minute", async () => {
    const res = await register("rules-reg-3");
    assertError(res, 429, "rate_limited");
    ok(retryAfterSeconds(res) <= 60);
    const bulk = await gw.request("POST", "/api/admin/devices/import", {
      token: gw.adminToken,
      body: { devices: [{ meter_id: "rules-reg-4", user_id: user.id }] },
    });
    assertError(bulk, 429, "rate_limited");
  });

  await t.step("the refused meters were not registered", async () => {
    for (const meter of ["rules-reg-3", "rules-reg-4"]) {
      const res = await submit(
        gw,
        user.token,
        signedReading(meter, randomSecretHex(), isoAgo(MINUTE)),
      );
      assertError(res, 403, "forbidden");
    }
    const asAdmin = await submit(
      gw,
      gw.adminToken,
      signedReading("rules-reg-3", randomSecretHex(), isoAgo(MINUTE)),
    );
    assertError(asAdmin, 422, "unknown_meter");
  });
});
