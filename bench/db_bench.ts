// deno task bench:db — the PostgreSQL writer on its own, on a fresh schema, in one run:
//   1. the real write path (WriterClient → writer worker → PostgresStore.insertReadings) with the
//      queue kept full: rows/s from the first submit to the last result;
//   2. raw `COPY ... FROM STDIN` of the same rows, in the same batch sizes, into an identical
//      scratch table (`LIKE meter_readings INCLUDING ALL`): rows/s, and the ratio writer/COPY;
//   3. `PostgresStore.hourlyStats` for one meter over 30 days with `--stats-rows` rows in
//      `meter_readings` (bulk-loaded in SQL, not measured): p50/p95/p99 over random meters.
// Everything it creates (schema, worker, pools) is gone when it ends, also on Ctrl-C.
import { once } from "node:events";
import net from "node:net";
import postgres from "postgres";
import { fatal, parseFlags } from "../cli/_args.ts";
import type { ReadingRow } from "../core/reading.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { WriterClient } from "../workers/writer_client.ts";
import { createTestSchema, postgresUrl, redactUrl, type TestSchema } from "../tests/_services.ts";

const SLOT_MS = 15 * 60_000;
const DAY_MS = 86_400_000;
/** 30 days of 15-minute readings: what one meter holds in the stats phase. */
const STATS_SLOTS = 30 * 96;
const DEDUPE_WINDOW_MS = 15 * 60_000;
/** application_name of this run's own pool, so Ctrl-C can cancel exactly its statements. */
const APP_NAME = `gridtokenx-db-bench-${crypto.randomUUID().slice(0, 8)}`;
const COLUMNS = "meter_id, reading_timestamp, kwh_amount, user_id, wallet_address, key_id, " +
  "device_signature, source, submitted_at, minted";

const flags = parseFlags(Deno.args, {
  usage: `Usage: deno task bench:db [options]

Measures, on a fresh schema (dropped at the end): the batching writer (WriterClient worker +
PostgresStore) into meter_readings, raw COPY of the same rows into an identical scratch table,
and hourlyStats latency for one meter over 30 days with --stats-rows rows in the table.

Options:
  --url URL            PostgreSQL (default: $BENCH_DATABASE_URL, else $TEST_DATABASE_URL, else
                       postgres://postgres@127.0.0.1:5432/test)
  --rows N             Readings written by the writer and by COPY (default 500000)
  --meters M           Meters they are spread over; meter i % M, slot floor(i / M) (default 20000)
  --batch B            Writer batchMax, and the COPY batch size (default 1000, WRITER_BATCH_MAX)
  --queue Q            Writer queueMax (default 20000, WRITER_QUEUE_MAX)
  --flush-ms F         Writer linger (default 5, WRITER_FLUSH_MS)
  --lanes L            Writer lanes, two connections each (default 1, WRITER_CONCURRENCY)
  --stats-rows N       Rows in meter_readings for the hourly stats phase (default 10000000);
                       ceil(N / 2880) meters x 2880 readings (30 days every 15 minutes)
  --stats-queries Q    hourlyStats calls measured, each for a random meter (default 200)
  --skip-write         Only the hourly stats phase
  --skip-stats         Only the writer and COPY phases`,
  options: {
    url: { type: "string" },
    rows: { type: "string", default: "500000" },
    meters: { type: "string", default: "20000" },
    batch: { type: "string", default: "1000" },
    queue: { type: "string", default: "20000" },
    "flush-ms": { type: "string", default: "5" },
    lanes: { type: "string", default: "1" },
    "stats-rows": { type: "string", default: "10000000" },
    "stats-queries": { type: "string", default: "200" },
    "skip-write": { type: "boolean", default: false },
    "skip-stats": { type: "boolean", default: false },
  },
});

function intFlag(name: string, value: string, min: number): number {
  const n = Number(value.replaceAll("_", ""));
  if (!Number.isSafeInteger(n) || n < min) fatal(`--${name} must be an integer >= ${min}`);
  return n;
}

