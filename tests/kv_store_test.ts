import assert from "node:assert/strict";
import { GatewayError } from "../core/errors.ts";
import type { ReadingRow } from "../core/reading.ts";
import { KvStore } from "../db/kv_store.ts";
import type { ReadingQuery, StoreOptions } from "../db/store.ts";
import { storeContract } from "./contracts/store_contract.ts";

const MIN = 60_000;
const OPTIONS: StoreOptions = { dedupeWindowMs: 15 * MIN };
const T0 = Date.UTC(2026, 10, 29, 10, 0, 0);

storeContract("KvStore", async (options) => {
  const dir = await Deno.makeTempDir({ prefix: "kv_store_test_" });
  const store = await KvStore.open(`${dir}/gateway.kv`, options);
  // Another process's handle on the same file.
  const open = () => KvStore.open(`${dir}/gateway.kv`, options);
  return { store, open, cleanup: () => Deno.remove(dir, { recursive: true }) };
});

/** Runs `fn` with a temp directory that is removed afterwards. */
async function withTempDir(fn: (dir: string) => Promise<void>): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "kv_store_test_" });
  try {
    await fn(dir);
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
}

function row(meterId: string, ts: number, overrides: Partial<ReadingRow> = {}): ReadingRow {
  return {
    meter_id: meterId,
    ts,
    kwh_e4: 10_000,
    user_id: "user-1",
    wallet_address: null,
    key_id: "k1",
    device_signature: "sig",
    source: "mqtt",
    submitted_at: ts,
    minted: false,
    ...overrides,
  };
}

Deno.test("KvStore keeps its data when the file is closed and opened again", async () => {
  await withTempDir(async (dir) => {
    const path = `${dir}/gateway.kv`;
    const first = await KvStore.open(path, OPTIONS);
    await first.createUser({
      id: "u1",
      email: "a@example.com",
      role: "user",
      wallet_address: null,
      created_at: T0,
      password_hash: "h",
    });
    await first.insertReadings([row("m1", T0), row("m1", T0 + 15 * MIN)]);
    await first.close();

    const again = await KvStore.open(path, OPTIONS);
    try {
      assert.equal(await again.countUsers(), 1);
      assert.equal((await again.getUserByEmail("a@example.com"))?.id, "u1");
      assert.deepEqual(await again.recentReadingTimes("m1", 10), [T0 + 15 * MIN, T0]);
      // The reopened store still knows what it stored: replays stay duplicates.
      assert.deepEqual(await again.insertReadings([row("m1", T0 + MIN)]), [
        { status: "duplicate", conflict_ts: T0 },
      ]);
      assert.equal((await again.readingStats({})).reading_count, 2);
    } finally {
      await again.close();
    }
  });
});

Deno.test("KvStore reopened judges against the meter's real first and last readings", async (t) => {
  // A meter's stored head is written only with its first readings and new owners, so its times
  // are stale once more readings came: a reopened store must not trust them.
  await withTempDir(async (dir) => {
    const path = `${dir}/gateway.kv`;
    const first = await KvStore.open(path, OPTIONS);
    await first.insertReadings([row("m1", T0)]); // head written: [T0, T0]
    await first.insertReadings([row("m1", T0 + 60 * MIN)]); // same owner: head not rewritten
    await first.insertReadings([row("m1", T0 - 60 * MIN)]);
    await first.close();

    const again = await KvStore.open(path, OPTIONS);
    try {
      await t.step("a reading near the newest one is a duplicate of it", async () => {
        assert.deepEqual(await again.insertReadings([row("m1", T0 + 65 * MIN)]), [
          { status: "duplicate", conflict_ts: T0 + 60 * MIN },
        ]);
      });
      await t.step("a reading near the oldest one is a duplicate of it", async () => {
        assert.deepEqual(await again.insertReadings([row("m1", T0 - 70 * MIN)]), [
          { status: "duplicate", conflict_ts: T0 - 60 * MIN },
        ]);
      });
      await t.step("readings clear of both are stored", async () => {
        assert.deepEqual(
          await again.insertReadings([row("m1", T0 + 90 * MIN), row("m1", T0 - 90 * MIN)]),
          // Numbered on from the reopened file's last seq.
          [{ status: "stored", seq: 4 }, { status: "stored", seq: 5 }],
        );
        assert.deepEqual(await again.recentReadingTimes("m1", 10), [
          T0 + 90 * MIN,
          T0 + 60 * MIN,
          T0,
          T0 - 60 * MIN,
          T0 - 90 * MIN,
        ]);
      });
      await t.step(
        "the meter is counted once for its owner, and again for a new owner",
        async () => {
          assert.equal((await again.readingStats({ user_id: "user-1" })).meter_count, 1);
          await again.insertReadings([row("m1", T0 + 200 * MIN, { user_id: "user-2" })]);
          assert.equal((await again.readingStats({ user_id: "user-2" })).meter_count, 1);
          assert.equal((await again.readingStats({})).meter_count, 1);
          assert.equal((await again.readingStats({})).reading_count, 6);
        },
      );
    } finally {
      await again.close();
    }
  });
});

