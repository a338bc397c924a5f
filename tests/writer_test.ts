import assert from "node:assert/strict";
import type { ReadingRow } from "../core/reading.ts";
import { KvStore } from "../db/kv_store.ts";
import { WriterClient, type WriterOptions } from "../workers/writer_client.ts";
import { decodeResults, decodeRows, encodeResults, encodeRows } from "../workers/row_codec.ts";
import type { Logger } from "../core/logger.ts";
import type { InsertResult } from "../db/store.ts";
import {
  createTestSchema,
  postgresUrl,
  probePostgres,
  redactUrl,
  requireService,
} from "./_services.ts";

const WINDOW = 15 * 60_000;
const T0 = Date.parse("2026-11-29T00:00:00Z");

function row(meter: string, i: number): ReadingRow {
  return {
    meter_id: meter,
    ts: T0 + i * WINDOW,
    kwh_e4: 12_345 + i,
    user_id: "u1",
    wallet_address: i % 2 ? null : "0x" + "ab".repeat(20),
    key_id: "k1",
    device_signature: "ff".repeat(32),
    source: "mqtt",
    submitted_at: T0 + i,
    minted: false,
  };
}

async function withWriter(
  options: Partial<WriterOptions>,
  fn: (writer: WriterClient, path: string) => Promise<void>,
): Promise<void> {
  const dir = await Deno.makeTempDir({ prefix: "writer-test-" });
  const path = `${dir}/w.kv`;
  const writer = await WriterClient.start({
    spec: { kind: "kv", path },
    storeOptions: { dedupeWindowMs: WINDOW },
    batchMax: 100,
    flushMs: 2,
    queueMax: 10_000,
    ...options,
  });
  try {
    await fn(writer, path);
  } finally {
    await writer.close();
    await Deno.remove(dir, { recursive: true });
  }
}

Deno.test("encodeRows() and decodeRows() round-trip rows through one buffer", () => {
  const rows = [row("m-1", 0), row("m.2:x_y", 1)];
  assert.deepEqual(decodeRows(encodeRows(rows)), rows);
  assert.deepEqual(decodeRows(encodeRows([])), []);
});

Deno.test("encodeRows() and decodeRows() carry a row's batch job, and only where it has one", () => {
  const rows: ReadingRow[] = [
    { ...row("m-1", 0), source: "batch", batch_job_id: "job-1" },
    row("m-2", 1),
    { ...row("m-3", 2), source: "batch", batch_job_id: "job-2" },
  ];
  const decoded = decodeRows(encodeRows(rows));
  assert.deepEqual(decoded, rows);
  assert.ok(!("batch_job_id" in decoded[1]));
});

Deno.test("WriterClient stores each row's batch job with it", async () => {
  let path = "";
  await withWriter({ batchMax: 10, flushMs: 2 }, async (writer, p) => {
    path = p;
    const rows = [
      { ...row("wb1", 0), source: "batch" as const, batch_job_id: "job-w" },
      row("wb2", 0),
    ];
    const results = await Promise.all(rows.map((r) => writer.submit(r)!));
    assert.deepEqual(results.map((r) => r.status), ["stored", "stored"]);
    await writer.close();
    const store = await KvStore.open(path, { dedupeWindowMs: WINDOW });
    try {
      assert.equal((await store.getReading("wb1", rows[0].ts))?.batch_job_id, "job-w");
      assert.ok(!("batch_job_id" in (await store.getReading("wb2", rows[1].ts))!));
      assert.deepEqual(await store.readingsOfBatchJob("job-w"), [{ meter_id: "wb1", ts: T0 }]);
    } finally {
      await store.close();
    }
  });
});

Deno.test("encodeResults() and decodeResults() round-trip seqs and conflicts", () => {
  const results: InsertResult[] = [
    { status: "stored", seq: 1 },
    { status: "duplicate", conflict_ts: -5 },
    { status: "stored", seq: 2 ** 40 },
    { status: "duplicate", conflict_ts: T0 },
  ];
  assert.deepEqual(decodeResults(encodeResults(results)), results);
  assert.deepEqual(decodeResults(encodeResults([])), []);
});

