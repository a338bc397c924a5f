import type { Store, StoreOptions } from "./store.ts";
import { KvStore } from "./kv_store.ts";
import { PostgresStore } from "./postgres_store.ts";
import type { TimescaleOptions } from "./migrate.ts";
import type { Config } from "../core/config.ts";
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

/** Opens the store adapter named by `spec`. */
export async function openStore(spec: StoreSpec, options: StoreOptions): Promise<Store> {
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
      });
  }
}

/** The store spec the configuration asks for (PostgreSQL when DATABASE_URL is set). */
export function storeSpecOf(config: Config): StoreSpec {
  const db = config.database;
  if (!db) return { kind: "kv", path: config.kvPath };
  const seconds = (ms: number) => `${Math.round(ms / 1000)} seconds`;
  return {
    kind: "postgres",
    url: db.url,
    max: db.poolMax,
    migrate: db.migrateOnStart,
    timescale: db.timescale && {
      chunkInterval: seconds(db.chunkIntervalMs),
      compressAfter: seconds(db.compressAfterMs),
      retainFor: seconds(config.retention.keepMs),
      // Late readings up to READING_MAX_AGE must still reach the hourly aggregate.
      refreshStartOffset: seconds(config.rules.maxAgeMs + 86_400_000),
    },
  };
}

/** Describes a store for logs, without credentials. */
export function describeStore(spec: StoreSpec): string {
  return spec.kind === "kv"
    ? `deno-kv:${spec.path}`
    : `postgres:${spec.url.replace(/\/\/[^@/]*@/, "//***@")}`;
}
