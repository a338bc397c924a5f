import { type GatewayEvent, type Topic, topicsOf } from "../core/events.ts";
import type { Bus, BusStats, EventHandler, Subscription } from "./bus.ts";

/** Options of {@linkcode LocalBus}. */
export interface LocalBusOptions {
  /**
   * Receives whatever a handler throws; the other handlers still get the event. Pass one that
   * logs through the gateway's logger; the default writes to `console.error`.
   */
  onError?: (error: unknown) => void;
}

/** The in-process bus: one instance, no network. */
export class LocalBus implements Bus {
  #topics = new Map<Topic, Set<EventHandler>>();
  #onError: (error: unknown) => void;
  /** Nothing crosses a network: no counters move. */
  readonly stats: BusStats = { published: {}, received: {}, publishErrors: 0, disconnects: 0 };
  readonly connected = true;

  /** Makes a bus without subscribers. */
  constructor(options: LocalBusOptions = {}) {
    this.#onError = options.onError ?? ((error) => console.error("bus handler failed", error));
  }

  /** Calls the handlers of each event's topics, synchronously, in order. */
  publish(events: readonly GatewayEvent[]): Promise<void> {
    deliver(this.#topics, events, (error) => this.#reportError(error));
    return Promise.resolve();
  }

  /** Subscribes to one topic; ready at once. */
  subscribe(topic: Topic, handler: EventHandler): Subscription {
    return subscribeTo(this.#topics, topic, handler);
  }

  /** In-process delivery never stops: the listener is never called. */
  onConnectionChange(_listener: (connected: boolean) => void): () => void {
    return () => {};
  }

  /** Drops every subscriber. */
  close(): Promise<void> {
    this.#topics.clear();
    return Promise.resolve();
  }

  #reportError(error: unknown): void {
    try {
      this.#onError(error);
    } catch {
      // A failing error reporter must not break delivery either.
    }
  }
}

/** Adds `handler` to `topic`'s set; the subscription removes it (idempotent). */
export function subscribeTo(
  topics: Map<Topic, Set<EventHandler>>,
  topic: Topic,
  handler: EventHandler,
): Subscription {
  // A wrapper per subscription, so that one handler subscribed twice is two subscriptions.
  const entry: EventHandler = (event) => handler(event);
  let set = topics.get(topic);
  if (!set) topics.set(topic, set = new Set());
  set.add(entry);
  let active = true;
  return {
    ready: Promise.resolve(),
    unsubscribe() {
      if (!active) return;
      active = false;
      const current = topics.get(topic);
      current?.delete(entry);
      if (current?.size === 0) topics.delete(topic);
    },
  };
}

/** Calls each event's subscribers in order; a throwing handler goes to `onError`. */
export function deliver(
  topics: Map<Topic, Set<EventHandler>>,
  events: readonly GatewayEvent[],
  onError: (error: unknown) => void,
): void {
  if (topics.size === 0) return;
  for (const event of events) {
    for (const topic of topicsOf(event)) {
      const handlers = topics.get(topic);
      if (!handlers) continue;
      for (const handler of handlers) {
        try {
          handler(event);
        } catch (error) {
          // One broken subscriber must not starve the others.
          onError(error);
        }
      }
    }
  }
}
