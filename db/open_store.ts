import type { Store, StoreOptions } from "./store.ts";
import { KvStore } from "./kv_store.ts";
import { PostgresStore } from "./postgres_store.ts";
import type { TimescaleOptions } from "./migrate.ts";
import type { Config, StorageConfig } from "../core/config.ts";
import type { Logger } from "../core/logger.ts";
import { prepareKvFile, restrictKvFiles } from "./private_files.ts";

/** How to reach a store; plain data so it can be posted to the writer worker. */
export type StoreSpec =
  | { kind: "kv"; path: string }
  | {
    kind: "postgres";
    url: string;
    max: number;
    /** Apply migrations when opening (the composition root does; the writer worker does not). */
    migrate: boolean;
    timescale: TimescaleOptions | false;
  };

/** Opens the store adapter named by `spec`; `logger` hears how it was set up. */
export async function openStore(
  spec: StoreSpec,
  options: StoreOptions,
  logger?: Logger,
): Promise<Store> {
  switch (spec.kind) {
    case "kv": {
      await prepareKvFile(spec.path);
      const store = await KvStore.open(spec.path, options);
      // The side files SQLite opened alongside an older, readable database file.
      await restrictKvFiles(spec.path);
      return store;
    }
    case "postgres":
      return PostgresStore.connect(spec.url, {
        ...options,
        max: spec.max,
        migrate: spec.migrate,
        timescale: spec.timescale,
        logger,
      });
  }
}

/** The store spec the configuration asks for (PostgreSQL when DATABASE_URL is set). */
export function storeSpecOf(config: Config): StoreSpec {
  const db = config.database;
  if (!db) return { kind: "kv", path: config.kvPath };
  return {
    kind: "postgres",
    url: db.url,
    max: db.poolMax,
    migrate: db.migrateOnStart,
    timescale: timescaleOptionsOf({
      database: db,
      retention: config.retention,
      readingMaxAgeMs: config.rules.maxAgeMs,
    }),
  };
}

/**
 * The TimescaleDB settings the configuration asks for, or false when TIMESCALE_ENABLED=false.
 * The one place they are derived: the gateway and `deno task migrate` both call it, so the two
 * never set the database up differently.
 */
export function timescaleOptionsOf(config: StorageConfig): TimescaleOptions | false {
  const db = config.database;
  if (!db?.timescale) return false;
  return {
    chunkIntervalMs: db.chunkIntervalMs,
    compressAfterMs: db.compressAfterMs,
    retainForMs: config.retention.keepMs,
    // A reading up to READING_MAX_AGE old may still arrive: its hour must stay inside the
    // refresh window (and be summed from raw rows) for a day after it could last change.
    refreshStartOffsetMs: config.readingMaxAgeMs + 86_400_000,
  };
}

/** Describes a store for logs, without credentials. */
export function describeStore(spec: StoreSpec): string {
  return spec.kind === "kv"
    ? `deno-kv:${spec.path}`
    : `postgres:${spec.url.replace(/\/\/[^@/]*@/, "//***@")}`;
}