const BASE_URL = flags.url || Deno.env.get("BENCH_DATABASE_URL") || postgresUrl();
const ROWS = intFlag("rows", flags.rows, 1);
const METERS = intFlag("meters", flags.meters, 1);
const BATCH = intFlag("batch", flags.batch, 1);
const QUEUE = intFlag("queue", flags.queue, 1);
const FLUSH_MS = intFlag("flush-ms", flags["flush-ms"], 0);
const LANES = intFlag("lanes", flags.lanes, 1);
const STATS_ROWS = intFlag("stats-rows", flags["stats-rows"], STATS_SLOTS);
const STATS_QUERIES = intFlag("stats-queries", flags["stats-queries"], 1);

// ---- helpers ---------------------------------------------------------------------------------

const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
const secs = (ms: number) => (ms / 1000).toFixed(2);

function log(message: string): void {
  console.log(`[${new Date().toISOString().slice(11, 19)}] ${message}`);
}

/** Deterministic PRNG (mulberry32), so runs pick the same meters. */
function random(seed: number): () => number {
  let a = seed >>> 0;
  return () => {
    a = (a + 0x6d2b79f5) >>> 0;
    let t = a;
    t = Math.imul(t ^ (t >>> 15), t | 1);
    t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
    return ((t ^ (t >>> 14)) >>> 0) / 4294967296;
  };
}

function percentile(sorted: number[], p: number): number {
  const i = Math.min(sorted.length - 1, Math.max(0, Math.ceil(p / 100 * sorted.length) - 1));
  return sorted[i];
}

/** The rows both write phases write: meter i % M, slot floor(i / M), 15 minutes apart. */
function makeRows(count: number, meters: number, lastSlotTs: number): ReadingRow[] {
  const ids = Array.from({ length: meters }, (_, m) => `bench-${String(m).padStart(6, "0")}`);
  const users = Array.from({ length: 500 }, (_, u) => `user-${u}`);
  const wallet = "0x" + "ab".repeat(20);
  const slots = Math.ceil(count / meters);
  const firstTs = lastSlotTs - (slots - 1) * SLOT_MS;
  const rows = new Array<ReadingRow>(count);
  for (let i = 0; i < count; i++) {
    const m = i % meters;
    const ts = firstTs + Math.floor(i / meters) * SLOT_MS;
    rows[i] = {
      meter_id: ids[m],
      ts,
      kwh_e4: 1 + (i * 7919) % 200_000,
      user_id: users[m % 500],
      wallet_address: wallet,
      key_id: "k1",
      // 64 hex characters, distinct per row, like an HMAC-SHA256 signature.
      device_signature: i.toString(16).padStart(16, "0").repeat(4),
      source: "mqtt",
      submitted_at: ts + 2_000,
      minted: false,
    };
  }
  return rows;
}

/** COPY text format escaping (backslash, tab, newline, carriage return). */
function copyText(value: string | null): string {
  if (value === null) return "\\N";
  return /[\\\t\n\r]/.test(value)
    ? value.replaceAll("\\", "\\\\").replaceAll("\t", "\\t").replaceAll("\n", "\\n")
      .replaceAll("\r", "\\r")
    : value;
}

function kwhText(e4: number): string {
  return `${Math.floor(e4 / 10_000)}.${String(e4 % 10_000).padStart(4, "0")}`;
}

function copyLines(rows: ReadingRow[], from: number, to: number): string {
  let text = "";
  for (let i = from; i < to; i++) {
    const r = rows[i];
    text += `${copyText(r.meter_id)}\t${new Date(r.ts).toISOString()}\t${kwhText(r.kwh_e4)}\t` +
      `${copyText(r.user_id)}\t${copyText(r.wallet_address)}\t${copyText(r.key_id)}\t` +
      `${copyText(r.device_signature)}\t${r.source}\t${new Date(r.submitted_at).toISOString()}\t` +
      `${r.minted ? "t" : "f"}\n`;
  }
  return text;
}

