import assert from "node:assert/strict";
import postgres from "postgres";
import type { AuditEntry, DeviceRecord } from "../core/device.ts";
import { GatewayError } from "../core/errors.ts";
import type { ReadingRow } from "../core/reading.ts";
import type { UserRecord } from "../core/user.ts";
import { migrate } from "../db/migrate.ts";
import { PostgresStore, type PostgresStoreOptions } from "../db/postgres_store.ts";
import type { InsertResult } from "../db/store.ts";
import { storeContract } from "./contracts/store_contract.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
  type TestSchema,
} from "./_services.ts";

const MIN = 60_000;
const HOUR = 60 * MIN;
const DAY = 24 * HOUR;
const WINDOW = 15 * MIN;
const T0 = Date.UTC(2026, 10, 29, 10, 0, 0);

const PG_URL = postgresUrl();
const service = await requireService(`PostgreSQL at ${redactUrl(PG_URL)}`, probePostgres(PG_URL));
const ignore = !service.ok;
const skipped = service.ok ? "" : ` (skipped: ${service.reason})`;

storeContract(`PostgresStore${skipped}`, async (options) => {
  const schema = await createTestSchema(PG_URL);
  try {
    const store = await PostgresStore.connect(schema.url, { ...options, max: 4 });
    // Another instance: a pool of its own on the migrated schema.
    const open = () => PostgresStore.connect(schema.url, { ...options, max: 2, migrate: false });
    return { store, open, cleanup: schema.drop };
  } catch (error) {
    await schema.drop();
    throw error;
  }
}, { ignore });

/** What a PostgreSQL test gets: its own schema, and stores and raw pools closed for it. */
interface Db {
  schema: TestSchema;
  open(options?: Partial<PostgresStoreOptions>): Promise<PostgresStore>;
  raw(max?: number): postgres.Sql;
}

/** Registers a test with a fresh schema; everything it opens is closed, the schema dropped. */
function pgTest(name: string, fn: (t: Deno.TestContext, db: Db) => Promise<void>): void {
  Deno.test({
    name: `${name}${skipped}`,
    ignore,
    async fn(t) {
      const schema = await createTestSchema(PG_URL);
      const closers: (() => Promise<void>)[] = [];
      const db: Db = {
        schema,
        async open(options = {}) {
          const store = await PostgresStore.connect(schema.url, {
            dedupeWindowMs: WINDOW,
            max: 4,
            ...options,
          });
          closers.push(() => store.close());
          return store;
        },
        raw(max = 1) {
          const sql = postgres(schema.url, { max, onnotice: () => {} });
          closers.push(() => sql.end({ timeout: 5 }));
          return sql;
        },
      };
      try {
        await fn(t, db);
      } finally {
        for (const close of closers) await close();
        await schema.drop();
      }
    },
  });
}

function row(meterId: string, ts: number, overrides: Partial<ReadingRow> = {}): ReadingRow {
  return {
    meter_id: meterId,
    ts,
    kwh_e4: 10_000,
    user_id: "user-1",
    wallet_address: null,
    key_id: "k1",
    device_signature: `sig-${meterId}-${ts}`,
    source: "mqtt",
    submitted_at: ts + 1_000,
    minted: false,
    ...overrides,
  };
}

async function tableCount(sql: postgres.Sql, table: string): Promise<number> {
  const [r] = await sql<{ n: number }[]>`SELECT count(*)::int AS n FROM ${sql(table)}`;
  return r.n;
}

/** Pairs of stored readings of one meter strictly within the window: must always be 0. */
async function windowViolations(sql: postgres.Sql): Promise<number> {
  const [r] = await sql<{ n: number }[]>`
    SELECT count(*)::int AS n
    FROM meter_readings a JOIN meter_readings b
      ON a.meter_id = b.meter_id AND a.reading_timestamp < b.reading_timestamp
     AND b.reading_timestamp - a.reading_timestamp < ${`${WINDOW} milliseconds`}::interval`;
  return r.n;
}

