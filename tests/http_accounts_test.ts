// Accounts and tokens (issue #10): rights end when they are taken away, on every instance.
import assert from "node:assert/strict";
import { Buffer } from "node:buffer";
import { sign } from "hono/jwt";
import { LocalBus } from "../bus/local_bus.ts";
import { ManualClock } from "../core/clock.ts";
import { GatewayError } from "../core/errors.ts";
import { jsonLogger } from "../core/logger.ts";
import { hashPassword } from "../core/password.ts";
import { KvStore } from "../db/kv_store.ts";
import { TokenService } from "../services/tokens.ts";
import { UserService } from "../services/users.ts";
import { UserStateCache } from "../services/user_state.ts";
import { ADMIN, JWT_SECRET, passwordFor, startTestGateway } from "./_gateway.ts";

const CHEAP = { N: 1024, r: 8, p: 1 };

Deno.test("a changed, disabled or deleted account's tokens are refused at once", async (t) => {
  await using gw = await startTestGateway();
  const me = async (token: string) =>
    (await gw.request("GET", "/api/meters/readings", { token })).status;

  await t.step("a demoted admin's token cannot create an admin", async () => {
    const second = await gw.createUser("second-admin@accounts.test", "admin");
    const made = await gw.request("POST", "/api/admin/users", {
      token: second.token,
      body: { email: "made@accounts.test", password: "built-by-second-1", role: "user" },
    });
    assert.equal(made.status, 201, "the admin's token works before the change");
    const demoted = await gw.request("PATCH", `/api/admin/users/${second.id}`, {
      token: gw.adminToken,
      body: { role: "user" },
    });
    assert.equal(demoted.status, 200, JSON.stringify(demoted.body));
    assert.equal(demoted.body.role, "user");
    assert.equal(demoted.body.disabled, false);
    assert.ok(!("token_generation" in demoted.body) && !("password_hash" in demoted.body));
    const res = await gw.request("POST", "/api/admin/users", {
      token: second.token,
      body: { email: "evil@accounts.test", password: "evil-admin-pass-1", role: "admin" },
    });
    assert.equal(res.status, 401, JSON.stringify(res.body));
    assert.equal(res.body.error.code, "unauthorized");
    assert.equal(await me(second.token), 401, "not even as a user");
    // Logging in again gives a token with the new role.
    const fresh = await gw.login(
      "second-admin@accounts.test",
      passwordFor("second-admin@accounts.test"),
    );
    assert.equal(await me(fresh), 200);
    const forbidden = await gw.request("POST", "/api/admin/users", {
      token: fresh,
      body: { email: "evil@accounts.test", password: "evil-admin-pass-1", role: "admin" },
    });
    assert.equal(forbidden.status, 403);
  });

  await t.step("a disabled user's token is refused and it cannot log in", async () => {
    const user = await gw.createUser("disabled@accounts.test");
    assert.equal(await me(user.token), 200);
    const res = await gw.request("PATCH", `/api/admin/users/${user.id}`, {
      token: gw.adminToken,
      body: { disabled: true },
    });
    assert.equal(res.status, 200);
    assert.equal(res.body.disabled, true);
    assert.equal(await me(user.token), 401);
    const login = await gw.request("POST", "/api/auth/login", {
      body: { email: "disabled@accounts.test", password: passwordFor("disabled@accounts.test") },
    });
    assert.equal(login.status, 401);
    // Exactly like a wrong password: the answer does not confirm the guess.
    assert.equal(login.body.error.message, "Email or password is wrong");
    await gw.request("PATCH", `/api/admin/users/${user.id}`, {
      token: gw.adminToken,
      body: { disabled: false },
    });
    assert.equal(await me(user.token), 401, "re-enabling does not revive old tokens");
    assert.equal(
      await me(await gw.login("disabled@accounts.test", passwordFor("disabled@accounts.test"))),
      200,
    );
  });

  await t.step("a deleted user's token is refused", async () => {
    const user = await gw.createUser("deleted@accounts.test");
    assert.equal(await me(user.token), 200);
    const res = await gw.request("DELETE", `/api/admin/users/${user.id}`, { token: gw.adminToken });
    assert.equal(res.status, 204);
    assert.equal(await me(user.token), 401);
    const again = await gw.request("DELETE", `/api/admin/users/${user.id}`, {
      token: gw.adminToken,
    });
    assert.equal(again.status, 404);
    const get = await gw.request("GET", `/api/admin/users/${user.id}`, { token: gw.adminToken });
    assert.equal(get.status, 404);
  });

  await t.step("a user owning active meters is not deleted until they are revoked", async () => {
    const user = await gw.createUser("owner@accounts.test");
    await gw.registerMeter("owned-meter-1", user.id);
    await gw.registerMeter("owned-meter-2", user.id);
    const del = () => gw.request("DELETE", `/api/admin/users/${user.id}`, { token: gw.adminToken });
    const refused = await del();
    assert.equal(refused.status, 409, JSON.stringify(refused.body));
    assert.equal(refused.body.error.code, "conflict");
    assert.match(refused.body.error.message, /2 meters .*revoke or re-register/);
    assert.equal(await me(user.token), 200, "the refused delete changed nothing");
    for (const meter of ["owned-meter-1", "owned-meter-2"]) {
      const res = await gw.request("POST", `/api/admin/devices/${meter}/revoke`, {
        token: gw.adminToken,
      });
      assert.equal(res.status, 200, JSON.stringify(res.body));
    }
    assert.equal((await del()).status, 204);
    assert.equal(await me(user.token), 401);
  });

  await t.step("logout ends every token of the account", async () => {
    const user = await gw.createUser("logout@accounts.test");
    const other = await gw.login("logout@accounts.test", passwordFor("logout@accounts.test"));
    const res = await gw.request("POST", "/api/auth/logout", { token: user.token });
    assert.equal(res.status, 204);
    assert.equal(await me(user.token), 401);
    assert.equal(await me(other), 401, "the other session ends too");
    assert.equal(
      await me(await gw.login("logout@accounts.test", passwordFor("logout@accounts.test"))),
      200,
    );
  });

  await t.step("a bad PATCH body is 400 and an unknown id 404", async () => {
    const user = await gw.createUser("patch@accounts.test");
    for (const body of [{}, { role: "root" }, { disabled: "yes" }, { email: "x@y.z" }]) {
      const res = await gw.request("PATCH", `/api/admin/users/${user.id}`, {
        token: gw.adminToken,
        body,
      });
      assert.equal(res.status, 400, JSON.stringify(body));
    }
    const res = await gw.request("PATCH", "/api/admin/users/nobody", {
      token: gw.adminToken,
      body: { disabled: true },
    });
    assert.equal(res.status, 404);
    assert.equal(await me(user.token), 200, "refused changes end nothing");
  });
});

