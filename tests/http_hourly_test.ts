import assert from "node:assert/strict";
import { signedReading, startTestGateway } from "./_gateway.ts";

Deno.test("hourly stats include a reading backfilled 3 days ago in that hour's bucket", async (t) => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("hourly-a@example.com");
  const bob = await gw.createUser("hourly-b@example.com");
  const { secret_hex } = await gw.registerMeter("hourly-1", alice.id);
  const hour = Math.floor((Date.now() - 3 * 86_400_000) / 3_600_000) * 3_600_000;
  const at = (minutes: number) =>
    new Date(hour + minutes * 60_000).toISOString().replace(".000Z", "Z");

  await t.step("two readings in one hour give count, sum, avg, min and max", async () => {
    for (const [minutes, kwh] of [[0, "1.2345"], [30, "2.5"]] as const) {
      const res = await gw.request("POST", "/api/meters/submit-reading", {
        token: alice.token,
        body: signedReading("hourly-1", secret_hex, at(minutes), kwh),
      });
      assert.equal(res.status, 201, JSON.stringify(res.body));
    }
    const start = new Date(hour - 3_600_000).toISOString();
    const end = new Date(hour + 2 * 3_600_000).toISOString();
    const res = await gw.request(
      "GET",
      `/api/meters/hourly-1/stats/hourly?start=${start}&end=${end}`,
      { token: alice.token },
    );
    assert.equal(res.status, 200, JSON.stringify(res.body));
    assert.equal(res.body.hours.length, 1);
    const h = res.body.hours[0];
    assert.equal(h.hour, new Date(hour).toISOString());
    assert.equal(h.count, 2);
    assert.equal(h.sum_kwh, 3.7345);
    assert.ok(Math.abs(h.avg_kwh - 1.86725) < 1e-9, String(h.avg_kwh));
    assert.equal(h.min_kwh, 1.2345);
    assert.equal(h.max_kwh, 2.5);
  });

  await t.step("only the owner or an admin may read them", async () => {
    const path = "/api/meters/hourly-1/stats/hourly";
    assert.equal((await gw.request("GET", path, { token: bob.token })).status, 403);
    assert.equal((await gw.request("GET", path, { token: gw.adminToken })).status, 200);
  });

  await t.step("a reversed or over-long range is a 400", async () => {
    const path = "/api/meters/hourly-1/stats/hourly";
    const reversed = await gw.request(
      "GET",
      `${path}?start=2026-11-02T00:00:00Z&end=2026-11-01T00:00:00Z`,
      { token: alice.token },
    );
    assert.equal(reversed.status, 400);
    assert.equal(reversed.body.error.code, "invalid_payload");
    const long = await gw.request(
      "GET",
      `${path}?start=2024-01-01T00:00:00Z&end=2026-01-01T00:00:00Z`,
      { token: alice.token },
    );
    assert.equal(long.status, 400);
  });
});