async function assertGatewayError(promise: Promise<unknown>, code: string): Promise<void> {
  await assert.rejects(promise, (error: unknown) => {
    assert.ok(error instanceof GatewayError, `expected a GatewayError, got ${error}`);
    assert.equal(error.code, code);
    return true;
  });
}

pgTest("migrate() run twice at once applies every migration exactly once", async (t, db) => {
  const a = db.raw();
  const b = db.raw();

  await t.step("two concurrent runs succeed, one applying everything, one nothing", async () => {
    const [ra, rb] = await Promise.all([migrate(a), migrate(b)]);
    const [first, second] = ra.applied.length > 0 ? [ra, rb] : [rb, ra];
    assert.ok(first.applied.includes("0001_schema.sql"), JSON.stringify(first.applied));
    const files = first.applied.filter((name) => !name.startsWith("timescale/"));
    assert.deepEqual(files, [...files].sort());
    assert.deepEqual(second.applied, []);
    assert.equal(ra.timescale, rb.timescale);
  });

  await t.step("a third run finds nothing to do and changes nothing", async () => {
    const before = await a`SELECT name, checksum, applied_at FROM schema_migrations ORDER BY name`;
    const again = await migrate(a);
    assert.deepEqual(again.applied, []);
    const after = await a`SELECT name, checksum, applied_at FROM schema_migrations ORDER BY name`;
    assert.deepEqual(after, before);
  });

  await t.step("every table of the schema exists in the test schema", async () => {
    for (
      const table of [
        "users",
        "devices",
        "device_audit",
        "meter_readings",
        "reading_meters",
        "batch_jobs",
        "mints",
        "schema_migrations",
      ]
    ) {
      const [r] = await a<{ schema: string | null }[]>`
        SELECT (SELECT relnamespace::regnamespace::text FROM pg_class
                WHERE oid = to_regclass(${table})) AS schema`;
      assert.equal(r.schema, db.schema.name, table);
    }
  });
});

pgTest("two gateway instances starting at once on an empty schema both come up", async (_t, db) => {
  const [a, b] = await Promise.all([db.open(), db.open()]);
  assert.deepEqual(await a.insertReadings([row("m-start", T0)]), [stored(1)]);
  assert.deepEqual(await b.insertReadings([row("m-start", T0 + MIN)]), [dup(T0)]);
  const [r] = await db.raw()<{ n: number }[]>`
    SELECT count(*)::int AS n FROM schema_migrations WHERE name = '0001_schema.sql'`;
  assert.equal(r.n, 1);
});

pgTest("PostgresStore detects that TimescaleDB is not installed here", async (t, db) => {
  const sql = db.raw();
  const [ext] = await sql`SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb'`;

  await t.step("the store says which mode it runs in", async () => {
    const store = await db.open();
    if (ext === undefined) {
      assert.equal(store.timescale, false);
    } else {
      const [r] = await sql<{ cagg: boolean }[]>`
        SELECT to_regclass('meter_hourly_stats') IS NOT NULL AS cagg`;
      assert.equal(store.timescale, r.cagg);
    }
  });

  await t.step("timescale: false keeps plain PostgreSQL whatever is installed", async () => {
    const store = await db.open({ migrate: false, timescale: false });
    assert.equal(store.timescale, false);
  });
});

pgTest("PostgresStore without migrations refuses a schema that was never migrated", async () => {
  const schema = await createTestSchema(PG_URL);
  try {
    await assertGatewayError(
      PostgresStore.connect(schema.url, { dedupeWindowMs: WINDOW, migrate: false }),
      "unavailable",
    );
  } finally {
    await schema.drop();
  }
});

Deno.test({
  name: `PostgresStore reports an unreachable server as unavailable${skipped}`,
  ignore,
  async fn() {
    const url = new URL(PG_URL);
    url.port = "1";
    await assertGatewayError(
      PostgresStore.connect(url.href, { dedupeWindowMs: WINDOW }),
      "unavailable",
    );
    await assert.rejects(
      PostgresStore.connect("mysql://127.0.0.1/test", { dedupeWindowMs: WINDOW }),
      TypeError,
    );
  },
});

