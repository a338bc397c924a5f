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

  /**
   * Lowers the bucket to at most `level` tokens as they stood at `at` (a shared bucket's level);
   * never raises it. `level` may be negative: a debt that refills before the next token.
   */
  lower(config: BucketConfig, level: number, at: number): void {
    if (at > this.#at) {
      this.#tokens = Math.min(config.burst, this.#tokens + (at - this.#at) * config.refillPerMs);
      this.#at = at;
    } else {
      // The level refilled too between `at` and this bucket's last take.
      level += (this.#at - at) * config.refillPerMs;
    }
    if (level < this.#tokens) this.#tokens = level;
  }
}
