// Freshness of CONNECT passwords: a signed timestamp must be recent, not from the future beyond
// a small clock skew, and newer than the last one accepted for the same meter and client id, so
// a captured password cannot be replayed, not even within its window.

/** The verdict on a CONNECT password's timestamp. */
export type StampVerdict = "ok" | "stale" | "future" | "replayed";

/** Options of {@linkcode ConnectStamps}. */
export interface ConnectStampsOptions {
  maxAgeMs: number;
  maxSkewMs: number;
  /** Sessions remembered at most (the oldest are forgotten first); default 100 000. */
  maxEntries?: number;
}

/** Last accepted CONNECT timestamp per (meter, client id), kept for the freshness window. */
export class ConnectStamps {
  #o: ConnectStampsOptions;
  // Insertion order is the order of last use: the first entries are the oldest.
  #last = new Map<string, { seconds: number; at: number }>();

  constructor(options: ConnectStampsOptions) {
    this.#o = options;
  }

  /** Checks a timestamp (unix seconds) without recording it. */
  check(meterId: string, clientId: string, seconds: number, now: number): StampVerdict {
    const at = seconds * 1000;
    if (now - at > this.#o.maxAgeMs) return "stale";
    if (at - now > this.#o.maxSkewMs) return "future";
    const last = this.#last.get(keyOf(meterId, clientId));
    return last && seconds <= last.seconds ? "replayed" : "ok";
  }

  /** Records a verified timestamp; "replayed" when another CONNECT used it meanwhile. */
  commit(meterId: string, clientId: string, seconds: number, now: number): StampVerdict {
    const verdict = this.check(meterId, clientId, seconds, now);
    if (verdict !== "ok") return verdict;
    const key = keyOf(meterId, clientId);
    this.#last.delete(key);
    this.#last.set(key, { seconds, at: now });
    this.#prune(now);
    return "ok";
  }

  #prune(now: number): void {
    // A timestamp older than the window is refused anyway: its entry is no longer needed.
    const keep = this.#o.maxAgeMs + this.#o.maxSkewMs;
    const max = this.#o.maxEntries ?? 100_000;
    for (const [key, v] of this.#last) {
      if (this.#last.size <= max && now - v.at < keep) break;
      this.#last.delete(key);
    }
  }
}

function keyOf(meterId: string, clientId: string): string {
  return `${meterId}\u0000${clientId}`;
}