/** `COPY table FROM STDIN` of `text`; resolves once the server has completed the COPY. */
async function copyIn(sql: postgres.Sql, table: string, text: string): Promise<void> {
  const stream = await sql`COPY ${sql(table)} (${sql.unsafe(COLUMNS)}) FROM STDIN`.writable();
  await new Promise<void>((resolve, reject) => {
    stream.on("error", reject);
    stream.on("finish", resolve);
    stream.write(text);
    stream.end();
  });
}

/**
 * A TCP connection with Nagle's algorithm off, for the COPY pool. postgres.js sends a COPY's
 * data and its CopyDone in separate socket writes; with Nagle on, the small CopyDone waits for
 * the server's delayed ACK (~40 ms on Linux) and every COPY takes 44 or 88 ms whatever its
 * size (1 row: 88 ms; with TCP_NODELAY: 0.3 ms). That is the client's artifact, not the cost
 * of COPY, so the baseline goes without it. The gateway's own queries write each message
 * batch at once and wait for the answer: measured, TCP_NODELAY does not change the writer.
 */
function noDelaySocket(url: string): (() => Promise<net.Socket>) | undefined {
  const parsed = new URL(url);
  const host = decodeURIComponent(parsed.hostname).replace(/^\[|\]$/g, "");
  if (host === "" || host.startsWith("/") || host.includes(",")) return undefined;
  const port = parsed.port === "" ? 5432 : Number(parsed.port);
  return async () => {
    const socket = net.connect(port, host);
    socket.setNoDelay(true);
    await once(socket, "connect");
    return socket;
  };
}

/** CHECKPOINT between phases so one phase's dirty pages are not flushed on the next one's time. */
async function checkpoint(sql: postgres.Sql): Promise<void> {
  await sql`CHECKPOINT`.catch(() => {}); // needs superuser or pg_checkpoint; optional
}

/** Load average (1 min) of this machine, as context for the figures: it is shared. */
function load(): string {
  return Deno.loadavg()[0].toFixed(2);
}

interface BlockCounts {
  heap: number;
  heapRead: number;
  index: number;
  indexRead: number;
}

/** meter_readings' block accesses so far (shared buffer hits + reads), from pg_statio. */
async function blockCounts(sql: postgres.Sql): Promise<BlockCounts> {
  const [row] = await sql<BlockCounts[]>`
    SELECT (heap_blks_hit + heap_blks_read)::float8 AS heap, heap_blks_read::float8 AS "heapRead",
           (idx_blks_hit + idx_blks_read)::float8 AS index, idx_blks_read::float8 AS "indexRead"
    FROM pg_statio_user_tables WHERE relid = 'meter_readings'::regclass`;
  return row;
}

// ---- phases ----------------------------------------------------------------------------------

interface WriterFigures {
  ms: number;
  load: string;
  stored: number;
  duplicate: number;
  failed: number;
  batches: number;
  maxBatch: number;
  /** Sum of the worker's insertReadings times (batches may overlap). */
  storeMs: number;
}