Deno.test("WriterClient calls onCommitted once per batch with its stored rows' seqs", async () => {
  const calls: ReadingRow[][] = [];
  await withWriter({
    batchMax: 10,
    flushMs: 10_000,
    onCommitted: (rows) => {
      calls.push(rows);
    },
  }, async (writer) => {
    // Three batches of ten; the second holds a replay of a row of the first.
    const rows = Array.from({ length: 30 }, (_, i) => row(`m${i % 3}`, i));
    rows[15] = { ...rows[0], submitted_at: rows[0].submitted_at + 1 };
    const results = await Promise.all(rows.map((r, i) =>
      writer.submit(r)!.then((result) => {
        // By the time a row's promise resolves, its batch was handed to onCommitted.
        const batch = Math.floor(i / 10);
        assert.ok(calls.length > batch, `batch ${batch} committed before row ${i} resolved`);
        return result;
      })
    ));
    assert.equal(calls.length, 3);
    assert.deepEqual(calls.map((c) => c.length), [10, 9, 10]);
    const published = calls.flat();
    const stored = rows.filter((_, i) => i !== 15);
    // Each a copy of its row, with the seq its result reports: 1, 2, 3, … per meter.
    assert.deepEqual(published.map(({ seq: _, ...r }) => r), stored);
    const perMeter = new Map<string, number[]>();
    for (const r of published) {
      perMeter.set(r.meter_id, [...perMeter.get(r.meter_id) ?? [], r.seq!]);
    }
    assert.deepEqual(perMeter.get("m0"), [1, 2, 3, 4, 5, 6, 7, 8, 9]);
    assert.deepEqual(perMeter.get("m1"), [1, 2, 3, 4, 5, 6, 7, 8, 9, 10]);
    const seqs = results.flatMap((r) => r.status === "stored" ? [r.seq] : []);
    assert.deepEqual(seqs, published.map((r) => r.seq));
    assert.deepEqual(results[15], { status: "duplicate", conflict_ts: rows[0].ts });
    assert.equal(rows[0].seq, undefined, "the submitted rows are left as they were");
  });
});

Deno.test("WriterClient answers a batch once the promise onCommitted returns settled", async () => {
  const gate = Promise.withResolvers<void>();
  let committed = false;
  await withWriter({
    batchMax: 2,
    flushMs: 10_000,
    onCommitted: () => {
      committed = true;
      return gate.promise; // the cache invalidation of the batch
    },
  }, async (writer) => {
    let answered = false;
    const results = Promise.all([row("w1", 0), row("w2", 0)].map((r) => writer.submit(r)!))
      .then((r) => {
        answered = true;
        return r;
      });
    while (!committed) await new Promise((resolve) => setTimeout(resolve, 1));
    // Committed, but its invalidation is still running: nobody has been told yet.
    await new Promise((resolve) => setTimeout(resolve, 20));
    assert.equal(answered, false);
    gate.resolve();
    assert.deepEqual((await results).map((r) => r.status), ["stored", "stored"]);
  });
});

Deno.test("WriterClient goes on when onCommitted throws, and logs it", async () => {
  const errors: string[] = [];
  const logger: Logger = {
    debug() {},
    info() {},
    warn() {},
    error: (msg) => errors.push(msg),
    child: () => logger,
    enabled: () => true,
  };
  let calls = 0;
  await withWriter({
    batchMax: 5,
    flushMs: 10_000,
    logger,
    onCommitted: () => {
      calls++;
      throw new Error("subscriber failed");
    },
  }, async (writer) => {
    for (let round = 0; round < 2; round++) {
      const results = await Promise.all(
        Array.from({ length: 5 }, (_, i) => writer.submit(row("m-throw", round * 5 + i))!),
      );
      const seqs = results.map((r) => r.status === "stored" ? r.seq : 0);
      assert.deepEqual(seqs, [1, 2, 3, 4, 5].map((k) => round * 5 + k));
    }
    assert.equal(calls, 2);
    assert.deepEqual(errors, ["onCommitted failed", "onCommitted failed"]);
  });
});