Deno.test("KvStore without a path keeps its data in memory only", async () => {
  const first = await KvStore.open(undefined, OPTIONS);
  await first.insertReadings([row("m1", T0)]);
  assert.equal((await first.readingStats({})).reading_count, 1);
  await first.close();
  const second = await KvStore.open(undefined, OPTIONS);
  assert.equal((await second.readingStats({})).reading_count, 0);
  await second.close();
});

Deno.test("KvStore takes an open handle and closes it on close", async () => {
  const kv = await Deno.openKv(":memory:");
  const store = new KvStore(kv, OPTIONS);
  await store.ping();
  await store.close();
  await store.close(); // closing twice is harmless
  await assert.rejects(() => kv.get(["anything"]));
});

Deno.test("KvStore rejects rows whose time or energy is not a whole number", async () => {
  const store = await KvStore.open(undefined, OPTIONS);
  try {
    for (
      const bad of [
        row("m1", T0 + 0.5),
        row("m1", T0, { kwh_e4: 1.5 }),
        row("m1", T0, { kwh_e4: -1 }),
      ]
    ) {
      await assert.rejects(
        store.insertReadings([bad]),
        (e: unknown) => e instanceof GatewayError && e.code === "invalid_payload",
      );
    }
    assert.equal((await store.readingStats({})).reading_count, 0);
  } finally {
    await store.close();
  }
});

Deno.test("KvStore reports updating an unregistered device as not found", async () => {
  const store = await KvStore.open(undefined, OPTIONS);
  try {
    await assert.rejects(
      store.updateDevice("ghost", (current) => ({
        device: { ...current, status: "revoked", revoked_at: T0 },
        audit: { id: "a1", meter_id: "ghost", action: "revoked", actor: "cli", at: T0 },
      })),
      (e: unknown) => e instanceof GatewayError && e.code === "not_found",
    );
    assert.deepEqual(await store.listAudit({ limit: 10 }), []);
  } finally {
    await store.close();
  }
});

Deno.test("KvStore splits big batches within the commit limits of Deno KV", async (t) => {
  const store = await KvStore.open(undefined, OPTIONS);
  try {
    await t.step("one meter's rows spanning many commits are all stored", async () => {
      const rows = Array.from({ length: 1_500 }, (_, i) => row("m-long", T0 + i * 15 * MIN));
      const results = await store.insertReadings(rows);
      assert.ok(results.every((r) => r.status === "stored"));
      assert.equal((await store.recentReadingTimes("m-long", 2_000)).length, 1_500);
      const replay = await store.insertReadings(rows);
      assert.deepEqual(replay, rows.map((r) => ({ status: "duplicate", conflict_ts: r.ts })));
    });

    await t.step("rows with the longest ids and signatures fit the byte limits", async () => {
      const rows: ReadingRow[] = [];
      for (let i = 0; i < 3_000; i++) {
        rows.push(row(`m${String(i % 150).padStart(3, "0")}${"x".repeat(60)}`, T0 + i * MIN * 15, {
          user_id: `user-${i % 7}-${"ü".repeat(120)}`,
          wallet_address: "W".repeat(44),
          key_id: "k".repeat(64),
          device_signature: "s".repeat(256),
        }));
      }
      const results = await store.insertReadings(rows);
      assert.ok(results.every((r) => r.status === "stored"));
      const stats = await store.readingStats({});
      assert.equal(stats.reading_count, 4_500);
      assert.equal(stats.meter_count, 151);
    });
  } finally {
    await store.close();
  }
});

