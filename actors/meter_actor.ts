import type { BucketConfig } from "../core/token_bucket.ts";
import { TokenBucket } from "../core/token_bucket.ts";
import type { KeyPolicy } from "../core/device.ts";
import { mayUseMeter, notYourMeter } from "../core/ownership.ts";
import { keyUsable, type LiveKey } from "../core/device_keys.ts";
import type { ErrorCode } from "../core/errors.ts";
import { kwhText, readingId, type ReadingRow, type ReadingSource } from "../core/reading.ts";
import {
  checkKwh,
  checkTimestamp,
  checkTimestampForm,
  collides,
  type RuleLimits,
} from "../core/rules.ts";
import { canonicalMessage, verifyWith } from "../core/signature.ts";
import type { Principal } from "../core/user.ts";
import type { InsertResult } from "../db/store.ts";
import type { Outcome } from "../core/outcome.ts";

/** One reading handed to a meter actor; fields as transmitted, already schema-checked. */
export interface Submission {
  meter_id: string;
  kwh_amount: string | number;
  reading_timestamp: string;
  key_id?: string;
  device_signature: string;
  source: ReadingSource;
  /** The HTTP caller; absent for device transports, which authenticated as the meter. */
  caller?: Principal;
  /** The client's network address, when the transport knows it (for the security log). */
  address?: string;
  /** The batch job submitting it (`source: "batch"`): the stored row carries it. */
  batch_job_id?: string;
}

/** What an actor knows of its device, loaded at activation. */
export interface DeviceState {
  user_id: string;
  wallet_address: string | null;
  revoked: boolean;
  keys: LiveKey[];
}

/** Settings shared by every actor (one object, not one copy per actor). */
export interface ActorSettings {
  rules: RuleLimits;
  bucket: BucketConfig;
  keys: KeyPolicy;
  /** How many recent reading times each actor remembers. */
  recent: number;
}

/** The actor's verdict: a final rejection/duplicate, or a row to persist. */
export type Verdict =
  | { kind: "reject"; code: ErrorCode; message: string; retryAfter?: number }
  | { kind: "duplicate"; outcome: Outcome & { status: "duplicate" } }
  | { kind: "accept"; row: ReadingRow }
  /** Collides with a reading still being written: decide again once it is settled. */
  | { kind: "wait"; until: Promise<unknown> };

/**
 * The state of one meter: device keys, the duplicate window over recent readings and the token
 * bucket. `decide` is the hot path: synchronous, no I/O.
 */
export class MeterActor {
  readonly meterId: string;
  device: DeviceState | null;
  /** Recent accepted or in-flight reading times, oldest first. */
  #recent: number[];
  #bucket: TokenBucket | undefined;
  /** Writes in flight by reading time; allocated only while there are any. */
  #pending: Map<number, Promise<unknown>> | undefined;
  /** Readings handed to the writer and not yet settled; an actor with any is not passivated. */
  inFlight = 0;
  /** Readings this actor stored since its activation (the admin top-N view of meters). */
  stored = 0;
  lastActive: number;

  constructor(meterId: string, device: DeviceState | null, recent: number[], now: number) {
    this.meterId = meterId;
    this.device = device;
    this.#recent = recent;
    this.lastActive = now;
  }

  /** Runs the rules on one submission (parse → validate → verify → window → bucket). */
  decide(msg: Submission, now: number, settings: ActorSettings): Verdict {
    const device = this.device;
    // A non-admin caller gets one answer for unknown meters and other users' meters, so the
    // API does not reveal which meter ids exist.
    if (msg.caller && !mayUseMeter(msg.caller, device?.user_id)) {
      return reject("forbidden", notYourMeter(msg.meter_id));
    }
    if (device === null) {
      return reject("unknown_meter", `Meter "${msg.meter_id}" is not registered`);
    }
    if (device.revoked) return reject("device_revoked", `Meter "${msg.meter_id}" is revoked`);

    const kwh = checkKwh(msg.kwh_amount, settings.rules);
    if (typeof kwh !== "number") return reject(kwh.code, kwh.message);
    const form = checkTimestampForm(msg.reading_timestamp);
    if (form) return reject(form.code, form.message);
    const ts = Date.parse(msg.reading_timestamp);
    const late = checkTimestamp(ts, now, settings.rules);
    if (late) return reject(late.code, late.message);

    const message = canonicalMessage(msg.meter_id, msg.reading_timestamp, kwhText(msg.kwh_amount));
    const keyId = verifyKeys(
      device.keys,
      msg.meter_id,
      msg.key_id,
      message,
      msg.device_signature,
      now,
      settings.keys,
    );
    if (typeof keyId !== "string") return keyId;

    for (const other of this.#recent) {
      if (collides(other, ts, settings.rules.dedupeWindowMs)) {
        // Never answer "duplicate" with a reading that is not committed yet: it may still fail.
        const pending = this.#pending?.get(other);
        if (pending) return { kind: "wait", until: pending };
        return { kind: "duplicate", outcome: duplicateOf(msg.meter_id, other, ts) };
      }
    }

    this.#bucket ??= new TokenBucket(settings.bucket, now);
    const waitMs = this.#bucket.take(settings.bucket, now);
    if (waitMs > 0) {
      return {
        kind: "reject",
        code: "rate_limited",
        message: `Meter "${msg.meter_id}" exceeded its reading rate`,
        retryAfter: Math.ceil(waitMs / 1000),
      };
    }

    this.#remember(ts, settings.recent);
    this.inFlight++;
    return {
      kind: "accept",
      row: {
        meter_id: msg.meter_id,
        ts,
        kwh_e4: kwh,
        user_id: device.user_id,
        wallet_address: device.wallet_address,
        key_id: keyId,
        device_signature: msg.device_signature,
        source: msg.source,
        submitted_at: now,
        minted: false,
        ...(msg.batch_job_id === undefined ? {} : { batch_job_id: msg.batch_job_id }),
      },
    };
  }

