// End-to-end: the user walk-through over real HTTP, listing and stats, exactly-once storage under
// concurrency and across a restart, revocation, rotation and isolation between users.
import { deepEqual, equal, match, notEqual, ok } from "node:assert/strict";
import { randomBytes } from "node:crypto";
import { LocalBus } from "../bus/local_bus.ts";
import { ManualClock } from "../core/clock.ts";
import { KvStore } from "../db/kv_store.ts";
import type { Store } from "../db/store.ts";
import { healthRoutes } from "../routes/health.ts";
import { DeviceService } from "../services/devices.ts";
import {
  isoAgo,
  passwordFor,
  signedReading,
  startTestGateway,
  type TestGateway,
} from "./_gateway.ts";
import { memoryLogger } from "./_memory_logger.ts";

type Res = Awaited<ReturnType<TestGateway["request"]>>;

interface ReadingView {
  id: string;
  meter_id: string;
  user_id: string;
  kwh_amount: number;
  reading_timestamp: string;
  key_id: string;
  source: string;
  minted: boolean;
}

interface KeyView {
  key_id: string;
  state: string;
  retired_at: string | null;
}

const MINUTE = 60_000;
const UUID = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/;

/** Asserts an error response: status, `{error: {code, message}}` and the code. */
function assertError(res: Res, status: number, code: string): void {
  const shown = `${res.status} ${JSON.stringify(res.body)}`;
  equal(res.status, status, `expected ${status} ${code}, got ${shown}`);
  ok(res.body !== null && typeof res.body === "object", `error body is not JSON: ${shown}`);
  equal(res.body.error?.code, code, `wrong code: ${shown}`);
  equal(typeof res.body.error.message, "string", `no message: ${shown}`);
  ok(res.body.error.message.length > 0, `empty message: ${shown}`);
}

/** Asserts a 201 and returns the stored reading. */
function assertStored(res: Res): ReadingView {
  equal(res.status, 201, `expected 201, got ${res.status} ${JSON.stringify(res.body)}`);
  match(res.body.id, UUID);
  return res.body;
}

function submit(gw: TestGateway, token: string, body: unknown): Promise<Res> {
  return gw.request("POST", "/api/meters/submit-reading", { token, body });
}

/** GET /api/meters/readings with the given query; asserts 200. */
async function listReadings(
  gw: TestGateway,
  token: string,
  query: Record<string, string> = {},
): Promise<{ items: ReadingView[]; next_cursor: string | null }> {
  const qs = new URLSearchParams(query).toString();
  const res = await gw.request("GET", `/api/meters/readings${qs ? `?${qs}` : ""}`, { token });
  equal(res.status, 200, `list ${qs}: ${res.status} ${JSON.stringify(res.body)}`);
  ok(Array.isArray(res.body.items));
  return res.body;
}

/** Follows `next_cursor` to the end; returns every item in order and the number of pages. */
async function walkReadings(
  gw: TestGateway,
  token: string,
  query: Record<string, string>,
): Promise<{ items: ReadingView[]; pages: number }> {
  const items: ReadingView[] = [];
  let cursor: string | null = null;
  let pages = 0;
  do {
    const page: { items: ReadingView[]; next_cursor: string | null } = await listReadings(
      gw,
      token,
      cursor === null ? query : { ...query, cursor },
    );
    pages++;
    ok(pages <= 100, "pagination does not end");
    ok(page.items.length <= Number(query.limit ?? 100), "page larger than limit");
    items.push(...page.items);
    cursor = page.next_cursor;
  } while (cursor !== null);
  return { items, pages };
}

function ms(iso: string): number {
  return Date.parse(iso);
}

