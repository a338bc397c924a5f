import assert from "node:assert/strict";
import { ManualClock } from "../core/clock.ts";
import { ADMIN, passwordFor, startTestGateway, type TestGateway } from "./_gateway.ts";

Deno.test("logins are limited per client address and answered 429 with Retry-After", async () => {
  await using gw = await startTestGateway({ env: { LOGIN_RATE_LIMIT: "3" } });
  // The harness logged in once already; two more fit in this minute.
  const attempt = (password: string) =>
    gw.request("POST", "/api/auth/login", { body: { email: ADMIN.email, password } });
  assert.equal((await attempt("wrong-password")).status, 401);
  assert.equal((await attempt(ADMIN.password)).status, 200);
  const limited = await attempt(ADMIN.password);
  assert.equal(limited.status, 429);
  assert.equal(limited.body.error.code, "rate_limited");
  const retryAfter = Number(limited.headers.get("retry-after"));
  assert.ok(retryAfter > 0 && retryAfter <= 60, `Retry-After ${retryAfter}`);
});

Deno.test("a login flood is answered 503 instead of queueing unbounded password checks", async () => {
  await using gw = await startTestGateway();
  const results = await Promise.all(
    // Distinct accounts, so that the per-account back-off does not answer first.
    Array.from({ length: 150 }, (_, i) =>
      gw.request("POST", "/api/auth/login", {
        body: { email: `nobody-${i}@example.com`, password: "wrong-password" },
      })),
  );
  const statuses = new Set(results.map((r) => r.status));
  assert.ok(statuses.has(503), `statuses: ${[...statuses]}`);
  assert.ok([...statuses].every((s) => s === 401 || s === 503), `statuses: ${[...statuses]}`);
  const refused = results.find((r) => r.status === 503)!;
  assert.equal(refused.body.error.code, "overloaded");
  assert.equal(refused.headers.get("retry-after"), "1");
});

/** A login through the in-process app, as if from `address`. */
async function loginFrom(
  gw: TestGateway,
  address: string,
  email: string,
  password: string,
): Promise<Response> {
  return await gw.gateway.app.request(
    "/api/auth/login",
    {
      method: "POST",
      headers: { "content-type": "application/json" },
      body: JSON.stringify({ email, password }),
    },
    { remoteAddr: { hostname: address, port: 40000, transport: "tcp" } },
  );
}

Deno.test("failed logins back an account off exponentially, whatever the address, never for good", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock, env: { LOGIN_RATE_LIMIT: "1000" } });
  const attacker = (i: number) => `203.0.113.${i}`;

  await t.step("five failures from five addresses are free; the sixth waits 1 s", async () => {
    for (let i = 0; i < 5; i++) {
      assert.equal((await loginFrom(gw, attacker(i), ADMIN.email, "guess-" + i)).status, 401);
    }
    const limited = await loginFrom(gw, attacker(9), ADMIN.email, "guess-9");
    assert.equal(limited.status, 429);
    assert.equal((await limited.json()).error.code, "rate_limited");
    assert.equal(limited.headers.get("retry-after"), "1");
  });

  await t.step("the waits double: 2 s, 4 s", async () => {
    clock.advance(1_000);
    assert.equal((await loginFrom(gw, attacker(10), ADMIN.email, "guess")).status, 401);
    const twice = await loginFrom(gw, attacker(11), ADMIN.email, "guess");
    assert.equal(twice.status, 429);
    assert.equal(twice.headers.get("retry-after"), "2");
    clock.advance(2_000);
    assert.equal((await loginFrom(gw, attacker(12), ADMIN.email, "guess")).status, 401);
    assert.equal(
      (await loginFrom(gw, attacker(13), ADMIN.email, "guess")).headers.get("retry-after"),
      "4",
    );
  });

  await t.step(
    "the real user from another address is held only until the wait passes",
    async () => {
      const early = await loginFrom(gw, "198.51.100.7", ADMIN.email, ADMIN.password);
      assert.equal(early.status, 429, "the account's wait applies to every address");
      clock.advance(4_000);
      const res = await loginFrom(gw, "198.51.100.7", ADMIN.email, ADMIN.password);
      assert.equal(res.status, 200);
      assert.equal(res.headers.get("cache-control"), "no-store");
    },
  );

  await t.step("a success resets the account; other accounts were never held", async () => {
    for (let i = 0; i < 5; i++) {
      assert.equal((await loginFrom(gw, attacker(20), ADMIN.email, "guess")).status, 401);
    }
    const other = await gw.createUser("bystander@limit.test");
    assert.ok(other.token);
  });

  await t.step("the wait is capped (15 min by default), not a lockout", async () => {
    for (let round = 0; round < 20; round++) {
      clock.advance(15 * 60_000);
      await loginFrom(gw, attacker(30), ADMIN.email, "guess");
    }
    const held = await loginFrom(gw, attacker(31), ADMIN.email, "guess");
    assert.equal(held.status, 429);
    assert.ok(Number(held.headers.get("retry-after")) <= 15 * 60);
    clock.advance(15 * 60_000);
    assert.equal((await loginFrom(gw, "198.51.100.7", ADMIN.email, ADMIN.password)).status, 200);
  });
});

