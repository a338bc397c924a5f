// End-to-end: hostile and malformed input over real HTTP. Every bad request gets a 4xx with the
// `{error: {code, message}}` body (never a 500), and afterwards the process is healthy and
// nothing accepted before is lost.
import { deepEqual, equal, match, ok } from "node:assert/strict";
import { Buffer } from "node:buffer";
import { sign } from "hono/jwt";
import { ManualClock } from "../core/clock.ts";
import {
  ADMIN,
  isoAgo,
  JWT_SECRET,
  signedReading,
  startTestGateway,
  type TestGateway,
} from "./_gateway.ts";

type Res = Awaited<ReturnType<TestGateway["request"]>>;

const MINUTE = 60_000;
const CODE_OF_STATUS: Record<number, string> = {
  400: "invalid_payload",
  401: "unauthorized",
  403: "forbidden",
  404: "not_found",
  413: "payload_too_large",
};

/** Asserts an error response: status, `{error: {code, message}}` and the code. */
function assertError(res: Res, status: number, code: string, what = ""): void {
  const shown = `${what ? `${what}: ` : ""}${res.status} ${JSON.stringify(res.body)}`;
  equal(res.status, status, `expected ${status} ${code}, got ${shown}`);
  ok(res.body !== null && typeof res.body === "object", `error body is not JSON: ${shown}`);
  match(res.headers.get("content-type") ?? "", /application\/json/, shown);
  equal(res.body.error?.code, code, `wrong code: ${shown}`);
  equal(typeof res.body.error.message, "string", `no message: ${shown}`);
  ok(res.body.error.message.length > 0, `empty message: ${shown}`);
}

/** Asserts one of several acceptable client errors (never 2xx, never 5xx). */
function assertClientError(res: Res, statuses: number[], what: string): void {
  ok(statuses.includes(res.status), `${what}: expected ${statuses}, got ${res.status}`);
  assertError(res, res.status, CODE_OF_STATUS[res.status], what);
}

function base64url(text: string): string {
  return Buffer.from(text).toString("base64url");
}

