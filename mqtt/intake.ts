import type { Submission } from "../actors/meter_actor.ts";
import type { ActorRegistry } from "../actors/registry.ts";
import type { ErrorCode } from "../core/errors.ts";
import type { Outcome } from "../core/outcome.ts";
import { signedFieldsSchema } from "../core/reading.ts";
import type { ReadingCounters } from "../core/reading_counters.ts";

/** The answer published on `meters/{meter_id}/acks` for every reading. */
export interface AckMessage {
  reading_timestamp: string | null;
  status: "accepted" | "duplicate" | "rejected";
  id?: string;
  code?: ErrorCode;
  message?: string;
}

/** Where the intake waits when the writer is full: MQTT holds the ack instead of refusing. */
export interface Capacity {
  readonly hasCapacity: boolean;
  whenCapacity(): Promise<void>;
}

const BUSY_RETRY_MS = 20;

/** Options of {@linkcode MqttIntake}. */
export interface IntakeOptions {
  registry: ActorRegistry;
  capacity: Capacity;
  /** Largest accepted payload in bytes. */
  maxPayload: number;
  /** Pause before retrying after the store was unavailable. */
  retryMs?: number;
  /** Counts publishes received and those refused before their actor (metrics). */
  counters?: ReadingCounters;
}

const utf8 = new TextDecoder("utf-8", { fatal: true });

/**
 * Turns one MQTT publish into its final outcome. Permanent rejections are final at once;
 * transient ones (writer full, store down) are retried here, so the device's PUBACK is held
 * until the reading is committed or finally refused.
 */
export class MqttIntake {
  #o: IntakeOptions;
  #closed = false;
  #timers = new Set<ReturnType<typeof setTimeout>>();

  constructor(options: IntakeOptions) {
    this.#o = options;
  }

  /** Parses and submits a payload published on the meter's readings topic. */
  async handle(meterId: string, payload: Uint8Array): Promise<AckMessage> {
    this.#o.counters?.submitted("mqtt");
    const parsed = this.parse(meterId, payload);
    if ("status" in parsed) {
      if (parsed.status === "rejected" && parsed.code) {
        this.#o.counters?.rejected("mqtt", parsed.code);
      }
      return parsed;
    }
    for (;;) {
      const outcome = await this.#o.registry.submit(parsed);
      const transient = outcome.status === "rejected" &&
        (outcome.code === "overloaded" || outcome.code === "unavailable");
      if (!transient || this.#closed) return ackOf(parsed.reading_timestamp, outcome);
      if (outcome.code === "overloaded" && !this.#o.capacity.hasCapacity) {
        await this.#o.capacity.whenCapacity();
      } else {
        // The store is down, or the meter's mailbox (not the writer) is full: waiting on the
        // writer would return at once and spin, starving the activation it waits for.
        await this.#sleep(outcome.code === "overloaded" ? BUSY_RETRY_MS : this.#o.retryMs ?? 500);
      }
    }
  }

  /** Validates a payload; a rejection ack when it is unusable. */
  parse(meterId: string, payload: Uint8Array): Submission | AckMessage {
    if (payload.byteLength > this.#o.maxPayload) {
      return rejected(null, "payload_too_large", `Payload exceeds ${this.#o.maxPayload} bytes`);
    }
    let value: unknown;
    try {
      value = JSON.parse(utf8.decode(payload));
    } catch {
      return rejected(null, "invalid_payload", "Payload must be a UTF-8 JSON object");
    }
    const ts = typeof (value as { reading_timestamp?: unknown })?.reading_timestamp === "string"
      ? (value as { reading_timestamp: string }).reading_timestamp.slice(0, 40)
      : null;
    if (value && typeof value === "object" && "meter_id" in value) {
      // Accepted for symmetry with HTTP, but the topic is authoritative.
      const { meter_id, ...rest } = value as Record<string, unknown>;
      if (meter_id !== meterId) {
        return rejected(ts, "invalid_payload", "meter_id in the payload differs from the topic");
      }
      value = rest;
    }
    const result = signedFieldsSchema.safeParse(value);
    if (!result.success) {
      const issue = result.error.issues[0];
      const path = issue.path.join(".");
      return rejected(ts, "invalid_payload", `${path ? `${path}: ` : ""}${issue.message}`);
    }
    return { ...result.data, meter_id: meterId, source: "mqtt" };
  }

  /** Stops retrying; pending readings get their current outcome. */
  close(): void {
    this.#closed = true;
    for (const t of this.#timers) clearTimeout(t);
    this.#timers.clear();
  }

  #sleep(ms: number): Promise<void> {
    return new Promise((resolve) => {
      const t = setTimeout(() => {
        this.#timers.delete(t);
        resolve();
      }, ms);
      this.#timers.add(t);
    });
  }
}

/** Whether the outcome is final (the PUBACK may be sent). */
export function isFinal(ack: AckMessage): boolean {
  return !(ack.status === "rejected" && (ack.code === "overloaded" || ack.code === "unavailable"));
}

function rejected(ts: string | null, code: ErrorCode, message: string): AckMessage {
  return { reading_timestamp: ts, status: "rejected", code, message };
}

function ackOf(ts: string, outcome: Outcome): AckMessage {
  switch (outcome.status) {
    case "accepted":
      return { reading_timestamp: ts, status: "accepted", id: outcome.reading.id };
    case "duplicate":
      return {
        reading_timestamp: ts,
        status: "duplicate",
        id: outcome.id,
        code: "duplicate",
        message: outcome.message,
      };
    case "rejected":
      return rejected(ts, outcome.code, outcome.message);
  }
}