async function writerPhase(url: string, rows: ReadingRow[]): Promise<WriterFigures> {
  const client = await WriterClient.start({
    spec: { kind: "postgres", url, max: 2 * LANES, migrate: false, timescale: false },
    storeOptions: { dedupeWindowMs: DEDUPE_WINDOW_MS },
    lanes: LANES,
    maxInFlight: 2,
    batchMax: BATCH,
    flushMs: FLUSH_MS,
    queueMax: QUEUE,
  });
  try {
    let stored = 0, duplicate = 0, failed = 0, settled = 0;
    let seenBatches = 0, storeMs = 0;
    let firstFailure: string | undefined;
    let end = 0;
    const { promise: done, resolve: allDone } = Promise.withResolvers<void>();
    const onResult = (result: { status: string; message?: string }) => {
      // Batches settle one message at a time, so a new batch count here is that batch's.
      const stats = client.stats;
      if (stats.batches !== seenBatches) {
        seenBatches = stats.batches;
        storeMs += stats.lastBatchMs;
      }
      if (result.status === "stored") stored++;
      else if (result.status === "duplicate") duplicate++;
      else {
        failed++;
        firstFailure ??= result.message;
      }
      if (++settled === rows.length) {
        end = performance.now();
        allDone();
      }
    };
    let lastLog = performance.now();
    const loadBefore = load();
    const start = performance.now();
    for (let i = 0; i < rows.length; i++) {
      let pending = client.submit(rows[i]);
      while (pending === null) {
        await client.whenCapacity();
        pending = client.submit(rows[i]);
        if (performance.now() - lastLog > 10_000) {
          lastLog = performance.now();
          log(`  writer: ${fmt(settled)} / ${fmt(rows.length)} rows`);
        }
      }
      pending.then(onResult);
    }
    await done;
    const stats = client.stats;
    if (firstFailure !== undefined) log(`  first failure: ${firstFailure}`);
    return {
      ms: end - start,
      load: `${loadBefore} -> ${load()}`,
      stored,
      duplicate,
      failed,
      batches: stats.batches,
      maxBatch: stats.maxBatchSize,
      storeMs,
    };
  } finally {
    await client.close();
  }
}

/**
 * COPYs `rows` into a fresh scratch table, BATCH rows a statement, on `connections` connections
 * at once (each takes the next batch).
 */
async function copyPhase(
  sql: postgres.Sql,
  rows: ReadingRow[],
  connections: number,
): Promise<{ ms: number; load: string }> {
  await sql`DROP TABLE IF EXISTS scratch`;
  await sql`CREATE TABLE scratch (LIKE meter_readings INCLUDING ALL)`;
  await checkpoint(sql);
  const loadBefore = load();
  const start = performance.now();
  let next = 0;
  await Promise.all(Array.from({ length: connections }, async () => {
    while (next < rows.length) {
      const from = next;
      next = Math.min(rows.length, next + BATCH);
      await copyIn(sql, "scratch", copyLines(rows, from, next));
    }
  }));
  const ms = performance.now() - start;
  const [{ n }] = await sql<{ n: number }[]>`SELECT count(*)::float8 AS n FROM scratch`;
  if (n !== rows.length) throw new Error(`COPY left ${n} rows in scratch, expected ${rows.length}`);
  await sql`DROP TABLE scratch`;
  return { ms, load: `${loadBefore} -> ${load()}` };
}

interface StatsFigures {
  rows: number;
  meters: number;
  loadMs: number;
  tableBytes: number;
  indexBytes: number;
  hours: number;
  latencies: number[];
  /** meter_readings blocks accessed per hourlyStats call (hits + reads), and of those read. */
  perCall: BlockCounts;
  load: string;
}

