import type { ReadingRow } from "../core/reading.ts";
import type { StoreSpec } from "../db/open_store.ts";
import type { InsertResult, StoreOptions } from "../db/store.ts";
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
  /** Batches handed to the worker at once (one writing, one waiting keeps it busy). */
  maxInFlight?: number;
  /** Called when the store fails and when it recovers. */
  onStall?: (message: string | null) => void;
}

/** Figures for /metrics and the benchmarks. */
export interface WriterStats {
  queued: number;
  batches: number;
  rows: number;
  lastBatchSize: number;
  lastBatchMs: number;
  maxBatchSize: number;
}

interface Pending {
  row: ReadingRow;
  resolve: (result: InsertResult) => void;
}

/**
 * The gateway's side of the batching writer worker: a bounded queue, batching by size or time,
 * one result per row.
 */
export class WriterClient implements AsyncDisposable {
  #worker: Worker;
  #options: Required<Omit<WriterOptions, "onStall">> & Pick<WriterOptions, "onStall">;
  #pending: Pending[] = [];
  #inFlight = new Map<number, Pending[]>();
  #nextId = 1;
  #timer: ReturnType<typeof setTimeout> | undefined;
  #lingerDone = false;
  #queued = 0;
  #stalled: string | null = null;
  #capacityWaiters: (() => void)[] = [];
  #drainWaiters: (() => void)[] = [];
  #closed: Promise<void> | undefined;
  #closedResolve!: () => void;
  #stats: WriterStats = {
    queued: 0,
    batches: 0,
    rows: 0,
    lastBatchSize: 0,
    lastBatchMs: 0,
    maxBatchSize: 0,
  };

  private constructor(worker: Worker, options: WriterOptions) {
    this.#worker = worker;
    this.#options = { maxInFlight: 2, ...options };
    worker.onmessage = (event: MessageEvent<FromWriter>) => this.#onMessage(event.data);
  }

  /** Starts the worker and waits until its store is open. */
  static start(options: WriterOptions): Promise<WriterClient> {
    const worker = new Worker(new URL("./writer.ts", import.meta.url), { type: "module" });
    return new Promise((resolve, reject) => {
      const client = new WriterClient(worker, options);
      worker.onmessage = (event: MessageEvent<FromWriter>) => {
        const message = event.data;
        if (message.type === "ready") {
          worker.onmessage = (e: MessageEvent<FromWriter>) => client.#onMessage(e.data);
          resolve(client);
        } else if (message.type === "init_failed") {
          worker.terminate();
          reject(new Error(`Writer could not open the store: ${message.message}`));
        }
      };
      worker.onerror = (event) => {
        event.preventDefault();
        worker.terminate();
        reject(new Error(`Writer worker failed: ${event.message}`));
      };
      client.#send({ type: "init", spec: options.spec, options: options.storeOptions });
    });
  }

  /** Whether another row fits in the queue. */
  get hasCapacity(): boolean {
    return this.#queued < this.#options.queueMax && this.#closed === undefined;
  }

  /** The store's last failure while it is failing, else `null`. */
  get stalled(): string | null {
    return this.#stalled;
  }

  /** Current figures. */
  get stats(): WriterStats {
    return { ...this.#stats, queued: this.#queued };
  }

  /** Queues a row; `null` when the queue is full (the caller answers `overloaded`). */
  submit(row: ReadingRow): Promise<InsertResult> | null {
    if (!this.hasCapacity) return null;
    this.#queued++;
    return new Promise((resolve) => {
      this.#pending.push({ row, resolve });
      if (this.#pending.length === 1 && this.#timer === undefined) {
        this.#lingerDone = false;
        this.#timer = setTimeout(() => {
          this.#timer = undefined;
          this.#lingerDone = true;
          this.#flush();
        }, this.#options.flushMs);
      }
      if (this.#pending.length >= this.#options.batchMax) this.#flush();
    });
  }

  /** Resolves when the queue has room again. */
  whenCapacity(): Promise<void> {
    if (this.hasCapacity) return Promise.resolve();
    return new Promise((resolve) => this.#capacityWaiters.push(resolve));
  }

  /** Resolves once every queued row has its result. */
  drain(): Promise<void> {
    if (this.#queued === 0) return Promise.resolve();
    return new Promise((resolve) => {
      this.#drainWaiters.push(resolve);
      this.#lingerDone = true;
      this.#flush();
    });
  }

  #flush(): void {
    while (
      this.#pending.length > 0 && this.#inFlight.size < this.#options.maxInFlight &&
      (this.#lingerDone || this.#pending.length >= this.#options.batchMax)
    ) {
      const batch = this.#pending.splice(0, this.#options.batchMax);
      const id = this.#nextId++;
      this.#inFlight.set(id, batch);
      const buffer = encodeRows(batch.map((p) => p.row));
      this.#send({ type: "batch", id, rows: buffer }, [buffer]);
    }
    if (this.#pending.length === 0) {
      clearTimeout(this.#timer);
      this.#timer = undefined;
      this.#lingerDone = false;
    }
  }

  #onMessage(message: FromWriter): void {
    switch (message.type) {
      case "done": {
        const batch = this.#inFlight.get(message.id)!;
        this.#inFlight.delete(message.id);
        const results = decodeResults(message.results);
        for (let i = 0; i < batch.length; i++) batch[i].resolve(results[i]);
        this.#queued -= batch.length;
        Object.assign(this.#stats, {
          batches: this.#stats.batches + 1,
          rows: this.#stats.rows + batch.length,
          lastBatchSize: batch.length,
          lastBatchMs: message.ms,
          maxBatchSize: Math.max(this.#stats.maxBatchSize, batch.length),
        });
        if (this.#stalled !== null) {
          this.#stalled = null;
          this.#options.onStall?.(null);
        }
        // Rows that waited behind a busy worker go out at once: batches grow with load.
        if (this.#pending.length > 0) this.#lingerDone = true;
        this.#flush();
        this.#wake();
        break;
      }
      case "stalled":
        this.#stalled = message.message;
        this.#options.onStall?.(message.message);
        break;
      case "closed":
        this.#worker.terminate();
        this.#closedResolve();
        break;
    }
  }

  #wake(): void {
    while (this.hasCapacity && this.#capacityWaiters.length > 0) this.#capacityWaiters.shift()!();
    if (this.#queued === 0) { for (const w of this.#drainWaiters.splice(0)) w(); }
  }

  #send(message: ToWriter, transfer: Transferable[] = []): void {
    this.#worker.postMessage(message, transfer);
  }

  /** Writes everything queued, then stops the worker. */
  close(): Promise<void> {
    if (this.#closed) return this.#closed;
    this.#closed = new Promise((resolve) => this.#closedResolve = resolve);
    this.drain().then(() => {
      clearTimeout(this.#timer);
      this.#send({ type: "close" });
    });
    return this.#closed;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
