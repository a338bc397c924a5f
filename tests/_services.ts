// Where the tests find the real services (PostgreSQL, Redis, MQTT), and what they do when one
// is missing: fail the run in CI, skip with the reason in the test's name elsewhere.
import postgres from "postgres";
import { extensionSchema, quoteIdent, schemaJobs, timescaleAvailability } from "../db/migrate.ts";

/** Outcome of {@linkcode requireService}: usable, or why not. */
export type ServiceStatus = { ok: true } | { ok: false; reason: string };

const PROBE_TIMEOUT_MS = 3_000;

/** PostgreSQL for tests: `TEST_DATABASE_URL`, else the local server's `test` database. */
export function postgresUrl(): string {
  return Deno.env.get("TEST_DATABASE_URL") || "postgres://postgres@127.0.0.1:5432/test";
}

/** Redis for tests: `TEST_REDIS_URL`, else the local server. */
export function redisUrl(): string {
  return Deno.env.get("TEST_REDIS_URL") || "redis://127.0.0.1:6379";
}

/** MQTT broker for tests: `TEST_MQTT_URL`, else the local Mosquitto. */
export function mqttUrl(): string {
  return Deno.env.get("TEST_MQTT_URL") || "mqtt://127.0.0.1:1883";
}

/** `url` without its password, for messages and test names. */
export function redactUrl(url: string): string {
  try {
    const parsed = new URL(url);
    if (parsed.password !== "") parsed.password = "***";
    return parsed.href;
  } catch {
    return "<malformed URL>";
  }
}

/**
 * Runs `probe`. When it fails and `CI` is set, throws: a missing service fails the run. Else
 * returns the reason, for the caller to register its tests with `ignore: true` and the reason
 * in their names.
 */
export async function requireService(
  name: string,
  probe: () => Promise<unknown>,
): Promise<ServiceStatus> {
  try {
    await probe();
    return { ok: true };
  } catch (error) {
    const reason = `${name} unreachable (${(error as Error)?.message ?? error})`;
    if (Deno.env.get("CI")) {
      throw new Error(`${reason}; CI is set, so a missing service fails the run`, {
        cause: error,
      });
    }
    return { ok: false, reason };
  }
}

/** A probe that runs `SELECT 1` on `url`. */
export function probePostgres(url: string): () => Promise<void> {
  return async () => {
    const sql = postgres(url, {
      max: 1,
      connect_timeout: PROBE_TIMEOUT_MS / 1000,
      onnotice: () => {},
    });
    try {
      await sql`SELECT 1`;
    } finally {
      await sql.end({ timeout: 1 });
    }
  };
}

/** A probe that opens (and closes) a TCP connection to the host and port of `url`. */
export function probeTcp(url: string, defaultPort: number): () => Promise<void> {
  return async () => {
    const parsed = new URL(url);
    const port = parsed.port === "" ? defaultPort : Number(parsed.port);
    const hostname = parsed.hostname.replace(/^\[|\]$/g, "");
    let timer: ReturnType<typeof setTimeout> | undefined;
    const connecting = Deno.connect({ hostname, port });
    try {
      const conn = await Promise.race([
        connecting,
        new Promise<never>((_, reject) => {
          timer = setTimeout(
            () => reject(new Error(`no answer within ${PROBE_TIMEOUT_MS} ms`)),
            PROBE_TIMEOUT_MS,
          );
        }),
      ]);
      conn.close();
    } catch (error) {
      // A connection that completes after the timeout is closed, not leaked.
      connecting.then((conn) => conn.close(), () => {});
      throw error;
    } finally {
      clearTimeout(timer);
    }
  };
}

/** A schema of its own for one test: connect through `url`, then `drop()` it. */
export interface TestSchema {
  name: string;
  /** The database URL with the schema first on the search_path (then `public`). */
  url: string;
  /** Drops the schema and everything in it. */
  drop(): Promise<void>;
}

/**
 * Creates an empty schema `gw_test_<random>` on `baseUrl`, so that tests running in parallel,
 * or left over from a crashed run, never see each other's tables.
 */
export async function createTestSchema(baseUrl: string = postgresUrl()): Promise<TestSchema> {
  const name = `gw_test_${crypto.randomUUID().replaceAll("-", "").slice(0, 16)}`;
  await withAdmin(baseUrl, async (sql) => {
    // Where TimescaleDB is usable, install it into `public` first: created by a migration it
    // would land in the test schema and vanish (for every schema) when that is dropped. The
    // check is the migration's own: installed but not preloaded, CREATE EXTENSION ends the
    // session with a FATAL, which would fail every PostgreSQL test.
    if (await timescaleAvailability(sql) === "available") {
      await sql`CREATE EXTENSION IF NOT EXISTS timescaledb SCHEMA public`.catch(() => {});
    }
    await sql`CREATE SCHEMA ${sql(name)}`;
  });
  const url = new URL(baseUrl);
  // `public` stays on the path for extensions installed there (TimescaleDB's functions).
  url.searchParams.set("search_path", `${name},public`);
  return {
    name,
    url: url.href,
    drop: () => dropTestSchema(baseUrl, name),
  };
}

/**
 * Drops a test schema. Its TimescaleDB policy jobs are deleted first: left in place they keep
 * running against dropped tables, and one that runs during the DROP makes it fail ("tuple
 * concurrently deleted").
 */
export async function dropTestSchema(baseUrl: string, name: string): Promise<void> {
  await withAdmin(baseUrl, async (sql) => {
    const nsp = await extensionSchema(sql);
    for (let attempt = 1;; attempt++) {
      try {
        if (nsp !== null) {
          for (const job of await schemaJobs(sql, name)) {
            await sql.unsafe(`SELECT ${quoteIdent(nsp)}.delete_job($1)`, [job.job_id]);
          }
        }
        await sql`DROP SCHEMA IF EXISTS ${sql(name)} CASCADE`;
        return;
      } catch (error) {
        // A job that was already running when it was deleted may still hold a catalog row.
        if (attempt >= 5) throw error;
        await new Promise((resolve) => setTimeout(resolve, 200 * attempt));
      }
    }
  });
}

async function withAdmin(url: string, fn: (sql: postgres.Sql) => Promise<void>): Promise<void> {
  const sql = postgres(url, { max: 1, onnotice: () => {} });
  try {
    await fn(sql);
  } finally {
    await sql.end({ timeout: 5 });
  }
}
