import type { Reading } from "./reading.ts";

/** A reading was committed to the store. */
export interface ReadingAcceptedEvent {
  type: "meter.reading.accepted";
  data: Reading;
}

/** A device's registration, keys or status changed: actors holding it must reload. */
export interface DeviceChangedEvent {
  type: "device.changed";
  data: { meter_id: string; change: "registered" | "rotated" | "revoked" };
}

/** Everything that crosses the bus between instances. */
export type GatewayEvent = ReadingAcceptedEvent | DeviceChangedEvent;
