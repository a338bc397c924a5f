// The per-meter resume sequence on PostgreSQL under concurrency (migration 0006): several
// stores (as several gateway instances) write the same meters at once while a reader checks
// that a seq it sees never has a hole below it.
import assert from "node:assert/strict";
import postgres from "postgres";
import type { ReadingRow } from "../core/reading.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
} from "./_services.ts";

const T0 = Date.UTC(2026, 10, 29, 10, 0, 0);
const SEC = 1000;
const PG_URL = postgresUrl();
const service = await requireService(`PostgreSQL at ${redactUrl(PG_URL)}`, probePostgres(PG_URL));
const skipped = service.ok ? "" : ` (skipped: ${service.reason})`;

function row(meter: string, ts: number, signature = `sig-${meter}-${ts}`): ReadingRow {
  return {
    meter_id: meter,
    ts,
    kwh_e4: 10_000,
    user_id: "u1",
    wallet_address: null,
    key_id: "k1",
    device_signature: signature,
    source: "mqtt",
    submitted_at: ts + SEC,
    minted: false,
  };
}

/** Asserts that `rows` are numbered 1, 2, 3, … in order, with no hole. */
function assertDensePrefix(rows: ReadingRow[], what: string): void {
  for (let i = 0; i < rows.length; i++) {
    if (rows[i].seq !== i + 1) {
      assert.fail(`${what}: position ${i} has seq ${rows[i].seq}, expected ${i + 1}`);
    }
  }
}

Deno.test({
  name: `PostgreSQL seqs stay dense and commit-ordered under concurrent writers${skipped}`,
  ignore: !service.ok,
  async fn() {
    const schema = await createTestSchema(PG_URL);
    const stores: PostgresStore[] = [];
    try {
      // A 1-minute window: only rows one minute apart or more are both stored.
      const open = () => PostgresStore.connect(schema.url, { dedupeWindowMs: 60 * SEC, max: 2 });
      const reader = await open();
      stores.push(reader);
      const WRITERS = 4;
      const writers = await Promise.all(Array.from({ length: WRITERS }, open));
      stores.push(...writers);
      const meters = ["c-0", "c-1", "c-2"];
      const BATCHES = 40;
      /** Seqs each meter's stored rows were given, as the writers were told. */
      const given = new Map(meters.map((m) => [m, [] as number[]]));
      let writing = true;
      // A failing reader stops the writers, so the failure is reported, not left behind.
      let stop = false;

      const write = async (store: PostgresStore, w: number) => {
        for (let b = 0; b < BATCHES && !stop; b++) {
          const rows: ReadingRow[] = [];
          for (let k = 0; k < 30; k++) {
            const meter = meters[(w + b + k) % meters.length];
            // Every writer draws from the same slots, so writers collide with each other's
            // rows (exact replays and near duplicates) as well as store their own.
            const slot = Math.floor(Math.random() * 600);
            const jitter = Math.random() < 0.3 ? 10 * SEC : 0;
            rows.push(row(meter, T0 + slot * 60 * SEC + jitter, `sig-${w}-${b}-${k}`));
          }
          const results = await store.insertReadings(rows);
          results.forEach((r, i) => {
            if (r.status === "stored") given.get(rows[i].meter_id)!.push(r.seq);
          });
        }
      };

      let checks = 0;
      const read = async () => {
        while (writing) {
          const last = await reader.lastSeqs(meters);
          for (const meter of meters) {
            const seen = await reader.readingsAfter(meter, 0, 1_000_000);
            assertDensePrefix(seen, `reader, meter ${meter}`);
            // lastSeqs was read first: everything up to it must be visible by now.
            assert.ok(
              seen.length >= last.get(meter)!,
              `meter ${meter}: lastSeqs said ${last.get(meter)}, only ${seen.length} visible`,
            );
            // Paging from a position seen sees the rest, without a hole either.
            const k = Math.floor(seen.length / 2);
            const rest = await reader.readingsAfter(meter, k, 1_000_000);
            assert.ok(rest.length >= seen.length - k);
            rest.forEach((r, i) => assert.equal(r.seq, k + 1 + i, `meter ${meter} after ${k}`));
          }
          checks++;
        }
      };

      const outcomes = await Promise.allSettled([
        read().catch((error) => {
          stop = true;
          throw error;
        }),
        Promise.all(writers.map(write)).finally(() => writing = false),
      ]);
      for (const outcome of outcomes) if (outcome.status === "rejected") throw outcome.reason;
      assert.ok(checks >= 3, `the reader ran ${checks} rounds while the writers wrote`);

      const last = await reader.lastSeqs(meters);
      for (const meter of meters) {
        const seqs = given.get(meter)!.sort((a, b) => a - b);
        const n = seqs.length;
        assert.ok(n > 50, `meter ${meter}: only ${n} rows stored`);
        assert.deepEqual(seqs, Array.from({ length: n }, (_, i) => i + 1), `meter ${meter}`);
        assert.equal(last.get(meter), n);
        const all = await reader.readingsAfter(meter, 0, 1_000_000);
        assertDensePrefix(all, `at the end, meter ${meter}`);
        assert.equal(all.length, n);
      }
    } finally {
      for (const store of stores) await store.close();
      await schema.drop();
    }
  },
});

