import assert from "node:assert/strict";
import type { AuditEntry, DeviceRecord, StoredKey } from "../../core/device.ts";
import { GatewayError } from "../../core/errors.ts";
import type { ReadingRow } from "../../core/reading.ts";
import type { UserRecord } from "../../core/user.ts";
import type { InsertResult, ReadingQuery, Store, StoreOptions } from "../../db/store.ts";

/** A store under test and how to dispose of what it made. */
export interface StoreFixture {
  store: Store;
  /** Runs after the suite has closed `store`: drop the schema, remove the files. */
  cleanup(): Promise<void>;
}

/** Makes a fresh, empty store; every test case gets its own. */
export type StoreFactory = (options: StoreOptions) => Promise<StoreFixture>;

/** How the suite runs against one backend. */
export interface StoreContractOptions {
  /** Skip the suite, e.g. when the backend is not configured here. */
  ignore?: boolean;
  /** Deno's op sanitizer (on unless a driver keeps timers of its own). */
  sanitizeOps?: boolean;
  /** Deno's resource sanitizer (on unless a driver keeps connections of its own). */
  sanitizeResources?: boolean;
}

const SEC = 1000;
const MIN = 60 * SEC;
const WINDOW = 15 * MIN;
const T0 = Date.UTC(2026, 10, 29, 10, 0, 0);

/**
 * Registers the behaviour every {@linkcode Store} adapter must show, as `Deno.test` cases named
 * `"<name>: ..."`. The suite closes each store itself, then calls the fixture's `cleanup`.
 */