pgTest("hourly stats include a reading backfilled three days ago", async (t, db) => {
  const store = await db.open();
  const hour = Math.floor((Date.now() - 3 * DAY) / HOUR) * HOUR;
  const refresh = () => store.refreshHourlyStats(hour - 2 * HOUR, hour + 3 * HOUR);

  await t.step("readings of one hour are counted and summed exactly", async () => {
    const rows = [
      row("m-hourly", hour - 15 * MIN, { kwh_e4: 10_000 }), // 1.0, previous hour
      row("m-hourly", hour, { kwh_e4: 1_000 }), // 0.1
      row("m-hourly", hour + 15 * MIN, { kwh_e4: 2_000 }), // 0.2
      row("m-hourly", hour + 45 * MIN, { kwh_e4: 999_999 }), // 99.9999
      row("m-hourly", hour + 60 * MIN, { kwh_e4: 50_000 }), // 5.0, next hour
      row("m-other", hour + 30 * MIN, { kwh_e4: 77_777 }), // another meter: not counted
    ];
    assert.ok((await store.insertReadings(rows)).every((r) => r.status === "stored"));
    await refresh();
    assert.deepEqual(await store.hourlyStats("m-hourly", hour - HOUR, hour + 2 * HOUR), [
      { hour: hour - HOUR, count: 1, sum_kwh: 1, avg_kwh: 1, min_kwh: 1, max_kwh: 1 },
      {
        hour,
        count: 3,
        sum_kwh: 100.2999,
        avg_kwh: 33.43330000000000,
        min_kwh: 0.1,
        max_kwh: 99.9999,
      },
      { hour: hour + HOUR, count: 1, sum_kwh: 5, avg_kwh: 5, min_kwh: 5, max_kwh: 5 },
    ]);
  });

  await t.step("a late reading lands in its own hour's bucket", async () => {
    const late = row("m-hourly", hour + 30 * MIN, {
      kwh_e4: 123_456, // 12.3456
      source: "batch",
      submitted_at: Date.now(),
    });
    assert.equal((await store.insertReadings([late]))[0].status, "stored");
    // No refresh: a committed reading counts in its hour at once, in every mode.
    const [bucket] = await store.hourlyStats("m-hourly", hour, hour + HOUR);
    assert.deepEqual(bucket, {
      hour,
      count: 4,
      sum_kwh: 112.6455,
      avg_kwh: 28.161375,
      min_kwh: 0.1,
      max_kwh: 99.9999,
    });
  });

  await t.step("a range covers every hour it overlaps, whole", async () => {
    const stats = await store.hourlyStats("m-hourly", hour + 10 * MIN, hour + 61 * MIN);
    assert.deepEqual(stats.map((s) => s.hour), [hour, hour + HOUR]);
    assert.deepEqual(await store.hourlyStats("m-hourly", hour + HOUR, hour), []);
    assert.deepEqual(await store.hourlyStats("m-none", hour - DAY, hour + DAY), []);
  });
});

