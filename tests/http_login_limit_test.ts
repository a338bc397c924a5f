import assert from "node:assert/strict";
import { ADMIN, startTestGateway } from "./_gateway.ts";

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
    Array.from({ length: 150 }, () =>
      gw.request("POST", "/api/auth/login", {
        body: { email: "nobody@example.com", password: "wrong-password" },
      })),
  );
  const statuses = new Set(results.map((r) => r.status));
  assert.ok(statuses.has(503), `statuses: ${[...statuses]}`);
  assert.ok([...statuses].every((s) => s === 401 || s === 503), `statuses: ${[...statuses]}`);
  const refused = results.find((r) => r.status === 503)!;
  assert.equal(refused.body.error.code, "overloaded");
  assert.equal(refused.headers.get("retry-after"), "1");
});