Deno.test("device registrations are limited per account, not per address", async () => {
  await using gw = await startTestGateway({ env: { DEVICE_REGISTER_RATE_LIMIT: "2" } });
  const owner = await gw.createUser("owner@limit.test");
  const operator = await gw.createUser("operator@limit.test", "operator");
  const register = (token: string, meter: string, address: string) =>
    gw.gateway.app.request(
      "/api/admin/devices/register",
      {
        method: "POST",
        headers: { "content-type": "application/json", authorization: `Bearer ${token}` },
        body: JSON.stringify({ meter_id: meter, user_id: owner.id, algorithm: "hmac-sha256" }),
      },
      { remoteAddr: { hostname: address, port: 40000, transport: "tcp" } },
    );
  assert.equal((await register(operator.token, "lim-1", "203.0.113.1")).status, 201);
  assert.equal((await register(operator.token, "lim-2", "203.0.113.2")).status, 201);
  const third = await register(operator.token, "lim-3", "203.0.113.3");
  assert.equal(third.status, 429, "another address does not bypass the account's limit");
  assert.match((await third.json()).error.message, /per account/);
  // Another account behind the first address is not held by the operator's use.
  assert.equal((await register(gw.adminToken, "lim-4", "203.0.113.1")).status, 201);
});

Deno.test("logins refused as overloaded do not count against the account", async () => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock, env: { LOGIN_RATE_LIMIT: "100000" } });
  await gw.createUser("victim@limit.test");
  const junk = Array.from(
    { length: 150 },
    (_, i) => loginFrom(gw, `203.0.113.${i % 250}`, `junk-${i}@example.com`, "wrong-password"),
  );
  // Sent after the junk has filled the password-check queue: answered 503, never evaluated.
  const mine = Array.from(
    { length: 8 },
    () => loginFrom(gw, "198.51.100.7", "victim@limit.test", "a-wrong-guess"),
  );
  const results = await Promise.all([...junk, ...mine]);
  const statuses = await Promise.all(
    results.slice(150).map(async (r) => (await r.body?.cancel(), r.status)),
  );
  for (const r of results.slice(0, 150)) await r.body?.cancel();
  assert.ok(statuses.filter((s) => s === 503).length >= 5, `victim's statuses: ${statuses}`);
  const evaluated = statuses.filter((s) => s === 401).length;
  assert.ok(evaluated < 5, `only ${evaluated} of the victim's attempts were evaluated`);
  const res = await loginFrom(
    gw,
    "198.51.100.7",
    "victim@limit.test",
    passwordFor("victim@limit.test"),
  );
  assert.equal(res.status, 200, JSON.stringify(await res.json()));
});

Deno.test("a disabled account answers like a wrong password and keeps backing off", async () => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock, env: { LOGIN_RATE_LIMIT: "100000" } });
  const email = "disabled@limit.test";
  const user = await gw.createUser(email);
  const patched = await gw.request("PATCH", `/api/admin/users/${user.id}`, {
    token: gw.adminToken,
    body: { disabled: true },
  });
  assert.equal(patched.status, 200);
  const wrong = await loginFrom(gw, "198.51.100.8", email, "a-wrong-guess-1");
  const wrongBody = await wrong.json();
  for (let i = 0; i < 4; i++) {
    const right = await loginFrom(gw, "198.51.100.8", email, passwordFor(email));
    assert.equal(right.status, wrong.status);
    assert.deepEqual(await right.json(), wrongBody, "the right password tells nothing");
  }
  // Five failures: the right password did not reset the account's back-off.
  const held = await loginFrom(gw, "198.51.100.8", email, passwordFor(email));
  assert.equal(held.status, 429, JSON.stringify(await held.json()));
});