Deno.test("the last active admin cannot demote, disable or delete itself (409)", async () => {
  await using gw = await startTestGateway();
  const self = await gw.request("GET", "/api/admin/users/" + adminId(gw.adminToken), {
    token: gw.adminToken,
  });
  assert.equal(self.status, 200);
  const id = self.body.id;
  for (
    const [method, body] of [
      ["PATCH", { role: "operator" }],
      ["PATCH", { disabled: true }],
      ["DELETE", undefined],
    ] as const
  ) {
    const res = await gw.request(method, `/api/admin/users/${id}`, { token: gw.adminToken, body });
    assert.equal(res.status, 409, `${method} ${JSON.stringify(body)}: ${JSON.stringify(res.body)}`);
    assert.equal(res.body.error.code, "conflict");
  }
  const check = await gw.request("GET", "/api/admin/users/" + id, { token: gw.adminToken });
  assert.equal(check.status, 200, "the admin's token still works");
  // With a second admin, the first may step down.
  await gw.createUser("deputy@accounts.test", "admin");
  const res = await gw.request("PATCH", `/api/admin/users/${id}`, {
    token: gw.adminToken,
    body: { role: "operator" },
  });
  assert.equal(res.status, 200);
});

function adminId(token: string): string {
  return JSON.parse(Buffer.from(token.split(".")[1], "base64url").toString()).sub;
}