Deno.test({
  name: `PostgreSQL seqs skip rows of other writers and of the previous release${skipped}`,
  ignore: !service.ok,
  async fn(t) {
    const schema = await createTestSchema(PG_URL);
    const store = await PostgresStore.connect(schema.url, { dedupeWindowMs: 60 * SEC, max: 2 });
    const sql = postgres(schema.url, { max: 2, onnotice: () => {} });
    try {
      await t.step("a row inserted meanwhile without the meter lock takes no number", async () => {
        // An outside writer inserts (uncommitted) a row the batch holds too; the batch's insert
        // waits for it, finds it skipped, and runs again, reporting it as a duplicate.
        const outside = row("x-1", T0);
        const reserved = await sql.reserve();
        try {
          await reserved`BEGIN`;
          await reserved`
            INSERT INTO meter_readings (meter_id, reading_timestamp, kwh_amount, user_id, key_id,
                                        device_signature, source, submitted_at)
            VALUES ('x-1', ${new Date(T0)}, 1, 'u1', 'k1', 'outside', 'mqtt', now())`;
          const pending = store.insertReadings([
            row("x-1", T0 + 10 * 60 * SEC),
            outside,
            row("x-1", T0 + 20 * 60 * SEC),
          ]);
          await new Promise((resolve) => setTimeout(resolve, 300));
          await reserved`COMMIT`;
          assert.deepEqual(await pending, [
            { status: "stored", seq: 1 },
            { status: "duplicate", conflict_ts: T0 },
            { status: "stored", seq: 2 },
          ]);
        } finally {
          reserved.release();
        }
        const seen = await store.readingsAfter("x-1", 0, 10);
        assert.deepEqual(seen.map((r) => [r.seq, r.ts]), [[1, T0 + 10 * 60 * SEC], [
          2,
          T0 + 20 * 60 * SEC,
        ]]);
        assert.deepEqual(await store.lastSeqs(["x-1"]), new Map([["x-1", 2]]));
      });

      await t.step("rows of the previous release's insert function have no seq", async () => {
        const ts = T0 + 60 * 60 * SEC;
        const [r] = await sql<{ n: number }[]>`
          SELECT count(*)::int AS n FROM gateway_insert_readings(
            ARRAY['x-1'], ARRAY['x-1'], ARRAY[${ts}::int8], ARRAY[10000::int8], ARRAY['u1'],
            ARRAY[NULL::text], ARRAY['k1'], ARRAY['old'], ARRAY['mqtt'], ARRAY[${ts}::int8],
            ARRAY[false], '1 minute'::interval)`;
        assert.equal(r.n, 0, "stored, no conflict");
        assert.deepEqual(
          await store.insertReadings([row("x-1", ts + 30 * SEC), row("x-1", ts + 90 * 60 * SEC)]),
          [{ status: "duplicate", conflict_ts: ts }, { status: "stored", seq: 3 }],
        );
        const old = await store.getReading("x-1", ts);
        assert.equal(old?.device_signature, "old");
        assert.equal(old?.seq, undefined);
        const seen = await store.readingsAfter("x-1", 0, 10);
        assert.deepEqual(seen.map((r) => r.seq), [1, 2, 3]);
      });
    } finally {
      await sql.end({ timeout: 5 });
      await store.close();
      await schema.drop();
    }
  },
});
