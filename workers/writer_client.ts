import type { Logger } from "../core/logger.ts";
import type { ReadingRow } from "../core/reading.ts";
import type { StoreSpec } from "../db/open_store.ts";
import type { InsertResult, StoreOptions } from "../db/store.ts";
import type { WriteResult } from "../actors/registry.ts";
import { decodeResults, encodeRows } from "./row_codec.ts";
import type { FromWriter, ToWriter } from "./writer_protocol.ts";

/** Options of {@linkcode WriterClient}. */
export interface WriterOptions {
  spec: StoreSpec;
  storeOptions: StoreOptions;
  /** Largest batch sent to the worker. */
  batchMax: number;
  /** How long the first row of a batch may wait for company. */
  flushMs: number;
  /** Rows accepted but not yet committed, at most; beyond it `submit` refuses. */
  queueMax: number;
  /**
   * Write lanes (default 1). Each meter belongs to one lane, so batches of different lanes never
   * touch the same meter: PostgreSQL writes them in parallel without waiting on each other's
   * meter locks (measured: two batches of the same meters ran one after the other).
   */
  lanes?: number;
  /**
   * Batches of one lane handed to the worker at once. PostgreSQL writes them together on
   * connections of their own (meter locks keep them apart); Deno KV one after the other.
   */
  maxInFlight?: number;
  /** How long `close()` waits for accepted rows to be written before giving up. */
  closeTimeoutMs?: number;
  /** Called when the store or the worker fails (with the reason) and when it recovers (`null`). */
  onStall?: (message: string | null) => void;
  /**
   * Called once per committed batch with the rows it stored, in batch order, each a copy with
   * its `seq`, before the rows' `submit` promises resolve (not called for a batch that stored
   * nothing). An error it throws is logged and changes nothing else.
   */
  onCommitted?: (rows: ReadingRow[]) => Promise<void> | void;
  /** Told of every committed batch: its rows and the worker's milliseconds for it (metrics). */
  onBatch?: (rows: number, ms: number) => void;
  /** Where a throwing `onCommitted` is reported. */
  logger?: Logger;
}

// Longest wait for onCommitted's promise before a committed batch is answered anyway.
const COMMITTED_WAIT_MS = 1_000;

/** Figures for /metrics and the benchmarks. */
export interface WriterStats {
  queued: number;
  batches: number;
  rows: number;
  lastBatchSize: number;
  lastBatchMs: number;
  /** From handing the last batch to the worker until its results were back, in ms. */
  lastRoundTripMs: number;
  maxBatchSize: number;
  restarts: number;
}

interface Pending {
  row: ReadingRow;
  resolve: (result: WriteResult) => void;
}

/** Rows of the meters of one lane, waiting to be batched. */
interface Lane {
  /** Live rows (MQTT, HTTP): sent first. */
  pending: Pending[];
  /** Rows of batch jobs (`source: "batch"`): sent after live ones, never in the last free slot. */
  bulk: Pending[];
  /** Batches of this lane at the worker. */
  inFlight: number;
  timer: ReturnType<typeof setTimeout> | undefined;
  /** The linger ran out (or the lane is busy): send what is there without waiting for more. */
  lingerDone: boolean;
}

/** A batch handed to the worker. */
interface InFlight {
  lane: Lane;
  rows: Pending[];
  /** performance.now() when it was (last) handed over. */
  sentAt: number;
}

const RESTART_DELAY_MS = 200;
/**
 * Batch-job rows per insert at most: their results come back in one burst on the actors'
 * thread (~10 µs a row), which live readings wait behind.
 */
const BULK_BATCH_MAX = 250;
const WORKER_URL = new URL("./writer.ts", import.meta.url);

/**
 * The gateway's side of the batching writer worker: a bounded queue, batching by size or time,
 * one result per row. A worker that dies is restarted and its unfinished batches sent again
 * (the store's natural key makes a resend harmless).
 */
