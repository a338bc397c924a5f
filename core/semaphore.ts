/** A counting semaphore with a bounded wait queue: `acquire` refuses instead of queueing forever. */
export class Semaphore {
  #free: number;
  #waiters: (() => void)[] = [];
  #maxWaiting: number;

  constructor(permits: number, maxWaiting: number) {
    this.#free = permits;
    this.#maxWaiting = maxWaiting;
  }

  /** Waits for a permit; `false` when too many are already waiting. */
  acquire(): Promise<boolean> {
    if (this.#free > 0) {
      this.#free--;
      return Promise.resolve(true);
    }
    if (this.#waiters.length >= this.#maxWaiting) return Promise.resolve(false);
    return new Promise((resolve) => this.#waiters.push(() => resolve(true)));
  }

  /** Returns a permit, handing it to the oldest waiter if any. */
  release(): void {
    const next = this.#waiters.shift();
    if (next) next();
    else this.#free++;
  }
}
