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

/**
 * An account's rights or credentials changed (role, disabled, password, logout, deletion): every
 * instance drops its cached state of the user and closes WebSockets opened with older tokens.
 * `token_generation` is the new generation (`null` when the user was deleted).
 */
export interface UserChangedEvent {
  type: "user.changed";
  data: {
    user_id: string;
    change: "updated" | "deleted" | "password" | "logout";
    token_generation: number | null;
  };
}

/** Everything that crosses the bus between instances. */
export type GatewayEvent = ReadingAcceptedEvent | DeviceChangedEvent | UserChangedEvent;
