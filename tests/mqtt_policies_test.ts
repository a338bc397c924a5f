// The embedded broker's policies in isolation: the client-id rule, CONNECT timestamp freshness,
// the junk counter and the per-meter session table.
import assert from "node:assert/strict";
import { clientIdBelongsTo } from "../mqtt/client_id.ts";
import { ConnectStamps } from "../mqtt/connect_stamps.ts";
import { JunkGuard } from "../mqtt/junk_guard.ts";
import { SessionTable } from "../mqtt/session_table.ts";

Deno.test("clientIdBelongsTo() accepts the meter id and <meter_id>/<suffix> only", () => {
  for (
    const [clientId, meterId] of [
      ["meter-1", "meter-1"],
      ["meter-1/a", "meter-1"],
      ["meter-1/fw-2.1:x_y", "meter-1"],
      ["site.3:m_7-x", "site.3:m_7-x"],
      ["site.3:m_7-x/0", "site.3:m_7-x"],
    ]
  ) {
    assert.ok(clientIdBelongsTo(clientId, meterId), `${clientId} belongs to ${meterId}`);
  }
  for (
    const [clientId, meterId] of [
      ["meter-10", "meter-1"], // a meter id that extends another
      ["meter-10/a", "meter-1"],
      ["meter-1", "meter-10"],
      ["meter-1/a", "meter-10"],
      ["meter-1-a", "meter-1"], // the separator must be "/", which no meter id contains
      ["meter-1:a", "meter-1"],
      ["meter-1/", "meter-1"],
      ["meter-1/a/b", "meter-1"],
      ["meter-1/" + "x".repeat(33), "meter-1"],
      ["", "meter-1"],
      ["aedes_123", "meter-1"],
    ]
  ) {
    assert.ok(!clientIdBelongsTo(clientId, meterId), `${clientId} does not belong to ${meterId}`);
  }
});

Deno.test("ConnectStamps refuses old, future and reused timestamps", () => {
  const stamps = new ConnectStamps({ maxAgeMs: 60_000, maxSkewMs: 30_000 });
  const now = 1_800_000_000_000;
  const s = now / 1000;
  assert.equal(stamps.check("m", "m/a", s - 61, now), "stale");
  assert.equal(stamps.check("m", "m/a", s + 31, now), "future");
  assert.equal(stamps.check("m", "m/a", s - 59, now), "ok");
  assert.equal(stamps.commit("m", "m/a", s - 10, now), "ok");
  assert.equal(stamps.commit("m", "m/a", s - 10, now), "replayed", "the same password again");
  assert.equal(stamps.check("m", "m/a", s - 20, now), "replayed", "an older one");
  assert.equal(stamps.commit("m", "m/b", s - 10, now), "ok", "another client id is separate");
  assert.equal(stamps.commit("m", "m/a", s - 9, now), "ok", "a later one");
});

Deno.test("ConnectStamps forgets entries past the window and keeps at most maxEntries", () => {
  const stamps = new ConnectStamps({ maxAgeMs: 1_000, maxSkewMs: 0, maxEntries: 2 });
  assert.equal(stamps.commit("m", "a", 10, 10_000), "ok");
  assert.equal(stamps.commit("m", "b", 10, 10_000), "ok");
  assert.equal(stamps.commit("m", "c", 10, 10_000), "ok"); // "a" forgotten (size)
  assert.equal(stamps.check("m", "a", 10, 10_000), "ok");
  assert.equal(stamps.check("m", "c", 10, 10_000), "replayed");
});

Deno.test("JunkGuard throttles from half the limit, disconnects at it, then refuses for the back-off", () => {
  const junk = new JunkGuard({ limit: 4, windowMs: 10_000, banMs: 5_000 });
  assert.equal(junk.record("m", 0), "ok");
  assert.equal(junk.record("m", 1), "throttle");
  assert.equal(junk.record("m", 2), "throttle");
  assert.equal(junk.record("m", 3), "disconnect");
  assert.equal(junk.bannedFor("m", 3), 5_000);
  assert.equal(junk.bannedFor("other", 3), 0);
  assert.equal(junk.bannedFor("m", 5_003), 0);
  // A new window starts the count again.
  assert.equal(junk.record("m", 6_000), "ok");
  assert.equal(junk.record("m", 17_000), "ok", "the window passed");
});

Deno.test("SessionTable caps sessions per meter and evicts the least recently seen offline one", () => {
  const forgotten: string[] = [];
  const table = new SessionTable({
    perMeter: 2,
    expiryMs: 1_000,
    forget: (id) => forgotten.push(id),
  });
  assert.equal(table.open("m", "m/1", false, 0), "admitted");
  assert.equal(table.open("m", "m/2", false, 1), "admitted");
  assert.equal(table.open("m", "m/3", true, 2), "full", "both live");
  assert.equal(table.open("m", "m/1", false, 3), "admitted", "its own id again (a takeover)");
  table.closed("m", "m/1", 4); // the taken-over connection
  table.closed("m", "m/1", 5);
  table.closed("m", "m/2", 6);
  assert.equal(table.count("m"), 2, "persistent sessions stay when offline");
  assert.equal(table.open("m", "m/3", true, 7), "admitted");
  assert.deepEqual(forgotten, ["m/1"], "the one seen longest ago");
  table.closed("m", "m/3", 8);
  assert.equal(table.count("m"), 1, "a clean session is gone with its connection");
  table.sweep(6 + 999);
  assert.equal(table.count("m"), 1);
  table.sweep(6 + 1_000);
  assert.equal(table.count("m"), 0, "expired");
  assert.deepEqual(forgotten, ["m/1", "m/2"]);
});
