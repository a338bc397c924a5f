/** Token bucket parameters (rule 5). */
export interface BucketConfig {
  burst: number;
  /** Tokens regained per millisecond. */
  refillPerMs: number;
}

/** A per-meter token bucket; two numbers of state, no timers. */
export class TokenBucket {
  #tokens: number;
  #at: number;

  constructor(config: BucketConfig, now: number) {
    this.#tokens = config.burst;
    this.#at = now;
  }

  /** Takes one token; returns 0 on success or the milliseconds until one is available. */
  take(config: BucketConfig, now: number): number {
    const elapsed = Math.max(0, now - this.#at);
    this.#tokens = Math.min(config.burst, this.#tokens + elapsed * config.refillPerMs);
    this.#at = now;
    if (this.#tokens >= 1) {
      this.#tokens -= 1;
      return 0;
    }
    return Math.ceil((1 - this.#tokens) / config.refillPerMs);
  }

  /** Gives a token back (the reading it paid for was not stored). */
  refund(config: BucketConfig): void {
    this.#tokens = Math.min(config.burst, this.#tokens + 1);
  }
}
