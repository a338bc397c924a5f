import type { StoreSpec } from "../db/open_store.ts";
import type { StoreOptions } from "../db/store.ts";

/** Messages from the gateway to the writer worker. */
export type ToWriter =
  | { type: "init"; spec: StoreSpec; options: StoreOptions }
  /**
   * `resent`: handed over again after a worker restart; part of it may have been committed by
   * the worker that died, and those rows must be claimed, not reported as duplicates.
   */
  /** `rows`: packed by `encodeRows` (row_codec.ts), with each row's `batch_job_id` if any. */
  | { type: "batch"; id: number; rows: ArrayBuffer; resent?: boolean }
  | { type: "close" };

/** Messages from the writer worker back to the gateway. */
export type FromWriter =
  | { type: "ready" }
  | { type: "init_failed"; message: string }
  /** `results`: packed by `encodeResults` (row_codec.ts), seqs of the stored rows included. */
  | { type: "done"; id: number; results: ArrayBuffer; ms: number }
  /** The batch cannot be written, ever (bad data): its rows fail; others go on. */
  | { type: "failed"; id: number; message: string }
  /** The store failed; the batch is kept and retried after `retryMs`. */
  | { type: "stalled"; id: number; message: string; retryMs: number }
  | { type: "closed" };