Deno.test("a user logs in, registers a meter, submits a signed reading and sees it listed and counted", async (t) => {
  await using gw = await startTestGateway();
  const email = "walker@flow.test";
  const password = "stroller-Secret-71";
  let userId = "";
  let userToken = "";
  let secret = "";
  let keyId = "";
  const ts = isoAgo(5 * MINUTE);
  let reading: ReadingView;

  await t.step("the admin creates the user", async () => {
    const res = await gw.request("POST", "/api/admin/users", {
      token: gw.adminToken,
      body: { email, password, role: "user" },
    });
    equal(res.status, 201, JSON.stringify(res.body));
    equal(res.body.email, email);
    equal(res.body.role, "user");
    equal("password" in res.body || "password_hash" in res.body, false);
    userId = res.body.id;
  });

  await t.step("the user logs in and gets a bearer token", async () => {
    const res = await gw.request("POST", "/api/auth/login", { body: { email, password } });
    equal(res.status, 200, JSON.stringify(res.body));
    equal(res.body.token_type, "Bearer");
    ok(res.body.expires_in > 0);
    userToken = res.body.access_token;
    const wrong = await gw.request("POST", "/api/auth/login", {
      body: { email, password: "not-the-password" },
    });
    assertError(wrong, 401, "unauthorized");
  });

  await t.step("the admin registers a meter for the user and gets its secret once", async () => {
    const res = await gw.request("POST", "/api/admin/devices/register", {
      token: gw.adminToken,
      body: { meter_id: "flow-walk-1", user_id: userId, algorithm: "hmac-sha256" },
    });
    equal(res.status, 201, JSON.stringify(res.body));
    equal(res.body.meter_id, "flow-walk-1");
    match(res.body.secret_hex, /^[0-9a-f]{64}$/);
    secret = res.body.secret_hex;
    keyId = res.body.key_id;
    const again = await gw.request("POST", "/api/admin/devices/register", {
      token: gw.adminToken,
      body: { meter_id: "flow-walk-1", user_id: userId, algorithm: "hmac-sha256" },
    });
    assertError(again, 409, "conflict");
    const listed = await gw.request("GET", "/api/admin/devices", { token: gw.adminToken });
    equal(listed.status, 200);
    const device = listed.body.items.find((d: { meter_id: string }) =>
      d.meter_id === "flow-walk-1"
    );
    ok(device, "registered device is not listed");
    equal(JSON.stringify(device).includes(secret), false, "the secret is shown again");
  });

  await t.step(
    "the user submits a signed reading and gets 201 with the stored reading",
    async () => {
      reading = assertStored(
        await submit(gw, userToken, signedReading("flow-walk-1", secret, ts, "12.5")),
      );
      equal(reading.meter_id, "flow-walk-1");
      equal(reading.user_id, userId);
      equal(reading.kwh_amount, 12.5);
      equal(ms(reading.reading_timestamp), ms(ts));
      equal(reading.key_id, keyId);
      equal(reading.source, "http");
      equal(reading.minted, false);
    },
  );

  await t.step("the reading is listed for the user", async () => {
    const page = await listReadings(gw, userToken);
    equal(page.items.length, 1);
    deepEqual(page.items[0], reading);
    equal(page.next_cursor, null);
  });

  await t.step("the stats reflect the reading", async () => {
    const res = await gw.request("GET", "/api/meters/stats", { token: userToken });
    equal(res.status, 200, JSON.stringify(res.body));
    equal(res.body.reading_count, 1);
    equal(res.body.meter_count, 1);
    equal(res.body.total_kwh, 12.5);
    equal(res.body.minted_count, 0);
    equal(ms(res.body.first_reading_at), ms(ts));
    equal(ms(res.body.last_reading_at), ms(ts));
  });
});

