// Schema migrations of the PostgreSQL store: the numbered files of db/migrations/, then the
// TimescaleDB setup when that extension is available (DESIGN.md §7).
import type postgres from "postgres";
import type { Logger } from "../core/logger.ts";

/**
 * Settings of the TimescaleDB setup, in milliseconds. The gateway and `deno task migrate` derive
 * them from the same configuration (`timescaleOptionsOf` in db/open_store.ts).
 */
export interface TimescaleOptions {
  /** Time span of one chunk of `meter_readings`. Default 1 day. */
  chunkIntervalMs?: number;
  /**
   * How far back each refresh of `meter_hourly_stats` looks, and how far back hourly stats are
   * computed from raw readings instead of the aggregate. Must cover the oldest reading accepted
   * (READING_MAX_AGE) with room for the policy to run. Default 8 days.
   */
  refreshStartOffsetMs?: number;
  /** Most recent span left to real-time aggregation. Default 1 hour. */
  refreshEndOffsetMs?: number;
  /** How often the refresh policy runs. Default 5 minutes. */
  refreshScheduleMs?: number;
  /** Age after which chunks are compressed (segmented by meter). Default 30 days. */
  compressAfterMs?: number;
  /** Age after which chunks of readings, and of their hourly stats, are dropped. Default 365 days. */
  retainForMs?: number;
}

/** Options of {@linkcode migrate}. */
export interface MigrateOptions {
  logger?: Logger;
  /** Intervals of the TimescaleDB setup; `false` stays on plain PostgreSQL even when available. */
  timescale?: TimescaleOptions | false;
}

/** What {@linkcode migrate} did. */
export interface MigrateResult {
  /** Names of the migrations applied by this call, in order (empty when up to date). */
  applied: string[];
  /** Whether TimescaleDB is active: hypertable and `meter_hourly_stats` in place. */
  timescale: boolean;
}

const MINUTE = 60_000;
const HOUR = 60 * MINUTE;
const DAY = 24 * HOUR;

/** Defaults of {@linkcode TimescaleOptions}. */
export const TIMESCALE_DEFAULTS: Readonly<Required<TimescaleOptions>> = {
  chunkIntervalMs: DAY,
  refreshStartOffsetMs: 8 * DAY,
  refreshEndOffsetMs: HOUR,
  refreshScheduleMs: 5 * MINUTE,
  compressAfterMs: 30 * DAY,
  retainForMs: 365 * DAY,
};

/** `ms` as PostgreSQL interval text in the largest whole unit (`"8 days"`, `"90 seconds"`). */
export function pgInterval(ms: number): string {
  if (!Number.isFinite(ms) || ms <= 0) throw new RangeError(`not a positive duration: ${ms}`);
  if (ms % DAY === 0) return `${ms / DAY} days`;
  if (ms % HOUR === 0) return `${ms / HOUR} hours`;
  if (ms % MINUTE === 0) return `${ms / MINUTE} minutes`;
  return `${ms / 1000} seconds`;
}

// First key of the session advisory lock that serialises migrations; the second key is the
// schema's hash, so separate schemas (test runs) migrate independently.
const MIGRATION_LOCK = 0x4754_4d47; // "GTMG"
const FILE_PATTERN = /^\d{4}_[a-z0-9_]+\.sql$/;
// A first line that opts a file out of the transaction (e.g. CREATE INDEX CONCURRENTLY).
const NO_TRANSACTION = /^--\s*migrate:\s*no-transaction\b/;
const MIGRATIONS_DIR = new URL("./migrations/", import.meta.url);
// Earlier texts of migration files that were edited without changing what they do to a
// database that applied them: no warning for these. 0002 lost a branch for tables that were
// already hypertables, which cannot exist when it runs (file migrations precede the
// TimescaleDB setup).
const SUPERSEDED: Readonly<Record<string, readonly string[]>> = {
  "0002_hourly_index_only.sql": [
    "6674099aef48237524f051633ed0d7ebf60f233fa240a3bfa63c182baa9327e9",
  ],
};

/** One migration file: its name, text and SHA-256. */
export interface Migration {
  name: string;
  text: string;
  checksum: string;
}

type Conn = postgres.ReservedSql;

/**
 * Applies the pending migrations of `db/migrations/` in file-name order, each in its own
 * transaction and recorded in `schema_migrations`, then sets up TimescaleDB when available.
 *
 * Idempotent, and safe to run from several instances at once: a session advisory lock makes
 * the others wait, after which they find nothing left to do.
 */