Deno.test("a password change needs the current password, ends old tokens and returns a new one", async () => {
  await using gw = await startTestGateway();
  const other = await gw.login(ADMIN.email, ADMIN.password);
  const change = (token: string, current: string, next: string) =>
    gw.request("POST", "/api/auth/password", {
      token,
      body: { current_password: current, new_password: next },
    });

  const wrong = await change(gw.adminToken, "not-the-password", "brand-new-password-1");
  assert.equal(wrong.status, 401);
  for (const weak of ["12345678", "        ", "short-pw", "123456789012", "aaaaaaaaaaaaaaaa"]) {
    const res = await change(gw.adminToken, ADMIN.password, weak);
    assert.equal(res.status, 400, `${JSON.stringify(weak)}: ${JSON.stringify(res.body)}`);
  }
  const res = await change(gw.adminToken, ADMIN.password, "brand-new-password-1");
  assert.equal(res.status, 200, JSON.stringify(res.body));
  assert.equal(res.headers.get("cache-control"), "no-store");
  const token = res.body.access_token;
  const readings = (t: string) => gw.request("GET", "/api/meters/readings", { token: t });
  assert.equal((await readings(token)).status, 200, "the new token works");
  assert.equal((await readings(gw.adminToken)).status, 401, "the token used for the change ends");
  assert.equal((await readings(other)).status, 401, "every other token of the account ends");
  const old = await gw.request("POST", "/api/auth/login", {
    body: { email: ADMIN.email, password: ADMIN.password },
  });
  assert.equal(old.status, 401);
  const login = await gw.request("POST", "/api/auth/login", {
    body: { email: ADMIN.email, password: "brand-new-password-1" },
  });
  assert.equal(login.status, 200);
  assert.equal(login.headers.get("cache-control"), "no-store");
});

Deno.test("of two parallel password changes with the same current password one succeeds", async () => {
  await using gw = await startTestGateway();
  const email = "parallel@accounts.test";
  const user = await gw.createUser(email);
  const change = (next: string) =>
    gw.request("POST", "/api/auth/password", {
      token: user.token,
      body: { current_password: passwordFor(email), new_password: next },
    });
  const results = await Promise.all([
    change("first-new-Secret-71"),
    change("second-new-Secret-72"),
  ]);
  const statuses = results.map((r) => r.status).sort();
  assert.deepEqual(statuses, [200, 409], JSON.stringify(results.map((r) => r.body)));
  const loser = results.find((r) => r.status === 409)!;
  assert.equal(loser.body.error.code, "conflict");
  const winner = results[0].status === 200 ? "first-new-Secret-71" : "second-new-Secret-72";
  assert.ok(await gw.login(email, winner), "the winner's password is the one stored");
});

Deno.test("new passwords need 12 characters and must not be common", async () => {
  await using gw = await startTestGateway();
  const create = (password: string) =>
    gw.request("POST", "/api/admin/users", {
      token: gw.adminToken,
      body: { email: `p${crypto.randomUUID().slice(0, 8)}@policy.test`, password },
    });
  for (
    const weak of [
      "12345678",
      "        ",
      "            ",
      "eleven-char",
      "password1234",
      "Password1234",
      "qwertyuiopas",
      "zzzzzzzzzzzzzz",
    ]
  ) {
    const res = await create(weak);
    assert.equal(res.status, 400, `${JSON.stringify(weak)}: ${JSON.stringify(res.body)}`);
    assert.equal(res.body.error.code, "invalid_payload");
  }
  assert.equal((await create("correct horse battery")).status, 201);
});

Deno.test("the red team's weak passwords, the email and the current password are refused", async () => {
  await using gw = await startTestGateway();
  const email = "policy-owner@accounts.test";
  const create = (password: string) =>
    gw.request("POST", "/api/admin/users", { token: gw.adminToken, body: { email, password } });
  for (
    const weak of [
      "aaaaaaaaaaab",
      " ".repeat(11) + "a",
      "123456789013",
      "abababababab",
      "passwordpassword1",
      "Gridtokenx2026",
      email,
      "\0".repeat(11) + "\u0001",
    ]
  ) {
    const res = await create(weak);
    assert.equal(res.status, 400, `${JSON.stringify(weak)}: ${JSON.stringify(res.body)}`);
    assert.equal(res.body.error.code, "invalid_payload");
  }
  const created = await create("a-decent-Phrase-42");
  assert.equal(created.status, 201, JSON.stringify(created.body));
  const token = await gw.login(email, "a-decent-Phrase-42");
  const change = (next: string) =>
    gw.request("POST", "/api/auth/password", {
      token,
      body: { current_password: "a-decent-Phrase-42", new_password: next },
    });
  const same = await change("a-decent-Phrase-42");
  assert.equal(same.status, 400, JSON.stringify(same.body));
  assert.match(same.body.error.message, /differ from the current/);
  const withEmail = await change("Policy-Owner-2027!");
  assert.equal(withEmail.status, 400, JSON.stringify(withEmail.body));
  assert.match(withEmail.body.error.message, /email/);
  assert.equal((await change("another-decent-Phrase-43")).status, 200);
});