Deno.test("listing pages with a cursor visit every reading exactly once and honour the filters", async (t) => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("pager@flow.test");
  const other = await gw.createUser("other@flow.test");
  const base = Date.now();
  const at = (i: number) => isoAgo(i * 15 * MINUTE, base); // i = 1 is the newest
  const meters = ["flow-page-a", "flow-page-b"];
  const all: ReadingView[] = [];
  for (const meter of meters) {
    const { secret_hex } = await gw.registerMeter(meter, user.id);
    for (let i = 1; i <= 12; i++) {
      const kwh = `${i}.25`;
      all.push(
        assertStored(await submit(gw, user.token, signedReading(meter, secret_hex, at(i), kwh))),
      );
    }
  }
  // Another user's reading that must never show up in `user`'s listings.
  const foreign = await gw.registerMeter("flow-page-foreign", other.id);
  assertStored(
    await submit(gw, other.token, signedReading("flow-page-foreign", foreign.secret_hex, at(3))),
  );
  const allIds = all.map((r) => r.id).sort();

  const checkWalk = (items: ReadingView[], ids: string[], order: "asc" | "desc") => {
    deepEqual(items.map((r) => r.id).sort(), ids, "not every reading exactly once");
    equal(new Set(items.map((r) => r.id)).size, items.length, "a reading was listed twice");
    for (let i = 1; i < items.length; i++) {
      const step = ms(items[i].reading_timestamp) - ms(items[i - 1].reading_timestamp);
      ok(order === "asc" ? step >= 0 : step <= 0, `not in ${order} order at ${i}`);
    }
  };

  await t.step("ascending pages of 5 walk all 24 readings exactly once", async () => {
    const { items, pages } = await walkReadings(gw, user.token, { limit: "5", order: "asc" });
    checkWalk(items, allIds, "asc");
    equal(pages, 5);
  });

  await t.step("descending pages of 7 walk all 24 readings exactly once", async () => {
    const { items } = await walkReadings(gw, user.token, { limit: "7", order: "desc" });
    checkWalk(items, allIds, "desc");
  });

  await t.step("a page that holds exactly the rest has no next cursor", async () => {
    const whole = await listReadings(gw, user.token, { limit: "24" });
    equal(whole.items.length, 24);
    equal(whole.next_cursor, null);
    const oneMeter = await listReadings(gw, user.token, { meter_id: "flow-page-a", limit: "12" });
    equal(oneMeter.items.length, 12);
    equal(oneMeter.next_cursor, null);
    const unminted = await listReadings(gw, user.token, { minted: "false", limit: "24" });
    equal(unminted.items.length, 24);
    equal(unminted.next_cursor, null);
  });

  await t.step("the default order is newest first", async () => {
    const page = await listReadings(gw, user.token, { limit: "3" });
    equal(page.items.length, 3);
    equal(ms(page.items[0].reading_timestamp), ms(at(1)));
    ok(page.next_cursor !== null);
  });

  await t.step("an admin walks every user's readings", async () => {
    const { items } = await walkReadings(gw, gw.adminToken, { limit: "4", order: "asc" });
    equal(items.length, 25);
    ok(items.some((r) => r.meter_id === "flow-page-foreign"));
  });

  await t.step("meter_id limits the listing to one meter, across pages", async () => {
    const { items } = await walkReadings(gw, user.token, {
      meter_id: "flow-page-b",
      limit: "5",
      order: "asc",
    });
    checkWalk(
      items,
      all.filter((r) => r.meter_id === "flow-page-b").map((r) => r.id).sort(),
      "asc",
    );
    ok(items.every((r) => r.meter_id === "flow-page-b"));
  });

  await t.step("from is inclusive and to is exclusive, also across pages", async () => {
    const expected = all
      .filter((r) => ms(r.reading_timestamp) >= ms(at(5)) && ms(r.reading_timestamp) < ms(at(2)))
      .map((r) => r.id)
      .sort();
    equal(expected.length, 6);
    for (const order of ["asc", "desc"] as const) {
      const { items } = await walkReadings(gw, user.token, {
        from: at(5),
        to: at(2),
        limit: "4",
        order,
      });
      checkWalk(items, expected, order);
    }
    const oneMeter = await walkReadings(gw, user.token, {
      meter_id: "flow-page-a",
      from: at(5),
      to: at(2),
      limit: "2",
      order: "desc",
    });
    deepEqual(
      oneMeter.items.map((r) => ms(r.reading_timestamp)),
      [at(3), at(4), at(5)].map(ms),
    );
  });

  await t.step("minted=false lists every (unminted) reading and minted=true none", async () => {
    const unminted = await walkReadings(gw, user.token, { minted: "false", limit: "10" });
    checkWalk(unminted.items, allIds, "desc");
    const minted = await listReadings(gw, user.token, { minted: "true" });
    equal(minted.items.length, 0);
    equal(minted.next_cursor, null);
  });

  await t.step("the stats count every reading once", async () => {
    const res = await gw.request("GET", "/api/meters/stats", { token: user.token });
    equal(res.status, 200);
    equal(res.body.reading_count, 24);
    equal(res.body.meter_count, 2);
    // 2 meters × (1.25 + 2.25 + … + 12.25)
    equal(res.body.total_kwh, 2 * (78 + 12 * 0.25));
    equal(ms(res.body.first_reading_at), ms(at(12)));
    equal(ms(res.body.last_reading_at), ms(at(1)));
  });
});

Deno.test("the same reading submitted 10 times at once is stored once and the others get 409 with its id", async () => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("racer@flow.test");
  const { secret_hex } = await gw.registerMeter("flow-race", user.id);
  const body = signedReading("flow-race", secret_hex, isoAgo(3 * MINUTE), "4.2");
  const results = await Promise.all(
    Array.from({ length: 10 }, () => submit(gw, user.token, body)),
  );
  const stored = results.filter((r) => r.status === 201);
  equal(stored.length, 1, `statuses: ${results.map((r) => r.status).join(",")}`);
  const id = stored[0].body.id;
  for (const r of results.filter((r) => r.status !== 201)) {
    assertError(r, 409, "duplicate");
    equal(r.body.error.details?.id, id);
  }
  const page = await listReadings(gw, user.token, { meter_id: "flow-race" });
  deepEqual(page.items.map((r) => r.id), [id]);
  const stats = await gw.request("GET", "/api/meters/stats", { token: user.token });
  equal(stats.body.reading_count, 1);
  equal(stats.body.total_kwh, 4.2);
});

