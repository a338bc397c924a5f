// The embedded broker's sessions per meter: live connections and the persistent sessions aedes
// keeps after a disconnect. A meter may hold at most `perMeter` of them, so one device cannot
// grow the broker's memory by inventing client ids; offline persistent sessions expire.

/** One client id's session. */
interface Session {
  /** Live connections using the id (briefly 2 while a reconnect takes the session over). */
  online: number;
  /** aedes keeps the session's subscriptions and queue after a disconnect. */
  persistent: boolean;
  lastSeen: number;
}

/** Options of {@linkcode SessionTable}. */
export interface SessionTableOptions {
  perMeter: number;
  /** How long an offline persistent session is kept. */
  expiryMs: number;
  /** Deletes a session's state in the broker. */
  forget: (clientId: string) => void;
}

/** The verdict on a new connection: admitted, or refused because the meter's sessions are full. */
export type SessionAdmission = "admitted" | "full";

/** Per-meter session accounting with eviction of the least recently seen offline session. */
export class SessionTable {
  #o: SessionTableOptions;
  #meters = new Map<string, Map<string, Session>>();

  constructor(options: SessionTableOptions) {
    this.#o = options;
  }

  /** Reserves a session for a connection; call {@linkcode closed} when the connection ends. */
  open(meterId: string, clientId: string, clean: boolean, now: number): SessionAdmission {
    let sessions = this.#meters.get(meterId);
    const known = sessions?.get(clientId);
    if (!known && sessions && sessions.size >= this.#o.perMeter && !this.#evict(sessions)) {
      return "full";
    }
    if (!sessions) this.#meters.set(meterId, sessions = new Map());
    const session = known ?? { online: 0, persistent: false, lastSeen: now };
    session.online++;
    // A clean CONNECT discards a stored session of the same id (MQTT-3.1.2-6).
    session.persistent = !clean;
    session.lastSeen = now;
    sessions.set(clientId, session);
    return "admitted";
  }

  /** A connection admitted by {@linkcode open} ended. */
  closed(meterId: string, clientId: string, now: number): void {
    const sessions = this.#meters.get(meterId);
    const session = sessions?.get(clientId);
    if (!sessions || !session) return;
    session.online = Math.max(0, session.online - 1);
    session.lastSeen = now;
    if (session.online === 0 && !session.persistent) sessions.delete(clientId);
    if (sessions.size === 0) this.#meters.delete(meterId);
  }

  /** Sessions (live or stored) of a meter. */
  count(meterId: string): number {
    return this.#meters.get(meterId)?.size ?? 0;
  }

  /** Forgets offline persistent sessions not seen for the expiry period. */
  sweep(now: number): void {
    for (const [meterId, sessions] of this.#meters) {
      for (const [clientId, s] of sessions) {
        if (s.online === 0 && now - s.lastSeen >= this.#o.expiryMs) {
          sessions.delete(clientId);
          this.#o.forget(clientId);
        }
      }
      if (sessions.size === 0) this.#meters.delete(meterId);
    }
  }

  #evict(sessions: Map<string, Session>): boolean {
    let oldest: [string, Session] | undefined;
    for (const entry of sessions) {
      if (entry[1].online === 0 && (!oldest || entry[1].lastSeen < oldest[1].lastSeen)) {
        oldest = entry;
      }
    }
    if (!oldest) return false;
    sessions.delete(oldest[0]);
    this.#o.forget(oldest[0]);
    return true;
  }
}
