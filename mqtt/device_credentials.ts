import { canonicalMessage, connectMessage, signHmac } from "../core/signature.ts";

/** MQTT CONNECT credentials of an HMAC device: username = meter id, password = `<s>.<sig>`. */
export function connectCredentials(
  meterId: string,
  secret: Uint8Array,
  nowMs: number,
): { username: string; password: string } {
  const seconds = String(Math.floor(nowMs / 1000));
  return {
    username: meterId,
    password: `${seconds}.${signHmac(secret, connectMessage(meterId, seconds))}`,
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