Deno.test("after a restart a replayed reading gets 409 with the same id and users, devices and secrets survive", async (t) => {
  const dir = await Deno.makeTempDir({ prefix: "gw-flow-restart-" });
  try {
    const base = Date.now();
    const email = "survivor@flow.test";
    let userId = "";
    let secret = "";
    let firstId = "";
    let body: Record<string, unknown> = {};

    await t.step("the first gateway stores a reading", async () => {
      await using gw = await startTestGateway({ dir });
      const user = await gw.createUser(email);
      userId = user.id;
      secret = (await gw.registerMeter("flow-restart", user.id)).secret_hex;
      body = signedReading("flow-restart", secret, isoAgo(60 * MINUTE, base), "3.5");
      firstId = assertStored(await submit(gw, user.token, body)).id;
      // Closed by `await using`: the writer drains and the store closes.
    });

    await t.step(
      "a second gateway on the same directory reports the replay as a duplicate",
      async (t2) => {
        await using gw = await startTestGateway({ dir });
        const token = await gw.login(email, passwordFor(email));
        const replay = await submit(gw, token, body);
        assertError(replay, 409, "duplicate");
        equal(replay.body.error.details?.id, firstId);

        await t2.step("the user can still log in and the device is still registered", async () => {
          const devices = await gw.request("GET", `/api/admin/devices?user_id=${userId}`, {
            token: gw.adminToken,
          });
          equal(devices.status, 200);
          deepEqual(devices.body.items.map((d: { meter_id: string }) => d.meter_id), [
            "flow-restart",
          ]);
          equal(devices.body.items[0].status, "active");
        });

        await t2.step("the old HMAC secret still verifies a new reading", async () => {
          const next = signedReading("flow-restart", secret, isoAgo(30 * MINUTE, base), "1.25");
          assertStored(await submit(gw, token, next));
        });

        await t2.step("both readings are listed, the first with its original id", async () => {
          const page = await listReadings(gw, token, { order: "asc" });
          equal(page.items.length, 2);
          equal(page.items[0].id, firstId);
          equal(page.items[0].kwh_amount, 3.5);
          const stats = await gw.request("GET", "/api/meters/stats", { token });
          equal(stats.body.reading_count, 2);
          equal(stats.body.total_kwh, 4.75);
        });
      },
    );
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});

Deno.test("a revoked device's next reading is rejected at once with 403 device_revoked", async () => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("revoker@flow.test");
  const { secret_hex } = await gw.registerMeter("flow-revoke", user.id);
  const base = Date.now();
  assertStored(
    await submit(
      gw,
      user.token,
      signedReading("flow-revoke", secret_hex, isoAgo(60 * MINUTE, base)),
    ),
  );
  const revoked = await gw.request("POST", "/api/admin/devices/flow-revoke/revoke", {
    token: gw.adminToken,
  });
  equal(revoked.status, 200, JSON.stringify(revoked.body));
  equal(revoked.body.status, "revoked");
  ok(revoked.body.revoked_at !== null);
  const next = await submit(
    gw,
    user.token,
    signedReading("flow-revoke", secret_hex, isoAgo(30 * MINUTE, base)),
  );
  assertError(next, 403, "device_revoked");
  // A revoked device cannot be brought back by rotating its key.
  const rotate = await gw.request("POST", "/api/admin/devices/flow-revoke/rotate", {
    token: gw.adminToken,
  });
  assertError(rotate, 403, "device_revoked");
  const page = await listReadings(gw, user.token, { meter_id: "flow-revoke" });
  equal(page.items.length, 1);
});

/**
 * Holds the next call of `method` on the gateway's store after it has read its value, until
 * `release()`; later calls pass straight through. This lets a test make one request read state,
 * then land another request, then let the first one continue: a deterministic interleaving.
 * Test-side instrumentation of the store instance the gateway exposes; no product code changes.
 */
function holdNextStoreRead(
  gw: TestGateway,
  method: "getUser" | "getDevice",
): { reached: Promise<void>; release: () => void } {
  const store = gw.gateway.store as unknown as Record<string, (id: string) => Promise<unknown>>;
  const original = store[method];
  const reached = Promise.withResolvers<void>();
  const released = Promise.withResolvers<void>();
  store[method] = async (id: string) => {
    store[method] = original;
    const value = await original.call(gw.gateway.store, id);
    reached.resolve();
    await released.promise;
    return value;
  };
  return {
    reached: reached.promise,
    release: () => {
      store[method] = original;
      released.resolve();
    },
  };
}

