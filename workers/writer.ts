/// <reference lib="deno.worker" />
// The batching writer: owns its own store handle and writes one batch at a time, so a slow
// or failing store never blocks the actors' thread. A failed batch is kept and retried.
import type { ReadingRow } from "../core/reading.ts";
import type { InsertResult, Store } from "../db/store.ts";
import { openStore } from "../db/open_store.ts";
import { decodeRows, encodeResults } from "./row_codec.ts";
import type { FromWriter, ToWriter } from "./writer_protocol.ts";

const RETRY_MIN_MS = 100;
const RETRY_MAX_MS = 5_000;

let store: Store | undefined;
// Batches written at once: PostgreSQL takes one per connection (per-meter row locks in sorted
// order keep them apart); Deno KV has one writer, so one at a time.
let concurrency = 1;
const waiting: { id: number; rows: ArrayBuffer; resent: boolean }[] = [];
const running = new Set<Promise<void>>();

function pump(): void {
  while (running.size < concurrency && waiting.length > 0) {
    const { id, rows, resent } = waiting.shift()!;
    const task = writeBatch(id, rows, resent).finally(() => {
      running.delete(task);
      pump();
    });
    running.add(task);
  }
}

async function idle(): Promise<void> {
  while (running.size > 0 || waiting.length > 0) await Promise.race(running);
}
let closing = false;

function post(message: FromWriter, transfer: Transferable[] = []): void {
  self.postMessage(message, transfer);
}

/** Errors that retrying cannot fix: programming errors and rows the store refuses as data. */
function isPermanent(error: unknown): boolean {
  return error instanceof TypeError || error instanceof RangeError ||
    (error as { code?: string })?.code === "invalid_payload";
}

async function writeBatch(id: number, buffer: ArrayBuffer, resent: boolean): Promise<void> {
  let rows: ReadingRow[];
  try {
    rows = decodeRows(buffer);
  } catch (error) {
    return post({ type: "failed", id, message: `Undecodable batch: ${String(error)}` });
  }
  let retryMs = RETRY_MIN_MS;
  while (true) {
    const started = performance.now();
    try {
      const results = await store!.insertReadings(rows);
      // After a failed attempt (here or in a worker that died), part of the batch may be in.
      if (resent || retryMs > RETRY_MIN_MS) await claimOwnRows(rows, results);
      const packed = encodeResults(results);
      post({ type: "done", id, results: packed, ms: performance.now() - started }, [packed]);
      return;
    } catch (error) {
      if (closing) return;
      if (isPermanent(error)) {
        return post({ type: "failed", id, message: String((error as Error)?.message ?? error) });
      }
      post({ type: "stalled", id, message: String((error as Error)?.message ?? error), retryMs });
      await new Promise((resolve) => setTimeout(resolve, retryMs));
      retryMs = Math.min(RETRY_MAX_MS, retryMs * 2);
    }
  }
}

/**
 * After a failed attempt, part of the batch may have been committed: those rows now look like
 * replays of themselves. A row stored with our signature and submission time is ours: stored,
 * with the seq it was stored with (0 only for a row stored by a release without seqs).
 */
async function claimOwnRows(rows: ReadingRow[], results: InsertResult[]): Promise<void> {
  for (let i = 0; i < rows.length; i++) {
    const r = results[i];
    if (r.status !== "duplicate" || r.conflict_ts !== rows[i].ts) continue;
    const stored = await store!.getReading(rows[i].meter_id, rows[i].ts);
    if (
      stored?.device_signature === rows[i].device_signature &&
      stored.submitted_at === rows[i].submitted_at
    ) results[i] = { status: "stored", seq: stored.seq ?? 0 };
  }
}

self.onmessage = (event: MessageEvent<ToWriter>) => {
  const message = event.data;
  switch (message.type) {
    case "init":
      // One batch per connection of the writer's own pool.
      concurrency = message.spec.kind === "postgres" ? message.spec.max : 1;
      openStore(message.spec, message.options).then(
        (s) => {
          store = s;
          post({ type: "ready" });
        },
        (error) => post({ type: "init_failed", message: String(error?.message ?? error) }),
      );
      break;
    case "batch":
      waiting.push({ id: message.id, rows: message.rows, resent: message.resent === true });
      pump();
      break;
    case "close":
      closing = true;
      idle().then(async () => {
        await store?.close();
        post({ type: "closed" });
        self.close();
      });
      break;
  }
};