export function storeContract(
  name: string,
  factory: StoreFactory,
  options: StoreContractOptions = {},
): void {
  const test = (title: string, fn: (t: Deno.TestContext, store: Store) => Promise<void>) => {
    Deno.test({
      name: `${name}: ${title}`,
      ignore: options.ignore ?? false,
      sanitizeOps: options.sanitizeOps ?? true,
      sanitizeResources: options.sanitizeResources ?? true,
      async fn(t) {
        const fixture = await factory({ dedupeWindowMs: WINDOW });
        try {
          await fn(t, fixture.store);
        } finally {
          await fixture.store.close();
          await fixture.cleanup();
        }
      },
    });
  };

  test(
    "users are created, found by id and by email, counted, and emails are unique",
    async (t, store) => {
      const alice = user("alice");
      const bob = user("bob");

      await t.step("an empty store counts no users", async () => {
        assert.equal(await store.countUsers(), 0);
      });

      await t.step("a created user is found by id, without its password hash", async () => {
        await store.createUser(alice);
        const found = await store.getUser(alice.id);
        const { password_hash: _, ...expected } = alice;
        assert.deepEqual(found, expected);
        assert.ok(!("password_hash" in found!));
      });

      await t.step("a created user is found by email, with its password hash", async () => {
        assert.deepEqual(await store.getUserByEmail(alice.email), alice);
      });

      await t.step("unknown ids and emails find nobody", async () => {
        assert.equal(await store.getUser("nobody"), null);
        assert.equal(await store.getUserByEmail("nobody@example.com"), null);
      });

      await t.step(
        "a second user with a taken email is a conflict and is not created",
        async () => {
          await assertGatewayError(store.createUser({ ...bob, email: alice.email }), "conflict");
          assert.equal(await store.getUser(bob.id), null);
          assert.deepEqual(await store.getUserByEmail(alice.email), alice);
        },
      );

      await t.step("countUsers counts every created user and nothing else", async () => {
        await store.createUser(bob);
        assert.equal(await store.countUsers(), 2);
      });
    },
  );

  test(
    "users are changed and deleted atomically, and one active admin always remains",
    async (t, store) => {
      const root = user("root", "admin");
      const ops = user("ops", "admin");
      const carol = user("carol");

      await t.step("a user created without the new fields is enabled at generation 0", async () => {
        const { disabled: _d, token_generation: _g, ...legacy } = carol;
        await store.createUser(legacy);
        assert.deepEqual(await store.getUserByEmail(carol.email), carol);
        await store.createUser(root);
        await store.createUser(ops);
      });

      await t.step("a change is stored and returned, and the generation is kept", async () => {
        const changed = await store.updateUser(carol.id, (u) => ({
          ...u,
          role: "operator",
          disabled: true,
          password_hash: "new-hash",
          token_generation: u.token_generation + 1,
        }));
        const expected = {
          ...carol,
          role: "operator" as const,
          disabled: true,
          password_hash: "new-hash",
          token_generation: 1,
        };
        assert.deepEqual(changed, expected);
        assert.deepEqual(await store.getUserByEmail(carol.email), expected);
        const { password_hash: _, ...withoutHash } = expected;
        assert.deepEqual(await store.getUser(carol.id), withoutHash);
      });

      await t.step(
        "an unknown user is not_found, and a throwing change stores nothing",
        async () => {
          await assertGatewayError(store.updateUser("nobody", (u) => u), "not_found");
          await assertGatewayError(store.deleteUser("nobody"), "not_found");
          await assert.rejects(
            store.updateUser(carol.id, () => {
              throw new GatewayError("forbidden", "no");
            }),
          );
          assert.equal((await store.getUser(carol.id))?.token_generation, 1);
        },
      );

      await t.step("concurrent changes are applied one after the other, none lost", async () => {
        await Promise.all(
          Array.from(
            { length: 8 },
            () =>
              store.updateUser(
                carol.id,
                (u) => ({ ...u, token_generation: u.token_generation + 1 }),
              ),
          ),
        );
        assert.equal((await store.getUser(carol.id))?.token_generation, 9);
      });

      await t.step("one admin may be demoted while another stays", async () => {
        await store.updateUser(ops.id, (u) => ({ ...u, role: "operator" }));
        assert.equal((await store.getUser(ops.id))?.role, "operator");
      });

      await t.step("the last active admin cannot be demoted, disabled or deleted", async () => {
        await assertGatewayError(
          store.updateUser(root.id, (u) => ({ ...u, role: "user" })),
          "conflict",
        );
        await assertGatewayError(
          store.updateUser(root.id, (u) => ({ ...u, disabled: true })),
          "conflict",
        );
        await assertGatewayError(store.deleteUser(root.id), "conflict");
        assert.deepEqual(await store.getUserByEmail(root.email), root);
        // Changes that keep it an active admin are fine.
        await store.updateUser(root.id, (u) => ({ ...u, password_hash: "rehashed" }));
      });

      await t.step("two admins removing each other at once leave one of them", async () => {
        await store.updateUser(ops.id, (u) => ({ ...u, role: "admin" }));
        const results = await Promise.allSettled([
          store.updateUser(root.id, (u) => ({ ...u, disabled: true })),
          store.deleteUser(ops.id),
        ]);
        assert.equal(results.filter((r) => r.status === "fulfilled").length, 1, String(results));
        const rejected = results.find((r) => r.status === "rejected") as PromiseRejectedResult;
        assert.ok(rejected.reason instanceof GatewayError);
        assert.equal(rejected.reason.code, "conflict");
        const left = [await store.getUser(root.id), await store.getUser(ops.id)]
          .filter((u) => u !== null && u.role === "admin" && !u.disabled);
        assert.equal(left.length, 1);
      });

      await t.step("a deleted user is gone, its email free, and it is not counted", async () => {
        const before = await store.countUsers();
        const deleted = await store.deleteUser(carol.id);
        assert.equal(deleted.id, carol.id);
        assert.equal(await store.getUser(carol.id), null);
        assert.equal(await store.getUserByEmail(carol.email), null);
        assert.equal(await store.countUsers(), before - 1);
        await store.createUser({ ...carol, id: "id-carol-2" });
        assert.equal((await store.getUserByEmail(carol.email))?.id, "id-carol-2");
      });
    },
  );

  test("a user who owns devices that are not revoked cannot be deleted", async (t, store) => {
    const dave = user("dave");
    await store.createUser(dave);
    const revoke = (meterId: string, at: number) =>
      store.updateDevice(meterId, (d) => ({
        device: { ...d, status: "revoked", revoked_at: at, updated_at: at },
        audit: audit(meterId, "revoked", at),
      }));

    await t.step("two active meters: conflict, naming the count; nothing changes", async () => {
      await store.createDevice(device("dave-1", dave.id), audit("dave-1", "registered", T0));
      await store.createDevice(device("dave-2", dave.id), audit("dave-2", "registered", T0));
      await assert.rejects(store.deleteUser(dave.id), (error: unknown) => {
        assert.ok(error instanceof GatewayError);
        assert.equal(error.code, "conflict");
        assert.match(error.message, /2 meters/);
        return true;
      });
      assert.equal((await store.getUser(dave.id))?.id, dave.id);
    });

    await t.step("once every meter is revoked the user can be deleted", async () => {
      await revoke("dave-1", T0 + MIN);
      await assertGatewayError(store.deleteUser(dave.id), "conflict");
      await revoke("dave-2", T0 + MIN);
      assert.equal((await store.deleteUser(dave.id)).id, dave.id);
    });

    await t.step("ownerMustExist: a device for a missing user is refused", async () => {
      await assertGatewayError(
        store.createDevice(device("nobody-1", "id-nobody"), audit("nobody-1", "registered", T0), {
          ownerMustExist: true,
        }),
        "not_found",
      );
      assert.equal(await store.getDevice("nobody-1"), null);
    });

    await t.step(
      "a delete racing registrations: never a deleted owner with an active meter",
      async () => {
        for (let round = 0; round < 10; round++) {
          const eve = user(`eve-${round}`);
          await store.createUser(eve);
          const meter = `eve-${round}-m`;
          const results = await Promise.allSettled([
            store.createDevice(device(meter, eve.id), audit(meter, "registered", T0), {
              ownerMustExist: true,
            }),
            store.deleteUser(eve.id),
          ]);
          const [created, deleted] = results;
          assert.ok(
            created.status === "rejected" || deleted.status === "rejected",
            `round ${round}: both the registration and the delete succeeded`,
          );
          const owner = await store.getUser(eve.id);
          const stored = await store.getDevice(meter);
          assert.ok(owner !== null || stored === null, `round ${round}: an orphaned active meter`);
        }
      },
    );
  });

  test("devices are registered, updated and listed, with an audit trail", async (t, store) => {
    const m1 = device("meter-1", "user-1");

    await t.step("a registered device reads back as it was given", async () => {
      await store.createDevice(m1, audit("meter-1", "registered", T0));
      assert.deepEqual(await store.getDevice("meter-1"), m1);
      assert.equal(await store.getDevice("meter-unknown"), null);
    });

    await t.step("registering a known meter again is a conflict and changes nothing", async () => {
      const other = device("meter-1", "user-2", T0 + MIN);
      await assertGatewayError(
        store.createDevice(other, audit("meter-1", "registered", T0 + MIN)),
        "conflict",
      );
      assert.deepEqual(await store.getDevice("meter-1"), m1);
      assert.equal((await store.listAudit({ meter_id: "meter-1", limit: 10 })).length, 1);
    });

    await t.step("a rotation adds a key and retires the old one", async () => {
      const rotatedAt = T0 + 10 * MIN;
      const rotated: DeviceRecord = {
        ...m1,
        updated_at: rotatedAt,
        keys: [{ ...m1.keys[0], retired_at: rotatedAt }, key("k2", rotatedAt)],
      };
      const returned = await store.updateDevice("meter-1", () => ({
        device: rotated,
        audit: audit("meter-1", "rotated", rotatedAt, "k2"),
      }));
      assert.deepEqual(returned, rotated);
      const stored = await store.getDevice("meter-1");
      assert.deepEqual(stored, rotated);
      assert.deepEqual(stored!.keys.map((k) => k.key_id), ["k1", "k2"]);
    });

    await t.step("a revocation is stored", async () => {
      const current = (await store.getDevice("meter-1"))!;
      const revokedAt = T0 + 20 * MIN;
      const revoked: DeviceRecord = {
        ...current,
        status: "revoked",
        revoked_at: revokedAt,
        updated_at: revokedAt,
      };
      await store.updateDevice("meter-1", () => ({
        device: revoked,
        audit: audit("meter-1", "revoked", revokedAt),
      }));
      assert.deepEqual(await store.getDevice("meter-1"), revoked);
    });

    await t.step("devices are listed by meter id, optionally only one owner's", async () => {
      for (
        const [meter, owner] of [["meter-4", "user-1"], ["meter-2", "user-2"], [
          "meter-3",
          "user-1",
        ], ["meter-0", "user-2"]]
      ) {
        await store.createDevice(device(meter, owner), audit(meter, "registered", T0 + MIN));
      }
      const all = await store.listDevices({ limit: 100 });
      assert.deepEqual(all.items.map((d) => d.meter_id), [
        "meter-0",
        "meter-1",
        "meter-2",
        "meter-3",
        "meter-4",
      ]);
      assert.equal(all.next_cursor, null);
      const mine = await store.listDevices({ user_id: "user-1", limit: 100 });
      assert.deepEqual(mine.items.map((d) => d.meter_id), ["meter-1", "meter-3", "meter-4"]);
      assert.equal(mine.next_cursor, null);
      // The owner's listing shows the device as last updated, not as registered.
      assert.deepEqual(mine.items[0], await store.getDevice("meter-1"));
      assert.deepEqual((await store.listDevices({ user_id: "user-9", limit: 10 })).items, []);
    });

    await t.step("device pages visit every device exactly once", async () => {
      for (const user_id of [undefined, "user-1", "user-2"]) {
        const full = (await store.listDevices({ user_id, limit: 100 })).items.map((d) =>
          d.meter_id
        );
        for (const limit of [1, 2, 3, full.length]) {
          const seen: string[] = [];
          let cursor: string | undefined;
          for (let page = 0; page <= full.length; page++) {
            const res = await store.listDevices({ user_id, limit, cursor });
            assert.ok(res.items.length <= limit);
            seen.push(...res.items.map((d) => d.meter_id));
            if (res.next_cursor === null) break;
            cursor = res.next_cursor;
          }
          assert.deepEqual(seen, full, `user ${user_id}, limit ${limit}`);
        }
      }
    });

    await t.step("a malformed device cursor is rejected", async () => {
      await assertGatewayError(store.listDevices({ limit: 1, cursor: "%%%" }), "invalid_payload");
    });

    await t.step(
      "the audit log lists entries oldest first, per meter or all, up to a limit",
      async () => {
        const mine = await store.listAudit({ meter_id: "meter-1", limit: 10 });
        assert.deepEqual(mine.map((a) => a.action), ["registered", "rotated", "revoked"]);
        assert.deepEqual(mine[1], audit("meter-1", "rotated", T0 + 10 * MIN, "k2"));
        const all = await store.listAudit({ limit: 100 });
        assert.equal(all.length, 7);
        assert.deepEqual(all.map((a) => a.at), [...all.map((a) => a.at)].sort((a, b) => a - b));
        assert.equal(all[0].meter_id, "meter-1");
        assert.equal(all.at(-1)!.action, "revoked");
        assert.deepEqual(await store.listAudit({ limit: 1 }), all.slice(0, 1));
        assert.deepEqual(
          await store.listAudit({ meter_id: "meter-1", limit: 2 }),
          mine.slice(0, 2),
        );
        assert.deepEqual(await store.listAudit({ meter_id: "meter-9", limit: 10 }), []);
      },
    );

    await t.step("concurrent changes are applied one after the other, none lost", async () => {
      const before = (await store.getDevice("meter-1"))!;
      const addKey = (id: string) =>
        store.updateDevice("meter-1", (current) => ({
          device: { ...current, keys: [...current.keys, key(id, T0 + 30 * MIN)] },
          audit: audit("meter-1", "rotated", T0 + 30 * MIN + Number(id.slice(1)), id),
        }));
      await Promise.all([addKey("k3"), addKey("k4"), addKey("k5")]);
      const after = (await store.getDevice("meter-1"))!;
      assert.deepEqual(
        after.keys.map((k) => k.key_id).sort(),
        [...before.keys.map((k) => k.key_id), "k3", "k4", "k5"].sort(),
      );
      assert.equal(after.status, "revoked");
    });

    await t.step("a change that throws leaves the device untouched", async () => {
      const before = await store.getDevice("meter-1");
      await assert.rejects(
        store.updateDevice("meter-1", () => {
          throw new Error("refused");
        }),
        /refused/,
      );
      assert.deepEqual(await store.getDevice("meter-1"), before);
    });
  });

  test(
    "insertReadings stores new readings and reports duplicates in input order",
    async (t, store) => {
      await t.step("an empty batch has no results", async () => {
        assert.deepEqual(await store.insertReadings([]), []);
      });

      await t.step("a new reading is stored and reads back as given", async () => {
        const r = row("m-new", T0, { kwh_e4: 123_456, wallet_address: "0x" + "a".repeat(40) });
        assert.deepEqual(await store.insertReadings([r]), [stored(1)]);
        assert.deepEqual(await store.getReading("m-new", T0), { ...r, seq: 1 });
      });

      await t.step(
        "an exact replay is a duplicate of the stored reading and overwrites nothing",
        async () => {
          const original = row("m-replay", T0);
          await store.insertReadings([original]);
          const replay = row("m-replay", T0, {
            kwh_e4: 99,
            device_signature: "other",
            source: "http",
          });
          assert.deepEqual(await store.insertReadings([replay]), [dup(T0)]);
          assert.deepEqual(await store.getReading("m-replay", T0), { ...original, seq: 1 });
        },
      );

      await t.step(
        "a reading strictly within the window of a stored one is a duplicate",
        async () => {
          await store.insertReadings([row("m-near", T0)]);
          const results = await store.insertReadings([
            row("m-near", T0 + 14 * MIN + 59 * SEC),
            row("m-near", T0 + WINDOW - 1),
            row("m-near", T0 - 14 * MIN - 59 * SEC),
            row("m-near", T0 - WINDOW + 1),
            row("m-near", T0 + 1),
          ]);
          assert.deepEqual(results, [dup(T0), dup(T0), dup(T0), dup(T0), dup(T0)]);
          assert.equal(await store.getReading("m-near", T0 + 1), null);
        },
      );

      await t.step("a reading exactly one window away is stored", async () => {
        await store.insertReadings([row("m-edge", T0)]);
        assert.deepEqual(
          await store.insertReadings([row("m-edge", T0 + WINDOW), row("m-edge", T0 - WINDOW)]),
          [stored(2), stored(3)],
        );
      });

      await t.step("a duplicate names the stored reading it collides with", async () => {
        await store.insertReadings([row("m-between", T0), row("m-between", T0 + 20 * MIN)]);
        assert.deepEqual(
          await store.insertReadings([
            row("m-between", T0 + 3 * MIN),
            row("m-between", T0 + 17 * MIN),
          ]),
          [dup(T0), dup(T0 + 20 * MIN)],
        );
      });

      await t.step(
        "rows of one batch collide with rows stored earlier in the same batch",
        async () => {
          assert.deepEqual(
            await store.insertReadings([
              row("m-batch", T0),
              row("m-batch", T0 + MIN),
              row("m-batch", T0),
              row("m-batch", T0 + WINDOW),
              row("m-batch", T0 + WINDOW + 14 * MIN),
            ]),
            [stored(1), dup(T0), dup(T0), stored(2), dup(T0 + WINDOW)],
          );
        },
      );

      await t.step("a row colliding only with a rejected row of the batch is stored", async () => {
        assert.deepEqual(
          await store.insertReadings([
            row("m-chain", T0),
            row("m-chain", T0 + 10 * MIN),
            row("m-chain", T0 + 20 * MIN),
          ]),
          [stored(1), dup(T0), stored(2)],
        );
      });

      await t.step("a batch out of time order is judged in input order", async () => {
        assert.deepEqual(
          await store.insertReadings([
            row("m-order", T0 + 10 * MIN),
            row("m-order", T0),
            row("m-order", T0 + 30 * MIN),
            row("m-order", T0 + 40 * MIN),
          ]),
          [stored(1), dup(T0 + 10 * MIN), stored(2), dup(T0 + 30 * MIN)],
        );
      });

      await t.step("the same instant on different meters is stored for each", async () => {
        const meters = ["m-same-1", "m-same-2", "m-same-3"];
        assert.deepEqual(
          await store.insertReadings(meters.map((m) => row(m, T0))),
          [stored(1), stored(1), stored(1)],
        );
        for (const m of meters) assert.equal((await store.getReading(m, T0))?.meter_id, m);
      });

      await t.step("results of a mixed batch line up with its rows", async () => {
        const results = await store.insertReadings([
          row("m-mix-a", T0),
          row("m-replay", T0),
          row("m-mix-b", T0),
          row("m-mix-a", T0 + MIN),
          row("m-near", T0 + 2 * MIN),
          row("m-mix-b", T0 + WINDOW),
        ]);
        assert.deepEqual(results, [stored(1), dup(T0), stored(1), dup(T0), dup(T0), stored(2)]);
      });

      await t.step(
        "a large batch across many meters is stored and replays as duplicates",
        async () => {
          const rows: ReadingRow[] = [];
          for (let i = 0; i < 2_500; i++) {
            const meter = `m-bulk-${String(i % 50).padStart(2, "0")}`;
            const ts = T0 + Math.floor(i / 50) * WINDOW;
            rows.push(row(meter, ts, { user_id: "user-bulk", kwh_e4: 1_000 + i }));
          }
          const first = await store.insertReadings(rows);
          assert.equal(first.length, rows.length);
          // Each meter's rows are numbered in input order.
          assert.deepEqual(first, rows.map((_, i) => stored(Math.floor(i / 50) + 1)));
          const replay = await store.insertReadings(rows.map((r) => ({ ...r, ts: r.ts + MIN })));
          assert.deepEqual(replay, rows.map((r) => dup(r.ts)));
          const stats = await store.readingStats({ user_id: "user-bulk" });
          assert.equal(stats.reading_count, 2_500);
          assert.equal(stats.meter_count, 50);
          assert.equal(stats.kwh_e4, rows.reduce((sum, r) => sum + r.kwh_e4, 0));
          assert.deepEqual(await store.getReading("m-bulk-49", T0 + 49 * WINDOW), {
            ...rows[2_499],
            seq: 50,
          });
        },
      );
    },
  );

  test(
    "seq numbers each meter's stored readings 1, 2, 3, … and readingsAfter and lastSeqs resume",
    async (t, store) => {
      const a: ReadingRow[] = [];
      const b: ReadingRow[] = [];

      await t.step("lastSeqs is 0 for meters without readings", async () => {
        assert.deepEqual(await store.lastSeqs([]), new Map());
        assert.deepEqual(
          await store.lastSeqs(["seq-a", "seq-none", "seq-a"]),
          new Map([["seq-a", 0], ["seq-none", 0]]),
        );
        assert.deepEqual(await store.readingsAfter("seq-none", 0, 10), []);
      });

      await t.step("numbers are dense per meter, in input order, across calls", async () => {
        const first = [
          row("seq-a", T0 + 2 * WINDOW),
          row("seq-b", T0),
          row("seq-a", T0),
          row("seq-b", T0 + WINDOW),
        ];
        assert.deepEqual(await store.insertReadings(first), [
          stored(1),
          stored(1),
          stored(2),
          stored(2),
        ]);
        a.push(first[0], first[2]);
        b.push(first[1], first[3]);
        const second = [row("seq-a", T0 + 4 * WINDOW), row("seq-b", T0 + 2 * WINDOW)];
        assert.deepEqual(await store.insertReadings(second), [stored(3), stored(3)]);
        a.push(second[0]);
        b.push(second[1]);
      });

      await t.step("duplicates of any kind take no number", async () => {
        const results = await store.insertReadings([
          row("seq-a", T0), // an exact replay of a stored reading
          row("seq-a", T0 + 5 * WINDOW),
          row("seq-a", T0 + 5 * WINDOW), // the same key twice in one batch
          row("seq-a", T0 + 5 * WINDOW + MIN), // within the window of a row of the batch
          row("seq-a", T0 + 4 * WINDOW - MIN), // within the window of a stored reading
          row("seq-a", T0 + 7 * WINDOW),
        ]);
        assert.deepEqual(results, [
          dup(T0),
          stored(4),
          dup(T0 + 5 * WINDOW),
          dup(T0 + 5 * WINDOW),
          dup(T0 + 4 * WINDOW),
          stored(5),
        ]);
        a.push(row("seq-a", T0 + 5 * WINDOW), row("seq-a", T0 + 7 * WINDOW));
        assert.deepEqual(await store.insertReadings([row("seq-a", T0 + 7 * WINDOW)]), [
          dup(T0 + 7 * WINDOW),
        ]);
        assert.deepEqual(await store.insertReadings([row("seq-a", T0 + 8 * WINDOW)]), [
          stored(6),
        ]);
        a.push(row("seq-a", T0 + 8 * WINDOW));
      });

      await t.step("lastSeqs reports each meter's highest seq", async () => {
        assert.deepEqual(
          await store.lastSeqs(["seq-b", "seq-a", "seq-none"]),
          new Map([["seq-b", 3], ["seq-a", 6], ["seq-none", 0]]),
        );
      });

      await t.step("readingsAfter returns readings past a position, in seq order", async () => {
        const withSeq = (rows: ReadingRow[]) => rows.map((r, i) => ({ ...r, seq: i + 1 }));
        assert.deepEqual(await store.readingsAfter("seq-a", 0, 100), withSeq(a));
        assert.deepEqual(await store.readingsAfter("seq-b", 0, 100), withSeq(b));
        assert.deepEqual(await store.readingsAfter("seq-a", 4, 100), withSeq(a).slice(4));
        assert.deepEqual(await store.readingsAfter("seq-a", 6, 100), []);
        assert.deepEqual(await store.readingsAfter("seq-a", 60, 100), []);
      });

      await t.step("readingsAfter pages by limit without skipping or repeating", async () => {
        for (const limit of [1, 2, 4]) {
          const seen: ReadingRow[] = [];
          let after = 0;
          for (let page = 0;; page++) {
            assert.ok(page < 10, "too many pages");
            const items = await store.readingsAfter("seq-a", after, limit);
            assert.ok(items.length <= limit);
            if (items.length === 0) break;
            seen.push(...items);
            after = items.at(-1)!.seq!;
          }
          assert.deepEqual(seen.map((r) => r.seq), [1, 2, 3, 4, 5, 6], `limit ${limit}`);
          assert.deepEqual(seen.map((r) => r.ts), a.map((r) => r.ts), `limit ${limit}`);
        }
      });

      await t.step("readingsAfter refuses a bad position or limit", async () => {
        await assertGatewayError(store.readingsAfter("seq-a", -1, 10), "invalid_payload");
        await assertGatewayError(store.readingsAfter("seq-a", 1.5, 10), "invalid_payload");
        await assertGatewayError(store.readingsAfter("seq-a", 0, 0), "invalid_payload");
      });

      await t.step("a reading read back by its natural key carries its seq", async () => {
        assert.equal((await store.getReading("seq-a", T0 + 5 * WINDOW))?.seq, 4);
        const page = await store.listReadings({ meter_id: "seq-b", order: "asc", limit: 10 });
        assert.deepEqual(page.items.map((r) => r.seq), [1, 2, 3]);
      });
    },
  );

  test("recentReadingTimes lists a meter's newest timestamps first", async (t, store) => {
    const times = [T0 + 30 * MIN, T0, T0 + 60 * MIN, T0 + 15 * MIN, T0 + 45 * MIN];
    await store.insertReadings(times.map((ts) => row("m-recent", ts)));
    await store.insertReadings([row("m-other", T0 + 90 * MIN)]);

    await t.step("the newest readings come first, up to the limit", async () => {
      assert.deepEqual(await store.recentReadingTimes("m-recent", 3), [
        T0 + 60 * MIN,
        T0 + 45 * MIN,
        T0 + 30 * MIN,
      ]);
    });

    await t.step("a limit above the count returns every reading of the meter", async () => {
      assert.deepEqual(
        await store.recentReadingTimes("m-recent", 100),
        [...times].sort((a, b) => b - a),
      );
    });

    await t.step("a meter without readings has none", async () => {
      assert.deepEqual(await store.recentReadingTimes("m-none", 5), []);
    });
  });

  test("listReadings filters, orders and pages readings", async (t, store) => {
    // user-1 owns m-a and m-b (m-b shares instants with m-a); user-2 owns m-c.
    const rows: ReadingRow[] = [];
    for (let k = 0; k < 6; k++) {
      rows.push(row("m-a", T0 + k * WINDOW, { user_id: "user-1", minted: k === 1 || k === 4 }));
    }
    for (let k = 0; k < 4; k++) rows.push(row("m-b", T0 + k * WINDOW, { user_id: "user-1" }));
    for (let k = 0; k < 5; k++) {
      rows.push(row("m-c", T0 + k * WINDOW + 5 * MIN, { user_id: "user-2", minted: k === 2 }));
    }
    numbered(rows, await store.insertReadings(rows));
    // Readings at the same instant are ordered by meter id (SQL: ORDER BY ts, meter_id).
    const byTime = (a: ReadingRow, b: ReadingRow) =>
      a.ts - b.ts || (a.meter_id < b.meter_id ? -1 : a.meter_id > b.meter_id ? 1 : 0);
    const expect = (keep: (r: ReadingRow) => boolean) => rows.filter(keep).sort(byTime);
    const list = async (query: Partial<ReadingQuery>) =>
      await store.listReadings({ order: "asc", limit: 100, ...query });

    await t.step("by meter, in time order", async () => {
      const page = await list({ meter_id: "m-a" });
      assert.deepEqual(page.items, expect((r) => r.meter_id === "m-a"));
      assert.equal(page.next_cursor, null);
    });

    await t.step("by meter and owner, only when the owner matches", async () => {
      assert.deepEqual((await list({ meter_id: "m-a", user_id: "user-2" })).items, []);
      assert.deepEqual(
        (await list({ meter_id: "m-a", user_id: "user-1" })).items,
        expect((r) => r.meter_id === "m-a"),
      );
    });

    await t.step("by owner, across the owner's meters in time then meter order", async () => {
      assert.deepEqual(
        (await list({ user_id: "user-1" })).items,
        expect((r) => r.user_id === "user-1"),
      );
      assert.deepEqual((await list({ user_id: "user-9" })).items, []);
    });

    await t.step("without filters, every reading in time then meter order", async () => {
      assert.deepEqual((await list({})).items, expect(() => true));
    });

    await t.step("a time range includes `from` and excludes `to`", async () => {
      const from = T0 + WINDOW;
      const to = T0 + 3 * WINDOW;
      const inRange = (r: ReadingRow) => r.ts >= from && r.ts < to;
      assert.deepEqual((await list({ from, to })).items, expect(inRange));
      assert.deepEqual(
        (await list({ from, to, user_id: "user-1" })).items,
        expect((r) => inRange(r) && r.user_id === "user-1"),
      );
      assert.deepEqual(
        (await list({ from, to, meter_id: "m-c" })).items,
        expect((r) => inRange(r) && r.meter_id === "m-c"),
      );
      assert.deepEqual((await list({ from })).items, expect((r) => r.ts >= from));
      assert.deepEqual((await list({ to })).items, expect((r) => r.ts < to));
      assert.deepEqual((await list({ from: to, to: from })).items, []);
    });

    await t.step("the minted filter keeps only readings of that mint status", async () => {
      assert.deepEqual((await list({ minted: false })).items, expect((r) => !r.minted));
      assert.deepEqual((await list({ minted: true })).items, expect((r) => r.minted));
      assert.deepEqual(
        (await list({ minted: false, user_id: "user-1" })).items,
        expect((r) => !r.minted && r.user_id === "user-1"),
      );
      assert.deepEqual(
        (await list({ minted: true, meter_id: "m-a" })).items,
        expect((r) => r.minted && r.meter_id === "m-a"),
      );
    });

    await t.step("descending order is the exact reverse of ascending order", async () => {
      for (const filter of FILTERS) {
        assert.deepEqual(
          (await list({ ...filter, order: "desc" })).items,
          (await list(filter)).items.reverse(),
          JSON.stringify(filter),
        );
      }
    });

    await t.step("pages visit every reading exactly once, in either order", async () => {
      for (const filter of FILTERS) {
        for (const order of ["asc", "desc"] as const) {
          const full = (await list({ ...filter, order })).items;
          for (const limit of [1, 2, 3, 7, full.length]) {
            const seen: ReadingRow[] = [];
            let cursor: string | undefined;
            for (let page = 0; page <= full.length; page++) {
              const res = await list({ ...filter, order, limit, cursor });
              assert.ok(res.items.length <= limit);
              seen.push(...res.items);
              if (res.next_cursor === null) break;
              cursor = res.next_cursor;
            }
            assert.deepEqual(seen, full, `${JSON.stringify(filter)} ${order} limit ${limit}`);
          }
        }
      }
    });

    await t.step("a page that ends at the last reading has no next cursor", async () => {
      const first = await list({ meter_id: "m-b", limit: 2 });
      assert.equal(first.items.length, 2);
      assert.notEqual(first.next_cursor, null);
      const last = await list({ meter_id: "m-b", limit: 2, cursor: first.next_cursor! });
      assert.equal(last.items.length, 2);
      assert.equal(last.next_cursor, null);
    });

    await t.step("a malformed cursor is rejected as an invalid payload", async () => {
      const notJson = btoa("not json").replaceAll("=", "");
      const wrongShape = btoa(JSON.stringify({ a: 1 })).replaceAll("=", "");
      for (const cursor of ["%%%", notJson, wrongShape]) {
        await assertGatewayError(list({ cursor }), "invalid_payload");
      }
    });
  });

  test("filtered readings are reached by following cursors, however sparse", async (t, store) => {
    // 3 300 unminted readings of user-1 on three meters: filters that match nothing have plenty
    // to skip. An adapter may bound its scan and answer short or empty pages with a cursor.
    const rows: ReadingRow[] = [];
    for (let k = 0; k < 1_100; k++) {
      for (const meter of ["m-0", "m-1", "m-2"]) {
        rows.push(row(meter, T0 + k * WINDOW, { user_id: "user-1" }));
      }
    }
    numbered(rows, await store.insertReadings(rows));
    const byTime = (a: ReadingRow, b: ReadingRow) =>
      a.ts - b.ts || (a.meter_id < b.meter_id ? -1 : a.meter_id > b.meter_id ? 1 : 0);
    const queries: Partial<ReadingQuery>[] = [
      { minted: true },
      { minted: true, user_id: "user-1" },
      { minted: true, meter_id: "m-0" },
      { meter_id: "m-0", user_id: "user-2" },
    ];
    /** Follows cursors to the end and checks every page against the expected rows. */
    const assertPagesYieldMatches = async () => {
      const sorted = [...rows].sort(byTime);
      for (const query of queries) {
        const expected = sorted.filter((r) =>
          (query.minted === undefined || r.minted === query.minted) &&
          (query.user_id === undefined || r.user_id === query.user_id) &&
          (query.meter_id === undefined || r.meter_id === query.meter_id)
        );
        for (const order of ["asc", "desc"] as const) {
          for (const limit of [1, 10]) {
            const seen: ReadingRow[] = [];
            let cursor: string | undefined;
            for (let page = 0;; page++) {
              assert.ok(page < 200, `${JSON.stringify(query)} ${order}: too many pages`);
              const res = await store.listReadings({ ...query, order, limit, cursor });
              assert.ok(res.items.length <= limit);
              seen.push(...res.items);
              if (res.next_cursor === null) break;
              cursor = res.next_cursor;
            }
            assert.deepEqual(
              seen,
              order === "asc" ? expected : [...expected].reverse(),
              `${JSON.stringify(query)} ${order} limit ${limit}`,
            );
          }
        }
      }
    };

    await t.step("a filter matching none of many readings ends with no items", async () => {
      await assertPagesYieldMatches();
    });

    await t.step("sparse matches among many readings are each visited exactly once", async () => {
      const extra: ReadingRow[] = [];
      // Minted readings of another meter, spread over the whole span.
      for (const k of [0, 1, 550, 1_099]) {
        extra.push(row("m-mint", T0 + k * WINDOW + MIN, { user_id: "user-1", minted: true }));
      }
      // m-0 changes hands: a few readings of user-2 after user-1's, some of them minted.
      for (let j = 0; j < 3; j++) {
        extra.push(row("m-0", T0 + (1_100 + j) * WINDOW, { user_id: "user-2", minted: j !== 1 }));
      }
      numbered(extra, await store.insertReadings(extra));
      rows.push(...extra);
      await assertPagesYieldMatches();
    });
  });

  test("readingStats totals readings per owner and overall", async (t, store) => {
    await t.step("an empty store has zero totals and no first or last reading", async () => {
      assert.deepEqual(await store.readingStats({}), EMPTY_STATS);
      assert.deepEqual(await store.readingStats({ user_id: "user-1" }), EMPTY_STATS);
    });

    await t.step("totals count stored readings only, per owner and overall", async () => {
      const rows = [
        row("m-x", T0 + WINDOW, { user_id: "user-1", kwh_e4: 12_345 }),
        row("m-x", T0 + 3 * WINDOW, { user_id: "user-1", kwh_e4: 678_901 }),
        row("m-y", T0, { user_id: "user-1", kwh_e4: 1, minted: true }),
        row("m-z", T0 + 5 * WINDOW, { user_id: "user-2", kwh_e4: 1_000_000 }),
        // Duplicates: never counted.
        row("m-x", T0 + WINDOW + MIN, { user_id: "user-1", kwh_e4: 5_555 }),
        row("m-z", T0 + 5 * WINDOW, { user_id: "user-2", kwh_e4: 7_777 }),
      ];
      await store.insertReadings(rows);
      await store.insertReadings([row("m-y", T0, { user_id: "user-1", kwh_e4: 3 })]);
      assert.deepEqual(await store.readingStats({ user_id: "user-1" }), {
        meter_count: 2,
        reading_count: 3,
        kwh_e4: 12_345 + 678_901 + 1,
        minted_count: 1,
        first_ts: T0,
        last_ts: T0 + 3 * WINDOW,
      });
      assert.deepEqual(await store.readingStats({ user_id: "user-2" }), {
        meter_count: 1,
        reading_count: 1,
        kwh_e4: 1_000_000,
        minted_count: 0,
        first_ts: T0 + 5 * WINDOW,
        last_ts: T0 + 5 * WINDOW,
      });
      assert.deepEqual(await store.readingStats({}), {
        meter_count: 3,
        reading_count: 4,
        kwh_e4: 12_345 + 678_901 + 1 + 1_000_000,
        minted_count: 1,
        first_ts: T0,
        last_ts: T0 + 5 * WINDOW,
      });
    });

    await t.step("an owner without readings has zero totals", async () => {
      assert.deepEqual(await store.readingStats({ user_id: "user-9" }), EMPTY_STATS);
    });
  });

  test("getReading finds readings by natural key and ping answers", async (t, store) => {
    await t.step("getReading returns the stored row or null", async () => {
      const r = row("m-get", T0);
      await store.insertReadings([r]);
      assert.deepEqual(await store.getReading("m-get", T0), { ...r, seq: 1 });
      assert.equal(await store.getReading("m-get", T0 + 1), null);
      assert.equal(await store.getReading("m-missing", T0), null);
    });

    await t.step("ping resolves on a live store", async () => {
      await store.ping();
    });
  });
}

