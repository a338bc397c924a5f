// deno task bench:db — the PostgreSQL store on its own, on fresh schemas, in one run:
//   1. the real write path (WriterClient → writer worker → PostgresStore.insertReadings) with the
//      queue kept full: rows/s from the first submit to the last result;
//   2. raw `COPY ... FROM STDIN` of the same rows, in the same batch sizes, into an identical
//      scratch table (`LIKE meter_readings INCLUDING ALL`, a hypertable too in TimescaleDB
//      mode): rows/s, and the ratio writer/COPY;
//   3. `PostgresStore.hourlyStats` for one meter over 30 days with `--stats-rows` rows in
//      `meter_readings` (bulk-loaded in SQL, not measured; with TimescaleDB the continuous
//      aggregate is then refreshed over the loaded range, and that refresh is timed):
//      p50/p95/p99 over random meters;
//   4. writes over many chunks: 1,000-row `insertReadings` batches of fresh readings at the
//      newest end of 1, 61, 365 (`--history-days`) days of history (with TimescaleDB, chunks
//      older than 30 days compressed first, as the compression policy would), side by side with
//      the probe of migration 0003 (its insert function, recreated in the bench schema);
//   5. (TimescaleDB only) chunk size for compression: 1-day chunks, 7-day chunks, and 1-day
//      chunks rolled up into 7-day compressed chunks: bytes per reading, rows per compressed
//      segment, hourly stats over 30 compressed days (aggregate and raw), insert batch time.
// `--mode auto` (default) uses TimescaleDB when the server has it preloaded. The policy jobs of
// the bench's schemas are paused: the bench refreshes and compresses explicitly, so no job runs
// in the middle of a measurement. Everything it creates (schemas, jobs, worker, pools) is gone
// when it ends, also on Ctrl-C.
import { once } from "node:events";
import net from "node:net";
import process from "node:process";
import postgres from "postgres";
import { fatal, parseFlags } from "../cli/_args.ts";
import type { ReadingRow } from "../core/reading.ts";
import {
  pgInterval,
  TIMESCALE_DEFAULTS,
  timescaleAvailability,
  type TimescaleOptions,
} from "../db/migrate.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { WriterClient } from "../workers/writer_client.ts";
import { createTestSchema, postgresUrl, redactUrl, type TestSchema } from "../tests/_services.ts";

const SLOT_MS = 15 * 60_000;
const HOUR_MS = 3_600_000;
const DAY_MS = 86_400_000;
const SLOTS_PER_DAY = DAY_MS / SLOT_MS;
/** 30 days of 15-minute readings: what one meter holds in the stats phase. */
const STATS_SLOTS = 30 * SLOTS_PER_DAY;
const DEDUPE_WINDOW_MS = 15 * 60_000;
/** application_name of this run's own pools, so Ctrl-C can cancel exactly its statements. */
const APP_NAME = `gridtokenx-db-bench-${crypto.randomUUID().slice(0, 8)}`;
const COLUMNS = "meter_id, reading_timestamp, kwh_amount, user_id, wallet_address, key_id, " +
  "device_signature, source, submitted_at, minted";
/** Batches of each chunk-phase round that warm connections and caches up, not counted. */
const WARM_NEW = 5;
const WARM_OLD = 1;
/** The measured batches of a round start this long after the start of the newest day. */
const ANCHOR_OFFSET_MS = 8 * HOUR_MS;

const flags = parseFlags(Deno.args, {
  usage: `Usage: deno task bench:db [options]

Measures, on fresh schemas (dropped at the end): the batching writer (WriterClient worker +
PostgresStore) into meter_readings, raw COPY of the same rows into an identical scratch table,
hourlyStats latency for one meter over 30 days with --stats-rows rows in the table, 1,000-row
insert batches over 1 to 365 days (chunks) of history, and (TimescaleDB) the chunk size for
compression.

Options:
  --url URL            PostgreSQL (default: $BENCH_DATABASE_URL, else $TEST_DATABASE_URL, else
                       postgres://postgres@127.0.0.1:5432/test)
  --mode MODE          plain, timescale, or auto: TimescaleDB when the server has it preloaded
                       (default auto)
  --chunk-days D       TimescaleDB chunk interval of phases 1-4, days (default 1)
  --load-connections C Connections that bulk-load history in SQL at once (default 2)
  --rows N             Readings written by the writer and by COPY (default 500000)
  --meters M           Meters they are spread over; meter i % M, slot floor(i / M) (default 20000)
  --batch B            Writer batchMax, the COPY batch size and the chunk phases' insert batch
                       (default 1000, WRITER_BATCH_MAX)
  --queue Q            Writer queueMax (default 20000, WRITER_QUEUE_MAX)
  --flush-ms F         Writer linger (default 5, WRITER_FLUSH_MS)
  --lanes L            Writer lanes, two connections each (default 1, WRITER_CONCURRENCY)
  --stats-rows N       Rows in meter_readings for the hourly stats phase (default 10000000);
                       ceil(N / 2880) meters x 2880 readings (30 days every 15 minutes)
  --stats-queries Q    hourlyStats calls measured, each for a random meter (default 200)
  --history-days LIST  Days of history of the chunks phase, ascending, loaded cumulatively
                       (default 1,61,365)
  --chunk-meters M     Meters of the chunks phase, 96 readings a day each (default 1000)
  --chunk-batches N    insertReadings batches measured per history size (default 40)
  --old-batches N      Batches of the 0003 insert function (old probe) per history size, interleaved
                       (default 6; 0: none)
  --old-budget-s S     Stop the old-probe batches of a history size once they took this long in
                       all, and cancel one after it (statement timeout) (default 60)
  --size-days D        Days of history of the chunk-size phase (default 91, at least 80)
  --size-meters M      Meters of the chunk-size phase (default 1000)
  --size-queries Q     Hourly stats calls per variant of the chunk-size phase (default 50)
  --size-batches N     insertReadings batches per configuration of the chunk-size phase
                       (default 20)
  --size-configs LIST  Configurations of the chunk-size phase (default all:
                       1d,7d,1d-rollup,1d-rollup-sparse)
  --skip-write         Skip the writer and COPY phases
  --skip-stats         Skip the hourly stats phase
  --skip-chunks        Skip the writes over many chunks
  --skip-chunk-size    Skip the chunk-size phase (TimescaleDB only; skipped on plain PostgreSQL)`,
  options: {
    url: { type: "string" },
    mode: { type: "string", default: "auto" },
    "chunk-days": { type: "string", default: "1" },
    "load-connections": { type: "string", default: "2" },
    rows: { type: "string", default: "500000" },
    meters: { type: "string", default: "20000" },
    batch: { type: "string", default: "1000" },
    queue: { type: "string", default: "20000" },
    "flush-ms": { type: "string", default: "5" },
    lanes: { type: "string", default: "1" },
    "stats-rows": { type: "string", default: "10000000" },
    "stats-queries": { type: "string", default: "200" },
    "history-days": { type: "string", default: "1,61,365" },
    "chunk-meters": { type: "string", default: "1000" },
    "chunk-batches": { type: "string", default: "40" },
    "old-batches": { type: "string", default: "6" },
    "old-budget-s": { type: "string", default: "60" },
    "size-days": { type: "string", default: "91" },
    "size-meters": { type: "string", default: "1000" },
    "size-queries": { type: "string", default: "50" },
    "size-batches": { type: "string", default: "20" },
    "size-configs": { type: "string", default: "1d,7d,1d-rollup,1d-rollup-sparse" },
    "skip-write": { type: "boolean", default: false },
    "skip-stats": { type: "boolean", default: false },
    "skip-chunks": { type: "boolean", default: false },
    "skip-chunk-size": { type: "boolean", default: false },
  },
});

function intFlag(name: string, value: string, min: number): number {
  const n = Number(value.replaceAll("_", ""));
  if (!Number.isSafeInteger(n) || n < min) fatal(`--${name} must be an integer >= ${min}`);
  return n;
}

