// The storage settings of an operator task: the gateway's own variables, read by its own code.
import { loadStorageConfig, type StorageConfig } from "../core/config.ts";
import { ConfigError } from "../core/errors.ts";
import { fatal } from "./_args.ts";

/** A storage configuration with a database. */
export type DatabaseStorage = StorageConfig & { database: NonNullable<StorageConfig["database"]> };

/** The storage configuration from the environment; exits 2 when invalid or DATABASE_URL is unset. */
export function databaseStorage(): DatabaseStorage {
  let storage: StorageConfig;
  try {
    storage = loadStorageConfig(Deno.env.toObject());
  } catch (error) {
    if (error instanceof ConfigError) fatal(error.message);
    throw error;
  }
  if (storage.database === undefined) fatal("DATABASE_URL is not set (see --help)");
  return storage as DatabaseStorage;
}
