import type { GatewayEvent } from "../core/events.ts";

/** A handler of bus events. */
export type EventHandler = (event: GatewayEvent) => void;

/** Fans events out to every subscriber on every gateway instance. */
export interface Bus {
  publish(event: GatewayEvent): Promise<void>;
  /** Subscribes; returns the function that unsubscribes. */
  subscribe(handler: EventHandler): () => void;
  close(): Promise<void>;
}
