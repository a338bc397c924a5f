import assert from "node:assert/strict";
import type { AuditEntry, DeviceRecord, StoredKey } from "../../core/device.ts";
import { GatewayError } from "../../core/errors.ts";
import type { ReadingRow } from "../../core/reading.ts";
import type { UserRecord } from "../../core/user.ts";
import type { BatchJob } from "../../core/batch.ts";
import type {
  InsertResult,
  NewBatchJob,
  ReadingQuery,
  Store,
  StoreOptions,
} from "../../db/store.ts";

/** A store under test and how to dispose of what it made. */
export interface StoreFixture {
  store: Store;
  /**
   * Opens another handle on the same backend (another pool, another KV handle on the file), as
   * a second gateway instance would; the test closes it. Without it, concurrency steps use
   * `store` twice.
   */
  open?: () => Promise<Store>;
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
  const test = (
    title: string,
    fn: (t: Deno.TestContext, store: Store, open?: () => Promise<Store>) => Promise<void>,
  ) => {
    Deno.test({
      name: `${name}: ${title}`,
      ignore: options.ignore ?? false,
      sanitizeOps: options.sanitizeOps ?? true,
      sanitizeResources: options.sanitizeResources ?? true,
      async fn(t) {
        const fixture = await factory({ dedupeWindowMs: WINDOW });
        try {
          await fn(t, fixture.store, fixture.open);
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

  test(
    "batch jobs are created once per idempotency key, read back, listed and counted",
    async (t, store) => {
      await t.step(
        "a new job is queued, claimable from its creation, with no attempt",
        async () => {
          const { job, created } = await store.createBatchJob(newJob("j1", "u1", "key-1"), [1, 2]);
          assert.equal(created, true);
          assert.deepEqual(job, expectedJob(newJob("j1", "u1", "key-1")));
          assert.deepEqual(await store.getBatchJob("j1"), job);
          assert.equal(await store.getBatchJob("nope"), null);
        },
      );

      await t.step("the same user and key return that job, whatever the body", async () => {
        const again = await store.createBatchJob(
          { ...newJob("j1b", "u1", "key-1", T0 + 5, 1), body_sha256: "other" },
          [3],
        );
        assert.equal(again.created, false);
        assert.deepEqual(again.job, await store.getBatchJob("j1"));
        assert.equal(await store.getBatchJob("j1b"), null);
      });

      await t.step("ten concurrent submissions with one key make one job", async () => {
        const results = await Promise.all(
          Array.from(
            { length: 10 },
            (_, i) => store.createBatchJob(newJob(`race-${i}`, "u1", "key-race", T0 + 10, 1), [i]),
          ),
        );
        assert.equal(results.filter((r) => r.created).length, 1);
        assert.equal(new Set(results.map((r) => r.job.id)).size, 1);
      });

      await t.step("another user's key, or no key, makes another job", async () => {
        const other = await store.createBatchJob(newJob("j2", "u2", "key-1", T0 + 20, 0), []);
        assert.equal(other.created, true);
        assert.equal(other.job.id, "j2");
        for (const id of ["j3", "j4"]) {
          const r = await store.createBatchJob(newJob(id, "u1", null, T0 + 30, 1), [id]);
          assert.equal(r.created, true);
        }
      });

      await t.step("jobs are listed newest first, by user and by status", async () => {
        const all = await store.listBatchJobs({ limit: 100 });
        const ids = all.items.map((j) => j.id);
        assert.equal(ids.length, 5);
        assert.equal(all.next_cursor, null);
        const times = all.items.map((j) => j.created_at);
        assert.deepEqual(times, [...times].sort((a, b) => b - a));
        const u1 = await store.listBatchJobs({ user_id: "u1", limit: 100 });
        assert.deepEqual(u1.items.map((j) => j.id).sort(), ids.filter((id) => id !== "j2").sort());
        const queued = await store.listBatchJobs({ status: "queued", user_id: "u2", limit: 100 });
        assert.deepEqual(queued.items.map((j) => j.id), ["j2"]);
        const none = await store.listBatchJobs({ status: "dead", limit: 100 });
        assert.deepEqual(none.items, []);
      });

      await t.step("pages visit every job exactly once", async () => {
        for (const query of [{}, { user_id: "u1" }, { status: "queued" as const }]) {
          const seen: string[] = [];
          let cursor: string | undefined;
          do {
            const page = await store.listBatchJobs({ ...query, limit: 2, cursor });
            seen.push(...page.items.map((j) => j.id));
            cursor = page.next_cursor ?? undefined;
          } while (cursor !== undefined);
          const all = await store.listBatchJobs({ ...query, limit: 100 });
          assert.deepEqual(seen, all.items.map((j) => j.id));
        }
        await assertGatewayError(
          store.listBatchJobs({ limit: 2, cursor: "x!" }),
          "invalid_payload",
        );
      });

      await t.step("jobs are counted by status", async () => {
        assert.deepEqual(await store.countBatchJobs(), {
          queued: 5,
          running: 0,
          completed: 0,
          failed: 0,
          dead: 0,
        });
      });
    },
  );

  test("a job's readings come back exactly, however large", async (t, store) => {
    // ~10,000 readings of ~250 bytes: far more than one Deno KV value (64 KiB) or commit.
    const readings = Array.from({ length: 10_000 }, (_, i) => ({
      meter_id: `meter-${i % 97}`,
      timestamp: new Date(T0 + i * MIN).toISOString(),
      kwh_amount: i % 7 === 0 ? 0.0001 * i : i,
      signature: "ab".repeat(64),
      note: i % 1000 === 0 ? "ünïcødé ✓ \u0000 \ud83d\ude00" : null,
      // (No -0: JSON has none.)
      nested: { ok: i % 2 === 0, list: [i, 5 - i, 1.5] },
    }));
    await t.step("a claim returns them as submitted, in order", async () => {
      await store.createBatchJob(newJob("big", "u1", null, T0, readings.length), readings);
      const claimed = await store.claimBatchJob("runner", T0 + 1, 30 * SEC);
      assert.equal(claimed?.job.id, "big");
      assert.equal(claimed!.readings.length, readings.length);
      assert.deepEqual(claimed!.readings, readings);
    });

    await t.step("a job without readings has none", async () => {
      await store.createBatchJob(newJob("empty", "u1", null, T0 + 1, 0), []);
      const claimed = await store.claimBatchJob("runner", T0 + 2, 30 * SEC);
      assert.equal(claimed?.job.id, "empty");
      assert.deepEqual(claimed!.readings, []);
    });

    await t.step("many errors are recorded and read back exactly", async () => {
      const errors = Array.from({ length: 8_000 }, (_, i) => ({
        index: i,
        meter_id: i % 3 === 0 ? null : `meter-${i}`,
        code: "bad_signature" as const,
        message: `The signature of reading ${i} does not verify ✗`,
      }));
      const progress = { successful: 2_000, failed: 8_000, duplicates: 0, errors };
      assert.equal(await store.heartbeatBatchJob("big", "runner", T0 + MIN, progress), true);
      assert.deepEqual((await store.getBatchJob("big"))!.errors, errors);
      const done = { status: "completed" as const, ...progress, errors: errors.slice(0, 10) };
      assert.equal(await store.finishBatchJob("big", "runner", done, T0 + 2 * SEC), true);
      const job = (await store.getBatchJob("big"))!;
      assert.deepEqual(job.errors, errors.slice(0, 10));
      assert.equal(job.successful, 2_000);
    });
  });

  test("a job is created with the errors found at submission", async (t, store) => {
    const LEASE = 30 * SEC;
    const refused = (index: number) => ({
      index,
      meter_id: index % 2 === 0 ? null : `meter-${index}`,
      code: index % 3 === 0 ? "forbidden" as const : "invalid_payload" as const,
      message: `Reading ${index} is refused ✗`,
    });

    await t.step("they are stored with the job, in index order, and claimed with it", async () => {
      const errors = [refused(3), refused(0)];
      const input = { ...newJob("pre", "u1", null, T0, 5), failed: 2, errors };
      const { job } = await store.createBatchJob(input, [0, 1, 2, 3, 4]);
      const expected = { ...expectedJob(input), errors: [refused(0), refused(3)] };
      assert.deepEqual(job, expected);
      assert.deepEqual(await store.getBatchJob("pre"), expected);
      const claimed = await store.claimBatchJob("a", T0 + 1, LEASE);
      assert.deepEqual(claimed?.job.errors, expected.errors);
      assert.equal(claimed?.job.failed, 2);
      const done = { status: "completed" as const, successful: 3, failed: 2, duplicates: 0 };
      assert.equal(await store.finishBatchJob("pre", "a", done, T0 + 2), true);
      assert.deepEqual((await store.getBatchJob("pre"))!.errors, expected.errors);
    });

    await t.step("however many there are", async () => {
      // ~10,000 errors of ~90 bytes: more than one Deno KV commit holds.
      const errors = Array.from({ length: 10_000 }, (_, i) => refused(i));
      const input = {
        ...newJob("all-refused", "u1", null, T0 + 10, 10_000),
        failed: 10_000,
        errors,
      };
      await store.createBatchJob(input, errors.map((e) => e.index));
      const job = (await store.getBatchJob("all-refused"))!;
      assert.deepEqual(job.errors, errors);
      assert.equal(job.failed, 10_000);
      const claimed = await store.claimBatchJob("a", T0 + 11, LEASE);
      assert.equal(claimed?.job.id, "all-refused");
      assert.deepEqual(claimed!.job.errors, errors);
    });

    await t.step("errors that do not match the job are refused", async () => {
      const base = newJob("bad", "u1", null, T0 + 20, 2);
      const cases = [
        { ...base, failed: 1 },
        { ...base, failed: 1, errors: [refused(2)] },
        { ...base, failed: 2, errors: [refused(1), refused(1)] },
        { ...base, failed: 1, errors: [{ ...refused(0), code: "duplicate" as const }] },
      ];
      for (const input of cases) {
        await assert.rejects(
          store.createBatchJob(input, [0, 1]),
          (e) => e instanceof TypeError || e instanceof RangeError,
        );
      }
      assert.equal(await store.getBatchJob("bad"), null);
    });
  });

  test(
    "batch jobs are claimed oldest first, leased to one runner, taken over when the lease ends",
    async (t, store) => {
      const LEASE = 1000 * SEC;
      await t.step("nothing to claim in an empty store", async () => {
        assert.equal(await store.claimBatchJob("a", T0, LEASE), null);
      });

      await t.step("the oldest claimable job is claimed, starting an attempt", async () => {
        await store.createBatchJob(newJob("second", "u1", null, T0 + 2, 1), ["s"]);
        await store.createBatchJob(newJob("first", "u1", null, T0 + 1, 1), ["f"]);
        await store.createBatchJob(newJob("later", "u1", null, T0 + 100 * SEC, 1), ["l"]);
        const claimed = await store.claimBatchJob("a", T0 + 10, LEASE);
        assert.deepEqual(claimed, {
          job: {
            ...expectedJob(newJob("first", "u1", null, T0 + 1, 1)),
            status: "running",
            attempts: 1,
            started_at: T0 + 10,
            updated_at: T0 + 10,
            lease_owner: "a",
            lease_until: T0 + 10 + LEASE,
          },
          readings: ["f"],
        });
        assert.deepEqual(await store.getBatchJob("first"), claimed!.job);
        assert.equal((await store.claimBatchJob("b", T0 + 20, LEASE))?.job.id, "second");
      });

      await t.step("a job whose run_after is ahead is not claimed before it", async () => {
        // `later` was created (and may run) only at T0 + 100 s.
        assert.equal(await store.claimBatchJob("c", T0 + 30, LEASE), null);
        assert.equal((await store.claimBatchJob("c", T0 + 100 * SEC, LEASE))?.job.id, "later");
        assert.equal(
          await store.finishBatchJob("later", "c", {
            status: "queued",
            run_after: T0 + 200 * SEC,
            last_error: "store down",
          }, T0 + 101 * SEC),
          true,
        );
        const requeued = (await store.getBatchJob("later"))!;
        assert.equal(requeued.status, "queued");
        assert.equal(requeued.last_error, "store down");
        assert.equal(requeued.lease_owner, null);
        assert.equal(requeued.attempts, 1);
        assert.equal(await store.claimBatchJob("c", T0 + 199 * SEC, 1), null);
        const again = await store.claimBatchJob("c", T0 + 200 * SEC, LEASE);
        assert.equal(again?.job.id, "later");
        assert.equal(again!.job.attempts, 2);
        assert.equal(again!.job.started_at, T0 + 100 * SEC);
      });

      await t.step("heartbeats extend the lease and record progress", async () => {
        const progress = {
          successful: 1,
          failed: 1,
          duplicates: 0,
          errors: [{ index: 0, meter_id: null, code: "invalid_payload" as const, message: "x" }],
        };
        assert.equal(await store.heartbeatBatchJob("first", "a", T0 + 2 * LEASE, progress), true);
        const job = (await store.getBatchJob("first"))!;
        assert.equal(job.lease_until, T0 + 2 * LEASE);
        assert.equal(job.successful, 1);
        assert.deepEqual(job.errors, progress.errors);
        assert.equal(await store.heartbeatBatchJob("first", "a", T0 + 2 * LEASE + 1), true);
      });

      await t.step("an expired lease is taken over, and the old runner is refused", async () => {
        const now = T0 + 2 * LEASE + 2;
        const taken = await store.claimBatchJob("b2", now, LEASE);
        assert.equal(taken?.job.id, "first");
        assert.equal(taken!.job.attempts, 2);
        assert.equal(taken!.job.lease_owner, "b2");
        assert.equal(taken!.job.started_at, T0 + 10);
        const before = await store.getBatchJob("first");
        assert.equal(await store.heartbeatBatchJob("first", "a", now + LEASE), false);
        assert.equal(
          await store.finishBatchJob("first", "a", { status: "completed" }, now + 1),
          false,
        );
        assert.deepEqual(await store.getBatchJob("first"), before);
        assert.equal(await store.heartbeatBatchJob("nope", "a", now + LEASE), false);
      });

      await t.step("a finished job keeps its counts and is no one's any more", async () => {
        const now = T0 + 3 * LEASE;
        assert.equal(
          await store.finishBatchJob("first", "b2", {
            status: "completed",
            successful: 1,
            failed: 0,
            duplicates: 0,
            errors: [],
          }, now),
          true,
        );
        const job = (await store.getBatchJob("first"))!;
        assert.equal(job.status, "completed");
        assert.equal(job.finished_at, now);
        assert.equal(job.updated_at, now);
        assert.equal(job.lease_owner, null);
        assert.equal(job.lease_until, null);
        assert.deepEqual(job.errors, []);
        assert.equal(await store.heartbeatBatchJob("first", "b2", now + LEASE), false);
        assert.equal(await store.finishBatchJob("first", "b2", { status: "failed" }, now), false);
      });

      await t.step("only dead or failed jobs are retried, with attempts reset", async () => {
        await assertGatewayError(store.retryBatchJob("first", T0), "conflict");
        await assertGatewayError(store.retryBatchJob("later", T0), "conflict");
        await assertGatewayError(store.retryBatchJob("nope", T0), "not_found");
        const now = T0 + 4 * LEASE;
        assert.equal(
          await store.finishBatchJob("second", "b", {
            status: "dead",
            last_error: "attempts exhausted",
          }, now),
          true,
        );
        assert.deepEqual(await store.countBatchJobs(), {
          queued: 0,
          running: 1,
          completed: 1,
          failed: 0,
          dead: 1,
        });
        const retried = await store.retryBatchJob("second", now + 1);
        assert.equal(retried.status, "queued");
        assert.equal(retried.attempts, 0);
        assert.equal(retried.finished_at, null);
        assert.equal(retried.run_after, now + 1);
        assert.deepEqual(await store.getBatchJob("second"), retried);
        const claimed = await store.claimBatchJob("d", now + 1, LEASE);
        assert.equal(claimed?.job.id, "second");
        assert.equal(claimed!.job.attempts, 1);
        assert.deepEqual(claimed!.readings, ["s"]);
      });

      await t.step("purging deletes finished jobs finished before the cutoff only", async () => {
        const now = T0 + 5 * LEASE;
        assert.equal(
          await store.finishBatchJob("second", "d", { status: "failed" }, now),
          true,
        );
        // `first` finished at T0 + 3 LEASE, `second` at T0 + 5 LEASE; `later` is running.
        assert.equal(await store.purgeBatchJobs(T0 + 3 * LEASE), 0);
        assert.equal(await store.purgeBatchJobs(T0 + 4 * LEASE), 1);
        assert.equal(await store.getBatchJob("first"), null);
        assert.notEqual(await store.getBatchJob("second"), null);
        assert.equal(await store.purgeBatchJobs(T0 + 1000 * LEASE), 1);
        assert.equal(await store.getBatchJob("second"), null);
        assert.equal((await store.getBatchJob("later"))?.status, "running");
        assert.deepEqual((await store.listBatchJobs({ limit: 10 })).items.map((j) => j.id), [
          "later",
        ]);
        assert.deepEqual(await store.countBatchJobs(), {
          queued: 0,
          running: 1,
          completed: 0,
          failed: 0,
          dead: 0,
        });
      });
    },
  );

  test("two runners claiming at once never get one job", async (t, store, open) => {
    const other = open === undefined ? store : await open();
    try {
      for (let round = 0; round < 5; round++) {
        await t.step(`round ${round}: exactly one of two claimers gets the job`, async () => {
          const id = `contested-${round}`;
          await store.createBatchJob(newJob(id, "u1", null, T0 + round, 1), [round]);
          const now = T0 + 1000 + round;
          const [a, b] = await Promise.all([
            store.claimBatchJob("a", now, MIN),
            other.claimBatchJob("b", now, MIN),
          ]);
          const winners = [a, b].filter((c) => c !== null);
          assert.equal(winners.length, 1);
          assert.equal(winners[0]!.job.id, id);
          assert.equal(winners[0]!.job.attempts, 1);
        });
      }
    } finally {
      if (other !== store) await other.close();
    }
  });

  test("readingsOfBatchJob finds the readings a job stored", async (t, store) => {
    const ours = [
      row("m-b1", T0, { source: "batch", batch_job_id: "job-1" }),
      row("m-b2", T0, { source: "batch", batch_job_id: "job-1" }),
      row("m-b1", T0 + WINDOW, { source: "batch", batch_job_id: "job-1" }),
    ];
    const others = [
      row("m-b1", T0 + 2 * WINDOW),
      row("m-b3", T0, { source: "batch", batch_job_id: "job-2" }),
    ];
    await t.step("rows with and without a job are stored", async () => {
      const results = await store.insertReadings([ours[0], others[0], ours[1], others[1]]);
      assert.ok(results.every((r) => r.status === "stored"));
      assert.ok((await store.insertReadings([ours[2]])).every((r) => r.status === "stored"));
    });

    await t.step("each job finds exactly its own", async () => {
      const key = (r: { meter_id: string; ts: number }) => `${r.meter_id}@${r.ts}`;
      const found = await store.readingsOfBatchJob("job-1");
      assert.deepEqual(found.map(key).sort(), ours.map(key).sort());
      assert.deepEqual(await store.readingsOfBatchJob("job-2"), [{ meter_id: "m-b3", ts: T0 }]);
      assert.deepEqual(await store.readingsOfBatchJob("job-none"), []);
    });

    await t.step("rows read back carry their job, and rows of none have none", async () => {
      const got = await store.getReading("m-b1", T0);
      assert.equal(got?.batch_job_id, "job-1");
      const plain = await store.getReading("m-b1", T0 + 2 * WINDOW);
      assert.ok(plain !== null && !("batch_job_id" in plain));
      const after = await store.readingsAfter("m-b1", 0, 10);
      assert.deepEqual(after.map((r) => r.batch_job_id), ["job-1", undefined, "job-1"]);
      const listed = await store.listReadings({ meter_id: "m-b2", order: "asc", limit: 10 });
      assert.equal(listed.items[0].batch_job_id, "job-1");
    });
  });
}

function newJob(
  id: string,
  userId: string,
  key: string | null,
  createdAt = T0,
  total = 2,
): NewBatchJob {
  return {
    id,
    user_id: userId,
    idempotency_key: key,
    body_sha256: `sha-of-${id}`,
    total_submitted: total,
    created_at: createdAt,
    failed: 0,
    errors: [],
  };
}

function expectedJob(job: NewBatchJob): BatchJob {
  return {
    ...job,
    status: "queued",
    successful: 0,
    duplicates: 0,
    attempts: 0,
    last_error: null,
    started_at: null,
    finished_at: null,
    updated_at: job.created_at,
    run_after: job.created_at,
    lease_owner: null,
    lease_until: null,
  };
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
