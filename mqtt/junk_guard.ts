// A device that keeps sending junk (invalid payloads, bad signatures, forbidden topics, malformed
// packets) is first slowed down, then disconnected and refused for a while.

/** What to do with a device after one more junk message. */
export type JunkVerdict = "ok" | "throttle" | "disconnect";

/** Options of {@linkcode JunkGuard}. */
export interface JunkGuardOptions {
  /** Junk messages within `windowMs` that get a device disconnected. */
  limit: number;
  windowMs: number;
  /** How long a disconnected device's CONNECTs are refused. */
  banMs: number;
}

/** Junk counts per meter in a fixed window, and the meters currently refused. */
export class JunkGuard {
  #o: JunkGuardOptions;
  #counts = new Map<string, { since: number; n: number }>();
  #bans = new Map<string, number>();

  constructor(options: JunkGuardOptions) {
    this.#o = options;
  }

  /** Counts one junk message of a meter. From half the limit on, its acks are slowed down. */
  record(meterId: string, now: number): JunkVerdict {
    let c = this.#counts.get(meterId);
    if (!c || now - c.since >= this.#o.windowMs) {
      this.#counts.delete(meterId);
      this.#counts.set(meterId, c = { since: now, n: 0 });
      this.#prune(now);
    }
    c.n++;
    if (c.n >= this.#o.limit) {
      this.#counts.delete(meterId);
      this.#bans.set(meterId, now + this.#o.banMs);
      return "disconnect";
    }
    return 2 * c.n >= this.#o.limit ? "throttle" : "ok";
  }

  /** Milliseconds until the meter may connect again; 0 when it may. */
  bannedFor(meterId: string, now: number): number {
    const until = this.#bans.get(meterId);
    if (until === undefined) return 0;
    if (until > now) return until - now;
    this.#bans.delete(meterId);
    return 0;
  }

  // Counters are created in time order: expired ones are at the front.
  #prune(now: number): void {
    for (const [meterId, c] of this.#counts) {
      if (now - c.since < this.#o.windowMs) break;
      this.#counts.delete(meterId);
    }
    if (this.#bans.size > 10_000) {
      for (const [meterId, until] of this.#bans) if (until <= now) this.#bans.delete(meterId);
    }
  }
}