Deno.test("device changes that race other requests for the same meter are never lost", async (t) => {
  await using gw = await startTestGateway();
  const user = await gw.createUser("loader@flow.test");
  const base = Date.now();
  const reading = (meter: string, secret: string, minutesAgo: number) =>
    signedReading(meter, secret, isoAgo(minutesAgo * MINUTE, base));
  const rotate = (meter: string) =>
    gw.request("POST", `/api/admin/devices/${meter}/rotate`, { token: gw.adminToken });
  const revoke = (meter: string) =>
    gw.request("POST", `/api/admin/devices/${meter}/revoke`, { token: gw.adminToken });
  const deviceStatus = async (meter: string) => {
    const res = await gw.request("GET", "/api/admin/devices", { token: gw.adminToken });
    return res.body.items.find((d: { meter_id: string }) => d.meter_id === meter)?.status;
  };

  await t.step(
    "a revocation that returned 200 while the actor was loading rejects the next reading",
    async () => {
      const meter = "flow-race-revoke";
      const { secret_hex } = await gw.registerMeter(meter, user.id);
      // The first reading activates the actor, which reads the (still active) device and waits.
      const hold = holdNextStoreRead(gw, "getUser");
      let inFlight: Promise<Res>;
      try {
        inFlight = submit(gw, user.token, reading(meter, secret_hex, 60));
        await hold.reached;
        const revoked = await revoke(meter);
        equal(revoked.status, 200, JSON.stringify(revoked.body));
      } finally {
        hold.release();
      }
      // Submitted before the revocation finished: either outcome is fair for this one.
      ok([201, 403].includes((await inFlight).status));
      assertError(
        await submit(gw, user.token, reading(meter, secret_hex, 30)),
        403,
        "device_revoked",
      );
    },
  );

  await t.step(
    "a key that a rotation returned while the actor was loading verifies the next reading",
    async () => {
      const meter = "flow-race-rotate";
      const { secret_hex } = await gw.registerMeter(meter, user.id);
      const hold = holdNextStoreRead(gw, "getUser");
      let inFlight: Promise<Res>;
      let fresh: { key_id: string; secret_hex: string };
      try {
        inFlight = submit(gw, user.token, reading(meter, secret_hex, 60));
        await hold.reached;
        const rotated = await rotate(meter);
        equal(rotated.status, 200, JSON.stringify(rotated.body));
        fresh = rotated.body;
      } finally {
        hold.release();
      }
      equal((await inFlight).status, 201);
      const stored = assertStored(
        await submit(gw, user.token, reading(meter, fresh.secret_hex, 30)),
      );
      equal(stored.key_id, fresh.key_id);
    },
  );

  // Store.updateDevice re-applies a change on the fresh record when another writer got there
  // first; the port's contract suite pins that deterministically. Here the routes run truly
  // concurrently, many times, and the invariants must hold every time.
  await t.step("two overlapping rotations both return keys that verify", async () => {
    for (let i = 0; i < 8; i++) {
      const meter = `flow-race-rotate-twice-${i}`;
      await gw.registerMeter(meter, user.id);
      const [first, second] = await Promise.all([rotate(meter), rotate(meter)]);
      equal(first.status, 200, JSON.stringify(first.body));
      equal(second.status, 200, JSON.stringify(second.body));
      // Both secrets were handed out as valid keys; each must verify (one within its grace).
      const a = await submit(gw, user.token, reading(meter, first.body.secret_hex, 60));
      const b = await submit(gw, user.token, reading(meter, second.body.secret_hex, 30));
      equal(a.status, 201, `first rotation's key: ${JSON.stringify(a.body)}`);
      equal(b.status, 201, `second rotation's key: ${JSON.stringify(b.body)}`);
    }
  });

  await t.step("a rotation overlapping a revocation does not bring the device back", async () => {
    for (let i = 0; i < 8; i++) {
      const meter = `flow-race-revoke-rotate-${i}`;
      const { secret_hex } = await gw.registerMeter(meter, user.id);
      const [rotated, revoked] = await Promise.all([rotate(meter), revoke(meter)]);
      equal(revoked.status, 200, JSON.stringify(revoked.body));
      ok([200, 403].includes(rotated.status), JSON.stringify(rotated.body));
      equal(await deviceStatus(meter), "revoked");
      assertError(
        await submit(gw, user.token, reading(meter, secret_hex, 60)),
        403,
        "device_revoked",
      );
      if (rotated.status === 200) {
        assertError(
          await submit(gw, user.token, reading(meter, rotated.body.secret_hex, 30)),
          403,
          "device_revoked",
        );
      }
    }
  });
});