Deno.test("WriterClient batches by size and reports one result per row", async () => {
  await withWriter({ batchMax: 10, flushMs: 10_000 }, async (writer) => {
    const results = await Promise.all(
      Array.from({ length: 30 }, (_, i) => writer.submit(row(`m${i % 3}`, i))!),
    );
    assert.equal(results.length, 30);
    assert.ok(results.every((r) => r.status === "stored"));
    assert.equal(writer.stats.maxBatchSize, 10);
    assert.equal(writer.stats.rows, 30);
  });
});

Deno.test("WriterClient flushes a lone row after the linger time", async () => {
  await withWriter({ batchMax: 1000, flushMs: 5 }, async (writer) => {
    const result = await writer.submit(row("m1", 0))!;
    assert.deepEqual(result, { status: "stored", seq: 1 });
    assert.equal(writer.stats.lastBatchSize, 1);
  });
});

Deno.test("WriterClient reports store-level duplicates with the colliding reading", async () => {
  await withWriter({}, async (writer) => {
    assert.equal((await writer.submit(row("m1", 4))!).status, "stored");
    const replay = await writer.submit(row("m1", 4))!;
    assert.deepEqual(replay, { status: "duplicate", conflict_ts: row("m1", 4).ts });
    const near = await writer.submit({ ...row("m1", 4), ts: row("m1", 4).ts + 60_000 })!;
    assert.deepEqual(near, { status: "duplicate", conflict_ts: row("m1", 4).ts });
  });
});

Deno.test("WriterClient's queue is bounded and tells when there is room again", async () => {
  await withWriter({ queueMax: 5, flushMs: 50 }, async (writer) => {
    const pending = Array.from({ length: 5 }, (_, i) => writer.submit(row("m1", i)));
    assert.ok(pending.every((p) => p !== null));
    assert.equal(writer.hasCapacity, false);
    assert.equal(writer.submit(row("m1", 99)), null);
    await writer.whenCapacity();
    assert.equal(writer.hasCapacity, true);
    await Promise.all(pending);
  });
});

Deno.test("WriterClient.close() writes everything already accepted", async () => {
  const dir = await Deno.makeTempDir({ prefix: "writer-close-" });
  const path = `${dir}/w.kv`;
  const writer = await WriterClient.start({
    spec: { kind: "kv", path },
    storeOptions: { dedupeWindowMs: WINDOW },
    batchMax: 50,
    flushMs: 1000,
    queueMax: 10_000,
  });
  const results = Array.from({ length: 120 }, (_, i) => writer.submit(row(`m${i % 4}`, i))!);
  await writer.close();
  assert.equal((await Promise.all(results)).filter((r) => r.status === "stored").length, 120);
  const store = await KvStore.open(path, { dedupeWindowMs: WINDOW });
  const stats = await store.readingStats({});
  assert.equal(stats.reading_count, 120);
  await store.close();
  await Deno.remove(dir, { recursive: true });
});

/** Rows of `meters` meters, `each` readings apiece, interleaved as a fleet sends them. */
function fleet(prefix: string, meters: number, each: number): ReadingRow[] {
  const rows: ReadingRow[] = [];
  for (let i = 0; i < each; i++) {
    for (let m = 0; m < meters; m++) rows.push(row(`${prefix}-${m}`, i));
  }
  return rows;
}

/** Submits rows twice in one go: the first copy of each is stored, the second its duplicate. */
async function storedThenDuplicates(writer: WriterClient, rows: ReadingRow[]): Promise<void> {
  const twice = rows.flatMap((r) => [r, { ...r, submitted_at: r.submitted_at + 1 }]);
  const results = await Promise.all(twice.map((r) => writer.submit(r)!));
  for (let i = 0; i < twice.length; i += 2) {
    assert.equal(results[i].status, "stored", `${twice[i].meter_id} @ ${twice[i].ts}`);
    assert.deepEqual(results[i + 1], { status: "duplicate", conflict_ts: twice[i].ts });
  }
}

