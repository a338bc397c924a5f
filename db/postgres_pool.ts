// A postgres.js pool pinned to one schema: the gateway's tables are looked up there and
// nowhere else, whatever else the search_path of the URL or the role names.
import postgres from "postgres";
import type { Logger } from "../core/logger.ts";
import { quoteIdent } from "./migrate.ts";

/** Options of {@linkcode openPinnedPool}. */
export interface PinnedPoolOptions {
  /** Connections in the pool. */
  max: number;
  /** Seconds to wait for a connection. Default 10. */
  connectTimeout?: number;
  /** Server notices go here at debug level. */
  logger?: Logger;
}

/** A pool and the schema it is pinned to. */
export interface PinnedPool {
  sql: postgres.Sql;
  schema: string;
}

/**
 * Finds the schema `url` resolves to (the first existing schema of its search_path, as
 * PostgreSQL creates tables there) and opens a pool whose connections search only that schema.
 * Without this, an object missing from the gateway's schema but present further down the path
 * (another schema's `meter_hourly_stats`, a whole other gateway schema in `public`) would be
 * used silently. Extension functions are called schema-qualified, so they need no path.
 */
export async function openPinnedPool(url: string, options: PinnedPoolOptions): Promise<PinnedPool> {
  const connectTimeout = options.connectTimeout ?? 10;
  const probe = postgres(url, { max: 1, connect_timeout: connectTimeout, onnotice: () => {} });
  let schema: string | null;
  try {
    [{ schema }] = await probe<{ schema: string | null }[]>`SELECT current_schema() AS schema`;
  } finally {
    await probe.end({ timeout: 5 });
  }
  if (schema === null) {
    throw new Error("No schema of the database URL's search_path exists");
  }
  // A search_path in the URL would override the pinned one (postgres.js lets URL parameters win).
  const pinned = new URL(url);
  pinned.searchParams.delete("search_path");
  const logger = options.logger;
  const sql = postgres(pinned.href, {
    max: options.max,
    connect_timeout: connectTimeout,
    backoff: reconnectBackoff,
    onnotice: (notice) => logger?.debug("postgres notice", { message: notice.message }),
    // Hour buckets and timestamptz text in UTC whatever the server's default.
    connection: {
      application_name: "gridtokenx-gateway",
      TimeZone: "UTC",
      search_path: quoteIdent(schema),
    },
  });
  return { sql, schema };
}

/**
 * Seconds before a pool connection tries again after a failed connect: 50 ms doubling to 1 s,
 * with jitter. postgres.js's own grows to 10–20 s, so the first query after an outage could wait
 * that long for a database that is back.
 */
export function reconnectBackoff(retries: number): number {
  return Math.min(0.05 * 2 ** retries, 1) * (0.5 + Math.random() / 2);
}