function stored(seq: number): InsertResult {
  return { status: "stored", seq };
}

/** Sets each row's `seq` from its result, asserting that every row was stored. */
function numbered(rows: ReadingRow[], results: InsertResult[]): void {
  assert.equal(results.length, rows.length);
  results.forEach((r, i) => {
    assert.equal(r.status, "stored", `row ${i} is stored`);
    if (r.status === "stored") rows[i].seq = r.seq;
  });
}

const EMPTY_STATS = {
  meter_count: 0,
  reading_count: 0,
  kwh_e4: 0,
  minted_count: 0,
  first_ts: null,
  last_ts: null,
};

// Filter combinations that pagination and ordering are checked under.
const FILTERS: Partial<ReadingQuery>[] = [
  { meter_id: "m-a" },
  { meter_id: "m-a", user_id: "user-1" },
  { user_id: "user-1" },
  {},
  { from: T0 + WINDOW, to: T0 + 4 * WINDOW },
  { minted: false },
  { minted: false, user_id: "user-1" },
  { minted: false, meter_id: "m-a" },
];

function dup(conflictTs: number): InsertResult {
  return { status: "duplicate", conflict_ts: conflictTs };
}

function row(meterId: string, ts: number, overrides: Partial<ReadingRow> = {}): ReadingRow {
  return {
    meter_id: meterId,
    ts,
    kwh_e4: 12_500,
    user_id: "user-1",
    wallet_address: null,
    key_id: "k1",
    device_signature: `sig-${meterId}-${ts}`,
    source: "mqtt",
    submitted_at: ts + SEC,
    minted: false,
    ...overrides,
  };
}