Deno.test("tokens signed with the real secret but an absurd lifetime or issue time are refused", async () => {
  await using gw = await startTestGateway();
  const readings = (token: string) => gw.request("GET", "/api/meters/readings", { token });
  const claims = JSON.parse(Buffer.from(gw.adminToken.split(".")[1], "base64url").toString());
  const now = Math.floor(Date.now() / 1000);
  const cases: [string, Record<string, unknown>][] = [
    ["exp 1e300", { ...claims, exp: 1e300 }],
    ["a lifetime of ten years", { ...claims, iat: now, exp: now + 10 * 365 * 86_400 }],
    ["iat an hour ahead", { ...claims, iat: now + 3_600, exp: now + 3_700 }],
    ["no iat", { ...claims, iat: undefined }],
    ["fractional iat", { ...claims, iat: now - 0.5 }],
    ["fractional exp", { ...claims, exp: now + 100.5 }],
  ];
  for (const [what, payload] of cases) {
    const res = await readings(await sign(payload, JWT_SECRET, "HS256"));
    assert.equal(res.status, 401, `${what}: ${JSON.stringify(res.body)}`);
  }
  // A token as issue() writes it still passes, and so does one issued 30 s "ahead" (skew).
  assert.equal((await readings(await sign(claims, JWT_SECRET, "HS256"))).status, 200);
  const ahead = { ...claims, iat: now + 30, exp: now + 30 + 3_600 };
  assert.equal((await readings(await sign(ahead, JWT_SECRET, "HS256"))).status, 200);
});

Deno.test("tokens without exp, with padding or with non-canonical base64url are refused", async () => {
  await using gw = await startTestGateway();
  const readings = (token: string) => gw.request("GET", "/api/meters/readings", { token });
  assert.equal((await readings(gw.adminToken)).status, 200);
  const claims = JSON.parse(Buffer.from(gw.adminToken.split(".")[1], "base64url").toString());

  const { exp: _, ...noExp } = claims;
  const withoutExp = await sign(noExp, JWT_SECRET, "HS256");
  const res = await readings(withoutExp);
  assert.equal(res.status, 401);
  assert.match(res.body.error.message, /expiry/);

  assert.equal((await readings(gw.adminToken + "=")).status, 401, "padding appended");
  // HS256 signatures are 32 bytes: 43 characters, the last carrying 4 bits and 2 unused ones.
  const [h, p, s] = gw.adminToken.split(".");
  const alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_";
  const last = alphabet.indexOf(s.at(-1)!);
  for (let low = 1; low < 4; low++) {
    const variant = `${h}.${p}.${s.slice(0, -1)}${alphabet[(last & ~3) | ((last + low) & 3)]}`;
    assert.notEqual(variant, gw.adminToken);
    assert.deepEqual(
      Buffer.from(variant.split(".")[2], "base64url"),
      Buffer.from(s, "base64url"),
      "same signature bytes",
    );
    assert.equal((await readings(variant)).status, 401, `low bits ${low}`);
  }
  assert.equal((await readings(`${h}=.${p}.${s}`)).status, 401, "padded header");
  assert.equal((await readings(gw.adminToken)).status, 200);
});

Deno.test("a user change on one instance ends its tokens on another through the bus", async () => {
  const store = await KvStore.open(undefined, { dedupeWindowMs: 15 * 60_000 });
  const bus = new LocalBus();
  const clock = new ManualClock(Date.now());
  try {
    const instance = () => {
      const state = new UserStateCache({ load: (id) => store.getUser(id), clock, ttlMs: 60_000 });
      const tokens = new TokenService({ secret: JWT_SECRET, ttlMs: 3_600_000, clock, state });
      const users = new UserService({ store, clock, bus, state, passwordParams: CHEAP });
      return { state, tokens, users };
    };
    const a = instance();
    const b = instance();
    // Only B listens, as the gateway does: A's own change reaches A directly.
    const control = bus.subscribe("control", (event) => {
      if (event.type === "user.changed") b.state.invalidate(event.data.user_id);
    });
    const user = await a.users.create({
      email: "twice@accounts.test",
      password: "two-instances-1",
      role: "admin",
    });
    await a.users.create({
      email: "root@accounts.test",
      password: "root-password-1",
      role: "admin",
    });
    const { access_token } = await a.tokens.issue(user);
    assert.equal((await b.tokens.verify(access_token)).role, "admin");
    assert.equal(b.state.size, 1, "B cached the state: no store read per request");

    await a.users.update(user.id, { role: "user" });
    await assert.rejects(b.tokens.verify(access_token), (e: GatewayError) => {
      assert.equal(e.code, "unauthorized");
      return true;
    });
    await assert.rejects(a.tokens.verify(access_token));
    control.unsubscribe();
  } finally {
    await bus.close();
    await store.close();
  }
});

