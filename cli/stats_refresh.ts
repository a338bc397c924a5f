// `deno task stats:refresh --from T --to T`: materialises TimescaleDB's hourly stats of a past
// range now, after a historical load that the refresh policy will never look at again.
import { jsonLogger } from "../core/logger.ts";
import { timescaleOptionsOf } from "../db/open_store.ts";
import { PostgresStore } from "../db/postgres_store.ts";
import { databaseStorage } from "./_storage.ts";
import { fatal, parseFlags, required } from "./_args.ts";

const USAGE = `Usage: deno task stats:refresh --from T --to T [--slice D]

Recomputes the hourly stats (the continuous aggregate meter_hourly_stats) of every hour that
overlaps [from, to), in slices of D, oldest first. Needed only with TimescaleDB, and only for
readings written into hours older than the refresh policy's window (READING_MAX_AGE plus one
day), e.g. a historical load by SQL; readings the gateway accepts are counted at once. On plain
PostgreSQL hourly stats are always computed from the readings: the command says so and exits 0.
Prints {"timescale": bool, "from": ..., "to": ..., "slices": n}.

Environment: DATABASE_URL, and the gateway's TIMESCALE_* / READING_MAX_AGE settings.

Options:
  --from T       Start (ISO 8601, e.g. 2026-01-01T00:00:00Z), inclusive
  --to T         End (ISO 8601), exclusive
  --slice D      Days per refresh call (default 7); each call is its own transaction
  -h, --help     Show this help`;

const DAY = 86_400_000;

async function main(args: string[]): Promise<void> {
  const flags = parseFlags(args, {
    usage: USAGE,
    options: {
      from: { type: "string" },
      to: { type: "string" },
      slice: { type: "string", default: "7" },
    },
  });
  const from = instant(required(flags.from, "from"), "from");
  const to = instant(required(flags.to, "to"), "to");
  if (from >= to) fatal("--from must be before --to");
  const days = Number(flags.slice);
  if (!Number.isInteger(days) || days < 1 || days > 366) {
    fatal("--slice must be a whole number of days from 1 to 366");
  }
  const storage = databaseStorage();
  const logger = jsonLogger("info", { sink: (line) => console.error(line) });
  let store: PostgresStore;
  try {
    store = await PostgresStore.connect(storage.database.url, {
      dedupeWindowMs: 1,
      max: 1,
      migrate: false,
      // Whatever TIMESCALE_ENABLED says, the aggregate is refreshed where it exists.
      timescale: timescaleOptionsOf(storage) || {},
    });
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exitCode = 1;
    return;
  }
  const report = { timescale: store.timescale, from: iso(from), to: iso(to), slices: 0 };
  try {
    if (!store.timescale) {
      logger.info("plain PostgreSQL: hourly stats are computed from the readings, nothing to do");
    } else {
      for (let start = from; start < to; start += days * DAY) {
        const end = Math.min(to, start + days * DAY);
        await store.refreshHourlyStats(start, end);
        report.slices++;
        logger.info("hourly stats refreshed", { from: iso(start), to: iso(end) });
      }
    }
    console.log(JSON.stringify(report, null, 2));
  } catch (error) {
    console.error(`error: ${(error as Error).message}`);
    Deno.exitCode = 1;
  } finally {
    await store.close();
  }
}

function instant(text: string, flag: string): number {
  const ms = /^\d{4}-\d{2}-\d{2}(T[\d:.]+(Z|[+-]\d{2}:\d{2}))?$/.test(text)
    ? Date.parse(text)
    : NaN;
  if (!Number.isFinite(ms)) fatal(`--${flag} must be an ISO 8601 date or instant, got "${text}"`);
  return ms;
}

function iso(ms: number): string {
  return new Date(ms).toISOString();
}

if (import.meta.main) await main(Deno.args);
