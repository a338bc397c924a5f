import type { GatewayEvent } from "../core/events.ts";
import type { Bus, EventHandler } from "./bus.ts";

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
  #handlers = new Set<EventHandler>();
  #onError: (error: unknown) => void;

  /** Makes a bus without subscribers. */
  constructor(options: LocalBusOptions = {}) {
    this.#onError = options.onError ?? ((error) => console.error("bus handler failed", error));
  }

  /** Calls every handler with the event, synchronously; a throwing handler goes to `onError`. */
  publish(event: GatewayEvent): Promise<void> {
    for (const handler of this.#handlers) {
      try {
        handler(event);
      } catch (error) {
        // One broken subscriber must not starve the others.
        this.#reportError(error);
      }
    }
    return Promise.resolve();
  }

  /** Subscribes; returns the function that unsubscribes. */
  subscribe(handler: EventHandler): () => void {
    this.#handlers.add(handler);
    return () => this.#handlers.delete(handler);
  }

  /** Drops every subscriber. */
  close(): Promise<void> {
    this.#handlers.clear();
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
