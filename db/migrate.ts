// Schema migrations of the PostgreSQL store: the numbered files of db/migrations/, then the
// TimescaleDB setup when that extension is available (DESIGN.md §7).
import type postgres from "postgres";
import type { Logger } from "../core/logger.ts";

/** Intervals of the TimescaleDB setup, as PostgreSQL interval text (`"30 days"`). */
export interface TimescaleOptions {
  /** Time span of one chunk of `meter_readings`. Default `"1 day"`. */
  chunkInterval?: string;
  /**
   * How far back each refresh of `meter_hourly_stats` looks. Late readings inside it are picked
   * up by the next refresh, so it must cover the oldest reading accepted (READING_MAX_AGE).
   * Default `"8 days"`.
   */
  refreshStartOffset?: string;
  /** Most recent span left to real-time aggregation. Default `"1 hour"`. */
  refreshEndOffset?: string;
  /** How often the refresh policy runs. Default `"5 minutes"`. */
  refreshSchedule?: string;
  /** Age after which chunks are compressed (segmented by meter). Default `"30 days"`. */
  compressAfter?: string;
  /** Age after which chunks are dropped. Default `"1 year"`. */
  retainFor?: string;
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

/** Defaults of {@linkcode TimescaleOptions}. */
export const TIMESCALE_DEFAULTS: Readonly<Required<TimescaleOptions>> = {
  chunkInterval: "1 day",
  refreshStartOffset: "8 days",
  refreshEndOffset: "1 hour",
  refreshSchedule: "5 minutes",
  compressAfter: "30 days",
  retainFor: "1 year",
};

// First key of the session advisory lock that serialises migrations; the second key is the
// schema's hash, so separate schemas (test runs) migrate independently.
const MIGRATION_LOCK = 0x4754_4d47; // "GTMG"
const FILE_PATTERN = /^\d{4}_[a-z0-9_]+\.sql$/;
// A first line that opts a file out of the transaction (e.g. CREATE INDEX CONCURRENTLY).
const NO_TRANSACTION = /^--\s*migrate:\s*no-transaction\b/;
const MIGRATIONS_DIR = new URL("./migrations/", import.meta.url);

interface Migration {
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
          if (checksum !== migration.checksum) {
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
  const [row] = await sql<{ nsp: string | null; cagg: boolean }[]>`
    SELECT (SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
            WHERE e.extname = 'timescaledb') AS nsp,
           to_regclass('meter_hourly_stats') IS NOT NULL AS cagg`;
  return row.cagg ? row.nsp : null;
}

/** The migration files, ordered by name. */
async function readMigrations(): Promise<Migration[]> {
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
  done: Map<string, string>;
  applied: string[];
  log?: Logger;
}

/**
 * Enables TimescaleDB when the server offers it and applies its setup once: the hypertable
 * (migrating existing rows), the continuous aggregate with real-time aggregation, and
 * compression. Policies are (re)applied whenever the configured intervals change.
 * Returns false, leaving plain PostgreSQL in place, when the extension is not available.
 */
async function setUpTimescale(
  conn: Conn,
  intervals: Required<TimescaleOptions>,
  state: SetUpState,
): Promise<boolean> {
  const { done, applied, log } = state;
  const [ext] = await conn<{ installed: string | null }[]>`
    SELECT installed_version AS installed FROM pg_available_extensions
    WHERE name = 'timescaledb'`;
  if (ext === undefined) return false;
  if (ext.installed === null && !(await enableTimescale(conn, log))) return false;
  const [{ nsp }] = await conn<{ nsp: string }[]>`
    SELECT n.nspname AS nsp FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace
    WHERE e.extname = 'timescaledb'`;
  // The extension's functions are called schema-qualified: its schema need not be on the path.
  const ts = quoteIdent(nsp);

  const steps: { name: string; run: () => Promise<unknown>; after?: () => Promise<unknown> }[] = [
    {
      name: "timescale/0001_hypertable",
      run: () =>
        conn.unsafe(
          `SELECT ${ts}.create_hypertable('meter_readings', 'reading_timestamp',
             chunk_time_interval => $1::interval, migrate_data => true,
             create_default_indexes => false, if_not_exists => true)`,
          [intervals.chunkInterval],
        ),
    },
    {
      name: "timescale/0002_meter_hourly_stats",
      run: () =>
        conn.unsafe(`
          CREATE MATERIALIZED VIEW meter_hourly_stats
          WITH (timescaledb.continuous, timescaledb.materialized_only = false) AS
          SELECT meter_id,
                 ${ts}.time_bucket(INTERVAL '1 hour', reading_timestamp) AS bucket,
                 count(*) AS reading_count,
                 sum(kwh_amount) AS sum_kwh,
                 avg(kwh_amount) AS avg_kwh,
                 min(kwh_amount) AS min_kwh,
                 max(kwh_amount) AS max_kwh
          FROM meter_readings
          GROUP BY meter_id, bucket
          WITH NO DATA`),
      // Rows that predate the aggregate lie outside every later refresh window: materialise
      // them once, outside a transaction as TimescaleDB requires.
      after: async () => {
        const [{ any }] = await conn<{ any: boolean }[]>`
          SELECT EXISTS (SELECT 1 FROM meter_readings) AS any`;
        if (any) {
          await conn.unsafe(
            `CALL ${ts}.refresh_continuous_aggregate('meter_hourly_stats', NULL, NULL)`,
          );
        }
      },
    },
    {
      name: "timescale/0003_compression",
      run: () =>
        conn.unsafe(`
          ALTER TABLE meter_readings SET (
            timescaledb.compress,
            timescaledb.compress_segmentby = 'meter_id',
            timescaledb.compress_orderby = 'reading_timestamp DESC'
          )`),
    },
  ];
  for (const step of steps) {
    if (done.has(step.name)) continue;
    await inTransaction(conn, async () => {
      await step.run();
      await conn`INSERT INTO schema_migrations (name, checksum) VALUES (${step.name}, '-')`;
    });
    await step.after?.().catch((error) => {
      log?.warn("post-migration step failed; rerun it by hand", { migration: step.name, error });
    });
    applied.push(step.name);
    log?.info("migration applied", { migration: step.name });
  }

  // Policies carry the configured intervals: re-applied when they change, else left alone
  // (re-adding would reset the jobs' schedules on every start).
  const policies = "timescale/policies";
  const wanted = JSON.stringify([
    intervals.refreshStartOffset,
    intervals.refreshEndOffset,
    intervals.refreshSchedule,
    intervals.compressAfter,
    intervals.retainFor,
  ]);
  if (done.get(policies) !== wanted) {
    await inTransaction(conn, async () => {
      await conn.unsafe(
        `SELECT ${ts}.remove_continuous_aggregate_policy('meter_hourly_stats', if_exists => true)`,
      );
      await conn.unsafe(
        `SELECT ${ts}.add_continuous_aggregate_policy('meter_hourly_stats',
           start_offset => $1::interval, end_offset => $2::interval,
           schedule_interval => $3::interval)`,
        [intervals.refreshStartOffset, intervals.refreshEndOffset, intervals.refreshSchedule],
      );
      await conn.unsafe(
        `SELECT ${ts}.remove_compression_policy('meter_readings', if_exists => true)`,
      );
      await conn.unsafe(
        `SELECT ${ts}.add_compression_policy('meter_readings', compress_after => $1::interval)`,
        [intervals.compressAfter],
      );
      await conn.unsafe(
        `SELECT ${ts}.remove_retention_policy('meter_readings', if_exists => true)`,
      );
      await conn.unsafe(
        `SELECT ${ts}.add_retention_policy('meter_readings', drop_after => $1::interval)`,
        [intervals.retainFor],
      );
      await conn`
        INSERT INTO schema_migrations (name, checksum) VALUES (${policies}, ${wanted})
        ON CONFLICT (name) DO UPDATE SET checksum = excluded.checksum, applied_at = now()`;
    });
    applied.push(policies);
    log?.info("TimescaleDB policies applied", { ...intervals });
  }
  return true;
}

/** `CREATE EXTENSION timescaledb`, or false (logged) when this server or role cannot. */
async function enableTimescale(conn: Conn, log?: Logger): Promise<boolean> {
  // Without preloading, CREATE EXTENSION fails (and may end the session): look first when
  // the setting is readable to this role.
  const preload = await conn<{ libs: string }[]>`
    SELECT current_setting('shared_preload_libraries') AS libs`.then(
    ([row]) => row.libs,
    () => null,
  );
  if (preload !== null && !preload.split(",").some((lib) => lib.trim() === "timescaledb")) {
    log?.warn("TimescaleDB is installed but not preloaded: using plain PostgreSQL", {
      shared_preload_libraries: preload,
    });
    return false;
  }
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

function quoteIdent(name: string): string {
  return `"${name.replaceAll('"', '""')}"`;
}

async function sha256(text: string): Promise<string> {
  const digest = await crypto.subtle.digest("SHA-256", new TextEncoder().encode(text));
  return Array.from(new Uint8Array(digest), (b) => b.toString(16).padStart(2, "0")).join("");
}
