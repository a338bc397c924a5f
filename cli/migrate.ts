// `deno task migrate`: applies the PostgreSQL schema migrations (and the TimescaleDB setup when
// that extension is available) to DATABASE_URL, then prints what it did as JSON.
import postgres from "postgres";
import { jsonLogger } from "../core/logger.ts";
import { migrate, TIMESCALE_DEFAULTS, type TimescaleOptions } from "../db/migrate.ts";
import { env, fatal, parseFlags } from "./_args.ts";

const USAGE = `Usage: deno task migrate [--no-timescale] [--chunk-interval I] [--compress-after I]
                         [--retain-for I] [--refresh-start-offset I] [--refresh-end-offset I]
                         [--refresh-schedule I]

Applies the pending migrations of db/migrations/ to the database of DATABASE_URL, each in its
own transaction; safe to run from several instances at once. When the TimescaleDB extension is
available it is enabled and set up once (hypertable, hourly continuous aggregate, compression,
retention). Prints {"applied": [...], "timescale": true|false}.

Environment:
  DATABASE_URL                 postgres://user:password@host:5432/database

Options (PostgreSQL intervals, e.g. "30 days"; used only with TimescaleDB):
  --no-timescale               Stay on plain PostgreSQL even when TimescaleDB is available
  --chunk-interval I           Chunk span of meter_readings (default ${TIMESCALE_DEFAULTS.chunkInterval})
  --compress-after I           Compress chunks older than I (default ${TIMESCALE_DEFAULTS.compressAfter})
  --retain-for I               Drop chunks older than I (default ${TIMESCALE_DEFAULTS.retainFor})
  --refresh-start-offset I     Hourly stats refresh window start; must cover READING_MAX_AGE
                               (default ${TIMESCALE_DEFAULTS.refreshStartOffset})
  --refresh-end-offset I       Hourly stats refresh window end (default ${TIMESCALE_DEFAULTS.refreshEndOffset})
  --refresh-schedule I         How often hourly stats refresh (default ${TIMESCALE_DEFAULTS.refreshSchedule})
  -h, --help                   Show this help`;

async function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      "no-timescale": { type: "boolean", default: false },
      "chunk-interval": { type: "string" },
      "compress-after": { type: "string" },
      "retain-for": { type: "string" },
      "refresh-start-offset": { type: "string" },
      "refresh-end-offset": { type: "string" },
      "refresh-schedule": { type: "string" },
    },
  });
  const url = databaseUrl(env("DATABASE_URL"));
  const timescale: TimescaleOptions = {};
  const intervals = {
    chunkInterval: flags["chunk-interval"],
    compressAfter: flags["compress-after"],
    retainFor: flags["retain-for"],
    refreshStartOffset: flags["refresh-start-offset"],
    refreshEndOffset: flags["refresh-end-offset"],
    refreshSchedule: flags["refresh-schedule"],
  };
  for (const [key, value] of Object.entries(intervals)) {
    if (value !== undefined) timescale[key as keyof TimescaleOptions] = value;
  }
  // Progress goes to stderr as JSON lines; stdout carries only the result.
  const logger = jsonLogger("info", { sink: (line) => console.error(line) });
  const sql = postgres(url, { max: 1, connect_timeout: 10, onnotice: () => {} });
  try {
    const result = await migrate(sql, {
      logger,
      timescale: flags["no-timescale"] ? false : timescale,
    });
    console.log(JSON.stringify(result, null, 2));
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exitCode = 1;
  } finally {
    await sql.end({ timeout: 5 });
  }
}

/** DATABASE_URL, checked to be a postgres:// URL; exits 2 when missing or malformed. */
function databaseUrl(value: string | undefined): string {
  if (value === undefined) fatal("DATABASE_URL is not set (see --help)");
  let parsed: URL;
  try {
    parsed = new URL(value);
  } catch {
    fatal("DATABASE_URL is not a URL");
  }
  if (parsed.protocol !== "postgres:" && parsed.protocol !== "postgresql:") {
    fatal(`DATABASE_URL must start with postgres:// or postgresql://, got "${parsed.protocol}"`);
  }
  return value;
}

if (import.meta.main) await main(Deno.args);