export async function migrate(
  sql: postgres.Sql,
  options: MigrateOptions = {},
): Promise<MigrateResult> {
  const log = options.logger;
  const migrations = await readMigrations();
  const conn = await sql.reserve();
  try {
    const [{ schema }] = await conn<{ schema: string | null }[]>`
      SELECT current_schema() AS schema`;
    if (schema === null) {
      throw new Error("No schema of the search_path exists to migrate into");
    }
    await conn`SELECT pg_advisory_lock(${MIGRATION_LOCK}, hashtext(current_schema()))`;
    try {
      await conn.unsafe(`
        CREATE TABLE IF NOT EXISTS schema_migrations (
          name       text PRIMARY KEY,
          checksum   text NOT NULL,
          applied_at timestamptz NOT NULL DEFAULT now()
        )`);
      const done = new Map(
        (await conn<{ name: string; checksum: string }[]>`
          SELECT name, checksum FROM schema_migrations`).map((r) => [r.name, r.checksum]),
      );
      const applied: string[] = [];
      for (const migration of migrations) {
        const checksum = done.get(migration.name);
        if (checksum !== undefined) {
          if (
            checksum !== migration.checksum &&
            !SUPERSEDED[migration.name]?.includes(checksum)
          ) {
            // An applied file was edited: the database keeps what was applied; say so.
            log?.warn("applied migration file has changed since", { migration: migration.name });
          }
          continue;
        }
        await applyFile(conn, migration);
        applied.push(migration.name);
        log?.info("migration applied", { migration: migration.name, schema });
      }
      const timescale = options.timescale === false
        ? false
        : await setUpTimescale(conn, { ...TIMESCALE_DEFAULTS, ...options.timescale }, {
          schema,
          done,
          applied,
          log,
        });
      log?.info("migrations up to date", { schema, applied: applied.length, timescale });
      return { applied, timescale };
    } finally {
      // A connection that died took its session lock with it; nothing to undo then.
      await conn`SELECT pg_advisory_unlock(${MIGRATION_LOCK}, hashtext(current_schema()))`
        .catch(() => {});
    }
  } finally {
    conn.release();
  }
}

/**
 * The schema of the TimescaleDB extension when the connected schema uses it (extension
 * installed, `meter_hourly_stats` present), else null.
 */
export async function timescaleSchema(sql: postgres.Sql): Promise<string | null> {
  // Looked up in the connected schema only: a `meter_hourly_stats` of a schema further down
  // the search_path (a TimescaleDB `public` behind a plain schema) is someone else's.
  const [row] = await sql<{ nsp: string | null; cagg: boolean }[]>`
    SELECT (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
            WHERE e.extname = 'timescaledb') AS nsp,
           to_regclass(format('%I.meter_hourly_stats', current_schema())) IS NOT NULL AS cagg`;
  return row.cagg ? row.nsp : null;
}

/** The migration files, ordered by name (`deno task doctor` compares them with the database). */
export async function readMigrations(): Promise<Migration[]> {
  const names: string[] = [];
  for await (const entry of Deno.readDir(MIGRATIONS_DIR)) {
    if (entry.isFile && FILE_PATTERN.test(entry.name)) names.push(entry.name);
  }
  names.sort();
  return await Promise.all(names.map(async (name) => {
    const text = await Deno.readTextFile(new URL(name, MIGRATIONS_DIR));
    return { name, text, checksum: await sha256(text) };
  }));
}

async function applyFile(conn: Conn, migration: Migration): Promise<void> {
  const record = () =>
    conn`INSERT INTO schema_migrations (name, checksum)
      VALUES (${migration.name}, ${migration.checksum})`;
  try {
    if (NO_TRANSACTION.test(migration.text)) {
      await conn.unsafe(migration.text);
      await record();
      return;
    }
    await inTransaction(conn, async () => {
      // The simple query protocol runs the file's statements in one round trip.
      await conn.unsafe(migration.text);
      await record();
    });
  } catch (error) {
    throw new Error(`Migration "${migration.name}" failed: ${(error as Error).message}`, {
      cause: error,
    });
  }
}

