import type { Reading } from "./reading.ts";

/**
 * A reading was committed to the store. `position` is its resume position: `<meter_id>@<seq>`,
 * where `seq` numbers the meter's stored readings 1, 2, 3, … in commit order (assigned under
 * the meter's lock by the insert). A client that reconnects passes it back as `since`.
 */
export interface ReadingAcceptedEvent {
  type: "meter.reading.accepted";
  data: Reading;
  position: string;
}

/** A device's registration, keys or status changed: actors holding it must reload. */
export interface DeviceChangedEvent {
  type: "device.changed";
  /** `user_id`: the owner after the change (re-registration may move a meter to another user). */
  data: { meter_id: string; change: "registered" | "rotated" | "revoked"; user_id?: string };
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

/** Readings were minted into energy tokens (confirmed on the ledger). */
export interface ReadingsMintedEvent {
  type: "meter.reading.minted";
  data: {
    mint_id: string;
    user_id: string;
    reading_ids: string[];
    amount: string;
    tx_signature: string | null;
  };
}

/** Progress or end of one batch job, for its submitter's connections. */
export interface BatchEvent {
  type: "batch.progress" | "batch.completed";
  data: { job_id: string; user_id: string; [field: string]: unknown };
}

/** Everything that crosses the bus between instances. */
export type GatewayEvent =
  | ReadingAcceptedEvent
  | DeviceChangedEvent
  | UserChangedEvent
  | ReadingsMintedEvent
  | BatchEvent;

/**
 * Where an event travels. An instance subscribes only to what its own clients need:
 * `meter:<id>` while one of its WebSocket clients follows that meter, `user:<id>` while the user
 * is connected (mints, batch progress), `all` (the firehose) only while an admin `"all"`
 * subscription exists on it; `control` (devices, users) always.
 */
export type Topic = "control" | "all" | `meter:${string}` | `user:${string}`;

/** The topics an event is published on (one rule, used by every bus adapter). */
export function topicsOf(event: GatewayEvent): Topic[] {
  switch (event.type) {
    case "meter.reading.accepted":
      return [`meter:${event.data.meter_id}`, "all"];
    case "meter.reading.minted":
      return [`user:${event.data.user_id}`, "all"];
    case "batch.progress":
    case "batch.completed":
      return [`user:${event.data.user_id}`];
    default:
      return ["control"];
  }
}

/** The bounded kind of a topic (`meter`, `user`, `all`, `control`), for metric labels. */
export function topicKind(topic: Topic): "meter" | "user" | "all" | "control" {
  const colon = topic.indexOf(":");
  return (colon < 0 ? topic : topic.slice(0, colon)) as "meter" | "user" | "all" | "control";
}

/** A resume position: `<meter_id>@<seq>` (`@` never occurs in a meter id). */
export function formatPosition(meterId: string, seq: number): string {
  return `${meterId}@${seq}`;
}

/** Parses {@linkcode formatPosition}'s form; `null` when the text is not a position. */
export function parsePosition(text: string): { meter_id: string; seq: number } | null {
  const at = text.lastIndexOf("@");
  if (at <= 0) return null;
  const digits = text.slice(at + 1);
  if (!/^(0|[1-9]\d{0,15})$/.test(digits)) return null;
  const seq = Number(digits);
  if (!Number.isSafeInteger(seq)) return null;
  return { meter_id: text.slice(0, at), seq };
}
