import { canonicalMessage, connectMessage, signHmac } from "../core/signature.ts";

/** Options of {@linkcode connectCredentials}. */
export interface ConnectCredentialsOptions {
  /** The client id the device connects with: `<meter_id>` or `<meter_id>/<suffix>`. */
  clientId: string;
  /** The signing time (default: now). */
  nowMs?: number;
}

/**
 * MQTT CONNECT credentials of an HMAC device: username = meter id, password = `<s>.<sig>` over
 * the connect message, which names the client id; returned with that client id.
 */
export function connectCredentials(
  meterId: string,
  secret: Uint8Array,
  options: ConnectCredentialsOptions,
): { username: string; password: string; clientId: string } {
  const { clientId } = options;
  const seconds = String(Math.floor((options.nowMs ?? Date.now()) / 1000));
  return {
    username: meterId,
    password: `${seconds}.${signHmac(secret, connectMessage(meterId, clientId, seconds))}`,
    clientId,
  };
}

/** A signed reading payload for `meters/{meter_id}/readings`, as firmware would send it. */
export function readingPayload(
  meterId: string,
  secret: Uint8Array,
  timestamp: string,
  kwh: string,
): string {
  const device_signature = signHmac(secret, canonicalMessage(meterId, timestamp, kwh));
  return JSON.stringify({ kwh_amount: kwh, reading_timestamp: timestamp, device_signature });
}