/** Runs `fn` between BEGIN and COMMIT on the reserved connection, rolling back on error. */
async function inTransaction(conn: Conn, fn: () => Promise<void>): Promise<void> {
  await conn.unsafe("BEGIN");
  try {
    await fn();
  } catch (error) {
    await conn.unsafe("ROLLBACK").catch(() => {});
    throw error;
  }
  await conn.unsafe("COMMIT");
}

interface SetUpState {
  schema: string;
  done: Map<string, string>;
  applied: string[];
  log?: Logger;
}

interface Step {
  name: string;
  run: () => Promise<unknown>;
  /** Run outside a transaction (TimescaleDB refuses some calls inside one). */
  noTransaction?: boolean;
  /** Whether a failure stops the migration (else: logged, retried at the next run). */
  optional?: boolean;
}

/**
 * Enables TimescaleDB when the server offers it and applies its setup once: the hypertable
 * (migrating existing rows), the continuous aggregate with real-time aggregation, compression,
 * and the first materialisation of rows that predate the aggregate. Then brings the chunk
 * interval and the policies in line with `settings` (see {@linkcode reconcilePolicies}).
 * Returns false, leaving plain PostgreSQL in place, when the extension is not available.
 */
async function setUpTimescale(
  conn: Conn,
  settings: Required<TimescaleOptions>,
  state: SetUpState,
): Promise<boolean> {
  const { schema, done, applied, log } = state;
  const availability = await timescaleAvailability(conn);
  if (availability === "absent") return false;
  if (availability === "not_preloaded") {
    log?.warn("TimescaleDB is installed but not preloaded: using plain PostgreSQL", {
      hint: "add timescaledb to shared_preload_libraries and restart PostgreSQL",
    });
    return false;
  }
  if (availability === "available" && !(await enableTimescale(conn, log))) return false;
  // The extension's functions are called schema-qualified: its schema need not be on the path.
  const ts = quoteIdent((await extensionSchema(conn))!);
  const readings = `${quoteIdent(schema)}.meter_readings`;
  const stats = `${quoteIdent(schema)}.meter_hourly_stats`;

  const steps: Step[] = [
    {
      name: "timescale/0001_hypertable",
      run: () =>
        conn.unsafe(
          `SELECT ${ts}.create_hypertable('${readings}', 'reading_timestamp',
             chunk_time_interval => $1::interval, migrate_data => true,
             create_default_indexes => false, if_not_exists => true)`,
          [pgInterval(settings.chunkIntervalMs)],
        ),
    },
    {
      name: "timescale/0002_meter_hourly_stats",
      run: () =>
        conn.unsafe(`
          CREATE MATERIALIZED VIEW ${stats}
          WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
          SELECT meter_id,
                 ${ts}.time_bucket(INTERVAL '1 hour', reading_timestamp) AS bucket,
                 count(*) AS reading_count,
                 sum(kwh_amount) AS sum_kwh,
                 avg(kwh_amount) AS avg_kwh,
                 min(kwh_amount) AS min_kwh,
                 max(kwh_amount) AS max_kwh
          FROM ${readings}
          GROUP BY meter_id, bucket
          WITH NO DATA`),
    },
    {
      name: "timescale/0003_compression",
      run: () =>
        conn.unsafe(`
          ALTER TABLE ${readings} SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id',
            timescaledb.compress_orderby = 'reading_timestamp DESC'
          )`),
    },
    {
      // Rows that predate the aggregate lie outside every later refresh window: materialise
      // them once. Recorded only once it succeeded, so a failure is retried at the next run.
      name: "timescale/0004_backfill_hourly_stats",
      noTransaction: true,
      optional: true,
      run: async () => {
        const [{ any }] = await conn<{ any: boolean }[]>`
          SELECT EXISTS (SELECT 1 FROM meter_readings) AS any`;
        if (any) {
          await conn.unsafe(
            `CALL ${ts}.refresh_continuous_aggregate('${stats}', NULL, NULL)`,
          );
        }
      },
    },
  ];
  for (const step of steps) {
    if (done.has(step.name)) continue;
    const record = () =>
      conn`INSERT INTO schema_migrations (name, checksum) VALUES (${step.name}, '-')`;
    try {
      if (step.noTransaction) {
        await step.run();
        await record();
      } else {
        await inTransaction(conn, async () => {
          await step.run();
          await record();
        });
      }
    } catch (error) {
      if (!step.optional) {
        throw new Error(`Migration "${step.name}" failed: ${(error as Error).message}`, {
          cause: error,
        });
      }
      log?.warn("post-migration step failed; it is retried at the next start", {
        migration: step.name,
        error,
      });
      continue;
    }
    applied.push(step.name);
    log?.info("migration applied", { migration: step.name, schema });
  }
  applied.push(...await reconcilePolicies(conn, ts, schema, settings, log));
  return true;
}