pgTest("strings that look like SQL are stored and found as plain data", async (t, db) => {
  const store = await db.open();
  const sql = db.raw();
  const evil = [
    "'; DROP TABLE meter_readings;--",
    '"; DROP TABLE users; --',
    "x' OR '1'='1",
    "\\'; SELECT pg_sleep(10);--",
    "NULL",
    '{"a",b}\\',
    "$1 $2 ?",
    "ü \u2028 😀 \t\n",
    "",
  ];

  await t.step("users, devices and audit entries round-trip every string", async () => {
    for (const [k, s] of evil.entries()) {
      const user: UserRecord = {
        id: `${s}#${k}`,
        email: `${s}#${k}@example.com`,
        role: "user",
        wallet_address: s,
        created_at: T0,
        password_hash: s,
        disabled: false,
        token_generation: 0,
      };
      await store.createUser(user);
      assert.deepEqual(await store.getUserByEmail(user.email), user);
      const device: DeviceRecord = {
        meter_id: `${s}#${k}`,
        user_id: s,
        status: "active",
        created_at: T0,
        updated_at: T0,
        revoked_at: null,
        keys: [{
          key_id: s,
          algorithm: "hmac-sha256",
          secret_enc: s,
          created_at: T0,
          retired_at: null,
        }],
      };
      const audit: AuditEntry = {
        id: `${s}#${k}`,
        meter_id: device.meter_id,
        action: "registered",
        actor: s,
        at: T0 + k,
        key_id: s,
        note: s,
      };
      await store.createDevice(device, audit);
      assert.deepEqual(await store.getDevice(device.meter_id), device);
      assert.deepEqual(await store.listAudit({ meter_id: device.meter_id, limit: 5 }), [audit]);
      const mine = await store.listDevices({ user_id: s, limit: 50 });
      assert.ok(mine.items.some((d) => d.meter_id === device.meter_id));
    }
    assert.equal(await store.countUsers(), evil.length);
  });

  await t.step("readings round-trip every string, in one batch and in a judged one", async () => {
    const rows = evil.map((s, k) =>
      row(`${s}#${k}`, T0, {
        user_id: s,
        wallet_address: s,
        key_id: s,
        device_signature: s,
      })
    );
    assert.deepEqual(await store.insertReadings(rows), rows.map(() => stored(1)));
    // Two rows of a meter within the window take the row-by-row path.
    const judged = evil.flatMap((s, k) => [
      row(`${s}~${k}`, T0, { user_id: s, key_id: s, device_signature: s }),
      row(`${s}~${k}`, T0 + MIN, { user_id: s, key_id: s, device_signature: s }),
    ]);
    assert.deepEqual(
      await store.insertReadings(judged),
      judged.map((_, i) => i % 2 === 0 ? stored(1) : dup(T0)),
    );
    for (const input of rows) {
      const r = { ...input, seq: 1 };
      assert.deepEqual(await store.getReading(r.meter_id, r.ts), r);
      const page = await store.listReadings({
        meter_id: r.meter_id,
        user_id: r.user_id,
        order: "asc",
        limit: 10,
      });
      assert.deepEqual(page.items, [r]);
      assert.equal((await store.readingStats({ user_id: r.user_id })).reading_count, 2);
      assert.deepEqual(await store.recentReadingTimes(r.meter_id, 5), [T0]);
    }
  });

  await t.step("lookups by such strings find nothing they should not", async () => {
    assert.equal(await store.getUser("x' OR '1'='1"), null);
    assert.equal(await store.getDevice("' OR 1=1 --"), null);
    assert.equal(await store.getReading("' OR 1=1 --", T0), null);
    assert.deepEqual(
      (await store.listReadings({ user_id: "' OR 1=1 --", order: "asc", limit: 10 })).items,
      [],
    );
  });

  await t.step("a source outside the allowed set is refused and stores nothing", async () => {
    const before = await tableCount(sql, "meter_readings");
    await assertGatewayError(
      store.insertReadings([
        row("m-src", T0, { source: "mqtt'); DROP TABLE users;--" as ReadingRow["source"] }),
      ]),
      "invalid_payload",
    );
    await assertGatewayError(
      store.insertReadings([row("m-nul", T0, { device_signature: "a\0b" })]),
      "invalid_payload",
    );
    assert.equal(await tableCount(sql, "meter_readings"), before);
  });

  await t.step("every table is still there", async () => {
    for (const table of ["meter_readings", "users", "devices", "device_audit"]) {
      const [r] = await sql<{ ok: boolean }[]>`SELECT to_regclass(${table}) IS NOT NULL AS ok`;
      assert.ok(r.ok, table);
    }
    assert.equal(await tableCount(sql, "meter_readings"), evil.length * 2);
  });
});