const BASE_URL = flags.url || Deno.env.get("BENCH_DATABASE_URL") || postgresUrl();
if (!["auto", "plain", "timescale"].includes(flags.mode)) {
  fatal("--mode must be plain, timescale or auto");
}
const CHUNK_DAYS = intFlag("chunk-days", flags["chunk-days"], 1);
const LOAD_CONNECTIONS = intFlag("load-connections", flags["load-connections"], 1);
const ROWS = intFlag("rows", flags.rows, 1);
const METERS = intFlag("meters", flags.meters, 1);
const BATCH = intFlag("batch", flags.batch, 1);
const QUEUE = intFlag("queue", flags.queue, 1);
const FLUSH_MS = intFlag("flush-ms", flags["flush-ms"], 0);
const LANES = intFlag("lanes", flags.lanes, 1);
const STATS_ROWS = intFlag("stats-rows", flags["stats-rows"], STATS_SLOTS);
const STATS_QUERIES = intFlag("stats-queries", flags["stats-queries"], 1);
const HISTORY_DAYS = flags["history-days"].split(",").map((d) => intFlag("history-days", d, 1));
if (HISTORY_DAYS.some((d, i) => i > 0 && d <= HISTORY_DAYS[i - 1])) {
  fatal("--history-days must be ascending");
}
const CHUNK_METERS = intFlag("chunk-meters", flags["chunk-meters"], 1);
const CHUNK_BATCHES = intFlag("chunk-batches", flags["chunk-batches"], 1);
const OLD_BATCHES = intFlag("old-batches", flags["old-batches"], 0);
const OLD_BUDGET_MS = intFlag("old-budget-s", flags["old-budget-s"], 1) * 1000;
const SIZE_DAYS = intFlag("size-days", flags["size-days"], 80);
const SIZE_METERS = intFlag("size-meters", flags["size-meters"], 1);
const SIZE_QUERIES = intFlag("size-queries", flags["size-queries"], 1);
const SIZE_BATCHES = intFlag("size-batches", flags["size-batches"], 1);

// ---- helpers ---------------------------------------------------------------------------------

const fmt = (n: number) => Math.round(n).toLocaleString("en-US");
const secs = (ms: number) => (ms / 1000).toFixed(2);
const ms2 = (ms: number) => ms.toFixed(2);
const mib = (bytes: number) => `${fmt(bytes / 2 ** 20)} MiB`;

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

/** p50 and p95 of `values` (NaN when empty). */
function p50p95(values: number[]): [number, number] {
  if (values.length === 0) return [NaN, NaN];
  const sorted = [...values].sort((a, b) => a - b);
  return [percentile(sorted, 50), percentile(sorted, 95)];
}

function sum(values: number[]): number {
  return values.reduce((a, b) => a + b, 0);
}

function meterName(prefix: string, m: number): string {
  return `${prefix}-${String(m).padStart(6, "0")}`;
}

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

/** The rows both write phases write: meter i % M, slot floor(i / M), 15 minutes apart. */
function makeRows(count: number, meters: number, lastSlotTs: number): ReadingRow[] {
  const slots = Math.ceil(count / meters);
  return freshRows("bench", meters, lastSlotTs - (slots - 1) * SLOT_MS, 0, count);
}

/**
 * Rows `from` to `from + count` of the sequence "meter i % M, slot floor(i / M) after
 * `firstTs`": each slot is one reading of every meter, as live traffic arrives.
 */
