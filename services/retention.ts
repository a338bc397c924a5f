import type { Clock } from "../core/clock.ts";
import type { Logger } from "../core/logger.ts";

/** A store that can delete old readings in bounded chunks (plain PostgreSQL). */
export interface Prunable {
  deleteOlderThan(cutoffMs: number, chunk: number): Promise<number>;
}

/** Options of {@linkcode RetentionWorker}. */
export interface RetentionOptions {
  store: Prunable;
  clock: Clock;
  logger: Logger;
  /** Readings older than this are deleted. */
  keepMs: number;
  /** How often to look for old readings. */
  everyMs: number;
  /** Rows per DELETE statement: short transactions, no long locks. */
  chunk?: number;
}

/**
 * Deletes readings past retention, periodically, on stores without native retention
 * (TimescaleDB drops whole chunks with its own policy instead).
 */
export class RetentionWorker implements AsyncDisposable {
  #o: RetentionOptions;
  #timer: ReturnType<typeof setInterval>;
  #running: Promise<void> | null = null;

  constructor(options: RetentionOptions) {
    this.#o = options;
    this.#timer = setInterval(() => this.runOnce(), options.everyMs);
  }

  /** One pass now; overlapping passes are skipped. Resolves with the rows deleted. */
  runOnce(): Promise<void> {
    this.#running ??= (async () => {
      const cutoff = this.#o.clock.now() - this.#o.keepMs;
      try {
        const deleted = await this.#o.store.deleteOlderThan(cutoff, this.#o.chunk ?? 5_000);
        if (deleted > 0) {
          this.#o.logger.info("retention deleted old readings", {
            deleted,
            older_than: new Date(cutoff).toISOString(),
          });
        }
      } catch (error) {
        this.#o.logger.warn("retention pass failed; retrying next time", { error });
      } finally {
        this.#running = null;
      }
    })();
    return this.#running;
  }

  /** Stops the timer and waits for a pass in progress. */
  async close(): Promise<void> {
    clearInterval(this.#timer);
    await this.#running;
  }

  [Symbol.asyncDispose](): Promise<void> {
    return this.close();
  }
}