Deno.test("hashes with older scrypt parameters still verify and are re-hashed at login", async () => {
  const store = await KvStore.open(undefined, { dedupeWindowMs: 15 * 60_000 });
  const clock = new ManualClock(Date.now());
  const bus = new LocalBus();
  try {
    const state = new UserStateCache({ load: (id) => store.getUser(id), clock });
    await store.createUser({
      id: "old",
      email: "old@accounts.test",
      role: "user",
      wallet_address: null,
      created_at: clock.now(),
      password_hash: await hashPassword("an-old-password", { N: 512, r: 8, p: 1 }),
    });
    const users = new UserService({ store, clock, bus, state, passwordParams: CHEAP });
    assert.equal((await users.login("old@accounts.test", "an-old-password")).id, "old");
    const rehashed = (await store.getUserByEmail("old@accounts.test"))!.password_hash;
    assert.match(rehashed, /^scrypt\$1024\$8\$1\$/);
    assert.equal((await store.getUser("old"))!.token_generation, 0, "a re-hash ends no token");
    assert.equal((await users.login("old@accounts.test", "an-old-password")).id, "old");
    assert.equal((await store.getUserByEmail("old@accounts.test"))!.password_hash, rehashed);
    await assert.rejects(users.login("old@accounts.test", "wrong-password!"));
  } finally {
    await bus.close();
    await store.close();
  }
});

Deno.test("failed logins and refused tokens are logged at warn with the address, no secrets", async () => {
  const lines: Record<string, unknown>[] = [];
  const logger = jsonLogger("warn", { sink: (line) => lines.push(JSON.parse(line)) });
  await using gw = await startTestGateway({ logger });
  const wrong = "wrong-password-42";
  await gw.request("POST", "/api/auth/login", { body: { email: ADMIN.email, password: wrong } });
  await gw.request("GET", "/api/meters/readings", { token: gw.adminToken + "x" });
  const user = await gw.createUser("nosy@accounts.test");
  await gw.request("GET", "/api/admin/devices", { token: user.token });
  const security = lines.filter((l) => String(l.msg).startsWith("security: "));
  const events = security.map((l) => l.event);
  assert.ok(events.includes("login_failed"), JSON.stringify(security));
  assert.ok(events.includes("token_rejected"), JSON.stringify(security));
  assert.ok(events.includes("forbidden"), JSON.stringify(security));
  for (const line of security) {
    assert.equal(line.level, "warn");
    assert.equal(line.address, "127.0.0.1");
  }
  const text = JSON.stringify(lines);
  for (const secret of [wrong, ADMIN.password, gw.adminToken, user.token]) {
    assert.ok(!text.includes(secret), "no password or token is logged");
  }
  // The rate limit: a flood of failures from one address gives one line per period.
  for (let i = 0; i < 5; i++) {
    await gw.request("POST", "/api/auth/login", {
      body: { email: "x@accounts.test", password: wrong },
    });
  }
  assert.equal(
    lines.filter((l) => l.event === "login_failed").length,
    1,
    "rate-limited per event and address",
  );
});

Deno.test("a spray of logins for distinct emails does not flush an account's back-off", async () => {
  const store = await KvStore.open(undefined, { dedupeWindowMs: 15 * 60_000 });
  const clock = new ManualClock(Date.now());
  const bus = new LocalBus();
  try {
    const state = new UserStateCache({ load: (id) => store.getUser(id), clock });
    const users = new UserService({
      store,
      clock,
      bus,
      state,
      passwordParams: CHEAP,
      loginBackoff: { free: 2, baseMs: 60_000, maxKeys: 8 },
    });
    await users.create({
      email: "sprayed@accounts.test",
      password: "sprayed-Secret-91",
      role: "user",
    });
    for (let i = 0; i < 2; i++) {
      await assertGatewayError(users.login("sprayed@accounts.test", "wrong-guess"), "unauthorized");
    }
    await assertGatewayError(users.login("sprayed@accounts.test", "wrong-guess"), "rate_limited");
    // 40 distinct emails, 5 times the table's size: the running back-off is kept.
    for (let i = 0; i < 40; i++) {
      await assertGatewayError(users.login(`spray-${i}@example.com`, "x"), "unauthorized");
    }
    await assertGatewayError(
      users.login("sprayed@accounts.test", "sprayed-Secret-91"),
      "rate_limited",
    );
  } finally {
    await bus.close();
    await store.close();
  }
});

async function assertGatewayError(promise: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof GatewayError, `expected a GatewayError, got ${error}`);
    assert.equal(error.code, code);
    return true;
  });
}