function freshRows(
  prefix: string,
  meters: number,
  firstTs: number,
  from: number,
  count: number,
): ReadingRow[] {
  const wallet = "0x" + "ab".repeat(20);
  const rows = new Array<ReadingRow>(count);
  for (let j = 0; j < count; j++) {
    const i = from + j;
    const m = i % meters;
    const ts = firstTs + Math.floor(i / meters) * SLOT_MS;
    rows[j] = {
      meter_id: meterName(prefix, m),
      ts,
      kwh_e4: 1 + (i * 7919) % 200_000,
      user_id: `user-${m % 500}`,
      wallet_address: wallet,
      key_id: "k1",
      // 64 hex characters, distinct per row, like an HMAC-SHA256 signature.
      device_signature: (ts / SLOT_MS * 1_000_003 + m).toString(16).padStart(16, "0").repeat(4),
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

/** CPU time (user + system) of this process so far, µs. */
function cpuMicros(): number {
  const { user, system } = process.cpuUsage();
  return user + system;
}

interface BlockCounts {
  heap: number;
  heapRead: number;
  index: number;
  indexRead: number;
}

/**
 * Block accesses so far (shared buffer hits + reads, from pg_statio) of `relids`:
 * meter_readings, or with TimescaleDB its chunks and those of the aggregate.
 */
async function blockCounts(sql: postgres.Sql, relids: number[]): Promise<BlockCounts> {
  const [row] = await sql<BlockCounts[]>`
    SELECT coalesce(sum(heap_blks_hit + heap_blks_read), 0)::float8 AS heap,
           coalesce(sum(heap_blks_read), 0)::float8 AS "heapRead",
           coalesce(sum(idx_blks_hit + idx_blks_read), 0)::float8 AS index,
           coalesce(sum(idx_blks_read), 0)::float8 AS "indexRead"
    FROM pg_statio_all_tables WHERE relid = ANY(${relids}::oid[])`;
  return row;
}

// ---- schemas ---------------------------------------------------------------------------------

/** Which storage mode this run measures, and the TimescaleDB extension's schema if any. */
let timescaleExt: string | null = null;

/** A fresh schema, migrated, with the store on it and a pool of the bench's own. */
interface BenchSchema {
  schema: TestSchema;
  store: PostgresStore;
  /** The bench's pool (TCP_NODELAY, this run's application_name, search_path schema,public). */
  sql: postgres.Sql;
  /** Timescale settings it was migrated with, or false (plain PostgreSQL). */
  timescale: Required<TimescaleOptions> | false;
  close(): Promise<void>;
}

const open = new Set<BenchSchema>();

/**
 * Creates and migrates a schema (with `timescale` settings, or plain), pauses its TimescaleDB
 * policy jobs, and opens the store and the bench's pool on it.
 */
async function openSchema(timescale: TimescaleOptions | false): Promise<BenchSchema> {
  const schema = await createTestSchema(BASE_URL);
  // Filled in below; close() ends whatever got opened.
  const parts: { store?: PostgresStore; sql?: postgres.Sql } = {};
  let closing: Promise<void> | undefined;
  const settings = timescale === false ? false : { ...TIMESCALE_DEFAULTS, ...timescale };
  const bench: BenchSchema = {
    schema,
    get store() {
      return parts.store!;
    },
    get sql() {
      return parts.sql!;
    },
    timescale: settings,
    close() {
      closing ??= (async () => {
        await parts.store?.close().catch(() => {});
        await parts.sql?.end({ timeout: 5 }).catch(() => {});
        await schema.drop().then(
          () => log(`dropped schema ${schema.name}`),
          (error) => console.error(`could not drop schema ${schema.name}: ${error?.message}`),
        );
        open.delete(bench);
      })();
      return closing;
    },
  };
  open.add(bench);
  const store = parts.store = await PostgresStore.connect(schema.url, {
    dedupeWindowMs: DEDUPE_WINDOW_MS,
    migrate: true,
    timescale: settings,
    max: 2,
  });
  if (store.timescale !== (settings !== false)) {
    throw new Error(`schema ${schema.name}: the store did not set up the mode asked for`);
  }
  // `socket` is a postgres.js option its type declarations leave out; a variable, not a
  // literal, so it passes the excess-property check.
  const poolOptions = {
    max: Math.max(2, LOAD_CONNECTIONS),
    onnotice: () => {},
    socket: noDelaySocket(schema.url),
    connection: { application_name: APP_NAME, TimeZone: "UTC" },
  };
  const sql = parts.sql = postgres(schema.url, poolOptions);
  if (settings !== false) {
    const paused = await pauseJobs(sql, schema.name);
    log(
      `schema ${schema.name}: TimescaleDB, ${pgInterval(settings.chunkIntervalMs)} chunks, ` +
        `${paused} policy jobs paused`,
    );
  } else {
    log(`schema ${schema.name}: plain PostgreSQL`);
  }
  return bench;
}

/** Unschedules the schema's policy jobs (refresh, compression, retention). */
async function pauseJobs(sql: postgres.Sql, schema: string): Promise<number> {
  const rows = await sql.unsafe(
    `SELECT ${quoteIdent(timescaleExt!)}.alter_job(j.job_id, scheduled => false)
     FROM timescaledb_information.jobs j
     WHERE j.hypertable_schema = $1
        OR (j.hypertable_schema, j.hypertable_name) IN (
          SELECT materialization_hypertable_schema, materialization_hypertable_name
          FROM timescaledb_information.continuous_aggregates WHERE view_schema = $1)`,
    [schema],
  );
  return rows.length;
}

/**
 * Bulk-loads readings of meters `prefix-000000`... for global slots [from, to) (slot = epoch ms /
 * 15 min) in SQL, one day of all meters a statement, in time order, on LOAD_CONNECTIONS
 * connections at once. Not a measurement; returns its time.
 */
async function loadSlots(
  sql: postgres.Sql,
  prefix: string,
  meters: number,
  from: number,
  to: number,
): Promise<number> {
  const pieces: [number, number][] = [];
  for (let s = from; s < to;) {
    const end = Math.min(to, (Math.floor(s / SLOTS_PER_DAY) + 1) * SLOTS_PER_DAY);
    pieces.push([s, end - 1]);
    s = end;
  }
  const total = (to - from) * meters;
  const start = performance.now();
  let next = 0, loaded = 0, lastLog = start;
  await Promise.all(
    Array.from({ length: Math.min(LOAD_CONNECTIONS, pieces.length) }, async () => {
      while (next < pieces.length) {
        const [s0, s1] = pieces[next++];
        // Time-major order, as readings arrive: one meter's rows end up on as many heap pages
        // as it has readings, the layout index scans meet in production.
        await sql`
          INSERT INTO meter_readings (${sql.unsafe(COLUMNS)})
          SELECT ${prefix} || '-' || lpad(m::text, 6, '0'),
                 ts,
                 ((m * 7919 + s * 104729) % 200000 + 1) * 0.0001,
                 'user-' || (m % 500),
                 '0x' || repeat('ab', 20),
                 'k1',
                 md5(m::text || ':' || s::text) || md5(s::text || ':' || m::text),
                 'mqtt',
                 ts + interval '2 seconds',
                 false
          FROM generate_series(${s0}::int8, ${s1}::int8) s
          CROSS JOIN generate_series(0, ${meters - 1}::int8) m
          CROSS JOIN LATERAL (SELECT to_timestamp(s * ${SLOT_MS / 1000}) AS ts) t
          ORDER BY s, m`;
        loaded += (s1 - s0 + 1) * meters;
        if (performance.now() - lastLog > 15_000) {
          lastLog = performance.now();
          log(
            `  loaded ${fmt(loaded)} / ${fmt(total)} rows (${secs(lastLog - start)} s, ` +
              `${fmt(loaded / (lastLog - start) * 1000)} rows/s)`,
          );
        }
      }
    }),
  );
  return performance.now() - start;
}

/** Registers the meters in reading_meters, as the gateway would have on their first reading. */
async function addMeters(sql: postgres.Sql, prefix: string, meters: number): Promise<void> {
  await sql`
    INSERT INTO reading_meters (meter_id)
    SELECT ${prefix} || '-' || lpad(m::text, 6, '0') FROM generate_series(0, ${meters - 1}) m
    ON CONFLICT DO NOTHING`;
}

interface ChunkCounts {
  chunks: number;
  compressed: number;
}

async function chunkCounts(sql: postgres.Sql, schema: string): Promise<ChunkCounts> {
  const [row] = await sql<ChunkCounts[]>`
    SELECT count(*)::int4 AS chunks, (count(*) FILTER (WHERE is_compressed))::int4 AS compressed
    FROM timescaledb_information.chunks
    WHERE hypertable_schema = ${schema} AND hypertable_name = 'meter_readings'`;
  return row;
}

/**
 * Compresses the chunks of meter_readings older than `compressAfterMs` (show_chunks
 * `older_than`, as the compression policy selects them), oldest first. On `connections` at once
 * unless chunks are rolled up into compressed ones (that has to go in order).
 */
async function compressOld(
  bench: BenchSchema,
  connections: number,
): Promise<{ ms: number; chunks: number }> {
  const sql = bench.sql;
  const settings = bench.timescale as Required<TimescaleOptions>;
  const ts = quoteIdent(timescaleExt!);
  const todo = await sql.unsafe<{ name: string }[]>(
    `SELECT format('%I.%I', i.chunk_schema, i.chunk_name) AS name
     FROM ${ts}.show_chunks('meter_readings', older_than => $1::interval) c
     JOIN timescaledb_information.chunks i
       ON format('%I.%I', i.chunk_schema, i.chunk_name)::regclass = c
     WHERE NOT i.is_compressed
     ORDER BY i.range_start`,
    [pgInterval(settings.compressAfterMs)],
  );
  const start = performance.now();
  let next = 0;
  await Promise.all(
    Array.from({ length: Math.max(1, Math.min(connections, todo.length)) }, async () => {
      while (next < todo.length) {
        const { name } = todo[next++];
        await sql.unsafe(`SELECT ${ts}.compress_chunk($1::regclass, if_not_compressed => true)`, [
          name,
        ]);
      }
    }),
  );
  return { ms: performance.now() - start, chunks: todo.length };
}

/** The chunk of meter_readings that holds `ts` (TimescaleDB), as a qualified name. */
async function chunkAt(sql: postgres.Sql, schema: string, ts: number): Promise<string> {
  const [row] = await sql<{ name: string }[]>`
    SELECT format('%I.%I', chunk_schema, chunk_name) AS name
    FROM timescaledb_information.chunks
    WHERE hypertable_schema = ${schema} AND hypertable_name = 'meter_readings'
      AND range_start <= ${new Date(ts)} AND range_end > ${new Date(ts)}`;
  if (row === undefined) throw new Error(`no chunk holds ${new Date(ts).toISOString()}`);
  return row.name;
}

// ---- the probe of migration 0003 -------------------------------------------------------------

const OLD_FUNCTION = "bench_insert_readings_0003";

/**
 * Creates `bench_insert_readings_0003` in the bench schema: the `gateway_insert_readings` of
 * migration 0003, verbatim but for its name. It probes with the 3-argument
 * `gateway_nearest_reading`, which migration 0005 left in place, so the bench can time the
 * probe as it was next to the current one, on the same data in the same run.
 */
async function createOldFunction(sql: postgres.Sql): Promise<void> {
  const text = await Deno.readTextFile(
    new URL("../db/migrations/0003_insert_function.sql", import.meta.url),
  );
  const head = "CREATE FUNCTION gateway_insert_readings(";
  const start = text.indexOf(head);
  const end = text.indexOf("\n$$;", start);
  if (start < 0 || end < 0) throw new Error("0003: gateway_insert_readings not found");
  const body = text.slice(start, end + 4);
  if (!body.includes("gateway_nearest_reading(i.meter_id, i.ts, p_window)")) {
    throw new Error("0003: gateway_insert_readings no longer calls the 3-argument probe");
  }
  await sql.unsafe(body.replace(head, `CREATE FUNCTION ${OLD_FUNCTION}(`));
}

/** One batch through the 0003 function, with the arguments `insertReadings` passes. */
async function insertOld(sql: postgres.Sql, rows: ReadingRow[]): Promise<number> {
  const meters = [...new Set(rows.map((r) => r.meter_id))].sort();
  const col = <T>(f: (r: ReadingRow) => T) => rows.map(f);
  const conflicts = await sql`
    SELECT ord, conflict_ts FROM ${sql(OLD_FUNCTION)}(
      ${sql.array(meters, 25)}::text[],
      ${sql.array(col((r) => r.meter_id), 25)}::text[], ${sql.array(col((r) => r.ts), 20)}::int8[],
      ${sql.array(col((r) => r.kwh_e4), 20)}::int8[],
      ${sql.array(col((r) => r.user_id), 25)}::text[],
      ${sql.array(col((r) => r.wallet_address), 25)}::text[],
      ${sql.array(col((r) => r.key_id), 25)}::text[],
      ${sql.array(col((r) => r.device_signature), 25)}::text[],
      ${sql.array(col((r) => r.source), 25)}::text[],
      ${sql.array(col((r) => r.submitted_at), 20)}::int8[],
      ${sql.array(col((r) => r.minted), 16)}::bool[],
      ${`${DEDUPE_WINDOW_MS} milliseconds`}::interval)`;
  return conflicts.length;
}

// ---- phases 1-3: writer, COPY, hourly stats -----------------------------------------------------

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

async function writerPhase(bench: BenchSchema, rows: ReadingRow[]): Promise<WriterFigures> {
  const client = await WriterClient.start({
    spec: {
      kind: "postgres",
      url: bench.schema.url,
      max: 2 * LANES,
      migrate: false,
      timescale: bench.timescale,
    },
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
 * at once (each takes the next batch). With TimescaleDB the scratch table is a hypertable with
 * the same chunk interval, so both sides route rows to chunks.
 */
async function copyPhase(
  bench: BenchSchema,
  rows: ReadingRow[],
  connections: number,
): Promise<{ ms: number; load: string }> {
  const sql = bench.sql;
  await sql`DROP TABLE IF EXISTS scratch`;
  await sql`CREATE TABLE scratch (LIKE meter_readings INCLUDING ALL)`;
  if (bench.timescale !== false) {
    await sql.unsafe(
      `SELECT ${quoteIdent(timescaleExt!)}.create_hypertable('scratch', 'reading_timestamp',
         chunk_time_interval => $1::interval, create_default_indexes => false)`,
      [pgInterval(bench.timescale.chunkIntervalMs)],
    );
  }
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
  /** Time of refreshHourlyStats over the loaded range (TimescaleDB), else null. */
  refreshMs: number | null;
  chunks: number | null;
  tableBytes: number;
  indexBytes: number;
  hours: number;
  latencies: number[];
  /** Blocks accessed per hourlyStats call (hits + reads), and of those read. */
  perCall: BlockCounts;
  load: string;
}

interface RawHour {
  hour: number;
  count: number;
  sum_e4: number;
}

/** One meter's hours of [from, to), summed from raw readings (the reference for checks). */
async function rawHours(
  sql: postgres.Sql,
  meter: string,
  from: number,
  to: number,
): Promise<RawHour[]> {
  return await sql<RawHour[]>`
    SELECT (extract(epoch FROM date_trunc('hour', reading_timestamp, 'UTC')) * 1000)::float8
             AS hour,
           count(*)::int4 AS count, (sum(kwh_amount) * 10000)::float8 AS sum_e4
    FROM meter_readings
    WHERE meter_id = ${meter} AND reading_timestamp >= ${new Date(from)}
      AND reading_timestamp < ${new Date(to)}
    GROUP BY 1 ORDER BY 1`;
}

/**
 * Checks `store.hourlyStats(meter, from, to)` against sums of the raw rows: same hours, counts
 * and kWh sums, `expected` readings in all.
 */
async function checkHourlyStats(
  bench: BenchSchema,
  meter: string,
  from: number,
  to: number,
  expected: number,
): Promise<number> {
  const got = await bench.store.hourlyStats(meter, from, to);
  const counted = got.reduce((n, h) => n + h.count, 0);
  if (counted !== expected) {
    throw new Error(`hourlyStats counted ${counted} readings, expected ${expected}`);
  }
  const want = await rawHours(bench.sql, meter, Math.floor(from / HOUR_MS) * HOUR_MS, to);
  const same = got.length === want.length &&
    got.every((h, i) =>
      h.hour === want[i].hour && h.count === want[i].count &&
      Math.round(h.sum_kwh * 10_000) === want[i].sum_e4
    );
  if (!same) throw new Error(`hourlyStats of ${meter} differs from the raw readings' sums`);
  return got.length;
}

/** The relations whose blocks an hourlyStats call may touch. */
async function statsRelids(bench: BenchSchema): Promise<number[]> {
  if (bench.timescale === false) {
    const [{ oid }] = await bench.sql<{ oid: number }[]>`
      SELECT 'meter_readings'::regclass::oid::int8::float8 AS oid`;
    return [oid];
  }
  const rows = await bench.sql<{ oid: number }[]>`
    SELECT format('%I.%I', chunk_schema, chunk_name)::regclass::oid::int8::float8 AS oid
    FROM timescaledb_information.chunks
    WHERE (hypertable_schema, hypertable_name) IN (
      SELECT ${bench.schema.name}::name, 'meter_readings'::name
      UNION ALL
      SELECT materialization_hypertable_schema, materialization_hypertable_name
      FROM timescaledb_information.continuous_aggregates
      WHERE view_schema = ${bench.schema.name} AND view_name = 'meter_hourly_stats')`;
  return rows.map((r) => r.oid);
}

/**
 * Bulk-loads `meters` x 2880 readings in arrival (time) order, refreshes the aggregate over them
 * (TimescaleDB), then times hourlyStats.
 */
async function statsPhase(bench: BenchSchema): Promise<StatsFigures> {
  const { sql, store } = bench;
  const meters = Math.ceil(STATS_ROWS / STATS_SLOTS);
  const total = meters * STATS_SLOTS;
  const now = Date.now();
  // Slots end at the last whole quarter hour: 30 days of readings up to now.
  const lastSlot = Math.floor(now / SLOT_MS);
  const firstSlot = lastSlot - (STATS_SLOTS - 1);
  log(`stats: loading ${fmt(total)} rows (${fmt(meters)} meters x ${STATS_SLOTS} readings)`);
  await sql`TRUNCATE meter_readings, reading_meters`;
  await addMeters(sql, "stats", meters);
  const loadStart = performance.now();
  await loadSlots(sql, "stats", meters, firstSlot, lastSlot + 1);
  // What autovacuum would do soon after such a load anyway; done now so that it does not run
  // (or set hint bits on the first queries' time) in the middle of the measurement.
  await sql`VACUUM (ANALYZE) meter_readings`;
  await checkpoint(sql);
  const loadMs = performance.now() - loadStart;
  log(`  loaded and vacuumed in ${secs(loadMs)} s`);
  let refreshMs: number | null = null;
  let chunks: number | null = null;
  if (bench.timescale !== false) {
    // Rows loaded after the aggregate was created reach it only through a refresh; the policy
    // would cover its last start_offset (8 days) only. Materialise the whole loaded range.
    const t = performance.now();
    await store.refreshHourlyStats(firstSlot * SLOT_MS, now);
    refreshMs = performance.now() - t;
    await sql`VACUUM (ANALYZE) meter_hourly_stats`.catch(() => {});
    await checkpoint(sql);
    chunks = (await chunkCounts(sql, bench.schema.name)).chunks;
    log(`  refreshHourlyStats over the loaded range: ${secs(refreshMs)} s (${chunks} chunks)`);
  }
  const [size] = await sql<{ table: number; indexes: number }[]>`
    SELECT pg_table_size('meter_readings')::float8 AS table,
           pg_indexes_size('meter_readings')::float8 AS indexes`;
  if (bench.timescale !== false) {
    const [ht] = await sql.unsafe<{ table: number; indexes: number }[]>(
      `SELECT (table_bytes + toast_bytes)::float8 AS table, index_bytes::float8 AS indexes
       FROM ${quoteIdent(timescaleExt!)}.hypertable_detailed_size('meter_readings')`,
    );
    size.table = ht.table;
    size.indexes = ht.indexes;
  }

  const from = now - 30 * DAY_MS;
  const pick = random(0x5eed);
  const meterId = () => meterName("stats", Math.floor(pick() * meters));
  // Sanity: a meter's 30 days are all there, 4 readings an hour, with the raw readings' sums.
  const hours = await checkHourlyStats(bench, meterId(), from, now, STATS_SLOTS);
  // Warm-up (connection, prepared statement): not counted.
  for (let i = 0; i < 20; i++) await store.hourlyStats(meterId(), from, now);
  const relids = await statsRelids(bench);
  // A backend publishes its table statistics when it goes idle, at most once a second: after a
  // pause, one more call publishes everything before it (that call is counted in the delta).
  const flushed = async () => {
    await new Promise((resolve) => setTimeout(resolve, 1_100));
    await store.hourlyStats(meterId(), from, now);
    return await blockCounts(sql, relids);
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
    refreshMs,
    chunks,
    tableBytes: size.table,
    indexBytes: size.indexes,
    hours,
    latencies,
    perCall,
    load: `${loadBefore} -> ${loadAfter}`,
  };
}

// ---- phase 4: writes over many chunks ----------------------------------------------------------

interface BatchFigures {
  /** Wall time of each measured insertReadings batch, ms. */
  newMs: number[];
  /** Wall time of each measured batch of the 0003 function, ms. */
  oldMs: number[];
  /** Why old-probe batches stopped early, if they did. */
  oldNote?: string;
  /** CPU time of this process per row in the measured insertReadings calls, µs. */
  cpuUsPerRow: number;
  /** Rows stored in all, warm-up included. */
  inserted: number;
}

/**
 * Inserts fresh batches at the newest end: meter i % M, slot floor(i / M) from `firstTs`:
 * warm-up, then `newCount` insertReadings batches interleaved with `oldCount` batches of the
 * 0003 function (each batch its own rows). Checks that every row was stored.
 */
async function measureBatches(
  bench: BenchSchema,
  oldSql: postgres.Sql | undefined,
  prefix: string,
  meters: number,
  firstTs: number,
  newCount: number,
  oldCount: number,
): Promise<BatchFigures> {
  let next = 0;
  const take = () => {
    const rows = freshRows(prefix, meters, firstTs, next, BATCH);
    next += BATCH;
    return rows;
  };
  const insertNew = async (rows: ReadingRow[]) => {
    const results = await bench.store.insertReadings(rows);
    const notStored = results.filter((r) => r.status !== "stored").length;
    if (notStored > 0) throw new Error(`insertReadings: ${notStored} rows not stored`);
    inserted += rows.length;
  };
  const runOld = async (rows: ReadingRow[]) => {
    const conflicts = await insertOld(oldSql!, rows);
    if (conflicts > 0) throw new Error(`0003 insert function: ${conflicts} rows not stored`);
    inserted += rows.length;
  };
  let inserted = 0;
  for (let i = 0; i < WARM_NEW; i++) await insertNew(take());
  const oldWanted = oldSql === undefined ? 0 : oldCount;
  let oldNote: string | undefined;
  let oldDone = oldWanted === 0;
  if (!oldDone) {
    for (let i = 0; i < WARM_OLD && !oldDone; i++) {
      const t = performance.now();
      try {
        await runOld(take());
      } catch (error) {
        if ((error as { code?: string }).code !== "57014") throw error;
        oldNote = `warm-up batch cancelled after ${secs(performance.now() - t)} s`;
        oldDone = true;
      }
    }
  }
  const total = newCount + oldWanted;
  const newMs: number[] = [];
  const oldMs: number[] = [];
  let cpu = 0;
  for (let k = 0; k < total; k++) {
    // Old batches spread evenly among the new ones.
    const isOld = Math.floor((k + 1) * oldWanted / total) > Math.floor(k * oldWanted / total);
    if (isOld && oldDone) continue;
    const rows = take();
    if (!isOld) {
      const c = cpuMicros();
      const t = performance.now();
      await insertNew(rows);
      newMs.push(performance.now() - t);
      cpu += cpuMicros() - c;
      continue;
    }
    const t = performance.now();
    try {
      await runOld(rows);
      oldMs.push(performance.now() - t);
    } catch (error) {
      if ((error as { code?: string }).code !== "57014") throw error;
      oldNote = `a batch was cancelled after ${secs(performance.now() - t)} s`;
      oldDone = true;
      continue;
    }
    if (sum(oldMs) > OLD_BUDGET_MS && oldMs.length < oldWanted) {
      oldNote = `stopped after ${oldMs.length} batches (${secs(sum(oldMs))} s, --old-budget-s)`;
      oldDone = true;
    }
  }
  return { newMs, oldMs, oldNote, cpuUsPerRow: cpu / (newMs.length * BATCH), inserted };
}

interface ChunkRound {
  days: number;
  /** Readings of history (not counting the measured batches). */
  historyRows: number;
  chunks: number | null;
  compressed: number | null;
  loadMs: number;
  compressMs: number | null;
  totalBytes: number;
  batches: BatchFigures;
  /** Load average (1 min) before and after the measured batches. */
  load: string;
}

/** Start of the newest day of history (yesterday, UTC), so every reading lies in the past. */
function newestDay(): number {
  return Math.floor(Date.now() / DAY_MS) * DAY_MS - DAY_MS;
}

/**
 * History of N days (--history-days, loaded cumulatively into one schema, oldest days last):
 * from the start of the day N - 1 days before the newest day to 08:00 of the newest day. Then,
 * with TimescaleDB, the chunks older than 30 days are compressed, and batches measured from
 * 08:00 of the newest day on, in the newest (uncompressed) chunk, as live traffic writes.
 * After each history size the measured rows are deleted again.
 */
async function chunksPhase(): Promise<ChunkRound[]> {
  const bench = await openSchema(
    timescaleExt === null ? false : { chunkIntervalMs: CHUNK_DAYS * DAY_MS },
  );
  let oldSql: postgres.Sql | undefined;
  try {
    const { sql } = bench;
    const meters = CHUNK_METERS;
    const day = newestDay();
    const anchor = day + ANCHOR_OFFSET_MS;
    const measuredSlots = Math.ceil(
      (WARM_NEW + WARM_OLD + CHUNK_BATCHES + OLD_BATCHES) * BATCH / meters,
    );
    if (anchor + measuredSlots * SLOT_MS > day + DAY_MS) {
      fatal(
        `the chunks phase's batches need ${measuredSlots} slots of ${fmt(meters)} meters after ` +
          `08:00, more than the day has: raise --chunk-meters or lower --chunk-batches`,
      );
    }
    if (OLD_BATCHES > 0) {
      await createOldFunction(sql);
      oldSql = postgres(bench.schema.url, {
        max: 1,
        onnotice: () => {},
        connection: {
          application_name: APP_NAME,
          TimeZone: "UTC",
          statement_timeout: OLD_BUDGET_MS,
        },
      });
      // postgres.js learns the array types on a connection's first query; a first query that
      // passes arrays itself would go out typed as their elements.
      await oldSql`SELECT 1`;
    }
    await addMeters(sql, "bench", meters);
    const rounds: ChunkRound[] = [];
    let loadedFrom = anchor / SLOT_MS;
    for (const [r, days] of HISTORY_DAYS.entries()) {
      const fromSlot = (day - (days - 1) * DAY_MS) / SLOT_MS;
      log(
        `chunks: ${days} days of history (${fmt(meters)} meters, ` +
          `${fmt((anchor / SLOT_MS - fromSlot) * meters)} rows); loading ` +
          `${fmt((loadedFrom - fromSlot) * meters)} rows`,
      );
      const loadMs = await loadSlots(sql, "bench", meters, fromSlot, loadedFrom);
      loadedFrom = fromSlot;
      log(`  loaded in ${secs(loadMs)} s`);
      let compressMs: number | null = null;
      let counts: ChunkCounts | null = null;
      if (bench.timescale !== false) {
        const c = await compressOld(bench, LOAD_CONNECTIONS);
        compressMs = c.ms;
        log(`  compressed ${c.chunks} chunks older than 30 days in ${secs(c.ms)} s`);
      }
      await sql`VACUUM (ANALYZE) meter_readings`;
      await checkpoint(sql);
      if (bench.timescale !== false) counts = await chunkCounts(sql, bench.schema.name);
      const [{ bytes }] = await sql.unsafe<{ bytes: number }[]>(
        bench.timescale === false
          ? `SELECT pg_total_relation_size('meter_readings')::float8 AS bytes`
          : `SELECT ${
            quoteIdent(timescaleExt!)
          }.hypertable_size('meter_readings')::float8 AS bytes`,
      );
      log(
        `  measuring ${CHUNK_BATCHES} insertReadings batches of ${fmt(BATCH)}` +
          (oldSql ? ` and ${OLD_BATCHES} of the 0003 probe` : "") +
          (counts ? ` (${counts.chunks} chunks, ${counts.compressed} compressed)` : ""),
      );
      const loadBefore = load();
      const batches = await measureBatches(
        bench,
        oldSql,
        "bench",
        meters,
        anchor,
        CHUNK_BATCHES,
        OLD_BATCHES,
      );
      const [{ n }] = await sql<{ n: number }[]>`
        SELECT count(*)::float8 AS n FROM meter_readings
        WHERE reading_timestamp >= ${new Date(anchor)}`;
      if (n !== batches.inserted) {
        throw new Error(
          `after the batches the newest rows number ${n}, expected ${batches.inserted}`,
        );
      }
      const [p50, p95] = p50p95(batches.newMs);
      const [o50, o95] = p50p95(batches.oldMs);
      log(
        `  insertReadings p50 ${ms2(p50)} ms, p95 ${ms2(p95)} ms; 0003 probe p50 ${ms2(o50)} ms, ` +
          `p95 ${ms2(o95)} ms${batches.oldNote ? ` (${batches.oldNote})` : ""}`,
      );
      rounds.push({
        days,
        historyRows: (anchor / SLOT_MS - fromSlot) * meters,
        chunks: counts?.chunks ?? null,
        compressed: counts?.compressed ?? null,
        loadMs,
        compressMs,
        totalBytes: bytes,
        batches,
        load: `${loadBefore} -> ${load()}`,
      });
      if (r < HISTORY_DAYS.length - 1) {
        // The next history size measures the same slots again, on the same newest chunk.
        await sql`DELETE FROM meter_readings WHERE reading_timestamp >= ${new Date(anchor)}`;
        if (bench.timescale === false) await sql`VACUUM meter_readings`;
        else await sql.unsafe(`VACUUM ${await chunkAt(sql, bench.schema.name, anchor)}`);
      }
    }
    return rounds;
  } finally {
    await oldSql?.end({ timeout: 5 }).catch(() => {});
    await bench.close();
  }
}

// ---- phase 5: chunk size for compression (TimescaleDB) -----------------------------------------

interface SizeConfig {
  key: string;
  label: string;
  chunkDays: number;
  /** timescaledb.compress_chunk_time_interval, days (roll chunks up when compressing). */
  rollupDays?: number;
  /** timescaledb.compress_sparse_index, set explicitly. */
  sparseIndex?: string;
}

const SIZE_CONFIGS: SizeConfig[] = [
  { key: "1d", label: "1-day chunks", chunkDays: 1 },
  { key: "7d", label: "7-day chunks", chunkDays: 7 },
  {
    key: "1d-rollup",
    label: "1-day chunks, compress_chunk_time_interval 7 days",
    chunkDays: 1,
    rollupDays: 7,
  },
  {
    // TimescaleDB derives sparse indexes for a chunk from the table's indexes (bloom filters on
    // user_id and mint_id here) unless they are configured; a chunk whose settings differ from
    // the hypertable's is never rolled up into. Configured, they are the same.
    key: "1d-rollup-sparse",
    label: "1-day chunks, compress_chunk_time_interval 7 days, sparse index configured",
    chunkDays: 1,
    rollupDays: 7,
    sparseIndex: "bloom(user_id), bloom(mint_id)",
  },
];
const SIZE_CONFIG_KEYS = (flags["size-configs"] as string).split(",");
for (const key of SIZE_CONFIG_KEYS) {
  if (!SIZE_CONFIGS.some((c) => c.key === key)) {
    fatal(`--size-configs: unknown configuration "${key}"`);
  }
}

interface SizeFigures {
  config: SizeConfig;
  rows: number;
  loadMs: number;
  refreshMs: number;
  compressMs: number;
  chunksCompressed: number;
  chunks: ChunkCounts;
  /** From chunk_compression_stats, over the compressed chunks. */
  beforeBytes: number;
  afterBytes: number;
  /** From the catalog (compression_chunk_size): rows compressed and segments they became. */
  rowsCompressed: number;
  segments: number;
  /** hypertable_size of meter_readings in all (compressed and not). */
  totalBytes: number;
  /** Whether every chunk overlapping the stats range is compressed. */
  rangeCompressed: boolean;
  aggregateMs: number[];
  rawMs: number[];
  insert: BatchFigures;
}

/** The raw-rows hourly query of PostgresStore.hourlyStats, on its own. */
function rawStatsQuery(sql: postgres.Sql, meter: string, lo: Date, hi: Date) {
  return sql<{ bucket: Date; count: number; sum_kwh: number }[]>`
    SELECT date_trunc('hour', reading_timestamp, 'UTC') AS bucket,
           count(*)::int4 AS count, sum(kwh_amount)::float8 AS sum_kwh,
           avg(kwh_amount)::float8 AS avg_kwh, min(kwh_amount)::float8 AS min_kwh,
           max(kwh_amount)::float8 AS max_kwh
    FROM meter_readings
    WHERE meter_id = ${meter}
      AND (meter_id, reading_timestamp) >= (${meter}::text, ${lo}::timestamptz)
      AND (meter_id, reading_timestamp) < (${meter}::text, ${hi}::timestamptz)
      AND reading_timestamp >= ${lo}::timestamptz AND reading_timestamp < ${hi}::timestamptz
    GROUP BY 1 ORDER BY 1`;
}

/**
 * For each configuration, on a schema of its own: SIZE_DAYS days of SIZE_METERS meters up to
 * 08:00 of the newest day, the aggregate refreshed over them, chunks older than 30 days
 * compressed; then sizes, hourly stats over the 30 days that end 45 days before the newest day
 * (compressed in every configuration), and insert batches at the newest end.
 */
async function chunkSizePhase(): Promise<SizeFigures[]> {
  const figures: SizeFigures[] = [];
  const meters = SIZE_METERS;
  const day = newestDay();
  const anchor = day + ANCHOR_OFFSET_MS;
  const fromSlot = (day - (SIZE_DAYS - 1) * DAY_MS) / SLOT_MS;
  const rows = (anchor / SLOT_MS - fromSlot) * meters;
  const lo = day - 75 * DAY_MS;
  const hi = day - 45 * DAY_MS;
  const measuredSlots = Math.ceil((WARM_NEW + SIZE_BATCHES) * BATCH / meters);
  if (anchor + measuredSlots * SLOT_MS > day + DAY_MS) {
    fatal(`the chunk-size phase's batches do not fit in a day: lower --size-batches`);
  }
  for (const config of SIZE_CONFIGS.filter((c) => SIZE_CONFIG_KEYS.includes(c.key))) {
    log(
      `chunk size: ${config.label}; ${SIZE_DAYS} days of ${fmt(meters)} meters, ${fmt(rows)} rows`,
    );
    const bench = await openSchema({ chunkIntervalMs: config.chunkDays * DAY_MS });
    try {
      const { sql, store } = bench;
      const ts = quoteIdent(timescaleExt!);
      if (config.rollupDays !== undefined) {
        await sql.unsafe(
          `ALTER TABLE meter_readings SET (timescaledb.compress_chunk_time_interval = '${
            pgInterval(config.rollupDays * DAY_MS)
          }')`,
        );
      }
      if (config.sparseIndex !== undefined) {
        await sql.unsafe(
          `ALTER TABLE meter_readings SET (timescaledb.compress_sparse_index = '${config.sparseIndex}')`,
        );
      }
      await addMeters(sql, "size", meters);
      const loadMs = await loadSlots(sql, "size", meters, fromSlot, anchor / SLOT_MS);
      log(`  loaded in ${secs(loadMs)} s`);
      // The refresh policy materialises hours long before compression reaches them.
      let t = performance.now();
      await store.refreshHourlyStats(fromSlot * SLOT_MS, anchor);
      const refreshMs = performance.now() - t;
      log(`  refreshHourlyStats over the loaded range: ${secs(refreshMs)} s`);
      const c = await compressOld(bench, config.rollupDays === undefined ? LOAD_CONNECTIONS : 1);
      log(`  compressed ${c.chunks} chunks older than 30 days in ${secs(c.ms)} s`);
      await sql`VACUUM (ANALYZE) meter_readings`;
      await sql`VACUUM (ANALYZE) meter_hourly_stats`.catch(() => {});
      await checkpoint(sql);
      const chunks = await chunkCounts(sql, bench.schema.name);
      const [stats] = await sql.unsafe<{ before: number; after: number }[]>(
        `SELECT coalesce(sum(before_compression_total_bytes), 0)::float8 AS before,
                coalesce(sum(after_compression_total_bytes), 0)::float8 AS after
         FROM ${ts}.chunk_compression_stats('meter_readings')
         WHERE compression_status = 'Compressed'`,
      );
      // Internal catalog (rows before and after compression); its columns vary by version.
      const [catalog] = await sql<{ rows: number; segments: number; index: string }[]>`
        SELECT coalesce(sum(s.numrows_pre_compression), 0)::float8 AS rows,
               coalesce(sum(s.numrows_post_compression), 0)::float8 AS segments,
               (SELECT cs.index::text FROM _timescaledb_catalog.compression_settings cs
                WHERE cs.relid = (array_agg(i.relid))[1]) AS index
        FROM _timescaledb_catalog.compression_chunk_size s
        JOIN _timescaledb_catalog.chunk c ON c.id = s.chunk_id
        JOIN (
          SELECT format('%I.%I', chunk_schema, chunk_name)::regclass AS relid
          FROM timescaledb_information.chunks
          WHERE hypertable_schema = ${bench.schema.name} AND hypertable_name = 'meter_readings'
        ) i ON i.relid = coalesce(to_jsonb(c) ->> 'relid',
                                  format('%I.%I', to_jsonb(c) ->> 'schema_name',
                                         to_jsonb(c) ->> 'table_name'))::regclass`
        .catch((error) => {
          log(`  compression_chunk_size not readable: ${error.message}`);
          return [{ rows: NaN, segments: NaN, index: "?" }];
        });
      const [{ total }] = await sql.unsafe<{ total: number }[]>(
        `SELECT ${ts}.hypertable_size('meter_readings')::float8 AS total`,
      );
      const [{ compressed: rangeCompressed }] = await sql<{ compressed: boolean }[]>`
        SELECT bool_and(is_compressed) AS compressed FROM timescaledb_information.chunks
        WHERE hypertable_schema = ${bench.schema.name} AND hypertable_name = 'meter_readings'
          AND range_end > ${new Date(lo)} AND range_start < ${new Date(hi)}`;
      log(
        `  ${chunks.chunks} chunks (${chunks.compressed} compressed): ` +
          `${(stats.before / catalog.rows).toFixed(1)} -> ` +
          `${(stats.after / catalog.rows).toFixed(1)} bytes per reading, ` +
          `${(catalog.rows / catalog.segments).toFixed(0)} rows per segment; sparse indexes of ` +
          `a compressed chunk: ${catalog.index}`,
      );

      // Hourly stats over 30 compressed days: from the aggregate (hourlyStats: the whole range
      // lies before its raw span) and from the raw rows (decompressing).
      const pick = random(0xc0ffee);
      const meterId = () => meterName("size", Math.floor(pick() * meters));
      await checkHourlyStats(bench, meterId(), lo, hi, 30 * SLOTS_PER_DAY);
      const raw = async (meter: string) => {
        const got = await rawStatsQuery(sql, meter, new Date(lo), new Date(hi));
        const n = got.reduce((a, h) => a + h.count, 0);
        if (n !== 30 * SLOTS_PER_DAY) throw new Error(`raw hourly stats counted ${n} readings`);
      };
      for (let i = 0; i < 5; i++) {
        await store.hourlyStats(meterId(), lo, hi);
        await raw(meterId());
      }
      const aggregateMs: number[] = [];
      const rawMs: number[] = [];
      for (let i = 0; i < SIZE_QUERIES; i++) {
        const meter = meterId();
        t = performance.now();
        await store.hourlyStats(meter, lo, hi);
        aggregateMs.push(performance.now() - t);
        t = performance.now();
        await raw(meter);
        rawMs.push(performance.now() - t);
      }
      const insert = await measureBatches(
        bench,
        undefined,
        "size",
        meters,
        anchor,
        SIZE_BATCHES,
        0,
      );
      const [a50, a95] = p50p95(aggregateMs);
      const [r50, r95] = p50p95(rawMs);
      const [i50, i95] = p50p95(insert.newMs);
      log(
        `  hourly stats, aggregate p50 ${ms2(a50)} / p95 ${ms2(a95)} ms, raw p50 ${ms2(r50)} / ` +
          `p95 ${ms2(r95)} ms; insert p50 ${ms2(i50)} / p95 ${ms2(i95)} ms`,
      );
      figures.push({
        config,
        rows,
        loadMs,
        refreshMs,
        compressMs: c.ms,
        chunksCompressed: c.chunks,
        chunks,
        beforeBytes: stats.before,
        afterBytes: stats.after,
        rowsCompressed: catalog.rows,
        segments: catalog.segments,
        totalBytes: total,
        rangeCompressed: rangeCompressed === true,
        aggregateMs,
        rawMs,
        insert,
      });
    } finally {
      await bench.close();
    }
  }
  return figures;
}

// ---- main ------------------------------------------------------------------------------------

let cleaning: Promise<void> | undefined;

function cleanup(): Promise<void> {
  cleaning ??= (async () => {
    for (const bench of [...open]) await bench.close();
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

/** The storage mode to run: --mode, or for auto whether TimescaleDB is preloaded here. */
async function resolveMode(): Promise<string | null> {
  const admin = postgres(BASE_URL, { max: 1, onnotice: () => {}, connect_timeout: 10 });
  try {
    const availability = await timescaleAvailability(admin);
    const usable = availability === "available" || availability === "created";
    if (flags.mode === "plain") return null;
    if (!usable) {
      if (flags.mode === "timescale") {
        fatal(`--mode timescale: TimescaleDB is ${availability.replace("_", " ")} on this server`);
      }
      return null;
    }
    // createTestSchema installs the extension into public where it is only available.
    const [ext] = await admin<{ nsp: string }[]>`
      SELECT n.nspname AS nsp FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
      WHERE e.extname = 'timescaledb'`;
    return ext?.nsp ?? "public";
  } finally {
    await admin.end({ timeout: 1 });
  }
}

function table(header: string[], rows: (string | number)[][]): string {
  const cells = [header, ...rows.map((r) => r.map(String))];
  const widths = header.map((_, i) => Math.max(...cells.map((r) => r[i].length), 3));
  const line = (r: string[]) => `| ${r.map((c, i) => c.padEnd(widths[i])).join(" | ")} |`;
  return [line(cells[0]), line(widths.map((w) => "-".repeat(w))), ...cells.slice(1).map(line)]
    .join("\n");
}

try {
  timescaleExt = await resolveMode();
  {
    const admin = postgres(BASE_URL, { max: 1, onnotice: () => {} });
    try {
      const [s] = await admin<Record<string, string>[]>`
        SELECT split_part(version(), ',', 1) AS version,
               (SELECT extversion FROM pg_extension WHERE extname = 'timescaledb') AS ts,
               current_setting('shared_buffers') AS shared_buffers,
               current_setting('jit') AS jit,
               current_setting('synchronous_commit') AS sync`;
      log(`database ${redactUrl(BASE_URL)}: ${s.version}`);
      log(
        `mode: ${
          timescaleExt === null
            ? `plain PostgreSQL (--mode ${flags.mode})`
            : `TimescaleDB ${s.ts} (--mode ${flags.mode})`
        }; shared_buffers ${s.shared_buffers}, jit ${s.jit}, synchronous_commit ${s.sync}`,
      );
    } finally {
      await admin.end({ timeout: 1 });
    }
  }
  const mainTimescale: TimescaleOptions | false = timescaleExt === null
    ? false
    : { chunkIntervalMs: CHUNK_DAYS * DAY_MS };

  let writer: WriterFigures | undefined;
  let copy: { ms: number; load: string } | undefined;
  let copy2: { ms: number; load: string } | undefined;
  let stats: StatsFigures | undefined;
  if (!flags["skip-write"] || !flags["skip-stats"]) {
    const bench = await openSchema(mainTimescale);
    try {
      if (!flags["skip-write"]) {
        const rows = makeRows(ROWS, METERS, Math.floor(Date.now() / SLOT_MS) * SLOT_MS);
        log(
          `writer: ${fmt(ROWS)} new readings over ${fmt(METERS)} meters, batchMax ${
            fmt(BATCH)
          }, queueMax ${fmt(QUEUE)}, flush ${FLUSH_MS} ms`,
        );
        await checkpoint(bench.sql);
        writer = await writerPhase(bench, rows);
        const [{ n }] = await bench.sql<{ n: number }[]>`
          SELECT count(*)::float8 AS n FROM meter_readings`;
        if (writer.stored !== ROWS || n !== ROWS) {
          throw new Error(
            `writer stored ${writer.stored} (table holds ${n}) of ${ROWS} rows ` +
              `(${writer.duplicate} duplicate, ${writer.failed} failed)`,
          );
        }
        log(`  ${fmt(ROWS / writer.ms * 1000)} rows/s (${secs(writer.ms)} s)`);
        log(
          `copy: the same rows into scratch (LIKE meter_readings INCLUDING ALL), ${
            fmt(BATCH)
          } a COPY`,
        );
        copy = await copyPhase(bench, rows, 1);
        log(`  ${fmt(ROWS / copy.ms * 1000)} rows/s (${secs(copy.ms)} s)`);
        log("copy: again on two connections at once, as the writer worker writes two batches");
        copy2 = await copyPhase(bench, rows, 2);
        log(`  ${fmt(ROWS / copy2.ms * 1000)} rows/s (${secs(copy2.ms)} s)`);
      }
      if (!flags["skip-stats"]) stats = await statsPhase(bench);
    } finally {
      await bench.close();
    }
  }

  let rounds: ChunkRound[] | undefined;
  if (!flags["skip-chunks"]) rounds = await chunksPhase();
  let sizes: SizeFigures[] | undefined;
  if (!flags["skip-chunk-size"]) {
    if (timescaleExt !== null) sizes = await chunkSizePhase();
    else log("chunk size for compression: TimescaleDB only, skipped on plain PostgreSQL");
  }

  const modeName = timescaleExt === null ? "plain PostgreSQL" : "TimescaleDB";
  console.log(`\n==== summary (${modeName}) ====`);
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
    console.log(
      `hourly stats: ${fmt(stats.rows)} rows (${fmt(stats.meters)} meters x ${STATS_SLOTS}), ` +
        `table ${mib(stats.tableBytes)} + indexes ${mib(stats.indexBytes)}; ` +
        `loaded in ${secs(stats.loadMs)} s (not measured)` +
        (stats.chunks === null ? "" : `; ${stats.chunks} chunks`),
    );
    if (stats.refreshMs !== null) {
      console.log(
        `  refreshHourlyStats over the 30 loaded days: ${secs(stats.refreshMs)} s ` +
          `(${fmt(stats.rows / stats.refreshMs * 1000)} rows/s)`,
      );
    }
    console.log(
      `  hourlyStats(meter, now-30d, now), ${stats.hours} hours, ${STATS_QUERIES} random meters: ` +
        `p50 ${ms2(p50)} ms, p95 ${ms2(p95)} ms, p99 ${ms2(p99)} ms, ` +
        `max ${ms2(sorted.at(-1)!)} ms (goal p95 < 20 ms: ${p95 < 20 ? "met" : "NOT met"})`,
    );
    const b = stats.perCall;
    console.log(
      `  ${
        timescaleExt === null ? "meter_readings" : "chunks (readings and aggregate)"
      } blocks per call: heap ${fmt(b.heap)} (${fmt(b.heapRead)} read outside ` +
        `shared_buffers), index ${fmt(b.index)} (${fmt(b.indexRead)} read); ` +
        `load average (1 min) ${stats.load}`,
    );
  }
  if (rounds) {
    console.log(
      `\nwrites over many chunks: ${fmt(CHUNK_METERS)} meters x 96 readings a day, batches of ` +
        `${fmt(BATCH)} fresh readings at the newest end` +
        (timescaleExt === null ? "" : `, ${CHUNK_DAYS}-day chunks, older than 30 days compressed`),
    );
    console.log(table(
      [
        "history days",
        "rows",
        "chunks",
        "compressed",
        "batch p50 ms",
        "p95 ms",
        "rows/s",
        "CPU µs/row",
        "0003 probe p50 ms",
        "p95 ms",
        "size",
        "load avg",
      ],
      rounds.map((r) => {
        const [p50, p95] = p50p95(r.batches.newMs);
        const [o50, o95] = p50p95(r.batches.oldMs);
        const old = r.batches.oldMs.length > 0;
        return [
          r.days,
          fmt(r.historyRows),
          r.chunks ?? "—",
          r.compressed ?? "—",
          ms2(p50),
          ms2(p95),
          fmt(r.batches.newMs.length * BATCH / sum(r.batches.newMs) * 1000),
          r.batches.cpuUsPerRow.toFixed(1),
          old ? `${ms2(o50)} (${r.batches.oldMs.length})` : "—",
          old ? ms2(o95) : "—",
          mib(r.totalBytes),
          r.load,
        ];
      }),
    ));
    for (const r of rounds) {
      if (r.batches.oldNote) console.log(`  ${r.days} days, 0003 probe: ${r.batches.oldNote}`);
    }
    console.log(
      `  load: ${rounds.map((r) => `${r.days} d +${secs(r.loadMs)} s`).join(", ")}` +
        (timescaleExt === null
          ? ""
          : `; compress: ${
            rounds.map((r) => `${r.days} d ${secs(r.compressMs ?? 0)} s`).join(", ")
          }`),
    );
  }
  if (sizes) {
    console.log(
      `\nchunk size for compression: ${SIZE_DAYS} days of ${fmt(SIZE_METERS)} meters, chunks ` +
        `older than 30 days compressed; hourly stats over the 30 days ending 45 days before ` +
        `yesterday, ${SIZE_QUERIES} random meters`,
    );
    console.log(table(
      [
        "configuration",
        "chunks (compressed)",
        "bytes/reading before",
        "after",
        "rows/segment",
        "total size",
        "compress s",
        "refresh s",
        "stats aggregate p50/p95 ms",
        "stats raw p50/p95 ms",
        "insert p50/p95 ms",
      ],
      sizes.map((s) => {
        const [a50, a95] = p50p95(s.aggregateMs);
        const [r50, r95] = p50p95(s.rawMs);
        const [i50, i95] = p50p95(s.insert.newMs);
        return [
          s.config.label,
          `${s.chunks.chunks} (${s.chunks.compressed})`,
          (s.beforeBytes / s.rowsCompressed).toFixed(1),
          (s.afterBytes / s.rowsCompressed).toFixed(1),
          (s.rowsCompressed / s.segments).toFixed(0),
          mib(s.totalBytes),
          secs(s.compressMs),
          secs(s.refreshMs),
          `${ms2(a50)} / ${ms2(a95)}`,
          `${ms2(r50)} / ${ms2(r95)}`,
          `${ms2(i50)} / ${ms2(i95)}`,
        ];
      }),
    ));
    for (const s of sizes) {
      if (!s.rangeCompressed) {
        console.log(`  ${s.config.label}: the stats range is NOT all compressed`);
      }
    }
  }
} finally {
  await cleanup();
  Deno.removeSignalListener("SIGINT", onSigint);
}
