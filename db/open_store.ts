import type { Store, StoreOptions } from "./store.ts";
import { KvStore } from "./kv_store.ts";

/** How to reach a store; plain data so it can be posted to the writer worker. */
export type StoreSpec = { kind: "kv"; path: string };

/** Opens the store adapter named by `spec`. */
export function openStore(spec: StoreSpec, options: StoreOptions): Promise<Store> {
  switch (spec.kind) {
    case "kv":
      return KvStore.open(spec.path, options);
  }
}