function user(name: string, role: UserRecord["role"] = "user"): UserRecord {
  return {
    id: `id-${name}`,
    email: `${name}@example.com`,
    role,
    wallet_address: null,
    created_at: T0,
    password_hash: `hash-of-${name}`,
    disabled: false,
    token_generation: 0,
  };
}

function key(keyId: string, createdAt: number): StoredKey {
  return {
    key_id: keyId,
    algorithm: "hmac-sha256",
    secret_enc: `sealed-${keyId}`,
    created_at: createdAt,
    retired_at: null,
  };
}

function device(meterId: string, userId: string, at = T0): DeviceRecord {
  return {
    meter_id: meterId,
    user_id: userId,
    status: "active",
    created_at: at,
    updated_at: at,
    revoked_at: null,
    keys: [key("k1", at)],
  };
}

function audit(
  meterId: string,
  action: AuditEntry["action"],
  at: number,
  keyId?: string,
): AuditEntry {
  const entry: AuditEntry = {
    id: `${meterId}-${action}-${at}`,
    meter_id: meterId,
    action,
    actor: "cli",
    at,
  };
  if (keyId !== undefined) entry.key_id = keyId;
  return entry;
}

async function assertGatewayError(promise: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof GatewayError, `expected a GatewayError, got ${error}`);
    assert.equal(error.code, code);
    return true;
  });
}
