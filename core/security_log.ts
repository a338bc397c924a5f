import type { Clock } from "./clock.ts";
import type { Logger } from "./logger.ts";

/** Security events the gateway reports (one stable name each). */
export type SecurityEvent =
  | "login_failed"
  | "forbidden"
  | "bad_signature"
  | "mqtt_connect_refused"
  | "mqtt_junk"
  | "connection_refused"
  | "accept_failed"
  | "token_rejected";

/** Options of {@linkcode SecurityLog}. */
export interface SecurityLogOptions {
  logger: Logger;
  clock: Clock;
  /** At most one line per event and client address in this many ms; default 10 s. */
  everyMs?: number;
  /** Distinct (event, address) pairs remembered; default 10 000. */
  maxKeys?: number;
  /** Lines per event per period over all addresses (a flood from many sources); default 50. */
  perEventMax?: number;
}

/**
 * Warn-level log of security events, rate-limited per event and client address and per event
 * overall, so a flood cannot flood the log; later lines say how many were suppressed.
 * Callers pass no secrets: fields are logged as given.
 */
export class SecurityLog {
  #logger: Logger;
  #clock: Clock;
  #everyMs: number;
  #maxKeys: number;
  #perEventMax: number;
  #last = new Map<string, { at: number; suppressed: number }>();
  #events = new Map<SecurityEvent, { start: number; lines: number; suppressed: number }>();

  constructor(options: SecurityLogOptions) {
    this.#logger = options.logger;
    this.#clock = options.clock;
    this.#everyMs = options.everyMs ?? 10_000;
    this.#maxKeys = options.maxKeys ?? 10_000;
    this.#perEventMax = options.perEventMax ?? 50;
  }

  /** Logs `event` for `address` at warn, unless one was logged for both within the period. */
  warn(event: SecurityEvent, address: string, fields: Record<string, unknown> = {}): void {
    const now = this.#clock.now();
    const key = `${event}\u0000${address}`;
    const seen = this.#last.get(key);
    if (seen && now - seen.at < this.#everyMs) {
      seen.suppressed++;
      return;
    }
    let budget = this.#events.get(event);
    if (!budget || now - budget.start >= this.#everyMs) {
      budget = { start: now, lines: 0, suppressed: budget?.suppressed ?? 0 };
      this.#events.set(event, budget);
    }
    if (budget.lines >= this.#perEventMax) {
      budget.suppressed++;
      return;
    }
    budget.lines++;
    if (!seen && this.#last.size >= this.#maxKeys) this.#forget(now);
    const suppressed = seen?.suppressed ?? 0;
    const others = budget.suppressed;
    budget.suppressed = 0;
    this.#last.set(key, { at: now, suppressed: 0 });
    this.#logger.warn(`security: ${event}`, {
      event,
      address,
      ...fields,
      ...(suppressed > 0 ? { suppressed } : {}),
      ...(others > 0 ? { suppressed_all_addresses: others } : {}),
    });
  }

  // Bounded memory under a flood from many addresses: drop quiet entries, else the oldest half.
  #forget(now: number): void {
    for (const [k, v] of this.#last) if (now - v.at >= this.#everyMs) this.#last.delete(k);
    if (this.#last.size < this.#maxKeys) return;
    let drop = this.#last.size >> 1;
    for (const k of this.#last.keys()) {
      if (drop-- <= 0) break;
      this.#last.delete(k);
    }
  }
}