export class WriterClient implements AsyncDisposable {
  #worker: Worker | undefined;
  #options: WriterOptions & { lanes: number; maxInFlight: number; closeTimeoutMs: number };
  #lanes: Lane[];
  /** Batches at the worker, by id, with when they were (last) handed over. */
  #inFlight = new Map<number, InFlight>();
  /** Committed batches waiting for onCommitted before they are answered. */
  #holding = new Set<Promise<void>>();
  #nextId = 1;
  #restartTimer: ReturnType<typeof setTimeout> | undefined;
  #queued = 0;
  #stalled: string | null = null;
  #capacityWaiters: (() => void)[] = [];
  #drainWaiters: (() => void)[] = [];
  #closing: Promise<void> | undefined;
  #closed = false;
  #stats: WriterStats = {
    queued: 0,
    batches: 0,
    rows: 0,
    lastBatchSize: 0,
    lastBatchMs: 0,
    lastRoundTripMs: 0,
    maxBatchSize: 0,
    restarts: 0,
  };

  private constructor(options: WriterOptions) {
    this.#options = { lanes: 1, maxInFlight: 2, closeTimeoutMs: 30_000, ...options };
    this.#lanes = Array.from({ length: this.#options.lanes }, () => ({
      pending: [],
      bulk: [],
      inFlight: 0,
      timer: undefined,
      lingerDone: false,
    }));
  }

  /** Starts the worker and waits until its store is open. */
  static async start(options: WriterOptions): Promise<WriterClient> {
    const client = new WriterClient(options);
    await client.#spawn();
    return client;
  }

  /** Whether another row fits in the queue. */
  get hasCapacity(): boolean {
    return this.#queued < this.#options.queueMax && this.#closing === undefined;
  }

  /** The store's (or worker's) last failure while it is failing, else `null`. */
  get stalled(): string | null {
    return this.#stalled;
  }

  /** Current figures. */
  get stats(): WriterStats {
    return { ...this.#stats, queued: this.#queued };
  }

  /** Queues a row; `null` when the queue is full (the caller answers `overloaded`). */
  submit(row: ReadingRow): Promise<WriteResult> | null {
    if (!this.hasCapacity) return null;
    this.#queued++;
    const lane = this.#lanes[laneOf(row.meter_id, this.#lanes.length)];
    return new Promise((resolve) => {
      const queue = row.source === "batch" ? lane.bulk : lane.pending;
      const bulkMax = Math.min(this.#options.batchMax, BULK_BATCH_MAX);
      queue.push({ row, resolve });
      if (lane.lingerDone) {
        // Past its linger (rows waited for a slot): a live row may find the slot batch rows
        // leave free, at once.
        this.#flushLane(lane);
      } else if (lane.timer === undefined) {
        lane.timer = setTimeout(() => {
          lane.timer = undefined;
          lane.lingerDone = true;
          this.#flushLane(lane);
        }, this.#options.flushMs);
      }
      if (queue.length >= (queue === lane.bulk ? bulkMax : this.#options.batchMax)) {
        this.#flushLane(lane);
      }
    });
  }

  /** Resolves when the queue has room again (or the writer is closing). */
  whenCapacity(): Promise<void> {
    if (this.hasCapacity || this.#closing) return Promise.resolve();
    return new Promise((resolve) => this.#capacityWaiters.push(resolve));
  }

  /** Resolves once every queued row has its result. */
  drain(): Promise<void> {
    if (this.#queued === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.#drainWaiters.push(resolve);
      for (const lane of this.#lanes) lane.lingerDone = true;
      this.#flush();
    });
  }

  /** Starts a worker and waits until its store is open. */
  #spawn(): Promise<void> {
    const worker = new Worker(WORKER_URL, { type: "module" });
    return new Promise((resolve, reject) => {
      let ready = false;
      worker.onmessage = (event: MessageEvent<FromWriter>) => {
        const message = event.data;
        if (ready) return this.#onMessage(message);
        if (message.type === "ready") {
          ready = true;
          // A restart that finished after close() gave up on it: nothing may keep it alive.
          if (this.#closed) {
            worker.terminate();
            return resolve();
          }
          this.#worker = worker;
          resolve();
        } else if (message.type === "init_failed") {
          worker.terminate();
          reject(new Error(`Writer could not open the store: ${message.message}`));
        }
      };
      worker.onerror = (event) => {
        event.preventDefault();
        worker.terminate();
        if (!ready) return reject(new Error(`Writer worker failed: ${event.message}`));
        this.#crashed(`Writer worker crashed: ${event.message}`);
      };
      const init: ToWriter = {
        type: "init",
        spec: this.#options.spec,
        options: this.#options.storeOptions,
      };
      worker.postMessage(init);
    });
  }

  #crashed(reason: string): void {
    this.#worker = undefined;
    if (this.#closed) return;
    this.#stats.restarts++;
    this.#setStalled(reason);
    this.#restartTimer = setTimeout(() => {
      this.#restartTimer = undefined;
      this.#spawn().then(() => {
        // Unfinished batches go again, in order; rows already committed come back as
        // duplicates of themselves and the worker claims them as stored.
        for (const [id, batch] of this.#inFlight) this.#sendBatch(id, batch, true);
        this.#flush();
      }, (error) => this.#crashed(String(error?.message ?? error)));
    }, RESTART_DELAY_MS);
  }

  #setStalled(reason: string | null): void {
    if (this.#stalled === reason) return;
    this.#stalled = reason;
    this.#options.onStall?.(reason);
  }

  #flush(): void {
    for (const lane of this.#lanes) this.#flushLane(lane);
  }

  /**
   * Sends the lane's ready rows: live ones first; batch-job rows (at most
   * {@linkcode BULK_BATCH_MAX} an insert) only while a slot stays free for live ones (with two or
   * more slots), so a live row never waits behind more than the batch insert already running.
   */
  #flushLane(lane: Lane): void {
    const { batchMax, maxInFlight } = this.#options;
    const bulkSlots = maxInFlight > 1 ? maxInFlight - 1 : maxInFlight;
    while (this.#worker && lane.inFlight < maxInFlight) {
      let rows: Pending[];
      if (lane.pending.length > 0 && (lane.lingerDone || lane.pending.length >= batchMax)) {
        rows = lane.pending.splice(0, batchMax);
      } else if (
        lane.bulk.length > 0 && lane.inFlight < bulkSlots &&
        (lane.lingerDone || lane.bulk.length >= Math.min(batchMax, BULK_BATCH_MAX))
      ) {
        rows = lane.bulk.splice(0, Math.min(batchMax, BULK_BATCH_MAX));
      } else break;
      const batch = { lane, rows, sentAt: 0 };
      const id = this.#nextId++;
      lane.inFlight++;
      this.#inFlight.set(id, batch);
      this.#sendBatch(id, batch);
    }
    if (lane.pending.length === 0 && lane.bulk.length === 0) {
      clearTimeout(lane.timer);
      lane.timer = undefined;
      lane.lingerDone = false;
    }
  }

  #sendBatch(id: number, batch: InFlight, resent = false): void {
    const buffer = encodeRows(batch.rows.map((p) => p.row));
    const message: ToWriter = { type: "batch", id, rows: buffer, resent };
    batch.sentAt = performance.now();
    this.#worker?.postMessage(message, [buffer]);
  }

  #settle(id: number, results: (i: number) => WriteResult): void {
    const entry = this.#inFlight.get(id);
    if (!entry) return;
    this.#inFlight.delete(id);
    this.#finish(entry, results);
  }

  #finish(entry: InFlight, results: (i: number) => WriteResult): void {
    const { lane, rows: batch } = entry;
    lane.inFlight--;
    this.#stats.lastRoundTripMs = performance.now() - entry.sentAt;
    for (let i = 0; i < batch.length; i++) batch[i].resolve(results(i));
    this.#queued -= batch.length;
    // Rows that waited behind a busy lane go out at once: batches grow with load.
    if (lane.pending.length > 0 || lane.bulk.length > 0) lane.lingerDone = true;
    this.#flushLane(lane);
    this.#wake();
  }

  /** Hands a committed batch's stored rows to `onCommitted`; what it returns, if it waits. */
  #committed(id: number, results: InsertResult[]): Promise<void> | void {
    const batch = this.#inFlight.get(id)?.rows;
    if (batch === undefined) return;
    const rows: ReadingRow[] = [];
    for (let i = 0; i < batch.length; i++) {
      const r = results[i];
      if (r.status === "stored") rows.push({ ...batch[i].row, seq: r.seq });
    }
    if (rows.length === 0) return;
    try {
      return this.#options.onCommitted!(rows);
    } catch (error) {
      this.#options.logger?.error("onCommitted failed", { error, rows: rows.length });
    }
  }

  /**
   * Resolves a committed batch once `wait` (onCommitted's cache invalidation) settled, at most
   * {@linkcode COMMITTED_WAIT_MS} later: an answer sent after it sees its own write. Meanwhile the
   * batch is no longer in flight, so a worker restart does not send it again.
   */
  #settleAfter(id: number, wait: Promise<void>, results: (i: number) => WriteResult): void {
    const entry = this.#inFlight.get(id);
    if (!entry) return;
    this.#inFlight.delete(id);
    let timer: ReturnType<typeof setTimeout> | undefined;
    const bound = new Promise<void>((resolve) => timer = setTimeout(resolve, COMMITTED_WAIT_MS));
    const done = Promise.race([wait, bound]).catch((error) =>
      this.#options.logger?.error("onCommitted failed", { error, rows: entry.rows.length })
    ).finally(() => {
      clearTimeout(timer);
      this.#holding.delete(done);
      this.#finish(entry, results);
    });
    this.#holding.add(done);
  }

  #onMessage(message: FromWriter): void {
    switch (message.type) {
      case "done": {
        const results = decodeResults(message.results);
        const size = results.length;
        Object.assign(this.#stats, {
          batches: this.#stats.batches + 1,
          rows: this.#stats.rows + size,
          lastBatchSize: size,
          lastBatchMs: message.ms,
          maxBatchSize: Math.max(this.#stats.maxBatchSize, size),
        });
        this.#options.onBatch?.(size, message.ms);
        this.#setStalled(null);
        const wait = this.#options.onCommitted === undefined
          ? undefined
          : this.#committed(message.id, results);
        if (wait instanceof Promise) this.#settleAfter(message.id, wait, (i) => results[i]);
        else this.#settle(message.id, (i) => results[i]);
        break;
      }
      case "failed":
        this.#settle(message.id, () => ({ status: "failed", message: message.message }));
        break;
      case "stalled":
        this.#setStalled(message.message);
        break;
      case "closed":
        this.#worker?.terminate();
        this.#worker = undefined;
        break;
    }
  }

  #wake(): void {
    let room = this.#options.queueMax - this.#queued;
    while (room-- > 0 && this.#capacityWaiters.length > 0) this.#capacityWaiters.shift()!();
    if (this.#queued === 0) { for (const w of this.#drainWaiters.splice(0)) w(); }
  }

  /** Writes everything queued (up to the close timeout), then stops the worker. */
  close(): Promise<void> {
    this.#closing ??= (async () => {
      for (const w of this.#capacityWaiters.splice(0)) w();
      let timer: ReturnType<typeof setTimeout> | undefined;
      const timedOut = new Promise<boolean>((resolve) => {
        timer = setTimeout(() => resolve(true), this.#options.closeTimeoutMs);
      });
      const gaveUp = await Promise.race([this.drain().then(() => false), timedOut]);
      clearTimeout(timer);
      for (const lane of this.#lanes) clearTimeout(lane.timer);
      clearTimeout(this.#restartTimer);
      const worker = this.#worker;
      if (worker && !gaveUp) {
        // Bounded too: a worker that dies while closing never says "closed".
        let closeTimer: ReturnType<typeof setTimeout> | undefined;
        await new Promise<void>((resolve) => {
          worker.onmessage = (event: MessageEvent<FromWriter>) => {
            if (event.data.type === "closed") resolve();
          };
          worker.onerror = (event) => {
            event.preventDefault();
            resolve();
          };
          closeTimer = setTimeout(resolve, this.#options.closeTimeoutMs);
          const message: ToWriter = { type: "close" };
          worker.postMessage(message);
        });
        clearTimeout(closeTimer);
      }
      worker?.terminate();
      this.#worker = undefined;
      this.#closed = true;
      // Committed batches are answered as committed, once onCommitted is done with them.
      await Promise.all(this.#holding);
      // Whatever is left was never committed; its callers were never told it was.
      const left = [...this.#inFlight.values()].flatMap((e) => e.rows)
        .concat(this.#lanes.flatMap((lane) => [...lane.pending.splice(0), ...lane.bulk.splice(0)]));
      this.#inFlight.clear();
      for (const p of left) {
        p.resolve({ status: "failed", message: "Gateway shutting down", transient: true });
      }
    })();
    return this.#closing;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}

/** The lane of a meter: FNV-1a of its id, so a meter always goes the same way. */
function laneOf(meterId: string, lanes: number): number {
  if (lanes === 1) return 0;
  let h = 0x811c9dc5;
  for (let i = 0; i < meterId.length; i++) h = Math.imul(h ^ meterId.charCodeAt(i), 0x01000193);
  return (h >>> 0) % lanes;
}