/** Bulk-loads `meters` x 2880 readings in arrival (time) order, then times hourlyStats. */
async function statsPhase(sql: postgres.Sql, store: PostgresStore): Promise<StatsFigures> {
  const meters = Math.ceil(STATS_ROWS / STATS_SLOTS);
  const total = meters * STATS_SLOTS;
  const now = Date.now();
  // Slots end at the last whole quarter hour: 30 days of readings up to now.
  const lastSlot = Math.floor(now / SLOT_MS) * SLOT_MS;
  const firstSlot = lastSlot - (STATS_SLOTS - 1) * SLOT_MS;
  log(`stats: loading ${fmt(total)} rows (${fmt(meters)} meters x ${STATS_SLOTS} readings)`);
  await sql`TRUNCATE meter_readings, reading_meters`;
  await sql`
    INSERT INTO reading_meters (meter_id)
    SELECT 'stats-' || lpad(m::text, 6, '0') FROM generate_series(0, ${meters - 1}) m`;
  const loadStart = performance.now();
  const slotsPerChunk = 96; // one day of every meter per statement
  for (let s0 = 0; s0 < STATS_SLOTS; s0 += slotsPerChunk) {
    const s1 = Math.min(STATS_SLOTS, s0 + slotsPerChunk) - 1;
    // Time-major order, as readings arrive: one meter's rows end up on as many heap pages as
    // it has readings, the layout the index scan of hourlyStats meets in production.
    await sql`
      INSERT INTO meter_readings (${sql.unsafe(COLUMNS)})
      SELECT 'stats-' || lpad(m::text, 6, '0'),
             ts,
             ((m * 7919 + s * 104729) % 200000 + 1) * 0.0001,
             'user-' || (m % 500),
             '0x' || repeat('ab', 20),
             'k1',
             md5(m::text || ':' || s::text) || md5(s::text || ':' || m::text),
             'mqtt',
             ts + interval '2 seconds',
             false
      FROM generate_series(${s0}::int, ${s1}::int) s
      CROSS JOIN generate_series(0, ${meters - 1}::int) m
      CROSS JOIN LATERAL (
        SELECT to_timestamp((${firstSlot}::int8 + s::int8 * ${SLOT_MS}) / 1000.0) AS ts
      ) t
      ORDER BY s, m`;
    if ((s0 / slotsPerChunk) % 5 === 4 || s1 === STATS_SLOTS - 1) {
      log(`  loaded ${fmt((s1 + 1) * meters)} rows (${secs(performance.now() - loadStart)} s)`);
    }
  }
  // What autovacuum would do soon after such a load anyway; done now so that it does not run
  // (or set hint bits on the first queries' time) in the middle of the measurement.
  await sql`VACUUM (ANALYZE) meter_readings`;
  await checkpoint(sql);
  const loadMs = performance.now() - loadStart;
  const [size] = await sql<{ table: number; indexes: number }[]>`
    SELECT pg_table_size('meter_readings')::float8 AS table,
           pg_indexes_size('meter_readings')::float8 AS indexes`;
  log(`  loaded and vacuumed in ${secs(loadMs)} s`);

  const from = now - 30 * DAY_MS;
  const pick = random(0x5eed);
  const meterId = () => `stats-${String(Math.floor(pick() * meters)).padStart(6, "0")}`;
  // Sanity: a meter's 30 days are all there, 4 readings an hour.
  const check = await store.hourlyStats(meterId(), from, now);
  const counted = check.reduce((n, h) => n + h.count, 0);
  if (counted !== STATS_SLOTS) {
    throw new Error(`hourlyStats counted ${counted} readings, expected ${STATS_SLOTS}`);
  }
  // Warm-up (connection, prepared statement): not counted.
  for (let i = 0; i < 20; i++) await store.hourlyStats(meterId(), from, now);
  // A backend publishes its table statistics when it goes idle, at most once a second: after a
  // pause, one more call publishes everything before it (that call is counted in the delta).
  const flushed = async () => {
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    await store.hourlyStats(meterId(), from, now);
    return await blockCounts(sql);
  };
  const before = await flushed();
  const loadBefore = load();
  const latencies: number[] = [];
  for (let i = 0; i < STATS_QUERIES; i++) {
    const id = meterId();
    const t = performance.now();
    await store.hourlyStats(id, from, now);
    latencies.push(performance.now() - t);
  }
  const loadAfter = load();
  const after = await flushed();
  const calls = STATS_QUERIES + 1;
  const perCall = {
    heap: (after.heap - before.heap) / calls,
    heapRead: (after.heapRead - before.heapRead) / calls,
    index: (after.index - before.index) / calls,
    indexRead: (after.indexRead - before.indexRead) / calls,
  };
  return {
    rows: total,
    meters,
    loadMs,
    tableBytes: size.table,
    indexBytes: size.indexes,
    hours: check.length,
    latencies,
    perCall,
    load: `${loadBefore} -> ${loadAfter}`,
  };
}

// ---- main ------------------------------------------------------------------------------------