Deno.test("after a rotation both keys verify during the grace period and only the new one after it", async (t) => {
  const clock = new ManualClock(Date.now());
  await using gw = await startTestGateway({
    clock,
    env: { DEVICE_KEY_ROTATION_GRACE: "1h" },
  });
  // Every login happens before the clock moves: tokens are checked against real time.
  const user = await gw.createUser("rotator@flow.test");
  const meter = "flow-rotate";
  const old = await gw.registerMeter(meter, user.id);
  const nearNow = (minutesAgo: number) => isoAgo(minutesAgo * MINUTE, clock.now());
  let fresh = { key_id: "", secret_hex: "" };

  const deviceKeys = async (): Promise<KeyView[]> => {
    const res = await gw.request("GET", "/api/admin/devices", { token: gw.adminToken });
    equal(res.status, 200);
    const device = res.body.items.find((d: { meter_id: string }) => d.meter_id === meter);
    ok(device, "device not listed");
    return device.keys;
  };

  await t.step("rotate returns a new key id and a new secret", async () => {
    const res = await gw.request("POST", `/api/admin/devices/${meter}/rotate`, {
      token: gw.adminToken,
    });
    equal(res.status, 200, JSON.stringify(res.body));
    equal(res.body.meter_id, meter);
    match(res.body.secret_hex, /^[0-9a-f]{64}$/);
    notEqual(res.body.key_id, old.key_id);
    notEqual(res.body.secret_hex, old.secret_hex);
    fresh = res.body;
  });

  await t.step("readings signed with the old and with the new secret are both stored", async () => {
    const a = assertStored(
      await submit(gw, user.token, signedReading(meter, old.secret_hex, nearNow(45))),
    );
    equal(a.key_id, old.key_id);
    const b = assertStored(
      await submit(gw, user.token, signedReading(meter, fresh.secret_hex, nearNow(30))),
    );
    equal(b.key_id, fresh.key_id);
  });

  await t.step("the device list shows the retired key still valid beside the new one", async () => {
    const keys = await deviceKeys();
    const retired = keys.find((k) => k.key_id === old.key_id);
    const current = keys.find((k) => k.key_id === fresh.key_id);
    ok(retired && current, JSON.stringify(keys));
    ok(retired.retired_at !== null);
    equal(retired.state, "valid");
    equal(current.retired_at, null);
    equal(current.state, "valid");
  });

  await t.step(
    "after the grace period the old secret is 401 key_expired and the new one verifies",
    async () => {
      clock.advance(60 * MINUTE + MINUTE);
      const stale = await submit(gw, user.token, signedReading(meter, old.secret_hex, nearNow(10)));
      assertError(stale, 401, "key_expired");
      const staleById = await submit(
        gw,
        user.token,
        signedReading(meter, old.secret_hex, nearNow(10), "1.5", { key_id: old.key_id }),
      );
      assertError(staleById, 401, "key_expired");
      const ok201 = assertStored(
        await submit(gw, user.token, signedReading(meter, fresh.secret_hex, nearNow(5))),
      );
      equal(ok201.key_id, fresh.key_id);
    },
  );

  await t.step("the device list shows the old key expired and the new one valid", async () => {
    const keys = await deviceKeys();
    equal(keys.find((k) => k.key_id === old.key_id)?.state, "expired");
    equal(keys.find((k) => k.key_id === fresh.key_id)?.state, "valid");
  });
});

Deno.test("a user can neither read, submit for, nor count another user's meters, nor reach admin routes", async (t) => {
  await using gw = await startTestGateway();
  const a = await gw.createUser("a@isolation.test");
  const b = await gw.createUser("b@isolation.test");
  const meterA = await gw.registerMeter("iso-meter-a", a.id);
  const meterB = await gw.registerMeter("iso-meter-b", b.id);
  const base = Date.now();
  const readingA = assertStored(
    await submit(
      gw,
      a.token,
      signedReading("iso-meter-a", meterA.secret_hex, isoAgo(MINUTE, base), "2"),
    ),
  );
  const readingB = assertStored(
    await submit(
      gw,
      b.token,
      signedReading("iso-meter-b", meterB.secret_hex, isoAgo(MINUTE, base), "5"),
    ),
  );

  await t.step("A listing B's meter is 403 forbidden", async () => {
    const res = await gw.request("GET", "/api/meters/readings?meter_id=iso-meter-b", {
      token: a.token,
    });
    assertError(res, 403, "forbidden");
    const asAdmin = await listReadings(gw, gw.adminToken, { meter_id: "iso-meter-b" });
    deepEqual(asAdmin.items.map((r) => r.id), [readingB.id]);
  });

  await t.step("A listing without a filter sees only A's readings", async () => {
    const page = await listReadings(gw, a.token);
    deepEqual(page.items.map((r) => r.id), [readingA.id]);
    const asB = await listReadings(gw, b.token);
    deepEqual(asB.items.map((r) => r.id), [readingB.id]);
  });

  await t.step(
    "A submitting a correctly signed reading for B's meter is 403 forbidden",
    async () => {
      const body = signedReading("iso-meter-b", meterB.secret_hex, isoAgo(30 * MINUTE, base));
      assertError(await submit(gw, a.token, body), 403, "forbidden");
      const page = await listReadings(gw, b.token);
      equal(page.items.length, 1);
    },
  );

  await t.step(
    "A gets the same answer for an unknown meter as for B's meter: existence does not leak",
    async () => {
      const answers = async (meterId: string) => {
        const listed = await gw.request("GET", `/api/meters/readings?meter_id=${meterId}`, {
          token: a.token,
        });
        const hourly = await gw.request("GET", `/api/meters/${meterId}/stats/hourly`, {
          token: a.token,
        });
        const body = signedReading(meterId, meterB.secret_hex, isoAgo(45 * MINUTE, base));
        const submitted = await submit(gw, a.token, body);
        return [listed, hourly, submitted].map((r) => ({
          status: r.status,
          code: r.body.error?.code,
          message: r.body.error?.message.replace(meterId, "<id>"),
        }));
      };
      const ofB = await answers("iso-meter-b");
      deepEqual(await answers("iso-meter-nobody"), ofB);
      for (const answer of ofB) equal(answer.status, 403);
    },
  );

  await t.step("A reading B's stats is 403 forbidden; A's own stats count only A", async () => {
    assertError(
      await gw.request("GET", `/api/meters/stats?user_id=${b.id}`, { token: a.token }),
      403,
      "forbidden",
    );
    const own = await gw.request("GET", `/api/meters/stats?user_id=${a.id}`, { token: a.token });
    equal(own.status, 200);
    equal(own.body.reading_count, 1);
    equal(own.body.total_kwh, 2);
    const admin = await gw.request("GET", `/api/meters/stats?user_id=${b.id}`, {
      token: gw.adminToken,
    });
    equal(admin.status, 200);
    equal(admin.body.reading_count, 1);
    equal(admin.body.total_kwh, 5);
  });

  await t.step("a non-admin gets 403 forbidden on every /api/admin route", async () => {
    const attempts: [string, string, unknown][] = [
      ["GET", "/api/admin/devices", undefined],
      ["POST", "/api/admin/devices/register", { meter_id: "iso-x", user_id: a.id }],
      ["POST", "/api/admin/devices/import", { devices: [{ meter_id: "iso-y", user_id: a.id }] }],
      ["POST", "/api/admin/devices/iso-meter-b/revoke", {}],
      ["POST", "/api/admin/devices/iso-meter-b/rotate", {}],
      ["POST", "/api/admin/devices/iso-meter-a/rotate", {}],
      ["POST", "/api/admin/users", { email: "evil@x.test", password: "password-1", role: "admin" }],
    ];
    for (const [method, path, body] of attempts) {
      const res = await gw.request(method, path, { token: a.token, body });
      assertError(res, 403, "forbidden");
    }
    // Nothing of it happened: B's meter still accepts readings, the new admin cannot log in.
    assertStored(
      await submit(
        gw,
        b.token,
        signedReading("iso-meter-b", meterB.secret_hex, isoAgo(45 * MINUTE, base)),
      ),
    );
    const evil = await gw.request("POST", "/api/auth/login", {
      body: { email: "evil@x.test", password: "password-1" },
    });
    assertError(evil, 401, "unauthorized");
  });
});