  /** Records the write of an accepted row, so colliding readings wait for its fate. */
  track(ts: number, settled: Promise<unknown>): void {
    (this.#pending ??= new Map()).set(ts, settled);
  }

  /** Settles an accepted row with the store's result, or `"failed"` when it was not written. */
  settle(ts: number, result: InsertResult | "failed", settings: ActorSettings): void {
    this.inFlight--;
    if (this.#pending?.delete(ts) && this.#pending.size === 0) this.#pending = undefined;
    if (result !== "failed" && result.status === "stored") return;
    const i = this.#recent.lastIndexOf(ts);
    if (i >= 0) this.#recent.splice(i, 1);
    if (result !== "failed") {
      this.#remember(result.conflict_ts, settings.recent);
      // A duplicate found by the store keeps its token: replays cost a store check each.
      return;
    }
    // Not written at all: it should not cost the meter a token.
    this.#bucket?.refund(settings.bucket);
  }

  /**
   * Lowers the token bucket to a cluster-wide level as of `at` (never raises it); a meter that
   * has not taken a token here yet has no bucket and nothing to lower.
   */
  lowerBucket(level: number, at: number, config: BucketConfig): void {
    this.#bucket?.lower(config, level, at);
  }

  /** Checks signed connection credentials (no reading): `null` when they verify. */
  checkCredentials(
    message: string | null,
    signature: string | null,
    now: number,
    policy: KeyPolicy,
  ): Verdict | null {
    const device = this.device;
    if (device === null) {
      return reject("unknown_meter", `Meter "${this.meterId}" is not registered`);
    }
    if (device.revoked) return reject("device_revoked", `Meter "${this.meterId}" is revoked`);
    // A verified client certificate already proved the identity.
    if (message === null || signature === null) return null;
    const keyId = verifyKeys(device.keys, this.meterId, undefined, message, signature, now, policy);
    return typeof keyId === "string" ? null : keyId;
  }

  #remember(ts: number, capacity: number): void {
    if (this.#recent.length >= capacity) this.#recent.shift();
    this.#recent.push(ts);
  }
}

/** Finds a usable key that verifies `signature`; its id, or the rejection. */
function verifyKeys(
  keys: LiveKey[],
  meterId: string,
  keyId: string | undefined,
  message: string,
  signature: string,
  now: number,
  policy: KeyPolicy,
): string | Verdict {
  let expiredMatch = false;
  let unreadable = false;
  for (const key of keys) {
    if (keyId !== undefined && key.key_id !== keyId) continue;
    if (key.material === null) {
      unreadable = true;
      continue;
    }
    if (verifyWith(key.material, message, signature)) {
      if (keyUsable(key, now, policy)) return key.key_id;
      // Remembered only to tell "expired" from "wrong".
      expiredMatch = true;
    }
  }
  if (expiredMatch) {
    return reject("key_expired", `The key of meter "${meterId}" has expired; rotate it`);
  }
  if (unreadable) {
    // The gateway's fault, not the meter's: transient, so MQTT keeps the reading for a retry.
    return {
      kind: "reject",
      code: "unavailable",
      message: `The device key of meter "${meterId}" cannot be decrypted; the gateway's ` +
        "DEVICE_KEY_ENCRYPTION_KEY is not the one that sealed it",
      retryAfter: 60,
    };
  }
  if (keyId !== undefined && !keys.some((k) => k.key_id === keyId)) {
    return reject("bad_signature", `Meter "${meterId}" has no key "${keyId}"`);
  }
  return reject("bad_signature", "device_signature does not verify with the meter's key");
}

function reject(code: ErrorCode, message: string): Verdict {
  return { kind: "reject", code, message };
}

/** The duplicate outcome of a reading at `ts` colliding with the stored one at `storedTs`. */
export function duplicateOf(
  meterId: string,
  storedTs: number,
  ts: number,
): Outcome & { status: "duplicate" } {
  return {
    status: "duplicate",
    id: readingId(meterId, storedTs),
    message: storedTs === ts
      ? `Reading of meter "${meterId}" at ${new Date(ts).toISOString()} is already stored`
      : `Meter "${meterId}" already has a reading at ${
        new Date(storedTs).toISOString()
      }, within the dedupe window`,
  };
}