let schema: TestSchema | undefined;
let sql: postgres.Sql | undefined;
let store: PostgresStore | undefined;
let cleaning: Promise<void> | undefined;

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    await store?.close().catch(() => {});
    await sql?.end({ timeout: 5 }).catch(() => {});
    if (schema) {
      await schema.drop().then(
        () => log(`dropped schema ${schema!.name}`),
        (error) => console.error(`could not drop schema ${schema!.name}: ${error?.message}`),
      );
    }
  })();
  return cleaning;
}

/** Cancels this run's statements on the server (a bulk load runs on after its client left). */
async function cancelOwnQueries(): Promise<void> {
  const admin = postgres(BASE_URL, { max: 1, onnotice: () => {}, connect_timeout: 5 });
  try {
    await admin`
      SELECT pg_cancel_backend(pid) FROM pg_stat_activity
      WHERE application_name = ${APP_NAME} AND pid <> pg_backend_pid()`;
  } finally {
    await admin.end({ timeout: 1 });
  }
}

const onSigint = () => {
  console.error("interrupted: cleaning up");
  // The writer worker dies with the process; the server rolls back what it left open.
  const deadline = new Promise((resolve) => setTimeout(resolve, 30_000));
  const cleaned = cancelOwnQueries().catch(() => {}).then(cleanup);
  Promise.race([cleaned, deadline]).finally(() => Deno.exit(130));
};
Deno.addSignalListener("SIGINT", onSigint);