/** What the server offers of TimescaleDB, as far as this role can tell. */
export type TimescaleAvailability =
  /** Not installed on the server. */
  | "absent"
  /** Installed on the server but not in shared_preload_libraries: CREATE EXTENSION would fail. */
  | "not_preloaded"
  /** Installed and preloaded (or the setting is not readable): CREATE EXTENSION may work. */
  | "available"
  /** Already created in this database. */
  | "created";

/**
 * Whether TimescaleDB can be used here, looked up before anything tries: `CREATE EXTENSION`
 * without preloading fails with a FATAL that ends the session (and a pooled connection).
 */
export async function timescaleAvailability(
  sql: postgres.Sql | Conn,
): Promise<TimescaleAvailability> {
  // pg_settings hides a setting this role may not read (current_setting() raises instead):
  // null then means "unknown".
  const [row] = await sql<{ offered: boolean; created: boolean; libs: string | null }[]>`
    SELECT EXISTS (SELECT 1 FROM pg_available_extensions WHERE name = 'timescaledb') AS offered,
           EXISTS (SELECT 1 FROM pg_extension WHERE extname = 'timescaledb') AS created,
           (SELECT setting FROM pg_settings WHERE name = 'shared_preload_libraries') AS libs`;
  if (row.created) return "created";
  if (!row.offered) return "absent";
  return preloads(row.libs) ? "available" : "not_preloaded";
}

/** Whether a shared_preload_libraries value loads TimescaleDB (unknown, null, counts as yes). */
export function preloads(libs: string | null): boolean {
  if (libs === null) return true;
  return libs.split(",").some((lib) => {
    // Entries may be quoted and may name a versioned library or a path ("$libdir/timescaledb").
    const name = lib.trim().replace(/^"|"$/g, "").split("/").at(-1) ?? "";
    return name === "timescaledb" || name.startsWith("timescaledb-");
  });
}

/** `CREATE EXTENSION timescaledb`, or false (logged) when this server or role cannot. */
async function enableTimescale(conn: Conn, log?: Logger): Promise<boolean> {
  try {
    await inTransaction(conn, async () => {
      await conn.unsafe("CREATE EXTENSION IF NOT EXISTS timescaledb");
    });
    return true;
  } catch (error) {
    log?.warn("TimescaleDB could not be enabled: using plain PostgreSQL", { error });
    return false;
  }
}

/** One policy job the setup keeps, and the settings it should carry. */
interface WantedJob {
  key: string;
  proc: "policy_refresh_continuous_aggregate" | "policy_compression" | "policy_retention";
  on: "readings" | "stats";
  /** Config fields holding intervals, and their wanted values. */
  intervals: Record<string, string>;
  /** Wanted schedule, where the setup sets one (else TimescaleDB's default stays). */
  schedule?: string;
  add: string;
  params: string[];
}

/** A policy job of the gateway's tables in one schema, as TimescaleDB lists it. */
export interface PolicyJob {
  job_id: number;
  proc_name: string;
  /** What the job works on: the readings hypertable or the hourly stats aggregate. */
  on: "readings" | "stats";
  schedule: string;
  config: Record<string, unknown>;
}

/**
 * The refresh, compression and retention jobs of `schema`'s `meter_readings` and
 * `meter_hourly_stats`, oldest first (TimescaleDB must be created in the database). Versions
 * differ in how they list an aggregate's jobs (under the view or its materialisation table):
 * both are matched.
 */
export async function schemaJobs(
  sql: postgres.Sql | Conn,
  schema: string,
): Promise<PolicyJob[]> {
  return await sql<PolicyJob[]>`
    SELECT j.job_id, j.proc_name, j.schedule_interval::text AS schedule, j.config,
           CASE WHEN j.hypertable_name = 'meter_readings' AND j.hypertable_schema = ${schema}
                THEN 'readings' ELSE 'stats' END AS on
    FROM timescaledb_information.jobs j
    WHERE j.proc_name IN ('policy_refresh_continuous_aggregate', 'policy_compression',
                          'policy_retention')
      AND ((j.hypertable_schema = ${schema}
            AND j.hypertable_name IN ('meter_readings', 'meter_hourly_stats'))
        OR EXISTS (
          SELECT 1 FROM timescaledb_information.continuous_aggregates c
          WHERE c.view_schema = ${schema} AND c.view_name = 'meter_hourly_stats'
            AND c.materialization_hypertable_schema = j.hypertable_schema
            AND c.materialization_hypertable_name = j.hypertable_name))
    ORDER BY j.job_id`;
}

