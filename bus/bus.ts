import type { GatewayEvent, Topic } from "../core/events.ts";

/** A handler of bus events. */
export type EventHandler = (event: GatewayEvent) => void;

/** One subscription to one topic. */
export interface Subscription {
  /**
   * Settles once events published from now on reach the handler (a network adapter must have
   * subscribed on the server first); a replay from the store may start after it.
   */
  readonly ready: Promise<void>;
  /** Ends the subscription (idempotent). */
  unsubscribe(): void;
}

/** Counters of one bus, for metrics; `kind` is the bounded topic kind, never a meter id. */
export interface BusStats {
  /** Messages sent to the backend (one per topic per publish call), by topic kind. */
  published: Record<string, number>;
  /** Messages received from the backend (other instances), by topic kind. */
  received: Record<string, number>;
  publishErrors: number;
  /** Times the connection to the backend was lost. */
  disconnects: number;
}

/**
 * Fans events out to subscribers on every gateway instance. Contract (tests/contracts/
 * bus_contract.ts, run against every adapter):
 * - `publish(events)` delivers each event to every subscription whose topic is among
 *   {@linkcode topicsOf}(event), on this instance at once (also while the backend is down) and
 *   on every other connected instance; one call is one batch (a writer batch): an adapter sends
 *   at most one message per topic for it, and the events of one topic keep their order.
 * - Each subscription receives each matching event once, on this instance and remotely.
 * - The promise rejects when the backend did not take the batch (local delivery still happened).
 * - Delivery across instances is at most once: a subscriber that was cut off misses what was
 *   published meanwhile and must catch up from the store (`onConnectionChange`).
 */
export interface Bus {
  publish(events: readonly GatewayEvent[]): Promise<void>;
  subscribe(topic: Topic, handler: EventHandler): Subscription;
  /** Whether events of other instances currently arrive (always true in-process). */
  readonly connected: boolean;
  /**
   * Calls `listener(false)` when events of other instances stopped arriving, and
   * `listener(true)` once they arrive again (every subscription re-established). Returns the
   * function that removes the listener.
   */
  onConnectionChange(listener: (connected: boolean) => void): () => void;
  readonly stats: BusStats;
  close(): Promise<void>;
}