try {
  schema = await createTestSchema(BASE_URL);
  log(`database ${redactUrl(BASE_URL)}, schema ${schema.name}`);
  // Migrates the fresh schema (plain PostgreSQL, as the writer's spec says) and serves the
  // stats phase.
  store = await PostgresStore.connect(schema.url, {
    dedupeWindowMs: DEDUPE_WINDOW_MS,
    migrate: true,
    timescale: false,
    max: 2,
  });
  // `socket` is a postgres.js option its type declarations leave out; a variable, not a
  // literal, so it passes the excess-property check.
  const copyPoolOptions = {
    max: 2,
    onnotice: () => {},
    socket: noDelaySocket(schema.url),
    connection: { application_name: APP_NAME, TimeZone: "UTC" },
  };
  sql = postgres(schema.url, copyPoolOptions);
  const [{ version }] = await sql<{ version: string }[]>`SELECT version()`;
  log(version.split(",")[0]);

  let writer: WriterFigures | undefined;
  let copy: { ms: number; load: string } | undefined;
  let copy2: { ms: number; load: string } | undefined;
  if (!flags["skip-write"]) {
    const rows = makeRows(ROWS, METERS, Math.floor(Date.now() / SLOT_MS) * SLOT_MS);
    log(
      `writer: ${fmt(ROWS)} new readings over ${fmt(METERS)} meters, batchMax ${fmt(BATCH)}, ` +
        `queueMax ${fmt(QUEUE)}, flush ${FLUSH_MS} ms`,
    );
    await checkpoint(sql);
    writer = await writerPhase(schema.url, rows);
    const [{ n }] = await sql<{ n: number }[]>`SELECT count(*)::float8 AS n FROM meter_readings`;
    if (writer.stored !== ROWS || n !== ROWS) {
      throw new Error(
        `writer stored ${writer.stored} (table holds ${n}) of ${ROWS} rows ` +
          `(${writer.duplicate} duplicate, ${writer.failed} failed)`,
      );
    }
    log(`  ${fmt(ROWS / writer.ms * 1000)} rows/s (${secs(writer.ms)} s)`);
    log(
      `copy: the same rows into scratch (LIKE meter_readings INCLUDING ALL), ${fmt(BATCH)} a COPY`,
    );
    copy = await copyPhase(sql, rows, 1);
    log(`  ${fmt(ROWS / copy.ms * 1000)} rows/s (${secs(copy.ms)} s)`);
    log("copy: again on two connections at once, as the writer worker writes two batches");
    copy2 = await copyPhase(sql, rows, 2);
    log(`  ${fmt(ROWS / copy2.ms * 1000)} rows/s (${secs(copy2.ms)} s)`);
  }

  let stats: StatsFigures | undefined;
  if (!flags["skip-stats"]) stats = await statsPhase(sql, store);

  console.log("\n==== summary ====");
  if (writer && copy && copy2) {
    const writerRate = ROWS / writer.ms * 1000;
    const copyRate = ROWS / copy.ms * 1000;
    const batches = Math.ceil(ROWS / BATCH);
    console.log(
      `${"writer (WriterClient + PostgresStore):".padEnd(40)}${fmt(writerRate)} rows/s — ${
        fmt(ROWS)
      } rows ` +
        `in ${secs(writer.ms)} s; stored ${fmt(writer.stored)}, duplicate ${writer.duplicate}, ` +
        `failed ${writer.failed}`,
    );
    const storeMsPerBatch = (writer.storeMs / writer.batches).toFixed(1);
    // The worker may write more than one batch at once: time in insertReadings / wall time.
    const overlap = (writer.storeMs / writer.ms).toFixed(2);
    console.log(
      `  batches: ${fmt(writer.batches)}, mean ${fmt(writer.stored / writer.batches)} rows, ` +
        `largest ${fmt(writer.maxBatch)}; insertReadings ${storeMsPerBatch} ms a batch, ` +
        `${overlap} batches in it at once on average`,
    );
    console.log(
      `${"raw COPY into scratch, 1 connection:".padEnd(40)}${fmt(copyRate)} rows/s — ${
        fmt(ROWS)
      } rows ` +
        `in ${secs(copy.ms)} s; ${fmt(batches)} COPYs of ${fmt(BATCH)} rows, ` +
        `${(copy.ms / batches).toFixed(1)} ms each`,
    );
    const copy2Rate = ROWS / copy2.ms * 1000;
    console.log(
      `${"raw COPY into scratch, 2 connections:".padEnd(40)}${fmt(copy2Rate)} rows/s — ` +
        `${secs(copy2.ms)} s`,
    );
    const ratio = writerRate / copyRate;
    console.log(
      `ratio writer/COPY: ${ratio.toFixed(2)} (goal >= 0.5: ${
        ratio >= 0.5 ? "met" : "NOT met"
      }); ` +
        `against COPY on 2 connections: ${(writerRate / copy2Rate).toFixed(2)}`,
    );
    console.log(
      `  load average (1 min, this run included): writer ${writer.load}, COPY ${copy.load}, ` +
        `COPY x2 ${copy2.load}`,
    );
  }
  if (stats) {
    const sorted = [...stats.latencies].sort((a, b) => a - b);
    const [p50, p95, p99] = [50, 95, 99].map((p) => percentile(sorted, p));
    const mb = (b: number) => `${fmt(b / 2 ** 20)} MiB`;
    console.log(
      `hourly stats: ${fmt(stats.rows)} rows (${fmt(stats.meters)} meters x ${STATS_SLOTS}), ` +
        `table ${mb(stats.tableBytes)} + indexes ${mb(stats.indexBytes)}; ` +
        `loaded in ${secs(stats.loadMs)} s (not measured)`,
    );
    console.log(
      `  hourlyStats(meter, now-30d, now), ${stats.hours} hours, ${STATS_QUERIES} random meters: ` +
        `p50 ${p50.toFixed(2)} ms, p95 ${p95.toFixed(2)} ms, p99 ${p99.toFixed(2)} ms, ` +
        `max ${sorted.at(-1)!.toFixed(2)} ms (goal p95 < 20 ms: ${p95 < 20 ? "met" : "NOT met"})`,
    );
    const b = stats.perCall;
    console.log(
      `  meter_readings blocks per call: heap ${fmt(b.heap)} (${fmt(b.heapRead)} read outside ` +
        `shared_buffers), index ${fmt(b.index)} (${fmt(b.indexRead)} read); ` +
        `load average (1 min) ${stats.load}`,
    );
  }
} finally {
  await cleanup();
  Deno.removeSignalListener("SIGINT", onSigint);
}