Deno.test("malformed, oversized and hostile requests get 4xx JSON errors and break nothing", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock, env: { HTTP_BODY_LIMIT: "1024" } });
  const user = await gw.createUser("target@bad.test");
  const { secret_hex } = await gw.registerMeter("bad-meter-1", user.id);
  const base = Date.now();
  const good = signedReading("bad-meter-1", secret_hex, isoAgo(60 * MINUTE, base), "9.5");

  // An access token that expired an hour ago (tokens are issued on the wall clock): the
  // admin's own claims, issued 2 h ago.
  const claims = JSON.parse(Buffer.from(gw.adminToken.split(".")[1], "base64url").toString());
  const issuedS = Math.floor(Date.now() / 1000) - 2 * 3_600;
  const expiredToken = await sign(
    { ...claims, iat: issuedS, exp: issuedS + 3_600 },
    JWT_SECRET,
    "HS256",
  );

  const submitRaw = (raw: BodyInit, contentType?: string, token = user.token) =>
    gw.request("POST", "/api/meters/submit-reading", {
      token,
      raw,
      headers: contentType === undefined ? {} : { "content-type": contentType },
    });
  const submitJson = (body: unknown) =>
    gw.request("POST", "/api/meters/submit-reading", { token: user.token, body });

  let accepted = "";
  await t.step("a good reading is accepted before the bad input starts", async () => {
    const res = await submitJson(good);
    equal(res.status, 201, JSON.stringify(res.body));
    accepted = res.body.id;
  });

  await t.step("malformed JSON is 400 invalid_payload", async () => {
    const bodies = [
      '{"meter_id": "bad-meter-1", ',
      "{",
      "not json at all",
      '{"meter_id": "bad-meter-1"}}',
      "{'meter_id': 'bad-meter-1'}",
      '{"meter_id": "bad-meter-1",}',
      "[".repeat(400) + "]".repeat(400),
    ];
    for (const raw of bodies) {
      assertError(await submitRaw(raw, "application/json"), 400, "invalid_payload", raw);
    }
  });

  await t.step("fields of the wrong type are 400 invalid_payload", async () => {
    const cases: Record<string, unknown>[] = [
      { ...good, kwh_amount: {} },
      { ...good, kwh_amount: { value: 1 } },
      { ...good, kwh_amount: true },
      { ...good, kwh_amount: null },
      { ...good, kwh_amount: [1.5] },
      { ...good, meter_id: 123 },
      { ...good, meter_id: ["bad-meter-1"] },
      { ...good, reading_timestamp: 1_700_000_000 },
      { ...good, reading_timestamp: null },
      { ...good, device_signature: 42 },
      { ...good, key_id: 7 },
    ];
    for (const body of cases) {
      assertError(await submitJson(body), 400, "invalid_payload", JSON.stringify(body));
    }
    // A JSON number too large for a double parses as Infinity.
    const infinite = JSON.stringify(good).replace('"9.5"', "1e400");
    assertError(await submitRaw(infinite, "application/json"), 400, "invalid_payload");
  });

  await t.step("unknown fields are rejected (strict) with 400 invalid_payload", async () => {
    assertError(await submitJson({ ...good, extra: 1 }), 400, "invalid_payload");
    assertError(await submitJson({ ...good, user_id: user.id }), 400, "invalid_payload");
    assertError(await submitJson({ ...good, minted: true }), 400, "invalid_payload");
    const proto = JSON.stringify(good).replace("{", '{"__proto__": {"role": "admin"}, ');
    assertError(await submitRaw(proto, "application/json"), 400, "invalid_payload", proto);
    const login = await gw.request("POST", "/api/auth/login", {
      body: { ...ADMIN, role: "admin" },
    });
    assertError(login, 400, "invalid_payload");
  });

  await t.step("a body over HTTP_BODY_LIMIT is 413 payload_too_large", async () => {
    const huge = { ...good, device_signature: "a".repeat(10 * 1024) };
    assertError(await submitJson(huge), 413, "payload_too_large");
    const login = await gw.request("POST", "/api/auth/login", {
      body: { email: ADMIN.email, password: "p".repeat(10 * 1024) },
    });
    assertError(login, 413, "payload_too_large");
    // Sent in chunks without a Content-Length, the limit still holds.
    const chunk = new TextEncoder().encode(" ".repeat(1024));
    let sent = 0;
    const stream = new ReadableStream<Uint8Array>({
      pull(controller) {
        if (sent++ < 10) controller.enqueue(chunk);
        else controller.close();
      },
    });
    const res = await fetch(`${gw.url}/api/meters/submit-reading`, {
      method: "POST",
      headers: { authorization: `Bearer ${user.token}`, "content-type": "application/json" },
      body: stream,
    });
    const body = await res.json();
    equal(res.status, 413, JSON.stringify(body));
    equal(body.error.code, "payload_too_large");
  });

  await t.step("SQL/NoSQL-looking strings and operator objects are 400, never 500", async () => {
    const cases: Record<string, unknown>[] = [
      { ...good, meter_id: "'; DROP TABLE meter_readings;--" },
      { ...good, meter_id: "bad-meter-1' OR '1'='1" },
      { ...good, meter_id: { $gt: "" } },
      { ...good, meter_id: { $ne: null } },
      { ...good, kwh_amount: "1; DROP TABLE meter_readings" },
      { ...good, kwh_amount: { $gt: 0 } },
      { ...good, reading_timestamp: "2026-01-01T00:00:00Z'; DELETE FROM users;--" },
      { ...good, reading_timestamp: { $gt: "" } },
      { ...good, device_signature: { $gt: "" } },
      { ...good, key_id: "' OR 1=1 --" },
      { ...good, key_id: { $regex: ".*" } },
    ];
    for (const body of cases) {
      assertError(await submitJson(body), 400, "invalid_payload", JSON.stringify(body));
    }
    // A string signature is well-formed input; it simply does not verify.
    const sig = await submitJson({ ...good, device_signature: "' OR '1'='1" });
    assertError(sig, 401, "bad_signature");
  });

  await t.step("hostile login credentials are 400 or 401, never 200 or 500", async () => {
    const attempts: unknown[] = [
      { email: { $gt: "" }, password: { $gt: "" } },
      { email: ADMIN.email, password: { $ne: null } },
      { email: { $ne: null }, password: ADMIN.password },
      { email: "' OR '1'='1", password: "' OR '1'='1" },
      { email: `${ADMIN.email}' --`, password: "x" },
      { email: ADMIN.email, password: "' OR '1'='1' --" },
      { email: ADMIN.email, password: "admin-password-1' OR 1=1 --" },
      { email: "admin@test.local\u0000", password: ADMIN.password },
      { email: ADMIN.email, password: "" },
      { email: ADMIN.email },
      {},
    ];
    for (const body of attempts) {
      const res = await gw.request("POST", "/api/auth/login", { body });
      assertClientError(res, [400, 401], JSON.stringify(body));
      equal(res.body.access_token, undefined);
    }
  });

  await t.step("hostile query strings and path parameters are 400, never 500", async () => {
    const garbageCursor = base64url(JSON.stringify(["x", { $gt: "" }]));
    const queries = [
      "meter_id=" + encodeURIComponent("' OR 1=1 --"),
      "meter_id=" + encodeURIComponent('{"$gt": ""}'),
      "cursor=not-a-cursor!",
      "cursor=" + garbageCursor,
      "cursor=" + base64url("\xff\xfe"),
      "limit=abc",
      "limit=0",
      "limit=100000",
      "from=yesterday",
      "to=" + encodeURIComponent("2026-01-01'; DROP TABLE x;--"),
      "order=sideways",
      "minted=maybe",
    ];
    for (const q of queries) {
      const res = await gw.request("GET", `/api/meters/readings?${q}`, { token: user.token });
      assertError(res, 400, "invalid_payload", q);
    }
    const rotate = await gw.request(
      "POST",
      `/api/admin/devices/${encodeURIComponent("' OR 1=1 --")}/rotate`,
      { token: gw.adminToken },
    );
    assertError(rotate, 400, "invalid_payload");
    // A hostile user_id is not a user id, for admins and users alike.
    const odd = encodeURIComponent("' OR 1=1 --");
    for (const token of [gw.adminToken, user.token]) {
      const stats = await gw.request("GET", `/api/meters/stats?user_id=${odd}`, { token });
      assertError(stats, 400, "invalid_payload");
    }
  });

  await t.step(
    "NUL bytes and dates no store can hold are 400, never 500 (PostgreSQL refuses both)",
    async () => {
      const nul = encodeURIComponent("\u0000");
      const gets = [
        `/api/meters/stats?user_id=${nul}`,
        `/api/admin/users/${nul}`,
        `/api/admin/devices?user_id=${nul}`,
        "/api/meters/readings?from=0000-01-01T00:00:00Z",
        `/api/meters/readings?to=${encodeURIComponent("9999-12-31T23:59:59-23:59")}`,
        "/api/meters/bad-meter-1/stats/hourly?start=0000-01-01T00:00:00Z&end=0000-01-02T00:00:00Z",
      ];
      for (const path of gets) {
        assertError(
          await gw.request("GET", path, { token: gw.adminToken }),
          400,
          "invalid_payload",
          path,
        );
      }
      const register = await gw.request("POST", "/api/admin/devices/register", {
        token: gw.adminToken,
        body: { meter_id: "bad-nul-1", user_id: "\u0000", algorithm: "hmac-sha256" },
      });
      assertError(register, 400, "invalid_payload");
      const revoke = await gw.request("POST", "/api/admin/devices/bad-meter-1/revoke", {
        token: gw.adminToken,
        body: { reason: "oops\u0000" },
      });
      assertError(revoke, 400, "invalid_payload");
      // Refused before anything changed: the meter still takes readings.
      const listed = await gw.request("GET", "/api/admin/devices?limit=1000", {
        token: gw.adminToken,
      });
      const device = listed.body.items.find((d: { meter_id: string }) =>
        d.meter_id === "bad-meter-1"
      );
      equal(device.status, "active");
    },
  );

  /** A valid reading whose meter id ends in a Latin-1 "é" (0xe9) instead of "1". */
  const latin1Reading = () => {
    const text = JSON.stringify(good);
    const bytes = new TextEncoder().encode(text);
    bytes[text.indexOf("bad-meter-1") + 10] = 0xe9;
    return bytes;
  };

  await t.step("a body that is not UTF-8 is 400 invalid_payload", async () => {
    const bodies = [
      new Uint8Array([0x7b, 0x22, 0xff, 0xfe, 0x22, 0x3a, 0x31, 0x7d]),
      // Overlong encoding of "/" and an encoded UTF-16 surrogate: both invalid UTF-8.
      new Uint8Array([0x7b, 0x22, 0xc0, 0xaf, 0x22, 0x3a, 0x31, 0x7d]),
      new Uint8Array([0x7b, 0x22, 0xed, 0xa0, 0x80, 0x22, 0x3a, 0x31, 0x7d]),
      latin1Reading(),
    ];
    for (const raw of bodies) {
      assertError(await submitRaw(raw, "application/json"), 400, "invalid_payload");
    }
    const login = await gw.request("POST", "/api/auth/login", {
      raw: new Uint8Array([0x7b, 0x22, 0x65, 0xff, 0x22, 0x7d]),
      headers: { "content-type": "application/json" },
    });
    assertError(login, 400, "invalid_payload");
  });

  await t.step("an empty body is 400 invalid_payload", async () => {
    assertError(await submitRaw("", "application/json"), 400, "invalid_payload");
    assertError(await submitRaw(""), 400, "invalid_payload");
    const login = await gw.request("POST", "/api/auth/login", {
      raw: "",
      headers: { "content-type": "application/json" },
    });
    assertError(login, 400, "invalid_payload");
  });

  await t.step("a body that is not declared as JSON is 400 invalid_payload", async () => {
    const json = JSON.stringify(good);
    assertError(await submitRaw(json, "text/plain"), 400, "invalid_payload", "text/plain");
    assertError(
      await submitRaw(
        new URLSearchParams({ meter_id: "bad-meter-1" }).toString(),
        "application/x-www-form-urlencoded",
      ),
      400,
      "invalid_payload",
      "form",
    );
    assertError(await submitRaw(json), 400, "invalid_payload", "no content type");
  });

  await t.step("a missing, garbage or expired bearer token is 401 unauthorized", async () => {
    const path = "/api/meters/readings";
    const future = Math.floor(Date.now() / 1000) + 3600;
    const forged = await sign(
      { sub: user.id, role: "admin", exp: future },
      "some-other-secret-some-other-secret-0123",
      "HS256",
    );
    const unsigned = `${base64url('{"alg":"none","typ":"JWT"}')}.${
      base64url(JSON.stringify({ sub: user.id, role: "admin", exp: future }))
    }.`;
    const [h, , s] = user.token.split(".");
    const tampered = `${h}.${base64url(JSON.stringify({ sub: user.id, role: "admin" }))}.${s}`;
    const headerSets: Record<string, string>[] = [
      {},
      { authorization: "" },
      { authorization: "Bearer" },
      { authorization: "Bearer " },
      { authorization: "Bearer garbage" },
      { authorization: "Bearer a.b.c" },
      { authorization: `Basic ${btoa(`${ADMIN.email}:${ADMIN.password}`)}` },
      { authorization: `Bearer ${expiredToken}` },
      { authorization: `Bearer ${forged}` },
      { authorization: `Bearer ${unsigned}` },
      { authorization: `Bearer ${tampered}` },
      { authorization: `Bearer ${user.token} extra` },
    ];
    for (const headers of headerSets) {
      const what = JSON.stringify(headers);
      assertError(await gw.request("GET", path, { headers }), 401, "unauthorized", what);
      const post = await gw.request("POST", "/api/meters/submit-reading", { headers, body: good });
      assertError(post, 401, "unauthorized", what);
    }
    const expired = await gw.request("GET", path, { token: expiredToken });
    match(expired.body.error.message, /expired/i);
    // The admin routes refuse them as well.
    const admin = await gw.request("GET", "/api/admin/devices", { token: forged });
    assertError(admin, 401, "unauthorized");
  });

  await t.step("an unknown route is 404 not_found as JSON", async () => {
    const attempts: [string, string, string | undefined][] = [
      ["GET", "/nope", undefined],
      ["GET", "/api/nope", undefined],
      ["POST", "/api/nope", user.token],
      ["GET", "/api/meters/nope", user.token],
      ["DELETE", "/api/meters/readings", user.token],
      ["GET", "/api/meters/submit-reading", user.token],
      ["GET", "/..%2f..%2fetc%2fpasswd", undefined],
    ];
    for (const [method, path, token] of attempts) {
      const res = await gw.request(method, path, { token });
      assertError(res, 404, "not_found", `${method} ${path}`);
    }
  });

  await t.step(
    "afterwards the process is healthy and the earlier reading is still listed",
    async () => {
      const health = await gw.request("GET", "/healthz");
      equal(health.status, 200);
      const ready = await gw.request("GET", "/readyz");
      equal(ready.status, 200, JSON.stringify(ready.body));
      const page = await gw.request("GET", "/api/meters/readings", { token: user.token });
      equal(page.status, 200);
      deepEqual(page.body.items.map((r: { id: string }) => r.id), [accepted]);
      const stats = await gw.request("GET", "/api/meters/stats", { token: user.token });
      equal(stats.body.reading_count, 1);
      equal(stats.body.total_kwh, 9.5);
      // And it still takes new readings.
      const next = signedReading("bad-meter-1", secret_hex, isoAgo(30 * MINUTE, base), "1");
      equal((await submitJson(next)).status, 201);
    },
  );
});