Deno.test("the health, readiness, OpenAPI and docs endpoints answer", async (t) => {
  await using gw = await startTestGateway();

  await t.step("/healthz is 200", async () => {
    const res = await gw.request("GET", "/healthz");
    equal(res.status, 200);
    equal(res.body.status, "ok");
  });

  await t.step("/readyz is 200 with every check ok", async () => {
    const res = await gw.request("GET", "/readyz");
    equal(res.status, 200, JSON.stringify(res.body));
    equal(res.body.status, "ready");
    ok(Object.values(res.body.checks).every((v) => v === "ok"));
  });

  await t.step("/openapi.json is JSON describing the submission route", async () => {
    const res = await gw.request("GET", "/openapi.json");
    equal(res.status, 200);
    match(res.headers.get("content-type") ?? "", /application\/json/);
    equal(typeof res.body, "object");
    ok("/api/meters/submit-reading" in res.body.paths, Object.keys(res.body.paths).join(", "));
    ok(res.body.paths["/api/meters/submit-reading"].post);
    ok("/api/meters/readings" in res.body.paths);
  });

  await t.step("/docs is an HTML page", async () => {
    const res = await gw.request("GET", "/docs");
    equal(res.status, 200);
    match(res.headers.get("content-type") ?? "", /text\/html/);
    equal(typeof res.body, "string");
    match(res.body, /<html/i);
    match(res.body, /openapi\.json/);
  });

  await t.step("an unknown page is 404 not_found as JSON", async () => {
    const res = await gw.request("GET", `/no-such-page-${randomBytes(4).toString("hex")}`);
    assertError(res, 404, "not_found");
  });
});

Deno.test("/readyz names failing checks only as down or stalled and logs the details", async () => {
  const secret = "connect ECONNREFUSED db.internal:5432 for user gateway_rw";
  const logger = memoryLogger();
  const store = { ping: () => Promise.reject(new Error(secret)) } as unknown as Store;
  const app = healthRoutes({
    store,
    writerStalled: () => "worker /srv/gateway/data/gateway.kv busy for 12 s",
    logger,
  });
  const res = await app.request("/readyz");
  equal(res.status, 503);
  const text = await res.text();
  deepEqual(JSON.parse(text), {
    status: "not_ready",
    checks: { store: "down", writer: "stalled" },
  });
  ok(!text.includes("db.internal") && !text.includes("/srv/"), text);
  // The details reach the operator through the log instead.
  const [down, stalled] = logger.entries;
  equal((down.fields.error as Error).message, secret);
  match(String(stalled.fields.reason), /gateway\.kv busy/);
});

