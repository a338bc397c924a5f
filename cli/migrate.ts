// `deno task migrate`: applies the PostgreSQL schema migrations (and the TimescaleDB setup when
// that extension is available) to DATABASE_URL, with the settings the gateway would use, then
// prints what it did as JSON.
import { jsonLogger } from "../core/logger.ts";
import { migrate, TIMESCALE_DEFAULTS, type TimescaleOptions } from "../db/migrate.ts";
import { timescaleOptionsOf } from "../db/open_store.ts";
import { openPinnedPool } from "../db/postgres_pool.ts";
import { databaseStorage } from "./_storage.ts";
import { parseFlags } from "./_args.ts";

const USAGE = `Usage: deno task migrate [--no-timescale]

Applies the pending migrations of db/migrations/ to the database of DATABASE_URL, each in its
own transaction; safe to run from several instances at once, and safe to alternate with
gateways starting with MIGRATE_ON_START=true. When the TimescaleDB extension is available it is
enabled and set up once (hypertable, hourly continuous aggregate, compression), and its chunk
interval and policies are brought in line with the settings below, changing jobs in place.
Prints {"applied": [...], "timescale": true|false, "settings": {...}}.

Settings come from the same environment variables, read by the same code, as the gateway's:
  DATABASE_URL                 postgres://user:password@host:5432/database
  TIMESCALE_ENABLED            false: stay on plain PostgreSQL (default true)
  TIMESCALE_CHUNK_INTERVAL     chunk span of meter_readings (default 1d)
  TIMESCALE_COMPRESS_AFTER     compress chunks older than this (default 30d)
  READINGS_RETENTION           drop readings and their hourly stats older than this (default 365d)
  READING_MAX_AGE              oldest reading accepted; the hourly stats refresh window is this
                               plus one day (default 7d)

Options:
  --no-timescale               Same as TIMESCALE_ENABLED=false
  -h, --help                   Show this help`;

async function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: { "no-timescale": { type: "boolean", default: false } },
  });
  const storage = databaseStorage();
  const timescale = flags["no-timescale"] ? false : timescaleOptionsOf(storage);
  // Progress goes to stderr as JSON lines; stdout carries only the result.
  const logger = jsonLogger("info", { sink: (line) => console.error(line) });
  let pool;
  try {
    pool = await openPinnedPool(storage.database.url, { max: 1 });
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exitCode = 1;
    return;
  }
  try {
    const result = await migrate(pool.sql, { logger, timescale });
    console.log(JSON.stringify({ ...result, settings: describe(timescale) }, null, 2));
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exitCode = 1;
  } finally {
    await pool.sql.end({ timeout: 5 });
  }
}

/** The TimescaleDB settings in effect, in milliseconds (false: plain PostgreSQL asked for). */
function describe(options: TimescaleOptions | false): Required<TimescaleOptions> | false {
  return options === false ? false : { ...TIMESCALE_DEFAULTS, ...options };
}

if (import.meta.main) await main(Deno.args);