/** The schema TimescaleDB is created in, or null when it is not created in this database. */
export async function extensionSchema(sql: postgres.Sql | Conn): Promise<string | null> {
  const [row] = await sql<{ nsp: string }[]>`
    SELECT n.nspname AS nsp FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'timescaledb'`;
  return row?.nsp ?? null;
}

/**
 * Brings the chunk interval and the policy jobs of the schema in line with `settings`, comparing
 * intervals by value (`8 days` equals `691200 seconds`) against the live jobs, and changing a
 * job in place with `alter_job` so its schedule and history survive. A job is only added where
 * none exists. Returns the names of what it changed.
 */
async function reconcilePolicies(
  conn: Conn,
  ts: string,
  schema: string,
  settings: Required<TimescaleOptions>,
  log?: Logger,
): Promise<string[]> {
  const changed: string[] = [];
  const readings = `${quoteIdent(schema)}.meter_readings`;
  const stats = `${quoteIdent(schema)}.meter_hourly_stats`;

  const [dim] = await conn<{ interval: string | null }[]>`
    SELECT time_interval::text AS interval FROM timescaledb_information.dimensions
    WHERE hypertable_schema = ${schema} AND hypertable_name = 'meter_readings'
      AND dimension_number = 1`;
  const chunk = pgInterval(settings.chunkIntervalMs);
  if (dim !== undefined && !(await sameIntervals(conn, [[dim.interval, chunk]]))[0]) {
    await conn.unsafe(`SELECT ${ts}.set_chunk_time_interval('${readings}', $1::interval)`, [
      chunk,
    ]);
    log?.info("TimescaleDB chunk interval changed; it applies to chunks created from now on", {
      from: dim.interval,
      to: chunk,
    });
    changed.push("timescale/chunk_interval");
  }

  const wanted: WantedJob[] = [
    {
      key: "refresh",
      proc: "policy_refresh_continuous_aggregate",
      on: "stats",
      intervals: {
        start_offset: pgInterval(settings.refreshStartOffsetMs),
        end_offset: pgInterval(settings.refreshEndOffsetMs),
      },
      schedule: pgInterval(settings.refreshScheduleMs),
      add: `SELECT ${ts}.add_continuous_aggregate_policy('${stats}',
              start_offset => $1::interval, end_offset => $2::interval,
              schedule_interval => $3::interval)`,
      params: [
        pgInterval(settings.refreshStartOffsetMs),
        pgInterval(settings.refreshEndOffsetMs),
        pgInterval(settings.refreshScheduleMs),
      ],
    },
    {
      key: "compression",
      proc: "policy_compression",
      on: "readings",
      intervals: { compress_after: pgInterval(settings.compressAfterMs) },
      add: `SELECT ${ts}.add_compression_policy('${readings}', compress_after => $1::interval)`,
      params: [pgInterval(settings.compressAfterMs)],
    },
    {
      key: "retention",
      proc: "policy_retention",
      on: "readings",
      intervals: { drop_after: pgInterval(settings.retainForMs) },
      add: `SELECT ${ts}.add_retention_policy('${readings}', drop_after => $1::interval)`,
      params: [pgInterval(settings.retainForMs)],
    },
    {
      // Hourly stats go with the readings they summarise, so every storage mode answers alike.
      key: "stats_retention",
      proc: "policy_retention",
      on: "stats",
      intervals: { drop_after: pgInterval(settings.retainForMs) },
      add: `SELECT ${ts}.add_retention_policy('${stats}', drop_after => $1::interval)`,
      params: [pgInterval(settings.retainForMs)],
    },
  ];

  const live = await schemaJobs(conn, schema);

  for (const want of wanted) {
    const [job, ...extra] = live.filter((j) => j.proc_name === want.proc && j.on === want.on);
    for (const dup of extra) {
      await conn.unsafe(`SELECT ${ts}.delete_job($1)`, [dup.job_id]);
      log?.warn("duplicate TimescaleDB policy job removed", { job_id: dup.job_id });
    }
    if (job === undefined) {
      await conn.unsafe(want.add, want.params);
      changed.push(`timescale/policy/${want.key}`);
      log?.info("TimescaleDB policy added", { policy: want.key, ...want.intervals });
      continue;
    }
    const fields = Object.entries(want.intervals);
    const pairs: [string | null, string][] = fields.map(([field, value]) => {
      const current = job.config?.[field];
      return [typeof current === "string" ? current : null, value];
    });
    if (want.schedule !== undefined) pairs.push([job.schedule, want.schedule]);
    const same = await sameIntervals(conn, pairs);
    if (same.every(Boolean)) continue;
    const config = { ...job.config, ...want.intervals };
    // A null schedule leaves the job's schedule as it is.
    await conn.unsafe(
      `SELECT ${ts}.alter_job($1, config => $2::jsonb, schedule_interval => $3::interval)`,
      // The object itself: postgres.js serialises a jsonb parameter (a string would end up
      // a JSON string, not an object).
      [job.job_id, config as unknown as postgres.SerializableParameter, want.schedule ?? null],
    );
    changed.push(`timescale/policy/${want.key}`);
    log?.info("TimescaleDB policy changed in place", {
      policy: want.key,
      job_id: job.job_id,
      ...want.intervals,
      ...(want.schedule ? { schedule: want.schedule } : {}),
    });
  }
  return changed;
}