Deno.test("a device change that the bus fails to announce still returns its new secret", async (t) => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("bus-down@flow.test");
  const publish = gw.bus.publish;
  gw.bus.publish = () => Promise.reject(new Error("bus unreachable"));
  try {
    await t.step("registration answers 201 with the secret", async () => {
      const res = await gw.request("POST", "/api/admin/devices/register", {
        token: gw.adminToken,
        body: { meter_id: "bus-down-1", user_id: owner.id },
      });
      equal(res.status, 201, JSON.stringify(res.body));
      match(res.body.secret_hex, /^[0-9a-f]{64}$/);
    });

    await t.step("rotation answers 200 with the new secret", async () => {
      const res = await gw.request("POST", "/api/admin/devices/bus-down-1/rotate", {
        token: gw.adminToken,
      });
      equal(res.status, 200, JSON.stringify(res.body));
      match(res.body.secret_hex, /^[0-9a-f]{64}$/);
    });

    await t.step("an import answers every device's secret", async () => {
      const res = await gw.request("POST", "/api/admin/devices/import", {
        token: gw.adminToken,
        body: { devices: [{ meter_id: "bus-down-2", user_id: owner.id }] },
      });
      equal(res.status, 200, JSON.stringify(res.body));
      match(res.body.results[0].secret_hex, /^[0-9a-f]{64}$/);
    });

    await t.step("revocation answers 200 with the revoked device", async () => {
      const res = await gw.request("POST", "/api/admin/devices/bus-down-1/revoke", {
        token: gw.adminToken,
      });
      equal(res.status, 200, JSON.stringify(res.body));
      equal(res.body.status, "revoked");
    });
  } finally {
    gw.bus.publish = publish;
  }
});

Deno.test("DeviceService logs a bus failure after the commit instead of throwing it", async () => {
  const store = await KvStore.open(undefined, { dedupeWindowMs: 15 * MINUTE });
  try {
    await store.createUser({
      id: "u-log",
      email: "log@flow.test",
      role: "user",
      wallet_address: null,
      created_at: 0,
      password_hash: "h",
    });
    const logger = memoryLogger();
    const bus = new LocalBus();
    bus.publish = () => Promise.reject(new Error("bus unreachable"));
    const devices = new DeviceService({
      store,
      bus,
      clock: new ManualClock(Date.now()),
      kek: new Uint8Array(32).fill(1),
      policy: { rotationMs: 90 * 24 * 60 * MINUTE, graceMs: 24 * 60 * MINUTE },
      logger,
    });
    const issued = await devices.register(
      { meter_id: "log-1", user_id: "u-log", algorithm: "hmac-sha256" },
      "test",
    );
    ok(issued.secret_hex);
    notEqual(await store.getDevice("log-1"), null);
    equal(logger.entries.length, 1);
    equal(logger.entries[0].level, "error");
    equal(logger.entries[0].fields.meter_id, "log-1");
    equal(logger.entries[0].fields.change, "registered");
    equal((logger.entries[0].fields.error as Error).message, "bus unreachable");
    await bus.close();
  } finally {
    await store.close();
  }
});

Deno.test("an import returns the secrets of the devices registered before an unexpected failure", async () => {
  await using gw = await startTestGateway();
  const owner = await gw.createUser("import-fail@flow.test");
  const devices = gw.gateway.devices;
  const register = devices.register;
  devices.register = (input, actor) =>
    input.meter_id === "imp-boom"
      ? Promise.reject(new Error("disk I/O error at /srv/gateway/data"))
      : register.call(devices, input, actor);
  try {
    const res = await gw.request("POST", "/api/admin/devices/import", {
      token: gw.adminToken,
      body: {
        devices: ["imp-1", "imp-boom", "imp-2", "imp-1"].map((meter_id) => ({
          meter_id,
          user_id: owner.id,
        })),
      },
    });
    equal(res.status, 200, JSON.stringify(res.body));
    const [first, boom, second, again] = res.body.results;
    equal(first.meter_id, "imp-1");
    match(first.secret_hex, /^[0-9a-f]{64}$/);
    deepEqual(boom, {
      meter_id: "imp-boom",
      error: { code: "internal", message: "Internal error" },
    });
    equal(second.meter_id, "imp-2");
    match(second.secret_hex, /^[0-9a-f]{64}$/);
    equal(again.error.code, "conflict");
  } finally {
    devices.register = register;
  }
  const listed = await gw.request("GET", "/api/admin/devices", { token: gw.adminToken });
  deepEqual(
    listed.body.items.map((d: { meter_id: string }) => d.meter_id).filter((m: string) =>
      m.startsWith("imp-")
    ),
    ["imp-1", "imp-2"],
  );
});

Deno.test("a meter's cached owner is forgotten when it is registered: no stale 403", async () => {
  await using gw = await startTestGateway();
  const alice = await gw.createUser("owner-cache@flow.test");
  const path = "/api/meters/readings?meter_id=owner-cache-1";
  // Unknown meter: refused, and the answer (no owner) is cached.
  equal((await gw.request("GET", path, { token: alice.token })).status, 403);
  equal((await gw.request("GET", path, { token: alice.token })).status, 403);
  await gw.registerMeter("owner-cache-1", alice.id);
  const after = await gw.request("GET", path, { token: alice.token });
  equal(after.status, 200, JSON.stringify(after.body));
  const other = await gw.createUser("not-owner@flow.test");
  equal((await gw.request("GET", path, { token: other.token })).status, 403);
});