pgTest("a batch is written in one transaction with its meter locks", async (t, db) => {
  const store = await db.open();
  const sql = db.raw();

  await t.step("the rows' inserting transaction is the one that locked their meters", async () => {
    // The insert is pipelined behind the lock statement; queued after COMMIT instead, it would
    // run on its own, without the locks (a version that pipelined COMMIT too got this wrong).
    // New meters are locked by inserting their row (its xmin), known ones by locking it (xmax).
    const batch = (k: number) =>
      Array.from({ length: 50 }, (_, i) => row(`m-tx-${i % 5}`, T0 + (k * 50 + i) * WINDOW));
    const xids = async (k: number, lock: "xmin" | "xmax") =>
      await sql<{ reading: string; lock: string }[]>`
        SELECT DISTINCT r.xmin::text AS reading, ${sql.unsafe(`m.${lock}`)}::text AS lock
        FROM meter_readings r JOIN reading_meters m USING (meter_id)
        WHERE r.meter_id LIKE 'm-tx-%'
          AND r.reading_timestamp >= ${new Date(T0 + k * 50 * WINDOW)}
          AND r.reading_timestamp < ${new Date(T0 + (k + 1) * 50 * WINDOW)}`;
    for (const [k, lock] of [[0, "xmin"], [1, "xmax"]] as const) {
      const rows = batch(k);
      assert.deepEqual(
        await store.insertReadings(rows),
        rows.map((_, i) => stored(k * 10 + Math.floor(i / 5) + 1)),
      );
      const found = await xids(k, lock);
      assert.equal(found.length, 1, `batch ${k}: one writing and one locking transaction`);
      assert.notEqual(found[0].lock, "0", `batch ${k}: the meters were locked`);
      assert.equal(found[0].reading, found[0].lock, `batch ${k}: and they are the same`);
    }
  });
});

pgTest("two store instances writing overlapping batches store each reading once", async (t, db) => {
  const a = await db.open();
  const b = await db.open({ migrate: false });
  const sql = db.raw();

  await t.step("the same batch from both is stored once, the other copy a duplicate", async () => {
    const rows: ReadingRow[] = [];
    for (let i = 0; i < 600; i++) rows.push(row(`m-${i % 30}`, T0 + Math.floor(i / 30) * WINDOW));
    const [ra, rb] = await Promise.all([a.insertReadings(rows), b.insertReadings(rows)]);
    for (let i = 0; i < rows.length; i++) {
      assert.deepEqual([ra[i].status, rb[i].status].sort(), ["duplicate", "stored"], `row ${i}`);
      const dupOf = ra[i].status === "duplicate" ? ra[i] : rb[i];
      assert.deepEqual(dupOf, dup(rows[i].ts));
    }
    assert.equal(await tableCount(sql, "meter_readings"), 600);
  });

  await t.step("near duplicates from both are stored once per window", async () => {
    const base = T0 + 1_000 * WINDOW;
    const left = Array.from({ length: 40 }, (_, m) => row(`m-near-${m}`, base));
    const right = Array.from({ length: 40 }, (_, m) => row(`m-near-${m}`, base + 5 * MIN));
    const [ra, rb] = await Promise.all([a.insertReadings(left), b.insertReadings(right)]);
    for (let m = 0; m < 40; m++) {
      const outcomes = [ra[m], rb[m]];
      assert.equal(outcomes.filter((r) => r.status === "stored").length, 1, `meter ${m}`);
      const stored = ra[m].status === "stored" ? left[m].ts : right[m].ts;
      assert.deepEqual(outcomes.find((r) => r.status === "duplicate"), dup(stored));
    }
    assert.equal(await windowViolations(sql), 0);
  });

  await t.step("random overlapping batches from four writers never break the window", async () => {
    const base = T0 + 10_000 * WINDOW;
    let seed = 42;
    const random = () => (seed = (seed * 1_103_515_245 + 12_345) % 2 ** 31) / 2 ** 31;
    const batch = (writer: number) =>
      Array.from(
        { length: 1_500 },
        (_, i) =>
          row(`m-rand-${Math.floor(random() * 200)}`, base + Math.floor(random() * 96) * 5 * MIN, {
            device_signature: `w${writer}-${i}`,
          }),
      );
    const batches = [0, 1, 2, 3].map(batch);
    const writers = [a, b, a, b];
    const results = await Promise.all(batches.map((rows, w) => writers[w].insertReadings(rows)));
    assert.equal(await windowViolations(sql), 0);
    // Every "stored" is in the table with that writer's signature; every duplicate points at
    // a stored reading of its meter within the window.
    const stored = new Map<string, string>();
    for (
      const r of await sql<{ meter_id: string; ts: number; sig: string }[]>`
      SELECT meter_id, (extract(epoch FROM reading_timestamp) * 1000)::float8 AS ts,
             device_signature AS sig
      FROM meter_readings WHERE meter_id LIKE 'm-rand-%'`
    ) stored.set(`${r.meter_id}@${r.ts}`, r.sig);
    let storedCount = 0;
    batches.forEach((rows, w) =>
      rows.forEach((r, i) => {
        const result = results[w][i];
        if (result.status === "stored") {
          storedCount++;
          assert.equal(stored.get(`${r.meter_id}@${r.ts}`), r.device_signature);
        } else {
          assert.ok(Math.abs(result.conflict_ts - r.ts) < WINDOW);
          assert.ok(stored.has(`${r.meter_id}@${result.conflict_ts}`));
        }
      })
    );
    assert.equal(storedCount, stored.size);
  });
});