/**
 * For each pair, whether both are the same interval by value (as PostgreSQL compares them:
 * `1 day` equals `24 hours` equals `86400 seconds`); a null or unparsable side is never equal.
 */
export async function sameIntervals(
  sql: postgres.Sql | Conn,
  pairs: [string | null, string][],
): Promise<boolean[]> {
  if (pairs.length === 0) return [];
  const compare = (list: [string | null, string][]) =>
    sql<{ same: boolean | null }[]>`
      SELECT a::interval = b::interval AS same
      FROM unnest(${sql.array(list.map((p) => p[0]) as string[], 25)}::text[],
                  ${sql.array(list.map((p) => p[1]), 25)}::text[]) WITH ORDINALITY AS u(a, b, ord)
      ORDER BY ord`;
  try {
    const rows = await compare(pairs);
    return pairs.map((_, i) => rows[i]?.same === true);
  } catch {
    // One side is not an interval (an integer offset, garbage): compare one by one, such a
    // pair being different.
    const result: boolean[] = [];
    for (const pair of pairs) {
      result.push(await compare([pair]).then(([r]) => r?.same === true, () => false));
    }
    return result;
  }
}

/** Policy jobs of the schema whose last run failed, with the latest error where recorded. */
export interface FailingJob {
  job_id: number;
  proc_name: string;
  total_failures: number;
  last_error: string | null;
}

/**
 * The policy jobs of `schema` whose last run failed (TimescaleDB must be created), so the
 * gateway can warn: a failing refresh leaves hourly stats stale, a failing retention lets the
 * disk fill.
 */
export async function failingTimescaleJobs(
  sql: postgres.Sql,
  schema: string,
): Promise<FailingJob[]> {
  const jobs = await schemaJobs(sql, schema);
  if (jobs.length === 0) return [];
  // job_errors exists from TimescaleDB 2.9 on.
  const [{ errors }] = await sql<{ errors: boolean }[]>`
    SELECT to_regclass('timescaledb_information.job_errors') IS NOT NULL AS errors`;
  const failed = await sql<{ job_id: number; total_failures: number; last_error: string | null }[]>`
    SELECT s.job_id, s.total_failures::int4 AS total_failures,
           ${
    errors
      ? sql`(SELECT e.err_message FROM timescaledb_information.job_errors e
              WHERE e.job_id = s.job_id ORDER BY e.finish_time DESC NULLS LAST LIMIT 1)`
      : sql`NULL::text`
  } AS last_error
    FROM timescaledb_information.job_stats s
    WHERE s.last_run_status = 'Failed' AND s.job_id IN ${sql(jobs.map((j) => j.job_id))}
    ORDER BY s.job_id`;
  return failed.map((f) => ({
    ...f,
    proc_name: jobs.find((j) => j.job_id === f.job_id)!.proc_name,
  }));
}

/** `name` as a quoted SQL identifier. */
export function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
