import type { GatewayEvent } from "../core/events.ts";
import type { Bus, EventHandler } from "./bus.ts";

/** The in-process bus: one instance, no network. */
export class LocalBus implements Bus {
  #handlers = new Set<EventHandler>();

  publish(event: GatewayEvent): Promise<void> {
    for (const handler of this.#handlers) {
      try {
        handler(event);
      } catch (error) {
        // One broken subscriber must not starve the others.
        console.error("bus handler failed", error);
      }
    }
    return Promise.resolve();
  }

  subscribe(handler: EventHandler): () => void {
    this.#handlers.add(handler);
    return () => this.#handlers.delete(handler);
  }

  close(): Promise<void> {
    this.#handlers.clear();
    return Promise.resolve();
  }
}
