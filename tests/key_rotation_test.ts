// Key rotation over HTTP: at most the current and the previous key verify; grace_seconds.
import assert from "node:assert/strict";
import { ManualClock } from "../core/clock.ts";
import { secretContext } from "../core/device_keys.ts";
import { seal } from "../core/secret_box.ts";
import { isoAgo, signedReading, startTestGateway, type TestGateway } from "./_gateway.ts";

const HOUR = 3_600_000;

/** Submits a reading signed with `secret` (and naming `keyId`) at a fresh slot; its status. */
async function submitWith(
  gw: TestGateway,
  meter: string,
  secret: string,
  slot: { next: number },
  keyId?: string,
): Promise<{ status: number; code?: string }> {
  // Slots 20 minutes apart: never within the 15-minute dedupe window of each other.
  const ts = isoAgo((slot.next += 20) * 60_000);
  const body = signedReading(meter, secret, ts, "1.5", keyId ? { key_id: keyId } : {});
  const res = await gw.request("POST", "/api/meters/submit-reading", {
    token: gw.adminToken,
    body,
  });
  return { status: res.status, code: res.body?.error?.code };
}

async function rotate(
  gw: TestGateway,
  meter: string,
  body: unknown = {},
): Promise<
  { status: number; body: { key_id: string; secret_hex: string; error?: { code: string } } }
> {
  const res = await gw.request("POST", `/api/admin/devices/${meter}/rotate`, {
    token: gw.adminToken,
    body,
  });
  return { status: res.status, body: res.body };
}

async function keysOf(
  gw: TestGateway,
  meter: string,
): Promise<{ key_id: string; state: string }[]> {
  const res = await gw.request("GET", "/api/admin/devices?limit=1000", { token: gw.adminToken });
  return res.body.items.find((d: { meter_id: string }) => d.meter_id === meter).keys;
}

Deno.test("after three rotations only the current and the previous key verify", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("rotor@example.com");
  const first = await gw.registerMeter("rot-1", owner.id);
  const secrets = [first.secret_hex];
  const ids = [first.key_id];
  for (let i = 0; i < 3; i++) {
    const r = await rotate(gw, "rot-1");
    assert.equal(r.status, 200, JSON.stringify(r.body));
    secrets.push(r.body.secret_hex);
    ids.push(r.body.key_id);
  }
  const slot = { next: 0 };
  const results = [];
  for (const secret of secrets) results.push(await submitWith(gw, "rot-1", secret, slot));
  assert.deepEqual(results, [
    { status: 401, code: "bad_signature" },
    { status: 401, code: "bad_signature" },
    { status: 201, code: undefined },
    { status: 201, code: undefined },
  ]);
  // The record keeps the two (the audit log keeps the history).
  assert.deepEqual((await keysOf(gw, "rot-1")).map((k) => k.key_id), ids.slice(2));
  // Naming an old key id is no way around it.
  assert.deepEqual(await submitWith(gw, "rot-1", secrets[0], slot, ids[0]), {
    status: 401,
    code: "bad_signature",
  });
});

Deno.test("rotate with grace_seconds 0 ends the old key at once, also in a cached actor", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("leak@example.com");
  const meter = await gw.registerMeter("leaked-1", owner.id);
  const slot = { next: 0 };
  // The actor is active and holds the key.
  assert.equal((await submitWith(gw, "leaked-1", meter.secret_hex, slot)).status, 201);
  assert.equal(gw.gateway.registry.size, 1);

  const r = await rotate(gw, "leaked-1", { grace_seconds: 0 });
  assert.equal(r.status, 200, JSON.stringify(r.body));
  assert.deepEqual(await submitWith(gw, "leaked-1", meter.secret_hex, slot), {
    status: 401,
    code: "bad_signature",
  });
  assert.equal((await submitWith(gw, "leaked-1", r.body.secret_hex, slot)).status, 201);
  assert.deepEqual((await keysOf(gw, "leaked-1")).map((k) => k.key_id), [r.body.key_id]);

  // Without grace_seconds the previous key still verifies (the default grace period).
  const again = await rotate(gw, "leaked-1");
  assert.equal((await submitWith(gw, "leaked-1", r.body.secret_hex, slot)).status, 201);
  assert.equal((await submitWith(gw, "leaked-1", again.body.secret_hex, slot)).status, 201);
});

Deno.test("grace_seconds shortens the previous key's grace and is validated", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({ clock });
  const owner = await gw.createUser("grace@example.com");
  const meter = await gw.registerMeter("grace-1", owner.id);
  const slot = { next: 0 };

  await t.step("out-of-range values are 400 invalid_payload", async () => {
    for (const grace_seconds of [-1, 1.5, "60", 24 * 3600 + 1]) {
      const r = await rotate(gw, "grace-1", { grace_seconds });
      assert.equal(r.status, 400, JSON.stringify(grace_seconds));
      assert.equal(r.body.error?.code, "invalid_payload");
    }
    // Nothing was rotated by the refused requests.
    assert.equal((await keysOf(gw, "grace-1")).length, 1);
  });

  await t.step("the previous key verifies for grace_seconds, then is expired", async () => {
    const r = await rotate(gw, "grace-1", { grace_seconds: 60 });
    assert.equal(r.status, 200);
    clock.advance(59_000);
    assert.equal((await submitWith(gw, "grace-1", meter.secret_hex, slot)).status, 201);
    clock.advance(1_000);
    assert.deepEqual(await submitWith(gw, "grace-1", meter.secret_hex, slot), {
      status: 401,
      code: "key_expired",
    });
    assert.equal((await submitWith(gw, "grace-1", r.body.secret_hex, slot)).status, 201);
    const keys = await keysOf(gw, "grace-1");
    assert.deepEqual(keys.map((k) => k.state), ["expired", "valid"]);
  });
});

Deno.test("a record stored with many keys before the limit verifies only its newest two", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("legacy@example.com");
  const now = Date.now();
  const kek = new Uint8Array(32).fill(7); // the test gateway's KEK
  const secrets = ["11", "22", "33", "44"].map((b) => b.repeat(32));
  await gw.gateway.store.createDevice({
    meter_id: "legacy-1",
    user_id: owner.id,
    status: "active",
    created_at: now - 4 * HOUR,
    updated_at: now,
    revoked_at: null,
    keys: secrets.map((secret, i) => ({
      key_id: `k${i}`,
      algorithm: "hmac-sha256" as const,
      secret_enc: seal(
        kek,
        Uint8Array.from(secret.match(/../g)!, (h) => parseInt(h, 16)),
        secretContext("legacy-1", `k${i}`),
      ),
      created_at: now - (4 - i) * HOUR,
      retired_at: i === 3 ? null : now - (3 - i) * HOUR,
    })),
  }, {
    id: crypto.randomUUID(),
    meter_id: "legacy-1",
    action: "registered",
    actor: "test",
    at: now,
  });
  const slot = { next: 0 };
  const statuses = [];
  for (const secret of secrets) {
    statuses.push((await submitWith(gw, "legacy-1", secret, slot)).status);
  }
  assert.deepEqual(statuses, [401, 401, 201, 201]);
});