pgTest("a batch of 25 000 meters is stored in one call", async (_t, db) => {
  // Meters are locked by row locks: as many advisory locks in one transaction exhaust the
  // server's shared lock table with its default settings.
  const store = await db.open();
  const rows = Array.from({ length: 25_000 }, (_, i) => row(`m-wide-${i}`, T0));
  const results = await store.insertReadings(rows);
  assert.ok(results.every((r) => r.status === "stored"));
  const replay = await store.insertReadings(rows.map((r) => ({ ...r, ts: r.ts + MIN })));
  assert.deepEqual(replay, rows.map(() => dup(T0)));
  assert.equal((await store.readingStats({})).meter_count, 25_000);
});

pgTest("deleteOlderThan removes old readings in bounded chunks", async (t, db) => {
  const store = await db.open();
  const cutoff = T0 + 25 * WINDOW;
  const rows = [
    ...Array.from({ length: 25 }, (_, i) => row(`m-old-${i % 3}`, T0 + i * WINDOW)),
    ...Array.from({ length: 5 }, (_, i) => row("m-new", cutoff + i * WINDOW)),
  ];
  await store.insertReadings(rows);

  await t.step("old rows go in chunks of at most the given size", async () => {
    const chunks: number[] = [];
    const deleted = await store.deleteOlderThan(cutoff, 10, { onChunk: (n) => chunks.push(n) });
    assert.equal(deleted, 25);
    assert.deepEqual(chunks, [10, 10, 5]);
  });

  await t.step("rows at or after the cutoff stay", async () => {
    const left = await store.listReadings({ order: "asc", limit: 100 });
    assert.deepEqual(left.items, rows.slice(25).map((r, i) => ({ ...r, seq: i + 1 })));
    assert.equal(await store.deleteOlderThan(cutoff, 10), 0);
  });

  await t.step("an aborted run stops before the next chunk", async () => {
    await store.insertReadings([row("m-old-9", T0)]);
    const controller = new AbortController();
    controller.abort();
    await assert.rejects(store.deleteOlderThan(cutoff, 10, { signal: controller.signal }));
    assert.equal((await store.readingStats({})).reading_count, 6);
  });
});

function stored(seq: number): InsertResult {
  return { status: "stored", seq };
}

function dup(conflictTs: number): InsertResult {
  return { status: "duplicate", conflict_ts: conflictTs };
}
