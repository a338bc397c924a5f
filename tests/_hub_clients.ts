// Recording stand-ins for WebSocket connections, for tests of the fan-out hub on its own.
import type { Role } from "../core/user.ts";
import type { HubClient } from "../ws/hub.ts";

/** Bound of one {@linkcode waitFor}: a guard against hangs, not a synchronisation. */
const DEADLINE_MS = 10_000;

/** A client that records what it was sent. */
export interface Recorder extends HubClient {
  sent: Record<string, unknown>[];
  closedWith?: number;
}

/** A connection of `userId` that keeps every message and never fills its buffer. */
export function recorder(userId: string, role: Role = "user"): Recorder {
  const client: Recorder = {
    principal: { user_id: userId, role },
    sent: [],
    send: (text) => client.sent.push(JSON.parse(text)),
    bufferedAmount: () => 0,
    close: (code) => client.closedWith = code,
  };
  return client;
}

/** The positions of the reading events a client was sent, in order. */
export function positionsOf(client: Recorder): string[] {
  return client.sent.filter((m) => m.type === "meter.reading.accepted").map((m) =>
    m.position as string
  );
}

/** Polls until `condition` holds (a catch-up from the store has no event to await). */
export async function waitFor(condition: () => boolean, what: string): Promise<void> {
  const deadline = Date.now() + DEADLINE_MS;
  while (!condition()) {
    if (Date.now() > deadline) throw new Error(`${what}: not within ${DEADLINE_MS} ms`);
    await new Promise((resolve) => setTimeout(resolve, 5));
  }
}