Deno.test("KvStore handles racing writers on one file without storing anything twice", async (t) => {
  await withTempDir(async (dir) => {
    const path = `${dir}/gateway.kv`;
    const a = await KvStore.open(path, OPTIONS);
    const b = await KvStore.open(path, OPTIONS);
    try {
      await t.step("the same batch from two writers is stored once", async () => {
        const rows: ReadingRow[] = [];
        for (let i = 0; i < 600; i++) {
          rows.push(row(`m-${i % 30}`, T0 + Math.floor(i / 30) * 15 * MIN));
        }
        const [ra, rb] = await Promise.all([a.insertReadings(rows), b.insertReadings(rows)]);
        for (let i = 0; i < rows.length; i++) {
          const outcomes = [ra[i].status, rb[i].status].sort();
          assert.deepEqual(outcomes, ["duplicate", "stored"], `row ${i}`);
        }
        // Whichever handle stored a row, each meter's numbers are 1 .. 20, once each.
        const seqs = await b.lastSeqs(Array.from({ length: 30 }, (_, m) => `m-${m}`));
        for (let m = 0; m < 30; m++) {
          assert.equal(seqs.get(`m-${m}`), 20);
          const numbered = await a.readingsAfter(`m-${m}`, 0, 100);
          assert.deepEqual(numbered.map((r) => r.seq), Array.from({ length: 20 }, (_, k) => k + 1));
        }
        const stats = await a.readingStats({});
        assert.equal(stats.reading_count, 600);
        assert.equal(stats.meter_count, 30);
        assert.equal(stats.kwh_e4, 600 * 10_000);
      });

      await t.step("near duplicates from two writers are stored once per window", async () => {
        const base = T0 + 1_000 * 15 * MIN;
        const left = Array.from({ length: 40 }, (_, m) => row(`m-near-${m}`, base));
        const right = Array.from({ length: 40 }, (_, m) => row(`m-near-${m}`, base + 5 * MIN));
        const [ra, rb] = await Promise.all([a.insertReadings(left), b.insertReadings(right)]);
        for (let m = 0; m < 40; m++) {
          const stored = [ra[m], rb[m]].filter((r) => r.status === "stored");
          assert.equal(stored.length, 1, `meter m-near-${m}`);
          assert.equal((await a.recentReadingTimes(`m-near-${m}`, 10)).length, 1);
        }
        assert.equal((await b.readingStats({})).meter_count, 70);
      });

      await t.step(
        "a write of the other writer is seen despite what a writer remembers",
        async () => {
          const base = T0 + 2_000 * 15 * MIN;
          // a learns the meter's last reading, b writes a later one behind a's back; a's next row
          // is past what a knew but within the window of b's reading.
          assert.deepEqual(await a.insertReadings([row("m-late", base)]), [
            { status: "stored", seq: 1 },
          ]);
          assert.deepEqual(await b.insertReadings([row("m-late", base + 20 * MIN)]), [
            { status: "stored", seq: 2 },
          ]);
          assert.deepEqual(await a.insertReadings([row("m-late", base + 30 * MIN)]), [
            { status: "duplicate", conflict_ts: base + 20 * MIN },
          ]);
          assert.deepEqual(await a.recentReadingTimes("m-late", 10), [base + 20 * MIN, base]);
        },
      );
    } finally {
      await a.close();
      await b.close();
    }
  });
});

Deno.test("KvStore decides overlapping calls on one handle as if one after the other", async () => {
  const store = await KvStore.open(undefined, OPTIONS);
  try {
    const left = Array.from({ length: 50 }, (_, m) => row(`m-${m}`, T0));
    const right = Array.from({ length: 50 }, (_, m) => row(`m-${m}`, T0 + 5 * MIN));
    const [rl, rr] = await Promise.all([store.insertReadings(left), store.insertReadings(right)]);
    assert.ok(rl.every((r) => r.status === "stored"));
    assert.deepEqual(rr, right.map(() => ({ status: "duplicate", conflict_ts: T0 })));
    assert.equal((await store.readingStats({})).reading_count, 50);
  } finally {
    await store.close();
  }
});

Deno.test("KvStore examines at most max(1000, 10 × limit) entries per filtered page", async (t) => {
  const store = await KvStore.open(undefined, OPTIONS);
  try {
    const rows = Array.from({ length: 2_500 }, (_, i) => row("m1", T0 + i * 15 * MIN));
    await store.insertReadings(rows);
    /** Follows cursors to the end; returns every page's item count. */
    const pages = async (query: Omit<ReadingQuery, "order">): Promise<number[]> => {
      const counts: number[] = [];
      let cursor: string | undefined;
      do {
        const page = await store.listReadings({ ...query, order: "asc", cursor });
        counts.push(page.items.length);
        cursor = page.next_cursor ?? undefined;
      } while (cursor !== undefined && counts.length < 100);
      return counts;
    };

    await t.step("a filter matching nothing answers empty pages with a cursor", async () => {
      const first = await store.listReadings({ minted: true, order: "asc", limit: 10 });
      assert.deepEqual(first.items, []);
      assert.notEqual(first.next_cursor, null);
      // 2 500 index entries at 1 000 per call, then the end.
      assert.deepEqual(await pages({ minted: true, limit: 10 }), [0, 0, 0]);
      assert.deepEqual(await pages({ minted: true, user_id: "user-1", limit: 10 }), [0, 0, 0]);
      assert.deepEqual(await pages({ meter_id: "m1", user_id: "user-2", limit: 10 }), [0, 0, 0]);
    });

    await t.step("the budget grows with the limit", async () => {
      assert.deepEqual(await pages({ minted: true, limit: 200 }), [0, 0]);
      assert.deepEqual(await pages({ minted: true, limit: 300 }), [0]);
    });

    await t.step("a full page whose budget runs out resumes where the scan stopped", async () => {
      // Ten minted readings among the first twenty index entries fill a page of ten; the search
      // for an eleventh runs out of budget at entry 1 000, and the next page starts there.
      const minted = Array.from(
        { length: 10 },
        (_, i) => row("m2", T0 + i * 15 * MIN, { minted: true }),
      );
      await store.insertReadings(minted);
      assert.deepEqual(await pages({ minted: true, limit: 10 }), [10, 0, 0]);
    });
  } finally {
    await store.close();
  }
});