Deno.test("WriterClient with several lanes keeps each meter's rows in order (Deno KV)", async () => {
  await withWriter({ lanes: 3, batchMax: 25 }, async (writer) => {
    const rows = fleet("lane", 12, 10);
    await storedThenDuplicates(writer, rows);
    assert.equal(writer.stats.rows, rows.length * 2);
    assert.ok(writer.stats.batches >= (rows.length * 2) / 25, "split into batches");
  });
});

const pg = await requireService(
  `PostgreSQL at ${redactUrl(postgresUrl())}`,
  probePostgres(postgresUrl()),
);

Deno.test({
  name: `WriterClient lanes write in parallel on PostgreSQL without deadlocks or lost rows${
    pg.ok ? "" : ` (ignored: ${pg.reason})`
  }`,
  ignore: !pg.ok,
  async fn() {
    const schema = await createTestSchema();
    const writer = await WriterClient.start({
      spec: { kind: "postgres", url: schema.url, max: 4, migrate: true, timescale: false },
      storeOptions: { dedupeWindowMs: WINDOW },
      lanes: 2,
      maxInFlight: 2,
      batchMax: 200,
      flushMs: 2,
      queueMax: 100_000,
    });
    try {
      const rows = fleet("pg-lane", 300, 20);
      await storedThenDuplicates(writer, rows);
      // Everything again, across both lanes at once: every row is now a duplicate of itself.
      const again = await Promise.all(rows.map((r) => writer.submit(r)!));
      again.forEach((result, i) => {
        assert.deepEqual(result, { status: "duplicate", conflict_ts: rows[i].ts });
      });
      assert.equal(writer.stats.rows, rows.length * 3);
    } finally {
      await writer.close();
      await schema.drop();
    }
  },
});

Deno.test("a batch resent to a new writer worker claims its rows that the old one committed", async (t) => {
  // The gateway resends a dead worker's unfinished batches to its successor; rows the dead one
  // had committed (same signature and submission time) are the resent rows themselves.
  const dir = await Deno.makeTempDir({ prefix: "writer-test-" });
  const path = `${dir}/w.kv`;
  const rows = [row("m-resent", 0), row("m-resent", 1)];
  try {
    const store = await KvStore.open(path, { dedupeWindowMs: WINDOW });
    await store.insertReadings(rows); // what the dead worker committed
    await store.close();
    const worker = new Worker(new URL("../workers/writer.ts", import.meta.url), { type: "module" });
    const next = () =>
      new Promise<Record<string, unknown>>((resolve) =>
        worker.onmessage = (e) => resolve(e.data as Record<string, unknown>)
      );
    try {
      let answer = next();
      worker.postMessage({
        type: "init",
        spec: { kind: "kv", path },
        options: { dedupeWindowMs: WINDOW },
      });
      assert.equal((await answer).type, "ready");
      const send = async (id: number, resent: boolean) => {
        answer = next();
        worker.postMessage({ type: "batch", id, rows: encodeRows(rows), resent });
        const done = await answer;
        assert.equal(done.type, "done");
        return decodeResults(done.results as ArrayBuffer);
      };
      await t.step("resent: both rows are reported stored, with their seqs", async () => {
        assert.deepEqual(await send(1, true), [
          { status: "stored", seq: 1 },
          { status: "stored", seq: 2 },
        ]);
      });
      await t.step("not resent, the same rows are duplicates of themselves", async () => {
        assert.deepEqual(
          await send(2, false),
          rows.map((r) => ({ status: "duplicate", conflict_ts: r.ts })),
        );
      });
      answer = next();
      worker.postMessage({ type: "close" });
      assert.equal((await answer).type, "closed");
    } finally {
      worker.terminate();
    }
  } finally {
    await Deno.remove(dir, { recursive: true });
  }
});
